"""Pictures: image grids, latent channels, interpolation strips, reverse-diffusion strips and GIFs. Matplotlib and
Pillow only; nothing here is imported by the models."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves; notebooks draw inline
import numpy as np
import torch
from PIL import Image, ImageDraw

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
              path: str | Path | None = None, scale: float = 1.3, wrap: int | None = None):
    """A figure of image rows (each (B, 3, H, W)) with a label per row and optional per-column titles. `wrap` sets
    long labels (prompts) horizontally, broken into lines of at most that many characters. The images are pasted
    into one picture on one Axes: a figure with an Axes per image takes seconds to build."""
    pixels = [to_uint8(row) for row in rows]                            # each (B, H, W, 3)
    ncols = max(len(row) for row in pixels)
    h, w = max(row.shape[1] for row in pixels), max(row.shape[2] for row in pixels)
    gap = max(2, w // 10)                                               # white space between images, in pixels
    canvas = np.full((len(rows) * (h + gap) - gap, ncols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(pixels):
        for c, image in enumerate(row):
            canvas[r * (h + gap): r * (h + gap) + image.shape[0], c * (w + gap): c * (w + gap) + image.shape[1]] = image
    label_width = 0.07 * wrap if wrap else 0.3                          # inches: about 0.07 per character at 8 pt
    fig, ax = plt.subplots(figsize=(scale * ncols + label_width, scale * len(rows) + (0.3 if titles else 0.1)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for r, label in enumerate(row_labels):
        ax.text(-gap, r * (h + gap) + h / 2, textwrap.fill(label, wrap) if wrap else label, fontsize=8,
                ha="right", va="center", rotation=0 if wrap else 90, multialignment="right" if wrap else "center")
    for c, title in enumerate(titles or []):
        ax.text(c * (w + gap) + w / 2, -gap, title, fontsize=7, ha="center", va="bottom")
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


def reverse_diffusion_strip(zt_images: torch.Tensor, z0_hat_images: torch.Tensor, timesteps: list[float],
                            path: str | Path | None = None, columns: int = 10):
    """Two rows over `columns` evenly spaced steps: what the sampler holds (z_t, decoded) and what the model thinks
    the end will be (z0_hat, decoded). z0_hat settles on a layout long before z_t stops looking like noise."""
    n = len(timesteps)
    picks = sorted({round(i * (n - 1) / max(columns - 1, 1)) for i in range(min(columns, n))})
    return show_rows([zt_images[picks], z0_hat_images[picks]], ["z_t\n(decoded)", "z0_hat\n(decoded)"],
                     [f"t = {timesteps[i]:.0f}" for i in picks], path)


def reverse_diffusion_frames(zt_images: torch.Tensor, z0_hat_images: torch.Tensor, timesteps: list[float],
                             upscale: int = 4) -> list[Image.Image]:
    """One frame per step: decoded z_t | decoded z0_hat, enlarged, under a line that says which step it is."""
    frames = []
    for i, t in enumerate(timesteps):
        pair = image_grid(torch.stack([zt_images[i], z0_hat_images[i]]), nrow=2, upscale=upscale)
        frame = Image.new("RGB", (pair.width, pair.height + 14), (255, 255, 255))
        frame.paste(pair, (0, 14))
        ImageDraw.Draw(frame).text((4, 2), f"step {i + 1}/{len(timesteps)}  t = {t:.0f}   z_t | z0_hat", fill=(0, 0, 0))
        frames.append(frame)
    return frames


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int = 150, hold_last_ms: int = 1500,
             colours: int | None = None) -> Path:
    """An animated GIF that loops, one frame per image (Pillow's save_all), holding the last frame a little.
    `colours` (at most 256) gives every frame one shared palette of that many colours, without dithering: dithered
    per-frame palettes turn smooth gradients into speckle that compresses badly, so this halves the file."""
    if colours is not None:
        if not 2 <= colours <= 256:
            raise ValueError(f"a GIF palette holds 2 to 256 colours, got colours={colours}; pass 256 or fewer")
        width, height = frames[0].size
        montage = Image.new("RGB", (width, height * len(frames)))           # every frame, stacked: one palette
        for i, frame in enumerate(frames):
            montage.paste(frame.convert("RGB"), (0, height * i))
        palette = montage.quantize(colours, dither=Image.Dither.NONE)
        frames = [frame.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    durations = [ms_per_frame] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return Path(path)


def save_or_return(fig, path: str | Path | None):
    if path is None:
        return fig
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.05)   # "tight": labels outside the Axes too
    plt.close(fig)
    return Path(path)


def plot_training_curves(rows: list[dict], target: float, target_label: str, ylabel: str,
                         labels: dict[str, str] | None = None, figsize: tuple[float, float] = (6.4, 3.8)):
    """Chapters 02 and 06 (benchmarks/train_speed.py): each recipe's score against wall-clock minutes, one line per
    row ({"recipe", "points": [{"wall_s", "score"}, ...]}), with the target dashed. Returns (fig, ax) to adjust."""
    fig, ax = plt.subplots(figsize=figsize)
    for row in rows:
        minutes = [point["wall_s"] / 60 for point in row["points"]]
        ax.plot(minutes, [point["score"] for point in row["points"]], marker="o",
                label=(labels or {}).get(row["recipe"], row["recipe"]))
    ax.axhline(target, color="grey", ls="--", label=target_label)
    ax.set(xlabel="wall-clock minutes (data preparation + training)", ylabel=ylabel)
    ax.set_xlim(left=0)
    return fig, ax
