"""Checkpoints: a save round-trips exactly, a load is all or nothing, a pickle never runs code, a failed save
leaves the previous checkpoint as it was."""

import os
import re

import pytest
import torch

from minildm import saving
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.checkpoint import load_state_dict, load_strict, load_weights_into, read_config, tensor_bytes
from minildm.saving import CONFIG_NAME, WEIGHTS_NAME, save_model


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4))


def snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_save_then_load_round_trips_config_and_every_tensor_exactly(tmp_path):
    model = tiny_vae()
    save_model(tmp_path / "vae", model, model.config)
    config = AutoencoderConfig.from_dict(read_config(tmp_path / "vae"))
    assert config == model.config
    loaded = load_weights_into(AutoencoderKL(config), tmp_path / "vae")
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), f"{key} changed in the round trip"


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_folder_missing_a_file_raises_file_not_found_naming_the_path(tmp_path, missing):
    model = tiny_vae()
    folder = save_model(tmp_path / "vae", model, model.config)
    (folder / missing).unlink()
    load = read_config if missing == CONFIG_NAME else (lambda f: load_weights_into(tiny_vae(), f))
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / missing))):
        load(folder)


def test_missing_folder_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        read_config(tmp_path / "nowhere")


def test_load_strict_names_missing_unexpected_and_wrongly_shaped_keys():
    model = tiny_vae()
    state = dict(model.state_dict())
    del state["encoder.conv_in.bias"]
    state["encoder.surprise.weight"] = torch.zeros(1)
    state["decoder.conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    with pytest.raises(ValueError) as err:
        load_strict(tiny_vae(), state, "my-file.safetensors")
    message = str(err.value)
    for words in ("my-file.safetensors", "encoder.conv_in.bias", "encoder.surprise.weight", "decoder.conv_out.weight",
                  "(3, 8, 1, 1)"):
        assert words in message, f"{words!r} not in: {message}"


def test_load_strict_leaves_the_model_untouched_when_it_refuses():
    model, other = tiny_vae(0), tiny_vae(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(other.state_dict())
    del state["encoder.conv_in.bias"]
    with pytest.raises(ValueError):
        load_strict(model, state, "partial")
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), f"{key} was overwritten by a refused load"


class WritesMarker:
    """A pickle payload: unpickling calls open(marker, "w"), which creates the marker file (harmless, but visible)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_pickle_holding_code_is_refused_and_the_code_never_runs(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    torch.save({"weight": torch.zeros(2), "payload": WritesMarker(marker)}, path)

    # the payload is live: an unsafe load would run it
    torch.load(path, weights_only=False)
    assert marker.exists(), "the test payload did not run under an unsafe load; the test proves nothing"
    marker.unlink()

    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_state_dict(path)
    assert not marker.exists(), "load_state_dict ran code from a pickle file"


def test_plain_tensor_dict_pickle_loads(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    torch.save(tensors, tmp_path / "plain.pt")
    torch.save({"state_dict": tensors, "global_step": 3}, tmp_path / "lightning.ckpt")  # CompVis/Lightning nesting
    for name in ("plain.pt", "lightning.ckpt"):
        loaded = load_state_dict(tmp_path / name)
        assert sorted(loaded) == ["a", "b"], f"{name}: keys {sorted(loaded)}"
        for key in tensors:
            assert torch.equal(loaded[key], tensors[key]), f"{name}: {key} differs"


def fail_in_save_file(tensors, path, *args, **kwargs):
    with open(path, "wb") as f:                      # a half-written file, then the "crash"
        f.write(b"\x00" * 16)
    raise OSError("disk full (simulated)")


def fail_on_os_replace_call(n: int):
    """os.replace that works n - 1 times and then fails: n = 1 fails moving the old folder aside,
    n = 2 fails the swap in."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        calls.append((src, dst))
        if len(calls) == n:
            raise OSError("interrupted (simulated)")
        return real(src, dst, *args, **kwargs)

    return replace


@pytest.mark.parametrize("failure", ["save_file", "os.replace 1", "os.replace 2"])
def test_interrupted_save_leaves_previous_checkpoint_byte_identical_and_no_temp_folders(tmp_path, monkeypatch, failure):
    folder = save_model(tmp_path / "vae", tiny_vae(0), tiny_vae(0).config)
    before = snapshot(folder)
    if failure == "save_file":
        monkeypatch.setattr(saving, "save_file", fail_in_save_file)
    else:
        monkeypatch.setattr(saving.os, "replace", fail_on_os_replace_call(int(failure.split()[1])))
    with pytest.raises(OSError, match="simulated"):
        save_model(folder, tiny_vae(1), tiny_vae(1).config)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["vae"], f"left behind: {sorted(os.listdir(tmp_path))}"
    assert snapshot(folder) == before, "the previous checkpoint changed"


@pytest.mark.parametrize("keep", [0.5, 6])
def test_truncated_safetensors_raises_value_error_naming_the_file(tmp_path, keep):
    model = tiny_vae()
    folder = save_model(tmp_path / "vae", model, model.config)
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_state_dict(path)


# --------------------------------------------------------------------- progress over a big file's bytes

def mixed_tensors() -> dict[str, torch.Tensor]:
    """Tensors of every kind a checkpoint holds: float32 and float16 weights, a bfloat16 one, int and bool buffers."""
    generator = torch.Generator().manual_seed(0)
    return {"w32": torch.randn(64, 33, generator=generator), "w16": torch.randn(17, 5, generator=generator).half(),
            "wbf16": torch.randn(9, generator=generator).bfloat16(), "steps": torch.arange(7),
            "mask": torch.ones(3, 3, dtype=torch.bool).tril(), "scalar": torch.tensor(0.18215)}


def assert_identical(ours: dict, expected: dict) -> None:
    assert sorted(ours) == sorted(expected), f"keys {sorted(ours)}"
    for key, tensor in expected.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), f"{key} differs"


def test_a_safetensors_load_with_progress_shows_a_bar_over_its_bytes_and_gives_identical_tensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    quiet = load_state_dict(tmp_path / "model.safetensors")
    assert capsys.readouterr().err == "", "a load shows nothing unless progress is asked for"
    shown = load_state_dict(tmp_path / "model.safetensors", "U-Net weights", progress=True)
    bar = capsys.readouterr().err
    nbytes = sum(t.nbytes for t in tensors.values())
    assert tensor_bytes(tmp_path / "model.safetensors") == nbytes == 8_705            # the bar's total, from the header
    total = tqdm.format_sizeof(nbytes)                                                 # "8.71k"
    assert "U-Net weights" in bar and "100%" in bar and f"{total}/{total}" in bar and "B/s" in bar, bar
    assert_identical(shown, tensors)
    assert_identical(quiet, tensors)
    assert_identical(shown, load_file(tmp_path / "model.safetensors"))          # safetensors' own reader


def test_a_ckpt_load_with_progress_says_in_one_line_that_it_has_none_and_gives_identical_tensors(tmp_path, capsys):
    tensors = mixed_tensors()
    torch.save({"state_dict": tensors}, tmp_path / "model.ckpt")
    shown = load_state_dict(tmp_path / "model.ckpt", "Stable Diffusion checkpoint", progress=True)
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "model.ckpt" in said and "no progress" in said, said
    assert_identical(shown, tensors)
    assert_identical(load_state_dict(tmp_path / "model.ckpt"), tensors)
    assert capsys.readouterr().err == ""
