"""Does a VAE's latent detail predict what a diffusion model learns from its latents? (issue 17, chapter 06)

Skorokhodov et al. (2025) tie a latent space's "diffusability" to its high-frequency detail, the detail that
`train-vae --scale-equivariance` asks the decoder to do without. This script measures it on VAEs whose latents
`train-ldm`'s defaults have already been trained on and scored (the records of benchmarks/ldm_defaults.py and
benchmarks/from_scratch.py), and sets it beside their prompt-following:

- detail: the share of the centred latents' energy that a 2x average pool loses,
  ||z - up(pool_2(z))||^2 / ||z||^2, over the held-out images (seed 2024), z = scale_factor * mean of encode(x).
  0 for a latent constant over each 2x2 block; the scale-equivariance loss's pooling throws exactly this away.
- posterior noise: the posterior's variance against the latents' variance, mean(s^2 sigma^2) / var(z), how blurred
  the training latents are (the LDM trains on samples of the posterior).

Then Pearson's r of each against prompt-following, over every VAE and over the 2,000-step VAEs alone (the shipped
VAE, 4,000 steps, is the most different of them). Records that share a VAE (several diffusion seeds) count once,
at their mean.

    python benchmarks/latent_detail.py benchmarks/results/ldm-defaults.json benchmarks/results/from-scratch.json \
        benchmarks/results/ldm-scratch-vae-seed*.json benchmarks/results/ldm-on-vae-*.json \
        --json benchmarks/results/latent-detail.json

A record without a "vae" key trained on the shipped VAE, except `demo --train`'s, whose VAE is DEMO_OUT/vae.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minildm.data import EVAL_SEED, ShapesDataset
from minildm.pretrained import load_vae_folder, vae_folder_or_name


def latent_detail(z: torch.Tensor) -> float:
    """The share of the per-channel-centred latents' energy lost by a 2x average pool and nearest upsampling."""
    z = z - z.mean(dim=(0, 2, 3), keepdim=True)                                     # (N, C, h, w)
    coarse = F.interpolate(F.avg_pool2d(z, 2), scale_factor=2.0, mode="nearest")  # (N, C, h, w)
    return ((z - coarse).pow(2).sum() / z.pow(2).sum()).item()


def vae_statistics(folder: str, count: int) -> dict:
    """latent_detail and the posterior-noise ratio of a VAE's latents of `count` held-out images."""
    vae = load_vae_folder(vae_folder_or_name(folder)).eval()
    images = ShapesDataset(count, seed=EVAL_SEED).images(0, count)                  # (N, 3, 64, 64)
    with torch.no_grad():
        posterior = vae.encode(images)
    s = vae.config.scale_factor
    z = s * posterior.mean                                                          # (N, C, h, w)
    return {"detail": latent_detail(z),
            "posterior_noise": ((s * posterior.std).pow(2).mean() / z.var(dim=(0, 2, 3)).mean()).item()}


def vae_of(record: dict, demo_out: str) -> str:
    """The VAE folder (or shipped name) whose latents the record's diffusion model trained on."""
    if "vae" in record:
        return record["vae"] or "shapes64"
    return f"{demo_out}/vae" if record["command"] == "minildm demo --train" else "shapes64"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="ldm_defaults.py / from_scratch.py records of train-ldm's defaults")
    p.add_argument("--demo-out", default="runs/from-scratch", help="the --out from_scratch.py ran demo --train in")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--json", help="also write every figure here")
    args = p.parse_args(argv)
    runs: dict[str, list[float]] = {}
    for path in args.records:
        record = json.loads(Path(path).read_text())
        if "unet" in record and (record["steps"], record["unet"]["attention_levels"]) != (7000, [False, True]):
            raise SystemExit(f"{path} is not a run of train-ldm's defaults (7,000 steps, attention at 4x4 only); "
                             f"leave it out")
        vae = vae_of(record, args.demo_out)
        try:
            vae_folder_or_name(vae)
        except FileNotFoundError:
            raise SystemExit(f"{path} trained on the VAE in {vae}, which is not here: train it again (its record's "
                             "note says how) or leave the record out") from None
        runs.setdefault(vae, []).append(record["prompt_following"])
    rows = []
    for vae, following in runs.items():
        vae_steps = json.loads((vae_folder_or_name(vae) / "training.json").read_text())["steps"]
        rows.append({"vae": vae, "vae_steps": vae_steps, "ldm_runs": len(following),
                     "prompt_following": float(np.mean(following)), **vae_statistics(vae, args.images)})
    print("| VAE | its steps | LDM runs | prompt-following | detail lost by a 2x pool | posterior noise |\n"
          "|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['vae']} | {row['vae_steps']:,} | {row['ldm_runs']} | {row['prompt_following']:.1%} | "
              f"{row['detail']:.3f} | {row['posterior_noise']:.4f} |")
    correlations = {}
    for subset, chosen in (("all", rows), ("2,000-step VAEs", [r for r in rows if r["vae_steps"] == 2000])):
        following = [r["prompt_following"] for r in chosen]
        correlations[subset] = {key: float(np.corrcoef(following, [r[key] for r in chosen])[0, 1])
                                for key in ("detail", "posterior_noise")}
        print(f"Pearson r with prompt-following, {subset} ({len(chosen)} VAEs): "
              + ", ".join(f"{key} {r:+.2f}" for key, r in correlations[subset].items()))
    record = {"images": args.images, "eval_seed": EVAL_SEED, "records": args.records, "rows": rows,
              "correlations": correlations}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
