"""What both trainers (train_vae.py, train_ldm.py) check so that a run never loses or spoils its checkpoint.

- starting: a save that a crash cut between its two renames is finished first (checkpoint.recover_interrupted_save),
  and only then is it decided whether there is a checkpoint; `--resume` without one is an error;
- stepping and saving: a non-finite gradient on a finite loss (enough to spoil every weight it touches) is named
  as such, and weights with a NaN or inf are never written over a good checkpoint;
- stepping: an update too large for float32 (an absurd --lr) stops with the same FloatingPointError as a
  non-finite loss, not with torch's RuntimeError.
Each message says what happened, at which step, what became of the checkpoint, and what to try.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from minildm.saving import recover_interrupted_save


def has_checkpoint(folder: Path, resume: bool, marker: str) -> bool:
    """Does `folder` hold a checkpoint (a folder with `marker` in it)? An interrupted save is restored first. With
    `resume` and no checkpoint, a one-line error that says what to do."""
    try:
        recover_interrupted_save(folder)
    except FileNotFoundError:
        pass                                # another rank restored it a moment earlier
    found = (folder / marker).is_file()
    if resume and not found:
        raise FileNotFoundError(f"--resume: nothing to resume ({folder / marker} does not exist); drop --resume to "
                                "start a new run, or give the --out of the run to continue")
    return found


def check_run_folder(out: Path, resume: bool, ours: tuple[str, ...] = ()) -> None:
    """A run writes into a new folder, an empty one, or one holding only what an earlier start of the run left (`ours`:
    the latent cache, sample grids), never among a user's files; a checkpoint there needs --resume. The folder is made
    now, so a place that cannot be written (a file in the way, a read-only disk) fails before any training."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder name")
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others and not resume:
        raise FileExistsError(f"--out {out} already holds {', '.join(others[:3])}; pass --resume to continue the run "
                              "there, or choose a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NotADirectoryError(f"--out {out}: cannot make this folder ({err.strerror}: {err.filename}); choose "
                                 "another --out") from err


def kept_checkpoint(folder: Path, saved_step: int | None) -> str:
    """What became of the checkpoint when training stops: never claim one that does not exist."""
    if saved_step is None:
        return "no checkpoint was written"
    return f"the checkpoint of step {saved_step} in {folder} is kept"


def first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf, or None. One wait for the device in all."""
    names = [name for name, value in tensors.items() if value.is_floating_point()]
    if not names:
        return None
    bad = torch.stack([~torch.isfinite(tensors[name]).all() for name in names]).cpu()
    return next((name for name, b in zip(names, bad) if b), None)


def check_weights_finite(tensors: dict[str, Tensor], step: int, kept: str, hint: str) -> None:
    """Refuse to save weights with a NaN or inf. Every loss was finite (that is checked first), so a gradient was
    not: `hint` says where to look (the lr is not to blame for that)."""
    name = first_non_finite(tensors)
    if name is not None:
        raise FloatingPointError(f"the weights hold NaN or inf after step {step} ({name}) although the losses were "
                                 f"finite: a gradient overflowed; training stopped and {kept}. {hint}")


def check_gradients_finite(model: torch.nn.Module, step: int, kept: str, hint: str) -> None:
    """Stop before the optimizer step when a gradient is NaN or inf although the loss was finite: the step would
    spoil every weight it touches."""
    name = first_non_finite({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    if name is not None:
        raise FloatingPointError(f"a gradient became NaN or inf at step {step} ({name}) although the loss was finite; "
                                 f"training stopped and {kept}. {hint}")


def non_finite_loss(loss: float, step: int, kept: str, cause: str) -> FloatingPointError:
    return FloatingPointError(f"loss became {loss} at step {step}; training stopped and {kept}. {cause}")


def optimizer_step(step_fn, lr: float, step: int, kept: str) -> None:
    """Run the optimizer's step; an update that overflows float32 (torch raises "value cannot be converted to type
    float without overflow" for an lr like 1e40) becomes the FloatingPointError every other non-finite case gives."""
    try:
        step_fn()
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        raise FloatingPointError(f"the update at step {step} overflowed float32 (learning rate {lr:.3g}); training "
                                 f"stopped and {kept}. Lower --lr (1e-3 is usual)") from None
