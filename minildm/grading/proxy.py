"""The grader's side of the step-2 worker (issue 18): a graded function replaced by a proxy that asks the worker.

Not wired into `minildm grade` yet. The plan: the task tests run in a trusted pytest process on the reference
package; each graded region's function (regions.enclosing_function) is swapped for `proxied(...)`, which sends the
call to the worker (worker.py, started inside isolation.py's walls) and turns its answer back into what the
function would have returned. What crosses is codec's JSON + safetensors; the answer is decoded strictly (plain
values, tensors, and the result classes the grader allows), so nothing the worker sends can run code here.

- An error in the student's code comes back as a builtin exception of the same name (ValueError stays ValueError,
  so `pytest.raises` and "not started" work), anything else as a RuntimeError naming it; the message is cut short.
- The global RNG, the arguments' generators and the argument tensors the call changed in place are copied back,
  so a test sees the same side effects as in-process.
- When a float input requires grad, the outputs are tied to the inputs by an autograd Function whose backward asks
  the worker to redo the call with the same random state and return the input gradients.
- A call that runs past the timeout kills the worker (the next call starts a fresh one) and fails with
  CallTimedOut; later calls of the same task fail at once with TaskStopped: one hang costs one timeout per task.
"""

from __future__ import annotations

import builtins
import os
import select
import struct
import subprocess
import time
from typing import Callable

import torch

from minildm.grading.codec import MAX_MESSAGE, CodecError, decode, encode, walk, write_frame

MAX_TEXT = 600


class CallTimedOut(Exception):
    """The student's function ran past the timeout."""


class TaskStopped(Exception):
    """An earlier call of this task timed out, so this one is not made."""


class WorkerGone(Exception):
    """The worker died during the call (os._exit, a signal, a limit)."""


def as_exception(name, message) -> Exception:
    """The student's exception, as a builtin of the same name when there is one (never anything else)."""
    message = str(message)[:MAX_TEXT]
    found = getattr(builtins, str(name), None)
    if isinstance(found, type) and issubclass(found, Exception) and not issubclass(found, (OSError, Warning)):
        try:
            return found(message)
        except Exception:                                     # noqa: BLE001 - a builtin with other arguments
            pass
    return RuntimeError(f"{str(name)[:100]}: {message}")


class Client:
    """One worker process at a time, started by `start` when needed, asked one call at a time."""

    def __init__(self, start: Callable[[], subprocess.Popen], timeout: float, allowed: dict[str, type]):
        self.start, self.timeout, self.allowed = start, timeout, allowed
        self.proc: subprocess.Popen | None = None
        self.stopped: set[str] = set()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def read(self, size: int, deadline: float) -> bytes:
        data = b""
        fd = self.proc.stdout.fileno()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise CallTimedOut
            chunk = os.read(fd, min(size - len(data), 1 << 20))
            if not chunk:
                raise WorkerGone
            data += chunk
        return data

    def ask(self, request: dict, task: str) -> dict:
        if task in self.stopped:
            raise TaskStopped(f"not run: an earlier call of {task} timed out")
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self.start()
        deadline = time.monotonic() + self.timeout
        try:
            write_frame(self.proc.stdin, encode(request))
            (size,) = struct.unpack("<Q", self.read(8, deadline))
            if size > MAX_MESSAGE:
                raise CodecError(f"an answer of {size} bytes")
            reply = decode(self.read(size, deadline), allowed=self.allowed)
        except CallTimedOut:
            self.close()
            self.stopped.add(task)
            raise CallTimedOut(f"{task}: still running after {self.timeout:g} s; stopped (an endless loop?)") from None
        except (WorkerGone, BrokenPipeError):
            code = self.proc.wait()
            self.proc = None
            raise WorkerGone(f"{task}: the worker died (exit code {code}) during this call") from None
        except CodecError:
            self.close()
            raise
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise CodecError("the worker's answer is not a reply")
        return reply


def restore(reply: dict, args, kwargs) -> None:
    """Copy the call's side effects back: the global RNG, the generators, tensors changed in place."""
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


def with_tensors(value, new: list):
    """value with its tensors (in walk order) replaced by `new`, containers rebuilt, other objects kept."""
    it = iter(new)
    done: dict[int, object] = {}

    def rebuild(x):
        if isinstance(x, torch.Tensor):
            if id(x) not in done:
                done[id(x)] = next(it)
            return done[id(x)]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*[rebuild(v) for v in x])
        if isinstance(x, (list, tuple)):
            return type(x)(rebuild(v) for v in x)
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items()}
        return x

    return rebuild(value)


def proxied(client: Client, target: str, task: str, forbid: Callable[[], list[str]] = list) -> Callable:
    """A stand-in for the function `target` ("minildm.attention:naive_attention") that runs in the worker."""

    def call(*args, **kwargs):
        request = {"op": "call", "target": target, "task": task, "args": list(args), "kwargs": kwargs,
                   "rng": torch.get_rng_state(), "forbid": forbid()}
        replay = encode(request)                   # before the call changes any state: the backward redoes it
        reply = client.ask(request, task)
        if not reply["ok"]:
            raise as_exception(reply.get("error"), reply.get("message"))
        restore(reply, args, kwargs)
        value = reply.get("value")
        inputs = [t for t in walk([args, kwargs], torch.Tensor) if t.requires_grad and t.is_floating_point()]
        outputs = [t for t in walk(value, torch.Tensor)]
        if not (torch.is_grad_enabled() and inputs and any(t.is_floating_point() for t in outputs)):
            return value
        tied = Remote.apply(client, task, replay, len(outputs), *outputs, *inputs)
        return with_tensors(value, list(tied))

    call.__name__ = target.rpartition(".")[-1].rpartition(":")[-1]
    call.__qualname__ = target.partition(":")[2]
    call.proxy_target = target
    return call


class Remote(torch.autograd.Function):
    """Outputs computed in the worker, tied to the inputs: backward asks the worker for the input gradients."""

    @staticmethod
    def forward(ctx, client, task, replay, n_out, *tensors):
        ctx.client, ctx.task, ctx.replay, ctx.n_out = client, task, replay, n_out
        ctx.inputs = tensors[n_out:]
        outputs = tuple(t.clone() for t in tensors[:n_out])
        ctx.mark_non_differentiable(*[t for t in outputs if not t.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        request = {"op": "backward", "replay": torch.frombuffer(bytearray(ctx.replay), dtype=torch.uint8),
                   "grad_outputs": list(grad_outputs)}
        reply = ctx.client.ask(request, ctx.task)
        if not reply["ok"]:
            raise as_exception(reply.get("error"), reply.get("message"))
        grads = reply.get("value")
        if not isinstance(grads, list) or len(grads) != len(ctx.inputs):
            raise CodecError("the worker's gradients do not match the inputs")
        for g, t in zip(grads, ctx.inputs):
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != t.shape):
                raise CodecError("a gradient from the worker has the wrong shape")
        return (None, None, None, None, *([None] * ctx.n_out), *[g if g is None else g.to(t.dtype)
                                                                  for g, t in zip(grads, ctx.inputs)])
