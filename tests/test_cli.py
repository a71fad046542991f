"""The `minildm` command: arguments reach the code, bad input gets one clear line, user files are never overwritten.

Exit codes: 2 when argparse refuses the command line (numbers are range-checked as they are parsed), 1 when the
command fails; either way one line on stderr, `minildm <command>: error: ...`, and no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minildm.cli
from minildm.cli import DEMO_MARKER, main
from minildm.pipeline import PIPELINE_NAME
from minildm.pretrained import PIPELINES, VAES

SHIPPED = (VAES["shapes64"] / "model.safetensors").is_file() and (PIPELINES["shapes64"] / PIPELINE_NAME).is_file()


def one_error_line(capsys, command: str, after_loading: bool = False) -> str:
    """stderr must be exactly one `minildm <command>: error: ...` line, without a traceback (`after_loading`: once
    the bars of a pipeline's weights files are set aside)."""
    err = capsys.readouterr().err
    if after_loading:
        err = "\n".join(line for line in err.split("\n") if " weights file: " not in line)  # a bar ends in \n
    assert err.count("\n") == 1 and err.startswith(f"minildm {command}: error: "), f"not one error line:\n{err}"
    assert "Traceback" not in err, err
    return err


def test_demo_refuses_a_folder_holding_files_it_did_not_write(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["demo", "--out", str(tmp_path)]) == 1
    assert "did not write" in one_error_line(capsys, "demo")
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / DEMO_MARKER).exists()


def test_train_vae_refuses_an_existing_output_folder_with_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train-vae", "--out", str(out), "--steps", "1"]) == 1
    assert "--resume" in one_error_line(capsys, "train-vae")
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------- bad command lines: exit code 2

# The table of bad command lines (exit code 2) is tests/test_bad_input.py's.


def test_a_bad_command_line_from_the_shell_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minildm", "train-vae", "--out", str(tmp_path / "run"),
                             "--save-every", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--save-every" in result.stderr and "Traceback" not in result.stderr


def test_help_still_exits_with_code_0(capsys):
    assert main(["sample", "--help"]) == 0
    assert "--prompt" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ failures: exit code 1

def test_a_missing_pipeline_folder_is_exit_code_1_with_one_line(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--prompt", "a red circle", "--out", str(out), "--pipeline", str(tmp_path / "nope"),
                 "--device", "cpu"]) == 1
    assert "nope" in one_error_line(capsys, "sample")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--pipeline", str(tmp_path / "nope")]) == 1
    assert "no such folder" in one_error_line(capsys, "demo")
    assert not out.exists()


def test_a_file_where_the_output_folder_should_be_is_exit_code_1_with_one_line(tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "notes")]) == 1
    assert "is a file" in one_error_line(capsys, "demo")
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_read_only_output_folder_is_exit_code_1_with_one_line_saying_what_to_do(tmp_path, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):                    # as the OS answers on a read-only disk (root or not)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = one_error_line(capsys, "demo")
    assert str(tmp_path / "demo") in err and "choose a folder" in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_exit_code_1_with_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["workbook", "build", "--out", str(locked / "wb"), "--tasks", "ch01"]) == 1
        assert "Permission denied" in one_error_line(capsys, "workbook build")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("raised, code, says", [
    (ValueError("first line\nsecond line"), 1, "first line (the rest: run again with MINILDM_TRACEBACK=1)"),
    (FloatingPointError("the loss is nan at step 3"), 1, "the loss is nan at step 3"),
    (NotImplementedError("ch02.gaussian_kl: write it in the workbook"), 1, "ch02.gaussian_kl"),
    (PermissionError(errno.EACCES, "Permission denied", "grade.json"), 1, "check its permissions"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_a_failing_command_prints_only_the_first_line_of_its_error(raised, code, says, capsys, monkeypatch):
    def fails(args):
        raise raised

    monkeypatch.setattr(minildm.cli, "cmd_grade", fails)
    monkeypatch.delenv("MINILDM_TRACEBACK", raising=False)
    assert main(["grade"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minildm grade: ") and says in err, err


def test_minildm_traceback_1_shows_the_traceback_and_a_bug_always_does(monkeypatch):
    def fails(args):
        raise ValueError("a user error")

    monkeypatch.setattr(minildm.cli, "cmd_grade", fails)
    monkeypatch.setenv("MINILDM_TRACEBACK", "1")
    with pytest.raises(ValueError, match="a user error"):
        main(["grade"])
    monkeypatch.delenv("MINILDM_TRACEBACK")
    monkeypatch.setattr(minildm.cli, "cmd_grade", lambda args: {}["a bug"])
    with pytest.raises(KeyError):                            # not a user's error: the traceback helps whoever fixes it
        main(["grade"])


def test_train_vae_command_trains_resumes_and_exports(tmp_path, capsys):
    run, export = tmp_path / "run", tmp_path / "export"
    common = ["--channels", "8,16", "--norm-groups", "4", "--image-size", "16", "--num-images", "16",
              "--batch-size", "4", "--save-every", "2", "--seed", "1", "--threads", "1"]
    assert main(["train-vae", "--out", str(run), "--steps", "2", *common]) == 0
    assert main(["train-vae", "--out", str(run), "--steps", "3", "--resume", "--export", str(export), *common]) == 0
    record = json.loads((export / "training.json").read_text())
    assert record["seed"] == 1 and "--resume" in record["command"]
    assert json.loads((run / "trainer.json").read_text())["step"] == 3
    config = json.loads((export / "config.json").read_text())
    assert config["block_out_channels"] == [8, 16]


@pytest.mark.skipif(not SHIPPED, reason="the shipped shapes64 VAE and pipeline are not built yet")
@pytest.mark.slow
def test_demo_writes_its_figures_and_says_where(tmp_path):
    """The real thing, from the shipped weights (tests/test_demo.py checks the same on a tiny random pipeline)."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "minildm", "demo", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("compression.json", "reconstructions.png", "latent_channels.png", "interpolation.png",
                 "samples.png", "reverse_diffusion.png", "reverse_diffusion.gif", "guidance_sweep.png",
                 "img2img_strength.png", "inpainting.png", "vae_swap.png"):
        assert (out / name).is_file(), f"{name} missing; demo said:\n{result.stdout}"
        assert str(out / name) in result.stdout
    table = json.loads((out / "compression.json").read_text())
    assert [row["ratio"] for row in table] == [48.0, 48.0, 48.0]
    # running it again into its own folder is allowed (it only replaces its own figures)
    again = subprocess.run([sys.executable, "-m", "minildm", "demo", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


# ------------------------------------------------- Stable Diffusion through `minildm sample --pipeline PATH`

def tiny_sd_folder(root: Path) -> Path:
    """A diffusers Stable Diffusion folder at a toy width, with random weights: SD 1's layout (two levels), the real
    CLIP tokenizer from the shipped vocabulary, SD's DDIM scheduler; as tests/oracle/test_sd_pipeline_parity.py
    assembles it, smaller. unet sample_size 8 x the VAE's factor 2: the default image is 16x16."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import save_file

    from minildm.clip_tokenizer import CLIPTokenizer

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"                       # nothing is fetched
    try:
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=8,
            norm_num_groups=8, cross_attention_dim=16)
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                      latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, hidden_act="quick_gelu"))
        CLIPTokenizer.shipped().save(root / "tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                            set_alpha_to_one=False, clip_sample=False)
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
        pipe.save_pretrained(root / "sd")
        torch.manual_seed(1)                                  # another VAE of the same shape: a VAE file to swap in
        other = diffusers.AutoencoderKL(**{k: v for k, v in vae.config.items() if not k.startswith("_")})
        with torch.no_grad():
            for parameter in other.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, root / "other-vae.safetensors")
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return root / "sd"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd"))


def sd_sample(folder: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--pipeline", str(folder), "--prompt", "a photograph of an astronaut riding a horse",
                 "--num", "1", "--steps", "2", "--device", "cpu", "--out", str(out), *extra])


def png_pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image)


@pytest.mark.oracle
def test_sample_draws_a_diffusers_sd_folder_at_the_asked_size_with_a_negative_prompt(sd_folder, tmp_path, capsys):
    import numpy as np

    negative, plain = tmp_path / "negative.png", tmp_path / "plain.png"
    assert sd_sample(sd_folder, negative, "--height", "32", "--width", "48", "--negative-prompt", "blurry, low "
                     "quality", "--dtype", "float32") == 0
    said = capsys.readouterr()
    assert "32x48 (height x width)" in said.out and "s per step" in said.out, said.out
    assert "unet float32, text_encoder float32, vae float32" in said.out, said.out      # the loaded pipeline
    assert "sampling" in said.err and "2/2" in said.err, said.err                        # the progress bar
    assert all(f"{part} weights file: 100%" in said.err for part in ("unet", "vae", "text_encoder")), said.err
    assert png_pixels(negative).shape == (32 + 4, 48 + 4, 3)                             # one image, 2-pixel frame
    assert sd_sample(sd_folder, plain, "--height", "32", "--width", "48") == 0
    assert not np.array_equal(png_pixels(negative), png_pixels(plain)), "--negative-prompt changed nothing"
    default = tmp_path / "default.png"
    assert sd_sample(sd_folder, default) == 0                    # the folder's size: sample_size 8 x factor 2
    assert png_pixels(default).shape == (16 + 4, 16 + 4, 3)


@pytest.mark.oracle
def test_from_pretrained_shows_a_bar_per_weights_file_only_when_asked_and_loads_the_same_weights(sd_folder, capsys):
    import torch

    from minildm.pipeline import LatentDiffusion

    quiet = LatentDiffusion.from_pretrained(sd_folder, device="cpu")
    assert capsys.readouterr().err == ""
    shown = LatentDiffusion.from_pretrained(sd_folder, device="cpu", progress=True)
    bars = capsys.readouterr().err
    for part in ("unet", "vae", "text_encoder"):
        assert f"{part} weights file: 100%" in bars, bars
        ours, theirs = getattr(shown, part).state_dict(), getattr(quiet, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{part}: progress changed a weight"


@pytest.mark.oracle
def test_sample_swaps_in_a_vae_file_and_a_bad_one_is_one_line(sd_folder, tmp_path, capsys):
    import numpy as np

    plain, swapped = tmp_path / "plain.png", tmp_path / "swapped.png"
    assert sd_sample(sd_folder, plain) == 0
    assert sd_sample(sd_folder, swapped, "--vae", str(sd_folder.parent / "other-vae.safetensors")) == 0
    assert not np.array_equal(png_pixels(plain), png_pixels(swapped)), "--vae changed nothing"
    capsys.readouterr()
    bad = tmp_path / "bad-vae.safetensors"
    bad.write_bytes(b"\xff" * 64)
    assert sd_sample(sd_folder, tmp_path / "never.png", "--vae", str(bad)) == 1
    assert "bad-vae.safetensors" in one_error_line(capsys, "sample", after_loading=True)
    assert not (tmp_path / "never.png").exists()


@pytest.mark.oracle
def test_prediction_is_refused_for_a_folder_with_one_line(sd_folder, tmp_path, capsys):
    assert sd_sample(sd_folder, tmp_path / "never.png", "--prediction", "v_prediction") == 1
    assert "--prediction" in one_error_line(capsys, "sample")


@pytest.mark.oracle
def test_a_single_file_goes_to_from_pretrained_with_prediction_dtype_and_sd_default_size(sd_folder, tmp_path,
                                                                                        monkeypatch, capsys):
    """A toy CompVis file would need the loader's size options, which the command leaves at SD's; so the loader is
    stood in for here (tests/oracle/test_sd_pipeline_parity.py loads real single files) and what reaches it checked."""
    import torch

    from minildm.cli import default_side
    from minildm.pipeline import LatentDiffusion

    single = tmp_path / "v2-768.safetensors"
    single.write_bytes(b"stands for a checkpoint")
    pipe = LatentDiffusion.from_pretrained(sd_folder, device="cpu")
    seen = {}

    def from_pretrained(path, device=None, dtype=None, **options):
        seen.update(path=Path(path), device=device, dtype=dtype, **options)
        return pipe

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", from_pretrained)
    out = tmp_path / "castle.png"
    assert sd_sample(single, out, "--prediction", "v_prediction", "--dtype", "bfloat16", "--height", "16",
                     "--width", "24") == 0
    assert seen == {"path": single, "device": "cpu", "dtype": torch.bfloat16, "prediction_type": "v_prediction",
                    "progress": True}
    assert png_pixels(out).shape == (16 + 4, 24 + 4, 3)
    assert "loading" in capsys.readouterr().out
    assert (default_side(str(single), pipe, "v_prediction"), default_side(str(single), pipe, None)) == (768, 512)
    assert default_side(None, pipe, None) == 64                                     # the shipped Shapes pipeline
