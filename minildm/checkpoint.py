"""Saving and loading models as folders: `config.json` + `model.safetensors`, written atomically, loaded strictly.

A model folder looks like a diffusers one, so people recognise it. Three promises:

- nothing in a checkpoint ever runs code: weights are safetensors (plain tensors); pickle files (`.ckpt`, `.pt`,
  `.bin`) are opened only with `torch.load(weights_only=True)`, which refuses anything but tensors and containers;
- a save never leaves a broken checkpoint where a good one was: we write into a temporary folder beside the target
  and swap it in with `os.replace`, the one file-system step that is atomic;
- a load is all or nothing: a missing file, a missing or unexpected key, or a shape mismatch is an error that names
  the file and the mismatch, never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def write_folder_atomically(folder: str | os.PathLike, files: dict[str, Any]) -> Path:
    """Write `files` ({name: dict for JSON | dict of tensors for safetensors | bytes}) as `folder`, atomically.
    Names may contain folders ("unet/model.safetensors"), so a pipeline of several models is written in one swap.

    The files go into a fresh temporary folder next to `folder`; only when every one is written and flushed does
    the temporary folder take the place of the old one. An interruption leaves the old checkpoint untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private (0700); a checkpoint gets the usual permissions
    old = None
    try:
        for name, content in files.items():
            path = tmp / name                # a name may hold folders ("unet/config.json"): a folder of models
            for parent in reversed(path.relative_to(tmp).parents[:-1]):
                (tmp / parent).mkdir(exist_ok=True)
                os.chmod(tmp / parent, 0o777 & ~umask)
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif name.endswith(".safetensors"):
                tensors = {k: v.detach().contiguous().cpu() for k, v in content.items()}
                save_file(tensors, str(path))
            elif name.endswith(".json"):
                path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
            else:
                raise ValueError(f"{name}: give bytes, or a dict for a .json / .safetensors file")
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            # os.replace cannot put a folder over a non-empty folder: move the old one aside first, then swap.
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not folder.exists():
            os.replace(old, folder)  # the swap failed after the old folder moved aside: put it back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def recover_interrupted_save(folder: str | os.PathLike) -> Path | None:
    """Finish a folder save that a crash cut between its two renames: if `folder` is missing and one `.NAME.old-*`
    sits beside it, put it back. Returns the restored folder, or None when there was nothing to do.
    (First version; the hardening issue's checkpoint work completes it: stale temporary folders, tests.)"""
    folder = Path(folder)
    if folder.exists() or not folder.parent.is_dir():
        return None
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"))
    if len(olds) != 1:
        return None
    os.replace(olds[0], folder)
    return folder


def save_file_atomically(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                         metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file, written beside `path` and renamed over it: a crash never leaves half a file there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def model_files(model: torch.nn.Module, config: Any, extra_files: dict | None = None) -> dict[str, Any]:
    """The files of a model folder: config.json (from a dataclass or dict), model.safetensors, and any extras."""
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {CONFIG_NAME: config_dict, WEIGHTS_NAME: model.state_dict(), **(extra_files or {})}


def save_model(folder: str | os.PathLike, model: torch.nn.Module, config: Any, extra_files: dict | None = None) -> Path:
    """Save `model` (its state dict) and its `config` (a dataclass or dict) as a model folder."""
    return write_folder_atomically(folder, model_files(model, config, extra_files))


def config_from_dict(cls: type, d: dict) -> Any:
    """A config dataclass from a config.json dict; a key the dataclass does not have is an error that lists them."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {known}")
    return cls(**d)


def read_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a model folder (expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore it from the training run or retrain") from err


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without ever running code from it.

    safetensors is read directly; a pickle file goes through `torch.load(weights_only=True)`, which refuses any
    object that is not a tensor or a plain container, so a malicious `.ckpt` cannot execute anything.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{path}: refused to load: a pickle file may only hold tensors here (torch.load weights_only=True "
                f"failed: {str(err).splitlines()[0]}); convert it to .safetensors from a trusted environment"
            ) from err
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # CompVis / Lightning checkpoints keep the weights one level down
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        return state
    raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors (or .ckpt/.pt/.bin)")


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Copy `state_dict` into `model`, refusing any missing key, unexpected key or shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if problems:
        raise ValueError(f"{source}: does not fit the model: " + "; ".join(problems) + "; check that config.json matches the weights")
    model.load_state_dict(state_dict, strict=True)
    return model


def load_weights_into(model: torch.nn.Module, folder: str | os.PathLike) -> torch.nn.Module:
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return load_strict(model, load_state_dict(path), str(path))


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer's state into flat tensors (for safetensors) and JSON-able hyper-parameters.

    Saving the Adam moments is what makes `--resume` continue exactly: restarting with fresh moments would change
    every later step.
    """
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
