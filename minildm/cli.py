"""The `minildm` command. Each subcommand is a thin layer over the package: parse, check, call, report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

DEMO_MARKER = ".minildm-demo"


def add_run_options(p: argparse.ArgumentParser, out_help: str, export_help: str) -> None:
    """The options every training command shares: where the run lives, resuming it, and exporting its result."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                   help="train at most this many steps now, save, and stop (continue later with --resume)")
    p.add_argument("--export", default=None, help=export_help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:N or mps")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these models are small, and on a busy CPU more threads wait for "
                        "each other; 0: torch's choice)")


def prepare_output_folder(out: Path) -> None:
    """The demo writes only into a folder that is new, empty, or an earlier demo's: it never overwrites your files."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise SystemExit(f"error: --out {out} already holds files that minildm did not write; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `minildm demo`; safe to delete\n")


def set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        raise ValueError(f"--threads must be 0 (torch's choice) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def cmd_demo(args) -> int:
    from minildm.demo import run_demo

    if args.train and args.pipeline:
        raise ValueError("--train makes its own pipeline (in OUT/pipeline); drop --pipeline or --train")
    if args.pipeline and not Path(args.pipeline).is_dir():
        raise FileNotFoundError(f"--pipeline {args.pipeline}: no such folder; give a folder written by save_pipeline "
                                f"or `minildm train-ldm --export`")
    out = Path(args.out)
    prepare_output_folder(out)
    set_threads(args.threads)
    start = time.time()
    written = run_demo(out, device=args.device, seed=args.seed, pipeline=args.pipeline, train=args.train)
    print(f"minildm demo: wrote {len(written)} files to {out}/ in {time.time() - start:.1f} s")
    for path, what in written:
        print(f"  {path}  {what}")
    return 0


def read_pixels(path: str, size: int, mode: str, what: str):
    """An image file -> (size, size[, 3]) uint8 array in Pillow's `mode`; another size is an error, not a resize."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{what} {path}: Pillow cannot read it as an image ({err}); give a PNG file") from None
    if image.size != (size, size):
        raise ValueError(f"{what} {path} is {image.width}x{image.height} but this model draws {size}x{size} images; "
                         f"resize it to {size}x{size} first (e.g. with Pillow's Image.resize)")
    return np.array(image)                                  # a writable copy, for torch.from_numpy


def read_image(path: str, size: int):
    """An RGB image file -> (1, 3, size, size) in [-1, 1]."""
    from minildm.data import to_tensor

    return to_tensor(read_pixels(path, size, "RGB", "--init-image"))[None]


def read_mask(path: str, size: int):
    """A black-and-white image file -> (size, size) of 0 (black: keep) and 1 (white: repaint)."""
    import numpy as np
    import torch

    values = read_pixels(path, size, "L", "--mask")
    grey = values[(values != 0) & (values != 255)]
    if grey.size:
        raise ValueError(f"--mask {path} must be pure black (keep) and white (repaint), but {grey.size} pixels are "
                         f"grey (e.g. {int(grey[0])}); threshold it, e.g. image.point(lambda v: 255 * (v > 127))")
    return torch.from_numpy((values == 255).astype(np.float32))


def cmd_sample(args) -> int:
    from minildm.demo import IMAGE_SIZE, sample_rows
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
    if args.num < 1:
        raise ValueError(f"--num must be at least 1 (images per prompt), got {args.num}")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image: the image whose white-masked part is repainted")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength needs --init-image: it says how far to move away from that image (0 to 1)")
    image = read_image(args.init_image, IMAGE_SIZE) if args.init_image else None
    mask = read_mask(args.mask, IMAGE_SIZE) if args.mask else None
    strength = args.strength if args.strength is not None else (1.0 if mask is not None else 0.6)
    set_threads(args.threads)
    start = time.time()
    pipe = load_pipeline("shapes64", args.device) if args.pipeline is None else \
        LatentDiffusion.from_folder(args.pipeline, args.device)
    rows = sample_rows(pipe, args.prompt, args.num, args.seed, image, mask, strength,
                       guidance_scale=args.guidance, sampler=args.sampler, steps=args.steps)  # (P, num, 3, H, W)
    grid = image_grid(rows.flatten(0, 1), nrow=args.num)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb" if args.force else "xb") as f:      # "xb": never replace a file that appeared meanwhile
        grid.save(f, format="PNG")
    task = "inpainting" if mask is not None else "img2img" if image is not None else "text-to-image"
    print(f"minildm sample: wrote {out} ({task}; rows: {len(args.prompt)} prompt(s), columns: seeds {args.seed}.."
          f"{args.seed + args.num - 1}) in {time.time() - start:.1f} s")
    return 0


def train_config_from_args(args):
    from minildm.train_vae import VAETrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(VAETrainConfig) if getattr(args, f.name, None) is not None}
    return VAETrainConfig(**values)


def cmd_train_vae(args) -> int:
    import torch

    from minildm.autoencoder import AutoencoderConfig
    from minildm.train_vae import VAETrainer, export_model

    if args.threads:
        torch.set_num_threads(args.threads)
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

    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(LDMTrainConfig) if getattr(args, f.name, None) is not None}
    cfg = LDMTrainConfig(**values)
    models = model_configs(cfg.space, channels=args.channels, attention=args.attention, heads=args.heads,
                           layers_per_block=args.layers_per_block, text_dim=args.text_dim, text_depth=args.text_depth,
                           norm_num_groups=args.norm_num_groups)
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
    parser = argparse.ArgumentParser(prog="minildm", description="An annotated latent diffusion model you can read.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo_help = ("write the chapters' figures to --out from the shipped weights (about a minute on a laptop CPU): the "
                 "VAE's compression, reconstructions, latents and interpolation; samples, reverse diffusion (PNG + "
                 "GIF), a guidance sweep, img2img, inpainting and a VAE decoder swap")
    demo = sub.add_parser("demo", help=demo_help, description=demo_help)
    demo.add_argument("--out", default="minildm-demo", help="folder for the figures (default: ./minildm-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--pipeline", metavar="FOLDER", default=None,
                      help="draw the sampling figures with this pipeline folder instead of the shipped one")
    demo.add_argument("--train", action="store_true",
                      help="do it all from scratch: train the diffusion model first (SLOW: about 15 minutes on a "
                           "2-core CPU) into OUT/train-run, export it to OUT/pipeline and draw with it; the VAE is "
                           "not retrained (the shipped one is reused); run it again to continue an interrupted run")
    add_threads(demo)
    add_device(demo)
    demo.set_defaults(func=cmd_demo)

    sample_help = ("draw images for prompts (or edit an image: --init-image, --mask) into one grid PNG: one row per "
                   "prompt, one column per seed")
    sa = sub.add_parser("sample", help=sample_help, description=sample_help)
    sa.add_argument("--prompt", action="append", required=True,
                    help='e.g. "a large red circle in the centre"; repeat for more rows')
    sa.add_argument("--out", required=True, help="the grid PNG to write (never replaced unless --force)")
    sa.add_argument("--force", action="store_true", help="replace --out if it exists")
    sa.add_argument("--seed", type=int, default=0, help="the first column's seed; column j uses seed + j (default 0)")
    sa.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    sa.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale w (0: ignore the prompt, 1: no guidance; default: the "
                         "pipeline's, 7.5)")
    sa.add_argument("--sampler", default=None, help="ddpm, ddim, plms, euler, euler_a, heun or dpmpp_2m "
                                                    "(default: the pipeline's, ddim)")
    sa.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's, 50)")
    sa.add_argument("--pipeline", metavar="FOLDER", default=None, help="a pipeline folder (default: the shipped one)")
    sa.add_argument("--init-image", dest="init_image", metavar="IMG",
                    help="img2img: start from this 64x64 image (PNG, JPEG) instead of pure noise")
    sa.add_argument("--strength", type=float, default=None,
                    help="with --init-image: 0 keeps the image, 1 ignores it (default 0.6; 1.0 with --mask)")
    sa.add_argument("--mask", metavar="MASK", help="inpainting: a 64x64 black-and-white image, white = repaint")
    add_threads(sa)
    add_device(sa)
    sa.set_defaults(func=cmd_sample)

    tv = sub.add_parser("train-vae", help="train the VAE on Shapes (or --data-dir), or fine-tune a decoder")
    add_run_options(tv, "training folder (checkpoints); must be new unless --resume",
                    "also write just the final model (+ training record) here")
    tv.add_argument("--export-half", dest="export_half", action="store_true",
                    help="store the exported weights in float16 (half the size)")
    tv.add_argument("--steps", type=int)
    tv.add_argument("--batch-size", dest="batch_size", type=int)
    tv.add_argument("--lr", type=float)
    tv.add_argument("--kl-weight", dest="kl_weight", type=float)
    tv.add_argument("--recon-loss", dest="recon_loss", choices=["l1", "mse", "l1+mse"])
    tv.add_argument("--gan", action="store_true", default=None, help="add the PatchGAN hinge loss (CompVis recipe)")
    tv.add_argument("--disc-start", dest="disc_start", type=int)
    tv.add_argument("--disc-weight", dest="disc_weight", type=float)
    tv.add_argument("--seed", type=int)
    tv.add_argument("--data-seed", dest="data_seed", type=int)
    tv.add_argument("--num-images", dest="num_train_images", type=int)
    tv.add_argument("--image-size", dest="image_size", type=int)
    tv.add_argument("--data-dir", dest="data_dir", help="train on a folder of your own images instead of Shapes")
    tv.add_argument("--save-every", dest="save_every", type=int)
    tv.add_argument("--finetune-decoder", dest="finetune_decoder", metavar="VAE_FOLDER",
                    help="freeze this VAE's encoder, train its decoder, write decoder.safetensors (a VAE file)")
    tv.add_argument("--channels", help="block_out_channels, e.g. 32,64,128,128 (default: the shapes64 VAE, 16,32,64,64)")
    tv.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=1)
    tv.add_argument("--norm-groups", dest="norm_num_groups", type=int, default=8)
    tv.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_device(tv)
    tv.set_defaults(func=cmd_train_vae)

    tl = sub.add_parser("train-ldm", help="train the latent diffusion model (U-Net + text encoder) on Shapes latents")
    add_run_options(tl, "training folder (checkpoint, latent cache, sample grids); must be new unless --resume",
                    "also write the pipeline (EMA weights + training record) here")
    tl.add_argument("--export-guidance", dest="export_guidance", type=float, default=7.5,
                    help="the exported pipeline's default guidance scale (default 7.5)")
    tl.add_argument("--export-steps", dest="export_steps", type=int, default=50,
                    help="the exported pipeline's default number of DDIM steps (default 50)")
    tl.add_argument("--steps", type=int)
    tl.add_argument("--batch-size", dest="batch_size", type=int, help="images per step on each process")
    tl.add_argument("--lr", type=float)
    tl.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    tl.add_argument("--prediction", dest="prediction_type", choices=["epsilon", "sample", "v_prediction"],
                    help="what the U-Net predicts: eps (default), z_0 or v")
    tl.add_argument("--caption-dropout", dest="caption_dropout", type=float,
                    help="share of captions replaced by the empty prompt, for guidance (default 0.1)")
    tl.add_argument("--ema-decay", dest="ema_decay", type=float)
    tl.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype (auto: bf16 or fp16 on CUDA, fp32 on CPU and MPS)")
    tl.add_argument("--space", choices=["latent", "pixel"], help="diffuse VAE latents (default) or raw pixels")
    tl.add_argument("--vae", help="a shipped VAE name or a VAE folder (default shapes64)")
    tl.add_argument("--seed", type=int)
    tl.add_argument("--data-seed", dest="data_seed", type=int)
    tl.add_argument("--num-images", dest="num_train_images", type=int)
    tl.add_argument("--save-every", dest="save_every", type=int)
    tl.add_argument("--sample-every", dest="sample_every", type=int, help="write a sample grid every N steps (0: never)")
    tl.add_argument("--log-every", dest="log_every", type=int, help="record the mean loss every N steps (default 25)")
    tl.add_argument("--channels", help="U-Net block_out_channels (default 32,64: the shipped model's)")
    tl.add_argument("--attention", help="which levels attend, e.g. 1,1 (default: all)")
    tl.add_argument("--heads", type=int, default=4)
    tl.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=1)
    tl.add_argument("--norm-groups", dest="norm_num_groups", type=int, default=8)
    tl.add_argument("--text-dim", dest="text_dim", type=int, default=64, help="text encoder width = U-Net context_dim")
    tl.add_argument("--text-depth", dest="text_depth", type=int, default=2)
    tl.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
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
    gr.add_argument("--timeout", type=float, default=60.0, help="seconds one test may run (default 60)")
    gr.add_argument("--report", default="grade.json", help="where to write the JSON report (default ./grade.json)")
    gr.set_defaults(func=cmd_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
