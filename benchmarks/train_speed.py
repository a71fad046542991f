"""Training against the clock (chapter 06, issue 17): which recipe reaches a good text-to-image model (or VAE) in the
fewest wall-clock seconds on this machine?

Each recipe is the default recipe with a few settings changed (RECIPES below: one lever each, and combinations; an LDM
recipe's "models" entry changes the networks instead, as model_configs' arguments: --channels, --attention). All
recipes train in this one process, taking turns of a few seconds, so that a change in the machine's load hits them
alike, each for --budget seconds of its own training time. Every run sizes its learning-rate schedule to the budget
(after two pilot steps, `steps` is what the budget allows: latent_vs_pixel.sized_schedule), so each one finishes its
cosine decay when its time is up, as a run given that budget would.

- ldm: LDMTrainer on the shipped VAE's latents (data rendering and latent caching timed: the "prep" column). Every
  --eval-every seconds of training, the EMA model draws --eval-images held-out captions (seed 2024, never trained on)
  with the pipeline's default sampler, 25 DDIM steps, guidance --guidance, and the shipped judge reads them:
  prompt-following (all four words right). Evaluation time is not counted.
- vae: VAETrainer; every --eval-every seconds, the held-out PSNR on the trainer's eval images.

Prints, for each recipe: steps, ms / step, the score at each checkpoint (training seconds + prep), and the first
checkpoint that reached the target (--target: 0.90 prompt-following, 28 dB). --plot writes the curves; --json keeps
every point.

    python benchmarks/train_speed.py ldm --budget 860 --eval-every 215 --threads 2 \
        --recipes default_before_17,min_snr,ema_0.99,batch_64
    python benchmarks/train_speed.py ldm --budget 860 --eval-every 215 --threads 2 \
        --recipes min_snr_batch_64,min_snr_batch_64_lr2e-3,min_snr_batch_32,v_min_snr_batch_64
    python benchmarks/train_speed.py vae --budget 450 --eval-every 90 --recipes default,lr_1.5e-3 --threads 2
    python benchmarks/train_speed.py ldm --budget 30 --eval-every 15 --eval-images 20 --recipes default,min_snr

Figures are only comparable within one run; a busy machine slows every recipe, which is why they take turns. Run it
on a quiet machine for the chapter's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/latent_vs_pixel.py: this folder is sys.path[0] when the script runs
from latent_vs_pixel import PILOT_STEPS, TURN_S, seconds, sized_schedule

from minildm.device import get_device
from minildm.ldm_recipe import LDMTrainConfig, model_configs
from minildm.metrics import evaluate_pipeline
from minildm.pipeline import LatentDiffusion
from minildm.pretrained import load_judge
from minildm.train_ldm import LDMTrainer, data_settings
from minildm.train_vae import VAETrainConfig, VAETrainer, evaluate_psnr, held_out_images

# name -> the settings that differ from the default config (LDMTrainConfig or VAETrainConfig). The LDM's levers
# were measured against train-ldm's defaults before issue 17 (BEFORE_17), so each recipe spells them out; the
# defaults then became the second run's winner, min_snr_batch_64_lr2e-3, on the shipped model's U-Net (channels
# 32, 64, attention at both levels; the records made before the U-Net's default changed call that "default":
# default_before_attention), then attention at 4x4 only (default_before_channels), then channels 24, 48 too.
SHIPPED_NETWORK = {"models": {"channels": "32,64", "attention": "1,1"}}
BEFORE_17 = {"t_sampling": "uniform", "batch_size": 128, "lr": 1e-3, **SHIPPED_NETWORK}
RECIPES = {
    "ldm": {
        "default": {},
        "default_before_attention": SHIPPED_NETWORK,
        "default_before_channels": {"models": {"channels": "32,64"}},
        "default_before_17": BEFORE_17,
        "min_snr": {**BEFORE_17, "t_sampling": "min_snr"},
        "lognormal": {**BEFORE_17, "t_sampling": "lognormal"},
        "v_prediction": {**BEFORE_17, "prediction_type": "v_prediction"},
        "v_min_snr": {**BEFORE_17, "prediction_type": "v_prediction", "t_sampling": "min_snr"},
        "ema_0.99": {**BEFORE_17, "ema_decay": 0.99},
        "batch_64": {**BEFORE_17, "batch_size": 64},
        "min_snr_batch_64": {**BEFORE_17, "t_sampling": "min_snr", "batch_size": 64},
        "min_snr_batch_64_lr2e-3": {**BEFORE_17, "t_sampling": "min_snr", "batch_size": 64, "lr": 2e-3},
        "min_snr_batch_32": {**BEFORE_17, "t_sampling": "min_snr", "batch_size": 32},
        "v_min_snr_batch_64": {**BEFORE_17, "prediction_type": "v_prediction", "t_sampling": "min_snr",
                               "batch_size": 64},
        "batch_256_lr2e-3": {**BEFORE_17, "batch_size": 256, "lr": 2e-3},
        "compile": {"compile": True, **SHIPPED_NETWORK},
        # levers on today's defaults, not measured yet on them; "models" holds model_configs() arguments. (The
        # records' attention_4x4_only and channels_24_48 are in today's default network.)
        "default_lognormal": {"t_sampling": "lognormal"},
        "default_ema_0.99": {"ema_decay": 0.99},
        # attention at 8x8 too (the shipped network's placement), and at 8x8 on the way down only: the way up holds
        # two of the three 8x8 SpatialTransformers (chapter 06, "Attention at 8x8 on the way down only")
        "attention_8x8": {"models": {"attention": "1,1"}},
        "attention_8x8_down_only": {"models": {"attention": "1,1", "attention_up": "0,1"}},
        # ... with one head of 24 channels at 8x8 instead of four of 6 (--heads 1,4): fewer, wider heads
        "attention_8x8_down_one_head": {"models": {"attention": "1,1", "attention_up": "0,1", "heads": "1,4"}},
        # ... and at 8x8 on the way up only: its two 8x8 SpatialTransformers, none on the way down
        "attention_8x8_up_only": {"models": {"attention": "0,1", "attention_up": "1,1"}},
    },
    "vae": {
        "default": {},
        "lr_1.5e-3": {"lr": 1.5e-3},                                     # the default until issue 17's run
        "batch_32": {"batch_size": 32},
        "scale_equivariance": {"scale_equivariance": 1.0},                # chapter 06, "Which VAE's latents"
    },
}
TARGETS = {"ldm": 0.90, "vae": 28.0}
RESIZE_AFTER = 20                    # steps after which each schedule is sized again, from warm steps
UNITS = {"ldm": "prompt-following (all four words)", "vae": "held-out PSNR (dB)"}


def build(kind: str, changes: dict, folder: Path, device: torch.device, prepared: list):
    """(a fresh trainer for one recipe with its data prepared, the earlier trainer whose data it shares or None).
    An LDM recipe whose data settings match an earlier recipe's shares that recipe's prepared data."""
    if kind == "ldm":
        settings = {key: value for key, value in changes.items() if key != "models"}
        cfg = LDMTrainConfig(**{"sample_every": 0, "save_every": 10**9, **settings})
        models = model_configs(cfg.space, **changes.get("models", {}))
        trainer = LDMTrainer(cfg, folder, models, progress=False, device=device)
        same = next((other for other in prepared if data_settings(other.cfg) == data_settings(cfg)), None)
        trainer.prepare(data_from=same)
        return trainer, same
    cfg = VAETrainConfig(**{"save_every": 10**9, **changes})
    trainer = VAETrainer(cfg, folder, progress=False, device=device)
    trainer.held_out = held_out_images(cfg).to(device)                   # rendered once, outside the clock
    return trainer, None


def score(kind: str, trainer, judge, args: argparse.Namespace, device: torch.device) -> float:
    """The recipe's quality now: prompt-following of the EMA model, or the VAE's held-out PSNR."""
    if kind == "vae":
        return evaluate_psnr(trainer.vae, trainer.held_out)
    ema = trainer.ema_denoiser()
    pipe = LatentDiffusion(trainer.autoencoder, ema.unet, ema.text_encoder, trainer.tokenizer, trainer.models.schedule,
                           device=device)
    quality = evaluate_pipeline(pipe, judge, args.eval_images, steps=25, guidance_scale=args.guidance,
                                batch=args.eval_batch)
    return quality["prompt_following"]["all"]


def run(args: argparse.Namespace) -> dict:
    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = RECIPES[args.kind]
    unknown = [name for name in args.recipes if name not in table]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)} for {args.kind}; choose from {', '.join(table)}")
    root = Path(tempfile.mkdtemp(prefix="train_speed-"))
    judge = load_judge("shapes64", device) if args.kind == "ldm" else None
    runs = {}
    for name in args.recipes:
        started = time.perf_counter()
        trainer, same = build(args.kind, table[name], root / name, device, [r["trainer"] for r in runs.values()])
        # a recipe that shares another's data would have paid the same preparation on its own: count that
        prep_s = next((r["prep_s"] for r in runs.values() if r["trainer"] is same), time.perf_counter() - started)
        runs[name] = {"trainer": trainer, "prep_s": prep_s, "spent": [], "points": []}
        print(f"  {name}: data ready in {runs[name]['prep_s']:.1f} s" + (" (shared)" if same is not None else ""),
              file=sys.stderr, flush=True)
    for run_ in runs.values():                                              # pilot steps, then the sized schedule
        for _ in range(PILOT_STEPS):
            run_["spent"].append(seconds(run_["trainer"].train_step, device)[0])
        sized_schedule(run_["trainer"], args.budget, run_["spent"])

    def due(run_) -> bool:                                                 # a checkpoint's time has come
        return sum(run_["spent"]) >= args.eval_every * (len(run_["points"]) + 1)

    def unfinished(run_) -> bool:
        return sum(run_["spent"]) < args.budget and run_["trainer"].step < run_["trainer"].cfg.steps

    while any(unfinished(r) for r in runs.values()):
        for name, run_ in runs.items():
            turn_end = sum(run_["spent"]) + TURN_S
            while unfinished(run_) and sum(run_["spent"]) < turn_end and not due(run_):
                run_["spent"].append(seconds(run_["trainer"].train_step, device)[0])
                if len(run_["spent"]) == RESIZE_AFTER:
                    # the pilot steps run slow (first calls, cold caches): size again from warm steps; with 200+
                    # steps in the budget this is still inside the warm-up, so no step has used the decay it moves
                    sized_schedule(run_["trainer"], args.budget, run_["spent"][PILOT_STEPS:])
            if (due(run_) or not unfinished(run_)) and add_point(args, run_, judge, device):
                print(f"    {name}: step {run_['trainer'].step}, {run_['points'][-1]['train_s']:.0f} s, "
                      f"{run_['points'][-1]['score']:.3f}", file=sys.stderr, flush=True)
    rows = [{"recipe": name, "changes": table[name], "steps": r["trainer"].step, "prep_s": r["prep_s"],
             "ms_per_step": 1e3 * statistics.median(r["spent"]), "points": r["points"]} for name, r in runs.items()]
    print_table(args, rows)
    if args.plot:
        plot(args, rows)
    if args.json:
        settings = {"threads": torch.get_num_threads(), "eval_every_s": args.eval_every, "target": target(args),
                    "device": str(device), "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:])}
        if args.kind == "ldm":
            settings.update(eval_images=args.eval_images, guidance=args.guidance)
        Path(args.json).write_text(json.dumps({"kind": args.kind, "budget_s": args.budget, **settings, "rows": rows},
                                              indent=2))
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows}


def add_point(args, run_: dict, judge, device: torch.device) -> bool:
    """Score the recipe now (not counted in its time), unless this moment was already scored: was a point added?"""
    train_s = sum(run_["spent"])
    if run_["points"] and run_["points"][-1]["step"] == run_["trainer"].step:
        return False
    run_["points"].append({"step": run_["trainer"].step, "train_s": train_s, "wall_s": train_s + run_["prep_s"],
                           "score": score(args.kind, run_["trainer"], judge, args, device)})
    return True


def target(args: argparse.Namespace) -> float:
    return args.target if args.target is not None else TARGETS[args.kind]


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\n{args.kind}: {UNITS[args.kind]} after each {args.eval_every:g} s of training (budget {args.budget:g} s "
          f"each, {torch.get_num_threads()} threads); wall = prep + training; target {target(args):g}\n")
    print("| recipe | steps | ms / step | prep s | score at each checkpoint (wall s) | final | wall s to target |\n"
          "|---|---:|---:|---:|---|---:|---:|")
    for row in rows:
        curve = ", ".join(f"{p['score']:.3g} ({p['wall_s']:.0f})" for p in row["points"])
        reached = next((p["wall_s"] for p in row["points"] if p["score"] >= target(args)), None)
        print(f"| {row['recipe']} | {row['steps']:,} | {row['ms_per_step']:,.0f} | {row['prep_s']:.0f} | {curve} | "
              f"{row['points'][-1]['score']:.3g} | {'not reached' if reached is None else f'{reached:.0f}'} |")


def plot(args: argparse.Namespace, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")

    from minildm.viz import plot_training_curves

    fig, ax = plot_training_curves(rows, target(args), "target", UNITS[args.kind], figsize=(6.4, 4.0))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=sorted(RECIPES), help="ldm: the text-to-image model; vae: the autoencoder")
    p.add_argument("--recipes", type=lambda text: text.split(","), default=["default"],
                   help="comma-separated recipe names (see RECIPES in this file)")
    p.add_argument("--budget", type=float, default=900.0, help="training seconds for each recipe (default 900)")
    p.add_argument("--eval-every", dest="eval_every", type=float, default=150.0,
                   help="score each recipe after every this many training seconds (default 150)")
    p.add_argument("--eval-images", dest="eval_images", type=int, default=200,
                   help="held-out captions per ldm score (default 200; the chapter's figure uses 500)")
    p.add_argument("--eval-batch", dest="eval_batch", type=int, default=100)
    p.add_argument("--guidance", type=float, default=4.0, help="guidance scale for the ldm score (default 4)")
    p.add_argument("--target", type=float, default=None, help="the score to reach (default 0.90 or 28 dB)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None)
    p.add_argument("--plot", help="write the curves to this PNG")
    p.add_argument("--json", help="write every point to this JSON file")
    args = p.parse_args(argv)
    if args.budget <= 0 or args.eval_every <= 0 or args.eval_images < 2:
        p.error("--budget and --eval-every must be > 0 and --eval-images at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
