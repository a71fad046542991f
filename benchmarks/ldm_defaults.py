"""What `minildm train-ldm`'s defaults make (issue 17's second target: >= 90% prompt-following in <= 15 minutes):
the one command, run to its end, then the pipeline it exported scored.

1. Runs `python -m minildm train-ldm --out OUT/run --export OUT/pipeline` in a child process, timed from start to
   exit (drawing the Shapes data and caching the shipped VAE's latents included), with every training setting at its
   default; the export's sampling defaults are the shipped pipeline's (guidance 4, 25 DDIM steps), as the demo's.
2. The exported pipeline: prompt-following on --eval-images held-out captions (seed 2024, never trained on), read by
   the shipped judge (from_scratch.prompt_following, as train_speed and from_scratch score); and the same judge on
   the VAE's own round trips of those images, beside the VAE's held-out PSNR (from_scratch.vae_scores: the most its
   samples could be read as).

Unlike train_speed's runs, which stop when a budget of seconds is spent, this one trains the defaults' full number of
steps, so its score does not depend on the machine's speed (its seconds do).

    python benchmarks/ldm_defaults.py --out runs/ldm-defaults --json benchmarks/results/ldm-defaults.json
    # the defaults before issue 17's last two changes (the shipped network, 5,000 steps):
    python benchmarks/ldm_defaults.py --out runs/ldm-before --change "--channels 32,64 --attention 1,1 --steps 5000"
"""

from __future__ import annotations

import json
from pathlib import Path

# benchmarks/from_scratch.py: this folder is sys.path[0] when the script runs
from from_scratch import (
    TARGETS,
    arguments,
    following_line,
    prompt_following,
    refuse_non_empty,
    round_trip_line,
    timed_minildm,
    vae_scores,
)

from minildm.demo import SHIPPED_SAMPLING


def main(argv: list[str] | None = None) -> dict:
    p = arguments(__doc__, "an empty (or new) folder: OUT/run trains, OUT/pipeline is exported",
                  "score the pipeline already in OUT; train nothing")
    p.add_argument("--change", default="", help="train-ldm options that differ from the defaults, in quotes "
                   "('--attention 1,1 --steps 5000'): a lever run to its end, for the same comparison")
    args = p.parse_args(argv)
    out = Path(args.out)
    command = ["train-ldm", "--out", str(out / "run"), "--export", str(out / "pipeline"),
               "--export-guidance", f"{SHIPPED_SAMPLING['guidance_scale']:g}",
               "--export-steps", str(SHIPPED_SAMPLING["steps"]), *args.change.split()]
    if args.score_only:
        wall_s = None
    else:
        refuse_non_empty(out, "train-ldm")
        wall_s = timed_minildm(*command)
    trained = json.loads((out / "pipeline" / "training.json").read_text())
    recipe = trained["train_config"]
    unet = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    record = {"command": trained["command"], "wall_s": wall_s, "train_s": trained["train_seconds"],
              "steps": trained["steps"], "ms_per_step": 1e3 * trained["train_seconds"] / trained["steps"],
              "torch_threads": trained["torch_threads"],
              "recipe": {key: recipe.get(key) for key in ("batch_size", "lr", "t_sampling", "min_snr_gamma",
                                                      "zero_terminal_snr", "prediction_type", "ema_decay",
                                                      "warmup_steps", "num_train_images")},
              "unet": {key: unet[key] for key in ("block_out_channels", "attention_levels", "layers_per_block")}
              # the way up's attention levels, recorded where --attention-up made them differ from the way down's
              | ({"up_attention_levels": unet["up_attention_levels"]}
                 if unet.get("up_attention_levels", unet["attention_levels"]) != unet["attention_levels"] else {})
              # and the heads, where --heads changed them (per level: a list, finest first)
              | ({"heads": unet["heads"]} if unet["heads"] != 4 else {}),
              "final_loss": trained["final_loss"], "vae": recipe["vae"],
              **vae_scores(recipe["vae"], args.eval_images),
              **prompt_following(out / "pipeline", args.eval_images),
              "targets": {key: TARGETS[key] for key in ("prompt_following", "ldm_minutes")}}
    total = "not timed (--score-only)" if wall_s is None else f"{wall_s / 60:.1f} min from start to exit"
    print(f"\n{record['command']}\n{record['steps']:,} steps of {recipe['batch_size']} in {record['train_s']:.0f} s of "
          f"training ({record['ms_per_step']:.0f} ms a step, torch threads: {record['torch_threads']}); {total}")
    print(following_line(record))
    print(round_trip_line(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
