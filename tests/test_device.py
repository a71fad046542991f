"""Device choice and reproducible noise: a seed means the same noise on every device."""

from __future__ import annotations

import pytest
import torch

from minildm.device import DEVICE_ENV, cpu_generator, default_dtype, get_device, randn


def test_explicit_cpu_and_the_environment_override_win_over_auto(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert get_device() == torch.device("cpu")


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("minildm.device.mps_available", lambda: False)
    assert get_device() == torch.device("cpu")
    monkeypatch.setattr("minildm.device.mps_available", lambda: True)
    assert get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")


def test_an_unknown_device_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_device("tpu")


def test_asking_for_a_missing_accelerator_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        get_device("cuda")
    monkeypatch.setattr("minildm.device.mps_available", lambda: False)
    with pytest.raises(ValueError, match="MPS is not available"):
        get_device("mps")


def test_half_precision_on_accelerators_and_float32_on_the_cpu():
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("mps")) == torch.float16


def test_noise_is_drawn_on_the_cpu_so_a_seed_gives_the_same_values_whatever_the_target_dtype():
    a = randn((2, 4, 8, 8), cpu_generator(7))
    b = randn((2, 4, 8, 8), cpu_generator(7), dtype=torch.float64)
    c = randn((2, 4, 8, 8), cpu_generator(8))
    assert torch.equal(a, b.float()), "the same seed must give the same noise"
    assert not torch.equal(a, c)
    assert cpu_generator(None) is None
    if torch.cuda.is_available():  # on a GPU the values are the CPU ones, moved
        assert torch.equal(randn((3,), cpu_generator(1), device="cuda").cpu(), randn((3,), cpu_generator(1)))
