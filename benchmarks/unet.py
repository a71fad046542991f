"""Our U-Net against diffusers' UNet2DConditionModel: the same config, the same weights, the same function; the time
and peak memory of a forward call and of a training step, and the share of the CPU's matmul peak that step reaches.

Each config builds diffusers' model with random weights under a fixed seed and converts it with
`convert.unet_from_diffusers`; the outputs are compared first (the largest difference, over the largest output value,
is printed). Two configs, float32 on the CPU:

- classroom: 3 levels of (32, 64, 64) channels, attention at the first two, 4 heads; batch 16 of 4x8x8 latents (our
  Shapes 64x64 images) and prompts of 12 tokens x 64.
- sd-narrow: Stable Diffusion v1.5's layout (CrossAttnDownBlock2D x 3 + DownBlock2D, 2 layers per block, context
  77 x 768) at a fifth of its width, (64, 128, 256, 256), with 2 heads so that a head keeps about SD's size (32, 64
  and 128 numbers; SD's are 40, 80 and 160: 8 heads of 8 would make attention a softmax benchmark); batch 2 of
  4x32x32 latents (256x256 images).

What is measured, per config, model and mode (forward or training step):

- forward: one call under torch.no_grad, in eval mode. training step: eps_hat = model(z_t, t, c), loss = MSE(eps_hat,
  eps), backward, then the gradients are dropped. No optimizer step: AdamW's update is the same elementwise
  arithmetic over the same parameters for both models, so it would only dilute the comparison.
- time: the fastest of `--repeats` calls after a warm-up call (cheap calls repeat for at least half a second, slow
  ones stop after 4 s), both models in one fresh process per config, taking turns call by call so that a change in
  the machine's load hits both alike. The minimum, not the median: other work on the machine only ever adds time, so
  the fastest call is the closest to what the call itself costs (the --json file keeps every call's time, and the
  median).
- peak extra memory: how far one call raises the process's peak resident memory (ru_maxrss), as
  benchmarks/attention.py measures it, in a fresh process per config and model (not the timing one: what follows
  slows the calls). Three things would blur it: glibc keeps freed blocks for reuse (with its defaults, the same
  sd-narrow forward call read anywhere from 22 to 50 MiB, run to run, for 13 MiB of tensors), so that process takes
  every block of 64 KiB or more straight from the system and gives it straight back (MALLOC_MMAP_THRESHOLD_), and its
  resident memory follows the tensors alive; before each measured call the freed small blocks go back too
  (malloc_trim); and the peak is reset to the memory in use (Linux's /proc/self/clear_refs), else converting the
  weights, which holds both models for a moment, sets a peak the call never reaches. The larger of two calls after a
  warm-up is reported.
- FLOPs: torch.utils.flop_counter.FlopCounterMode over one call (matmuls and convolutions, the work that costs the
  time; elementwise ops, norms and softmax are not counted). Its table lacks the CPU's fused attention kernel, so its
  matmuls are added with torch's own count for fused attention (2 matmuls forward, 5 backward).
- matmul peak: the fastest of 10 float32 2048x2048 @ 2048x2048 products, with the same threads, in this run.

Targets, printed as met or missed: ours / diffusers <= 0.95 in time (forward and training step, each config), and our
training step reaches >= 40% of the measured matmul peak.

    python benchmarks/unet.py                             (about 2 minutes on 2 CPU cores)
    python benchmarks/unet.py --configs classroom --repeats 10 --threads 1 --json unet.json

On a machine shared with other work, --threads 1 gives steadier figures: a second thread that has to wait for a
busy core stalls every parallel step.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

# benchmarks/attention.py: this folder is sys.path[0] when the script runs
from attention import MiB, call_seconds, enough, peak_rss_bytes, ratio, show
from torch.utils.flop_counter import FlopCounterMode

from minildm.convert import unet_from_diffusers


class Setup(NamedTuple):
    options: dict          # diffusers UNet2DConditionModel options (the rest at diffusers' defaults)
    batch: int
    side: int              # latents are (batch, 4, side, side)
    tokens: int            # the context is (batch, tokens, cross_attention_dim)


CONFIGS = {
    "classroom": Setup(dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=4,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                            cross_attention_dim=64, norm_num_groups=32), batch=16, side=8, tokens=12),
    "sd-narrow": Setup(dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_head_dim=2,
                            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                            cross_attention_dim=768, norm_num_groups=32), batch=2, side=32, tokens=77),
}
MODELS = ("diffusers", "ours")
MODES = ("forward", "train")
SEED = 0
SAME_FUNCTION = 1e-4               # the largest output difference, relative to the largest output, of one function
TARGET_TIME_RATIO = 0.95           # ours / diffusers, forward and training step
TARGET_PEAK_SHARE = 0.40           # our training step's FLOP/s, as a share of the measured matmul peak
PEAK_SIZE, PEAK_CALLS = 2048, 10   # the matmul that measures the peak, and how many of it
MEMORY_CALLS = 2                   # calls whose peak extra memory is measured (the larger is reported)
MMAP_THRESHOLD = 64 << 10          # in the memory process, glibc takes blocks of this size or more from the system
GFLOP = 1e9


# ------------------------------------------------------------------------------------------------ the models

def build(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' model with seeded random weights, and ours converted from it."""
    import diffusers

    torch.manual_seed(SEED)
    reference = diffusers.UNet2DConditionModel(**CONFIGS[name].options).eval()
    return reference, unet_from_diffusers(dict(reference.config), reference.state_dict()).eval()


def max_rel_difference(name: str, reference: torch.nn.Module, ours: torch.nn.Module) -> float:
    """max |ours - diffusers| / max |diffusers| over the outputs for the benchmark's own inputs."""
    zt, t, context, _ = make_inputs(name)
    with torch.no_grad():
        expected = reference(zt, t, context, return_dict=False)[0]                 # (B, 4, side, side)
        return ((ours(zt, t, context) - expected).abs().max() / expected.abs().max()).item()


def make_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z_t, one timestep per item, the prompt's token embeddings and the noise eps to predict."""
    setup, generator = CONFIGS[name], torch.Generator().manual_seed(SEED + 1)
    zt = torch.randn(setup.batch, 4, setup.side, setup.side, generator=generator)             # (B, 4, h, w)
    t = torch.randint(0, 1000, (setup.batch,), generator=generator)                           # (B,)
    context_dim = setup.options["cross_attention_dim"]
    context = torch.randn(setup.batch, setup.tokens, context_dim, generator=generator)       # (B, L, D)
    return zt, t, context, torch.randn(zt.shape, generator=generator)                         # eps: (B, 4, h, w)


def make_call(model: torch.nn.Module, name: str, mode: str):
    """The timed function: a forward call under no_grad, or a training step (forward, MSE loss, backward)."""
    zt, t, context, noise = make_inputs(name)
    model.train(mode == "train")

    def predict() -> torch.Tensor:
        out = model(zt, t, context)
        return out if isinstance(out, torch.Tensor) else out.sample                 # diffusers wraps its output

    def forward() -> None:
        with torch.no_grad():
            predict()

    def train_step() -> None:
        F.mse_loss(predict(), noise).backward()
        model.zero_grad(set_to_none=True)               # the next step allocates its gradients again (and counts them)

    return forward if mode == "forward" else train_step


# ------------------------------------------------------------------------------------------------ FLOPs

def fused_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v: q k^T is 2 B h N_q N_k d FLOPs, P v is 2 B h N_q N_k d_v (torch's sdpa_flop_count)."""
    batch, heads, n_q, d = q_shape
    n_k, d_v = k_shape[2], v_shape[3]
    return 2 * batch * heads * n_q * n_k * (d + d_v)


def fused_attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Recompute q k^T (d), then dP = dO V^T (d_v), dV = P^T dO (d_v), dQ = dS K (d), dK = dS^T Q (d)."""
    batch, heads, n_q, d = q_shape
    n_k, d_v = k_shape[2], v_shape[3]
    return 2 * batch * heads * n_q * n_k * (3 * d + 2 * d_v)


def count_flops(call) -> int:
    """The FLOPs of one call: FlopCounterMode's matmuls and convolutions, and the CPU's fused attention kernels."""
    fused = {"_scaled_dot_product_flash_attention_for_cpu": fused_attention_flops,
             "_scaled_dot_product_flash_attention_for_cpu_backward": fused_attention_backward_flops}
    extra = {getattr(torch.ops.aten, name): count for name, count in fused.items() if hasattr(torch.ops.aten, name)}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        call()
    return counter.get_total_flops()


def matmul_peak_flops(repeats: int = PEAK_CALLS, size: int = PEAK_SIZE) -> float:
    """The CPU's float32 matmul peak as this run sees it: the fastest of `repeats` size^3 products (2 size^3 FLOPs)."""
    generator = torch.Generator().manual_seed(SEED)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b                                                                              # warm-up: threads, MKL
    fastest = min(call_seconds(lambda: a @ b, "cpu") for _ in range(repeats))
    return 2 * size**3 / fastest


# ------------------------------------------------------------------------------------------------ memory

def resident_bytes() -> int:
    """The memory in use now: resident pages from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Give freed heap back to the system, then make the peak (ru_maxrss) start again from the memory in use.
    False where Linux's clear_refs is not available: then the peak so far is the baseline, as in attention.py."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_extra_bytes(call) -> tuple[int, bool]:
    """How far one call raises the peak memory above the memory in use before it (the larger of MEMORY_CALLS)."""
    rises, reset = [], True
    for _ in range(MEMORY_CALLS):
        reset = reset_peak() and reset
        baseline = resident_bytes() if reset else peak_rss_bytes()
        call()
        rises.append(max(0, peak_rss_bytes() - baseline))
    return max(rises), reset


# ------------------------------------------------------------------------------------------------ one config

def measure_times(name: str, repeats: int) -> dict:
    """In this fresh process: build both models and compare their outputs; then per mode a warm-up call of each, the
    timed calls, the two models taking turns (a change in the machine's load hits both alike), and the FLOPs of one
    more call. {model: {mode: row}}, with the parameter counts and the output difference."""
    models = dict(zip(MODELS, build(name)))
    result = {"max_rel_difference": max_rel_difference(name, *models.values()),
              **{model: {"parameters": sum(p.numel() for p in models[model].parameters())} for model in MODELS}}
    for mode in MODES:
        calls = {model: make_call(models[model], name, mode) for model in MODELS}
        first_s = {model: call_seconds(calls[model], "cpu") for model in MODELS}                   # warm-up
        times = {model: [] for model in MODELS}
        while not all(enough(times[model], repeats) for model in MODELS):
            for model in MODELS:
                times[model].append(call_seconds(calls[model], "cpu"))
        for model in MODELS:
            result[model][mode] = {"first_call_ms": 1e3 * first_s[model], "times_ms": [1e3 * t for t in times[model]],
                                   "ms": 1e3 * min(times[model]), "median_ms": 1e3 * statistics.median(times[model]),
                                   "flops": count_flops(calls[model])}
    return result


def measure_memory(name: str, model_name: str) -> dict:
    """In this fresh process (started with MALLOC_MMAP_THRESHOLD_ set), only `model_name`: per mode, a warm-up call,
    then the peak extra memory of the next calls. {mode: row}"""
    reference, ours = build(name)
    model = reference if model_name == "diffusers" else ours
    del reference, ours                                      # the other model's memory goes before anything is measured
    rows = {}
    for mode in MODES:
        call = make_call(model, name, mode)
        call()                                                                         # warm-up
        memory, reset = peak_extra_bytes(call)
        rows[mode] = {"peak_extra_bytes": memory,
                      "memory_baseline": "memory in use (peak reset)" if reset else "peak so far"}
    return rows


def measure_in_fresh_process(args: argparse.Namespace, name: str, what: str, model: str = "both") -> dict:
    """Run measure_times or measure_memory in a new Python process, whose peak RSS starts clean; read its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", name, what, model,
               "--repeats", str(args.repeats)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if what == "memory" else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    last_words = (done.stderr.strip().splitlines() or ["no message"])[-1]
    why = "killed, perhaps for memory" if done.returncode < 0 else last_words
    failed = {mode: {"skipped": f"{what} failed: its process exited {done.returncode} ({why})"} for mode in MODES}
    return failed if what == "memory" else {model: failed for model in MODELS}


def measure(name: str, args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """One config: the times of both models from one fresh process, each model's memory from another.
    {(model, mode): row}"""
    timed = measure_in_fresh_process(args, name, "time")
    rows = {}
    for model in MODELS:
        memory = measure_in_fresh_process(args, name, "memory", model)
        for mode in MODES:
            rows[model, mode] = {"config": name, "model": model, "mode": mode, "threads": torch.get_num_threads(),
                                 "parameters": timed[model].get("parameters"),
                                 "max_rel_difference": timed.get("max_rel_difference"),
                                 **memory[mode], **timed[model][mode]}
    return rows


# ------------------------------------------------------------------------------------------------ printing

def describe(name: str, rows: dict) -> str:
    setup = CONFIGS[name]
    o = setup.options
    levels = sum(kind.startswith("CrossAttn") for kind in o["down_block_types"])
    parameters = next((row["parameters"] for row in rows.values() if row.get("parameters")), 0)
    return (f"{name}: channels {o['block_out_channels']}, attention at {levels} of {len(o['down_block_types'])} "
            f"levels, {o['attention_head_dim']} heads, {o['layers_per_block']} layers per block, "
            f"{parameters / 1e6:.2f} M parameters;\n  batch {setup.batch} of 4x{setup.side}x{setup.side} latents, "
            f"context {setup.tokens} x {o['cross_attention_dim']}")


def print_config(name: str, rows: dict, peak: float) -> None:
    """One block of the table: the config, the output check, then one line per model with its ratios to diffusers."""
    print(describe(name, rows))
    difference = rows.get(("ours", "forward"), {}).get("max_rel_difference")
    if difference is not None:
        verdict = ("the same function" if difference <= SAME_FUNCTION
                   else "NOT the same function: the times below compare different computations")
        print(f"  same weights: max |ours - diffusers| / max |diffusers| = {difference:.2e} ({verdict})")
    if any(row.get("memory_baseline") == "peak so far" for row in rows.values()):
        print("  (peak MiB: /proc/self/clear_refs is not available here, so it is the rise over the peak so far, which "
              "converting the weights may already have set)")
    for model in MODELS:
        line = f"  {model:<11}"
        for mode in MODES:
            row, theirs = rows.get((model, mode), {}), rows.get(("diffusers", mode))
            if "skipped" in row or not row:
                line += f"  {row.get('skipped', 'not measured'):<42}"
                continue
            line += (f"{row['ms']:>10,.1f}{show(ratio(row, theirs, 'ms'), '.3f'):>8}"
                     f"{row['peak_extra_bytes'] / MiB:>10,.1f}{show(ratio(row, theirs, 'peak_extra_bytes'), '.3f'):>8}")
        train = rows.get((model, "train"), {})
        if "flops" in train:
            achieved = train["flops"] / (train["ms"] / 1e3)
            line += f"{train['flops'] / GFLOP:>9.2f}{achieved / GFLOP:>9.1f}{achieved / peak:>8.1%}"
        print(line, flush=True)


def target_lines(table: dict[str, dict], peak: float) -> list[str]:
    """Each target with the measured figures, and met or missed; never an assertion."""
    lines = ["targets:"]
    for name, rows in table.items():
        for mode, what in (("forward", "forward"), ("train", "training step")):
            ours, theirs = rows.get(("ours", mode)), rows.get(("diffusers", mode))
            slower = ratio(ours, theirs, "ms")
            if slower is None:
                lines.append(f"  {name} {what}: not checked (a row is missing)")
                continue
            lines.append(f"  {name} {what}: ours / diffusers = {ours['ms']:,.1f} / {theirs['ms']:,.1f} ms = "
                         f"{slower:.3f}; target <= {TARGET_TIME_RATIO:g}: "
                         f"{'met' if slower <= TARGET_TIME_RATIO else 'missed'}")
    for name, rows in table.items():
        train = rows.get(("ours", "train"))
        if not train or "flops" not in train:
            lines.append(f"  {name} share of matmul peak: not checked (our training step was not measured)")
            continue
        achieved = train["flops"] / (train["ms"] / 1e3)
        share = achieved / peak
        lines.append(f"  {name} our training step: {train['flops'] / GFLOP:.2f} GFLOP in {train['ms']:,.1f} ms = "
                     f"{achieved / GFLOP:.1f} GFLOP/s = {share:.1%} of the {peak / GFLOP:.1f} GFLOP/s matmul peak; "
                     f"target >= {TARGET_PEAK_SHARE:.0%}: {'met' if share >= TARGET_PEAK_SHARE else 'missed'}")
    return lines


def print_header(args: argparse.Namespace, peak: float) -> None:
    threads = "torch's default" if args.threads is None else "--threads"
    print("Our U-Net vs diffusers' UNet2DConditionModel (chapter 05): same config, same weights, float32 on the CPU.")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} thread(s) ({threads}); "
          f"matmul peak: {peak / GFLOP:.1f} GFLOP/s (fastest of {PEAK_CALLS} {PEAK_SIZE}x{PEAK_SIZE} @ "
          f"{PEAK_SIZE}x{PEAK_SIZE} float32 products).")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"The load average is {load:.1f}: other work is running, so the times are noisy (--threads 1 suffers "
              "least).")
    print(f"ms = the fastest of {args.repeats} calls after a warm-up call; forward: no_grad, eval mode; step: forward, "
          "MSE loss, backward (no optimizer step).")
    print("peak MiB = the rise of the peak memory during one call above the memory in use before it (a fresh process "
          "per config and model, in which glibc hands freed blocks back at once);\nx diff = the row's figure over "
          "diffusers'; GFLOP = matmuls and convolutions of one training step (FlopCounterMode, fused attention "
          "included),\nGFLOP/s = GFLOP / step time, of peak = GFLOP/s / matmul peak.\n")
    top = f"  {'':<11}{'forward':^36}{'training step':^36}".rstrip()
    header = (f"  {'model':<11}" + f"{'ms':>10}{'x diff':>8}{'peak MiB':>10}{'x diff':>8}" * 2
              + f"{'GFLOP':>9}{'GFLOP/s':>9}{'of peak':>8}")
    print(top + "\n" + header + "\n" + "-" * len(header))


# ------------------------------------------------------------------------------------------------ the run

def run_table(args: argparse.Namespace) -> dict:
    peak = matmul_peak_flops()
    print_header(args, peak)
    table = {}
    for name in args.configs:
        table[name] = measure(name, args)
        print_config(name, table[name], peak)
    lines = target_lines(table, peak)
    print("\n" + "\n".join(lines))
    return {"matmul_peak_flops": peak, "rows": [row for rows in table.values() for row in rows.values()],
            "targets": lines}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS),
                        help=f"which configs (default: all of {', '.join(CONFIGS)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row, after the warm-up (default 5)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the measured rows to this JSON file")
    parser.add_argument("--measure", nargs=3, metavar=("CONFIG", "WHAT", "MODEL"),
                        help="used by the script itself: measure the times (of both models) or the memory (of one) "
                             "in this process and print them as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.measure:
        name, what, model = args.measure
        print(json.dumps(measure_times(name, args.repeats) if what == "time" else measure_memory(name, model)))
        return
    started = time.perf_counter()
    results = run_table(args)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        setup = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                 "load_average": os.getloadavg()[0], "repeats": args.repeats, "seed": SEED,
                 "configs": {name: CONFIGS[name]._asdict() for name in args.configs},
                 "time": "ms: min over the timed calls"}
        args.json.write_text(json.dumps({"setup": setup, **results}, indent=1) + "\n")
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
