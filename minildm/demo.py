"""`minildm demo`: the chapters' main claims, computed from the shipped weights and written as figures.

Chapter 01-02 version: the compression numbers, reconstructions with their PSNR, the latent channels, and an
interpolation in pixel space vs latent space with its double exposures counted. Later chapters add sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minildm import manifold, viz
from minildm.autoencoder import AutoencoderConfig, compression_ratio, latent_shape
from minildm.data import ShapesDataset
from minildm.metrics import psnr
from minildm.pretrained import load_vae

DEMO_DATA_SEED = 777  # never used for training


def compression_table(config: AutoencoderConfig) -> list[dict]:
    """Values per image and per latent for SD's sizes and ours: the 48x of chapter 01."""
    rows = []
    for name, (h, w), cfg in [("SD v1, 512x512", (512, 512), AutoencoderConfig.sd_v1()),
                              ("SD v1, 768x512", (768, 512), AutoencoderConfig.sd_v1()),
                              ("minildm shapes64, 64x64", (64, 64), config)]:
        c, lh, lw = latent_shape(h, w, cfg)
        rows.append({"what": name, "image": f"3x{h}x{w}", "image_values": 3 * h * w, "latent": f"{c}x{lh}x{lw}",
                     "latent_values": c * lh * lw, "ratio": compression_ratio(h, w, cfg)})
    return rows


@torch.no_grad()
def run_demo(out: Path, device=None, seed: int = 0) -> list[tuple[Path, str]]:
    vae = load_vae("shapes64", device=device)
    dev = next(vae.parameters()).device
    written: list[tuple[Path, str]] = []

    table = compression_table(vae.config)
    (out / "compression.json").write_text(json.dumps(table, indent=2) + "\n")
    written.append((out / "compression.json", "; ".join(f"{r['what']}: {r['image_values']:,} -> {r['latent_values']:,} "
                                                         f"values ({r['ratio']:.0f}x)" for r in table)))

    images = ShapesDataset(8, seed=DEMO_DATA_SEED + seed).images().to(dev)     # (8, 3, 64, 64), never trained on
    posterior = vae.encode(images)
    recon = vae.decode(posterior.mean).clamp(-1, 1)
    scores = psnr(recon, images)
    path = viz.show_rows([images.cpu(), recon.cpu()], ["original", "reconstruction"],
                         [f"{s:.1f} dB" for s in scores.tolist()], out / "reconstructions.png")
    written.append((path, f"8 held-out images and their reconstructions, mean PSNR {scores.mean():.2f} dB"))

    path = viz.show_latent_channels(images[:4].cpu(), (posterior.mean[:4] * vae.config.scale_factor).cpu(),
                                    out / "latent_channels.png")
    written.append((path, "the 4 latent channels (8x8 each) of 4 images"))

    # A frame is a double exposure when more of it is off-palette than in any real image (for pixel frames), or
    # than in any of the VAE's own reconstructions of real images (for decoded frames, which carry its blur).
    threshold = manifold.walk_thresholds(vae, ShapesDataset(256, seed=DEMO_DATA_SEED + 1).images())
    pixel_frames = manifold.interpolate_pixels(images[0].cpu(), images[1].cpu(), 8)
    latent_frames = manifold.interpolate_latents(vae, images[0], images[1], 8)
    pixel_ghosts = int(manifold.double_exposures(pixel_frames, threshold["pixels"]).sum())
    latent_ghosts = int(manifold.double_exposures(latent_frames, threshold["latents"]).sum())
    path = viz.show_rows([pixel_frames, latent_frames],
                         [f"pixels\n{pixel_ghosts} double", f"latents\n{latent_ghosts} double"], None,
                         out / "interpolation.png")
    written.append((path, f"interpolation a->b: {pixel_ghosts}/8 frames are double exposures in pixel space, "
                          f"{latent_ghosts}/8 in latent space"))
    return written
