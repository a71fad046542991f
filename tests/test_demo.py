"""`minildm demo` and `minildm sample` on a tiny random pipeline: every figure is written, the GIF has a frame per
step, the grid has the expected size, user files are never overwritten, and bad input gets one clear line.

The shipped weights are not needed here; tests/test_cli.py's slow demo test runs the real ones."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minildm import demo
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, save_decoder_file
from minildm.cli import main, read_image, read_mask
from minildm.pipeline import LatentDiffusion, save_pipeline
from minildm.saving import save_model
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder, TextEncoderConfig, Tokenizer
from minildm.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3                      # the demo's sampler steps here (25 in the real demo)
CELL = 64 + 2                  # one 64x64 image and its white line in image_grid
EXPECTED = {"compression.json", "reconstructions.png", "latent_channels.png", "interpolation.png", "samples.png",
            "reverse_diffusion.png", "reverse_diffusion.gif", "guidance_sweep.png", "img2img_strength.png",
            "inpainting.png", "vae_swap.png"}


def tiny_vae() -> AutoencoderKL:
    """f = 8 like the shipped VAE (64x64 -> 4x8x8), with 8 channels per level."""
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                           scale_factor=0.5)).eval()


def tiny_pipe() -> LatentDiffusion:
    tokenizer = Tokenizer()
    vae = tiny_vae()
    torch.manual_seed(1)
    unet = UNet(UNetConfig(block_out_channels=(32, 64), attention_levels=(False, True), heads=2, context_dim=32,
                           norm_num_groups=8, layers_per_block=1, num_timesteps=100))
    text_encoder = TextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, dim=32, depth=1, heads=2))
    return LatentDiffusion(vae, unet, text_encoder, tokenizer, NoiseSchedule(num_timesteps=100), device="cpu",
                           steps=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny pipeline, and a VAE folder with a decoder file that fits it (in place of the shipped one)."""
    root = tmp_path_factory.mktemp("tiny")
    save_pipeline(root / "pipe", tiny_pipe())
    vae = tiny_vae()
    save_model(root / "vae", vae, vae.config.to_dict())
    torch.manual_seed(2)
    save_decoder_file(AutoencoderKL(vae.config), root / "vae" / "decoder.safetensors")
    return root


@pytest.fixture(scope="module")
def small_demo(folders):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "STEPS", STEPS)
        mp.setattr(demo, "SWAP_VAE", folders / "vae")
        yield mp


@pytest.fixture(scope="module")
def demo_run(folders, small_demo, tmp_path_factory):
    """`minildm demo --pipeline tiny`: (the folder, the files it printed, what it printed)."""
    out = tmp_path_factory.mktemp("run") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--pipeline", str(folders / "pipe"), "--device", "cpu"]) == 0
    listed = [Path(line.split()[0]) for line in printed.getvalue().splitlines()[1:]]
    return out, listed, printed.getvalue()


def write_image(path, size=64, mode="RGB", value=0):
    Image.new(mode, (size, size), value).save(path)
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("minildm ") and ": error: " in err and "\n" not in err, \
        f"expected one 'minildm <command>: error: ...' line, got:\n{err}"
    return err


# ----------------------------------------------------------------------------------------------- demo


def test_the_demo_writes_every_file_it_lists_and_lists_every_figure(demo_run):
    out, listed, printed = demo_run
    names = {path.name for path in listed}
    assert names == EXPECTED, f"missing {EXPECTED - names}, unexpected {names - EXPECTED}; it printed:\n{printed}"
    for path in listed:
        assert path.parent == out and path.is_file() and path.stat().st_size > 0, f"{path} not written"
    assert [row["ratio"] for row in json.loads((out / "compression.json").read_text())][:2] == [48.0, 48.0]


def test_the_reverse_diffusion_gif_has_one_frame_per_step(demo_run):
    out, _, _ = demo_run
    with Image.open(out / "reverse_diffusion.gif") as gif:
        assert gif.n_frames == STEPS, f"{gif.n_frames} frames for {STEPS} steps"


def test_the_decoder_file_is_swapped_only_into_the_vae_it_was_made_for(folders, tmp_path):
    pipe = LatentDiffusion.from_folder(folders / "pipe", "cpu")
    assert demo.decoder_file_fits(pipe, folders / "vae")
    other = tmp_path / "other-vae"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(AutoencoderConfig.shapes64().to_dict()))
    assert not demo.decoder_file_fits(pipe, other)


@pytest.fixture
def tiny_training(small_demo, monkeypatch):
    """--train's recipes cut to two steps each, on tiny networks."""
    monkeypatch.setattr(demo, "VAE_TRAIN", {"steps": 2, "batch_size": 2, "num_train_images": 16, "eval_images": 8,
                                            "scale_images": 8, "save_every": 2})
    monkeypatch.setattr(demo, "VAE_MODEL", tiny_vae().config)
    monkeypatch.setattr(demo, "LDM_TRAIN", {"steps": 2, "batch_size": 4, "num_train_images": 8, "save_every": 2,
                                            "sample_every": 0, "log_every": 1})
    monkeypatch.setattr(demo, "LDM_MODELS", {"channels": "32,64", "norm_num_groups": 8, "text_dim": 32,
                                             "text_depth": 1, "heads": 2})


def test_demo_train_trains_the_vae_then_the_ldm_on_its_latents_then_draws(tiny_training, tmp_path, capsys):
    out = tmp_path / "demo"
    written = demo.run_demo(out, device="cpu", train=True)
    assert "the VAE" in capsys.readouterr().out
    # the decoder file fits only the shipped VAE: a VAE trained here gets no swap figure
    assert {path.name for path, _ in written} == EXPECTED - {"vae_swap.png"} | {"train-stages.json"}
    assert json.loads((out / "vae-run" / "trainer.json").read_text())["step"] == 2
    assert json.loads((out / "train-run" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    # the pipeline draws with the VAE trained here (out/vae, referred to), not the shipped one
    pipe = LatentDiffusion.from_folder(out / "pipeline", "cpu")
    trained = AutoencoderKL.from_folder(out / "vae")
    assert pipe.vae.config == trained.config and pipe.vae.config.scale_factor != tiny_vae().config.scale_factor
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), trained.state_dict().values()))
    stages = json.loads((out / "train-stages.json").read_text())
    assert set(stages["stage_seconds_here"]) == set(demo.STAGE_SECONDS)
    assert all(seconds >= 0 for seconds in stages["stage_seconds_here"].values())


def test_demo_train_again_continues_and_reuses_what_is_finished(tiny_training, tmp_path):
    out = tmp_path / "demo"
    assert demo.done_before(out) == 0
    demo.run_demo(out, device="cpu", train=True, progress=False)
    vae_written = (out / "vae" / "model.safetensors").stat().st_mtime_ns
    training = sum(seconds for stage, seconds in demo.STAGE_SECONDS.items() if stage not in ("ldm_data", "figures"))
    assert demo.done_before(out) == pytest.approx(training)        # the overall bar starts where the runs got to
    demo.run_demo(out, device="cpu", train=True, progress=False)
    assert (out / "vae" / "model.safetensors").stat().st_mtime_ns == vae_written   # the finished VAE is reused
    assert json.loads((out / "train-run" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    assert "vae" not in json.loads((out / "train-stages.json").read_text())["stage_seconds_here"]


def test_the_overall_bar_moves_by_each_stage_share_of_the_reference_seconds(capsys):
    overall = demo.OverallProgress(done_before=10.0)
    overall.stage("vae", "1/3 training the VAE")
    for _ in range(4):
        overall.step(8)
    assert overall.bar.n == pytest.approx(10.0 + demo.STAGE_SECONDS["vae"] / 2)
    overall.stage("ldm_data", "2/3 encoding")
    overall.done()
    assert overall.bar.n == pytest.approx(10.0 + demo.STAGE_SECONDS["vae"] / 2 + demo.STAGE_SECONDS["ldm_data"])
    assert set(overall.times) == {"vae", "ldm_data"}
    overall.close()
    assert "left" in capsys.readouterr().err                        # the ETA is shown


@pytest.mark.parametrize("args, says, code", [(["--train", "--pipeline", "."], "--train", 2),      # by argparse
                                              (["--pipeline", "no-such-folder"], "no such folder", 1)])
def test_demo_command_rejects_bad_options_with_one_line(tmp_path, capsys, args, says, code):
    assert main(["demo", "--out", str(tmp_path / "demo"), *args]) == code
    assert says in one_line_error(capsys)


# --------------------------------------------------------------------------------------------- sample


def sample(folders, out, *args) -> int:
    return main(["sample", "--pipeline", str(folders / "pipe"), "--out", str(out), "--steps", "2", "--device", "cpu",
                 *args])


def test_sample_writes_one_grid_with_a_row_per_prompt_and_a_column_per_seed(folders, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert sample(folders, out, "--prompt", "a red circle", "--prompt", "a large blue square", "--num", "3") == 0
    with Image.open(out) as grid:
        assert grid.size == (3 * CELL + 2, 2 * CELL + 2) and grid.mode == "RGB"
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_sample_edits_a_64x64_image(folders, tmp_path, mode):
    image = write_image(tmp_path / "in.png", value=(200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "mask.png")
    extra = ["--mask", str(tmp_path / "mask.png")] if mode == "inpaint" else ["--strength", "0.5"]
    out = tmp_path / "edit.png"
    assert sample(folders, out, "--prompt", "a red circle", "--num", "2", "--init-image", image, *extra) == 0
    with Image.open(out) as grid:
        assert grid.size == (2 * CELL + 2, CELL + 2)


def test_sample_never_overwrites_a_file_unless_forced(folders, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"not to be lost")
    assert sample(folders, out, "--prompt", "a red circle", "--num", "1") == 1
    assert "--force" in one_line_error(capsys)
    assert out.read_bytes() == b"not to be lost"
    assert sample(folders, out, "--prompt", "a red circle", "--num", "1", "--force") == 0
    with Image.open(out) as grid:
        assert grid.size == (CELL + 2, CELL + 2)


@pytest.mark.parametrize("case, says", [
    ("unknown word", "unknown words 'pink'"),
    ("init image size", "image size 36x36 is not a multiple of 8"),
    ("mask size", "--mask"),
    ("grey mask", "black (keep) and white"),
    ("mask without image", "--init-image"),
    ("not a png name", ".png"),
    ("missing image", "no such file"),
])
def test_sample_rejects_bad_input_with_one_line_and_exit_code_1(folders, tmp_path, capsys, case, says):
    image = write_image(tmp_path / "in.png")
    args = {"unknown word": ["--prompt", "a pink circle"],
            "init image size": ["--prompt", "a red circle", "--init-image", write_image(tmp_path / "s.png", 36)],
            "mask size": ["--prompt", "a red circle", "--init-image", image,
                          "--mask", write_image(tmp_path / "m.png", 32, mode="L")],
            "grey mask": ["--prompt", "a red circle", "--init-image", image,
                          "--mask", write_image(tmp_path / "grey.png", mode="L", value=128)],
            "mask without image": ["--prompt", "a red circle", "--mask", write_image(tmp_path / "black.png", mode="L")],
            "not a png name": ["--prompt", "a red circle"],
            "missing image": ["--prompt", "a red circle", "--init-image", str(tmp_path / "nope.png")]}[case]
    out = tmp_path / ("grid.jpg" if case == "not a png name" else "grid.png")
    assert sample(folders, out, *args) == 1
    assert says in one_line_error(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- reading init images and masks


def test_an_opaque_rgba_image_reads_like_its_rgb_and_a_transparent_one_is_refused(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    rgb.save(tmp_path / "rgb.png")
    rgb.convert("RGBA").save(tmp_path / "opaque.png")
    assert torch.equal(read_image(str(tmp_path / "opaque.png")), read_image(str(tmp_path / "rgb.png")))
    see_through = rgb.convert("RGBA")
    see_through.putpixel((3, 4), (200, 30, 30, 128))
    see_through.save(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match=r"has 1 transparent pixels; flatten it onto a background first") as err:
        read_image(str(tmp_path / "alpha.png"))
    assert "\n" not in str(err.value)


def test_a_16_bit_png_is_scaled_by_65535_not_clipped_at_255(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I;16"), check.mode                   # Pillow really kept the 16 bits
    got = read_image(str(tmp_path / "deep.png"))                            # (1, 3, 2, 2), grey to RGB
    want = torch.from_numpy(values.astype(np.float32) / 65535 * 2 - 1)
    assert got.shape == (1, 3, 2, 2)
    assert torch.allclose(got[0], want.expand(3, 2, 2), atol=1e-6), got[0, 0]


def test_a_float_tiff_is_read_as_it_is_in_0_1_and_refused_outside_or_with_nan(tmp_path):
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "ok.tif")
    assert torch.allclose(read_image(str(tmp_path / "ok.tif"))[0, 1], torch.from_numpy(values * 2 - 1))
    for name, bad, says in (("big", 2.0, r"holds floats 0\.\.2 .*finite values in \[0, 1\]"),
                            ("nan", float("nan"), r"NaN or inf: 1\)")):
        Image.fromarray(np.where(values == 1.0, bad, values).astype(np.float32)).save(tmp_path / f"{name}.tif")
        with pytest.raises(ValueError, match=says) as err:
            read_image(str(tmp_path / f"{name}.tif"))
        assert "\n" not in str(err.value)


def test_a_mask_reads_as_0_and_1_from_8_bit_16_bit_and_float_files_and_grey_is_refused(tmp_path):
    want = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    Image.fromarray((want.numpy() * 255).astype(np.uint8)).save(tmp_path / "m8.png")
    Image.fromarray((want.numpy() * 65535).astype(np.uint16)).save(tmp_path / "m16.png")
    Image.fromarray(want.numpy()).save(tmp_path / "mf.tif")
    for name in ("m8.png", "m16.png", "mf.tif"):
        assert torch.equal(read_mask(str(tmp_path / name)), want), name
    Image.fromarray(np.array([[0, 65535], [40000, 0]], dtype=np.uint16)).save(tmp_path / "grey16.png")
    with pytest.raises(ValueError, match=r"1 pixels are grey \(e\.g\. 0\.61 of 1\)"):
        read_mask(str(tmp_path / "grey16.png"))
