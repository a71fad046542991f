"""The Shapes dataset (a pure function of (seed, index), captions that match the factors) and ImageFolderDataset."""

import numpy as np
import pytest
import torch
from PIL import Image

from minildm.data import COLOURS, SHAPE_KINDS, ImageFolderDataset, ShapesDataset


def size_word(size: float) -> str:
    return "small" if size < 0.26 else "medium" if size < 0.34 else "large"


def position_words(x: float, y: float) -> str:
    """The caption's place, worked out from the centre by thirds of the image."""
    row = ("top", "", "bottom")[min(int(y * 3), 2)]
    col = ("left", "", "right")[min(int(x * 3), 2)]
    where = " ".join(w for w in (row, col) if w)
    return f"at the {where}" if where else "in the centre"


def nearest_colour(pixel: torch.Tensor) -> str:
    rgb = ((pixel + 1) * 127.5).tolist()
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


# ------------------------------------------------------------------------------------------------- Shapes


def test_an_item_is_a_pure_function_of_seed_and_index_whatever_the_access_order():
    first, second = ShapesDataset(seed=7), ShapesDataset(seed=7)
    forwards = [first[i] for i in (3, 4, 5)]
    backwards = [second[i] for i in (5, 4, 3)][::-1]
    for a, b in zip(forwards, backwards):
        assert torch.equal(a["image"], b["image"]), "the same (seed, index) gave different images"
        assert a["caption"] == b["caption"] and a["factors"] == b["factors"]
    assert torch.equal(first[4]["image"], forwards[1]["image"]), "asking twice gave a different image"


def test_different_seeds_give_different_images():
    a, b = ShapesDataset(seed=0), ShapesDataset(seed=1)
    same = sum(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    assert same == 0, f"{same} of 8 images are identical across seeds 0 and 1"


def test_an_image_is_float32_3x64x64_in_minus_one_to_one():
    image = ShapesDataset()[0]["image"]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1, f"range [{image.min()}, {image.max()}]"
    assert image.min() < -0.5 and image.max() > 0.5, "the image uses almost none of the range"


@pytest.mark.parametrize("size", [32, 50, 96])
def test_any_image_size_renders_the_same_scene(size):
    item = ShapesDataset(image_size=size)[2]
    assert item["image"].shape == (3, size, size)
    default = ShapesDataset()[2]
    assert item["factors"] == default["factors"] and item["caption"] == default["caption"]


def test_captions_name_the_kind_colour_size_and_place_of_the_factors():
    ds = ShapesDataset(seed=3)
    for i in range(40):
        item = ds[i]
        (obj,) = item["factors"]["objects"]
        expected = f"a {size_word(obj.size)} {obj.colour} {obj.kind} {position_words(obj.x, obj.y)}"
        assert item["caption"] == expected, f"item {i}: caption {item['caption']!r}, factors say {expected!r}"
        assert obj.kind in SHAPE_KINDS and obj.colour in COLOURS


def test_the_image_shows_the_factors_the_shape_colour_sits_at_its_centre():
    ds = ShapesDataset(seed=4, num_objects=(1, 3))
    for i in range(20):
        item = ds[i]
        top = item["factors"]["objects"][-1]                          # drawn last, so nothing covers it
        row, col = int(top.y * 64), int(top.x * 64)
        found = nearest_colour(item["image"][:, row, col])
        assert found == top.colour, f"item {i}: pixel at the {top.kind}'s centre is {found}, factors say {top.colour}"


def test_two_or_three_objects_give_a_caption_joined_by_and():
    ds = ShapesDataset(seed=5, num_objects=(2, 3))
    counts = set()
    for i in range(30):
        item = ds[i]
        objects = item["factors"]["objects"]
        counts.add(len(objects))
        parts = item["caption"].split(" and ")
        assert len(parts) == len(objects), f"item {i}: {len(objects)} objects, caption {item['caption']!r}"
        assert all(obj.kind in part and obj.colour in part for obj, part in zip(objects, parts))
    assert counts == {2, 3}, f"object counts seen: {counts}"


def test_images_and_captions_equal_the_items_stacked():
    ds = ShapesDataset(seed=6, num_objects=(1, 2))
    batch = ds.images(10, 5)
    assert batch.shape == (5, 3, 64, 64) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([ds[i]["image"] for i in range(10, 15)]))
    assert ds.captions(10, 5) == [ds[i]["caption"] for i in range(10, 15)]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_objects": 0}, "num_objects"),
        ({"num_objects": (3, 2)}, "num_objects"),
        ({"image_size": 4}, "image_size"),
        ({"length": -1}, "length"),
    ],
)
def test_bad_arguments_raise_value_errors_that_name_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ShapesDataset(**kwargs)


def test_a_negative_index_is_an_index_error():
    with pytest.raises(IndexError, match="-1"):
        ShapesDataset()[-1]


# ------------------------------------------------------------------------------------------ image folder


def save(path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def test_an_image_folder_gives_square_centre_crops_in_range(tmp_path):
    save(tmp_path / "wide_cat.png", Image.new("RGB", (120, 80), (200, 30, 30)))
    save(tmp_path / "tall.jpg", Image.new("RGB", (40, 90), (30, 200, 30)), quality=95)
    save(tmp_path / "sub" / "small.jpeg", Image.new("RGB", (20, 30), (30, 30, 200)))   # upscaled; in a subfolder
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, image_size=32)
    assert len(ds) == 3, [str(p) for p in ds.paths]
    for item in ds:
        image = item["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32, item["path"]
        assert image.min() >= -1 and image.max() <= 1, item["path"]
    assert {item["caption"] for item in ds} == {"wide cat", "tall", "small"}


@pytest.mark.parametrize("mode, fill", [("RGBA", (200, 30, 30, 128)), ("L", 90), ("P", 3)])
def test_rgba_greyscale_and_palette_images_become_rgb(tmp_path, mode, fill):
    save(tmp_path / "x.png", Image.new(mode, (40, 40), fill))
    image = ImageFolderDataset(tmp_path, image_size=16)[0]["image"]
    assert image.shape == (3, 16, 16)
    if mode == "L":
        assert torch.allclose(image[0], image[1]) and torch.allclose(image[1], image[2]), "grey should stay grey"
        assert abs(image[0, 0, 0].item() - (90 / 127.5 - 1)) < 1e-6


@pytest.mark.parametrize("size, margins", [((96, 64), "left/right"), ((64, 112), "top/bottom")])
def test_the_crop_takes_the_centre_and_drops_the_margins(tmp_path, size, margins):
    # A red centre square with blue margins on two sides: a centre crop sees only red.
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:] = (40, 90, 220)
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    pixels[top:top + side, left:left + side] = (220, 50, 47)
    save(tmp_path / "framed.png", Image.fromarray(pixels))
    image = ImageFolderDataset(tmp_path, image_size=64)[0]["image"]
    red = torch.tensor([220, 50, 47]) / 127.5 - 1
    err = (image - red.view(3, 1, 1)).abs().max().item()
    assert err < 2 / 255, f"the crop of an image with {margins} margins is not all red: max error {err:.3f}"


def test_a_scaled_centre_crop_keeps_the_middle(tmp_path):
    # 256x128 with its middle 128x128 red, scaled to 64x32 and cropped to 32x32: the middle stays red.
    pixels = np.zeros((128, 256, 3), dtype=np.uint8)
    pixels[:] = (40, 90, 220)
    pixels[:, 64:192] = (220, 50, 47)
    save(tmp_path / "framed.png", Image.fromarray(pixels))
    image = ImageFolderDataset(tmp_path, image_size=32)[0]["image"]
    red = torch.tensor([220, 50, 47]) / 127.5 - 1
    inner = image[:, :, 2:-2]                                        # bicubic may blur the outermost columns
    err = (inner - red.view(3, 1, 1)).abs().max().item()
    assert err < 4 / 255, f"the middle of the scaled crop is not red: max error {err:.3f}"


def test_a_missing_or_empty_folder_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        ImageFolderDataset(missing)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        ImageFolderDataset(empty)


def test_a_corrupt_or_truncated_image_is_a_value_error_naming_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    ds = ImageFolderDataset(tmp_path)
    names = [p.name for p in ds.paths]
    assert names == ["garbage.png", "good.png", "truncated.png"], names
    with pytest.raises(ValueError, match="garbage.png"):
        ds[0]
    assert ds[1]["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="truncated.png"):
        ds[2]
