"""The wire format between the grader and a student-code worker: JSON and safetensors, never pickle.

The task tests stay in the grader and only the calls of the graded functions go to the worker (issue 18);
this module is how the values cross. One message is

    8 bytes: the header's length (little-endian) | the header, JSON | the tensors, safetensors

and the header's "value" is a tree of plain JSON values and one-key tags:

    [...] a list, {"$tu": [...]} a tuple, {"$d": [[key, value], ...]} a dict, {"$set": [...]} a set
    {"$t": name, "rg": bool, "p": bool}     a tensor (stored under `name`; requires_grad; nn.Parameter)
    {"$re": pattern, "flags": n, "m": "re"} a compiled regular expression (re or regex)
    {"$meta": shape, "dtype": "float32"}   a tensor on the meta device (a shape and a dtype, no values)
    {"$np": name}                           a numpy array of numbers (a numpy number crosses as a plain one)
    {"$dtype": "float32"}, {"$dev": "cpu"}  a dtype, a device
    {"$gen": name, "dev": "cpu"}            a torch.Generator, its state stored as a tensor
    {"$nt": "module:Name", "v": [...]}      a namedtuple
    {"$dc": "module:Name", "f": {"$d"...}}  a dataclass instance, by its fields (and "x": what __post_init__ set)
    {"$o": "module:Name", "d": {"$d"...}}   any other object, by its __dict__ (an nn.Module: its parameters,
                                            buffers and submodules are in there)
    {"$ref": n}                             the n-th object or tensor again (shared weights stay shared)
    {"$kd": n, "v": ...}, {"$k": n}         a long list or dict, to be kept as number n; kept number n again
    {"$h": n}                               handle n: an object that stays on the side that sent it (a test's
                                            FakeVAE, a function); the other side calls back into it (proxy.py)

Decoding never runs code named by the message unless the caller says which classes it may build: `decode(data)`
accepts plain values and tensors only; `decode(data, allowed={"minildm.attention:OnlineSoftmax": OnlineSoftmax})`
builds those classes by their constructors (the grader's side: the worker is never trusted); `decode(data,
rebuild=True)` rebuilds any minildm or torch class by path without calling its constructor (the worker's side:
its input comes from the grader). Anything that cannot be described (a function, a file) is a CodecError that
names it.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import importlib
import json
import struct
import types

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

MAX_TEXT = 600                   # characters of an exception's message that cross
MAX_MESSAGE = 1 << 30            # bytes: a worker's answer larger than this is refused unread
REBUILDABLE = ("minildm.", "torch.")
PLAIN = (list, tuple, dict, set, frozenset)     # containers (and namedtuples): always by value
KEEP_FROM = 1000                 # entries: a list or dict this long is sent once and kept (encode's `keep`)
PATTERNS = ("re", "regex")       # compiled regular expressions cross as their pattern and flags
SHARED = {"$t", "$np", "$gen", "$tu", "$nt", "$dc", "$o"}      # the entries a {"$ref": n} can point back to


class CodecError(ValueError):
    """A value that cannot cross between the grader and the worker, or a message that is not well formed."""


def path_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def by_value(x) -> bool:
    """Whether an object (not a plain value or container) crosses by its state: a minildm or torch object that is
    data, not code. Anything else crosses as a handle where the sender allows handles (see encode)."""
    if isinstance(x, (torch.Tensor, torch.Generator, torch.dtype, torch.device, np.ndarray, np.generic)):
        return True
    if type(x).__name__ == "Pattern" and type(x).__module__.lstrip("_") in PATTERNS:
        return True
    if not type(x).__module__.startswith(REBUILDABLE) or callable_only(x):
        return False
    return dataclasses.is_dataclass(x) or isinstance(x, tuple) or hasattr(x, "__dict__")


def encode(value, handle=None, keep=None) -> bytes:
    """One message holding `value`. `handle(x)` gives the handle number of an object that must not cross by value
    (None: it has none, and it is a CodecError); without `handle` nothing crosses as a handle. `keep(x)` gives
    (number, fresh) for a list or dict of KEEP_FROM entries or more: the other side keeps it under that number, so it
    is sent once (a tokenizer's 49,408-word vocabulary), not with every call."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, int] = {}
    alive = []                   # the objects seen, alive until the end (so that their ids stay unique)

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
            alive.append(x)
        return tree

    def describe(x):
        if keep is not None and isinstance(x, (list, dict)) and len(x) >= KEEP_FROM:
            number, fresh = keep(x)
            if not fresh:
                return {"$k": number}
            return {"$kd": number, "v": [walk(v) for v in x] if isinstance(x, list) else
                    {"$d": [[walk(k), walk(v)] for k, v in x.items()]}}
        if handle is not None and not isinstance(x, PLAIN) and not by_value(x):
            number = handle(x)
            if number is not None:
                return {"$h": number}
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":                 # shapes and dtypes only: a test of what runs on t's device
                return {"$meta": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            if x.device.type != "cpu":
                raise CodecError(f"a tensor on {x.device} cannot be sent; the grader works on the CPU")
            return tensor(x, rg=x.requires_grad, p=isinstance(x, torch.nn.Parameter))
        if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
            return {"$np": tensor(torch.from_numpy(np.ascontiguousarray(x)))["$t"]}
        if isinstance(x, np.generic) and x.dtype.kind in "biuf":
            return x.item()
        if type(x).__name__ == "Pattern" and type(x).__module__.lstrip("_") in PATTERNS:
            return {"$re": x.pattern, "flags": x.flags, "m": type(x).__module__.lstrip("_")}
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
            names = [f.name for f in dataclasses.fields(x)]
            rest = [[k, walk(v)] for k, v in vars(x).items() if k not in names] if hasattr(x, "__dict__") else []
            return {"$dc": path_of(type(x)), "f": {"$d": [[name, walk(getattr(x, name))] for name in names]},
                    **({"x": {"$d": rest}} if rest else {})}
        if hasattr(x, "__dict__") and type(x).__module__.startswith(REBUILDABLE) and not callable_only(x):
            return {"$o": path_of(type(x)), "d": walk(dict(vars(x)))}
        raise CodecError(f"a {type(x).__module__}.{type(x).__qualname__} cannot be sent to or from the worker "
                         "(only tensors, numbers, strings, lists, dicts, dataclasses and minildm/torch objects)")

    header = json.dumps({"value": walk(value)}).encode("utf-8")
    body = save_tensors(tensors) if tensors else b""
    return struct.pack("<Q", len(header)) + header + body


CODE = (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType, functools.partial)


def callable_only(x) -> bool:
    """Functions, methods, classes and modules have a __dict__ but are code, not data (an object of a class with
    __call__, a tokenizer or an nn.Module, is data)."""
    return isinstance(x, CODE)


def decode(data: bytes, allowed: dict[str, type] | None = None, rebuild: bool = False, handles=None,
           kept: dict | None = None):
    """The value in one message (see the module docstring for what each mode may build); `handles(n)` gives the
    object for {"$h": n} (without it, a handle is a CodecError); `kept` holds the kept lists and dicts (see
    encode; without it, they are a CodecError)."""
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
        if tag == "$re" and isinstance(x[tag], str) and isinstance(x.get("flags"), int) and x.get("m") in PATTERNS:
            return importlib.import_module(x["m"]).compile(x[tag], x["flags"])
        if tag == "$meta" and isinstance(x[tag], list) and all(isinstance(n, int) and n >= 0 for n in x[tag]) \
                and isinstance(getattr(torch, str(x.get("dtype")), None), torch.dtype):
            return torch.empty(x[tag], dtype=getattr(torch, x["dtype"]), device="meta")
        if tag == "$np" and x[tag] in tensors:
            return new(tensors[x[tag]].numpy())
        if tag == "$gen" and x[tag] in tensors and isinstance(x.get("dev"), str):
            generator = torch.Generator(x["dev"])
            generator.set_state(tensors[x[tag]])
            return new(generator)
        if tag == "$kd" and kept is not None and isinstance(x[tag], int):
            kept[x[tag]] = walk(x.get("v"))
            return kept[x[tag]]
        if tag == "$k" and kept is not None and x[tag] in kept:
            return kept[x[tag]]
        if tag == "$h" and handles is not None and isinstance(x[tag], int):
            return handles(x[tag])
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
            rest = walk(x["x"]) if isinstance(x.get("x"), dict) else {}      # numbered before obj, as encoded
            if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
                raise CodecError(f"the fields of {x[tag]} are not a dict of names")
            if x[tag] in allowed:                         # the grader's side: the class's own constructor, whose
                try:                                      # error is the message's fault, not the call's
                    return new(cls(**fields))
                except Exception as err:                  # noqa: BLE001 - a ValueError must not pass pytest.raises
                    raise CodecError(f"{x[tag]} could not be built: {type(err).__name__}") from None
            obj = new(cls.__new__(cls))                   # the worker's side: the state as the grader had it
            for key, value in {**fields, **(rest if isinstance(rest, dict) else {})}.items():
                object.__setattr__(obj, str(key), value)
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
    worker both call this one function, so they see the tensors and generators of a call in the same order. A list or
    dict of KEEP_FROM entries or more is data that is sent once and kept (encode): it is not searched (a tokenizer's
    vocabulary would cost seconds per call)."""
    found: list = []
    seen: set[int] = set()

    def visit(x):
        if id(x) in seen or x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
            return
        seen.add(id(x))
        if isinstance(x, kind):
            found.append(x)
            return
        if isinstance(x, (list, dict)) and len(x) >= KEEP_FROM:
            return
        if isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(k)
                visit(v)
        elif by_value(x) and hasattr(x, "__dict__"):
            visit(vars(x))                  # not into a handle's object: it stays where it is

    visit(value)
    return found


def error_reply(err: BaseException) -> dict:
    """An exception as it crosses: its class name and its message, cut short (never its traceback or objects)."""
    message = str(err)
    return {"ok": False, "error": type(err).__name__[:100],
            "message": message if len(message) <= MAX_TEXT else message[:MAX_TEXT] + " ..."}


def as_exception(name, message) -> Exception:
    """The other side's exception, as a builtin of the same name when there is one (never anything else), so that
    ValueError stays ValueError for `pytest.raises` and NotImplementedError still says "not started"."""
    message = str(message)[:MAX_TEXT]
    found = getattr(builtins, str(name), None)
    if isinstance(found, type) and issubclass(found, Exception) and not issubclass(found, (OSError, Warning)):
        try:
            return found(message)
        except Exception:                                     # noqa: BLE001 - a builtin with other arguments
            pass
    return RuntimeError(f"{str(name)[:100]}: {message}")


def effects(args, kwargs, versions: list[int]) -> dict:
    """What a call did to its arguments, to copy back to the caller's side: the global RNG, the generators' states
    and the argument tensors changed in place (`versions`: their _version before the call)."""
    tensors = walk([args, kwargs], torch.Tensor)
    return {"rng": torch.get_rng_state(), "generators": [g.get_state() for g in walk([args, kwargs], torch.Generator)],
            "changed": [[i, t.detach()] for i, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]}


def versions(args, kwargs) -> list[int]:
    return [t._version for t in walk([args, kwargs], torch.Tensor)]


def apply_effects(reply: dict, args, kwargs) -> None:
    """Copy a call's side effects (see effects) onto this side's arguments; malformed entries are ignored."""
    rng = reply.get("rng")
    if isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape:
        torch.set_rng_state(rng)
    generators = walk([args, kwargs], torch.Generator)
    states = reply.get("generators") or []
    for generator, state in zip(generators, states if isinstance(states, list) else []):
        if isinstance(state, torch.Tensor) and state.shape == generator.get_state().shape:
            generator.set_state(state)
    tensors = walk([args, kwargs], torch.Tensor)
    for entry in reply.get("changed") or []:
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and 0 <= entry[0] < len(tensors):
            target, value = tensors[entry[0]], entry[1]
            if isinstance(value, torch.Tensor) and value.shape == target.shape and value.dtype == target.dtype:
                with torch.no_grad():
                    target.copy_(value)
