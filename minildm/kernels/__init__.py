"""Chapter 04's Triton kernel: flash attention, forward pass (`triton_flash.py`).

Triton is imported only when the kernel runs, so `import minildm` never needs it. The kernel runs compiled on CUDA
tensors, or in Triton's interpreter on any tensors (slowly, on the CPU) when Python was started with
TRITON_INTERPRET=1 in the environment (Triton reads it once, when it is imported).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch
from torch import Tensor

KERNEL_MODULE = "minildm.kernels.triton_flash"
INSTEAD = "use backend='sdpa' (torch's fused kernel) or 'chunked' (the same algorithm in PyTorch)"


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter in this process. Triton's own library functions (tl.zeros,
    tl.max, tl.sum) are @triton.jit functions too, made when triton is imported, so TRITON_INTERPRET=1 counts only
    if it was set before that: in practice, before Python starts."""
    triton = importlib.import_module("triton")
    return not isinstance(triton.language.zeros, triton.runtime.JITFunction)


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter now (read the way Triton reads it)."""
    knobs = getattr(importlib.import_module("triton"), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """Can the kernel run on tensors on `device`, and why (or why not), in words a reader can act on."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package, which is not installed (pip install triton; Linux only)"
    if interpreting():
        return True, f"TRITON_INTERPRET=1: Triton's interpreter runs the kernel on the CPU ({device.type} tensors)"
    if device.type == "cuda":
        return True, "CUDA tensors: Triton compiles the kernel for this GPU"
    if interpret_requested():
        return False, (f"CUDA tensors, got {device.type} tensors, and TRITON_INTERPRET=1 was set after triton was "
                       "imported (Triton reads it once, at import)")
    return False, f"CUDA tensors, got {device.type} tensors"


def load_kernel(device: torch.device | str) -> types.ModuleType:
    """The kernel module, imported on first use; a one-line RuntimeError that says what is missing if it cannot run."""
    available, reason = triton_available(device)
    if not available:
        hint = ("" if importlib.util.find_spec("triton") is None
                else ", or set TRITON_INTERPRET=1 before starting Python to run the kernel slowly on the CPU")
        raise RuntimeError(f"attention backend 'triton' needs {reason}; {INSTEAD}{hint}")
    module = importlib.import_module(KERNEL_MODULE)
    if module.INTERPRETED != interpreting():
        del sys.modules[KERNEL_MODULE]          # so that an import in a consistent setting starts afresh
        raise RuntimeError("TRITON_INTERPRET changed between importing triton and importing minildm's kernel, so "
                           "the kernel and Triton's own library disagree about interpreting; set it (or unset it) "
                           f"before starting Python; {INSTEAD}")
    return module


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, mask: Tensor | None = None, *,
                    block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v by our Triton kernel, (B, heads, N, d) -> (B, heads, N_q, d_v).

    Differentiable in q, k and v (the backward recomputes through `chunked_attention`); the block sizes change
    only speed. The mask follows torch's convention: bool (True = attend) or float (added to the scores).
    """
    kernel = load_kernel(q.device)
    return kernel.FlashAttention.apply(q, k, v, scale, mask, block_m, block_n)


__all__ = ["flash_attention", "load_kernel", "triton_available"]
