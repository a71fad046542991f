"""Pictures: image grids, latent channels, interpolation strips. Matplotlib and Pillow only; nothing here is imported
by the models."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves; notebooks draw inline
import numpy as np
import torch
from PIL import Image

from minildm.data import to_uint8


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, upscale: int = 1) -> Image.Image:
    """(B, 3, H, W) in [-1, 1] -> one PIL image with `nrow` images per row, separated by white lines."""
    pixels = to_uint8(images)                                           # (B, H, W, 3)
    b, h, w, _ = pixels.shape
    rows = (b + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = pixels[i]
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST) if upscale > 1 else grid


def show_rows(rows: list[torch.Tensor], row_labels: list[str], titles: list[str] | None = None,
              path: str | Path | None = None, scale: float = 1.3):
    """A figure of image rows (each (B, 3, H, W)) with a label per row and optional per-column titles."""
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(scale * ncols, scale * len(rows) + 0.3), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        pixels = to_uint8(row)
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(pixels):
                ax.imshow(pixels[c], interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if titles and r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=7)
    fig.tight_layout()
    return save_or_return(fig, path)


def show_latent_channels(images: torch.Tensor, latents: torch.Tensor, path: str | Path | None = None):
    """Each image next to its latent channels drawn as heat maps (B rows, 1 + C columns)."""
    pixels = to_uint8(images)
    b, c = latents.shape[:2]
    fig, axes = plt.subplots(b, 1 + c, figsize=(1.5 * (1 + c), 1.5 * b), squeeze=False)
    limit = float(latents.abs().max())
    for i in range(b):
        axes[i][0].imshow(pixels[i], interpolation="nearest")
        for j in range(c):
            axes[i][1 + j].imshow(latents[i, j].float().cpu().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit,
                                  interpolation="nearest")
            if i == 0:
                axes[i][1 + j].set_title(f"channel {j}", fontsize=8)
        if i == 0:
            axes[i][0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_or_return(fig, path)


def save_or_return(fig, path: str | Path | None):
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
