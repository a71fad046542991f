"""The embedded dataset, Shapes, and a loader for your own folder of images.

Shapes needs no download, is as large as you like and is reproducible: item i of the dataset with seed k is a pure
function of (k, i). Each image shows a shape (circle, square, triangle, diamond) of a named colour, with a size, a
position and a rotation, on a plain background, plus a caption ("a small red circle at the top left") and the
factors that made it. Because we know the factors, we know the true dimension of the image manifold: a single
object has 4 continuous factors (size, x, y, rotation; a circle has 3), which chapter 01 measures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 40),
    "purple": (150, 60, 200),
    "orange": (245, 130, 30),
}
BACKGROUNDS = {"dark": (30, 30, 34), "light": (225, 225, 220)}
SIZE_RANGE = (0.18, 0.42)            # the shape's circumradius as a fraction of the image side
SIZE_WORDS = ((0.26, "small"), (0.34, "medium"), (1.0, "large"))
POSITION_WORDS = (("top left", "top", "top right"),
                  ("left", "centre", "right"),
                  ("bottom left", "bottom", "bottom right"))
SUPERSAMPLE = 4                      # draw at 4x and downsample: anti-aliased edges, like a photo's
EVAL_SEED = 2024                     # a seed no model trains on: the held-out images and captions of every metric
OTHER_REAL_SEED = 6060               # a second real set: the held-out captions redrawn, or other captions


@dataclass(frozen=True)
class ShapeFactors:
    """What made one object: two discrete factors and four continuous ones (all in [0, 1] except the angle)."""

    kind: str
    colour: str
    size: float       # circumradius / image side
    x: float          # centre, fraction of the width (0 = left)
    y: float          # centre, fraction of the height (0 = top)
    rotation: float   # radians; ignored by circles

    def describe(self) -> str:
        where = position_word(self.x, self.y)
        place = "in the centre" if where == "centre" else f"at the {where}"
        return f"a {size_word(self.size)} {self.colour} {self.kind} {place}"


def size_word(size: float) -> str:
    """The caption's word for a circumradius (fraction of the side): small < 0.26 <= medium < 0.34 <= large. Sizes past
    the last limit (a judge measuring a blob that fills the frame) are large too."""
    return next((word for limit, word in SIZE_WORDS if size < limit), SIZE_WORDS[-1][1])


def position_word(x: float, y: float) -> str:
    """The caption's place for a centre (fractions of width and height): the image cut into thirds each way."""
    col = min(max(int(x * 3), 0), 2)                 # a centre measured outside the frame counts as its edge
    row = min(max(int(y * 3), 0), 2)
    return POSITION_WORDS[row][col]


def caption(factors: dict) -> str:
    """The scene in words: each object described, joined by "and"."""
    return " and ".join(obj.describe() for obj in factors["objects"])


def draw_factor(rng: np.random.Generator, rotation: bool) -> ShapeFactors:
    size = float(rng.uniform(*SIZE_RANGE))
    margin = size * 0.9  # keep most of the shape inside the frame
    return ShapeFactors(
        kind=SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))],
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        size=size,
        x=float(rng.uniform(margin, 1 - margin)),
        y=float(rng.uniform(margin, 1 - margin)),
        rotation=float(rng.uniform(0, 2 * math.pi)) if rotation else 0.0,
    )


def draw_like(rng: np.random.Generator, obj: ShapeFactors, rotation: bool, accept: Callable[[ShapeFactors], bool],
              tries: int) -> ShapeFactors | None:
    """The generator's own size, position and rotation drawn afresh with `obj`'s kind and colour, until `accept`
    takes one (None after `tries` draws). Rejection sampling: the result is drawn exactly from the generator's
    distribution conditioned on what `accept` asks of it."""
    for _ in range(tries):
        candidate = replace(draw_factor(rng, rotation), kind=obj.kind, colour=obj.colour)
        if accept(candidate):
            return candidate
    return None


def redraw_factor(rng: np.random.Generator, obj: ShapeFactors, rotation: bool, tries: int = 100_000) -> ShapeFactors:
    """The same words, fresh continuous factors: another draw of the generator's own size, position and rotation,
    kept only when it describes the object in the same words (`obj.describe()`). Kind and colour are kept.

    Rejection sampling draws exactly from the generator's distribution conditioned on the caption: a second real
    image of the same caption, as different from the first as the words allow.
    """
    words = obj.describe()
    redrawn = draw_like(rng, obj, rotation, lambda candidate: candidate.describe() == words, tries)
    if redrawn is not None:
        return redrawn
    raise ValueError(f"no redraw of {words!r} matched its words in {tries} tries; pass more tries (every caption "
                     f"the generator writes matches about one draw in 30 or more)")


def polygon(factors: ShapeFactors, side: int) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (3 = triangle, 4 = square/diamond) around the centre, in pixels."""
    corners = {"triangle": 3, "square": 4, "diamond": 4}[factors.kind]
    offset = {"triangle": -math.pi / 2, "square": math.pi / 4, "diamond": 0.0}[factors.kind]
    r, cx, cy = factors.size * side, factors.x * side, factors.y * side
    angles = [offset + factors.rotation + 2 * math.pi * i / corners for i in range(corners)]
    if factors.kind == "diamond":  # a rhombus: squashed along one axis
        return [(cx + r * math.cos(a) * (0.6 if i % 2 else 1.0), cy + r * math.sin(a) * (0.6 if i % 2 else 1.0))
                for i, a in enumerate(angles)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def render(objects: list[ShapeFactors], background: str, size: int = 64) -> np.ndarray:
    """Draw objects (first is at the back) on a plain background: (size, size, 3) uint8."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    pen = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = COLOURS[obj.colour]
        if obj.kind == "circle":
            r, cx, cy = obj.size * big, obj.x * big, obj.y * big
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            pen.polygon(polygon(obj, big), fill=fill)
    return np.array(canvas.resize((size, size), Image.BOX))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return to_tensor_batch(pixels[None])[0]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> (..., H, W, 3) uint8, for saving and plotting."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.movedim(-3, -1).numpy()


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes with captions and known factors. `dataset[i]` -> {"image", "caption", "factors"}.

    Args:
        length: how many items `len()` reports (items past it exist too: the generator is infinite).
        seed: which dataset; different seeds give independent images (use a fresh seed for evaluation).
        image_size: side in pixels (any size; 64 by default).
        num_objects: objects per image, an int or an inclusive (low, high) range.
        rotation: whether shapes are rotated (adds one continuous factor).
    """

    def __init__(self, length: int = 10_000, seed: int = 0, image_size: int = 64,
                 num_objects: int | tuple[int, int] = 1, rotation: bool = True):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        low, high = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
        if not 1 <= low <= high:
            raise ValueError(f"num_objects must be >= 1 (or a range low <= high), got {num_objects}")
        self.length, self.seed, self.image_size = length, seed, image_size
        self.num_objects, self.rotation = (low, high), rotation

    def __len__(self) -> int:
        return self.length

    def factors(self, index: int) -> dict:
        # A pure function of (seed, index): a fresh generator seeded by both, never shared state.
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        objects = [draw_factor(rng, self.rotation) for _ in range(count)]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        return {"background": background, "objects": objects}

    def render_factors(self, factors: dict) -> np.ndarray:
        return render(factors["objects"], factors["background"], self.image_size)   # (H, W, 3) uint8

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        f = self.factors(index)
        return {"image": to_tensor(self.render_factors(f)), "caption": caption(f), "factors": f}

    def pixels(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Items start..start+count rendered as one (count, H, W, 3) uint8 array (compact, for caching)."""
        count = self.length - start if count is None else count
        out = np.empty((count, self.image_size, self.image_size, 3), dtype=np.uint8)
        for j in range(count):
            out[j] = self.render_factors(self.factors(start + j))
        return out

    def images(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Items start..start+count as one (count, 3, H, W) float batch in [-1, 1]."""
        return to_tensor_batch(self.pixels(start, count))

    def captions(self, start: int = 0, count: int | None = None) -> list[str]:
        count = self.length - start if count is None else count
        return [caption(self.factors(i)) for i in range(start, start + count)]


class SameCaptionsDataset(ShapesDataset):
    """A second real set for the captions of `base`: item i has item i's caption (same kinds, colours, background and
    words) with every object's size, position and rotation drawn afresh by `seed` (see redraw_factor).

    Two real sets that differ only where the captions leave room are the fair scale for a Frechet distance between
    generated images and the real images of the same captions.
    """

    def __init__(self, base: ShapesDataset, seed: int):
        super().__init__(base.length, base.seed, base.image_size, base.num_objects, base.rotation)
        self.base, self.redraw_seed = base, seed

    def factors(self, index: int) -> dict:
        # A pure function of (redraw seed, base seed, index), like ShapesDataset.factors
        rng = np.random.default_rng([self.redraw_seed, self.base.seed, index])
        scene = self.base.factors(index)
        return {"background": scene["background"],
                "objects": [redraw_factor(rng, obj, self.rotation) for obj in scene["objects"]]}


def to_tensor_batch(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def resize_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (high-quality filter), then cut the central size x size square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Your own images: every image file under `root` (recursively), resized and centre-cropped to image_size."""

    def __init__(self, root: str | os.PathLike, image_size: int = 64):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder; pass a folder that holds .png/.jpg images")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise FileNotFoundError(
                f"{self.root}: holds no image files ({', '.join(IMAGE_SUFFIXES)}); point to a folder of images"
            )
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: cannot be read as an image ({err}); remove or replace the file") from err
        pixels = np.array(resize_centre_crop(img, self.image_size))
        return {"image": to_tensor(pixels), "caption": path.stem.replace("_", " "), "path": str(path)}
