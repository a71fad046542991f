"""Stable Diffusion 1.5 at its full size: minildm against diffusers, same weights, same inputs, one run.

diffusers builds SD 1.5's U-Net, VAE and CLIP text encoder from their configs with random weights (cheap random
fill, as tests/oracle/test_sd_full_size.py); they are written as a diffusers folder and as one CompVis single file
(the inverse tables of tests/oracle/test_unet_compvis.py and test_vae_parity.py), and minildm loads the folder with
`LatentDiffusion.from_pretrained`. Then, float32 on the CPU:

- U-Net step: one call on a classifier-free-guidance batch (2 x 4 x side x side latents, 77 x 768 context), as one
  sampler step makes it. VAE decode: one decode of 1 x 4 x side x side latents (an image of 8 side x 8 side).
  The outputs are compared first (max |ours - diffusers| / max |diffusers|). Time: the fastest of `--repeats`
  calls after a warm-up, ours and diffusers taking turns call by call (benchmarks/unet.py's style: other work on
  the machine only ever adds time, so the minimum is the closest to the call's own cost).
- load peak: the peak resident memory (VmHWM, see load_only) of a fresh process that imports, loads the single
  file and then reads every weight once (as a first step would; a memory-mapped file's pages count once read):
  minildm's `LatentDiffusion.from_pretrained(file)` against diffusers' `StableDiffusionPipeline.from_single_file(
  file, config=folder, local_files_only=True)`. The import alone (torch, diffusers) is measured too, so the rise over
  it is what the load costs; the weights are 4.27 GB (float32).

Target, printed as met or missed: ours / diffusers <= 0.95 in time, U-Net step and VAE decode.

    python benchmarks/sd.py                         (about 2 minutes on 2 CPU cores; 9 GB of disk in a temp folder)
    python benchmarks/sd.py --side 16 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGET_TIME_RATIO = 0.95
GB = 1e9


def build(workdir: Path):
    """diffusers' SD 1.5 pipeline with random weights, saved as a folder and as a CompVis single file."""
    import diffusers
    import transformers
    from safetensors.torch import save_file

    from minildm.clip_tokenizer import CLIPTokenizer
    from minildm.sd_configs import SD15, SD_SCHEDULER

    sys.path.insert(0, str(ROOT / "tests" / "oracle"))
    from test_sd_full_size import empty, fill  # cheap random weights
    from test_unet_compvis import to_compvis as unet_to_compvis  # the tests' own inverse tables
    from test_vae_parity import to_compvis as vae_to_compvis

    unet = fill(empty(lambda: diffusers.UNet2DConditionModel(**SD15.unet)), 0)          # SD 1.5's configs
    vae = fill(empty(lambda: diffusers.AutoencoderKL(**SD15.vae)), 1)
    text_encoder = fill(transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15.text_encoders[0])), 2)
    CLIPTokenizer.shipped(pad_token="<|endoftext|>").save(workdir / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(workdir / "tokenizer")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(workdir / "sd15")
    state = {**unet_to_compvis(unet), **vae_to_compvis(vae.state_dict(), len(SD15.vae["block_out_channels"]))}
    prefix = "cond_stage_model.transformer.text_model."                   # SD 1 files' (transformers 5 drops
    state.update({prefix + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()})   # it)
    save_file({k: v.contiguous() for k, v in state.items()}, str(workdir / "sd15.safetensors"))
    return pipe


def timed(pairs: dict, repeats: int) -> dict[str, float]:
    """The fastest of `repeats` calls of each, after a warm-up, taking turns call by call."""
    best = {}
    with torch.no_grad():
        for name, call in pairs.items():
            call()
        for _ in range(repeats):
            for name, call in pairs.items():
                start = time.perf_counter()
                call()
                best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
    return best


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def compare_speed(pipe, ours, side: int, repeats: int) -> list[tuple]:
    from minildm.sd_configs import SD15

    generator = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, side, side, generator=generator)                        # (2B, 4, h, w): cond + uncond
    t = torch.full((2,), 801)
    context = torch.randn(2, 77, SD15.context_dim, generator=generator)            # (2B, 77, 768)
    z1 = z[:1]
    with torch.no_grad():
        unet_err = relative(ours.unet(z, t, context), pipe.unet(z, t, encoder_hidden_states=context).sample)
        vae_err = relative(ours.vae.decode(z1), pipe.vae.decode(z1).sample)
    unet = timed({"diffusers": lambda: pipe.unet(z, t, encoder_hidden_states=context),
                  "ours": lambda: ours.unet(z, t, context)}, repeats)
    vae = timed({"diffusers": lambda: pipe.vae.decode(z1), "ours": lambda: ours.vae.decode(z1)}, repeats)
    return [(f"U-Net step (2x4x{side}x{side})", unet, unet_err), (f"VAE decode (1x4x{side}x{side})", vae, vae_err)]


# ------------------------------------------------------------------------------------------------ load memory

def load_only(which: str, workdir: Path) -> None:
    """Run in a fresh process: import, (load the single file, read every weight once), print the peak RSS as JSON."""
    def peak() -> int:
        """VmHWM, the peak resident memory of this process's own address space. Not ru_maxrss: Linux carries the
        parent's peak across fork + exec into it (here the parent holds the 4 GB models), so every child would
        start at the parent's peak."""
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024                                      # kB

    import diffusers  # noqa: F401  (both processes import the same libraries, so the baselines match)

    from minildm.pipeline import LatentDiffusion

    result = {"import": peak()}
    start = time.perf_counter()
    try:
        if which == "ours":
            pipe = LatentDiffusion.from_pretrained(workdir / "sd15.safetensors", device="cpu")
            models = (pipe.unet, pipe.vae, pipe.text_encoder)
        else:
            os.environ["HF_HUB_OFFLINE"] = "1"
            pipe = diffusers.StableDiffusionPipeline.from_single_file(
                str(workdir / "sd15.safetensors"), config=str(workdir / "sd15"), local_files_only=True,
                safety_checker=None, requires_safety_checker=False)
            models = (pipe.unet, pipe.vae, pipe.text_encoder)
        result["load_s"] = time.perf_counter() - start
        result["load"] = peak()
        with torch.no_grad():
            total = sum(float(p.sum()) for model in models for p in model.parameters())
        result["read"], result["checksum"] = peak(), total
    except Exception as error:                                   # noqa: BLE001  (reported in the table)
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print(json.dumps(result))


def measure_load(which: str, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--load-only", which, "--workdir", str(workdir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8, help="latent side (image side / 8); default 8")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the load-memory subprocesses")
    parser.add_argument("--load-only", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.load_only:
        return load_only(args.load_only, args.workdir)

    from minildm.pipeline import LatentDiffusion

    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="minildm-sd-bench-") as folder:
        workdir = Path(folder)
        start = time.perf_counter()
        pipe = build(workdir)
        ours = LatentDiffusion.from_pretrained(workdir / "sd15", device="cpu")
        print(f"SD 1.5 full size, float32 on the CPU, {torch.get_num_threads()} threads, random weights "
              f"(built and saved in {time.perf_counter() - start:.0f} s); fastest of {args.repeats} calls, "
              f"taking turns")
        rows = compare_speed(pipe, ours, args.side, args.repeats)
        del pipe, ours
        print(f"{'':28} {'diffusers ms':>13} {'ours ms':>10} {'ours/diff':>10} {'max rel diff':>13}  target")
        for name, best, err in rows:
            share = best["ours"] / best["diffusers"]
            met = "met" if share <= TARGET_TIME_RATIO else "missed"
            print(f"{name:28} {best['diffusers'] * 1e3:13,.0f} {best['ours'] * 1e3:10,.0f} {share:10.3f} "
                  f"{err:13.1e}  <= {TARGET_TIME_RATIO} {met}")
        if args.no_memory:
            return
        loads = {which: measure_load(which, workdir) for which in ("diffusers", "ours")}
        print("\nloading the 4.27 GB single file, fresh process each: peak RSS (GB), after import / after load / "
              "after reading every weight")
        for which, result in loads.items():
            if "error" in result:
                print(f"{which:10} could not run: {result['error']}")
                continue
            print(f"{which:10} {result['import'] / GB:6.2f} / {result['load'] / GB:6.2f} / {result['read'] / GB:6.2f}"
                  f"   (load {result['load_s']:.1f} s; rise {(result['read'] - result['import']) / GB:.2f} GB)")
        if all("error" not in r for r in loads.values()):
            rise = {w: r["read"] - r["import"] for w, r in loads.items()}
            print(f"ours / diffusers, rise of the peak: {rise['ours'] / rise['diffusers']:.2f}")


if __name__ == "__main__":
    main()
