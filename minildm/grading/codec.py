"""The wire format between the grader and a student-code worker: JSON and safetensors, never pickle.

Issue 18, step 2 keeps the task tests in the grader and sends only the calls of the graded functions to the worker;
this module is how the values cross. One message is

    8 bytes: the header's length (little-endian) | the header, JSON | the tensors, safetensors

and the header's "value" is a tree of plain JSON values and one-key tags:

    [...] a list, {"$tu": [...]} a tuple, {"$d": [[key, value], ...]} a dict, {"$set": [...]} a set
    {"$t": name, "rg": bool, "p": bool}     a tensor (stored under `name`; requires_grad; nn.Parameter)
    {"$dtype": "float32"}, {"$dev": "cpu"}  a dtype, a device
    {"$gen": name, "dev": "cpu"}            a torch.Generator, its state stored as a tensor
    {"$nt": "module:Name", "v": [...]}      a namedtuple
    {"$dc": "module:Name", "f": {"$d"...}}  a dataclass instance, by its fields
    {"$o": "module:Name", "d": {"$d"...}}   any other object, by its __dict__ (an nn.Module: its parameters,
                                            buffers and submodules are in there)
    {"$ref": n}                             the n-th object or tensor again (shared weights stay shared)

Decoding never runs code named by the message unless the caller says which classes it may build: `decode(data)`
accepts plain values and tensors only; `decode(data, allowed={"minildm.attention:OnlineSoftmax": OnlineSoftmax})`
builds those classes by their constructors (the grader's side: the worker is never trusted); `decode(data,
rebuild=True)` rebuilds any minildm or torch class by path without calling its constructor (the worker's side:
its input comes from the grader). Anything that cannot be described (a function, a file) is a CodecError that
names it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import struct

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

MAX_MESSAGE = 1 << 30            # bytes: a worker's answer larger than this is refused unread
REBUILDABLE = ("minildm.", "torch.")
SHARED = {"$t", "$gen", "$tu", "$nt", "$dc", "$o"}      # the entries a {"$ref": n} can point back to


class CodecError(ValueError):
    """A value that cannot cross between the grader and the worker, or a message that is not well formed."""


def path_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, int] = {}
    keep = []                    # the objects seen, alive until the end (so that their ids stay unique)

    def tensor(t: torch.Tensor, **extra) -> dict:
        name = f"t{len(tensors)}"
        tensors[name] = t.detach().cpu().contiguous().clone()
        return {"$t": name, **extra}

    def walk(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if id(x) in seen:
            return {"$ref": seen[id(x)]}
        tree = describe(x)
        if isinstance(tree, dict) and next(iter(tree)) in SHARED:   # numbered after its parts, as decode does
            seen[id(x)] = len(seen)
            keep.append(x)
        return tree

    def describe(x):
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise CodecError(f"a tensor on {x.device} cannot be sent; the grader works on the CPU")
            return tensor(x, rg=x.requires_grad, p=isinstance(x, torch.nn.Parameter))
        if isinstance(x, torch.Generator):
            return {"$gen": tensor(x.get_state())["$t"], "dev": str(x.device)}
        if isinstance(x, torch.dtype):
            return {"$dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {"$dev": str(x)}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return {"$nt": path_of(type(x)), "v": [walk(v) for v in x]}
        if isinstance(x, tuple):
            return {"$tu": [walk(v) for v in x]}
        if isinstance(x, dict):
            return {"$d": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, (set, frozenset)):
            return {"$set": [walk(v) for v in x]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"$dc": path_of(type(x)),
                    "f": {"$d": [[f.name, walk(getattr(x, f.name))] for f in dataclasses.fields(x)]}}
        if hasattr(x, "__dict__") and type(x).__module__.startswith(REBUILDABLE) and not callable_only(x):
            return {"$o": path_of(type(x)), "d": walk(dict(vars(x)))}
        raise CodecError(f"a {type(x).__module__}.{type(x).__qualname__} cannot be sent to or from the worker "
                         "(only tensors, numbers, strings, lists, dicts, dataclasses and minildm/torch objects)")

    header = json.dumps({"value": walk(value)}).encode("utf-8")
    body = save_tensors(tensors) if tensors else b""
    return struct.pack("<Q", len(header)) + header + body


def callable_only(x) -> bool:
    """Functions, methods and modules have a __dict__ but are code, not data."""
    return isinstance(x, type) or callable(x) and not isinstance(x, torch.nn.Module)


def decode(data: bytes, allowed: dict[str, type] | None = None, rebuild: bool = False):
    """The value in one message (see the module docstring for what each mode may build)."""
    if len(data) < 8 or len(data) > MAX_MESSAGE:
        raise CodecError(f"a message of {len(data)} bytes: expected 8 to {MAX_MESSAGE}")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CodecError("the message's header is cut short")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
        tensors = load_tensors(data[8 + size:]) if len(data) > 8 + size else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, Exception) as err:   # noqa: BLE001
        raise CodecError(f"a malformed message: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(header, dict) or "value" not in header:
        raise CodecError("a message without a value")
    objects: list = []
    allowed = allowed or {}

    def klass(path) -> type:
        if isinstance(path, str) and path in allowed:
            return allowed[path]
        module, _, name = path.partition(":") if isinstance(path, str) else ("", "", "")
        if not rebuild or not module.startswith(REBUILDABLE) and module not in ("minildm", "torch"):
            raise CodecError(f"the message holds a {str(path)[:100]}, which may not be built here")
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        if not isinstance(found, type):
            raise CodecError(f"{path} is not a class")
        return found

    def new(obj):
        objects.append(obj)
        return obj

    def walk(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict) or len(x) not in (1, 2, 3):
            raise CodecError(f"an unknown entry in the message: {str(x)[:100]}")
        tag = next(iter(x))
        if tag == "$ref" and isinstance(x[tag], int) and 0 <= x[tag] < len(objects):
            return objects[x[tag]]
        if tag == "$t" and x[tag] in tensors:
            t = tensors[x[tag]]
            if x.get("p"):
                return new(torch.nn.Parameter(t, requires_grad=bool(x.get("rg"))))
            return new(t.requires_grad_(True) if x.get("rg") and t.is_floating_point() else t)
        if tag == "$gen" and x[tag] in tensors and isinstance(x.get("dev"), str):
            generator = torch.Generator(x["dev"])
            generator.set_state(tensors[x[tag]])
            return new(generator)
        if tag == "$dtype" and isinstance(getattr(torch, str(x[tag]), None), torch.dtype):
            return getattr(torch, x[tag])
        if tag == "$dev" and isinstance(x[tag], str):
            return torch.device(x[tag])
        if tag == "$tu" and isinstance(x[tag], list):
            return new(tuple(walk(v) for v in x[tag]))
        if tag == "$d" and isinstance(x[tag], list) and all(isinstance(p, list) and len(p) == 2 for p in x[tag]):
            return {walk(k): walk(v) for k, v in x[tag]}
        if tag == "$set" and isinstance(x[tag], list):
            return set(walk(v) for v in x[tag])
        if tag == "$nt" and isinstance(x.get("v"), list):
            cls = klass(x[tag])
            return new(cls(*[walk(v) for v in x["v"]]))
        if tag in ("$dc", "$o") and isinstance(x.get("f", x.get("d")), dict):
            cls = klass(x[tag])
            fields = walk(x.get("f", x.get("d")))
            if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
                raise CodecError(f"the fields of {x[tag]} are not a dict of names")
            if x[tag] in allowed:
                return new(cls(**fields))                 # the grader's side: the class's own constructor
            obj = new(cls.__new__(cls))                   # the worker's side: the state as the grader had it
            for key, value in fields.items():
                object.__setattr__(obj, key, value)
            return obj
        raise CodecError(f"an unknown or malformed entry in the message: {str(x)[:100]}")

    try:
        return walk(header["value"])
    except RecursionError:
        raise CodecError("the message nests too deeply") from None


def read_frame(stream) -> bytes | None:
    """One message from a pipe (8 bytes of length, then the message); None at its end or when cut short."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    if size > MAX_MESSAGE:
        return None
    data = stream.read(size)
    return data if len(data) == size else None


def write_frame(stream, data: bytes) -> None:
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def walk(value, kind: type) -> list:
    """Every `kind` inside value (lists, tuples, dicts, objects' __dict__), depth first, each once: the grader and the
    worker both call this one function, so they see the tensors and generators of a call in the same order."""
    found: list = []
    seen: set[int] = set()

    def visit(x):
        if id(x) in seen or x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
            return
        seen.add(id(x))
        if isinstance(x, kind):
            found.append(x)
            return
        if isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(k)
                visit(v)
        elif hasattr(x, "__dict__") and not callable(x) or isinstance(x, torch.nn.Module):
            visit(vars(x))

    visit(value)
    return found
