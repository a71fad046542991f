"""Chapter 06: training the latent diffusion model.

One step of training is chapter 03's forward process run backwards as a regression (Ho et al. 2020): take a clean
latent z_0, a uniform timestep t and fresh noise eps, build z_t in one jump, and ask the U-Net for eps back. Around
that step sit the things that make a run trustworthy:

- the VAE runs once, before training: every image's posterior (mean, logvar) is cached, and each step draws a fresh
  latent from it (the encoder is frozen, so running it again every step would redo the same work);
- caption dropout: a share of captions is replaced by the empty prompt, so one network learns both eps(z_t, c) and
  eps(z_t, "") — the pair classifier-free guidance needs at sampling time (Ho & Salimans 2022);
- an exponential moving average (EMA) of the weights, which is what we sample from;
- AdamW with a linear warm-up and a cosine decay, mixed precision where the device has it;
- exact resume (every random draw of step s comes from a generator seeded by (seed, rank, s)), atomic checkpoints,
  a stop on the first non-finite loss, and Ctrl-C that saves a resumable checkpoint before it exits;
- DistributedDataParallel under torchrun: each rank trains on its own shard; rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from minildm.autoencoder import DiagonalGaussian
from minildm.checkpoint import (
    config_from_dict,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_config,
    save_file_atomically,
    write_folder_atomically,
)
from minildm.data import ShapesDataset, to_tensor_batch
from minildm.device import get_device
from minildm.pixel_space import PixelSpace
from minildm.pretrained import load_vae_folder, vae_folder
from minildm.schedule import NoiseSchedule
from minildm.text import SPECIAL_TOKENS, TextEncoder, TextEncoderConfig, Tokenizer
from minildm.train_vae import apply_learning_rate, encode_moments, step_generator
from minildm.unet import UNet, UNetConfig

CHECKPOINT = "checkpoint"            # the atomic folder inside --out that --resume reads
LATENT_CACHE = "latents.safetensors"
SAMPLE_PROMPTS = ("a large red circle in the centre", "a small blue square at the top left",
                  "a medium green triangle at the bottom right", "a large yellow diamond at the left")


@dataclass
class LDMTrainConfig:
    steps: int = 4000
    batch_size: int = 128                # per rank
    lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_fraction: float = 0.05        # cosine decay to 5% of lr (train.learning_rate)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    prediction_type: str = "epsilon"     # what the U-Net learns to predict: epsilon, sample (z_0) or v_prediction
    caption_dropout: float = 0.1         # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.999
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (autocast; auto: bf16/fp16 on CUDA, fp32 else)
    space: str = "latent"                # latent: diffuse the VAE's 4x8x8 latents; pixel: the 3x64x64 images
    vae: str = "shapes64"                # a shipped VAE name or a VAE folder
    seed: int = 0
    data_seed: int = 0
    num_train_images: int = 20_000
    image_size: int = 64
    save_every: int = 500
    sample_every: int = 1000             # write a sample grid every this many steps (0: never)
    log_every: int = 25


@dataclass
class ModelConfigs:
    """The two networks training builds: the U-Net and the text encoder it reads, plus the noise schedule."""

    unet: UNetConfig = field(default_factory=lambda: UNetConfig(
        block_out_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, heads=4, context_dim=64,
        norm_num_groups=8))
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(
        vocab_size=Tokenizer().vocab_size, dim=64, depth=2, heads=4))
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    def to_dict(self) -> dict:
        return {"unet": asdict(self.unet), "text_encoder": asdict(self.text_encoder), "schedule": self.schedule.to_dict()}

    def denoiser(self) -> "Denoiser":
        """The two networks these configs describe, with fresh random weights."""
        return Denoiser(UNet(self.unet), TextEncoder(self.text_encoder))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfigs":
        return cls(config_from_dict(UNetConfig, d["unet"]), TextEncoderConfig.from_dict(d["text_encoder"]),
                   config_from_dict(NoiseSchedule, d["schedule"]))


def parse_ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers like 64,128; got {text!r}") from None


def model_configs(space: str = "latent", channels: str | None = None, attention: str | None = None, heads: int = 4,
                  layers_per_block: int = 1, text_dim: int = 64, text_depth: int = 2, norm_num_groups: int = 8,
                  prediction_type: str = "epsilon") -> ModelConfigs:
    """The networks for `space`: 4 channels in and out for latents, 3 for pixels; the rest is one recipe."""
    block_out_channels = parse_ints(channels, "channels") or (32, 64)
    attends = parse_ints(attention, "attention") or (1,) * len(block_out_channels)
    if len(attends) != len(block_out_channels):
        raise ValueError(f"--attention has {len(attends)} entries for {len(block_out_channels)} levels; give one 0/1 each")
    latent_channels = 4 if space == "latent" else 3
    unet = UNetConfig(in_channels=latent_channels, out_channels=latent_channels, block_out_channels=block_out_channels,
                      attention_levels=tuple(bool(a) for a in attends), layers_per_block=layers_per_block,
                      heads=heads, context_dim=text_dim, norm_num_groups=norm_num_groups)
    text = TextEncoderConfig(vocab_size=Tokenizer().vocab_size, dim=text_dim, depth=text_depth, heads=heads)
    return ModelConfigs(unet, text, NoiseSchedule(prediction_type=prediction_type))


class Denoiser(nn.Module):
    """The U-Net and the text encoder as one module: what training updates, what the EMA follows, what DDP wraps.

    The text encoder is trained together with the U-Net, from scratch, as in the LDM paper's text-to-image model
    (Rombach et al. 2022); SD v1 instead froze a pretrained CLIP text encoder.
    """

    def __init__(self, unet: UNet, text_encoder: TextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, zt: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        return self.unet(zt, t, self.text_encoder(ids))                   # (B, C, h, w)


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


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every step, with d = min(decay, (1 + n) / (10 + n)).

    The ramp (from Keras / the LDM code) lets the average forget the random initial weights quickly; later the
    average over the last ~1 / (1 - decay) steps smooths out the noise of single SGD steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            # theta_ema = d theta_ema + (1 - d) theta
            self.shadow[name].lerp_(value.detach().float(), 1 - d)

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return model


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain float32. auto: bfloat16 on CUDA GPUs that have it
    (same range as float32, no loss scaling), float16 on older GPUs; float32 on the CPU and MPS, where half-precision
    training is slower or less complete."""
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in choices:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return choices[precision]


# ------------------------------------------------------------------------------------------------ distributed

def distributed_context(device_name: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL with one GPU
    per rank on CUDA, gloo on the CPU. Run alone, it is (0, 1, the chosen device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, get_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def replicas_identical(model: nn.Module) -> bool:
    """Do all ranks hold the same weights? DDP keeps them equal by averaging gradients; this checks it (a desync
    would mean ranks trained different models). One all-reduce of a float64 checksum: max == min."""
    if not dist.is_initialized():
        return True
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(low == high)


# ------------------------------------------------------------------------------------------------ the trainer

class StopRequested:
    """Ctrl-C sets a flag; the loop finishes the current step, saves a checkpoint and stops (a second Ctrl-C stops
    at once). Stopping between steps, never inside optimizer.step(), is what keeps the checkpoint resumable."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():     # only the main thread may set handlers
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class LDMTrainer:
    """Holds the denoiser, its EMA, the optimizer and the step; `run()` trains to cfg.steps, saving as it goes."""

    def __init__(self, cfg: LDMTrainConfig, out: str | Path, models: ModelConfigs | None = None,
                 resume: bool = False, progress: bool = True, device: str | torch.device | None = None):
        if cfg.space not in ("latent", "pixel"):
            raise ValueError(f"unknown space {cfg.space!r}; choose latent (the VAE's latents) or pixel (the images)")
        if not 0 <= cfg.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {cfg.caption_dropout}; 0.1 is usual")
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.rank, self.world_size, self.device = distributed_context(device)
        self.autocast = autocast_dtype(self.device, cfg.precision)
        if (self.out / CHECKPOINT).exists() and not resume:
            raise FileExistsError(f"{self.out} already holds a training run; pass --resume to continue it, or "
                                  "choose another --out")
        if resume and not (self.out / CHECKPOINT).exists():
            raise FileNotFoundError(f"{self.out / CHECKPOINT} does not exist: there is nothing to resume; drop "
                                    "--resume to start a new run there")
        self.step, self.history, self.train_seconds = 0, [], 0.0
        if resume:
            models = ModelConfigs.from_dict(read_config(self.out / CHECKPOINT))
        self.models = models or ModelConfigs()
        self.models.schedule.prediction_type = cfg.prediction_type
        self.autoencoder = (load_vae_folder(self.vae_path(), self.device) if cfg.space == "latent"
                            else PixelSpace(cfg.image_size))
        self.check_shapes()
        torch.manual_seed(cfg.seed)            # the initial weights: the same on every rank
        self.tokenizer = Tokenizer(max_length=self.models.text_encoder.max_length)
        self.empty_ids = self.tokenizer.encode("").ids                # (1, L): what a dropped caption becomes
        self.model = self.models.denoiser().to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
        if resume:
            self.load()
        self.trained = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if
                                                             self.device.type == "cuda" else None)
                        if self.world_size > 1 else self.model)
        self.ids, self.z_source = self.prepare_data()

    def vae_path(self) -> Path:
        vae = self.cfg.vae
        return Path(vae) if Path(vae).is_dir() else vae_folder(vae)

    def check_shapes(self) -> None:
        c = self.autoencoder.config
        side = self.cfg.image_size // c.downsampling_factor
        unet = self.models.unet
        if unet.in_channels != c.latent_channels or unet.out_channels != c.latent_channels:
            raise ValueError(f"the U-Net takes {unet.in_channels} channels but the {self.cfg.space} space has "
                             f"{c.latent_channels}; set in_channels = out_channels = {c.latent_channels}")
        if side % unet.downsampling_factor:
            raise ValueError(f"the {side}x{side} {self.cfg.space}s do not halve {len(unet.block_out_channels) - 1} times; "
                             "use fewer U-Net levels or a larger --image-size")
        if unet.context_dim != self.models.text_encoder.dim:
            raise ValueError(f"the U-Net reads context_dim={unet.context_dim} but the text encoder gives "
                             f"{self.models.text_encoder.dim}; make them equal")

    # ----------------------------------------------------------------------------------------------- data

    def shard(self) -> Tensor:
        """This rank's share of the training set: items rank, rank + W, rank + 2W, ... (DistributedSampler's split)."""
        return torch.arange(self.cfg.num_train_images)[self.rank::self.world_size]

    def prepare_data(self) -> tuple[Tensor, Tensor]:
        """Token ids of every caption (N, L), and what z_0 is drawn from: the cached posterior moments (N, 2C, h, w)
        in latent space, the uint8 pixels (N, H, W, 3) in pixel space."""
        cfg = self.cfg
        data = ShapesDataset(cfg.num_train_images, seed=cfg.data_seed, image_size=cfg.image_size)
        ids = self.tokenizer.encode(data.captions()).ids                          # (N, L)
        pixels = torch.from_numpy(data.pixels())                                    # (N, H, W, 3) uint8
        if cfg.space == "pixel":
            return ids, pixels
        return ids, self.latent_cache(pixels)

    def latent_cache(self, pixels: Tensor) -> Tensor:
        """Encode every training image once; reuse the file on resume. Rank 0 writes it, the others wait and read."""
        path = self.out / LATENT_CACHE
        if self.rank == 0 and not path.exists():
            self.out.mkdir(parents=True, exist_ok=True)
            save_file_atomically({"moments": encode_moments(self.autoencoder, pixels)}, path,
                                 metadata={"vae": str(self.vae_path()), "data_seed": str(self.cfg.data_seed)})
        if self.world_size > 1:
            dist.barrier()
        moments = load_file(str(path))["moments"]
        if len(moments) != self.cfg.num_train_images:
            raise ValueError(f"{path} holds {len(moments)} latents but the run uses {self.cfg.num_train_images} "
                             "images; delete it to re-encode, or use the run's --num-images")
        return moments.to(self.device)

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
        t = torch.randint(self.models.schedule.num_timesteps, (B,), generator=step_generator(seed, step, 3))
        noise = torch.randn(z0.shape, generator=step_generator(seed, step, 4))
        return z0, ids.to(self.device), t.to(self.device), noise.to(self.device)

    # ----------------------------------------------------------------------------------------------- training

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr = apply_learning_rate(self.opt, cfg, step)
        self.model.train()
        z0, ids, t, noise = self.batch(step)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = diffusion_loss(self.trained, self.models.schedule, z0, t, noise, ids)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step}; training stopped, the last good checkpoint in "
                f"{self.out / CHECKPOINT} is kept. Lower --lr, or use --precision fp32")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.model, step)
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm)}

    def run(self, stop_after: int | None = None) -> dict:
        """Train to cfg.steps, or for at most `stop_after` steps now (resume later). Ctrl-C saves and stops."""
        cfg = self.cfg
        start_time, start_step = time.time(), self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or self.rank != 0,
                   desc=f"train-ldm ({cfg.space})", dynamic_ncols=True)
        window: list[float] = []
        with StopRequested() as stop:
            while self.step < end and not self.stop_agreed(stop):
                record = self.train_step()
                window.append(record["loss"])
                if self.step % cfg.log_every == 0 or self.step == end:
                    record["loss"] = sum(window) / len(window)        # the mean since the last record: a smoother curve
                    record["seconds"] = round(self.train_seconds + time.time() - start_time, 2)
                    self.history.append(record)
                    window = []
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
                bar.update(1)
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

    def stop_agreed(self, stop: StopRequested) -> bool:
        """Stop when any rank was asked to (every rank must leave the loop at the same step, or DDP would hang)."""
        flag = torch.tensor([float(stop.requested)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------------------------ checkpoints

    def save(self, summary: dict | None = None) -> None:
        """Rank 0 writes the checkpoint folder atomically: an interrupted save keeps the previous one."""
        if self.rank == 0:
            opt_tensors, opt_groups = optimizer_to_tensors(self.opt)
            trainer = {"step": self.step, "train_seconds": self.train_seconds, "train_config": asdict(self.cfg),
                       "optimizer_groups": opt_groups, "scaler": self.scaler.state_dict(),
                       "history": self.history, "summary": summary, "world_size": self.world_size}
            files = {"config.json": {**self.models.to_dict(), "space": self.cfg.space,
                                     "vae": str(self.vae_path()) if self.cfg.space == "latent" else None,
                                     "image_size": self.cfg.image_size, "tokenizer_words": self.tokenizer.words},
                     "model.safetensors": self.model.state_dict(), "ema.safetensors": self.ema.shadow,
                     "optimizer.safetensors": opt_tensors, "trainer.json": trainer}
            write_folder_atomically(self.out / CHECKPOINT, files, kind="ldm-training-checkpoint", keep_old=False)
        if self.world_size > 1:
            dist.barrier()

    def load(self) -> None:
        folder = self.out / CHECKPOINT
        trainer = json.loads((folder / "trainer.json").read_text())
        saved, now = trainer["train_config"], asdict(self.cfg)
        changed = {k for k in saved if k not in ("steps", "save_every", "sample_every", "log_every") and saved[k] != now.get(k)}
        if changed:
            raise ValueError(f"{self.out}: was trained with different settings ({', '.join(sorted(changed))}); resume "
                             "with the same options (only --steps and how often to save may change) or start a new --out")
        if trainer.get("world_size", 1) != self.world_size:
            raise ValueError(f"{self.out} was trained on {trainer['world_size']} process(es), this is "
                             f"{self.world_size}; resume with the same --nproc_per_node (each rank's data is its own)")
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.ema.shadow = {k: v.to(self.device) for k, v in load_file(str(folder / "ema.safetensors")).items()}
        optimizer_from_tensors(self.opt, load_file(str(folder / "optimizer.safetensors")), trainer["optimizer_groups"])
        self.scaler.load_state_dict(trainer["scaler"])
        self.step, self.history, self.train_seconds = trainer["step"], trainer["history"], trainer["train_seconds"]

    # ------------------------------------------------------------------------------------ what it learned

    def ema_denoiser(self) -> Denoiser:
        """A copy of the denoiser holding the EMA weights, in eval mode: the model we sample from and ship."""
        return self.ema.copy_to(self.models.denoiser().to(self.device)).eval()

    def write_sample_grid(self) -> Path:
        """A grid of SAMPLE_PROMPTS (rows) x 4 seeds, from the EMA weights, in --out/samples/."""
        from minildm.pipeline import LatentDiffusion
        from minildm.viz import image_grid

        ema = self.ema_denoiser()
        pipe = LatentDiffusion(self.autoencoder, ema.unet, ema.text_encoder, self.tokenizer, self.models.schedule,
                               device=self.device)
        prompts = [p for p in SAMPLE_PROMPTS for _ in range(4)]
        images = pipe.text_to_image(prompts, steps=25, seed=0, height=self.cfg.image_size, width=self.cfg.image_size)
        path = self.out / "samples" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=4).save(path)
        return path


def export_pipeline(run_folder: str | Path, export_to: str | Path, notes: dict, guidance_scale: float = 7.5,
                    steps: int = 50) -> Path:
    """Write the run's EMA weights as a pipeline folder with a training record (training.json) and the sampling
    defaults (guidance_scale, DDIM steps) pipeline.json will hold. A VAE folder beside the export (the shipped
    assets/shapes64-vae next to assets/shapes64-ldm) is referenced; any other is copied in."""
    from minildm.pipeline import LatentDiffusion, save_pipeline

    folder, export_to = Path(run_folder) / CHECKPOINT, Path(export_to)
    config = read_config(folder)
    models = ModelConfigs.from_dict(config)
    model = models.denoiser()
    model.load_state_dict(load_file(str(folder / "ema.safetensors")))
    latent = config["space"] == "latent"
    autoencoder = load_vae_folder(config["vae"], "cpu") if latent else PixelSpace(config["image_size"])
    tokenizer = Tokenizer(words=config["tokenizer_words"][len(SPECIAL_TOKENS):], max_length=models.text_encoder.max_length)
    pipe = LatentDiffusion(autoencoder, model.unet.eval(), model.text_encoder.eval(), tokenizer, models.schedule,
                           device="cpu", guidance_scale=guidance_scale, steps=steps)
    trainer = json.loads((folder / "trainer.json").read_text())
    record = {**notes, "train_config": trainer["train_config"], "history": trainer["history"]}
    vae_dir = Path(config["vae"]).resolve() if latent else None
    beside = vae_dir is not None and vae_dir.parent == export_to.resolve().parent
    return save_pipeline(export_to, pipe, vae_folder_name=f"../{vae_dir.name}" if beside else None,
                         extra_files={"training.json": record})
