"""Latent vs pixel diffusion, measured (chapter 06): the same U-Net recipe on the VAE's 4x8x8 latents and on the
3x64x64 pixels, 48x more values. What does the smaller space save, per training step and per generated image?

The rows, each one Denoiser (U-Net + text encoder) built by `ldm_recipe.model_configs`:

- latent: the shipped LDM's recipe, `model_configs("latent", channels="32,64", attention="1,1")`: levels of (32, 64)
  channels, attention at both (8x8 and 4x4 tokens), 4 channels in and out.
- pixel, same recipe: `model_configs("pixel", channels="32,64", attention="1,1")`, identical but for 3 channels in and
  out. Its level-0
  attention runs over 64 x 64 = 4,096 tokens, which is much of why pixel space is expensive.
- pixel, deeper: what a pixel-space model would really use: (32, 64, 64, 64, 64), each level but the last
  halving the side (64 -> 32 -> 16 -> 8 -> 4), attention only at the two lowest levels (8x8 and 4x4), so its lowest
  resolution and its attention are the latent recipe's. The fairer comparison.

What is measured, on the chosen device (CUDA > MPS > CPU by default), in one process, the rows taking turns call by
call (a change in the machine's load hits all rows alike):

a. training step: diffusion_loss (q_sample, U-Net + text encoder forward, MSE), backward, AdamW step, at --batch
   (default 32) with the trainer's precision (float32 on the CPU, autocast bf16 on CUDA). Data loading, gradient
   clipping and the EMA update are left out: they cost the same in both spaces. A warm-up step at batch 2 first.
b. generation: LatentDiffusion.text_to_image of --gen-batch (default 4) prompts, --steps (default 50) DDIM steps
   with classifier-free guidance (the U-Net runs on the doubled batch), text encoding and, in latent space, the VAE
   decoder included (the shipped shapes64 VAE); reported per image. Weights are random: the time does not depend on
   them. Where a call would run past --budget seconds, it is stopped after the step that crosses it and the rest is
   extrapolated: the time so far + the remaining steps x the median step + the decoder (timed alone); such
   figures are marked "~". --budget 0 runs every call to the end.
c. peak memory: how far the first timed call raises the peak above the memory in use before it (CPU: resident memory,
   peak reset through /proc/self/clear_refs as in benchmarks/unet.py, in this process; CUDA: max_memory_allocated).
   Only the first timed call counts, so an extrapolated generation's figure is its part-call's peak (the same: every
   step allocates alike).
d. the ratios pixel / latent, the targets (>= 25x for training step and image), the parameter counts, and the work
   of one training step: the matmuls and convolutions FlopCounterMode counts during the warm-up step (batch 2),
   scaled to --batch (every one of them is linear in the batch). Where the time ratio falls short of the work ratio,
   the small latent calls are bound by per-operation overhead, not arithmetic.

Times are medians over the timed calls (--repeats, fewer once a row has spent --budget seconds, at least one); the
--json file keeps every call. 48x is the ratio of values (12,288 / 256); the U-Nets' work differs by more or less.

e. --quality SECONDS: train latent and pixel (same recipe, same --batch; the deeper one too with --pixel-recipe
   deeper/both) with LDMTrainer for SECONDS of wall-clock training each, in turns of a few seconds so that the
   machine's load hits both alike. The learning-rate schedule is sized to the budget: after two pilot steps, the
   run's `steps` is set to what the budget allows and the warm-up to a tenth of that (at most the recipe's 200); a
   run always takes its pilot steps, even past the budget. The trainer's own train_step is called (run() would save
   a checkpoint after every call); ms / step therefore includes its data, gradient clipping and EMA.
   Data preparation (rendering; VAE encoding in latent space, a one-off cost) is timed but not counted. Then each
   EMA model draws --eval-images (200) images of held-out captions (seed 2024, never trained on) and the judge
   scores them: prompt-following (all four words right) and the Frechet distance in judge features to the real
   images of the same captions (with real-vs-real for scale): metrics.evaluate_pipeline.
   Sampling in pixel space is slow on a CPU (hours for 200 images at 50 steps): use a GPU, or --eval-images and
   --steps. --out keeps the runs and exports their pipelines (feed one to --resolution --pipeline).
f. --resolution: duplicates at 2x. With --pipeline FOLDER (default: the shipped shapes64 LDM), draw
   --eval-images single-object prompts at 64x64 and at 128x128 and count objects per image
   (metrics.count_objects); then the "hires fix": generate at 64, upscale 2x (bicubic), image_to_image at 128 with
   --hires-strength 0.5, and count again. Prints the share of images with more than one object for each.

    python benchmarks/latent_vs_pixel.py --threads 1           (a + b + d: about 4 minutes on 2 busy CPU cores)
    python benchmarks/latent_vs_pixel.py --threads 2 --repeats 5 --json latent_vs_pixel.json
    python benchmarks/latent_vs_pixel.py --no-speed --quality 600 --out runs/lvp --device cuda
    python benchmarks/latent_vs_pixel.py --no-speed --resolution --pipeline runs/lvp/latent-pipeline

On a machine shared with other work, --threads 1 gives steadier figures: a second thread that has to wait for a
busy core stalls every parallel step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

# benchmarks/unet.py and attention.py: this folder is sys.path[0] when the script runs
from attention import MiB, peak_rss_bytes, ratio, show
from unet import count_flops, reset_peak, resident_bytes

from minildm.data import EVAL_SEED, ShapesDataset
from minildm.device import default_dtype, get_device
from minildm.ldm_recipe import Denoiser, LDMTrainConfig, ModelConfigs, autocast_dtype, model_configs
from minildm.metrics import count_objects, evaluate_pipeline
from minildm.pipeline import LatentDiffusion
from minildm.pixel_space import PixelSpace
from minildm.pretrained import load_judge, load_vae
from minildm.text import Tokenizer
from minildm.train_ldm import LDMTrainer, diffusion_loss

IMAGE_SIZE = 64
TARGET_RATIO = 25                      # pixel / latent, per training step and per image
MIN_TIMING_S = 0.5                     # cheap rows repeat until this much time is spent (a steadier median)
WARMUP_BATCH = 2
TURN_S = 5.0                           # --quality: seconds each run trains before the other takes its turn
PILOT_STEPS = 2                        # --quality: steps timed before the schedule is sized to the budget
DEEPER = ("32,64,64,64,64", "0,0,0,1,1")
# the shipped LDM's U-Net: channels 32, 64, attention at both levels (train-ldm's default now: 24,48 and 0,1)
SHIPPED_NETWORK = {"channels": "32,64", "attention": "1,1"}
FOLDERS = {"latent": "latent", "pixel (same recipe)": "pixel-same", "pixel (deeper)": "pixel-deeper"}   # --out


# ------------------------------------------------------------------------------------------------ the rows

def recipes(pixel_recipe: str) -> dict[str, tuple[str, ModelConfigs]]:
    """{row name: (space, model configs)}: the latent recipe first, then the pixel row(s) measured against it."""
    rows = {"latent": ("latent", model_configs("latent", **SHIPPED_NETWORK))}
    if pixel_recipe in ("same", "both"):
        rows["pixel (same recipe)"] = ("pixel", model_configs("pixel", **SHIPPED_NETWORK))
    if pixel_recipe in ("deeper", "both"):
        rows["pixel (deeper)"] = ("pixel", model_configs("pixel", *DEEPER))
    return rows


def describe(name: str, space: str, models: ModelConfigs) -> str:
    u = models.unet
    side = IMAGE_SIZE // (8 if space == "latent" else 1)
    sides = [side // 2**i for i in range(len(u.block_out_channels))]
    attends = [f"{s}x{s}" for s, a in zip(sides, u.attention_levels) if a]
    return (f"{name}: z_0 {u.in_channels}x{side}x{side}; U-Net channels {u.block_out_channels} at "
            f"{' -> '.join(f'{s}x{s}' for s in sides)}, attention at {', '.join(attends) or 'none'} "
            f"(+ the middle), {u.level_heads[0]} heads")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def eval_prompts(count: int) -> list[str]:
    """Held-out single-object captions: ShapesDataset seed 2024, which no shipped model trained on."""
    return ShapesDataset(count, seed=EVAL_SEED, image_size=IMAGE_SIZE).captions()


# ------------------------------------------------------------------------------------------------ timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(call, device: torch.device) -> tuple[float, object]:
    """Wall time of one call, the device's queue drained before and after (CUDA and MPS run asynchronously)."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - start, result


def peak_extra(call, device: torch.device) -> tuple[int | None, object]:
    """(how far `call` raises the peak memory above the memory in use before it, its result); None where the
    peak cannot be reset (no /proc/self/clear_refs)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline, result
    if device.type != "cpu" or not reset_peak():
        return None, call()
    baseline = resident_bytes()
    result = call()
    return max(0, peak_rss_bytes() - baseline), result


def done(times: list[float], repeats: int, budget: float) -> bool:
    """`repeats` calls (more while cheap ones add up to under MIN_TIMING_S); fewer once they add up to `budget`."""
    spent = sum(times)
    if not times:
        return False
    if budget and spent >= budget:
        return True
    return len(times) >= repeats and spent >= MIN_TIMING_S


def take_turns(calls: dict[str, object], device: torch.device, repeats: int, budget: float) -> dict[str, dict]:
    """Call each row's `call() -> (seconds, extra)` in turn until every row has enough; the first timed call of each
    row also gives its peak memory. {row: {"times_s", "extras", "peak_extra_bytes"}}"""
    rows = {name: {"times_s": [], "extras": [], "peak_extra_bytes": None} for name in calls}
    while not all(done(rows[name]["times_s"], repeats, budget) for name in calls):
        for name, call in calls.items():
            row = rows[name]
            if done(row["times_s"], repeats, budget):
                continue
            if not row["times_s"]:
                row["peak_extra_bytes"], (spent, extra) = peak_extra(call, device)
            else:
                spent, extra = call()
            row["times_s"].append(spent)
            row["extras"].append(extra)
            print(f"    {name}: {spent:,.2f} s", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ a. training step

def build_denoiser(models: ModelConfigs, device: torch.device) -> Denoiser:
    torch.manual_seed(0)
    return models.denoiser().to(device)


def training_step(models: ModelConfigs, space: str, batch: int, device: torch.device):
    """step(batch) -> seconds: the trainer's loss, backward and AdamW update on a fixed random batch."""
    cfg = LDMTrainConfig(space=space)
    model = build_denoiser(models, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = autocast_dtype(device, cfg.precision)
    tokenizer = Tokenizer(max_length=models.text_encoder.max_length)
    side = IMAGE_SIZE // (8 if space == "latent" else 1)
    generator = torch.Generator().manual_seed(1)
    ids = tokenizer.encode(eval_prompts(batch)).ids.to(device)                                    # (B, L)
    z0 = torch.randn(batch, models.unet.in_channels, side, side, generator=generator).to(device)  # (B, C, h, w)
    noise = torch.randn(z0.shape, generator=generator).to(device)
    t = torch.randint(models.schedule.num_timesteps, (batch,), generator=generator).to(device)

    def step(b: int = batch) -> None:
        with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
            loss = diffusion_loss(model, models.schedule, z0[:b], t[:b], noise[:b], ids[:b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # the warm-up (AdamW's state, lazy inits, the thread pool), counted: every FLOP here is linear in the batch
    flops = count_flops(lambda: step(WARMUP_BATCH)) * batch / WARMUP_BATCH
    return (lambda: (seconds(step, device)[0], None)), parameter_count(model.unet), parameter_count(model), flops


# ------------------------------------------------------------------------------------------------ b. generation

class StopGeneration(Exception):
    pass


def build_pipeline(models: ModelConfigs, space: str, device: torch.device) -> LatentDiffusion:
    dtype = default_dtype(device)
    model = build_denoiser(models, device).to(dtype).eval()
    autoencoder = load_vae("shapes64", device) if space == "latent" else PixelSpace(IMAGE_SIZE)
    tokenizer = Tokenizer(max_length=models.text_encoder.max_length)
    return LatentDiffusion(autoencoder.to(device, dtype), model.unet, model.text_encoder, tokenizer, models.schedule,
                           device=device)


def generation_call(pipe: LatentDiffusion, prompts: list[str], steps: int, guidance: float, budget: float,
                    device: torch.device):
    """call() -> (seconds for all `steps`, whether extrapolated); a call that runs past `budget` stops early."""
    f = pipe.vae.config.downsampling_factor
    z_shape = (len(prompts), pipe.unet.config.in_channels, IMAGE_SIZE // f, IMAGE_SIZE // f)
    decode_s = seconds(lambda: pipe.decode_latents(torch.randn(z_shape)), device)[0]    # the decoder alone

    def call():
        marks = []

        def callback(step) -> None:
            synchronize(device)
            marks.append(time.perf_counter())
            if budget and marks[-1] - start > budget and len(marks) >= 2 and len(marks) < steps:
                raise StopGeneration

        synchronize(device)
        start = time.perf_counter()
        try:
            pipe.text_to_image(prompts, guidance_scale=guidance, sampler_name="ddim", steps=steps, seed=0,
                               height=IMAGE_SIZE, width=IMAGE_SIZE, callback=callback)
        except StopGeneration:
            per_step = statistics.median(b - a for a, b in zip(marks, marks[1:]))
            return marks[-1] - start + (steps - len(marks)) * per_step + decode_s, True
        synchronize(device)
        return time.perf_counter() - start, False

    pipe.text_to_image(prompts[:1], guidance_scale=guidance, steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE)  # warm-up
    return call


# ------------------------------------------------------------------------------------------------ a + b + d

def summarise(measured: dict) -> dict:
    times = measured["times_s"]
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times),
            "extrapolated": any(measured["extras"]), "peak_extra_bytes": measured["peak_extra_bytes"]}


def run_speed(args: argparse.Namespace, device: torch.device) -> dict:
    rows = recipes(args.pixel_recipe)
    print_header(args, device, rows)
    print("  building the models and warming up ...", file=sys.stderr, flush=True)
    steps, parameters = {}, {}
    for name, (space, models) in rows.items():
        steps[name], unet_params, all_params, flops = training_step(models, space, args.batch, device)
        parameters[name] = {"unet": unet_params, "denoiser": all_params, "train_flops": flops}
    print(f"  a. training steps at batch {args.batch} ...", file=sys.stderr, flush=True)
    train = {name: summarise(m) for name, m in take_turns(steps, device, args.repeats, args.budget).items()}
    del steps
    prompts = eval_prompts(args.gen_batch)
    calls = {name: generation_call(build_pipeline(models, space, device), prompts, args.steps, args.guidance,
                                   args.budget, device) for name, (space, models) in rows.items()}
    print(f"  b. generation, {args.gen_batch} images x {args.steps} steps ...", file=sys.stderr, flush=True)
    generate = {name: summarise(m) for name, m in take_turns(calls, device, args.repeats, args.budget).items()}
    table = [{"row": name, "space": space, "unet": asdict(models.unet), "unet_parameters": parameters[name]["unet"],
              "denoiser_parameters": parameters[name]["denoiser"], "train_flops": parameters[name]["train_flops"],
              "train_step": train[name], "generation": generate[name]}
             for name, (space, models) in rows.items()]
    lines = print_speed_table(table, args)
    return {"rows": json.loads(json.dumps(table, default=str)), "targets": lines}


def print_header(args: argparse.Namespace, device: torch.device, rows: dict) -> None:
    threads = "torch's default" if args.threads is None else "--threads"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    print(f"Latent vs pixel diffusion (chapter 06), on {where}: the same U-Net recipe on 4x8x8 latents and on 3x64x64 "
          f"pixels ({3 * 64 * 64:,} / {4 * 8 * 8} = {3 * 64 * 64 / (4 * 8 * 8):g}x the values).")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} thread(s) ({threads}); "
          f"training {describe_precision(autocast_dtype(device, 'auto'))}, generation "
          f"{str(default_dtype(device)).removeprefix('torch.')}.")
    load = os.getloadavg()[0]
    if load > 0.5 and device.type == "cpu":
        print(f"The load average is {load:.1f}: other work is running, so the times are noisy (--threads 1 suffers "
              "least).")
    for name, (space, models) in rows.items():
        print("  " + describe(name, space, models))
    print(f"train ms = median of up to {args.repeats} training steps (loss, backward, AdamW) at batch {args.batch}; "
          f"ms/image = median of up to {args.repeats} text_to_image calls ({args.gen_batch} images, {args.steps} DDIM "
          f"steps, guidance {args.guidance:g} on the doubled batch, VAE decode in latent space) / {args.gen_batch};\n"
          f"rows stop repeating once they have spent {args.budget:g} s ('~': a call stopped there and extrapolated);"
          " peak MiB = the rise of the peak memory during the first timed call; x latent = the row over latent's;\n"
          f"train GFLOP = matmuls and convolutions of one training step (FlopCounterMode at batch {WARMUP_BATCH}, "
          f"x {args.batch}/{WARMUP_BATCH}).\n")


def describe_precision(dtype: torch.dtype | None) -> str:
    return "float32" if dtype is None else f"float32 weights under {str(dtype).removeprefix('torch.')} autocast"


def fmt_ms(part: dict, per: int = 1) -> str:
    mark = "~" if part["extrapolated"] else ""
    return f"{mark}{1e3 * part['median_s'] / per:,.1f}"


def fmt_mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:,.0f}"


def print_speed_table(table: list[dict], args: argparse.Namespace) -> list[str]:
    latent = table[0]
    header = ("| row | U-Net params | train GFLOP | x latent | train ms | x latent | train peak MiB | ms / image | "
              "x latent | gen peak MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(header)
    for row in table:
        train_x = ratio(row["train_step"], latent["train_step"], "median_s")
        gen_x = ratio(row["generation"], latent["generation"], "median_s")
        work = ratio(row, latent, "train_flops")
        print(f"| {row['row']} | {row['unet_parameters'] / 1e6:.2f} M | {row['train_flops'] / 1e9:,.1f} | "
              f"{show(work, '.1f')} | {fmt_ms(row['train_step'])} | "
              f"{show(train_x, '.1f')} | {fmt_mib(row['train_step']['peak_extra_bytes'])} | "
              f"{fmt_ms(row['generation'], args.gen_batch)} | {show(gen_x, '.1f')} | "
              f"{fmt_mib(row['generation']['peak_extra_bytes'])} |", flush=True)
    print(f"\n(text encoder: {(latent['denoiser_parameters'] - latent['unet_parameters']) / 1e6:.2f} M parameters in "
          f"every row; the latent row's generation also runs the shapes64 VAE decoder.)")
    lines = [f"targets (pixel / latent >= {TARGET_RATIO}x):"]
    for row in table[1:]:
        for part, what in (("train_step", "training step"), ("generation", "generated image")):
            r = ratio(row[part], latent[part], "median_s")
            lines.append(f"  {row['row']}, {what}: {1e3 * row[part]['median_s']:,.1f} / "
                         f"{1e3 * latent[part]['median_s']:,.1f} ms = {r:.1f}x: "
                         f"{'met' if r >= TARGET_RATIO else 'missed'}")
    print("\n" + "\n".join(lines))
    return lines


# ------------------------------------------------------------------------------------------------ sampling

def generate_all(pipe: LatentDiffusion, prompts: list[str], steps: int, guidance: float, batch: int,
                 height: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """Images for all prompts, `batch` at a time, chunk k seeded by seed + k: (N, 3, H, W) in [-1, 1], CPU."""
    chunks = [pipe.text_to_image(prompts[i:i + batch], guidance_scale=guidance, steps=steps, seed=seed + i // batch,
                                 height=height, width=height) for i in range(0, len(prompts), batch)]
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------ e. quality

def sized_schedule(trainer, budget: float, pilot_s: list[float]) -> None:
    """Size the cosine schedule to the steps the budget allows (estimated from the pilot steps), with the warm-up a
    tenth of that at most the recipe's own. Any trainer whose cfg has steps and warmup_steps (LDM or VAE)."""
    reachable = max(PILOT_STEPS + 1, int(budget / statistics.median(pilot_s)))
    trainer.cfg.steps = reachable
    trainer.cfg.warmup_steps = max(1, min(type(trainer.cfg).warmup_steps, reachable // 10))


def run_quality(args: argparse.Namespace, device: torch.device) -> dict:
    rows = recipes(args.pixel_recipe)
    keep = args.out is not None
    root = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="latent_vs_pixel-"))
    print(f"\ne. quality after {args.quality:g} s of training each (batch {args.batch}, turns of {TURN_S:g} s); "
          f"{args.eval_images} held-out prompts, {args.steps} DDIM steps, guidance {args.guidance:g}:")
    trainers, prep_s, spent, losses = {}, {}, {}, {}
    for name, (space, models) in rows.items():
        folder = root / FOLDERS[name]
        cfg = LDMTrainConfig(space=space, batch_size=args.batch, num_train_images=args.num_images, sample_every=0,
                             save_every=10**9, warmup_steps=max(1, PILOT_STEPS + 1))
        started = time.perf_counter()
        trainers[name] = LDMTrainer(cfg, folder, models, progress=False, device=device)
        trainers[name].prepare()                                        # render, encode and cache the data
        prep_s[name] = time.perf_counter() - started
        spent[name], losses[name] = [], []
        print(f"  {name}: data ready in {prep_s[name]:.1f} s (not counted)", file=sys.stderr, flush=True)
    for name, trainer in trainers.items():                              # pilot steps, then the sized schedule
        for _ in range(PILOT_STEPS):
            step_s, record = seconds(trainer.train_step, device)
            spent[name].append(step_s)
            losses[name].append(float(record["loss"]))
        sized_schedule(trainer, args.quality, spent[name])
    while any(sum(spent[name]) < args.quality and trainer.step < trainer.cfg.steps
              for name, trainer in trainers.items()):
        for name, trainer in trainers.items():
            turn_end = min(sum(spent[name]) + TURN_S, args.quality)
            while sum(spent[name]) < turn_end and trainer.step < trainer.cfg.steps:
                step_s, record = seconds(trainer.train_step, device)
                spent[name].append(step_s)
                losses[name].append(float(record["loss"]))
        print(f"    {', '.join(f'{n}: step {t.step}' for n, t in trainers.items())}", file=sys.stderr, flush=True)
    judge = load_judge("shapes64", device)
    results = []
    for name, trainer in trainers.items():
        tail = losses[name][-max(1, len(losses[name]) // 10):]             # the mean loss of the last tenth
        ema = trainer.ema_denoiser()
        pipe = LatentDiffusion(trainer.autoencoder, ema.unet, ema.text_encoder, trainer.tokenizer,
                               trainer.models.schedule, device=device)
        sample_s, quality = seconds(lambda: evaluate_pipeline(pipe, judge, args.eval_images, steps=args.steps,
                                                              guidance_scale=args.guidance, batch=args.eval_batch),
                                    device)
        row = {"row": name, "steps": trainer.step, "train_s": sum(spent[name]), "prep_s": prep_s[name],
               "ms_per_step": 1e3 * statistics.median(spent[name]), "final_loss": statistics.fmean(tail),
               "sample_s": sample_s, "eval_images": quality["count"], "prompt_following": quality["prompt_following"],
               "frechet": quality["frechet"], "frechet_real": quality["frechet_real"],
               "frechet_real_other_captions": quality["frechet_real_other_captions"]}
        if keep:
            from minildm.ldm_export import export_pipeline
            trainer.save({"steps": trainer.step, "train_seconds": row["train_s"]})
            target = root / f"{trainer.out.name}-pipeline"
            export_pipeline(trainer.out, target, {"made_by": "benchmarks/latent_vs_pixel.py --quality",
                                                  "budget_s": args.quality})
            row["pipeline"] = str(target)
        results.append(row)
    print_quality(results)
    if not keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return {"rows": results}


def print_quality(results: list[dict]) -> None:
    print("\n| row | steps | train s | ms / step | loss (last tenth) | prompt-following (all) | Frechet | sample s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        following, frechet = f"{r['prompt_following']['all']:.3f}", f"{r['frechet']:.2f}"
        print(f"| {r['row']} | {r['steps']:,} | {r['train_s']:.0f} | {r['ms_per_step']:,.0f} | {r['final_loss']:.4f} "
              f"| {following} | {frechet} | {r['sample_s']:.0f} |")
    print(f"Frechet distance of two real sets for the same captions (the floor): {results[0]['frechet_real']:.2f}; "
          f"of real sets for different captions: {results[0]['frechet_real_other_captions']:.2f}")
    print("(losses are in each space's own units: a latent MSE and a pixel MSE are not comparable numbers; "
          "ms / step includes the trainer's data, clipping and EMA)")


# ------------------------------------------------------------------------------------------------ f. resolution

def load_any_pipeline(folder: str | None, device: torch.device) -> LatentDiffusion:
    if folder is None:
        from minildm.pretrained import load_pipeline
        return load_pipeline("shapes64", device)
    return LatentDiffusion.from_folder(folder, device)       # a pixel-space folder gets its PixelSpace


def run_resolution(args: argparse.Namespace, device: torch.device) -> dict:
    print(f"\nf. duplicates at 2x: {args.eval_images} single-object prompts, {args.steps} DDIM steps, guidance "
          f"{args.guidance:g}:")
    try:
        pipe = load_any_pipeline(args.pipeline, device)
    except (FileNotFoundError, ValueError, OSError) as err:
        why = f"not measured: {type(err).__name__}: {err}"
        print(why)
        return {"skipped": why}
    prompts = eval_prompts(args.eval_images)
    g = (args.steps, args.guidance, args.eval_batch)
    low = generate_all(pipe, prompts, *g)                                                   # (N, 3, 64, 64)
    high = generate_all(pipe, prompts, *g, height=2 * IMAGE_SIZE)                           # (N, 3, 128, 128)
    upscaled = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
    fixed = torch.cat([pipe.image_to_image(upscaled[i:i + args.eval_batch], prompts[i:i + args.eval_batch],
                                           strength=args.hires_strength, guidance_scale=args.guidance,
                                           steps=args.steps, seed=i // args.eval_batch)
                       for i in range(0, len(prompts), args.eval_batch)])                 # (N, 3, 128, 128)
    rows = []
    print(f"pipeline: {args.pipeline or 'the shipped shapes64'} ({pipe.space} space)")
    print("| images | size | 0 objects | exactly 1 | more than 1 | mean count |\n|---|---|---:|---:|---:|---:|")
    for what, images in (("1x", low), ("2x", high), (f"hires fix (strength {args.hires_strength:g})", fixed)):
        counts = count_objects(images).float()
        row = {"images": what, "size": images.shape[-1], "none": float((counts == 0).float().mean()),
               "one": float((counts == 1).float().mean()), "more_than_one": float((counts > 1).float().mean()),
               "mean_count": float(counts.mean())}
        rows.append(row)
        print(f"| {what} | {row['size']}x{row['size']} | {row['none']:.1%} | {row['one']:.1%} | "
              f"{row['more_than_one']:.1%} | {row['mean_count']:.2f} |")
    return {"pipeline": args.pipeline or "shapes64", "rows": rows}


# ------------------------------------------------------------------------------------------------ the run

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[-2:]))
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row and part (default 5)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds per row and part after which no more calls start, and a generation call is "
                             "stopped and extrapolated (default 30; 0: no limit)")
    parser.add_argument("--batch", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--gen-batch", type=int, default=4, help="images per generation call (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per generated image (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--pixel-recipe", choices=("same", "deeper", "both"), default="both",
                        help="which pixel-space U-Net(s) to compare with latent (default both)")
    parser.add_argument("--no-speed", action="store_true", help="skip a-d (the time and memory table)")
    parser.add_argument("--quality", type=float, metavar="SECONDS",
                        help="e: train each space for SECONDS of wall clock, then score samples with the judge")
    parser.add_argument("--num-images", type=int, default=20_000, help="--quality: training images (default 20000)")
    parser.add_argument("--out", help="--quality: keep the runs and export pipelines here (default: a temp folder)")
    parser.add_argument("--resolution", action="store_true", help="f: count duplicated objects at 2x and hires fix")
    parser.add_argument("--pipeline", help="--resolution: a pipeline folder (default: the shipped shapes64 LDM)")
    parser.add_argument("--hires-strength", type=float, default=0.5, help="--resolution: img2img strength (0.5)")
    parser.add_argument("--eval-images", type=int, default=200, help="e and f: images per row (default 200)")
    parser.add_argument("--eval-batch", type=int, default=50, help="e and f: images per generation call (50)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "gen_batch", "steps", "eval_images", "eval_batch", "num_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch < WARMUP_BATCH:
        parser.error(f"--batch must be at least {WARMUP_BATCH} (the warm-up step's batch), got {args.batch}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.quality is not None and args.quality <= 0:
        parser.error(f"--quality takes a positive number of seconds, got {args.quality}")
    if args.quality is not None and args.num_images < args.batch:
        parser.error(f"--num-images ({args.num_images}) must be at least --batch ({args.batch})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    started = time.perf_counter()
    results = {}
    if not args.no_speed:
        results["speed"] = run_speed(args, device)
    if args.quality is not None:
        results["quality"] = run_quality(args, device)
    if args.resolution:
        results["resolution"] = run_resolution(args, device)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        setup = {"torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
                 "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
                 "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"setup": setup, **results}, indent=1, default=str) + "\n")
        print(f"measurements written to {args.json}")


if __name__ == "__main__":
    main()
