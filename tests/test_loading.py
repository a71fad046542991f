"""Loading and saving folders (issue 13): nothing the user had is lost, and what is loaded is exactly what was saved.

Each test states one promise of saving.py and checkpoint.py (or of the loaders built on them) and breaks it on
purpose: a user's file in the way, a crash between the two renames of a save, a config missing a field, int weights,
invalid JSON, a pipeline.json pointing out of its folder, a corrupt VAE file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from minildm import checkpoint
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, save_decoder_file, swap_decoder
from minildm.checkpoint import load_strict, read_config
from minildm.pipeline import LatentDiffusion, save_pipeline
from minildm.saving import (
    CONFIG_NAME,
    MANIFEST_KEY,
    WEIGHTS_NAME,
    read_json,
    recover_interrupted_save,
    save_model,
    write_folder_atomically,
)
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder, TextEncoderConfig, Tokenizer
from minildm.unet import UNet, UNetConfig


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4))


def tiny_unet_config(**changes) -> UNetConfig:
    values = dict(block_out_channels=(32, 64), attention_levels=(False, True), heads=2, context_dim=32,
                  norm_num_groups=8, layers_per_block=1, num_timesteps=100)
    return UNetConfig(**{**values, **changes})


def tiny_pipe() -> LatentDiffusion:
    tokenizer = Tokenizer()
    torch.manual_seed(1)
    unet = UNet(tiny_unet_config())
    text_encoder = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, dim=32, depth=1, heads=2))
    return LatentDiffusion(tiny_vae(), unet, text_encoder, tokenizer, NoiseSchedule(num_timesteps=100), device="cpu",
                           steps=2)


def hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): to prove nothing in it changed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def checkpoint_files(step: int) -> dict:
    """What a trainer's checkpoint folder holds, in miniature."""
    return {CONFIG_NAME: {"width": 8}, WEIGHTS_NAME: {"w": torch.full((2,), float(step))},
            "trainer.json": {"step": step}}


def set_aside_as_if_crashed(folder: Path, pid: int) -> Path:
    """The first rename of a save, and nothing after: the process 'died' with the good data set aside."""
    aside = folder.parent / f".{folder.name}.old-{pid}"
    os.replace(folder, aside)
    unfinished = folder.parent / f".{folder.name}.tmp-{pid}-abc123"
    unfinished.mkdir()
    (unfinished / CONFIG_NAME).write_text("{\"half\": ")                  # a half-written new checkpoint
    return aside


def dead_pid() -> int:
    """The id of a process that has finished (the OS does not hand it out again this soon)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------ nothing the user had is lost


def test_saving_over_a_folder_minildm_did_not_write_is_refused_and_leaves_every_file_as_it_was(tmp_path):
    folder = tmp_path / "my-stuff"
    folder.mkdir()
    (folder / "thesis.tex").write_text("three years of work")
    (folder / CONFIG_NAME).write_text("{\"mine\": true}")                  # even a config.json of someone else's
    before = hashes(folder)
    with pytest.raises(FileExistsError) as err:
        save_model(folder, tiny_vae(), tiny_vae().config)
    assert "minildm did not write it" in one_line(err) and str(folder) in str(err.value)
    assert hashes(folder) == before, "a refused save changed the user's files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-stuff"], "a refused save left something behind"


def test_saving_over_a_minildm_folder_of_another_kind_is_refused(tmp_path):
    model_folder = save_model(tmp_path / "vae", tiny_vae(), tiny_vae().config)
    before = hashes(model_folder)
    with pytest.raises(FileExistsError, match="holds a minildm model, not a pipeline") as err:
        save_pipeline(model_folder, tiny_pipe())
    one_line(err)
    assert hashes(model_folder) == before


def test_saving_a_model_over_its_own_folder_keeps_each_old_one_as_old_n(tmp_path, capsys):
    folder = save_model(tmp_path / "vae", tiny_vae(0), tiny_vae(0).config, {"notes.json": {"run": 0}})
    (folder / "README.md").write_text("my notes about this model")        # the user's own file in our folder
    first = hashes(folder)
    save_model(folder, tiny_vae(1), tiny_vae(1).config)
    assert hashes(tmp_path / "vae.old-1") == first, "the replaced folder was not kept whole"
    assert "kept the previous vae as" in capsys.readouterr().err
    second = hashes(folder)
    save_model(folder, tiny_vae(2), tiny_vae(2).config)
    assert hashes(tmp_path / "vae.old-2") == second and hashes(tmp_path / "vae.old-1") == first
    key = "decoder.conv_out.weight"
    assert torch.equal(AutoencoderKL.from_folder(folder).state_dict()[key], tiny_vae(2).state_dict()[key])


def test_every_folder_we_write_records_its_kind_and_its_files_and_loaders_never_see_the_record(tmp_path):
    folder = save_model(tmp_path / "vae", tiny_vae(), tiny_vae().config, {"training.json": {"seed": 1}})
    manifest = read_json(folder / CONFIG_NAME)[MANIFEST_KEY]
    assert manifest == {"kind": "model", "files": [CONFIG_NAME, WEIGHTS_NAME, "training.json"]}
    assert MANIFEST_KEY not in read_config(folder)
    pipe_folder = save_pipeline(tmp_path / "ldm", tiny_pipe())
    manifest = read_json(pipe_folder / "pipeline.json")[MANIFEST_KEY]
    assert manifest["kind"] == "pipeline" and "unet/model.safetensors" in manifest["files"]


def test_a_folder_saved_before_manifests_that_looks_like_ours_is_still_replaced_and_kept(tmp_path):
    shipped = Path(checkpoint.__file__).parent / "assets"
    for name in ("shapes64-vae", "shapes64-ldm"):                          # written before manifests existed
        shutil.copytree(shipped / name, tmp_path / name)
    old_pipeline = hashes(tmp_path / "shapes64-ldm")
    pipe = LatentDiffusion.from_folder(tmp_path / "shapes64-ldm", device="cpu", dtype=torch.float32)
    save_pipeline(tmp_path / "shapes64-ldm", pipe, vae_folder_name="../shapes64-vae")   # re-exporting the asset
    assert hashes(tmp_path / "shapes64-ldm.old-1") == old_pipeline
    old_vae = hashes(tmp_path / "shapes64-vae")
    save_model(tmp_path / "shapes64-vae", pipe.vae, pipe.vae.config)
    assert hashes(tmp_path / "shapes64-vae.old-1") == old_vae


def test_a_training_checkpoint_replaces_its_previous_self_without_keeping_it(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        write_folder_atomically(run, checkpoint_files(step), kind="vae-training-checkpoint", keep_old=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "a checkpoint save kept or left old copies"
    assert read_json(run / "trainer.json") == {"step": 3}


def test_a_training_checkpoint_holding_a_file_we_did_not_write_is_refused_and_the_file_stays(tmp_path):
    run = write_folder_atomically(tmp_path / "run", checkpoint_files(1), kind="vae-training-checkpoint",
                                  keep_old=False)
    (run / "notes.txt").write_text("the user's own notes")
    before = hashes(run)
    with pytest.raises(FileExistsError, match="notes.txt, which minildm did not write; move it out") as err:
        write_folder_atomically(run, checkpoint_files(2), kind="vae-training-checkpoint", keep_old=False)
    one_line(err)
    assert hashes(run) == before


def test_a_file_we_add_to_our_folder_later_joins_its_manifest_so_the_next_save_may_replace_it(tmp_path):
    run = write_folder_atomically(tmp_path / "run", checkpoint_files(1), kind="vae-training-checkpoint",
                                  keep_old=False)
    save_decoder_file(tiny_vae(), run / "decoder.safetensors")           # what a decoder fine-tune writes
    assert "decoder.safetensors" in read_json(run / CONFIG_NAME)[MANIFEST_KEY]["files"]
    write_folder_atomically(run, checkpoint_files(2), kind="vae-training-checkpoint", keep_old=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_crash_between_the_two_renames_is_undone_on_the_next_load(tmp_path, capsys):
    folder = save_model(tmp_path / "vae", tiny_vae(), tiny_vae().config)
    before = hashes(folder)
    set_aside_as_if_crashed(folder, os.getpid())       # our own id, but no save of ours is running: a leftover
    assert not folder.exists()
    AutoencoderKL.from_folder(folder)                  # the loader finishes the save's work first
    assert hashes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"], "the unfinished temporary folder was not removed"
    message = capsys.readouterr().err
    assert "restored it from .vae.old-" in message and "removed .vae.tmp-" in message
    assert len(message.strip().splitlines()) == 1


@pytest.mark.parametrize("load", ["read_config", "pipeline", "tokenizer", "save"])
def test_recovery_runs_wherever_a_folder_is_loaded_or_saved(tmp_path, load):
    pipe = tiny_pipe()
    folder = save_pipeline(tmp_path / "ldm", pipe) if load in ("pipeline", "save") else \
        save_model(tmp_path / "vae", tiny_vae(), tiny_vae().config, {"vocab.json": {"words": list(
            pipe.tokenizer.words), "max_length": pipe.tokenizer.max_length}})
    before = hashes(folder)
    set_aside_as_if_crashed(folder, dead_pid())
    if load == "read_config":
        read_config(folder)
    elif load == "tokenizer":
        Tokenizer.from_folder(folder)
    elif load == "pipeline":
        LatentDiffusion.from_folder(folder, device="cpu")
    else:
        save_pipeline(folder, pipe)
        folder = tmp_path / "ldm.old-1"                # restored first, then kept as the save replaced it
    assert hashes(folder) == before


def test_a_running_saves_temporary_folders_are_left_alone(tmp_path):
    folder = save_model(tmp_path / "vae", tiny_vae(), tiny_vae().config)
    aside = set_aside_as_if_crashed(folder, os.getppid())     # a live process: its save may be mid-swap
    assert recover_interrupted_save(folder) is None
    assert aside.is_dir() and not folder.exists()
    assert (tmp_path / f".vae.tmp-{os.getppid()}-abc123").is_dir()


def test_a_set_aside_copy_beside_a_present_folder_is_kept_as_old_n_never_deleted(tmp_path):
    folder = save_model(tmp_path / "vae", tiny_vae(0), tiny_vae(0).config)
    old = hashes(folder)
    os.replace(folder, tmp_path / f".vae.old-{dead_pid()}")            # the swap's first rename ...
    save_model(tmp_path / "elsewhere", tiny_vae(1), tiny_vae(1).config)
    os.replace(tmp_path / "elsewhere", folder)                         # ... and its second, then the crash
    assert recover_interrupted_save(folder) is None                     # nothing to restore: vae is there
    assert hashes(tmp_path / "vae.old-1") == old


# ------------------------------------------------------------------------ what is loaded is what was saved


def saved_unet(tmp_path, **changes) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path / "unet", UNet(tiny_unet_config(**changes)), tiny_unet_config(**changes))


def edit_config(folder: Path, edit) -> None:
    config = read_json(folder / CONFIG_NAME)
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_a_config_missing_a_field_is_an_error_naming_the_file_and_the_field(tmp_path):
    folder = saved_unet(tmp_path, heads=2)             # with the default (8 heads) it would load and draw otherwise
    edit_config(folder, lambda c: c.pop("heads"))
    with pytest.raises(ValueError, match=re.escape(str(folder / CONFIG_NAME)) + r".*field heads is missing") as err:
        UNet.from_folder(folder)
    one_line(err)


def test_a_field_added_later_is_filled_with_its_documented_value_and_said_once(tmp_path, monkeypatch):
    folder = saved_unet(tmp_path, freq_shift=0.0)
    edit_config(folder, lambda c: c.pop("freq_shift"))
    monkeypatch.setattr(checkpoint, "ADDED_FIELDS", {"UNetConfig": {"freq_shift": 0.0}})
    monkeypatch.setattr(checkpoint, "WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = UNet.from_folder(folder), UNet.from_folder(folder)
    said = [str(w.message) for w in caught if "freq_shift" in str(w.message)]
    assert len(said) == 1, f"expected one warning about freq_shift, got {said}"
    assert first.config.freq_shift == second.config.freq_shift == 0.0


def test_a_unet_config_with_the_old_field_names_loads_the_same_model_and_says_so_once(tmp_path, monkeypatch):
    folder = saved_unet(tmp_path)
    expected = UNet.from_folder(folder)
    edit_config(folder, lambda c: c.update(block_channels=c.pop("block_out_channels"),
                                           norm_groups=c.pop("norm_num_groups")))
    monkeypatch.setattr(checkpoint, "WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loaded = UNet.from_folder(folder)
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2 and "'block_channels' is now called 'block_out_channels'" in said[0], said
    assert loaded.config == expected.config
    edit_config(folder, lambda c: c.update(block_out_channels=c["block_channels"]))
    with pytest.raises(ValueError, match="both 'block_channels' and its new name"):
        UNet.from_folder(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_int_or_bool_weights_for_float_parameters_are_refused_naming_the_key(dtype):
    state = dict(tiny_vae().state_dict())
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].to(dtype)
    with pytest.raises(ValueError, match=r"wrong dtype \(first: decoder\.conv_out\.bias: file") as err:
        load_strict(tiny_vae(), state, "weights.safetensors")
    one_line(err)


def test_half_precision_weights_still_load_into_a_float32_model():
    state = {k: v.half() for k, v in tiny_vae(1).state_dict().items()}
    model = load_strict(tiny_vae(0), state, "half.safetensors")
    assert model.decoder.conv_out.weight.dtype == torch.float32
    assert torch.equal(model.decoder.conv_out.weight.data, state["decoder.conv_out.weight"].float())


@pytest.mark.parametrize("name", ["unet/config.json", "text_encoder/vocab.json", "pipeline.json", "scheduler.json",
                                  "vae/config.json"])
def test_invalid_json_in_any_file_a_pipeline_reads_names_the_file_and_the_line(tmp_path, name):
    folder = save_pipeline(tmp_path / "ldm", tiny_pipe())
    path = folder / name
    lines = path.read_text().splitlines()
    lines[2] = lines[2] + " oops"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 3 column") + ".*not valid JSON") as err:
        LatentDiffusion.from_folder(folder, device="cpu")
    one_line(err)


@pytest.mark.parametrize("reference", ["../../outside-vae", "ABSOLUTE"])
def test_a_pipeline_json_may_not_point_to_a_vae_outside_its_parent_folder_unless_it_is_passed_explicitly(
        tmp_path, reference):
    pipe = tiny_pipe()
    outside = save_model(tmp_path / "outside-vae", pipe.vae, pipe.vae.config.to_dict())
    folder = save_pipeline(tmp_path / "models" / "ldm", pipe)
    reference = str(outside) if reference == "ABSOLUTE" else reference
    meta = read_json(folder / "pipeline.json")
    (folder / "pipeline.json").write_text(json.dumps({**meta, "vae": reference}))
    with pytest.raises(ValueError, match="lies outside .*pass it explicitly: LatentDiffusion.from_folder") as err:
        LatentDiffusion.from_folder(folder, device="cpu")
    one_line(err)
    loaded = LatentDiffusion.from_folder(folder, device="cpu", vae=outside)          # the caller's own choice
    assert torch.equal(loaded.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="lies outside"):
        save_pipeline(tmp_path / "models" / "ldm2", pipe, vae_folder_name=reference)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle"])
def test_swap_decoder_on_a_corrupt_or_pickled_file_is_a_one_line_value_error_like_the_other_loaders(tmp_path, damage):
    path = tmp_path / "decoder.safetensors"
    save_decoder_file(tiny_vae(), path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        path = tmp_path / "decoder.pt"
        torch.save(tiny_vae().state_dict(), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a readable VAE file") as err:
        swap_decoder(tiny_vae(), path)
    one_line(err)


def test_the_shipped_assets_load_without_a_warning():
    from minildm.pretrained import load_judge, load_pipeline, load_vae

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_vae(device="cpu")
        load_pipeline(device="cpu")
        load_judge(device="cpu")


@pytest.mark.parametrize("words", ["repeated", "no-special-tokens"])
def test_a_vocab_json_whose_ids_would_shift_is_refused(tmp_path, words):
    pipe = tiny_pipe()
    folder = save_pipeline(tmp_path / "ldm", pipe) / "text_encoder"
    vocab = read_json(folder / "vocab.json")
    vocab["words"] = (vocab["words"][:4] + vocab["words"][3:4] + vocab["words"][5:] if words == "repeated"
                      else vocab["words"][3:])
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=re.escape(str(folder / "vocab.json"))) as err:
        Tokenizer.from_folder(folder)
    one_line(err)
