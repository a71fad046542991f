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
from minildm.grading.codec import decode, path_of
from minildm.grading.proxy import CallTimedOut, Client, TaskStopped, WorkerGone, proxied
from minildm.grading.scratch import copy_worker
from minildm.schedule import NoiseSchedule
from minildm.train_ldm import diffusion_loss
from minildm.train_vae import measure_scale_factor

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

def careful(x):
    import warnings
    warnings.warn("25 duplicate points dropped")
    return x

def peek(obj):
    return obj.secret()

def twice(f, x):
    return f(f(x))
'''


def client_for(package_root: Path, folder: Path, timeout: float = 60.0) -> Client:
    script = copy_worker(folder)
    env = {**os.environ, "PYTHONPATH": str(package_root)}

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=folder, env=env)
    return Client(start, timeout, {path_of(OnlineSoftmax): OnlineSoftmax}, warm={"op": "import", "modules": []})


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


class Recorder(torch.nn.Module):
    """A test's own model: it cannot cross to the worker, so the worker calls back into it; it counts its calls."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(2, 2, 1)
        self.calls = 0

    def forward(self, zt, t, ids):
        self.calls += 1
        return self.mix(zt) + (t.float() / 1000 + ids.float().mean(1)).view(-1, 1, 1, 1)

    def encode(self, x):
        self.calls += 1
        return DiagonalGaussian(torch.cat([x.mean(1, keepdim=True).repeat(1, 4, 1, 1)] * 2, dim=1)[:, :8])


def test_a_tests_own_object_stays_here_and_is_called_back_once_per_use(reference):
    remote = proxied(reference, "minildm.train_vae:measure_scale_factor", "ch02.scale_factor")
    pixels = torch.randint(0, 256, (300, 4, 4, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    here, there = Recorder(), Recorder()
    assert remote(there, pixels, count=300, seed=2) == measure_scale_factor(here, pixels, count=300, seed=2)
    assert there.calls == here.calls == 2                              # batches of 256 and 44, each encoded once


def test_gradients_reach_a_tests_own_model_through_its_callbacks(reference):
    remote = proxied(reference, "minildm.train_ldm:diffusion_loss", "ch06.training_loss")
    schedule = NoiseSchedule(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t, ids = torch.tensor([999, 0, 400]), torch.randint(0, 9, (3, 5), generator=g)
    here, there = Recorder(), Recorder()
    there.load_state_dict(here.state_dict())
    loss = remote(there, schedule, z0, t, noise, ids)
    expected = diffusion_loss(here, schedule, z0, t, noise, ids)
    assert loss.requires_grad and torch.allclose(loss, expected)
    loss.backward()
    expected.backward()
    for (name, a), b in zip(there.named_parameters(), here.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert there.calls == 1                         # the backward's replay got the recorded answer, not a new call


def test_the_worker_reaches_only_public_attributes_and_no_module_or_class_of_the_grader():
    client = Client(None, 1.0, {})

    class Secretive:
        hidden = "no"

        def __init__(self):
            self.module, self.kind, self._key = os, Secretive, "7f3a"

    number = client.handle(Secretive())
    asked = [("getattr", "_key"), ("getattr", "__dict__"), ("getattr", "module"), ("getattr", "kind"),
             ("call", "__reduce__"), ("call", "__init__")]
    for op, name in asked:
        reply = decode(client.callback({"op": op, "handle": number, "name": name, "args": [], "kwargs": {}}))
        assert reply["ok"] is False and "7f3a" not in str(reply), (op, name, reply)
    public = decode(client.callback({"op": "getattr", "handle": number, "name": "hidden"}))
    assert public == {"ok": True, "value": "no"}
    unknown = decode(client.callback({"op": "call", "handle": number + 5, "name": None}))
    assert unknown["ok"] is False and "never given" in unknown["message"]
    client.forget()                                                      # the end of a test
    gone = decode(client.callback({"op": "getattr", "handle": number, "name": "hidden"}))
    assert gone["ok"] is False and client.handle(object()) != number


def test_warnings_nested_calls_and_the_tests_forbidden_functions_cross_to_the_worker(tmp_path, reference):
    (tmp_path / "minildm").mkdir()
    (tmp_path / "minildm" / "__init__.py").write_text("")
    (tmp_path / "minildm" / "tricks.py").write_text(STUDENT)
    client = client_for(tmp_path, tmp_path)
    try:
        with pytest.warns(UserWarning, match="25 duplicate points dropped"):
            proxied(client, "minildm.tricks:careful", "ch01.twonn")(1)
        double = proxied(client, "minildm.tricks:double", "ch09.double")      # the worker calls back here, and
        twice = proxied(client, "minildm.tricks:twice", "ch09.twice")         # this calls the worker again
        assert twice(double, torch.ones(2)).tolist() == [4.0, 4.0]
    finally:
        client.close()
    banned = {"task": "ch02.gaussian_kl", "targets": ["torch:sum"]}
    kl = proxied(reference, "minildm.autoencoder:DiagonalGaussian.kl", "ch02.gaussian_kl", forbid=lambda: banned)
    with pytest.raises(AssertionError, match="ch02.gaussian_kl must be written by hand: it may not call torch.sum"):
        kl(DiagonalGaussian(torch.randn(1, 8, 2, 2)))
    assert torch.sum(torch.ones(2)) == 2                                 # forbidden there, not here


def test_forbid_in_a_graded_run_only_records_its_targets_for_the_proxies(monkeypatch):
    from minildm.grading import forbid

    monkeypatch.setattr(forbid, "REMOTE", True)
    with pytest.MonkeyPatch.context() as test:
        forbid.forbid(test, "ch02.gaussian_kl", "torch:sum")
        assert forbid.ACTIVE == {"task": "ch02.gaussian_kl", "targets": ["torch:sum"]}
        assert torch.sum(torch.ones(2)) == 2
    assert forbid.ACTIVE == {"task": "", "targets": []}
    with pytest.MonkeyPatch.context() as test:
        monkeypatch.setattr(forbid, "REMOTE", False)
        forbid.forbid(test, "ch02.gaussian_kl", "torch:sum")
        with pytest.raises(AssertionError, match="may not call torch.sum"):
            torch.sum(torch.ones(2))
    assert torch.sum(torch.ones(2)) == 2


def test_the_grader_proxies_one_function_per_graded_region():
    from minildm.grading.tasks import TASKS
    from minildm.grading.trusted import graded_functions

    found = graded_functions(set(TASKS))
    assert sorted(set(found.values())) == sorted(TASKS) and len(found) == len(TASKS)
    assert found["minildm.metrics:psnr"] == "ch02.psnr"
    assert found["minildm.clip_tokenizer:CLIPTokenizer.bpe"] == "ch09.bpe_merge"
    assert graded_functions({"ch02.psnr"}) == {"minildm.metrics:psnr": "ch02.psnr"}
