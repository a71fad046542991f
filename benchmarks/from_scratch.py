"""From scratch, end to end (issue 17): `minildm demo --train` timed from start to exit as a student runs it, then
the two models it trained scored against the issue's targets.

1. Runs `python -m minildm demo --train --out OUT` in a child process (the wall clock counts everything: drawing
   the data, training the VAE, encoding the latents, training the diffusion model, drawing the figures). The demo
   clocks each stage itself into OUT/train-stages.json, beside the reference machine's seconds (demo.STAGE_SECONDS).
2. The VAE it trained: the held-out PSNR its trainer measured at the end and exported (OUT/vae/training.json; target:
   28 dB, within 8 minutes of its stage), and the judge's reading of its round trips of the held-out images (the
   most the diffusion model's samples could be read as: a decoder that loses a factor shows here).
3. The pipeline it exported (OUT/pipeline): prompt-following on --eval-images held-out captions (seed 2024, never
   trained on) with the pipeline's own guidance and 25 DDIM steps, read by the shipped judge (target: 90%, within
   15 minutes of its stages) - metrics.evaluate_pipeline, as benchmarks/train_speed.py scores its recipes.

Prints the stages against the reference machine and the scores against the targets; --json keeps it all.

    python benchmarks/from_scratch.py --out runs/from-scratch --json benchmarks/results/from-scratch.json

An OUT that already holds a --train run is resumed by the demo, so its wall clock would not be a from-scratch
one: the script refuses a non-empty OUT unless --score-only (score what is there, run nothing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/train_speed.py: this folder is sys.path[0] when the script runs
from train_speed import TARGETS as QUALITY_TARGETS

from minildm.demo import STAGE_SECONDS
from minildm.metrics import evaluate_pipeline, reconstruction_accuracy
from minildm.pipeline import LatentDiffusion
from minildm.pretrained import load_judge, load_vae_folder, vae_folder_or_name

TARGETS = {"total_minutes": 25, "vae_psnr_db": QUALITY_TARGETS["vae"], "vae_minutes": 8,
           "prompt_following": QUALITY_TARGETS["ldm"], "ldm_minutes": 15}
VAE_STAGES, LDM_STAGES = ("vae_data", "vae", "vae_finish"), ("ldm_data", "ldm")


def timed_minildm(*args: str) -> float:
    """Wall seconds of `python -m minildm ARGS` in a child process, from start to exit (as a student runs it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minildm", *args], check=True)
    return time.perf_counter() - start


def prompt_following(pipeline: Path, eval_images: int) -> dict:
    """An exported pipeline's prompt-following on `eval_images` held-out captions, with its own guidance scale and
    25 DDIM steps, read by the shipped judge: the share with all four words right, and each word's."""
    pipe = LatentDiffusion.from_folder(pipeline)
    quality = evaluate_pipeline(pipe, load_judge("shapes64"), eval_images, steps=25)
    return {"prompt_following": quality["prompt_following"]["all"], "words": quality["prompt_following"],
            "guidance_scale": quality["guidance_scale"], "sampler": quality["sampler"], "eval_images": eval_images}


def following_line(record: dict) -> str:
    """prompt_following's figures in words, against the target."""
    words = ", ".join(f"{word} {100 * share:.1f}%" for word, share in record["words"].items() if word != "all")
    return (f"{100 * record['prompt_following']:.1f}% prompt-following ({words}) on {record['eval_images']} held-out "
            f"captions, guidance {record['guidance_scale']:g}, {record['sampler']} 25 steps (target >= "
            f"{100 * TARGETS['prompt_following']:.0f}% in <= {TARGETS['ldm_minutes']} min)")


def vae_scores(vae: Path | str, eval_images: int) -> dict:
    """A VAE folder's (or a shipped VAE's name's) held-out PSNR, as its trainer measured it at the end, and the shipped
    judge on its own round trips of the held-out images: what the LDM's samples could at best be read as. Near the
    real images' reading, a low prompt-following is the diffusion model's, not the decoder's."""
    folder = vae_folder_or_name(vae)
    psnr = json.loads((folder / "training.json").read_text())["heldout_psnr"]
    words = reconstruction_accuracy(load_vae_folder(folder), load_judge("shapes64"), eval_images)
    return {"vae_psnr_db": psnr, "vae_round_trip_words": words}


def round_trip_line(record: dict) -> str:
    """vae_scores' figures in words."""
    words = ", ".join(f"{word} {100 * share:.1f}%" for word, share in record["vae_round_trip_words"].items())
    return f"the VAE ({record['vae_psnr_db']:.2f} dB held out); the judge on its round trips of those images: {words}"


def scores(out: Path, eval_images: int) -> dict:
    """vae_scores of the VAE it trained, and the exported pipeline's prompt-following."""
    return {**vae_scores(out / "vae", eval_images), **prompt_following(out / "pipeline", eval_images)}


def refuse_non_empty(out: Path, what: str) -> None:
    """A run in a non-empty OUT would resume (or refuse to start), so its wall clock would not be a from-scratch one."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: {what} there would not start from scratch; give a new --out (or "
                         f"--score-only to score what is there)")


def arguments(doc: str, out: str, score_only: str) -> argparse.ArgumentParser:
    """The options this script and ldm_defaults share: --out, --eval-images, --score-only, --json."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--score-only", action="store_true", help=score_only)
    p.add_argument("--json", help="also write every figure here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = arguments(__doc__, "an empty (or new) folder for the demo's runs and figures",
                     "score the runs already in --out; train nothing").parse_args(argv)
    out = Path(args.out)
    if args.score_only:
        wall_s = None
    else:
        refuse_non_empty(out, "a --train run")
        wall_s = timed_minildm("demo", "--train", "--out", str(out))
    stages = json.loads((out / "train-stages.json").read_text())
    here = stages["stage_seconds_here"]
    record = {"command": "minildm demo --train", "wall_s": wall_s, "torch_threads": stages["torch_threads"],
              "stage_seconds_here": here, "stage_seconds_reference": STAGE_SECONDS,
              "vae_s": sum(here.get(s, 0.0) for s in VAE_STAGES), "ldm_s": sum(here.get(s, 0.0) for s in LDM_STAGES),
              "final_loss": json.loads((out / "pipeline" / "training.json").read_text())["final_loss"],
              **scores(out, args.eval_images), "targets": TARGETS}
    print("\n| stage | reference (s) | here (s) |\n|---|---:|---:|")
    for stage, reference in STAGE_SECONDS.items():
        print(f"| {stage} | {reference:.0f} | {here.get(stage, float('nan')):.0f} |")
    total = "not timed (--score-only)" if wall_s is None else f"{wall_s / 60:.1f} min"
    print(f"\nwhole command: {total} (target <= {TARGETS['total_minutes']} min)")
    print(f"VAE: {record['vae_psnr_db']:.2f} dB held-out PSNR after {record['vae_s'] / 60:.1f} min "
          f"(target >= {TARGETS['vae_psnr_db']} dB in <= {TARGETS['vae_minutes']} min)")
    print(f"LDM, after {record['ldm_s'] / 60:.1f} min: {following_line(record)}")
    print(round_trip_line(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
