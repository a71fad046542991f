"""Chapter 06: running as several processes (torchrun + DDP), and stopping them all at the same step.

torchrun starts one process per GPU (or CPU worker) and tells each, in RANK, WORLD_SIZE and LOCAL_RANK, who it is.
Where a process runs is read from those variables at once; joining the process group (the step that waits for the
other ranks) is a separate call the trainer makes when it starts training, so a trainer can be built alone.
Ctrl-C only raises a flag; the ranks agree on it, so that every one leaves the loop after the same step.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist
from torch import nn

from minildm.device import get_device


def process_placement(device_name: str | torch.device | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's variables, without joining anything: one GPU per rank on CUDA
    (cuda:LOCAL_RANK), the chosen device otherwise. Run alone, it is (0, 1, the chosen device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return int(os.environ.get("RANK", "0")), world, device


def join_process_group(device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); waits until every rank has arrived."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


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


def stop_agreed(stop: StopRequested, world_size: int, device: torch.device) -> bool:
    """Stop when any rank was asked to: every rank must leave the loop at the same step, or DDP would hang. Alone,
    the flag is read directly (no tensor, no wait for the device)."""
    if world_size == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
