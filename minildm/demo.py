"""`minildm demo`: the chapters' main claims, computed from the shipped weights and written as figures.

Chapters 01-02: the compression numbers, reconstructions with their PSNR, the latent channels, and an interpolation
in pixel space vs latent space with its double exposures counted. Chapters 07-08: samples for a few prompts, one
reverse diffusion step by step (a strip and a GIF), a guidance sweep, img2img at growing strength, inpainting, and
a VAE decoder swap. `--train` first trains both the VAE and the diffusion model from scratch, with the
one-command recipes, under one progress bar whose ETA covers the whole demo.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from minildm import manifold, viz
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, compression_ratio, latent_shape
from minildm.checkpoint import read_config
from minildm.data import COLOURS, SHAPE_KINDS, ShapesDataset
from minildm.metrics import psnr
from minildm.pipeline import LatentDiffusion
from minildm.pretrained import VAES, load_pipeline, load_vae
from minildm.saving import read_json, recover_interrupted_save

DEMO_DATA_SEED = 777  # never used for training
IMAGE_SIZE = 64       # Shapes' size, the one the shipped pipeline was trained at
PROMPTS = ("a large red circle in the centre", "a small blue square at the top left",
           "a medium green triangle at the bottom right", "a large yellow diamond at the left",
           "a small purple circle at the bottom", "a medium orange square at the top right")
SEEDS = 4                                           # columns of samples.png
STEPS = 25                                          # DDIM steps for every figure
GUIDANCE_SCALES = (0.0, 1.0, 2.0, 4.0, 7.5)
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SWAP_VAE = VAES["shapes64"]                         # decoder.safetensors there was fine-tuned for this VAE's latents

# --train: both models from scratch with the one-command recipes (the `minildm train-vae` and `minildm train-ldm`
# defaults), then the figures. Only train-ldm's sample grids are left out: the demo draws its own.
VAE_TRAIN: dict = {}                                # VAETrainConfig settings that differ from its defaults
VAE_MODEL: AutoencoderConfig | None = None          # None: shapes64's, what train-vae builds
LDM_TRAIN: dict = {"sample_every": 0}               # LDMTrainConfig settings that differ from its defaults
LDM_MODELS: dict = {}                               # model_configs() arguments; {}: train-ldm's networks
# What each stage of --train takes on the reference machine (this project's 2-core CPU on a quiet day, torch's
# default threads), from the records of the stages run alone: the VAE's 400 s from start to exit, 387 s of them
# training (benchmarks/results/train-vae-defaults.json; the other 13 s split between drawing its data and measuring
# it by guess: the record does not clock them apart), the LDM's data preparation (49 s, train_speed-ldm.json) and its
# 7,000 steps of 64 in 798 s (benchmarks/results/ldm-defaults.json: 114 ms a step, its 7 sample grids included); the
# figures about a minute. The overall bar counts in these seconds, so its ETA is what is left at the pace this machine
# has kept so far.
STAGE_SECONDS = {"vae_data": 4.0, "vae": 387.0, "vae_finish": 9.0, "ldm_data": 49.0, "ldm": 798.0, "figures": 60.0}
SHIPPED_SAMPLING = {"guidance_scale": 4.0, "steps": 25}      # the shipped pipeline.json's defaults


# ---------------------------------------------------------------------------------- chapters 01-02: the VAE


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
def vae_figures(out: Path, vae: AutoencoderKL, seed: int) -> list[tuple[Path, str]]:
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


# ------------------------------------------------------------------------------ chapters 07-08: sampling


def sample_rows(pipe: LatentDiffusion, prompts, num: int, seed: int = 0, image: Tensor | None = None,
                mask: Tensor | None = None, strength: float = 1.0, output_type: str = "images",
                height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, **options) -> Tensor:
    """(P, num, ...): column j draws every prompt at once with seed + j, from noise (or from `image`: img2img, or
    inpainting with `mask`; an edit keeps the image's size, so `height` and `width` are for new images only).
    `minildm sample` with the demo's prompts and --steps 25 redraws samples.png."""
    columns = []
    for j in range(num):
        kw = {"seed": seed + j, "output_type": output_type, **options}
        if mask is not None:
            columns.append(pipe.inpaint(image, mask, prompts, strength=strength, **kw))
        elif image is not None:
            columns.append(pipe.image_to_image(image, prompts, strength=strength, **kw))
        else:
            columns.append(pipe.text_to_image(prompts, height=height, width=width, **kw))
    return torch.stack(columns, dim=1)


def recoloured(factors: dict) -> tuple[str, str]:
    """(caption, another caption): the same size and place, with the next colour and the next kind of shape."""
    obj = factors["objects"][0]
    colours = list(COLOURS)
    other = dataclasses.replace(obj, colour=colours[(colours.index(obj.colour) + 1) % len(colours)],
                                kind=SHAPE_KINDS[(SHAPE_KINDS.index(obj.kind) + 1) % len(SHAPE_KINDS)])
    return obj.describe(), other.describe()


def box_mask(factors: dict, size: int) -> Tensor:
    """(1, size, size): 1 (repaint) on the square around the object, 0 (keep) elsewhere."""
    obj, mask = factors["objects"][0], torch.zeros(1, size, size)
    r, cx, cy = obj.size * size, obj.x * size, obj.y * size
    mask[:, max(0, int(cy - r)): int(cy + r) + 1, max(0, int(cx - r)): int(cx + r) + 1] = 1
    return mask


def held_out(count: int, seed: int) -> tuple[Tensor, list[dict]]:
    data = ShapesDataset(count, seed=DEMO_DATA_SEED + 2 + seed, image_size=IMAGE_SIZE)
    return data.images(), [data.factors(i) for i in range(count)]


def decoder_file_fits(pipe: LatentDiffusion, vae_folder: Path) -> bool:
    """The decoder file in `vae_folder` was fine-tuned on that VAE's latents: swap it only into the same VAE."""
    config = read_config(vae_folder)
    return pipe.space == "latent" and pipe.vae.config == AutoencoderConfig.from_dict(config)


@torch.no_grad()
def diffusion_figures(out: Path, pipe: LatentDiffusion, seed: int) -> list[tuple[Path, str]]:
    written: list[tuple[Path, str]] = []
    z0 = sample_rows(pipe, PROMPTS, SEEDS, seed, output_type="latents", steps=STEPS)      # (P, SEEDS, C, h, w)
    samples = pipe.decode_latents(z0.flatten(0, 1)).unflatten(0, z0.shape[:2])          # (P, SEEDS, 3, H, W)
    path = viz.show_rows(list(samples), list(PROMPTS), [f"seed {seed + j}" for j in range(SEEDS)],
                         out / "samples.png", wrap=22)
    written.append((path, f"{len(PROMPTS)} prompts x {SEEDS} seeds, DDIM {STEPS} steps, guidance "
                          f"{pipe.guidance_scale:g}"))

    # reverse diffusion: what the sampler holds (z_t) and what the model predicts the end to be (z0_hat), each step
    steps = []
    pipe.text_to_image(PROMPTS[0], steps=STEPS, seed=seed, callback=steps.append)
    zt = pipe.decode_latents(torch.cat([s.zt for s in steps]))                          # (STEPS, 3, H, W)
    z0_hat = pipe.decode_latents(torch.cat([s.z0_hat for s in steps]))                  # (STEPS, 3, H, W)
    timesteps = [s.t for s in steps]
    path = viz.reverse_diffusion_strip(zt, z0_hat, timesteps, out / "reverse_diffusion.png")
    written.append((path, f'"{PROMPTS[0]}": decoded z_t and z0_hat at 10 of the {STEPS} steps'))
    path = viz.save_gif(viz.reverse_diffusion_frames(zt, z0_hat, timesteps), out / "reverse_diffusion.gif")
    written.append((path, f"the same, all {STEPS} steps as an animation (z_t | z0_hat)"))

    sweep = torch.cat([pipe.text_to_image(PROMPTS[3], guidance_scale=w, steps=STEPS, seed=seed)
                       for w in GUIDANCE_SCALES])
    path = viz.show_rows([sweep], [PROMPTS[3]], [f"w = {w:g}" for w in GUIDANCE_SCALES], out / "guidance_sweep.png",
                         wrap=22)
    written.append((path, f"guidance scale w = {', '.join(f'{w:g}' for w in GUIDANCE_SCALES)}: 0 ignores the "
                          f"prompt, 1 is the prompt alone, more follows it harder"))

    images, factors = held_out(4, seed)
    before, after = recoloured(factors[0])
    edits = torch.cat([pipe.image_to_image(images[:1], after, strength=s, steps=STEPS, seed=seed) for s in STRENGTHS])
    path = viz.show_rows([torch.cat([images[:1], edits])], [after],
                         ["original"] + [f"strength {s:g}" for s in STRENGTHS], out / "img2img_strength.png", wrap=22)
    written.append((path, f'img2img: a held-out "{before}" redrawn as "{after}" at strengths '
                          f"{', '.join(f'{s:g}' for s in STRENGTHS)}"))

    masks = torch.stack([box_mask(f, IMAGE_SIZE) for f in factors[1:]])                 # (3, 1, H, W)
    prompts = [recoloured(f)[1] for f in factors[1:]]
    repainted = pipe.inpaint(images[1:], masks, prompts, steps=STEPS, seed=seed)
    rows = [torch.stack(row) for row in zip(images[1:], masks.expand(-1, 3, -1, -1) * 2 - 1, repainted)]
    path = viz.show_rows(rows, prompts, ["image", "mask\n(white: repaint)", "inpainted"], out / "inpainting.png",
                         wrap=22)
    written.append((path, "inpainting: the box around each held-out shape repainted to the prompt, the rest kept"))

    if decoder_file_fits(pipe, SWAP_VAE):
        swapped = copy.copy(pipe)
        swapped.vae = copy.deepcopy(pipe.vae)
        swapped.swap_vae_decoder(SWAP_VAE / "decoder.safetensors")
        path = viz.show_rows([samples[:, 0], swapped.decode_latents(z0[:, 0])],
                             ["original\ndecoder", "fine-tuned\ndecoder"], None, out / "vae_swap.png")
        written.append((path, "the same latents through the original decoder and through decoder.safetensors "
                              "(swap_vae_decoder)"))
    return written


# ------------------------------------------------------------------------------------------- the demo


class OverallProgress:
    """--train's one bar over every stage, counted in the reference machine's seconds (STAGE_SECONDS): a training
    step moves it by its stage's seconds / steps, so its ETA covers what is left of the whole demo. It also clocks
    each stage here, for the record (`times`)."""

    def __init__(self, done_before: float = 0.0, enabled: bool = True):
        # smoothing=0: the pace is the average since the start, not that of the last few steps (stages differ)
        self.bar = tqdm(total=sum(STAGE_SECONDS.values()), initial=done_before, disable=not enabled, smoothing=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} so far, about {remaining} left")
        self.times: dict[str, float] = {}
        self.current, self.since = None, time.perf_counter()

    def stage(self, stage: str, what: str) -> None:
        """`stage` (a STAGE_SECONDS key) begins; the clock of the one before it stops."""
        self.stop_clock()
        self.current, self.since = stage, time.perf_counter()
        self.bar.set_description_str(what)

    def stop_clock(self) -> None:
        if self.current is not None:
            self.times[self.current] = round(time.perf_counter() - self.since, 1)
            self.current = None

    def step(self, steps: int) -> None:
        """One step of the current stage's `steps`."""
        self.bar.update(STAGE_SECONDS[self.current] / steps)

    def done(self) -> None:
        """The current stage is complete: the bar moves by all of it (for stages without steps)."""
        self.bar.update(STAGE_SECONDS[self.current])
        self.stop_clock()

    def close(self) -> None:
        self.stop_clock()
        self.bar.close()


def train_configs(out: Path):
    """(VAETrainConfig, LDMTrainConfig) of --train into `out`: the one-command defaults, the LDM on out/vae."""
    from minildm.ldm_recipe import LDMTrainConfig
    from minildm.train_vae import VAETrainConfig

    return VAETrainConfig(**VAE_TRAIN), LDMTrainConfig(**{**LDM_TRAIN, "vae": str(out / "vae")})


def done_before(out: Path) -> float:
    """The reference seconds of --train's work that an earlier, interrupted --train into `out` already did."""
    from minildm.train_ldm import CHECKPOINT, TRAINER_NAME

    def steps(trainer_json: Path) -> int:
        return read_json(trainer_json)["step"] if trainer_json.is_file() else 0

    vae_cfg, ldm_cfg = train_configs(out)
    if (out / "vae" / "config.json").is_file():
        vae = STAGE_SECONDS["vae_data"] + STAGE_SECONDS["vae"] + STAGE_SECONDS["vae_finish"]
    else:
        vae = STAGE_SECONDS["vae"] * steps(out / "vae-run" / TRAINER_NAME) / vae_cfg.steps
    return vae + STAGE_SECONDS["ldm"] * steps(out / "train-run" / CHECKPOINT / TRAINER_NAME) / ldm_cfg.steps


def train_pipeline(out: Path, device=None, overall: OverallProgress | None = None) -> Path:
    """--train: the VAE from scratch into out/vae-run, exported to out/vae; then the diffusion model on its latents
    into out/train-run, exported to out/pipeline (beside out/vae, which the pipeline refers to). A run an earlier
    --train left unfinished is resumed; a finished VAE export is reused. `overall`: the bar to move."""
    from minildm.ldm_export import export_pipeline
    from minildm.ldm_recipe import model_configs
    from minildm.train_ldm import CHECKPOINT, LDMTrainer
    from minildm.train_vae import VAETrainer, export_model

    overall = overall or OverallProgress(enabled=False)
    vae_cfg, ldm_cfg = train_configs(out)
    vae_run, ldm_run = out / "vae-run", out / "train-run"
    for folder in (vae_run, ldm_run / CHECKPOINT):     # a save cut short is finished before deciding to resume
        recover_interrupted_save(folder)
    if not (out / "vae" / "config.json").is_file():
        overall.stage("vae_data", "1/3 drawing the training images")
        vae = VAETrainer(vae_cfg, vae_run, VAE_MODEL, resume=vae_run.is_dir(), progress=False, device=device)
        overall.done()
        overall.stage("vae", "1/3 training the VAE")
        summary = vae.run(after_step=lambda record: overall.step(vae_cfg.steps))
        overall.stage("vae_finish", "1/3 measuring the VAE")
        export_model(vae_run, out / "vae", {"command": "minildm demo --train", "seed": vae_cfg.seed,
                                            "data_seed": vae_cfg.data_seed, "torch_threads": torch.get_num_threads(),
                                            **summary})
        overall.done()
    overall.stage("ldm_data", "2/3 encoding the training images")
    ldm = LDMTrainer(ldm_cfg, ldm_run, model_configs(**LDM_MODELS), resume=(ldm_run / CHECKPOINT).is_dir(),
                     progress=False, device=device)
    ldm.prepare()
    overall.done()
    overall.stage("ldm", "2/3 training the diffusion model")
    summary = ldm.run(after_step=lambda record: overall.step(ldm_cfg.steps))
    overall.stop_clock()
    if summary.get("stopped_early"):
        raise SystemExit(f"training stopped at step {summary['steps']} of {ldm_cfg.steps}; run the same command "
                         f"again to continue it")
    notes = {"command": "minildm demo --train", "seed": ldm_cfg.seed, "data_seed": ldm_cfg.data_seed,
             "torch_threads": torch.get_num_threads(), **summary}
    return export_pipeline(ldm_run, out / "pipeline", notes, **SHIPPED_SAMPLING)


def run_demo(out: Path, device=None, seed: int = 0, pipeline: LatentDiffusion | str | Path | None = None,
             train: bool = False, progress: bool = True) -> list[tuple[Path, str]]:
    """Write every figure into `out`; returns [(path, what it shows)]. `pipeline`: a LatentDiffusion or a pipeline
    folder (default: the shipped shapes64); `train=True` trains one from scratch first (see train_pipeline), under
    one progress bar with an ETA (`progress`), and records how long each stage took in out/train-stages.json."""
    out = Path(out)
    overall = OverallProgress(done_before(out), enabled=progress) if train else None
    try:
        if train:
            total = sum(STAGE_SECONDS.values()) / 60
            print(f"training from scratch: the VAE into {out / 'vae-run'}, the diffusion model on its latents into "
                  f"{out / 'train-run'}, then the figures: about {total:.0f} minutes on a quiet 2-core CPU. "
                  f"Interrupted? Run the same command to continue.")
            pipeline = train_pipeline(out, device, overall)
            overall.stage("figures", "3/3 drawing the figures")
        if isinstance(pipeline, LatentDiffusion):
            pipe = pipeline
        else:
            pipe = (load_pipeline("shapes64", device) if pipeline is None
                    else LatentDiffusion.from_folder(pipeline, device))
        # chapters 01-02 measure the pipeline's own VAE, in float32 (a CUDA pipeline runs in float16)
        vae = copy.deepcopy(pipe.vae).float() if pipe.space == "latent" else load_vae("shapes64", device=device)
        written = vae_figures(out, vae, seed) + diffusion_figures(out, pipe, seed)
        if overall is not None:
            overall.done()
    finally:
        if overall is not None:
            overall.close()
    if train:
        record = {"stage_seconds_here": overall.times, "stage_seconds_reference": STAGE_SECONDS,
                  "torch_threads": torch.get_num_threads()}
        (out / "train-stages.json").write_text(json.dumps(record, indent=2) + "\n")
        written.append((out / "train-stages.json", "how long each stage of --train took here (seconds), beside the "
                                                   "reference machine's"))
    return written
