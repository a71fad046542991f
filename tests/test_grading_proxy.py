"""The grader's proxy for a graded function (grading/proxy.py, issue 18 step 2): a call answered by the worker must
look to a test exactly like the call in-process: values, side effects, gradients, errors; and a hang or a crash
of the worker costs that call only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minildm import attention
from minildm.attention import OnlineSoftmax, naive_attention, online_softmax_step
from minildm.autoencoder import DiagonalGaussian, ResBlock
from minildm.grading.codec import path_of
from minildm.grading.grader import copy_worker
from minildm.grading.proxy import CallTimedOut, Client, TaskStopped, WorkerGone, proxied

ROOT = Path(__file__).resolve().parent.parent
STUDENT = '''
import os, time

def stub(x):
    raise NotImplementedError("ch09.thing: write it")

def slow(x):
    while True:
        time.sleep(0.01)

def die(x):
    os._exit(7)

def double(x):
    return 2 * x
'''


def client_for(package_root: Path, folder: Path, timeout: float = 60.0) -> Client:
    script = copy_worker(folder)
    env = {**os.environ, "PYTHONPATH": str(package_root)}

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=folder, env=env)
    return Client(start, timeout, {path_of(OnlineSoftmax): OnlineSoftmax})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    client = client_for(ROOT, tmp_path_factory.mktemp("worker"))
    yield client
    client.close()


def test_a_proxied_function_gives_the_values_and_gradients_of_the_real_one(reference):
    remote = proxied(reference, "minildm.attention:naive_attention", "ch04.naive_attention")
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = remote(q, k, v)
    assert torch.allclose(out, naive_attention(q, k, v))
    got = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.allclose(a, b) for a, b in zip(got, torch.autograd.grad(naive_attention(q, k, v).sum(),
                                                                              (q, k, v))))
    assert torch.autograd.gradcheck(lambda *x: remote(*x), (q, k, v), eps=1e-6, atol=1e-6)


def test_a_proxied_method_keeps_side_effects_random_state_and_namedtuples(reference):
    sample = proxied(reference, "minildm.autoencoder:DiagonalGaussian.sample", "ch02.reparameterize")
    moments = torch.randn(1, 4, 2, 2, requires_grad=True)
    posterior = DiagonalGaussian(moments)
    here, there = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    z = sample(posterior, there)
    assert torch.equal(z, posterior.sample(here)) and torch.equal(here.get_state(), there.get_state())
    z.sum().backward()
    assert moments.grad is not None and moments.grad.abs().sum() > 0

    block = ResBlock(4, 4, groups=2, dropout=0.5).train()
    forward = proxied(reference, "minildm.autoencoder:ResBlock.forward", "ch02.resblock")
    x = torch.randn(1, 4, 3, 3)
    torch.manual_seed(5)
    with torch.no_grad():
        remote = forward(block, x)
        after = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        assert torch.equal(remote, block(x)) and torch.equal(after, torch.rand(3))   # dropout drew the same

    step = proxied(reference, "minildm.attention:online_softmax_step", "ch04.online_softmax")
    state = OnlineSoftmax(torch.full((1, 2, 1), -torch.inf), torch.zeros(1, 2, 1), torch.zeros(1, 2, 3))
    scores, values = torch.randn(1, 2, 4), torch.randn(1, 4, 3)
    scores_here = scores.clone()
    expected = online_softmax_step(state, scores_here, values)
    new = step(state, scores, values)
    assert isinstance(new, OnlineSoftmax) and torch.allclose(new.acc, expected.acc)
    assert torch.equal(scores, scores_here)            # what the call changed in place is changed here too
    assert attention.online_softmax_step is online_softmax_step            # nothing was patched here


def test_student_errors_hangs_and_crashes_cost_their_own_call_only(tmp_path):
    (tmp_path / "minildm").mkdir()
    (tmp_path / "minildm" / "__init__.py").write_text("")
    (tmp_path / "minildm" / "tricks.py").write_text(STUDENT)
    client = client_for(tmp_path, tmp_path, timeout=3)
    try:
        with pytest.raises(NotImplementedError, match="ch09.thing: write it"):
            proxied(client, "minildm.tricks:stub", "ch09.thing")(1)
        started = time.monotonic()
        with pytest.raises(CallTimedOut, match="still running after 3 s"):
            proxied(client, "minildm.tricks:slow", "ch09.slow")(1)
        with pytest.raises(TaskStopped):
            proxied(client, "minildm.tricks:slow", "ch09.slow")(1)
        assert time.monotonic() - started < 30
        with pytest.raises(WorkerGone, match="exit code 7"):
            proxied(client, "minildm.tricks:die", "ch09.die")(1)
        assert proxied(client, "minildm.tricks:double", "ch09.double")(torch.ones(2)).tolist() == [2.0, 2.0]
    finally:
        client.close()
