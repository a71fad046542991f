"""The `minildm` command. Each subcommand is a thin layer over the package: parse, check, call, report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

DEMO_MARKER = ".minildm-demo"


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto (default: cuda > mps > cpu), cpu, cuda, cuda:N or mps")


def prepare_output_folder(out: Path) -> None:
    """The demo writes only into a folder that is new, empty, or an earlier demo's: it never overwrites your files."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise SystemExit(f"error: --out {out} already holds files that minildm did not write; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `minildm demo`; safe to delete\n")


def cmd_demo(args) -> int:
    from minildm.demo import run_demo

    out = Path(args.out)
    prepare_output_folder(out)
    start = time.time()
    written = run_demo(out, device=args.device, seed=args.seed)
    print(f"minildm demo: wrote {len(written)} files to {out}/ in {time.time() - start:.1f} s")
    for path, what in written:
        print(f"  {path}  {what}")
    return 0


def train_config_from_args(args):
    from minildm.train import VAETrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(VAETrainConfig) if getattr(args, f.name, None) is not None}
    return VAETrainConfig(**values)


def cmd_train_vae(args) -> int:
    import torch

    from minildm.autoencoder import AutoencoderConfig
    from minildm.train import VAETrainer, export_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train_config_from_args(args)
    model_config = None
    if args.channels:
        model_config = AutoencoderConfig(block_out_channels=tuple(int(c) for c in args.channels.split(",")),
                                         layers_per_block=args.layers_per_block, norm_num_groups=args.norm_groups,
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

    from minildm.train_ldm import LDMTrainConfig, LDMTrainer, export_pipeline, model_configs

    if args.threads:
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in fields(LDMTrainConfig) if getattr(args, f.name, None) is not None}
    cfg = LDMTrainConfig(**values)
    models = model_configs(cfg.space, channels=args.channels, attention=args.attention, heads=args.heads,
                           layers_per_block=args.layers_per_block, text_dim=args.text_dim, text_depth=args.text_depth,
                           norm_groups=args.norm_groups, prediction_type=cfg.prediction_type)
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
        export_pipeline(args.out, args.export, notes)
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

    demo = sub.add_parser("demo", help="load the shipped VAE and write the chapter 1-2 figures to --out")
    demo.add_argument("--out", default="minildm-demo", help="folder for the figures (default: ./minildm-demo)")
    demo.add_argument("--seed", type=int, default=0)
    add_device(demo)
    demo.set_defaults(func=cmd_demo)

    tv = sub.add_parser("train-vae", help="train the VAE on Shapes (or --data-dir), or fine-tune a decoder")
    tv.add_argument("--out", required=True, help="training folder (checkpoints); must be new unless --resume")
    tv.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    tv.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                    help="train at most this many steps now, save, and stop (continue later with --resume)")
    tv.add_argument("--export", default=None, help="also write just the final model (+ training record) here")
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
    tv.add_argument("--norm-groups", dest="norm_groups", type=int, default=8)
    tv.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_device(tv)
    tv.set_defaults(func=cmd_train_vae)

    tl = sub.add_parser("train-ldm", help="train the latent diffusion model (U-Net + text encoder) on Shapes latents")
    tl.add_argument("--out", required=True, help="training folder (checkpoint, latent cache, sample grids)")
    tl.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    tl.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                    help="train at most this many steps now, save, and stop (continue later with --resume)")
    tl.add_argument("--export", default=None, help="also write the pipeline (EMA weights + training record) here")
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
    tl.add_argument("--channels", help="U-Net block_channels, e.g. 64,128 (default)")
    tl.add_argument("--attention", help="which levels attend, e.g. 1,1 (default: all)")
    tl.add_argument("--heads", type=int, default=4)
    tl.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=1)
    tl.add_argument("--norm-groups", dest="norm_groups", type=int, default=16)
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
