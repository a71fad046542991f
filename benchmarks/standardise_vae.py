"""A VAE whose latents have zero mean and unit variance in every channel, and the same decoder output (chapter 06,
"Which VAE's latents").

One `scale_factor` makes the latents' *overall* variance 1, but a VAE's four channels can differ several-fold in
spread and sit off zero, so at any timestep some channels are drowned in noise long before others. Later latent
models shift and scale each channel (SD3's `shift_factor`, the `latents_mean` / `latents_std` of some diffusers
VAEs). Here the per-channel shift and scale are folded into the VAE's own 1x1 convolutions, so the result is an
ordinary VAE folder that `train-ldm --vae` takes as it is:

    quant_conv:       mu' = (mu - m) / s,   log var' = log var - 2 log s      (per channel c: m_c, s_c)
    post_quant_conv:  W' = W diag(s),       b' = b + W m                     (so that W' z' + b' = W z + b)

with m, s the mean and standard deviation of posterior samples of the training images, and `scale_factor` 1.
Decoding is unchanged (the script checks the round trips); only the coordinates the diffusion model works in change.

    python benchmarks/standardise_vae.py runs/from-scratch/vae runs/vae-demo-std
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minildm.autoencoder import AutoencoderKL
from minildm.data import ShapesDataset
from minildm.saving import write_folder_atomically
from minildm.train_vae import to_tensor_batch


@torch.no_grad()
def channel_moments(vae: AutoencoderKL, pixels, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (C,), (C,) of unscaled posterior samples of `pixels` (N, H, W, 3);
    the batch starting at image i draws its noise from seed i."""
    samples = torch.cat([vae.encode(to_tensor_batch(pixels[i:i + batch])).sample(torch.Generator().manual_seed(i))
                         for i in range(0, len(pixels), batch)])                     # (N, C, h, w)
    return samples.mean(dim=(0, 2, 3)), samples.std(dim=(0, 2, 3))


@torch.no_grad()
def standardise(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> AutoencoderKL:
    """Fold z' = (z - mean) / std into quant_conv and its inverse into post_quant_conv, in place; scale_factor 1."""
    c = vae.config.latent_channels
    quant, post = vae.quant_conv, vae.post_quant_conv                  # (2C, 2C, 1, 1) and (C, C, 1, 1) convs
    # mu' = (W_mu h + b_mu - m) / s
    quant.weight[:c] /= std.view(c, 1, 1, 1)
    quant.bias[:c] = (quant.bias[:c] - mean) / std
    # log var' = log var - 2 log s
    quant.bias[c:] -= 2 * torch.log(std)
    # b' = b + W m, then W' = W diag(s)
    post.bias += post.weight[:, :, 0, 0] @ mean
    post.weight *= std.view(1, c, 1, 1)
    vae.config.scale_factor = 1.0
    return vae


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vae", help="a VAE folder (config.json + model.safetensors)")
    p.add_argument("out", help="a new folder for the standardised VAE")
    p.add_argument("--images", type=int, default=4096, help="training images (data seed 0) to measure m and s on")
    args = p.parse_args(argv)
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists; give a new folder (nothing was written)")
    vae = AutoencoderKL.from_folder(args.vae).eval()
    pixels = ShapesDataset(args.images, seed=0).pixels()
    mean, std = channel_moments(vae, pixels)
    x = to_tensor_batch(pixels[:256])
    before = vae.reconstruct(x)
    standardise(vae, mean, std)
    changed = (vae.reconstruct(x) - before).abs().max().item()
    new_mean, new_std = channel_moments(vae, pixels[:1024])
    print(f"per-channel mean {[round(v, 3) for v in mean.tolist()]} -> {[round(v, 3) for v in new_mean.tolist()]}; "
          f"std {[round(v, 3) for v in std.tolist()]} -> {[round(v, 3) for v in new_std.tolist()]}; round trips "
          f"changed by at most {changed:.2g}")
    if changed > 1e-3:
        raise SystemExit(f"the round trips changed by {changed:.3g}: the fold is wrong; nothing was written")
    source = Path(args.vae) / "training.json"
    notes = {"standardised_from": str(args.vae), "channel_mean": mean.tolist(), "channel_std": std.tolist(),
             "round_trip_max_change": changed,
             **({"heldout_psnr": json.loads(source.read_text())["heldout_psnr"]} if source.exists() else {})}
    write_folder_atomically(args.out, {"config.json": vae.config.to_dict(), "model.safetensors": vae.state_dict(),
                                       "training.json": notes}, kind="model")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
