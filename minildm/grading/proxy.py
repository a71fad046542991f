"""The grader's side of the worker (issue 18): a graded function replaced by a proxy that asks the worker.

The task tests run in a trusted pytest process on the reference package; each graded region's function
(regions.enclosing_function) is swapped for `proxied(...)` (trusted.py), which sends the call to the worker
(worker.py, started inside isolation.py's walls) and turns its answer back into what the function would have
returned. What crosses is codec's JSON + safetensors; the answer is decoded strictly (plain values, tensors, and the
result classes the grader allows), so nothing the worker sends can run code here.

- An error in the student's code comes back as a builtin exception of the same name (ValueError stays ValueError,
  so `pytest.raises` and "not started" work), anything else as a RuntimeError naming it; the message is cut short.
  Its warnings are given again here, as builtin categories (UserWarning for any other).
- The global RNG, the arguments' generators and the argument tensors the call changed in place are copied back,
  so a test sees the same side effects as in-process.
- An argument that cannot cross by value (a test's FakeVAE or TinyDenoiser, a function) stays here as a handle:
  the worker calls back to read its public attributes or call it (Client.callback), and gets tensors, numbers and
  further handles back; never a module, a class, or a name that starts with "_".
- When a float input requires grad, or a callback answered with a tensor that does (the TinyDenoiser's output),
  the outputs are tied to those by an autograd Function whose backward asks the worker to redo the call with the
  same random state and return their gradients; the redone call's callbacks get the recorded answers, so the
  test's objects see each call once.
- A call that runs past the timeout kills the worker (the next call starts a fresh one) and fails with
  CallTimedOut; a worker that dies fails the call with WorkerGone; later calls of the same task fail at once with
  TaskStopped: one hang or crash costs one timeout per task.
"""

from __future__ import annotations

import builtins
import os
import select
import struct
import subprocess
import time
import types
import warnings
from typing import Callable

import torch

from minildm.grading import codec

DUNDERS = {"__iter__", "__next__", "__len__", "__getitem__", "__contains__"}    # what a Handle may call by name


class CallTimedOut(BaseException):              # not an Exception: a test's `except Exception` must not hide it
    """The student's function ran past the timeout."""


class TaskStopped(BaseException):
    """An earlier call of this task timed out, so this one is not made."""


class BadAnswer(BaseException):                 # not a ValueError: `pytest.raises(ValueError)` must not pass on it
    """The worker's answer is not one the grader can read (a class it may not build, a malformed message)."""


class WorkerGone(BaseException):
    """The worker died during the call (os._exit, a signal, a limit)."""


class Client:
    """One worker process at a time, started by `start` when needed, asked one call at a time (and answering the
    worker's callbacks meanwhile). `warm` is a first request sent at start, outside any call's timeout (imports)."""

    def __init__(self, start: Callable[[], subprocess.Popen], timeout: float, allowed: dict[str, type],
                 warm: dict | None = None, startup: float = 120.0):
        self.start, self.timeout, self.allowed, self.warm, self.startup = start, timeout, allowed, warm, startup
        self.proc: subprocess.Popen | None = None
        self.stopped: dict[str, str] = {}             # task -> why its calls are no longer made
        self.objects: dict[int, object] = {}          # handle -> the object it stands for (kept alive here)
        self.numbers: dict[int, int] = {}             # id(object) -> handle
        self.handle_count = 0                         # handles are never reused, even after forget()
        self.recording: list | None = None            # the current call's callback answers, as sent
        self.replaying: list | None = None            # answers to send again, in order (a backward's replay)
        self.tied: list[torch.Tensor] = []            # callback answers' tensors that require grad
        self.kept: dict[int, tuple] = {}              # id -> (list or dict, its mark, number): the worker has it
        self.kept_count = 0

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

    def handle(self, x) -> int | None:
        """The handle of an object that stays here; modules and classes get none (they would open the grader)."""
        if isinstance(x, (types.ModuleType, type)):
            return None
        if id(x) not in self.numbers:
            self.numbers[id(x)] = number = self.handle_count
            self.objects[number] = x
            self.handle_count += 1
        return self.numbers[id(x)]

    def forget(self) -> None:
        """Drop the handles (at the end of each test: the worker cannot reach an earlier test's objects)."""
        self.objects, self.numbers = {}, {}

    def keep(self, x) -> tuple[int, bool]:
        """(number, fresh) of a long list or dict the worker keeps (codec.encode). Its mark, the length and a
        dict's last key, tells a changed one, which is sent again (a change that keeps both is not seen: the grader's
        own long lists and dicts, a tokenizer's vocabulary, do not change between calls)."""
        mark = (len(x), next(reversed(x)) if isinstance(x, dict) else None)
        entry = self.kept.get(id(x))
        if entry is not None and entry[0] is x and entry[1] == mark:
            return entry[2], False
        self.kept_count += 1
        self.kept[id(x)] = (x, mark, self.kept_count)
        return self.kept_count, True

    def encode(self, value) -> bytes:
        before = dict(self.kept)
        try:
            return codec.encode(value, handle=self.handle, keep=self.keep)
        except BaseException:
            self.kept = before                        # the worker never saw what this message would have kept
            raise

    def lookup(self, number: int):
        if number not in self.objects:
            raise codec.CodecError(f"the worker named handle {number}, which it was never given")
        return self.objects[number]

    def callback(self, request: dict) -> bytes:
        """Answer the worker's use of a handle: a public attribute, or a call of the object or its DUNDERS."""
        if self.replaying is not None:
            if self.replaying:
                return self.replaying.pop(0)
            extra = RuntimeError("the replayed call made more callbacks than the first time")
            return codec.encode(codec.error_reply(extra))
        try:
            obj, name = self.lookup(request.get("handle")), request.get("name")
            args, kwargs = request.get("args", []), request.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict) or name is not None and not isinstance(
                    name, str):
                raise codec.CodecError("a malformed callback")
            if request["op"] == "getattr" and name is not None and not name.startswith("_"):
                value = getattr(obj, name)
                reply = {"ok": True, "value": value}
            elif request["op"] == "call" and (name is None or name in DUNDERS):
                rng = request.get("rng")
                if isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state(
                        ).shape:
                    torch.set_rng_state(rng)
                before = codec.versions(args, kwargs)
                value = (obj if name is None else getattr(obj, name))(*args, **kwargs)
                reply = {"ok": True, "value": value, **codec.effects(args, kwargs, before)}
            else:
                raise AttributeError(f"the worker may not use {str(name)[:100]} of a {type(obj).__name__}")
            data = self.encode(reply)
            self.tied += [t for t in codec.walk(value, torch.Tensor) if t.requires_grad and t.is_floating_point()]
        except (Exception, TaskStopped, BadAnswer) as err:   # noqa: BLE001 - the worker hears why it failed
            data = codec.encode(codec.error_reply(err))      # (a hang or crash of a nested call ends this one too)
        if self.recording is not None:
            self.recording.append(data)
        return data

    def ready(self, task: str) -> None:
        """A worker to ask for this task: refused if the task was stopped; started (and warmed) if there is none."""
        if task in self.stopped:
            raise TaskStopped(f"not run: an earlier call of {task} {self.stopped[task]}")
        if self.proc is None or self.proc.poll() is not None:
            self.proc, self.kept = self.start(), {}
            if self.warm is not None:
                self.exchange(self.warm, task, time.monotonic() + self.startup)

    def ask(self, request: dict | bytes, task: str) -> dict:
        """The reply to one request (a dict, or one encoded by self.encode after self.ready)."""
        self.ready(task)
        return self.exchange(request, task, time.monotonic() + self.timeout)

    def exchange(self, request: dict | bytes, task: str, deadline: float) -> dict:
        """Send one request and serve callbacks until its reply comes."""
        try:
            codec.write_frame(self.proc.stdin, request if isinstance(request, bytes) else self.encode(request))
            while True:
                (size,) = struct.unpack("<Q", self.read(8, deadline))
                if size > codec.MAX_MESSAGE:
                    raise codec.CodecError(f"an answer of {size} bytes")
                reply = codec.decode(self.read(size, deadline), allowed=self.allowed, handles=self.lookup)
                if isinstance(reply, dict) and reply.get("op") in ("getattr", "call"):
                    answer = self.callback(reply)
                    if self.proc is None:                  # a nested call ended the worker
                        raise WorkerGone
                    codec.write_frame(self.proc.stdin, answer)
                    continue
                break
        except CallTimedOut:
            self.close()
            self.stopped[task] = "timed out"
            raise CallTimedOut(f"{task}: still running after {self.timeout:g} s; stopped (an endless loop?)") from None
        except (WorkerGone, BrokenPipeError):
            code = self.proc.wait() if self.proc is not None else "unknown" if self.proc is not None else "unknown"
            self.proc = None
            self.stopped[task] = "crashed the worker"
            raise WorkerGone(f"{task}: the worker died (exit code {code}) during this call") from None
        except codec.CodecError as err:
            self.close()
            raise BadAnswer(f"{task}: the worker's answer could not be read: {str(err)[:200]}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise BadAnswer(f"{task}: the worker's answer is not a reply")
        return reply


def as_warning(name) -> type[Warning]:
    """The category of a warning the student's code gave: a builtin one by name, else UserWarning."""
    found = getattr(builtins, str(name), None)
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


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


def proxied(client: Client, target: str, task: str, forbid: Callable[[], dict] = dict) -> Callable:
    """A stand-in for the function `target` ("minildm.attention:naive_attention") that runs in the worker;
    `forbid()` gives what the running test forbids ({"task": ..., "targets": [...]}, see forbid.py)."""

    def call(*args, **kwargs):
        request = {"op": "call", "target": target, "task": task, "args": list(args), "kwargs": kwargs,
                   "rng": torch.get_rng_state(), "forbid": dict(forbid())}
        client.ready(task)
        replay = client.encode(request)            # before the call changes any state: the backward redoes it
        outer = client.recording, client.tied
        client.recording, client.tied = [], []
        try:
            reply = client.ask(replay, task)
            answers, tied = client.recording, client.tied
        finally:
            client.recording, client.tied = outer
        if not reply["ok"]:
            raise codec.as_exception(reply.get("error"), reply.get("message"))
        codec.apply_effects(reply, args, kwargs)
        for name, message in reply.get("warnings") or []:
            warnings.warn(str(message)[:codec.MAX_TEXT], as_warning(name), stacklevel=2)
        value = reply.get("value")
        inputs = [t for t in codec.walk([args, kwargs], torch.Tensor) if t.requires_grad and t.is_floating_point()]
        inputs += tied
        outputs = [t for t in codec.walk(value, torch.Tensor)]
        if not (torch.is_grad_enabled() and inputs and any(t.is_floating_point() for t in outputs)):
            return value
        tied_outputs = Remote.apply(client, task, replay, answers, len(outputs), *outputs, *inputs)
        return with_tensors(value, list(tied_outputs))

    call.__name__ = target.rpartition(".")[-1].rpartition(":")[-1]
    call.__qualname__ = target.partition(":")[2]
    call.proxy_target = target
    return call


class Remote(torch.autograd.Function):
    """Outputs computed in the worker, tied to the inputs: backward asks the worker for the input gradients."""

    @staticmethod
    def forward(ctx, client, task, replay, answers, n_out, *tensors):
        ctx.client, ctx.task, ctx.replay, ctx.answers, ctx.n_out = client, task, replay, answers, n_out
        ctx.inputs = tensors[n_out:]
        outputs = tuple(t.clone() for t in tensors[:n_out])
        ctx.mark_non_differentiable(*[t for t in outputs if not t.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        request = {"op": "backward", "replay": torch.frombuffer(bytearray(ctx.replay), dtype=torch.uint8),
                   "grad_outputs": list(grad_outputs)}
        client = ctx.client
        outer = client.replaying
        client.replaying = list(ctx.answers)
        try:
            reply = client.ask(request, ctx.task)
        finally:
            client.replaying = outer
        if not reply["ok"]:
            raise codec.as_exception(reply.get("error"), reply.get("message"))
        grads = reply.get("value")
        if not isinstance(grads, list) or len(grads) != len(ctx.inputs):
            raise BadAnswer("the worker's gradients do not match the inputs")
        for g, t in zip(grads, ctx.inputs):
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != t.shape):
                raise BadAnswer("a gradient from the worker has the wrong shape")
        return (None, None, None, None, None, *([None] * ctx.n_out),
                *[g if g is None else g.to(t.dtype) for g, t in zip(grads, ctx.inputs)])
