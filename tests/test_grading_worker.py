"""The student-code worker (grading/worker.py, issue 18 step 2), driven directly over its pipe as the grader will:
calls, generators, in-place changes, forbidden functions, gradients, and student code that misbehaves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minildm.attention import naive_attention
from minildm.autoencoder import DiagonalGaussian
from minildm.grading.codec import decode, encode, read_frame, write_frame
from minildm.grading.scratch import copy_worker

ROOT = Path(__file__).resolve().parent.parent
STUDENT = '''
import os, sys

def noisy(x):
    print("\\x00" * 64 + "not an answer")
    sys.stdout.flush()
    return x + 1

def shout():
    raise ValueError("secret " * 1000)

def leave():
    raise SystemExit(3)

def scale_in_place(x):
    x.mul_(2)
'''


class Worker:
    """The worker as the grader starts it: its copy and the codec's side by side, `minildm` from package_root."""

    def __init__(self, package_root: Path, folder: Path):
        script = copy_worker(folder)
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=folder, env=env)

    def ask(self, **request) -> dict:
        write_frame(self.proc.stdin, encode({"op": "call", **request}))
        return decode(read_frame(self.proc.stdout))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference_worker(tmp_path_factory):
    worker = Worker(ROOT, tmp_path_factory.mktemp("worker"))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def student_worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    (root / "minildm").mkdir()
    (root / "minildm" / "__init__.py").write_text("")
    (root / "minildm" / "tricks.py").write_text(STUDENT)
    worker = Worker(root, root)
    yield worker
    worker.close()


def test_a_method_call_with_a_rebuilt_self_gives_the_same_answer(reference_worker):
    posterior = DiagonalGaussian(torch.randn(2, 8, 3, 3))
    reply = reference_worker.ask(target="minildm.autoencoder:DiagonalGaussian.kl", args=[posterior])
    assert reply["ok"] and torch.equal(reply["value"], posterior.kl())


def test_the_generator_comes_back_advanced_as_it_would_be_in_process(reference_worker):
    posterior = DiagonalGaussian(torch.randn(1, 4, 2, 2))
    here, there = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    reply = reference_worker.ask(target="minildm.autoencoder:DiagonalGaussian.sample", args=[posterior, there])
    assert torch.equal(reply["value"], posterior.sample(here))
    [state] = reply["generators"]
    assert torch.equal(state, here.get_state()) and not torch.equal(state, there.get_state())


def test_a_forbidden_function_fails_the_call_with_the_tests_message(reference_worker):
    reply = reference_worker.ask(target="minildm.autoencoder:DiagonalGaussian.kl", task="ch02.gaussian_kl",
                                 args=[DiagonalGaussian(torch.randn(1, 4, 2, 2))],
                                 forbid={"task": "ch02.gaussian_kl", "targets": ["torch:sum"]})
    assert not reply["ok"] and reply["error"] == "AssertionError"
    assert "ch02.gaussian_kl must be written by hand: it may not call torch.sum" in reply["message"]
    again = reference_worker.ask(target="minildm.autoencoder:DiagonalGaussian.kl",
                                 args=[DiagonalGaussian(torch.randn(1, 4, 2, 2))])
    assert again["ok"]                                         # the ban ends with its call


def test_gradients_come_back_for_every_input_that_requires_them(reference_worker):
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = naive_attention(q, k, v)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad_out)
    call = encode({"op": "call", "target": "minildm.attention:naive_attention", "args": [q, k, v]})
    write_frame(reference_worker.proc.stdin, encode({"op": "backward", "grad_outputs": [grad_out],
                                                     "replay": torch.frombuffer(bytearray(call), dtype=torch.uint8)}))
    reply = decode(read_frame(reference_worker.proc.stdout))
    assert reply["ok"] and all(torch.allclose(a, b) for a, b in zip(reply["value"], expected))


def test_prints_exits_and_long_messages_of_student_code_are_contained(student_worker):
    reply = student_worker.ask(target="minildm.tricks:noisy", args=[torch.ones(2)])
    assert reply["ok"] and torch.equal(reply["value"], torch.full((2,), 2.0))
    shout = student_worker.ask(target="minildm.tricks:shout")
    assert shout["error"] == "ValueError" and len(shout["message"]) < 700 and shout["message"].endswith(" ...")
    assert student_worker.ask(target="minildm.tricks:leave")["error"] == "SystemExit"
    x = torch.ones(3)
    changed = student_worker.ask(target="minildm.tricks:scale_in_place", args=[x])["changed"]
    assert [i for i, _ in changed] == [0] and torch.equal(changed[0][1], torch.full((3,), 2.0))
    refused = student_worker.ask(target="os:system", args=["true"])
    assert not refused["ok"] and "only calls into minildm" in refused["message"]
