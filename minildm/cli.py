"""The `minildm` command. Each subcommand is a thin layer over the package: parse, check, call, report.

A mistake costs one line on stderr, `minildm <command>: error: <what, and what to do>`, never a traceback: exit code 2
when argparse refuses the command line (every number is checked for its range as it is parsed), 1 when the command
fails (a file that cannot be read or written, a value the package refuses). MINILDM_TRACEBACK=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

DEMO_MARKER = ".minildm-demo"


# ---------------------------------------------------------------------------------- checked as they are parsed

def whole_number(low: int, high: int | None = None, note: str = "", high_text: str | None = None):
    """An argparse `type=`: a whole number in [low, high]; otherwise argparse's one-line error names the option."""
    expected = f"a whole number from {low} to {high_text or high}" if high is not None else \
        f"a whole number, {low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}{note}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}{note}, got {value}")
        return value
    return parse


def real_number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False, note: str = ""):
    """An argparse `type=`: a finite number in the interval; "(" and ")" mark an open end, as in math."""
    if high == math.inf:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}{note}, got {text!r}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):                              # NaN fails this too
            raise argparse.ArgumentTypeError(f"expected {expected}{note}, got {text}")
        return value
    return parse


def whole_numbers(low: int, high: int | None, example: str):
    """An argparse `type=`: comma-separated whole numbers in [low, high], e.g. channels "32,64". The text is returned
    (in a clean spelling) for the commands to read; it is only checked here."""
    each = f"from {low} to {high}" if high is not None else f"each {low} or more"
    expected = f"comma-separated whole numbers {each}, like {example}"

    def parse(text: str) -> str:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if any(value < low or (high is not None and value > high) for value in values):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return ",".join(str(value) for value in values)
    return parse


def image_side(text: str) -> int:
    """An argparse `type=`: an image side in pixels, a multiple of 8 from 8 to 8192 (SD's VAE divides it by 8; the
    pipeline checks its own rule, which may ask for more, when it runs)."""
    value = whole_number(8, 8192, " (pixels, a multiple of 8)")(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 from 8 to 8192 (pixels; the VAE divides a side "
                                         f"by 8), got {value}; try {max(8, value - value % 8)} or "
                                         f"{value - value % 8 + 8}")
    return value


DTYPES = ("float32", "float16", "bfloat16")                     # --dtype; the torch dtypes of the same names
PREDICTIONS = ("epsilon", "v_prediction")                       # what a single file's U-Net predicts

POSITIVE = whole_number(1)                                      # steps, sizes, counts, intervals
NON_NEGATIVE = whole_number(0)
SEED = whole_number(0, 2**63 - 1, high_text="2**63 - 1")        # what every generator (torch, numpy) takes
THREADS = whole_number(0, note=" (0: torch's choice)")
POSITIVE_REAL = real_number(0.0, low_open=True)                 # a learning rate, a timeout
NON_NEGATIVE_REAL = real_number(0.0)                            # a guidance scale, a loss weight
FRACTION = real_number(0.0, 1.0)                                # a share, img2img's strength
EMA_DECAY = real_number(0.0, 1.0, high_open=True)               # 1 would never move
CHANNELS = whole_numbers(1, None, "32,64")                      # block_out_channels, one entry per level
LEVEL_FLAGS = whole_numbers(0, 1, "1,1 (1: the level attends)")
HEADS = whole_numbers(1, None, "4, or one count per level such as 1,4")


def add_run_options(p: argparse.ArgumentParser, out_help: str, export_help: str) -> None:
    """The options every training command shares: where the run lives, resuming it, and exporting its result."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--stop-after", dest="stop_after", type=POSITIVE, default=None,
                   help="train at most this many steps now, save, and stop (continue later with --resume)")
    p.add_argument("--export", default=None, help=export_help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:N or mps")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=THREADS, default=1,
                   help="torch CPU threads (default 1: these models are small, and on a busy CPU more threads wait for "
                        "each other; 0: torch's choice)")


def prepare_output_folder(out: Path) -> None:
    """The demo writes only into a folder that is new, empty, or an earlier demo's: it never overwrites your files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise FileExistsError(f"--out {out} already holds files that minildm did not write; choose a new or empty "
                              "folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `minildm demo`; safe to delete\n")


def set_threads(threads: int) -> None:
    """--threads (checked >= 0 when parsed): 0 leaves torch's choice."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def check_export_target(export: str | None, kind: str) -> None:
    """--export is checked before training starts: a folder that cannot take the result (a user's own folder, a
    file) fails now, not after the run. The export itself checks again when it writes."""
    from minildm.saving import check_replaceable

    if export:
        check_replaceable(Path(export), kind, keep_old=True, names=set())


def cmd_demo(args) -> int:
    from minildm.demo import run_demo

    if args.pipeline and not Path(args.pipeline).is_dir():
        raise FileNotFoundError(f"--pipeline {args.pipeline}: no such folder; give a folder written by save_pipeline "
                                f"or `minildm train-ldm --export`")
    out = Path(args.out)
    prepare_output_folder(out)
    set_threads(args.threads if args.threads is not None else 0 if args.train else 1)
    start = time.time()
    written = run_demo(out, device=args.device, seed=args.seed, pipeline=args.pipeline, train=args.train)
    print(f"minildm demo: wrote {len(written)} files to {out}/ in {time.time() - start:.1f} s")
    for path, what in written:
        print(f"  {path}  {what}")
    return 0


def read_pixels(path: str, mode: str, what: str):
    """An image file -> (H, W, 3) for mode "RGB" or (H, W) for "L", float32 in [0, 1], by one stated rule:
    8-bit images / 255 (greyscale becomes grey RGB); 16-bit ones / 65535; float ones (TIFF) as they are, if every
    value is finite and in [0, 1]. Transparency is refused, since what lies under it is unknown. Never a clip."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path}: Pillow cannot read it as an image ({err}); give a PNG file") from None
    if "A" in image.getbands() or "transparency" in image.info:
        alpha = np.array(image.convert("RGBA"))[..., 3]
        if (alpha < 255).any():
            raise ValueError(f"{what} {path} has {int((alpha < 255).sum())} transparent pixels; flatten it onto a "
                             f"background first (e.g. Image.alpha_composite onto a white image), then save it as RGB")
    if image.mode.startswith("I"):                             # 16-bit PNG ("I;16") or 32-bit integers ("I")
        values = np.array(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{what} {path} holds integers {values.min():g}..{values.max():g}; give an 8-bit or "
                             f"16-bit (0..65535) image")
        pixels = values / 65535
    elif image.mode == "F":                                    # float TIFF: taken as [0, 1], checked
        pixels = np.array(image, dtype=np.float64)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"{what} {path} holds floats {np.nanmin(pixels):g}..{np.nanmax(pixels):g} (NaN or inf: "
                             f"{int((~np.isfinite(pixels)).sum())}); a float image must hold finite values in [0, 1]")
    else:
        pixels = np.array(image.convert(mode), dtype=np.float64) / 255
    if pixels.ndim == 2 and mode == "RGB":
        pixels = np.repeat(pixels[..., None], 3, axis=2)       # grey (H, W) -> (H, W, 3)
    return pixels.astype(np.float32)


def read_image(path: str):
    """An image file -> (1, 3, H, W) in [-1, 1], by read_pixels' rule."""
    import torch

    pixels = read_pixels(path, "RGB", "--init-image")                           # (H, W, 3) in [0, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2 - 1


def read_mask(path: str):
    """A black-and-white image file -> (H, W) of 0 (black: keep) and 1 (white: repaint); grey is refused."""
    import torch

    values = read_pixels(path, "L", "--mask")                                   # (H, W) in [0, 1]
    grey = values[(values != 0) & (values != 1)]
    if grey.size:
        raise ValueError(f"--mask {path} must be pure black (keep) and white (repaint), but {grey.size} pixels are "
                         f"grey (e.g. {grey[0]:.3g} of 1); threshold it, e.g. image.point(lambda v: 255 * (v > 127))")
    return torch.from_numpy(values)


def default_side(path: str | None, pipe, prediction: str | None) -> int:
    """The image side a pipeline was trained at, when --height/--width are not given: our pipeline folder's
    training.json (Shapes: 64); a diffusers folder's unet/config.json sample_size times the VAE's factor (diffusers'
    own rule: 64 x 8 = 512 for SD); a single file says nothing, so SD's: 512, or 768 for SD 2's v-prediction models."""
    from minildm.demo import IMAGE_SIZE
    from minildm.pipeline import PIPELINE_NAME

    if path is None or (Path(path).is_dir() and (Path(path) / PIPELINE_NAME).is_file()):
        try:
            record = json.loads((Path(path) / "training.json").read_text()) if path else {}
            side = record.get("train_config", {}).get("image_size", IMAGE_SIZE)
        except (OSError, ValueError, AttributeError):
            side = IMAGE_SIZE
        return side if isinstance(side, int) and side > 0 else IMAGE_SIZE
    if Path(path).is_dir():
        try:
            side = json.loads((Path(path) / "unet" / "config.json").read_text()).get("sample_size")
        except (OSError, ValueError, AttributeError):
            side = None
        if isinstance(side, int) and side > 0:
            return side * pipe.vae.config.downsampling_factor
        return 512
    return 768 if prediction == "v_prediction" else 512


class StepClock:
    """The sampler's callback: a tqdm bar over the model evaluations, made at the first one (so an error before
    sampling stays one line), and the time between evaluations, for the seconds per step printed at the end."""

    def __init__(self, total: int | None):
        self.total, self.bar, self.gaps = total, None, []
        self.last, self.index = time.perf_counter(), None

    def __call__(self, step) -> None:
        import torch
        from tqdm import tqdm

        device = step.output.device                          # a GPU runs ahead of Python: wait for the step's end
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()
        now = time.perf_counter()
        # between two evaluations of one column: one step alone. A column's first evaluation (its index does not
        # follow the last one) also holds the prompts' encoding and the previous column's VAE decode: not counted
        # unless no other step was timed
        self.gaps.append((now - self.last, self.index is not None and step.index > self.index))
        self.last, self.index = now, step.index
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="sampling", unit="step", dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def seconds_per_step(self) -> float | None:
        steps = [gap for gap, pure in self.gaps if pure] or [gap for gap, _ in self.gaps]
        return sum(steps) / len(steps) if steps else None


def evaluations(pipe, sampler_name: str | None, steps: int | None, strength: float, img2img: bool) -> int | None:
    """How many model evaluations one column makes (the progress bar's length), or None if the sampler refuses."""
    from minildm.samplers import make_sampler

    try:
        sampler = make_sampler(sampler_name or pipe.sampler_name, pipe.schedule, steps or pipe.steps)
        start = sampler.start_index(strength) if img2img and strength < 1 else 0
        return max(len(sampler.timesteps) - start, 0)
    except (ValueError, TypeError):
        return None                                         # the pipeline says why, in one line, when it runs


def cmd_sample(args) -> int:
    import torch

    from minildm.demo import sample_rows
    from minildm.pipeline import LatentDiffusion
    from minildm.pretrained import load_pipeline
    from minildm.viz import image_grid

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the grid is written as a PNG; give a file name ending in .png")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name ending in .png")
    if out.exists() and not args.force:
        raise FileExistsError(f"--out {out} already exists; choose another name, or pass --force to replace it")
    folder = next(parent for parent in out.absolute().parents if parent.exists())   # checked now, not after sampling
    if not folder.is_dir():
        raise NotADirectoryError(f"--out {out}: {folder} is a file, where a folder should be; choose another path")
    if args.num < 1:
        raise ValueError(f"--num must be at least 1 (images per prompt), got {args.num}")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image: the image whose white-masked part is repainted")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength needs --init-image: it says how far to move away from that image (0 to 1)")
    if args.vae and not Path(args.vae).exists():
        raise FileNotFoundError(f"--vae {args.vae}: no such file; give an SD VAE file (.safetensors or .ckpt), a "
                                f"diffusers vae/ folder or a decoder.safetensors")
    single_file = args.pipeline is not None and Path(args.pipeline).is_file()
    if args.prediction and not single_file:
        raise ValueError("--prediction is for a single .safetensors/.ckpt file, which does not say what its U-Net "
                         "predicts; a folder's scheduler config says it: leave --prediction out")
    image = read_image(args.init_image) if args.init_image else None          # its size is the pipeline's to check
    mask = read_mask(args.mask) if args.mask else None
    if mask is not None and tuple(mask.shape) != tuple(image.shape[2:]):
        raise ValueError(f"--mask {args.mask} is {mask.shape[1]}x{mask.shape[0]} but --init-image {args.init_image} is "
                         f"{image.shape[3]}x{image.shape[2]}; give them the same size")
    if image is not None and (args.height or image.shape[2], args.width or image.shape[3]) != tuple(image.shape[2:]):
        raise ValueError(f"--height/--width {args.height or image.shape[2]}x{args.width or image.shape[3]} (height x "
                         f"width) but --init-image {args.init_image} is {image.shape[2]}x{image.shape[3]}: an edit "
                         f"keeps the image's size; leave --height/--width out, or resize the image")
    strength = args.strength if args.strength is not None else (1.0 if mask is not None else 0.6)
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    start = time.time()
    if args.pipeline is None:
        pipe = load_pipeline("shapes64", args.device, dtype)
    else:
        path = Path(args.pipeline)
        if path.is_file() and path.suffix in (".safetensors", ".ckpt"):         # a 4 GB file takes a while
            print(f"minildm sample: loading {path} ({path.stat().st_size / 1e9:.2f} GB) ...", flush=True)
        options = {"prediction_type": args.prediction} if args.prediction else {}
        pipe = LatentDiffusion.from_pretrained(path, device=args.device, dtype=dtype, progress=True, **options)
        print(f"minildm sample: loaded {pipe!r}", flush=True)                # each part's dtype, device
    if args.vae:
        pipe.swap_vae(args.vae)
    loaded = time.time() - start
    side = default_side(args.pipeline, pipe, args.prediction)
    height, width = args.height or side, args.width or side
    per_column = evaluations(pipe, args.sampler, args.steps, strength, image is not None)
    clock = StepClock(per_column * args.num if per_column is not None else None)
    options = dict(guidance_scale=args.guidance, sampler_name=args.sampler, steps=args.steps,
                   negative_prompt=args.negative_prompt, callback=clock)
    try:
        rows = sample_rows(pipe, args.prompt, args.num, args.seed, image, mask, strength, height=height,
                           width=width, **options)                                # (P, num, 3, H, W)
    finally:
        clock.close()
    grid = image_grid(rows.flatten(0, 1), nrow=args.num)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb" if args.force else "xb") as f:      # "xb": never replace a file that appeared meanwhile
        grid.save(f, format="PNG")
    task = "inpainting" if mask is not None else "img2img" if image is not None else "text-to-image"
    per_step = clock.seconds_per_step()
    timing = f"{per_step:.3f} s per step (one model evaluation, guidance included)" if per_step is not None \
        else "no sampler step"
    print(f"minildm sample: wrote {out} ({task}, {rows.shape[-2]}x{rows.shape[-1]} (height x width); rows: "
          f"{len(args.prompt)} prompt(s), columns: seeds {args.seed}..{args.seed + args.num - 1}) in "
          f"{time.time() - start:.1f} s (loading {loaded:.1f} s; {timing}, {len(clock.gaps)} in all)")
    return 0


def train_config_from_args(args):
    from minildm.train_vae import VAETrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(VAETrainConfig) if getattr(args, f.name, None) is not None}
    return VAETrainConfig(**values)


def cmd_train_vae(args) -> int:
    import torch

    from minildm.autoencoder import AutoencoderConfig
    from minildm.train_vae import VAETrainer, export_model

    set_threads(args.threads)
    check_export_target(args.export, "model")
    cfg = train_config_from_args(args)
    model_config = None
    if args.channels:
        model_config = AutoencoderConfig(block_out_channels=tuple(int(c) for c in args.channels.split(",")),
                                         layers_per_block=args.layers_per_block, norm_num_groups=args.norm_num_groups,
                                         scale_factor=1.0)
    start = time.time()
    trainer = VAETrainer(cfg, args.out, model_config, resume=args.resume, device=args.device)
    summary = trainer.run(stop_after=args.stop_after)
    summary["wall_seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary, indent=2))
    if args.export and not summary.get("stopped_early"):
        notes = {"command": "minildm " + " ".join(args.argv), "seed": cfg.seed, "data_seed": cfg.data_seed,
                 "torch_threads": torch.get_num_threads(), **summary}
        export_model(args.out, args.export, notes, half=args.export_half)
        print(f"exported the model to {args.export}")
    return 0


def cmd_train_ldm(args) -> int:
    import torch

    from minildm.ldm_export import export_pipeline
    from minildm.ldm_recipe import LDMTrainConfig, model_configs
    from minildm.train_ldm import LDMTrainer

    set_threads(args.threads)
    check_export_target(args.export, "pipeline")
    values = {f.name: getattr(args, f.name) for f in fields(LDMTrainConfig) if getattr(args, f.name, None) is not None}
    cfg = LDMTrainConfig(**values)
    models = model_configs(cfg.space, channels=args.channels, attention=args.attention, heads=args.heads,
                           layers_per_block=args.layers_per_block, text_dim=args.text_dim, text_depth=args.text_depth,
                           norm_num_groups=args.norm_num_groups, attention_up=args.attention_up)
    start = time.time()
    trainer = LDMTrainer(cfg, args.out, models, resume=args.resume, device=args.device)
    summary = trainer.run(stop_after=args.stop_after)
    summary["wall_seconds"] = round(time.time() - start, 1)
    if trainer.rank != 0:
        return 0
    print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        print(f"stopped by Ctrl-C at step {summary['steps']}; continue with the same command and --resume")
    if args.export and not summary.get("stopped_early"):
        notes = {"command": "minildm " + " ".join(args.argv), "seed": cfg.seed, "data_seed": cfg.data_seed,
                 "torch_threads": torch.get_num_threads(), **summary}
        export_pipeline(args.out, args.export, notes, guidance_scale=args.export_guidance, steps=args.export_steps)
        print(f"exported the pipeline to {args.export}")
    return 0


def cmd_workbook_build(args) -> int:
    from minildm.grading.workbook import build_workbook

    built = build_workbook(args.out, args.tasks or None, force=args.force)
    if built.moved_aside:
        print(f"kept the existing {args.out} as {built.moved_aside}")
    print(f"minildm workbook: {len(built.tasks)} task(s) stubbed in {built.out}/ (read WORKBOOK.md there)")
    for task in built.tasks:
        print(f"  {task.id:<22} {task.title}")
    return 0


def cmd_grade(args) -> int:
    from minildm.grading.grader import check_report_path, grade, write_report

    report_path = Path(args.report)
    check_report_path(report_path)
    report = grade(args.impl, args.tasks or None, args.extra_tests, args.use_reference_for, timeout=args.timeout)
    print(report.table())
    write_report(report, report_path)
    print(f"wrote {report_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minildm", description="An annotated latent diffusion model you can read.",
                    epilog="A failing command prints one line; MINILDM_TRACEBACK=1 shows the traceback.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo_help = ("write the chapters' figures to --out from the shipped weights (about a minute on a laptop CPU): the "
                 "VAE's compression, reconstructions, latents and interpolation; samples, reverse diffusion (PNG + "
                 "GIF), a guidance sweep, img2img, inpainting and a VAE decoder swap")
    demo = sub.add_parser("demo", help=demo_help, description=demo_help)
    demo.add_argument("--out", default="minildm-demo", help="folder for the figures (default: ./minildm-demo)")
    demo.add_argument("--seed", type=SEED, default=0)
    source = demo.add_mutually_exclusive_group()           # --train makes its own pipeline (in OUT/pipeline)
    source.add_argument("--pipeline", metavar="FOLDER", default=None,
                        help="draw the sampling figures with this pipeline folder instead of the shipped one")
    source.add_argument("--train", action="store_true",
                        help="do it all from scratch (SLOW: over 20 minutes on a 2-core CPU; it prints its estimate "
                             "and shows an ETA): train the VAE into OUT/vae-run (exported to OUT/vae), then the "
                             "diffusion model on its latents into OUT/train-run (exported to OUT/pipeline), and draw "
                             "with them; run it again to continue an interrupted run")
    demo.add_argument("--threads", type=THREADS, default=None,
                      help="torch CPU threads (default 1 for the figures alone; with --train torch's choice, since "
                           "training is 1.6x faster on 2 threads than on 1; 0: torch's choice)")
    add_device(demo)
    demo.set_defaults(func=cmd_demo)

    sample_help = ("draw images for prompts (or edit an image: --init-image, --mask) into one grid PNG: one row per "
                   "prompt, one column per seed")
    sa = sub.add_parser("sample", help=sample_help, description=sample_help)
    sa.add_argument("--prompt", action="append", required=True,
                    help='e.g. "a large red circle in the centre"; repeat for more rows')
    sa.add_argument("--out", required=True, help="the grid PNG to write (never replaced unless --force)")
    sa.add_argument("--force", action="store_true", help="replace --out if it exists")
    sa.add_argument("--seed", type=SEED, default=0, help="the first column's seed; column j uses seed + j (default 0)")
    sa.add_argument("--num", type=POSITIVE, default=4, help="images per prompt (default 4)")
    sa.add_argument("--guidance", type=NON_NEGATIVE_REAL, default=None,
                    help="classifier-free guidance scale w (0: ignore the prompt, 1: no guidance; default: the "
                         "pipeline's, 7.5)")
    sa.add_argument("--sampler", default=None, help="ddpm, ddim, plms, euler, euler_a, heun or dpmpp_2m "
                                                    "(default: the pipeline's, ddim)")
    sa.add_argument("--steps", type=POSITIVE, default=None, help="sampler steps (default: the pipeline's, 50)")
    sa.add_argument("--pipeline", metavar="PATH", default=None,
                    help="our pipeline folder, a diffusers Stable Diffusion folder (model_index.json) or a CompVis "
                         "single .safetensors/.ckpt file (default: the shipped Shapes pipeline)")
    sa.add_argument("--height", type=image_side, default=None,
                    help="image height in pixels, a multiple of 8 (default: the pipeline's training size: 64 for "
                         "Shapes; a diffusers folder's unet sample_size x 8, 512 for SD; a single file: 512, 768 "
                         "with --prediction v_prediction)")
    sa.add_argument("--width", type=image_side, default=None, help="image width in pixels (default: as --height)")
    sa.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT", default=None,
                    help='what guidance steers away from, for every row (default: the empty prompt), e.g. "blurry"')
    sa.add_argument("--dtype", choices=DTYPES, default=None,
                    help="the weights' and activations' dtype (default: float16 on CUDA and MPS, float32 on the "
                         "CPU); in float16 the VAE stays float32, since SD's decoder overflows float16")
    sa.add_argument("--vae", metavar="FILE", default=None,
                    help="swap in the VAE weights of this file: an SD VAE file (full or decoder-only, .safetensors "
                         "or .ckpt), a diffusers vae/ folder, or our decoder.safetensors")
    sa.add_argument("--prediction", choices=PREDICTIONS, default=None,
                    help="for a single file only: what its U-Net predicts (default epsilon: SD 1.x and SD 2.x base; "
                         "SD 2.x 768 models are v_prediction)")
    sa.add_argument("--init-image", dest="init_image", metavar="IMG",
                    help="img2img: start from this image instead of pure noise (the shipped model learnt 64x64); "
                         "read as 8-bit / 255, 16-bit / 65535, float TIFF only if in [0, 1]; transparency is refused "
                         "(flatten it first)")
    sa.add_argument("--strength", type=FRACTION, default=None,
                    help="with --init-image: 0 keeps the image, 1 ignores it (default 0.6; 1.0 with --mask)")
    sa.add_argument("--mask", metavar="MASK", help="inpainting: a black-and-white image of --init-image's size, white "
                                                   "= repaint (no grey, no transparency)")
    add_threads(sa)
    add_device(sa)
    sa.set_defaults(func=cmd_sample)

    tv = sub.add_parser("train-vae", help="train the VAE on Shapes (or --data-dir), or fine-tune a decoder")
    add_run_options(tv, "training folder (checkpoints); must be new unless --resume",
                    "also write just the final model (+ training record) here")
    tv.add_argument("--export-half", dest="export_half", action="store_true",
                    help="store the exported weights in float16 (half the size)")
    tv.add_argument("--steps", type=POSITIVE)
    tv.add_argument("--batch-size", dest="batch_size", type=POSITIVE)
    tv.add_argument("--lr", type=POSITIVE_REAL)
    tv.add_argument("--kl-weight", dest="kl_weight", type=NON_NEGATIVE_REAL)
    tv.add_argument("--recon-loss", dest="recon_loss", choices=["l1", "mse", "l1+mse"])
    tv.add_argument("--scale-equivariance", dest="scale_equivariance", type=NON_NEGATIVE_REAL,
                    help="weight of a loss asking the decoder to turn 2x-pooled latents into 2x-pooled images "
                         "(Skorokhodov et al. 2025; default 0: off)")
    tv.add_argument("--gan", action="store_true", default=None, help="add the PatchGAN hinge loss (CompVis recipe)")
    tv.add_argument("--disc-start", dest="disc_start", type=NON_NEGATIVE)
    tv.add_argument("--disc-weight", dest="disc_weight", type=NON_NEGATIVE_REAL)
    tv.add_argument("--seed", type=SEED)
    tv.add_argument("--data-seed", dest="data_seed", type=SEED)
    tv.add_argument("--num-images", dest="num_train_images", type=POSITIVE)
    tv.add_argument("--image-size", dest="image_size", type=POSITIVE)
    tv.add_argument("--data-dir", dest="data_dir", help="train on a folder of your own images instead of Shapes")
    tv.add_argument("--save-every", dest="save_every", type=POSITIVE)
    tv.add_argument("--finetune-decoder", dest="finetune_decoder", metavar="VAE_FOLDER",
                    help="freeze this VAE's encoder, train its decoder, write decoder.safetensors (a VAE file)")
    tv.add_argument("--channels", type=CHANNELS,
                    help="block_out_channels, e.g. 32,64,128,128 (default: the shapes64 VAE, 16,32,64,64)")
    tv.add_argument("--layers-per-block", dest="layers_per_block", type=POSITIVE, default=1)
    tv.add_argument("--norm-groups", dest="norm_num_groups", type=POSITIVE, default=8)
    tv.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (default: torch's choice)")
    add_device(tv)
    tv.set_defaults(func=cmd_train_vae)

    tl = sub.add_parser("train-ldm", help="train the latent diffusion model (U-Net + text encoder) on Shapes latents")
    add_run_options(tl, "training folder (checkpoint, latent cache, sample grids); must be new unless --resume",
                    "also write the pipeline (EMA weights + training record) here")
    tl.add_argument("--export-guidance", dest="export_guidance", type=NON_NEGATIVE_REAL, default=7.5,
                    help="the exported pipeline's default guidance scale (default 7.5)")
    tl.add_argument("--export-steps", dest="export_steps", type=POSITIVE, default=50,
                    help="the exported pipeline's default number of DDIM steps (default 50)")
    tl.add_argument("--steps", type=POSITIVE)
    tl.add_argument("--batch-size", dest="batch_size", type=POSITIVE, help="images per step on each process")
    tl.add_argument("--lr", type=POSITIVE_REAL)
    tl.add_argument("--warmup-steps", dest="warmup_steps", type=NON_NEGATIVE)
    tl.add_argument("--prediction", dest="prediction_type", choices=["epsilon", "sample", "v_prediction"],
                    help="what the U-Net predicts: eps (default), z_0 or v")
    tl.add_argument("--t-sampling", dest="t_sampling", choices=["uniform", "min_snr", "min_snr_eps", "lognormal"],
                    help="how often each timestep is drawn: uniform, min_snr (default; Hang et al. 2023's weighting "
                         "as a distribution), min_snr_eps (its draws for an eps model, whatever --prediction) or "
                         "lognormal (EDM's noise levels)")
    tl.add_argument("--min-snr-gamma", dest="min_snr_gamma", type=POSITIVE_REAL,
                    help="min_snr's gamma (default 5, Hang et al.'s); lower draws the noisier timesteps more often")
    tl.add_argument("--zero-terminal-snr", dest="zero_terminal_snr", action="store_true", default=None,
                    help="rescale the noise schedule so its last step is pure noise, and sample from that step "
                         "(Lin et al. 2024; needs --prediction v_prediction or sample)")
    tl.add_argument("--compile", action="store_true", default=None,
                    help="torch.compile the denoiser (inductor; the first steps wait for the compiler)")
    tl.add_argument("--caption-dropout", dest="caption_dropout", type=FRACTION,
                    help="share of captions replaced by the empty prompt, for guidance (default 0.1)")
    tl.add_argument("--ema-decay", dest="ema_decay", type=EMA_DECAY)
    tl.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype (auto: bf16 or fp16 on CUDA, fp32 on CPU and MPS)")
    tl.add_argument("--space", choices=["latent", "pixel"], help="diffuse VAE latents (default) or raw pixels")
    tl.add_argument("--vae", help="a shipped VAE name or a VAE folder (default shapes64)")
    tl.add_argument("--seed", type=SEED)
    tl.add_argument("--data-seed", dest="data_seed", type=SEED)
    tl.add_argument("--num-images", dest="num_train_images", type=POSITIVE)
    tl.add_argument("--save-every", dest="save_every", type=POSITIVE)
    tl.add_argument("--sample-every", dest="sample_every", type=NON_NEGATIVE,
                    help="write a sample grid every N steps (0: never)")
    tl.add_argument("--log-every", dest="log_every", type=POSITIVE,
                    help="record the mean loss every N steps (default 25)")
    tl.add_argument("--channels", type=CHANNELS,
                    help="U-Net block_out_channels (default 24,48; the shipped model: 32,64)")
    tl.add_argument("--attention", type=LEVEL_FLAGS,
                    help="which levels attend, e.g. 1,1 (default: the deepest only, 0,1; the shipped model: 1,1)")
    tl.add_argument("--attention-up", dest="attention_up", type=LEVEL_FLAGS,
                    help="which levels attend on the way up, if not those of --attention: --attention 1,1 "
                         "--attention-up 0,1 attends at 8x8 on the way down only")
    tl.add_argument("--heads", type=HEADS, default="4",
                    help="attention heads: one count for every level and the text encoder (default 4), or one per "
                         "level, finest first (1,4: one head at 8x8; the text encoder takes the last)")
    tl.add_argument("--layers-per-block", dest="layers_per_block", type=POSITIVE, default=1)
    tl.add_argument("--norm-groups", dest="norm_num_groups", type=POSITIVE, default=8)
    tl.add_argument("--text-dim", dest="text_dim", type=POSITIVE, default=64,
                    help="text encoder width = U-Net context_dim")
    tl.add_argument("--text-depth", dest="text_depth", type=POSITIVE, default=2)
    tl.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (default: torch's choice)")
    add_device(tl)
    tl.set_defaults(func=cmd_train_ldm)

    wb = sub.add_parser("workbook", help="classroom: build a student workbook with chosen solutions taken out")
    wb_sub = wb.add_subparsers(dest="workbook_command", required=True)
    build = wb_sub.add_parser("build", help="write a student copy of the package, tests, chapters and notebooks")
    build.add_argument("--out", required=True, help="the workbook folder to create")
    build.add_argument("--tasks", nargs="+", metavar="TASK",
                       help="task ids, chapters or globs: ch02.gaussian_kl, ch02, 'ch02.*' (default: all tasks)")
    build.add_argument("--force", action="store_true",
                       help="build even if --out exists (the existing folder is kept, renamed to OUT.old-N)")
    build.set_defaults(func=cmd_workbook_build)

    gr = sub.add_parser("grade", help="classroom: run the task tests on a workbook and print points and hints")
    gr.add_argument("tasks", nargs="*", metavar="TASK",
                    help="chapters (ch02), task ids (ch02.gaussian_kl) or globs (default: the workbook's tasks)")
    gr.add_argument("--impl", default=None,
                    help="the workbook to grade (default: the one the current folder is in, else the reference)")
    gr.add_argument("--extra-tests", dest="extra_tests", action="append", metavar="DIR",
                    help="a folder of hidden tests (with @pytest.mark.task and points); may be repeated")
    gr.add_argument("--use-reference-for", dest="use_reference_for", nargs="+", metavar="CHAPTER",
                    help="take these chapters' solutions from the reference (e.g. ch01) and grade the rest")
    gr.add_argument("--timeout", type=POSITIVE_REAL, default=60.0,
                    help="seconds one call of the student's code may run (default 60)")
    gr.add_argument("--report", default="grade.json", help="where to write the JSON report (default ./grade.json)")
    gr.set_defaults(func=cmd_grade)
    return parser


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`minildm sample: error: argument --num: ...`, exit code 2), not after
    the whole usage text; the subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {first_line(message)} (see {self.prog} --help)\n")


# What a user can cause: a file that cannot be read or written (OSError: read-only, missing, existing), a value the
# package refuses, a training run that diverged, a workbook stub not written yet. Anything else is a bug: traceback.
USER_ERRORS = (OSError, ValueError, TypeError, FloatingPointError, NotImplementedError)
WHAT_TO_DO = {errno.EACCES: "check its permissions, or choose a folder you can write to",
              errno.EPERM: "check its permissions, or choose a folder you can write to",
              errno.EROFS: "choose a folder on a disk you can write to", errno.ENOSPC: "free some disk space",
              errno.EEXIST: "a file stands where a folder should be: choose another path",
              errno.ENOTDIR: "a file stands where a folder should be: choose another path"}


def first_line(message: str) -> str:
    lines = message.strip().splitlines() or [""]
    return lines[0] + (" (the rest: run again with MINILDM_TRACEBACK=1)" if len(lines) > 1 else "")


def error_line(err: BaseException) -> str:
    """One line that says what went wrong and, for the OS's own errors, what to do."""
    message = first_line(str(err)) or type(err).__name__
    if isinstance(err, OSError) and err.errno in WHAT_TO_DO:
        message += f"; {WHAT_TO_DO[err.errno]}"
    return message


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:                             # argparse printed --help (0) or its one-line error (2)
        return exit_.code
    args.argv = argv
    command = " ".join(["minildm", args.command, *filter(None, [getattr(args, "workbook_command", None)])])
    show_traceback = os.environ.get("MINILDM_TRACEBACK", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if show_traceback:
            raise
        print(f"{command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130                                          # 128 + SIGINT, as shells report it
    except USER_ERRORS as err:
        if show_traceback:
            raise
        print(f"{command}: error: {error_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
