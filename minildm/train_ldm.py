"""Chapter 06: training the latent diffusion model.

One step of training is chapter 03's forward process run backwards as a regression (Ho et al. 2020): take a clean
latent z_0, a uniform timestep t and fresh noise eps, build z_t in one jump, and ask the U-Net for eps back. Around
that step sit the things that make a run trustworthy:

- the VAE runs once, before training: every image's posterior (mean, logvar) is cached (latent_cache.py), and each
  step draws a fresh latent from it (the encoder is frozen, so running it again every step would redo the same work);
- caption dropout: a share of captions is replaced by the empty prompt, so one network learns both eps(z_t, c) and
  eps(z_t, "") — the pair classifier-free guidance needs at sampling time (Ho & Salimans 2022);
- an exponential moving average (EMA, ema.py) of the weights, which is what we sample from;
- AdamW with a linear warm-up and a cosine decay, mixed precision where the device has it (ldm_recipe.py);
- exact resume (every random draw of step s comes from a generator seeded by (seed, rank, s)), atomic checkpoints
  that never hold a NaN (training_guards.py), and Ctrl-C that saves a resumable checkpoint before it exits;
- DistributedDataParallel under torchrun (distributed.py): each rank trains on its own shard; rank 0 alone writes.

The settings and the networks are in ldm_recipe.py, the export of a finished run in ldm_export.py; this file is
the loss, the loop and its checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from minildm.autoencoder import DiagonalGaussian
from minildm.checkpoint import (
    load_state_dict,
    load_weights_into,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_config,
)
from minildm.data import ShapesDataset, to_tensor_batch
from minildm.distributed import (
    StopRequested,
    join_process_group,
    process_placement,
    replicas_identical,
    stop_agreed,
)
from minildm.ema import EMA
from minildm.latent_cache import LATENT_CACHE, cache_identity, load_or_encode
from minildm.ldm_recipe import Denoiser, LDMTrainConfig, ModelConfigs, autocast_dtype, check_parts_fit
from minildm.pipeline import LatentDiffusion
from minildm.pixel_space import PixelSpace
from minildm.pretrained import load_vae_folder, vae_folder_or_name
from minildm.saving import read_json, write_folder_atomically
from minildm.schedule import NoiseSchedule
from minildm.text import Tokenizer
from minildm.timestep_sampling import draw_timesteps, timestep_probabilities
from minildm.train_vae import apply_learning_rate, step_generator
from minildm.training_guards import (
    check_run_folder,
    check_weights_finite,
    has_checkpoint,
    kept_checkpoint,
    non_finite_loss,
    optimizer_step,
)

SAMPLES = "samples"                  # the sample grids written every --sample-every steps
CHECKPOINT = "checkpoint"            # the atomic folder inside --out that --resume reads
TRAINER_NAME = "trainer.json"
SAMPLE_PROMPTS = ("a large red circle in the centre", "a small blue square at the top left",
                  "a medium green triangle at the bottom right", "a large yellow diamond at the left")


def diffusion_loss(denoiser: nn.Module, schedule: NoiseSchedule, z0: Tensor, t: Tensor, noise: Tensor,
                   ids: Tensor) -> Tensor:
    """The loss of one training step: L = E || target - model(z_t, t, c) ||^2, the "simple" loss of Ho et al. (2020).

    z_0 (B, C, h, w) are clean latents, t (B,) uniform timesteps, noise (B, C, h, w) standard normal, ids (B, L) the
    captions' token ids. With eps as the target, this is a denoising score-matching loss at every noise level at once.
    """
    # BEGIN SOLUTION ch06.training_loss
    # z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
    zt = schedule.q_sample(z0, t, noise)                                  # (B, C, h, w)
    output = denoiser(zt, t, ids)                                         # (B, C, h, w)
    target = schedule.training_target(z0, noise, t)                       # (B, C, h, w)
    # L = mean over batch and elements of (target - output)^2, in float32 even under autocast
    return F.mse_loss(output.float(), target.float())
    # END SOLUTION


def data_settings(cfg: LDMTrainConfig) -> dict:
    """The settings that decide a run's training data: two runs that agree on them train on the same tensors."""
    return {name: getattr(cfg, name) for name in ("space", "vae", "num_train_images", "data_seed", "image_size")}


class LDMTrainer:
    """Holds the denoiser, its EMA, the optimizer and the step; `run()` trains to cfg.steps, saving as it goes.

    Building one reads the checkpoint (with resume) and makes the networks, nothing more: joining the other ranks and
    encoding the data wait for `prepare()`, which `run()` and `train_step()` call."""

    def __init__(self, cfg: LDMTrainConfig, out: str | Path, models: ModelConfigs | None = None,
                 resume: bool = False, progress: bool = True, device: str | torch.device | None = None):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.rank, self.world_size, self.device = process_placement(device)
        self.autocast = autocast_dtype(self.device, cfg.precision)
        has_checkpoint(self.out / CHECKPOINT, resume, TRAINER_NAME)
        check_run_folder(self.out, resume, ours=(LATENT_CACHE, SAMPLES))
        self.step, self.history, self.train_seconds, self.saved_step = 0, [], 0.0, None
        if resume:
            models = ModelConfigs.from_dict(read_config(self.out / CHECKPOINT))
        models = models or ModelConfigs()
        # the train config says what the U-Net predicts and whether the last step is pure noise; the schedule saved
        # with the model follows it (a zero-terminal-SNR model samples from that last step: "trailing" timesteps)
        schedule = replace(models.schedule, prediction_type=cfg.prediction_type)
        if cfg.zero_terminal_snr:
            schedule = replace(schedule, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.models = replace(models, schedule=schedule)
        self.autoencoder = (load_vae_folder(self.vae_path(), self.device) if cfg.space == "latent"
                            else PixelSpace(cfg.image_size))
        torch.manual_seed(cfg.seed)            # the initial weights: the same on every rank
        self.tokenizer = Tokenizer(max_length=self.models.text_encoder.max_length)
        self.empty_ids = self.tokenizer.encode("").ids                # (1, L): what a dropped caption becomes
        self.model = self.models.denoiser().to(self.device)
        check_parts_fit(self.autoencoder, self.model, self.tokenizer, self.models.schedule, cfg.image_size)
        self.ema = EMA(self.model, cfg.ema_decay)
        # p_t for the timesteps; None: uniform, drawn exactly as before the other samplings existed
        self.t_probabilities = (None if cfg.t_sampling == "uniform"
                                else timestep_probabilities(self.models.schedule, cfg.t_sampling, cfg.min_snr_gamma))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
        if resume:
            self.load()
        self.trained: nn.Module = self.model      # DDP's wrapper (and compile's) once prepare() has run
        self.ids = self.z_source = None           # the data, once prepare() has loaded it
        self.unread: list[Tensor] = []            # (loss, grad norm) of each step since the last record, on the device

    def vae_path(self) -> Path:
        return vae_folder_or_name(self.cfg.vae)

    # ----------------------------------------------------------------------------------------------- data

    def prepare(self, data_from: "LDMTrainer | None" = None) -> None:
        """Join the other ranks (under torchrun) and load the data: token ids of every caption (N, L), and what z_0 is
        drawn from: the cached posterior moments (N, 2C, h, w) in latent space, the uint8 pixels (N, H, W, 3) in
        pixel space. Done once; later calls return at once. `data_from`: a prepared trainer with the same data
        settings whose data this one shares instead of loading its own (benchmarks train recipes side by side)."""
        if self.ids is not None:
            return
        if data_from is not None and data_settings(data_from.cfg) != data_settings(self.cfg):
            raise ValueError(f"cannot share data prepared for {data_settings(data_from.cfg)} with a run that needs "
                             f"{data_settings(self.cfg)}; prepare it on its own")
        if self.world_size > 1:
            join_process_group(self.device)
            self.trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            # the same parameters behind a compiled forward and backward: the EMA and the optimizer see no change
            self.trained = torch.compile(self.trained)
        if data_from is not None:
            self.z_source, self.ids = data_from.z_source, data_from.ids          # read, never written: safe to share
            return
        cfg = self.cfg
        data = ShapesDataset(cfg.num_train_images, seed=cfg.data_seed, image_size=cfg.image_size)
        pixels = torch.from_numpy(data.pixels())                                    # (N, H, W, 3) uint8
        if cfg.space == "latent":
            identity = cache_identity(self.autoencoder, cfg.num_train_images, cfg.data_seed, cfg.image_size)
            moments = load_or_encode(self.out / LATENT_CACHE, self.autoencoder, pixels, identity, self.rank,
                                     self.world_size)
            self.z_source = moments.to(self.device)                                 # (N, 2C, h, w)
        else:
            self.z_source = pixels
        self.ids = self.tokenizer.encode(data.captions()).ids                       # (N, L)

    def shard(self) -> Tensor:
        """This rank's share of the training set: items rank, rank + W, rank + 2W, ... (DistributedSampler's split)."""
        return torch.arange(self.cfg.num_train_images)[self.rank::self.world_size]

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Step `step`'s z_0, ids (after caption dropout), t and eps: a pure function of (seed, rank, step)."""
        cfg = self.cfg
        B = cfg.batch_size
        seed = cfg.seed * 1009 + self.rank
        shard = self.shard()
        index = shard[torch.randint(len(shard), (B,), generator=step_generator(seed, step, 0))]
        if cfg.space == "latent":
            posterior = DiagonalGaussian(self.z_source[index.to(self.device)])
            # z_0 = s * (a fresh sample of the posterior), so that z_0 has unit variance
            z0 = self.autoencoder.to_z0(posterior.sample(step_generator(seed, step, 1)))   # (B, C, h, w)
        else:
            z0 = to_tensor_batch(self.z_source[index].numpy()).to(self.device)             # (B, 3, H, W)
        ids = self.ids[index].clone()                                                      # (B, L)
        drop = torch.rand(B, generator=step_generator(seed, step, 2)) < cfg.caption_dropout
        ids[drop] = self.empty_ids                                                         # "" for dropped captions
        t = draw_timesteps(self.t_probabilities, B, self.models.schedule.num_timesteps, step_generator(seed, step, 3))
        noise = torch.randn(z0.shape, generator=step_generator(seed, step, 4))
        return z0, ids.to(self.device), t.to(self.device), noise.to(self.device)

    # ----------------------------------------------------------------------------------------------- training

    def train_step(self) -> dict:
        """One optimizer step. The loss and the gradient norm stay on the device: reading them would make the CPU wait
        for the GPU every step; run() reads them together when it records them."""
        self.prepare()
        cfg, step = self.cfg, self.step
        lr = apply_learning_rate(self.opt, cfg, step)
        self.model.train()
        z0, ids, t, noise = self.batch(step)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = diffusion_loss(self.trained, self.models.schedule, z0, t, noise, ids)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        optimizer_step(lambda: self.scaler.step(self.opt), lr, step, self.kept())
        self.scaler.update()
        self.ema.update(self.model, step)
        self.step += 1
        return {"step": self.step, "loss": loss.detach(), "lr": lr, "grad_norm": grad_norm.detach()}

    def run(self, stop_after: int | None = None, after_step: Callable[[dict], None] | None = None) -> dict:
        """Train to cfg.steps, or for at most `stop_after` steps now (resume later). Ctrl-C saves and stops.
        `after_step(record)` is called after every step (`minildm demo --train` moves its overall bar with it)."""
        self.prepare()
        cfg = self.cfg
        start_time, start_step = time.time(), self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or self.rank != 0,
                   desc=f"train-ldm ({cfg.space})", dynamic_ncols=True)
        with StopRequested() as stop:
            while self.step < end and not stop_agreed(stop, self.world_size, self.device):
                record = self.train_step()
                self.unread.append(torch.stack([record["loss"], record["grad_norm"]]))    # no wait for the device
                if self.step % cfg.log_every == 0 or self.step == end:
                    self.record(record, self.train_seconds + time.time() - start_time)
                    bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}", lr=f"{record['lr']:.1e}")
                bar.update(1)
                if after_step is not None:
                    after_step(record)
                if self.step % cfg.save_every == 0 and self.step < end:
                    self.train_seconds += time.time() - start_time
                    start_time = time.time()
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.rank == 0:
                    self.write_sample_grid()
            interrupted = stop.requested
        bar.close()
        self.train_seconds += time.time() - start_time
        summary = {"steps": self.step, "steps_this_run": self.step - start_step,
                   "train_seconds": round(self.train_seconds, 1), "world_size": self.world_size,
                   "final_loss": self.history[-1]["loss"] if self.history else None,
                   "replicas_identical": replicas_identical(self.model)}
        if self.step < cfg.steps:
            summary["stopped_early"] = True
            if interrupted:
                summary["interrupted"] = True
        self.save(summary)
        return summary

    def record(self, last: dict, seconds: float) -> None:
        """Add the mean loss since the last record to the history (a smoother curve than single steps)."""
        losses = self.read_steps()[:, 0]
        self.history.append({"step": self.step, "loss": float(losses.double().mean()), "lr": last["lr"],
                             "grad_norm": float(last["grad_norm"]), "seconds": round(seconds, 2)})
        self.unread = []

    def read_steps(self) -> Tensor:
        """(loss, grad norm) of each step since the last record, read from the device in one go. The first non-finite
        one stops training and names its step; this runs at every record and before every save, so a bad step is
        never saved."""
        steps = torch.stack(self.unread).float().cpu() if self.unread else torch.zeros(0, 2)    # (n, 2)
        first = self.step - len(steps)
        bad_loss = (~torch.isfinite(steps[:, 0])).nonzero().flatten().tolist()
        # under fp16 an inf gradient is routine: the GradScaler skips that step and lowers its scale
        bad_grad = [] if self.scaler.is_enabled() else (~torch.isfinite(steps[:, 1])).nonzero().flatten().tolist()
        if bad_grad and (not bad_loss or bad_grad[0] < bad_loss[0]):
            raise FloatingPointError(f"a gradient became {float(steps[bad_grad[0], 1])} at step {first + bad_grad[0]} "
                                     f"although its loss was finite; training stopped and {self.kept()}. "
                                     f"{self.overflow_hint()}")
        if bad_loss:
            step = first + bad_loss[0]
            raise non_finite_loss(float(steps[bad_loss[0], 0]), step, self.kept(), self.loss_cause(step))
        return steps

    def loss_cause(self, step: int) -> str:
        """What to try after a non-finite loss. The step's batch is a pure function of the step: look at it again."""
        if not torch.isfinite(self.batch(step)[0]).all():
            where = f"the latent cache {self.out / LATENT_CACHE}" if self.cfg.space == "latent" else "the images"
            return f"That step's z_0 holds NaN or inf: check the data and {where}"
        return "Lower --lr" + (", or use --precision fp32" if self.autocast is not None else "")

    def overflow_hint(self) -> str:
        """What to try when numbers overflowed on a finite loss (the lr is not to blame for that)."""
        return "Try --precision fp32" if self.autocast is not None else "Check the training data for extreme values"

    def kept(self) -> str:
        return kept_checkpoint(self.out / CHECKPOINT, self.saved_step)

    # ------------------------------------------------------------------------------------ checkpoints

    def save(self, summary: dict | None = None) -> None:
        """Rank 0 writes the checkpoint folder atomically: an interrupted save keeps the previous one. Every loss and
        every weight is checked first: a NaN never replaces a good checkpoint."""
        self.read_steps()
        if self.rank == 0:
            weights = {**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                       **{f"ema.{k}": v for k, v in self.ema.shadow.items()}}
            check_weights_finite(weights, self.step, self.kept(), self.overflow_hint())
            opt_tensors, opt_groups = optimizer_to_tensors(self.opt)
            trainer = {"step": self.step, "train_seconds": self.train_seconds, "train_config": asdict(self.cfg),
                       "optimizer_groups": opt_groups, "scaler": self.scaler.state_dict(),
                       "history": self.history, "summary": summary, "world_size": self.world_size}
            files = {"config.json": {**self.models.to_dict(), "space": self.cfg.space,
                                     "vae": str(self.vae_path()) if self.cfg.space == "latent" else None,
                                     "image_size": self.cfg.image_size, "tokenizer_words": self.tokenizer.words},
                     "model.safetensors": self.model.state_dict(), "ema.safetensors": self.ema.shadow,
                     "optimizer.safetensors": opt_tensors, TRAINER_NAME: trainer}
            write_folder_atomically(self.out / CHECKPOINT, files, kind="ldm-training-checkpoint", keep_old=False)
        self.saved_step = self.step
        if self.world_size > 1:
            dist.barrier()

    def load(self) -> None:
        folder = self.out / CHECKPOINT
        trainer = read_json(folder / TRAINER_NAME)
        saved, now = trainer["train_config"], asdict(self.cfg)
        may_change = ("steps", "save_every", "sample_every", "log_every")
        # a setting added after the checkpoint was saved (min_snr_gamma) trained it at its default
        defaults = asdict(LDMTrainConfig())
        changed = {k for k in {*saved, *now}
                   if k not in may_change and saved.get(k, defaults.get(k)) != now.get(k)}
        if changed:
            raise ValueError(f"{self.out}: was trained with different settings ({', '.join(sorted(changed))}); "
                             "resume with the same options (only --steps and how often to save may change) or start "
                             "a new --out")
        if trainer.get("world_size", 1) != self.world_size:
            raise ValueError(f"{self.out} was trained on {trainer['world_size']} process(es), this is "
                             f"{self.world_size}; resume with the same --nproc_per_node (each rank's data is its own)")
        load_weights_into(self.model, folder)
        self.ema.shadow = {k: v.to(self.device) for k, v in load_state_dict(folder / "ema.safetensors").items()}
        optimizer_from_tensors(self.opt, load_state_dict(folder / "optimizer.safetensors"), trainer["optimizer_groups"])
        self.scaler.load_state_dict(trainer["scaler"])
        self.step, self.history, self.train_seconds = trainer["step"], trainer["history"], trainer["train_seconds"]
        self.saved_step = self.step

    # ------------------------------------------------------------------------------------ what it learned

    def ema_denoiser(self) -> Denoiser:
        """A copy of the denoiser holding the EMA weights, in eval mode: the model we sample from and ship."""
        return self.ema.copy_to(self.models.denoiser().to(self.device)).eval()

    def write_sample_grid(self) -> Path:
        """A grid of SAMPLE_PROMPTS (rows) x 4 seeds, from the EMA weights, in --out/samples/."""
        from minildm.viz import image_grid

        ema = self.ema_denoiser()
        pipe = LatentDiffusion(self.autoencoder, ema.unet, ema.text_encoder, self.tokenizer, self.models.schedule,
                               device=self.device)
        prompts = [p for p in SAMPLE_PROMPTS for _ in range(4)]
        images = pipe.text_to_image(prompts, steps=25, seed=0, height=self.cfg.image_size, width=self.cfg.image_size)
        path = self.out / SAMPLES / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=4).save(path)
        return path
