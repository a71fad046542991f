"""The attention ladder, measured: time and peak memory of each backend as N grows (chapter 04).

Self-attention (N_q = N_k = N) at batch 1, 8 heads, d = 40: Stable Diffusion v1's first transformer block, where
N = 4096 is the 64 x 64 latent of a 512 x 512 image. For each N and each backend of `minildm.attention` (naive,
sliced, chunked, sdpa; triton on a CUDA GPU with Triton installed), with the library's default chunk sizes:

- time: the fastest of `--repeats` calls, after a warm-up call (cheap calls repeat for at least half a second, slow
  ones stop after 4 s). The minimum, not the median: other work on the machine only ever adds time, so the fastest
  call is the closest to what the call itself costs (the --json file keeps every call's time, and the median).
- peak extra memory: how far one call raises the memory in use. torch keeps no allocator statistics on the CPU, so
  each (backend, N) runs in a fresh process, which allocates the inputs, runs a tiny call of the same backend (so
  torch's one-time allocations are already in), takes its peak resident memory (ru_maxrss) as the baseline, runs
  one call and reports the rise of the peak. On CUDA, torch.cuda.max_memory_allocated does the same in-process.

Targets, printed as met or missed: on the CPU at N = 4096, `chunked` uses <= 1/8 of `naive`'s peak memory and runs
within 1.5x of `sdpa`'s time; on a CUDA GPU (float16), our Triton kernel reaches >= 0.8 of sdpa's (flash) throughput.
A run that would need more than half the available memory is skipped, and says how much it would need.

    python benchmarks/attention.py                        (about 2 minutes on 2 CPU cores)
    python benchmarks/attention.py --sizes 256 1024 --repeats 3
    python benchmarks/attention.py --sweep                (chunked over (query_chunk, key_chunk) at N = 4096)

On a machine shared with other work, --threads 1 gives steadier figures: a second thread that has to wait for a
busy core stalls every parallel step.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from minildm.attention import attention, default_query_chunk, score_matrix_bytes

BATCH, HEADS, HEAD_DIM = 1, 8, 40
DEFAULT_SIZES = (256, 1024, 4096, 16384)
LADDER = ("naive", "sliced", "chunked", "sdpa", "triton")
TARGET_N = 4096
TARGET_MEMORY_SHARE = 1 / 8          # chunked's peak memory, as a share of naive's
TARGET_TIME_RATIO = 1.5              # chunked's time, as a multiple of sdpa's
TARGET_TRITON_THROUGHPUT = 0.8       # triton's calls per second, as a share of sdpa's (CUDA, float16)
MEMORY_SHARE = 0.5                   # a run may plan to use at most this share of the available memory
SCORE_COPIES = 3                     # naive holds up to 2-3 score-sized tensors at once (S, S * scale, P)
MIN_TIMING_S = 0.5                   # per row: cheap calls repeat until this much time is spent (a steadier min)
TIME_BUDGET_S = 4.0                  # per row: no more timed calls once this much time is spent (at least one)
SWEEP_CHUNKS = (256, 512, 1024, 2048, 4096)
CHUNK_OPTIONS = {"sliced": ("slice_size",), "chunked": ("query_chunk", "key_chunk")}   # what tunes each backend
MiB, GiB = 2**20, 2**30


def library_defaults() -> dict[str, int]:
    """The chunk sizes `attention()` uses when none are given: read from its signature, so they cannot drift. A
    query_chunk of None means "rows for a block of about 16 MiB": resolved here for this benchmark's batch and heads."""
    parameters = inspect.signature(attention).parameters
    chunks = {name: parameters[name].default for name in ("slice_size", "query_chunk", "key_chunk")}
    if chunks["query_chunk"] is None:
        chunks["query_chunk"] = default_query_chunk(torch.empty(BATCH, HEADS, 1, HEAD_DIM), chunks["key_chunk"])
    return chunks


def triton_available() -> bool:
    """Our kernel runs on CUDA GPUs only (the tests run it through Triton's interpreter, far too slow to time)."""
    return (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec("minildm.kernels") is not None)


def make_inputs(n: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return tuple(torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=generator).to(device, dtype)  # (B, heads, N, d)
                 for _ in range(3))


# ------------------------------------------------------------------------------------------------ memory

def available_bytes(device: str) -> int:
    """Free memory on the device: MemAvailable from /proc/meminfo on the CPU (what the kernel can hand out without
    swapping), the driver's free figure on CUDA."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable line in /proc/meminfo: this script measures memory on Linux only")


def planned_bytes(backend: str, n: int, chunks: dict[str, int]) -> int:
    """A generous guess of a call's peak working memory, to skip runs that cannot fit. Scores are counted in float32,
    the dtype the softmax is taken in; sdpa and triton hold O(N) memory, a few input-sized tensors."""
    rows, cols = {"naive": (n, n), "sliced": (min(chunks["slice_size"], n), n),
                  "chunked": (min(chunks["query_chunk"], n), min(chunks["key_chunk"], n))}.get(backend, (0, 0))
    inputs = 4 * BATCH * HEADS * n * HEAD_DIM * 4                               # q, k, v and the output, float32
    return SCORE_COPIES * score_matrix_bytes(BATCH, HEADS, rows, cols) + inputs


def skip_reason(backend: str, n: int, chunks: dict[str, int], available: int) -> str | None:
    if backend == "triton" and not triton_available():
        return "skipped: needs a CUDA GPU, triton and minildm.kernels"
    need = planned_bytes(backend, n, chunks)
    if need > MEMORY_SHARE * available:
        return (f"skipped: would need {need / GiB:.1f} GiB, over {MEMORY_SHARE:.0%} of the "
                f"{available / GiB:.1f} GiB available")
    return None


def peak_rss_bytes() -> int:
    """The most resident memory this process has ever held (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ one row

def call_seconds(run, device: str) -> float:
    """Wall time of one call: CUDA runs asynchronously, so there the GPU's own events time it."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def enough(times: list[float], repeats: int) -> bool:
    """`repeats` timed calls; more while they add up to under MIN_TIMING_S (the minimum of a few cheap calls is at the
    mercy of the other work on the machine); fewer once they add up to TIME_BUDGET_S (a slow call varies little)."""
    spent = sum(times)
    return bool(times) and (spent >= TIME_BUDGET_S or (len(times) >= repeats and spent >= MIN_TIMING_S))


def measure_row(backend: str, n: int, device: str, dtype: torch.dtype, repeats: int, chunks: dict[str, int]) -> dict:
    """Peak extra memory of the first call (which is also the warm-up), then the time of the calls after it."""
    options = {name: chunks[name] for name in CHUNK_OPTIONS.get(backend, ())}
    with torch.no_grad():
        tiny = make_inputs(64, device, dtype)[0]
        attention(tiny, tiny, tiny, backend=backend, **options)         # torch's one-time allocations, thread pool
        q, k, v = make_inputs(n, device, dtype)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            baseline = peak_rss_bytes()
        first_s = call_seconds(lambda: attention(q, k, v, backend=backend, **options), device)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
        times = []
        while not enough(times, repeats):
            times.append(call_seconds(lambda: attention(q, k, v, backend=backend, **options), device))
    return {"backend": backend, "n": n, **options, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "first_call_ms": 1e3 * first_s, "times_ms": [1e3 * t for t in times],
            "ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times),
            "peak_extra_bytes": max(0, peak - baseline), "score_matrix_bytes": score_matrix_bytes(BATCH, HEADS, n, n)}


def measure_in_fresh_process(backend: str, n: int, args: argparse.Namespace, chunks: dict[str, int]) -> dict:
    """Run measure_row in a new Python process, whose peak RSS starts clean, and read back its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", backend, str(n), "--device", "cpu",
               "--repeats", str(args.repeats), "--chunks", str(chunks["query_chunk"]), str(chunks["key_chunk"]),
               "--slice-size", str(chunks["slice_size"])]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last_words = (done.stderr.strip().splitlines() or ["no message"])[-1]
        why = "killed, perhaps for memory" if done.returncode < 0 else last_words
        return {"backend": backend, "n": n, "skipped": f"failed: its process exited {done.returncode} ({why})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(backend: str, n: int, args: argparse.Namespace, chunks: dict[str, int]) -> dict:
    """One (backend, N) row: skipped if it cannot fit; on the CPU in a fresh process; on CUDA in this one (the
    allocator counts its own peak there, and a fresh process would spend seconds starting CUDA)."""
    reason = skip_reason(backend, n, chunks, available_bytes(args.device))
    if reason is not None:
        return {"backend": backend, "n": n, "skipped": reason}
    if args.device == "cpu":
        return measure_in_fresh_process(backend, n, args, chunks)
    try:
        return measure_row(backend, n, args.device, args.dtype, args.repeats, chunks)
    except torch.OutOfMemoryError:
        return {"backend": backend, "n": n, "skipped": "failed: out of GPU memory"}
    finally:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ printing

def ratio(numerator: dict | None, denominator: dict | None, key: str) -> float | None:
    if not numerator or not denominator or key not in numerator or key not in denominator or not denominator[key]:
        return None
    return numerator[key] / denominator[key]


def show(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def describe(row: dict) -> str:
    if "skipped" in row:
        return f"{row['backend']} {row['skipped']}"
    return f"{row['backend']} {row['ms']:,.1f} ms and {row['peak_extra_bytes'] / MiB:,.1f} MiB"


def print_header(args: argparse.Namespace, title: str) -> None:
    threads = "torch's default" if args.threads is None else "--threads"
    where = f"on {torch.cuda.get_device_name()}" if args.device == "cuda" else "on the CPU"
    defaults = ", ".join(f"{name}={size}" for name, size in library_defaults().items())
    print(f"{title}: self-attention, batch {BATCH}, {HEADS} heads, d = {HEAD_DIM}, "
          f"{str(args.dtype).removeprefix('torch.')} {where}.")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} thread(s) ({threads}), "
          f"{available_bytes(args.device) / GiB:.1f} GiB available; attention()'s default chunks: {defaults}.")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"The load average is {load:.1f}: other work is running, so the times are noisy (--threads 1 suffers "
              "least).")
    print(f"ms = the fastest of {args.repeats} calls after a warm-up call (more for cheap calls, until "
          f"{MIN_TIMING_S:g} s; fewer once {TIME_BUDGET_S:g} s are spent);")
    print("peak MiB = the rise of the peak memory during one call (CPU: peak RSS, one fresh process per row; CUDA: "
          "max_memory_allocated).\nx naive, x sdpa: the row's figure over theirs.\n")


def print_group(n: int, rows: dict[str, dict], dtype: torch.dtype) -> None:
    """One block of the table: the rows of one N, with naive's analytical score-matrix size above them."""
    scores = score_matrix_bytes(BATCH, HEADS, n, n, dtype)
    print(f"N = {n}: one naive score matrix is {BATCH} x {HEADS} x {n} x {n} {str(dtype).removeprefix('torch.')} "
          f"= {scores / MiB:,.1f} MiB")
    naive, sdpa = rows.get("naive"), rows.get("sdpa")
    for name, row in rows.items():
        if "skipped" in row:
            print(f"  {name:<9}{row['skipped']}")
            continue
        print(f"  {name:<9}{row['ms']:>10,.1f}{show(ratio(row, naive, 'ms'), '.3g'):>9}"
              f"{show(ratio(row, sdpa, 'ms'), '.3g'):>9}{row['peak_extra_bytes'] / MiB:>12,.1f}"
              f"{show(ratio(row, naive, 'peak_extra_bytes'), '.3g'):>9}"
              f"{show(ratio(row, sdpa, 'peak_extra_bytes'), '.3g'):>9}", flush=True)


def target_lines(table: dict[int, dict[str, dict]], device: str) -> list[str]:
    """Each target with the measured figures, and met or missed; never an assertion."""
    rows = {name: row for name, row in table.get(TARGET_N, {}).items() if "skipped" not in row}
    lines = [f"targets at N = {TARGET_N}:"]
    if device == "cpu":
        chunked, naive, sdpa = rows.get("chunked"), rows.get("naive"), rows.get("sdpa")
        share, slower = ratio(chunked, naive, "peak_extra_bytes"), ratio(chunked, sdpa, "ms")
        if share is None or slower is None:
            return lines + [f"  not checked: needs naive, chunked and sdpa measured at N = {TARGET_N}"]
        lines.append(f"  memory: chunked / naive = {chunked['peak_extra_bytes'] / MiB:,.1f} / "
                     f"{naive['peak_extra_bytes'] / MiB:,.1f} MiB = {share:.3f} (1/{1 / share:.1f}); "
                     f"target <= 1/{1 / TARGET_MEMORY_SHARE:g}: {'met' if share <= TARGET_MEMORY_SHARE else 'missed'}")
        lines.append(f"  time:   chunked / sdpa  = {chunked['ms']:,.1f} / {sdpa['ms']:,.1f} ms = {slower:.2f}x; "
                     f"target <= {TARGET_TIME_RATIO:g}x: {'met' if slower <= TARGET_TIME_RATIO else 'missed'}")
        return lines
    triton, sdpa = rows.get("triton"), rows.get("sdpa")
    throughput = ratio(sdpa, triton, "ms")                 # calls per second, triton's over sdpa's
    if throughput is None:
        return lines + [f"  triton not checked: needs triton and sdpa measured at N = {TARGET_N} "
                        "(a CUDA GPU with triton installed)"]
    return lines + [f"  throughput: triton / sdpa = sdpa ms / triton ms = {sdpa['ms']:.3f} / {triton['ms']:.3f} = "
                    f"{throughput:.2f}; target >= {TARGET_TRITON_THROUGHPUT:g}: "
                    f"{'met' if throughput >= TARGET_TRITON_THROUGHPUT else 'missed'}"]


# ------------------------------------------------------------------------------------------------ the runs

def run_table(args: argparse.Namespace) -> dict:
    chunks = library_defaults()
    print_header(args, "Attention ladder (chapter 04)")
    header = f"  {'backend':<9}{'ms':>10}{'x naive':>9}{'x sdpa':>9}{'peak MiB':>12}{'x naive':>9}{'x sdpa':>9}"
    print(header + "\n" + "-" * len(header))
    table = {}
    for n in args.sizes or DEFAULT_SIZES:
        measured = {name: measure(name, n, args, chunks) for name in ("naive", "sdpa") if name in args.backends}
        measured.update({name: measure(name, n, args, chunks) for name in args.backends if name not in measured})
        table[n] = {name: measured[name] for name in LADDER if name in measured}
        print_group(n, table[n], args.dtype)
    lines = target_lines(table, args.device)
    print("\n" + "\n".join(lines))
    return {"rows": [row for group in table.values() for row in group.values()], "targets": lines}


def sweep_line(row: dict, naive: dict, sdpa: dict, defaults: dict[str, int]) -> str:
    """One line of the sweep: the chunk sizes, the score block they allow, and the measured figures."""
    chunks = (row["query_chunk"], row["key_chunk"])
    block = score_matrix_bytes(BATCH, HEADS, *chunks)
    start = f"  {chunks[0]:>8}{chunks[1]:>8}{block / MiB:>11,.1f}"
    if "skipped" in row:
        return f"{start}  {row['skipped']}"
    mark = "   (default)" if chunks == (defaults["query_chunk"], defaults["key_chunk"]) else ""
    return (f"{start}{row['ms']:>10,.1f}{show(ratio(row, sdpa, 'ms'), '.3g'):>9}{row['peak_extra_bytes'] / MiB:>11,.1f}"
            f"{show(ratio(row, naive, 'peak_extra_bytes'), '.3g'):>9}{mark}")


def print_fastest(grid: list[dict], naive: dict, sdpa: dict) -> None:
    """The fastest chunk sizes overall, and the fastest that keep to the memory target."""
    measured = [row for row in grid if "skipped" not in row]
    small = [row for row in measured if (ratio(row, naive, "peak_extra_bytes") or 1.0) <= TARGET_MEMORY_SHARE]
    for label, candidates in (("fastest", measured),
                              (f"fastest within 1/{1 / TARGET_MEMORY_SHARE:g} of naive's memory", small)):
        if not candidates:
            print(f"  {label}: none")
        else:
            best = min(candidates, key=lambda row: row["ms"])
            print(f"  {label}: query_chunk={best['query_chunk']}, key_chunk={best['key_chunk']}, "
                  f"{best['ms']:,.1f} ms ({show(ratio(best, sdpa, 'ms'), '.2f')}x sdpa), "
                  f"{best['peak_extra_bytes'] / MiB:,.1f} MiB")


def run_sweep(args: argparse.Namespace) -> dict:
    """chunked over a grid of (query_chunk, key_chunk), beside naive and sdpa, to choose the library's defaults."""
    defaults = library_defaults()
    print_header(args, "chunked attention over (query_chunk, key_chunk)")
    rows = []
    for n in args.sizes or (TARGET_N,):
        naive, sdpa = measure("naive", n, args, defaults), measure("sdpa", n, args, defaults)
        print(f"N = {n}: for reference, {describe(sdpa)}; {describe(naive)}")
        header = f"  {'q_chunk':>8}{'k_chunk':>8}{'block MiB':>11}{'ms':>10}{'x sdpa':>9}{'peak MiB':>11}{'x naive':>9}"
        print(header + "\n" + "-" * len(header))
        grid = []
        for query_chunk in (size for size in SWEEP_CHUNKS if size <= n):
            for key_chunk in (size for size in SWEEP_CHUNKS if size <= n):
                chunks = {**defaults, "query_chunk": query_chunk, "key_chunk": key_chunk}
                grid.append({**chunks, **measure("chunked", n, args, chunks)})
                print(sweep_line(grid[-1], naive, sdpa, defaults), flush=True)
        print_fastest(grid, naive, sdpa)
        rows += [naive, sdpa, *grid]
    return {"rows": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help=f"sequence lengths N (default {DEFAULT_SIZES}; "
                                                              f"the sweep's default is {TARGET_N})")
    parser.add_argument("--backends", nargs="+", choices=LADDER,
                        help="default: naive, sliced, chunked, sdpa, and triton where CUDA and triton are available")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row, after the warm-up (default 5)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the measured rows to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="time chunked over a grid of (query_chunk, key_chunk)")
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "N"),
                        help="used by the script itself: measure one row in this process and print it as JSON")
    parser.add_argument("--chunks", type=int, nargs=2, metavar=("QUERY_CHUNK", "KEY_CHUNK"), help="with --measure")
    parser.add_argument("--slice-size", type=int, help="with --measure")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if any(n < 1 for n in args.sizes or ()):
        parser.error(f"--sizes must be positive sequence lengths, got {args.sizes}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    args.dtype = torch.float16 if args.device == "cuda" else torch.float32
    if args.backends is None:
        args.backends = [name for name in LADDER if name != "triton" or triton_available()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.measure:
        backend, n = args.measure[0], int(args.measure[1])
        chunks = library_defaults()
        if args.chunks:
            chunks.update(query_chunk=args.chunks[0], key_chunk=args.chunks[1])
        if args.slice_size:
            chunks.update(slice_size=args.slice_size)
        print(json.dumps(measure_row(backend, n, args.device, args.dtype, args.repeats, chunks)))
        return
    started = time.perf_counter()
    results = run_sweep(args) if args.sweep else run_table(args)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        setup = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                 "available_bytes": available_bytes(args.device), "chunks": library_defaults(),
                 "device": args.device, "dtype": str(args.dtype).removeprefix("torch."), "batch": BATCH,
                 "heads": HEADS, "head_dim": HEAD_DIM, "repeats": args.repeats, "time": "ms: min over the timed calls"}
        args.json.write_text(json.dumps({"setup": setup, **results}, indent=1) + "\n")
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
