"""A judge for Shapes: a small CNN that reads back the factors a caption names, so we can score generated images.

It reads one single-object image and says the kind, colour, size word, position word and background. Kind, colour
and background are ordinary class heads. Size and position words have hard boundaries (a circumradius of 0.259 is
"small", 0.261 is "medium"), so the judge does not guess the words: it regresses size, x and y and cuts them with the
same thresholds the captions use (`data.size_word`, `data.position_word`). To be precise enough it measures them the
way a photographer would: a per-pixel coverage mask, whose area gives the radius once the kind is known and whose
centroid is the centre. Its penultimate vector (`features`) is the space for the Frechet distance in `metrics.py`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minildm.checkpoint import config_from_dict, load_weights_into, read_config
from minildm.data import BACKGROUNDS, COLOURS, SHAPE_KINDS, ShapesDataset, position_word, size_word
from minildm.saving import CONFIG_NAME, WEIGHTS_NAME, write_folder_atomically

TRAIN_SEED = 4242     # the judge's training images; the VAE and LDM train on seed 0, evaluation uses 2024
HELDOUT_SEED = 4343   # the images its reported accuracy is measured on (never trained on)
FACTORS = ("kind", "colour", "size", "position", "background")


@dataclass
class JudgeConfig:
    """Everything needed to rebuild the judge."""

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)   # the trunk's conv widths; each of the first three halves the side
    mask_hidden: int = 16                          # width of the small full-resolution coverage network
    geometry_dim: int = 32                         # width of the geometry embedding appended to the trunk's features

    @classmethod
    def from_dict(cls, d: dict, source=None) -> "JudgeConfig":
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])   # JSON stores tuples as lists
        return config_from_dict(cls, d, source)

    @property
    def feature_dim(self) -> int:
        return self.channels[-1] + self.geometry_dim


def spatial_moments(mask: Tensor) -> Tensor:
    """(B, 1, H, W) coverage in [0, 1] -> (B, 7): centroid x, y, sqrt(area), sqrt(polar moment J), |c_2|, |c_3|, |c_4|.

    For a filled shape of circumradius r, area = a_kind r^2 and J = j_kind r^2, so both square roots are linear in r:
    with the kind known, either gives the size. The complex moments c_k = mean over the shape of
    ((dx + i dy) / sqrt(J))^k do not change with rotation or size, and a k-fold symmetric shape has c_k != 0 while a
    circle has none: |c_2| picks out the squashed diamond, |c_3| the triangle and |c_4| the square.
    """
    B, _, H, W = mask.shape
    xs = (torch.arange(W, device=mask.device, dtype=mask.dtype) + 0.5) / W        # (W,) pixel centres in (0, 1)
    ys = (torch.arange(H, device=mask.device, dtype=mask.dtype) + 0.5) / H        # (H,)
    m = mask[:, 0]                                                                 # (B, H, W)
    mass = m.sum(dim=(1, 2)).clamp_min(1e-6)                                       # (B,)
    # c_x = sum m x / sum m, and the same for y
    cx = (m.sum(dim=1) * xs).sum(dim=1) / mass                                     # (B,)
    cy = (m.sum(dim=2) * ys).sum(dim=1) / mass                                     # (B,)
    dx = xs[None, None, :] - cx[:, None, None]                                     # (B, 1, W)
    dy = ys[None, :, None] - cy[:, None, None]                                     # (B, H, 1)
    # J = sum m ((x - c_x)^2 + (y - c_y)^2) / sum m
    polar = (m * (dx ** 2 + dy ** 2)).sum(dim=(1, 2)) / mass                       # (B,)
    unit = torch.complex(dx.expand_as(m), dy.expand_as(m)) / polar.clamp_min(1e-8).sqrt()[:, None, None]   # (B, H, W)
    symmetry = [((m * unit ** k).sum(dim=(1, 2)) / mass).abs() for k in (2, 3, 4)]  # 3 x (B,)
    area = mass / (H * W)                                                          # (B,) fraction of the image
    return torch.stack([cx, cy, area.sqrt(), polar.clamp_min(0).sqrt(), *symmetry], dim=1)    # (B, 7)


def quadratic(moments: Tensor) -> Tensor:
    """(B, 7) -> (B, 28): every product m_i m_j with i <= j, the second-order terms of the size rule."""
    i, j = torch.triu_indices(moments.shape[1], moments.shape[1], device=moments.device)
    return moments[:, i] * moments[:, j]


class Judge(nn.Module):
    """image (B, 3, 64, 64) in [-1, 1] -> {"kind", "colour", "background": logits; "size", "x", "y": (B,); ...}.

    Two paths: a strided conv trunk, pooled to one vector, recognises kind, colour and background; a per-pixel
    network paints a coverage mask whose moments measure size and centre. The heads read their concatenation, the
    `features` vector; size, x and y start from the moments (size through a per-kind linear rule) plus a learned
    correction for shapes cut by the frame.
    """

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for i, c in enumerate(config.channels):
            stride = 2 if i < len(config.channels) - 1 else 1
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        h = config.mask_hidden
        self.coverage = nn.Sequential(nn.Conv2d(3, h, 3, padding=1), nn.SiLU(), nn.Conv2d(h, 1, 1))
        trunk_dim = config.channels[-1]
        self.geometry = nn.Sequential(nn.Linear(7 + trunk_dim, config.geometry_dim), nn.SiLU())
        self.kind_head = nn.Linear(config.feature_dim, len(SHAPE_KINDS))
        self.colour_head = nn.Linear(config.feature_dim, len(COLOURS))
        self.background_head = nn.Linear(config.feature_dim, len(BACKGROUNDS))
        self.size_per_kind = nn.Linear(7, len(SHAPE_KINDS))     # size = a_k sqrt(area) + b_k sqrt(J) + ... for kind k
        self.correction = nn.Linear(config.feature_dim, 3)      # small learned fixes to (size, x, y)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)
        # the size rule's quadratic terms (frame clipping bends the linear rule); not trained by SGD but solved by
        # least squares after it (`fit_size_rule`), so a buffer: zero until then, and then it changes nothing else
        self.register_buffer("size_quadratic", torch.zeros(len(SHAPE_KINDS), 28))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.check_images(x)
        pooled = self.trunk(x).mean(dim=(2, 3))                                   # (B, C)
        mask = torch.sigmoid(self.coverage(x))                                    # (B, 1, H, W) coverage in [0, 1]
        moments = spatial_moments(mask)                                           # (B, 7)
        features = torch.cat([pooled, self.geometry(torch.cat([moments, pooled], 1))], 1)   # (B, F)
        kind = self.kind_head(features)                                           # (B, 4)
        # size = sum_k p(k) (a_k sqrt(area) + b_k sqrt(J) + ...): the radius rule of the kind the judge sees
        rule = self.size_per_kind(moments) + quadratic(moments) @ self.size_quadratic.T   # (B, 4) one per kind
        # training: size = sum_k p(k) rule_k, so every kind's rule learns; judging: the rule of the kind it reads.
        # (p is detached: the size loss must not teach the kind head to guess sizes)
        gate = kind.softmax(dim=1).detach() if self.training else F.one_hot(kind.argmax(1), len(SHAPE_KINDS))
        size = (gate * rule).sum(dim=1)                                             # (B,)
        fix = 0.01 * self.correction(features)                                    # (B, 3)
        return {"kind": kind, "colour": self.colour_head(features), "background": self.background_head(features),
                "size": size + fix[:, 0], "x": moments[:, 0] + fix[:, 1], "y": moments[:, 1] + fix[:, 2],
                "mask": mask, "features": features}

    def check_images(self, x: Tensor) -> None:
        s = self.config.image_size
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            given = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the judge reads (B, 3, {s}, {s}) images in [-1, 1], got {given}; "
                             f"resize with F.interpolate(x, size=({s}, {s}), mode='area') first")

    @classmethod
    def from_folder(cls, folder) -> "Judge":
        """A model folder (config.json + model.safetensors) -> the judge, on the CPU, weights checked strictly."""
        return load_weights_into(cls(JudgeConfig.from_dict(read_config(folder), Path(folder) / CONFIG_NAME)), folder)


@torch.no_grad()
def read_words(judge: Judge, images: Tensor, batch: int = 256) -> list[dict[str, str]]:
    """The words the judge reads in each image: {"kind", "colour", "size", "position", "background"}."""
    judge.eval()
    device = next(judge.parameters()).device
    words = []
    for start in range(0, len(images), batch):
        out = judge(images[start:start + batch].to(device).float())
        kinds, colours = out["kind"].argmax(1).tolist(), out["colour"].argmax(1).tolist()
        backs = out["background"].argmax(1).tolist()
        for j, (s, x, y) in enumerate(zip(out["size"].tolist(), out["x"].tolist(), out["y"].tolist())):
            words.append({"kind": SHAPE_KINDS[kinds[j]], "colour": list(COLOURS)[colours[j]], "size": size_word(s),
                          "position": position_word(x, y), "background": list(BACKGROUNDS)[backs[j]]})
    return words


def factor_words(factors: dict) -> dict[str, str]:
    """The words of a single-object scene's factors (`ShapesDataset.factors(i)`), as the caption says them."""
    obj = factors["objects"][0]
    return {"kind": obj.kind, "colour": obj.colour, "size": size_word(obj.size),
            "position": position_word(obj.x, obj.y), "background": factors["background"]}


# ------------------------------------------------------------------------------------------------- training

def training_targets(dataset: ShapesDataset, count: int) -> dict[str, Tensor]:
    """Class indices and continuous values for items 0..count of a single-object dataset."""
    all_factors = [dataset.factors(i) for i in range(count)]
    objs = [f["objects"][0] for f in all_factors]
    return {"kind": torch.tensor([SHAPE_KINDS.index(o.kind) for o in objs]),
            "colour": torch.tensor([list(COLOURS).index(o.colour) for o in objs]),
            "background": torch.tensor([list(BACKGROUNDS).index(f["background"]) for f in all_factors]),
            "size": torch.tensor([o.size for o in objs]), "x": torch.tensor([o.x for o in objs]),
            "y": torch.tensor([o.y for o in objs])}


def coverage_target(pixels: Tensor, targets: dict[str, Tensor], index: Tensor) -> Tensor:
    """The true coverage of each pixel, read off the clean image: (B, 1, H, W).

    The renderer box-filters a 4x drawing, so an edge pixel is exactly alpha fg + (1 - alpha) bg; alpha is the
    pixel's distance from the background colour over the foreground's.
    """
    fg = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[targets["colour"][index]]       # (B, 3)
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)[targets["background"][index]]
    step = (fg - bg)[:, :, None, None]                                                              # (B, 3, 1, 1)
    # alpha = <p - bg, fg - bg> / |fg - bg|^2
    alpha = ((pixels - bg[:, :, None, None]) * step).sum(1, keepdim=True) / step.pow(2).sum(1, keepdim=True)
    return alpha.clamp(0, 1)


def augment(x: Tensor, mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mild blur and noise, so the judge also reads VAE-decoded images; the blur is applied to the mask target too."""
    B = x.shape[0]
    sigma = torch.rand(B, generator=generator) * 0.8                                   # (B,) blur in pixels
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))    # (B, 3)
    kernel = kernel / kernel.sum(1, keepdim=True)
    k2 = (kernel[:, :, None] * kernel[:, None, :])[:, None]                               # (B, 1, 3, 3)

    def blur(t: Tensor) -> Tensor:
        c = t.shape[1]
        flat = F.pad(t.reshape(1, B * c, *t.shape[2:]), (1, 1, 1, 1), mode="replicate")
        return F.conv2d(flat, k2.repeat_interleave(c, 0), groups=B * c).reshape(t.shape)

    noise = torch.randn(x.shape, generator=generator) * torch.rand(B, 1, 1, 1, generator=generator) * 0.04
    return blur(x) + noise, blur(mask)


def train_judge(steps: int = 3000, num_images: int = 20_000, batch_size: int = 64, lr: float = 3e-3,
                seed: int = 0, data_seed: int = TRAIN_SEED, config: JudgeConfig | None = None,
                log_every: int = 250) -> tuple[Judge, dict]:
    """Train a judge on freshly rendered single-object Shapes; returns it (eval mode) and a record of the run.

    Cross-entropy for the class heads; for size and position a smooth-L1 loss in pixels, plus the coverage mask
    against the true coverage (so the moments measure the right thing). AdamW with a cosine learning rate.
    """
    config = config or JudgeConfig()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = ShapesDataset(num_images, seed=data_seed, image_size=config.image_size)
    started = time.perf_counter()
    pixels = torch.from_numpy(dataset.pixels()).permute(0, 3, 1, 2).contiguous()     # (N, 3, H, W) uint8
    targets = training_targets(dataset, num_images)
    judge = Judge(config)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    side = config.image_size
    for step in range(steps):
        index = torch.randint(num_images, (batch_size,), generator=generator)
        raw = pixels[index].float()                                                    # (B, 3, H, W) in [0, 255]
        x, mask = augment(raw / 127.5 - 1, coverage_target(raw, targets, index), generator)
        out = judge(x)
        loss = sum(F.cross_entropy(out[k], targets[k][index]) for k in ("kind", "colour", "background"))
        loss = loss + sum(F.smooth_l1_loss(out[k] * side, targets[k][index] * side, beta=0.5)
                          for k in ("size", "x", "y"))     # in pixels
        loss = loss + 10 * F.mse_loss(out["mask"], mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    judge.eval()
    record = {"steps": steps, "num_train_images": num_images, "batch_size": batch_size, "lr": lr, "seed": seed,
              "data_seed": data_seed, "train_seconds": round(time.perf_counter() - started, 1),
              "torch_threads": torch.get_num_threads()}
    return judge, record


@torch.no_grad()
def fit_size_rule(judge: Judge, images: Tensor, targets: dict[str, Tensor], ridge: float = 1e-7,
                  batch: int = 500) -> None:
    """Solve the size rule exactly: for each kind, least squares of the true size on [moments, their products, 1].

    The rule is linear in known features, so after SGD has taught the mask we need not wait for SGD to converge
    on it: a float64 least-squares fit on the training images (gated by the true kind) finds the best weights. A
    tiny ridge term keeps the weights small: the products are nearly collinear, and without it the weights reach
    thousands and cancel, so the other kinds' rules (weighted by small but nonzero probabilities) explode.
    """
    judge.eval()
    outs = [judge(images[i:i + batch]) for i in range(0, len(images), batch)]
    moments = torch.cat([spatial_moments(o["mask"]) for o in outs]).double()              # (N, 7)
    fix = torch.cat([0.01 * judge.correction(o["features"])[:, 0] for o in outs]).double()  # (N,) kept as it is
    design = torch.cat([moments, quadratic(moments), torch.ones(len(moments), 1, dtype=torch.float64)], 1)  # (N, 36)
    for k in range(len(SHAPE_KINDS)):
        chosen = targets["kind"] == k
        a, y = design[chosen], targets["size"][chosen].double() - fix[chosen]                     # (N_k, 36), (N_k,)
        # w_k = argmin_w ||a w - y||^2 + ridge N_k ||w||^2 = (a^T a + ridge N_k I)^{-1} a^T y
        w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)   # (36,)
        judge.size_per_kind.weight[k] = w[:7].float()
        judge.size_quadratic[k] = w[7:35].float()
        judge.size_per_kind.bias[k] = w[35].float()


def heldout_accuracy(judge: Judge, count: int = 2000, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Per-factor accuracy on `count` clean real single-object images of `seed`."""
    dataset = ShapesDataset(count, seed=seed, image_size=judge.config.image_size)
    read = read_words(judge, dataset.images())
    truth = [factor_words(dataset.factors(i)) for i in range(count)]
    return {k: float(np.mean([r[k] == t[k] for r, t in zip(read, truth)])) for k in FACTORS}


FLOAT32_KEYS = ("size_per_kind.weight", "size_per_kind.bias", "size_quadratic")   # float16 would cost size accuracy


def rounded(judge: Judge) -> dict[str, Tensor]:
    """The state dict as `export_judge(half=True)` stores it: float16, except the 148 numbers of the size rule."""
    return {k: v if k in FLOAT32_KEYS or not v.is_floating_point() else v.half()
            for k, v in judge.state_dict().items()}


def export_judge(folder, judge: Judge, record: dict, half: bool = True) -> None:
    """Write the judge as a model folder: config.json, model.safetensors (float16 if `half`) and training.json."""
    weights = rounded(judge) if half else judge.state_dict()
    write_folder_atomically(folder, {CONFIG_NAME: dataclasses.asdict(judge.config), WEIGHTS_NAME: weights,
                                     "training.json": {**record, "weights_dtype": "float16" if half else "float32"}},
                            kind="model")


def make_judge_asset(folder, steps: int = 1200, num_images: int = 12_000) -> dict:
    """Train the shipped judge, measure it on 2,000 held-out real images (float32 and float16) and export it."""
    torch.set_num_threads(1)
    judge, record = train_judge(steps=steps, num_images=num_images)
    started = time.perf_counter()
    judge.load_state_dict({k: v.half().float() for k, v in judge.state_dict().items()})   # what float16 stores
    record["heldout_accuracy_before_size_fit"] = heldout_accuracy(judge)
    dataset = ShapesDataset(num_images, seed=record["data_seed"], image_size=judge.config.image_size)
    fit_size_rule(judge, dataset.images(), training_targets(dataset, num_images))
    judge.load_state_dict({k: v.float() for k, v in rounded(judge).items()})
    record["size_fit_seconds"] = round(time.perf_counter() - started, 1)
    record["heldout_accuracy"] = heldout_accuracy(judge)
    record.update(heldout_seed=HELDOUT_SEED, heldout_images=2000, command=(
        f"python -c \"from minildm.judge import make_judge_asset; make_judge_asset('{folder}', steps={steps}, "
        f"num_images={num_images})\""))
    export_judge(folder, judge, record)
    return record


__all__ = ["FACTORS", "HELDOUT_SEED", "TRAIN_SEED", "Judge", "JudgeConfig", "export_judge", "factor_words",
           "fit_size_rule", "heldout_accuracy", "make_judge_asset", "read_words", "spatial_moments", "train_judge"]
