"""How much does a sampler cost besides the model? Chapter 07's claim: next to one U-Net call, nothing (<= 2%).

Each sampler runs 50 steps twice on the same (8, 4, 8, 8) latent batch:

- with a model_fn that returns a tensor computed beforehand, so the time is the sampler's own math and the loop
  around it (timestep tensors, the finiteness check, the step's arithmetic, fresh noise for the stochastic ones);
- with a stand-in model, to check that the two parts add up to the whole run.

There is no U-Net yet (chapter 05 builds it), so the model is a stand-in of the same kind and about the same cost as
a small latent U-Net: convolutions at 64 and 128 channels around one down- and one up-sampling, and a timestep
embedding. Run by hand, on one CPU thread so the figures are steady:

    python benchmarks/samplers.py            (--steps, --repeats, --threads to change the setup)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from minildm.samplers import SAMPLERS, make_sampler, sample
from minildm.schedule import NoiseSchedule

TARGET_PERCENT = 2.0


class StandInUNet(nn.Module):
    """Shaped like a small latent U-Net (4 -> 64 -> 128 -> 64 -> 4 channels, one skip), but not one."""

    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.high = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(4)])
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.low = nn.ModuleList([nn.Conv2d(2 * width, 2 * width, 3, padding=1) for _ in range(4)])
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.out_convs = nn.ModuleList([nn.Conv2d(2 * width, width, 3, padding=1),
                                        *[nn.Conv2d(width, width, 3, padding=1) for _ in range(3)]])
        self.norm_out = nn.GroupNorm(32, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half) / half)       # (width / 2,)
        angles = t.float().view(-1, 1) * frequencies                                 # (B, width / 2)
        return self.time(torch.cat([angles.sin(), angles.cos()], dim=1))             # (B, width)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z) + self.embed(t)[:, :, None, None]                      # (B, 64, 8, 8)
        for conv in self.high:
            h = h + conv(F.silu(h))
        skip = h
        h = self.down(h)                                                             # (B, 128, 4, 4)
        for conv in self.low:
            h = h + conv(F.silu(h))
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))             # (B, 64, 8, 8)
        h = self.out_convs[0](torch.cat([h, skip], dim=1))
        for conv in self.out_convs[1:]:
            h = h + conv(F.silu(h))
        return self.conv_out(F.silu(self.norm_out(h)))                              # (B, 4, 8, 8)


def median_time(run, repeats: int) -> float:
    """The median wall time of `run()` in seconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = StandInUNet().eval()
    schedule = NoiseSchedule()
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))          # (8, 4, 8, 8)
    t = torch.full((8,), 500.0)
    with torch.no_grad():
        answer = model(noise, t) * 0.1 + 0.9 * noise      # a plausible eps, fixed: the "model" that costs nothing

        def model_fn(zt, timestep):
            return model(zt, timestep)

        def precomputed(zt, timestep):
            return answer

        model_ms = 1e3 * median_time(lambda: [model(noise, t) for _ in range(20)], args.repeats) / 20

    parameters = sum(p.numel() for p in model.parameters())
    print(f"Sampler overhead at {args.steps} steps on a (8, 4, 8, 8) latent batch, {args.threads} CPU thread(s), "
          f"median of {args.repeats} runs.")
    print(f"The model is a STAND-IN for a small U-Net (convs at 64 and 128 channels, {parameters / 1e6:.2f} M "
          f"parameters), not minildm's U-Net: {model_ms:.2f} ms per call.")
    print("math = the sampling loop with a model_fn that returns a precomputed tensor (everything but the model);")
    print("overhead = math per model evaluation / one model call; check = whole run - evals x one call.\n")
    header = (f"{'sampler':<10}{'evals':>6}{'math ms/step':>14}{'math ms/eval':>14}{'model ms/call':>15}"
              f"{'overhead %':>12}{'run ms':>10}{'check ms/eval':>15}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name in SAMPLERS:
        sampler = make_sampler(name, schedule, args.steps)
        evals = len(sampler.timesteps)

        def loop(fn, sampler=sampler):
            return sample(fn, noise, sampler, generator=torch.Generator().manual_seed(1))

        math_s = median_time(lambda: loop(precomputed), args.repeats)
        run_s = median_time(lambda: loop(model_fn), max(3, args.repeats // 2))
        per_eval_ms = 1e3 * math_s / evals
        overhead = 100 * per_eval_ms / model_ms
        worst = max(worst, overhead)
        check = 1e3 * (run_s / evals) - model_ms
        print(f"{name:<10}{evals:>6}{1e3 * math_s / args.steps:>14.3f}{per_eval_ms:>14.3f}{model_ms:>15.2f}"
              f"{overhead:>11.2f}%{1e3 * run_s:>10.0f}{check:>15.3f}")
    verdict = "within" if worst <= TARGET_PERCENT else "OVER"
    print(f"\nlargest overhead {worst:.2f}% of a model call: {verdict} the {TARGET_PERCENT:g}% target")


if __name__ == "__main__":
    main()
