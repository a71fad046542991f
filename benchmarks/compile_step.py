"""Does `torch.compile` pay for a short training run? `train-ldm`'s default step, eager against compiled (`--compile`),
on this machine (chapter 06, "Training against the clock"; issue 17).

Two trainers with the default recipe (data prepared once and shared), in one process:

- first steps: the wall time of each trainer's first --first steps, which for the compiled one includes inductor
  compiling the forward and the backward. The compiler's on-disk cache starts empty (a fresh
  TORCHINDUCTOR_CACHE_DIR), as on a student's first run; a second run of `train-ldm --compile` finds it filled.
- steady step: the median and the fastest of --turns x --per-turn steps afterwards, the two trainers taking turns of
  --per-turn steps so that a change in the machine's load hits both alike.
- break-even: how many steady steps the compiled step's saving needs to win back its compile time.

    python benchmarks/compile_step.py --threads 2 --json benchmarks/results/compile-ldm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")   # before torch: a cold compile

import torch  # noqa: E402

# benchmarks/latent_vs_pixel.py: this folder is sys.path[0] when the script runs
from latent_vs_pixel import seconds  # noqa: E402

from minildm.ldm_recipe import LDMTrainConfig, model_configs  # noqa: E402
from minildm.train_ldm import LDMTrainer  # noqa: E402


def timed(trainer: LDMTrainer) -> float:
    """Wall seconds of one training step (the device's queue drained, as every benchmark here times)."""
    return seconds(trainer.train_step, trainer.device)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--first", type=int, default=3, help="first steps timed together (compilation included)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--per-turn", type=int, default=5)
    p.add_argument("--json", help="also write every figure here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="compile_step-"))
    trainers, first_s = {}, {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = LDMTrainConfig(sample_every=0, save_every=10**9, compile=compile_)
        trainer = LDMTrainer(cfg, root / name, model_configs(cfg.space), progress=False)
        trainer.prepare(data_from=trainers.get("eager"))
        first_s[name] = sum(timed(trainer) for _ in range(args.first))
        print(f"  {name}: first {args.first} steps in {first_s[name]:.1f} s", file=sys.stderr, flush=True)
        trainers[name] = trainer
    spent = {name: [] for name in trainers}
    for _ in range(args.turns):
        for name, trainer in trainers.items():
            spent[name] += [timed(trainer) for _ in range(args.per_turn)]
    rows = [{"mode": name, "first_steps_s": first_s[name], "median_ms": 1e3 * statistics.median(spent[name]),
             "fastest_ms": 1e3 * min(spent[name]), "steps_ms": [1e3 * s for s in spent[name]]} for name in trainers]
    eager, compiled = rows
    ratio = compiled["median_ms"] / eager["median_ms"]
    saving_s = (eager["median_ms"] - compiled["median_ms"]) / 1e3
    extra_s = compiled["first_steps_s"] - eager["first_steps_s"]
    break_even = extra_s / saving_s if saving_s > 0 else None
    print(f"\ntrain-ldm's default step (batch {trainers['eager'].cfg.batch_size}), {torch.get_num_threads()} threads;"
          f" compile cache empty at the start\n")
    print(f"| mode | first {args.first} steps (s) | median ms / step | fastest ms / step |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['first_steps_s']:.1f} | {row['median_ms']:.0f} | {row['fastest_ms']:.0f} |")
    print(f"\ncompiled / eager step: {ratio:.2f}x; the compiler's extra {extra_s:.0f} s is won back after "
          + (f"{break_even:,.0f} steps" if break_even else "never (no saving per step)"))
    result = {"threads": torch.get_num_threads(), "batch_size": trainers["eager"].cfg.batch_size, "rows": rows,
              "compiled_over_eager": ratio, "compile_extra_s": extra_s, "break_even_steps": break_even,
              "command": "python benchmarks/compile_step.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
