"""Chapter 02: training the VAE, and fine-tuning its decoder into a "VAE file".

The loop is ordinary AdamW on reconstruction + beta * KL (+ an optional PatchGAN term). Three things make it
trustworthy rather than merely working:

- exact resume: every random draw at step s (which images, which posterior noise) comes from a generator seeded by
  (seed, s), and the Adam moments are saved, so stopping at step 300 and resuming gives the same weights as never
  stopping;
- atomic checkpoints (see saving.py): an interrupted save keeps the last good folder;
- a non-finite loss stops training at once, naming the step, and weights with a NaN or inf are never saved
  (training_guards.py, shared with the diffusion trainer).

At the end the latent scale factor s = 1 / std(latents) is measured on the training data and saved in the config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm import tqdm

from minildm.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    check_halvable_latent,
    latent_shape,
    save_decoder_file,
    scale_equivariance_loss,
    vae_loss,
)
from minildm.checkpoint import (
    load_state_dict,
    load_weights_into,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_config,
    read_safetensors_metadata,
)
from minildm.data import EVAL_SEED, ImageFolderDataset, ShapesDataset, to_tensor_batch
from minildm.device import get_device
from minildm.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
)
from minildm.metrics import psnr
from minildm.saving import CONFIG_NAME, WEIGHTS_NAME, read_json, write_folder_atomically
from minildm.training_guards import (
    check_gradients_finite,
    check_run_folder,
    check_weights_finite,
    has_checkpoint,
    kept_checkpoint,
    non_finite_loss,
    optimizer_step,
)

TRAINER_NAME = "trainer.json"


@dataclass
class VAETrainConfig:
    steps: int = 2000                    # the defaults: benchmarks/train_speed.py's best measured recipe, 28 dB
    batch_size: int = 16                 # in under 8 minutes on a 2-core CPU (assets/shapes64-vae/README.md)
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_fraction: float = 0.05        # cosine decay to 5% of lr
    kl_weight: float = 1e-6              # beta, as in SD's VAE
    recon_loss: str = "l1+mse"
    scale_equivariance: float = 0.0      # weight of the decoder's loss on 2x-pooled latents (0: off; chapter 06)
    gan: bool = False
    disc_start: int = 2000
    disc_weight: float = 0.5
    disc_lr: float = 2e-4
    seed: int = 0
    data_seed: int = 0
    num_train_images: int = 20_000
    image_size: int = 64
    data_dir: str | None = None          # an image folder instead of Shapes
    save_every: int = 500
    eval_images: int = 512
    scale_images: int = 2048             # images used to measure the scale factor
    finetune_decoder: str | None = None  # a VAE folder: freeze its encoder, train only the decoder


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The random source for one step: a pure function of (seed, step, stream), which is what makes resume exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + stream)


def learning_rate(cfg: VAETrainConfig, step: int) -> float:
    """Linear warm-up, then a cosine decay to min_lr_fraction * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def apply_learning_rate(optimizer: torch.optim.Optimizer, cfg, step: int) -> float:
    """Set every parameter group's lr to the schedule's value at `step` (cfg has lr, warmup_steps, steps and
    min_lr_fraction: the VAE's and the diffusion model's configs both do); returns it."""
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


HOLD_OUT_EVERY = 10  # with --data-dir, every 10th image is kept out of training to measure PSNR on


def folder_pixels(cfg: VAETrainConfig) -> torch.Tensor:
    """Every image of --data-dir, read once, as (N, H, W, 3) uint8."""
    folder = ImageFolderDataset(cfg.data_dir, cfg.image_size)
    stacked = torch.stack([folder[i]["image"] for i in range(len(folder))])
    return ((stacked + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def is_held_out(count: int) -> torch.Tensor:
    """Which of `count` folder images are held out: every 10th, once there are at least 20 (else none)."""
    index = torch.arange(count)
    if count < 2 * HOLD_OUT_EVERY:
        return torch.zeros(count, dtype=torch.bool)
    return index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def training_pixels(cfg: VAETrainConfig) -> torch.Tensor:
    """All training images, rendered (or read) once, as (N, H, W, 3) uint8: 20,000 Shapes images are 245 MB."""
    if cfg.data_dir:
        pixels = folder_pixels(cfg)
        return pixels[~is_held_out(len(pixels))]
    pixels = ShapesDataset(cfg.num_train_images, seed=cfg.data_seed, image_size=cfg.image_size).pixels()
    return torch.from_numpy(pixels)


@torch.no_grad()
def measure_scale_factor(vae: AutoencoderKL, pixels: torch.Tensor, count: int, seed: int) -> float:
    """s = 1 / std(z) over posterior samples of training images, so that z_0 = s z has unit variance (SD: 0.18215)."""
    # BEGIN SOLUTION ch02.scale_factor
    samples, device = [], next(vae.parameters()).device
    stop = min(count, len(pixels))
    for start in range(0, stop, 256):
        x = to_tensor_batch(pixels[start:min(start + 256, stop)].numpy()).to(device)
        samples.append(vae.encode(x).sample(step_generator(seed, start, 9)).cpu())
    # s = 1 / std(z)
    return float(1.0 / torch.cat(samples).std())
    # END SOLUTION


@torch.no_grad()
def evaluate_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> float:
    """Mean PSNR of decode(mean of encode(x)) against x: the deterministic reconstruction."""
    vae.eval()
    device = next(vae.parameters()).device
    scores = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device)
        scores.append(psnr(vae.reconstruct(x), x).cpu())
    return float(torch.cat(scores).mean())


def held_out_images(cfg: VAETrainConfig) -> torch.Tensor:
    """Images training never saw: Shapes of a seed kept for evaluation, or the held-out tenth of --data-dir (a folder
    of fewer than 20 images holds nothing back, and its PSNR is then measured on training images)."""
    if cfg.data_dir:
        pixels = folder_pixels(cfg)
        held = is_held_out(len(pixels))
        return to_tensor_batch((pixels[held] if held.any() else pixels)[: cfg.eval_images].numpy())
    return ShapesDataset(cfg.eval_images, seed=EVAL_SEED, image_size=cfg.image_size).images()


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The frozen encoder's posterior (mean, logvar) for every image of `pixels` (N, H, W, 3) uint8, computed once:
    (N, 2C, h, w) on the VAE's device. Training the decoder (here) and the diffusion model (train_ldm.py) both draw
    fresh posterior samples from these moments each step instead of running the encoder again."""
    vae.eval()
    device = next(vae.parameters()).device
    moments = []
    for i in range(0, len(pixels), batch):
        posterior = vae.encode(to_tensor_batch(pixels[i:i + batch].numpy()).to(device))
        moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1))   # (b, 2C, h, w)
    return torch.cat(moments)                                                  # (N, 2C, h, w)


class VAETrainer:
    """Holds the model, optimizers and step; `run()` trains to cfg.steps, saving as it goes."""

    def __init__(self, cfg: VAETrainConfig, out: str | Path, model_config: AutoencoderConfig | None = None,
                 resume: bool = False, progress: bool = True, device: str | torch.device | None = None):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.device = get_device(device)  # float32 on any device; random draws stay on the CPU (exact resume anywhere)
        self.step, self.history, self.train_seconds = 0, [], 0.0   # train_seconds: summed over every resumed run
        self.saved_step = None                                      # the step of the checkpoint in --out, if any
        has_checkpoint(self.out, resume, TRAINER_NAME)              # --out is the checkpoint folder
        check_run_folder(self.out, resume)
        torch.manual_seed(cfg.seed)
        if cfg.finetune_decoder:
            self.vae = AutoencoderKL.from_folder(cfg.finetune_decoder)
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        else:
            self.vae = AutoencoderKL(model_config or AutoencoderConfig.shapes64())
        if cfg.scale_equivariance:  # refused before any data is drawn, not at the first step
            check_halvable_latent(*latent_shape(cfg.image_size, cfg.image_size, self.vae.config)[1:])
        self.vae.to(self.device)  # before the optimizers exist, so their state is created (and resumed) on the device
        trainable = [p for p in self.vae.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.5, 0.9) if cfg.gan else (0.9, 0.999))
        self.disc = self.disc_opt = None
        if cfg.gan:
            if cfg.image_size < 32:
                raise ValueError(f"--gan needs images of at least 32x32 (the PatchGAN's 5 convs shrink them), got "
                                 f"{cfg.image_size}")
            self.disc = PatchDiscriminator(self.vae.config.out_channels).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
        if resume:
            self.load()
        self.pixels = training_pixels(cfg)
        self.cached = self.cache_posteriors() if cfg.finetune_decoder else None

    def cache_posteriors(self) -> torch.Tensor:
        """Fine-tuning the decoder: the frozen encoder's moments for every training image, computed once."""
        return encode_moments(self.vae, self.pixels)

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr = apply_learning_rate(self.opt, cfg, step)
        self.vae.train()
        index = torch.randint(len(self.pixels), (cfg.batch_size,), generator=step_generator(cfg.seed, step, 0))
        x = to_tensor_batch(self.pixels[index].numpy()).to(self.device)    # (B, 3, H, W)
        if self.cached is not None:
            posterior = DiagonalGaussian(self.cached[index.to(self.device)])
        else:
            posterior = self.vae.encode(x)
        z = posterior.sample(step_generator(cfg.seed, step, 1))              # (B, C, h, w)
        x_hat = self.vae.decode(z)
        loss, parts = vae_loss(x_hat, x, posterior, cfg.kl_weight, cfg.recon_loss)
        if cfg.scale_equivariance:
            parts["se"] = scale_equivariance_loss(self.vae, z, x, cfg.recon_loss)
            # L = rec + beta * KL + lambda_SE * L_SE
            loss = loss + cfg.scale_equivariance * parts["se"]
        if self.disc is not None and step >= cfg.disc_start:
            g_loss = generator_loss(self.disc(x_hat))
            weight = adaptive_weight(parts["rec"], g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + cfg.disc_weight * weight * g_loss
            parts["g_loss"] = g_loss.detach()
        if not torch.isfinite(loss):
            raise non_finite_loss(loss.item(), step, self.kept(), "Lower --lr, or check the data for NaN/inf")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        check_gradients_finite(self.vae, step, self.kept(), "Check the data for extreme values")
        optimizer_step(self.opt.step, lr, step, self.kept())
        if self.disc is not None and step >= cfg.disc_start:
            self.disc.train()
            d_loss = hinge_d_loss(self.disc(x), self.disc(x_hat.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            optimizer_step(self.disc_opt.step, cfg.disc_lr, step, self.kept())
            parts["d_loss"] = d_loss.detach()
        self.step += 1
        out = {"step": self.step, "loss": float(loss.detach()), "lr": lr, "psnr": float(psnr(x_hat, x).mean())}
        out.update({k: float(v.detach()) for k, v in parts.items()})
        return out

    def run(self, stop_after: int | None = None, after_step: Callable[[dict], None] | None = None) -> dict:
        """Train to cfg.steps (the schedule's length), or for at most `stop_after` steps now: resume later.
        `after_step(record)` is called after every step (`minildm demo --train` moves its overall bar with it)."""
        cfg = self.cfg
        start_time, start_step = time.time(), self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train-vae", dynamic_ncols=True)
        while self.step < end:
            record = self.train_step()
            if self.step % 50 == 0 or self.step == cfg.steps:
                self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.1f}", psnr=f"{record['psnr']:.2f}")
            bar.update(1)
            if after_step is not None:
                after_step(record)
            if self.step % cfg.save_every == 0 and self.step < end:
                self.train_seconds += time.time() - start_time
                start_time = time.time()
                self.save()
        bar.close()
        self.train_seconds += time.time() - start_time
        if self.step < cfg.steps:  # stopped early on purpose: save everything needed to resume, nothing else
            self.save()
            return {"steps": self.step, "steps_this_run": self.step - start_step, "stopped_early": True,
                    "train_seconds": round(self.train_seconds, 1)}
        if not cfg.finetune_decoder:
            self.vae.config.scale_factor = measure_scale_factor(self.vae, self.pixels, cfg.scale_images, cfg.seed)
        held_out = held_out_images(cfg)
        summary = {"steps": self.step, "steps_this_run": self.step - start_step,
                   "train_seconds": round(self.train_seconds, 1),
                   "heldout_psnr": round(evaluate_psnr(self.vae, held_out), 3),
                   "scale_factor": self.vae.config.scale_factor}
        if cfg.finetune_decoder:  # the VAE file's worth: the same latents, decoded by the old and the new decoder
            before = evaluate_psnr(AutoencoderKL.from_folder(cfg.finetune_decoder).to(self.device), held_out)
            summary.update(heldout_psnr_before=round(before, 3), gain_db=round(summary["heldout_psnr"] - before, 3))
        self.save(summary)
        return summary

    def kept(self) -> str:
        return kept_checkpoint(self.out, self.saved_step)

    def save(self, summary: dict | None = None) -> None:
        """Write --out atomically, after checking the weights: a NaN never replaces a good checkpoint."""
        weights = {**{f"vae.{k}": v for k, v in self.vae.state_dict().items()},
                   **({f"disc.{k}": v for k, v in self.disc.state_dict().items()} if self.disc is not None else {})}
        check_weights_finite(weights, self.step, self.kept(), "Check the data for extreme values")
        opt_tensors, opt_groups = optimizer_to_tensors(self.opt)
        files = {CONFIG_NAME: self.vae.config.to_dict(), WEIGHTS_NAME: self.vae.state_dict(),
                 "optimizer.safetensors": opt_tensors}
        trainer = {"step": self.step, "train_seconds": self.train_seconds, "train_config": asdict(self.cfg),
                   "optimizer_groups": opt_groups,
                   "history": self.history, "summary": summary}
        if self.disc is not None:
            disc_tensors, disc_groups = optimizer_to_tensors(self.disc_opt)
            files["discriminator.safetensors"] = self.disc.state_dict()
            files["disc_optimizer.safetensors"] = disc_tensors
            trainer["disc_optimizer_groups"] = disc_groups
        files[TRAINER_NAME] = trainer
        write_folder_atomically(self.out, files, kind="vae-training-checkpoint", keep_old=False)
        self.saved_step = self.step
        if self.cfg.finetune_decoder:
            save_decoder_file(self.vae, self.out / "decoder.safetensors")

    def load(self) -> None:
        trainer = read_json(self.out / TRAINER_NAME)
        saved = trainer["train_config"]
        changed = {k for k in saved if k not in ("steps", "save_every") and saved[k] != asdict(self.cfg).get(k)}
        if changed:
            raise ValueError(
                f"{self.out}: was trained with different settings ({', '.join(sorted(changed))}); resume with the "
                "same options (only --steps may change) or start a new --out"
            )
        self.vae.config = AutoencoderConfig.from_dict(read_config(self.out))
        load_weights_into(self.vae, self.out)
        optimizer_from_tensors(self.opt, load_state_dict(self.out / "optimizer.safetensors"),
                               trainer["optimizer_groups"])
        if self.disc is not None:
            load_weights_into(self.disc, self.out, "discriminator.safetensors")
            optimizer_from_tensors(self.disc_opt, load_state_dict(self.out / "disc_optimizer.safetensors"),
                                   trainer["disc_optimizer_groups"])
        self.step, self.history, self.train_seconds = trainer["step"], trainer["history"], trainer["train_seconds"]
        self.saved_step = self.step


def export_model(run_folder: str | Path, export_to: str | Path, notes: dict, half: bool = False) -> Path:
    """Copy just the model (config.json + model.safetensors, and a VAE file if the run made one) out of a training
    folder, with a training record. `half` stores the weights in float16: half the size; they load back into
    float32 models (the record should say what that costs, e.g. in PSNR)."""
    def stored(tensors: dict) -> dict:
        return {k: v.half() if half and v.is_floating_point() else v for k, v in tensors.items()}

    run_folder = Path(run_folder)
    files = {CONFIG_NAME: read_config(run_folder), WEIGHTS_NAME: stored(load_state_dict(run_folder / WEIGHTS_NAME)),
             "training.json": {**notes, "weights_dtype": "float16" if half else "float32"}}
    decoder = run_folder / "decoder.safetensors"
    if decoder.is_file():
        metadata = read_safetensors_metadata(decoder, "VAE file")
        files["decoder.safetensors"] = save(stored(load_state_dict(decoder, "VAE file")), metadata=metadata)
    return write_folder_atomically(export_to, files, kind="model")


__all__ = ["VAETrainConfig", "VAETrainer", "apply_learning_rate", "encode_moments", "export_model", "learning_rate",
           "step_generator"]
