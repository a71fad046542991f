"""The student-code worker of issue 18, step 2: it answers calls of graded functions, and nothing else.

The grader copies this file and codec.py into the worker's folder (as minildm_grade_worker.py and
minildm_grade_codec.py: in the worker, `minildm` is the student's package, so neither may import from it) and
starts it inside the isolation of isolation.py. It reads requests on stdin and writes answers on stdout, each one
framed as 8 bytes of length and a codec message:

    {"op": "call", "target": "minildm.autoencoder:DiagonalGaussian.kl", "args": [...], "kwargs": {...},
     "rng": the global RNG state, "forbid": ["torch.distributions:kl_divergence", ...], "task": "ch02.gaussian_kl"}
    {"op": "backward", "replay": the call's message as uint8, "grad_outputs": [...]}: the call again, with the
     same random state, and the gradients of its output tensors (given these output gradients) with respect to
     every floating tensor of its arguments that requires grad

and answers {"ok": true, "value": ..., "rng": ..., "generators": [states], "changed": [[i, tensor]]} (the
generators of the arguments, in order, and the argument tensors the call changed in place) or {"ok": false,
"error": "TypeError", "message": "... (cut short)"}. What the student's code prints goes to stderr, so it cannot
corrupt an answer; an answer it forges is only ever taken as its own function's result.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from minildm_grade_codec import (  # the grader's copy, beside this file
    CodecError,
    decode,
    encode,
    read_frame,
    walk,
    write_frame,
)

MAX_MESSAGE = 600


def resolve(target: str):
    module, _, name = target.partition(":")
    if not module.startswith("minildm.") and module != "minildm":
        raise ValueError(f"the worker only calls into minildm, not {module}")
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


class Forbidden:
    """While active, each target ("module:attr.path") raises, and so does any name bound to it in minildm's
    modules (as after `from torch.distributions import kl_divergence`), as the tests' forbid() does in-process."""

    def __init__(self, targets: list[str], task: str):
        self.targets, self.task, self.undo = targets, task, []

    def __enter__(self):
        for target in self.targets:
            module_name, _, attribute = target.partition(":")
            if module_name.split(".")[0] not in sys.modules:
                self.patch(sys.modules, module_name.split(".")[0], None, item=True)
                continue
            owner = importlib.import_module(module_name)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name)

            def refuse(*args, _target=f"{module_name}.{attribute}", **kwargs):
                raise AssertionError(f"{self.task} must be written by hand: it may not call {_target}")

            self.patch(owner, name, refuse)
            for module in [m for n, m in list(sys.modules.items()) if m is not None and n.split(".")[0] == "minildm"]:
                for bound, value in list(vars(module).items()):
                    if value is original:
                        self.patch(module, bound, refuse)
        return self

    def patch(self, owner, name, value, item=False):
        if item:
            self.undo.append((owner, name, owner.get(name, KeyError), True))
            owner[name] = value
        else:
            self.undo.append((owner, name, getattr(owner, name), False))
            setattr(owner, name, value)

    def __exit__(self, *exc):
        for owner, name, old, item in reversed(self.undo):
            if item:
                owner.pop(name, None) if old is KeyError else owner.__setitem__(name, old)
            else:
                setattr(owner, name, old)


def answer(request: dict) -> dict:
    if request["op"] == "backward":                 # the original call's message, replayed with the same state
        original = decode(request["replay"].numpy().tobytes(), rebuild=True)
        request = {**original, "op": "backward", "grad_outputs": request["grad_outputs"]}
    function = resolve(request["target"])
    args, kwargs = request.get("args", []), request.get("kwargs", {})
    tensors = walk([args, kwargs], torch.Tensor)
    versions = [t._version for t in tensors]
    if request.get("rng") is not None:
        torch.set_rng_state(request["rng"])
    with Forbidden(request.get("forbid", []), request.get("task", "this task")):
        if request["op"] == "call":
            with torch.no_grad() if not any(t.requires_grad for t in tensors) else torch.enable_grad():
                value = function(*args, **kwargs)
            value = value.detach() if isinstance(value, torch.Tensor) else value
        elif request["op"] == "backward":
            inputs = [t for t in tensors if t.requires_grad and t.is_floating_point()]
            with torch.enable_grad():
                out = walk(function(*args, **kwargs), torch.Tensor)
            pairs = [(o, g) for o, g in zip(out, request["grad_outputs"]) if g is not None and o.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                        allow_unused=True) if pairs and inputs else [None] * len(inputs)
            value = [None if g is None else g.detach() for g in grads]
        else:
            raise ValueError(f"unknown op {request['op']!r}")
    changed = [[i, t.detach()] for i, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]
    return {"ok": True, "value": value, "rng": torch.get_rng_state(),
            "generators": [g.get_state() for g in walk([args, kwargs], torch.Generator)], "changed": changed}


def main() -> None:
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                   # the student's prints go to stderr, not into an answer
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    while (frame := read_frame(requests)) is not None:
        try:
            reply = answer(decode(frame, rebuild=True))
        except BaseException as err:                # noqa: BLE001 - SystemExit and KeyboardInterrupt are answers too
            message = str(err)
            reply = {"ok": False, "error": type(err).__name__[:100],
                     "message": message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " ..."}
        try:
            data = encode(reply)
        except CodecError as err:
            data = encode({"ok": False, "error": "CodecError", "message": str(err)[:MAX_MESSAGE]})
        write_frame(answers, data)


if __name__ == "__main__":
    main()
