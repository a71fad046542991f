"""Bad input, tried as a new user would: one table across the `minildm` command and the Python API.

Every row gives something wrong and says what must come back: an exit code (2 when argparse refuses the command line,
1 when the command fails) or an exception type, and a word the message must name. For every row the message is one
line (no traceback on the command line), and no file that was there before changed: the test hashes every file in
the folder the row works in, before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from minildm.attention import attention
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, latent_shape, swap_decoder
from minildm.checkpoint import config_from_dict, load_state_dict, load_strict, read_config
from minildm.cli import main
from minildm.ldm_recipe import LDMTrainConfig
from minildm.pipeline import LatentDiffusion
from minildm.pretrained import PIPELINES, VAES, load_pipeline
from minildm.samplers import make_sampler
from minildm.saving import save_model
from minildm.schedule import NoiseSchedule
from minildm.text import Tokenizer
from minildm.unet import UNet, UNetConfig

SHIPPED = (VAES["shapes64"] / "model.safetensors").is_file() and (PIPELINES["shapes64"] / "pipeline.json").is_file()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="the shipped shapes64 weights are not built")


# ------------------------------------------------------------------------------------------------ the workspace

def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def workspace(root: Path) -> dict[str, Path]:
    """What a user already has in the folder a row works in: their own files, images, a run, a model folder."""
    rng = np.random.default_rng(0)
    (root / "mine.txt").write_text("a user's notes")
    (root / "user-folder").mkdir()
    (root / "user-folder" / "thesis.tex").write_text("years of work")
    (root / "empty-folder").mkdir()
    (root / "a-file").write_text("not a folder")
    (root / "not-an-image.png").write_text("plain text with a .png name")
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_png(root / "existing.png", pixels)
    rgba = np.concatenate([pixels, np.full((64, 64, 1), 128, np.uint8)], axis=2)
    write_png(root / "transparent.png", rgba, "RGBA")
    write_png(root / "grey-mask.png", np.full((64, 64), 128, np.uint8), "L")
    write_png(root / "odd-size.png", pixels[:60, :60])
    (root / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    torch.save({"weight": torch.zeros(2)}, root / "weights.ckpt")
    return {name: root / name for name in ("mine.txt", "existing.png", "transparent.png", "grey-mask.png")}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Row:
    name: str
    call: Callable[[Path], object]      # given the workspace folder: run the CLI (argv list) or call the API
    expect: int | type                  # an exit code for the CLI, an exception type for the API
    names: str                          # what the one-line message must name


def cli(*argv: str) -> Callable[[Path], list[str]]:
    """A command line; "{ws}" in an argument becomes the workspace folder."""
    return lambda ws: [a.replace("{ws}", str(ws)) for a in argv]


# --------------------------------------------------------------------------- the command line refuses: exit 2

OUT = ("--out", "{ws}/never-written")          # argparse stops before anything is written
SAMPLE = ("sample", "--prompt", "a red circle", "--out", "{ws}/never-written.png")
PARSE_ROWS = [Row(f"cli {' '.join(argv[:1] + argv[-2:])}", cli(*argv), 2, option) for argv, option in [
    (("train-vae", *OUT, "--save-every", "0"), "--save-every"),
    (("train-ldm", *OUT, "--save-every", "-5"), "--save-every"),
    (("train-ldm", *OUT, "--log-every", "0"), "--log-every"),
    (("train-vae", *OUT, "--steps", "0"), "--steps"),
    (("train-ldm", *OUT, "--steps", "-1"), "--steps"),
    (("train-ldm", *OUT, "--steps", "1.5"), "--steps"),
    (("train-vae", *OUT, "--num-images", "0"), "--num-images"),
    (("train-ldm", *OUT, "--num-images", "0"), "--num-images"),
    (("train-vae", *OUT, "--threads", "-1"), "--threads"),
    (("demo", *OUT, "--threads", "-1"), "--threads"),
    ((*SAMPLE, "--threads", "-2"), "--threads"),
    (("train-vae", *OUT, "--channels", "a,b"), "--channels"),
    (("train-vae", *OUT, "--channels", "16,0"), "--channels"),
    (("train-ldm", *OUT, "--channels", "32,,64"), "--channels"),
    (("train-ldm", *OUT, "--channels", "-32,64"), "--channels"),
    (("train-ldm", *OUT, "--attention", "1,2"), "--attention"),
    (("train-vae", *OUT, "--batch-size", "0"), "--batch-size"),
    (("train-ldm", *OUT, "--batch-size", "0"), "--batch-size"),
    (("train-vae", *OUT, "--lr", "0"), "--lr"),
    (("train-ldm", *OUT, "--lr", "-1e-3"), "--lr"),
    (("train-ldm", *OUT, "--lr", "nan"), "--lr"),
    (("train-ldm", *OUT, "--lr", "inf"), "--lr"),
    (("train-vae", *OUT, "--kl-weight", "-1"), "--kl-weight"),
    (("train-vae", *OUT, "--scale-equivariance", "-1"), "--scale-equivariance"),
    (("train-vae", *OUT, "--disc-weight", "-0.5"), "--disc-weight"),
    (("train-vae", *OUT, "--disc-start", "-1"), "--disc-start"),
    (("train-vae", *OUT, "--image-size", "0"), "--image-size"),
    (("train-vae", *OUT, "--layers-per-block", "0"), "--layers-per-block"),
    (("train-vae", *OUT, "--norm-groups", "0"), "--norm-groups"),
    (("train-vae", *OUT, "--stop-after", "0"), "--stop-after"),
    (("train-vae", *OUT, "--seed", "-1"), "--seed"),
    (("train-ldm", *OUT, "--data-seed", "-1"), "--data-seed"),
    (("train-ldm", *OUT, "--seed", str(2**64)), "--seed"),
    (("train-ldm", *OUT, "--warmup-steps", "-1"), "--warmup-steps"),
    (("train-ldm", *OUT, "--caption-dropout", "1.5"), "--caption-dropout"),
    (("train-ldm", *OUT, "--ema-decay", "1"), "--ema-decay"),
    (("train-ldm", *OUT, "--sample-every", "-1"), "--sample-every"),
    (("train-ldm", *OUT, "--heads", "0"), "--heads"),
    (("train-ldm", *OUT, "--text-dim", "0"), "--text-dim"),
    (("train-ldm", *OUT, "--text-depth", "0"), "--text-depth"),
    (("train-ldm", *OUT, "--export-steps", "0"), "--export-steps"),
    (("train-ldm", *OUT, "--export-guidance", "-1"), "--export-guidance"),
    (("train-ldm", *OUT, "--prediction", "eps"), "--prediction"),
    (("train-ldm", *OUT, "--min-snr-gamma", "0"), "--min-snr-gamma"),
    ((*SAMPLE, "--num", "0"), "--num"),
    ((*SAMPLE, "--steps", "0"), "--steps"),
    ((*SAMPLE, "--guidance", "-1"), "--guidance"),
    ((*SAMPLE, "--guidance", "nan"), "--guidance"),
    ((*SAMPLE, "--strength", "1.5"), "--strength"),
    ((*SAMPLE, "--strength", "-0.1"), "--strength"),
    ((*SAMPLE, "--seed", "-1"), "--seed"),
    ((*SAMPLE, "--height", "60"), "--height"),
    ((*SAMPLE, "--width", "0"), "--width"),
    ((*SAMPLE, "--dtype", "float8"), "--dtype"),
    ((*SAMPLE, "--prediction", "eps"), "--prediction"),
    (("demo", *OUT, "--seed", "x"), "--seed"),
    (("demo", *OUT, "--train", "--pipeline", "."), "--train"),
    (("sample", "--out", "never-written.png"), "--prompt"),
    (("grade", "--timeout", "0"), "--timeout"),
]]


def resume_spoiled_vae_run(ws: Path, spoil: str) -> None:
    """A VAE run stopped after one step, one of whose checkpoint files is then replaced (by random bytes, or by a
    pickle under the safetensors name), resumed: what `minildm train-vae --resume` does."""
    from minildm.train_vae import VAETrainConfig, VAETrainer

    cfg = VAETrainConfig(steps=4, batch_size=4, num_train_images=16, image_size=16, save_every=1, eval_images=8,
                         scale_images=16)
    config = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, scale_factor=1.0)
    VAETrainer(cfg, ws / "vae-run", config, progress=False).run(stop_after=1)
    if spoil == "corrupt":
        (ws / "vae-run" / "optimizer.safetensors").write_bytes(b"\x00" * 100)
    else:
        (ws / "vae-run" / "model.safetensors").unlink()
        torch.save({"weight": torch.zeros(2)}, ws / "vae-run" / "model.safetensors")
    VAETrainer(cfg, ws / "vae-run", config, resume=True, progress=False)


# ------------------------------------------------------------------------------- the command fails: exit 1

FAIL_ROWS = [
    Row("sample: a pipeline folder that does not exist",
        cli(*SAMPLE, "--pipeline", "{ws}/no-such-pipeline"), 1, "no-such-pipeline"),
    Row("sample: --out exists and --force is not given",
        cli("sample", "--prompt", "a red circle", "--out", "{ws}/existing.png"), 1, "--force"),
    Row("sample: --out inside a file", cli("sample", "--prompt", "a red circle", "--out", "{ws}/a-file/grid.png"),
        1, "a-file"),
    Row("sample: an init image that does not exist", cli(*SAMPLE, "--init-image", "{ws}/missing.png"), 1,
        "missing.png"),
    Row("sample: an init image that is not an image", cli(*SAMPLE, "--init-image", "{ws}/not-an-image.png"), 1,
        "not-an-image.png"),
    Row("sample: an init image with transparency", cli(*SAMPLE, "--init-image", "{ws}/transparent.png"), 1,
        "transpar"),
    Row("sample: an init image of the wrong size", cli(*SAMPLE, "--init-image", "{ws}/odd-size.png"), 1, "60x60"),
    Row("sample: a grey mask", cli(*SAMPLE, "--init-image", "{ws}/existing.png", "--mask", "{ws}/grey-mask.png"),
        1, "grey-mask.png"),
    Row("sample: a mask without an init image", cli(*SAMPLE, "--mask", "{ws}/grey-mask.png"), 1, "--init-image"),
    Row("sample: --pipeline a file that is not a checkpoint", cli(*SAMPLE, "--pipeline", "{ws}/mine.txt"), 1,
        "mine.txt"),
    Row("sample: --pipeline a corrupt .safetensors file", cli(*SAMPLE, "--pipeline", "{ws}/corrupt.safetensors"), 1,
        "corrupt.safetensors"),
    Row("sample: --pipeline a .ckpt that is not Stable Diffusion", cli(*SAMPLE, "--pipeline", "{ws}/weights.ckpt"),
        1, "weights.ckpt"),
    Row("sample: --vae a file that does not exist", cli(*SAMPLE, "--vae", "{ws}/no-such-vae.safetensors"), 1,
        "no-such-vae"),
    Row("sample: --vae a file that is not a VAE", cli(*SAMPLE, "--vae", "{ws}/corrupt.safetensors"), 1,
        "corrupt.safetensors"),
    Row("sample: --height with an init image of another size",
        cli(*SAMPLE, "--init-image", "{ws}/existing.png", "--height", "32"), 1, "--height"),
    Row("sample: a word the tokenizer does not know",
        cli("sample", "--prompt", "a purple elephant", "--out", "{ws}/never-written.png"), 1, "elephant"),
    Row("train-vae: --out holds a user's files", cli("train-vae", "--out", "{ws}/user-folder", "--steps", "1"), 1,
        "--resume"),
    Row("train-vae: --out inside a file", cli("train-vae", "--out", "{ws}/a-file/run", "--steps", "1"), 1, "a-file"),
    Row("train-vae: --resume with no checkpoint", cli("train-vae", "--out", "{ws}/empty-folder", "--resume"), 1,
        "nothing to resume"),
    Row("train-ldm: --resume with no checkpoint", cli("train-ldm", "--out", "{ws}/empty-folder", "--resume"), 1,
        "nothing to resume"),
    Row("train-ldm: --out holds a user's files", cli("train-ldm", "--out", "{ws}/user-folder", "--steps", "1"), 1,
        "--resume"),
    Row("train-vae: --export into a user's folder",
        cli("train-vae", "--out", "{ws}/run", "--export", "{ws}/user-folder", "--steps", "1"), 1, "did not write"),
    Row("train-ldm: --export into a user's folder",
        cli("train-ldm", "--out", "{ws}/run", "--export", "{ws}/user-folder", "--steps", "1"), 1, "did not write"),
    Row("train-ldm: --min-snr-gamma without min-SNR's timesteps",
        cli("train-ldm", "--out", "{ws}/run", "--t-sampling", "uniform", "--min-snr-gamma", "1"), 1,
        "--t-sampling min_snr"),
    Row("train-ldm: --zero-terminal-snr with an eps model",
        cli("train-ldm", "--out", "{ws}/run", "--zero-terminal-snr"), 1, "--prediction v_prediction"),
    Row("train-ldm: a --vae folder that does not exist",
        cli("train-ldm", "--out", "{ws}/run", "--vae", "{ws}/no-such-vae", "--steps", "1"), 1, "no-such-vae"),
    Row("train-vae: a --finetune-decoder folder that does not exist",
        cli("train-vae", "--out", "{ws}/run", "--finetune-decoder", "{ws}/no-such-vae", "--steps", "1"), 1,
        "no-such-vae"),
    Row("train-vae: a --data-dir without images", cli("train-vae", "--out", "{ws}/run", "--data-dir",
                                                      "{ws}/empty-folder", "--steps", "1"), 1, "empty-folder"),
    Row("demo: --out is a file", cli("demo", "--out", "{ws}/a-file"), 1, "a-file"),
    Row("demo: --out holds a user's files", cli("demo", "--out", "{ws}/user-folder"), 1, "did not write"),
    Row("workbook build: --out exists", cli("workbook", "build", "--out", "{ws}/user-folder", "--tasks", "ch01"), 1,
        "--force"),
    Row("grade: a workbook that does not exist", cli("grade", "--impl", "{ws}/no-such-workbook"), 1,
        "no-such-workbook"),
]


# ------------------------------------------------------------------------------------ the Python API refuses

def shipped() -> LatentDiffusion:
    if not hasattr(shipped, "pipe"):
        shipped.pipe = load_pipeline("shapes64", device="cpu")
    return shipped.pipe


def image(ws: Path) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64) * 2 - 1


def with_nan(ws: Path) -> torch.Tensor:
    x = image(ws)
    x[0, 0, 0, 0] = float("nan")
    return x


def tiny_unet() -> UNet:
    return UNet(UNetConfig(block_out_channels=(8, 16), attention_levels=(False, True), layers_per_block=1, heads=2,
                           context_dim=8, norm_num_groups=4))


def model_folder(ws: Path, edit: Callable[[dict], None]) -> Path:
    """A saved tiny U-Net folder whose config.json `edit` then spoils."""
    folder = ws / "unet-folder"
    save_model(folder, tiny_unet(), tiny_unet().config)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def pipeline_with_vae_reference(ws: Path, reference: str) -> Path:
    """A copy of the shipped pipeline folder whose pipeline.json points its VAE somewhere else."""
    folder = ws / "pipes" / "pipe"
    shutil.copytree(PIPELINES["shapes64"], folder)
    meta = json.loads((folder / "pipeline.json").read_text())
    meta["vae"] = reference
    (folder / "pipeline.json").write_text(json.dumps(meta))
    return folder


def invalid_json_folder(ws: Path) -> Path:
    folder = ws / "broken-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{\n  "in_channels": 4,\n  "out_channels": 4,,\n}\n')
    return folder


def pickle_with_code(ws: Path) -> Path:
    class Runs:                                                           # unpickling this would call print
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    path = ws / "evil.ckpt"
    torch.save({"weight": Runs()}, path)
    return path


def bool_weights(ws: Path) -> dict:
    state = {k: v.clone() for k, v in tiny_unet().state_dict().items()}
    state["conv_in.weight"] = state["conv_in.weight"] > 0
    return state


def save_over(ws: Path, folder: str) -> None:
    save_model(ws / folder, tiny_unet(), tiny_unet().config)


API_ROWS = [
    Row("text_to_image(None)", lambda ws: shipped().text_to_image(None), TypeError, "prompt"),
    Row("text_to_image(5)", lambda ws: shipped().text_to_image(5), TypeError, "int"),
    Row("text_to_image with a non-string in the list", lambda ws: shipped().text_to_image(["a red circle", 3]),
        TypeError, "str"),
    Row("text_to_image([])", lambda ws: shipped().text_to_image([]), ValueError, "empty"),
    Row("text_to_image with an unknown word", lambda ws: shipped().text_to_image("a purple elephant"), ValueError,
        "elephant"),
    Row("text_to_image at a size the VAE cannot divide by 8",
        lambda ws: shipped().text_to_image("a red circle", height=60), ValueError, "60"),
    Row("text_to_image with a fractional size", lambda ws: shipped().text_to_image("a red circle", height=64.0),
        TypeError, "whole"),
    Row("text_to_image with 0 steps", lambda ws: shipped().text_to_image("a red circle", steps=0), ValueError,
        "steps"),
    Row("text_to_image with an unknown sampler",
        lambda ws: shipped().text_to_image("a red circle", sampler_name="warp"), ValueError, "warp"),
    Row("generate's settings by position", lambda ws: shipped().generate("a red circle", 64, 64, 7.5), TypeError,
        "positional"),
    Row("image_to_image with a numpy array",
        lambda ws: shipped().image_to_image(np.zeros((3, 64, 64)), "a red circle"), TypeError, "ndarray"),
    Row("image_to_image with uint8 pixels",
        lambda ws: shipped().image_to_image(torch.zeros(3, 64, 64, dtype=torch.uint8), "a red circle"), TypeError,
        "uint8"),
    Row("image_to_image with NaN", lambda ws: shipped().image_to_image(with_nan(ws), "a red circle"), ValueError,
        "NaN"),
    Row("image_to_image with values past [-1, 1]",
        lambda ws: shipped().image_to_image(image(ws) * 3, "a red circle"), ValueError, "[-1, 1]"),
    Row("image_to_image with strength 1.5",
        lambda ws: shipped().image_to_image(image(ws), "a red circle", strength=1.5), ValueError, "strength"),
    Row("inpaint with an integer mask",
        lambda ws: shipped().inpaint(image(ws), torch.ones(64, 64, dtype=torch.int64), "a red circle"), TypeError,
        "int64"),
    Row("inpaint with a mask of the wrong size",
        lambda ws: shipped().inpaint(image(ws), torch.ones(32, 32), "a red circle"), ValueError, "32"),
    Row("inpaint with a grey mask",
        lambda ws: shipped().inpaint(image(ws), torch.full((64, 64), 0.5), "a red circle"), ValueError, "0"),
    Row("a sampler option that does not exist",
        lambda ws: make_sampler("ddim", NoiseSchedule(), 10, etaa=0.5), ValueError, "etaa"),
    Row("a sampler that does not exist", lambda ws: make_sampler("warp", NoiseSchedule(), 10), ValueError, "warp"),
    Row("an unknown prediction type in the schedule", lambda ws: NoiseSchedule(prediction_type="eps"), ValueError,
        "eps"),
    Row("an unknown prediction type in the training config", lambda ws: LDMTrainConfig(prediction_type="eps"),
        ValueError, "eps"),
    Row("a config.json without a field", lambda ws: UNet.from_folder(model_folder(ws, lambda c: c.pop("heads"))),
        ValueError, "heads"),
    Row("a config.json with a field we do not know",
        lambda ws: UNet.from_folder(model_folder(ws, lambda c: c.update(wings=2))), ValueError, "wings"),
    Row("a config.json that is not JSON", lambda ws: read_config(invalid_json_folder(ws)), ValueError, "line 3"),
    Row("a config dict without a field", lambda ws: config_from_dict(UNetConfig, {"in_channels": 4}, "my.json"),
        ValueError, "my.json"),
    Row("weights of the wrong dtype", lambda ws: load_strict(tiny_unet(), bool_weights(ws), "bool.safetensors"),
        ValueError, "conv_in.weight"),
    Row("weights of the wrong shape", lambda ws: load_strict(tiny_unet(), UNet(UNetConfig(
        block_out_channels=(16, 16), attention_levels=(False, True), layers_per_block=1, heads=2, context_dim=8,
        norm_num_groups=4)).state_dict(), "wide.safetensors"), ValueError, "shape"),
    Row("a corrupt safetensors file", lambda ws: load_state_dict(ws / "corrupt.safetensors"), ValueError,
        "corrupt.safetensors"),
    Row("a pickle that runs code", lambda ws: load_state_dict(pickle_with_code(ws)), ValueError, "evil.ckpt"),
    Row("a weights file of an unknown format", lambda ws: load_state_dict(ws / "mine.txt"), ValueError, ".txt"),
    Row("swap_decoder with a corrupt file",
        lambda ws: swap_decoder(AutoencoderKL(AutoencoderConfig.shapes64()), ws / "corrupt.safetensors"), ValueError,
        "corrupt.safetensors"),
    Row("swap_decoder with a pickle", lambda ws: swap_decoder(AutoencoderKL(AutoencoderConfig.shapes64()),
                                                             ws / "weights.ckpt"), ValueError, "weights.ckpt"),
    Row("resuming a run whose checkpoint file is corrupt", lambda ws: resume_spoiled_vae_run(ws, "corrupt"),
        ValueError, "optimizer.safetensors"),
    Row("resuming a run whose checkpoint holds a pickle", lambda ws: resume_spoiled_vae_run(ws, "pickle"),
        ValueError, "model.safetensors"),
    Row("a pipeline.json whose VAE climbs out of its parent",
        lambda ws: LatentDiffusion.from_folder(pipeline_with_vae_reference(ws, "../../user-folder")), ValueError,
        "user-folder"),
    Row("a pipeline.json whose VAE is an absolute path",
        lambda ws: LatentDiffusion.from_folder(pipeline_with_vae_reference(ws, str(VAES["shapes64"]))), ValueError,
        "vae"),
    Row("saving a model over a user's folder", lambda ws: save_over(ws, "user-folder"), FileExistsError,
        "user-folder"),
    Row("saving a model over a file", lambda ws: save_over(ws, "a-file"), FileExistsError, "a-file"),
    Row("attention with mismatched head sizes",
        lambda ws: attention(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 4, 8)), ValueError,
        "8"),
    Row("attention with an unknown backend",
        lambda ws: attention(*(torch.zeros(1, 2, 4, 8),) * 3, backend="fast"), ValueError, "fast"),
    Row("a U-Net latent with no positions", lambda ws: tiny_unet()(torch.zeros(1, 4, 0, 7), 10, torch.zeros(1, 3, 8)),
        ValueError, "0x7"),
    Row("a U-Net timestep past T", lambda ws: tiny_unet()(torch.zeros(1, 4, 8, 8), 1000, torch.zeros(1, 3, 8)),
        ValueError, "1000"),
    Row("a U-Net context of the wrong width",
        lambda ws: tiny_unet()(torch.zeros(1, 4, 8, 8), 10, torch.zeros(1, 3, 5)), ValueError, "context"),
    Row("an image size the VAE cannot divide", lambda ws: latent_shape(500, 512), ValueError, "500x512"),
    Row("VAE channels that do not split into groups",
        lambda ws: AutoencoderConfig(block_out_channels=(30, 60), norm_num_groups=8), ValueError, "norm_num_groups"),
    Row("a VAE given the wrong channels",
        lambda ws: AutoencoderKL(AutoencoderConfig.shapes64()).encode(torch.zeros(1, 1, 64, 64)), ValueError, "3"),
    Row("a vocab.json that is not JSON", lambda ws: Tokenizer.from_folder(vocab_folder(ws)), ValueError, "line"),
    Row("a shipped pipeline that does not exist", lambda ws: load_pipeline("shapes1024"), ValueError, "shapes1024"),
    Row("q_sample at a timestep past T",
        lambda ws: NoiseSchedule().q_sample(torch.zeros(1, 4, 8, 8), torch.tensor([1000]), torch.zeros(1, 4, 8, 8)),
        ValueError, "1000"),
]


def vocab_folder(ws: Path) -> Path:
    folder = ws / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text('{"<pad>": 0,\n "red" 1}\n')
    return folder


ROWS = PARSE_ROWS + FAIL_ROWS + API_ROWS


def without_load_progress(err: str) -> str:
    """stderr less what loading a pipeline shows before a problem can be found in what it read: a bar over a file's
    bytes, or the one line a .ckpt gets instead (checkpoint.load_state_dict(progress=True))."""
    return "\n".join(line for line in err.split("\n") if "B/s]" not in line and "no progress to show" not in line)


def test_the_table_is_at_least_sixty_rows_and_names_are_unique():
    assert len(ROWS) >= 60
    assert len({row.name for row in ROWS}) == len(ROWS)


@needs_shipped
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_gets_one_clear_line_and_no_file_changes(row: Row, tmp_path, capsys, monkeypatch):
    workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    if isinstance(row.expect, int):
        code = main(row.call(tmp_path))
        err = without_load_progress(capsys.readouterr().err)
        assert code == row.expect, f"exit code {code}, expected {row.expect}; stderr:\n{err}"
        assert err.count("\n") == 1 and " error: " in err, f"not one error line:\n{err}"
        assert "Traceback" not in err
        assert row.expect != 2 or "--help" in err, "argparse's refusal should point to --help"
        message = err
    else:
        with pytest.raises(row.expect) as caught:
            row.call(tmp_path)
        message = str(caught.value)
        assert "\n" not in message.strip(), f"not one line:\n{message}"
    assert row.names in message, f"the message does not name {row.names!r}: {message}"
    after = snapshot(tmp_path)
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    assert not changed, f"pre-existing files changed or went missing: {changed}"
