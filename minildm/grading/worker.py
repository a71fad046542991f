"""The student-code worker of issue 18: it answers calls of graded functions, and nothing else.

The grader copies this file, codec.py and forbid.py into the worker's folder (as minildm_grade_worker.py,
minildm_grade_codec.py and minildm_grade_forbid.py: in the worker, `minildm` is the student's package, so none of
them may import from it) and starts it inside the isolation of isolation.py. It reads requests on stdin and writes
answers on stdout, each one framed as 8 bytes of length and a codec message:

    {"op": "import", "modules": [...]}: import them now (at start, so a call's timeout does not pay for it)
    {"op": "call", "target": "minildm.autoencoder:DiagonalGaussian.kl", "args": [...], "kwargs": {...},
     "rng": the global RNG state, "forbid": {"task": ..., "targets": [...]}, "task": "ch02.gaussian_kl"}
    {"op": "backward", "replay": the call's message as uint8, "grad_outputs": [...]}: the call again, with the
     same random state, and the gradients of its output tensors (given these output gradients) with respect to
     every floating tensor of its arguments that requires grad, then every tensor that requires grad in the
     answers of its callbacks (the grader ties those to the test's objects)

and answers {"ok": true, "value": ..., "rng": ..., "generators": [states], "changed": [[i, tensor]], "warnings":
[[category, message]]} (the generators of the arguments, in order, the argument tensors the call changed in place,
and the warnings it gave) or {"ok": false,
"error": "TypeError", "message": "... (cut short)"}.

An argument the grader keeps (a test's FakeVAE, a function) arrives as a Handle: using it sends a callback
{"op": "getattr" | "call", "handle": n, "name": ..., "args": [...], "kwargs": {...}} to the grader and waits for its
answer, serving any call the grader makes meanwhile. What the student's code prints goes to stderr, so it cannot
corrupt an answer; an answer it forges is only ever taken as its own function's result.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch
from minildm_grade_codec import (  # the grader's copies, beside this file
    MAX_TEXT,
    CodecError,
    apply_effects,
    as_exception,
    decode,
    effects,
    encode,
    error_reply,
    read_frame,
    versions,
    walk,
    write_frame,
)
from minildm_grade_forbid import Forbidden


class Channel:
    """The pipe to the grader. `leaves` collects the tensors requiring grad that callbacks answered with."""

    def __init__(self):
        self.requests = os.fdopen(os.dup(0), "rb")
        self.answers = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)                                # the student's prints go to stderr, not into an answer
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        self.leaves: list[torch.Tensor] = []
        self.kept: dict[int, object] = {}          # the long lists and dicts the grader sent once (codec.encode)

    def send(self, message: dict) -> None:
        try:
            data = encode(message, handle=handle_number)
        except CodecError as err:
            data = encode({"ok": False, "error": "CodecError", "message": str(err)})
        write_frame(self.answers, data)

    def next_reply(self) -> dict | None:
        """Serve the grader's requests until a reply comes (to our callback), or the pipe ends (None)."""
        while (frame := read_frame(self.requests)) is not None:
            message = decode(frame, rebuild=True, handles=Handle, kept=self.kept)
            if isinstance(message, dict) and "op" in message:
                self.send(serve(message))
            else:
                return message
        return None


def handle_number(x) -> int | None:
    return object.__getattribute__(x, "number") if isinstance(x, Handle) else None


def callback(op: str, handle: Handle, name: str | None, args=(), kwargs=None):
    """Ask the grader to use one of its objects; its answer's side effects are copied onto our arguments."""
    args, kwargs = list(args), dict(kwargs or {})
    CHANNEL.send({"op": op, "handle": handle_number(handle), "name": name, "args": args, "kwargs": kwargs,
                  "rng": torch.get_rng_state()})
    reply = CHANNEL.next_reply()
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise SystemExit("the grader went away")
    if not reply["ok"]:
        raise as_exception(reply.get("error"), reply.get("message"))
    apply_effects(reply, args, kwargs)
    CHANNEL.leaves += [t for t in walk(reply.get("value"), torch.Tensor) if t.requires_grad]
    return reply.get("value")


class Handle:
    """An object the grader keeps: attributes and calls are answered by the grader (see proxy.Client.callback)."""

    def __init__(self, number: int):
        object.__setattr__(self, "number", number)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return callback("getattr", self, name)

    def __call__(self, *args, **kwargs):
        return callback("call", self, None, args, kwargs)

    def __iter__(self):
        return callback("call", self, "__iter__")

    def __next__(self):
        return callback("call", self, "__next__")

    def __len__(self):
        return callback("call", self, "__len__")

    def __getitem__(self, key):
        return callback("call", self, "__getitem__", [key])

    def __contains__(self, item):
        return callback("call", self, "__contains__", [item])


def resolve(target: str):
    module, _, name = target.partition(":")
    if not module.startswith("minildm.") and module != "minildm":
        raise ValueError(f"the worker only calls into minildm, not {module}")
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def answer(request: dict) -> dict:
    if request["op"] == "import":
        for module in request.get("modules", []):
            resolve(f"{module}:__name__")
        return {"ok": True, "value": None}
    if request["op"] == "backward":                 # the original call's message, replayed with the same state
        original = decode(request["replay"].numpy().tobytes(), rebuild=True, handles=Handle, kept=CHANNEL.kept)
        request = {**original, "op": "backward", "grad_outputs": request["grad_outputs"]}
    function = resolve(request["target"])
    args, kwargs = request.get("args", []), request.get("kwargs", {})
    tensors = walk([args, kwargs], torch.Tensor)
    before = versions(args, kwargs)
    if request.get("rng") is not None:
        torch.set_rng_state(request["rng"])
    forbid = request.get("forbid") or {}
    outer, CHANNEL.leaves = CHANNEL.leaves, []          # a call the grader makes while serving our callback
    try:
        return run(request, function, args, kwargs, tensors, before, forbid)
    finally:
        CHANNEL.leaves = outer


def run(request: dict, function, args, kwargs, tensors, before, forbid: dict) -> dict:
    """The call (or its replay for the gradients), with the test's forbidden functions and its warnings caught."""
    task = forbid.get("task") or request.get("task", "this task")
    with Forbidden(forbid.get("targets", []), task), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if request["op"] == "call":
            with torch.no_grad() if not any(t.requires_grad for t in tensors) else torch.enable_grad():
                value = function(*args, **kwargs)
            value = value.detach() if isinstance(value, torch.Tensor) else value
        elif request["op"] == "backward":
            with torch.enable_grad():
                out = walk(function(*args, **kwargs), torch.Tensor)
            inputs = [t for t in tensors if t.requires_grad and t.is_floating_point()] + CHANNEL.leaves
            pairs = [(o, g) for o, g in zip(out, request["grad_outputs"]) if g is not None and o.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                        allow_unused=True) if pairs and inputs else [None] * len(inputs)
            value = [None if g is None else g.detach() for g in grads]
        else:
            raise ValueError(f"unknown op {request['op']!r}")
    said = [[w.category.__name__[:100], str(w.message)[:MAX_TEXT]] for w in caught[:20]]
    return {"ok": True, "value": value, "warnings": said, **effects(args, kwargs, before)}


def serve(request: dict) -> dict:
    try:
        return answer(request)
    except BaseException as err:                    # noqa: BLE001 - SystemExit and KeyboardInterrupt are answers too
        return error_reply(err)


CHANNEL: Channel


def main() -> None:
    global CHANNEL
    CHANNEL = Channel()
    while (request := CHANNEL.next_reply()) is not None:
        CHANNEL.send({"ok": False, "error": "ValueError", "message": f"not a request: {str(request)[:100]}"})


if __name__ == "__main__":
    main()
