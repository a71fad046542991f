"""Loading what was saved, exactly: configs, weights and optimizer state, never running code, never guessing.

A model folder (`config.json` + `model.safetensors`, written by saving.py) loads all or nothing:

- nothing in a checkpoint ever runs code: weights are safetensors (plain tensors); pickle files (`.ckpt`, `.pt`,
  `.bin`) are opened only with `torch.load(weights_only=True)`, which refuses anything but tensors and containers;
- a load is all or nothing, and loads exactly what was saved: a missing file, a missing config field, a missing
  or unexpected key, a shape or dtype mismatch is an error that names the file and the mismatch, never a silent
  partial load or a default standing in for a saved value;
- a folder whose save a crash interrupted is restored before it is read (saving.recover_interrupted_save).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from minildm.saving import CONFIG_NAME, MANIFEST_KEY, WEIGHTS_NAME, read_json, recover_interrupted_save

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ------------------------------------------------------------------------------------------ configs

# Config fields renamed since configs of their class were first saved: {class: {old name: new name}}. A saved
# config with the old spelling still loads, with one warning per field; saving it again writes the new name.
RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "UNetConfig": {"block_channels": "block_out_channels", "norm_groups": "norm_num_groups"},   # the VAE's spelling
}
# Fields added after configs of their class were first saved, with the value that reproduces the behaviour from
# before they existed: {class: {field: value}}. Only these may be missing from a saved config (one warning per
# field); any other missing field is an error, since a default could build another model than the one saved.
ADDED_FIELDS: dict[str, dict[str, Any]] = {
    # CLIP's options (issue 14): the Shapes text encoder was saved before them with GELU, an MLP of mlp_ratio * dim,
    # LayerNorm's eps and the last block's output
    "TextEncoderConfig": {"activation": "gelu", "intermediate_size": None, "layer_norm_eps": 1e-5, "output_layer": -1},
    # the way up's own attention levels (issue 17): saved before it, a U-Net attended at the same levels both ways
    "UNetConfig": {"up_attention_levels": None},
}
WARNED: set[tuple[str, str]] = set()


def warn_once(cls_name: str, field: str, message: str) -> None:
    if (cls_name, field) not in WARNED:
        WARNED.add((cls_name, field))
        warnings.warn(message, stacklevel=3)


def config_from_dict(cls: type, d: dict, source: str | os.PathLike | None = None) -> Any:
    """A config dataclass from a saved dict, exactly as saved: an unknown key or a missing field is an error that
    names `source` (the file) and the field. Old spellings (RENAMED_FIELDS) and fields added later (ADDED_FIELDS)
    are the only exceptions, each said once."""
    name = cls.__name__
    source = source or f"the {name} dict"
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object of {name} fields, found {type(d).__name__}; restore "
                         f"the file from where it came")
    d = {k: v for k, v in d.items() if k != MANIFEST_KEY}
    for old, new in RENAMED_FIELDS.get(name, {}).items():
        if old in d:
            if new in d:
                raise ValueError(f"{source}: holds both {old!r} and its new name {new!r}; keep only {new!r}")
            d[new] = d.pop(old)
            warn_once(name, old, f"{source}: the {name} field {old!r} is now called {new!r}; read as {new!r} "
                                 f"(saving the model again writes the new name)")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown {name} keys {unknown}; expected these: {fields}")
    added = ADDED_FIELDS.get(name, {})
    lacking = [f for f in fields if f not in d and f not in added]
    if lacking:
        raise ValueError(f"{source}: the {name} field{'s' * (len(lacking) > 1)} {', '.join(lacking)} "
                         f"{'are' if len(lacking) > 1 else 'is'} missing; a default could build another model than "
                         f"the one saved, so restore the file or add the value the model was trained with")
    for field in (f for f in fields if f not in d):
        d[field] = added[field]
        warn_once(name, field, f"{source} has no {field!r}, a {name} field added later; using {added[field]!r}, "
                               f"which is how models behaved before it existed")
    try:
        return cls(**d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def read_config(folder: str | os.PathLike) -> dict:
    """A model folder's config.json as a dict (without our manifest entry), after finishing a cut-short save."""
    folder = Path(folder)
    recover_interrupted_save(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a model folder (expected a folder holding {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, found {type(config).__name__}; restore "
                         f"the file from where it came")
    config.pop(MANIFEST_KEY, None)
    return config


def load_config(cls: type, folder: str | os.PathLike) -> Any:
    """The config dataclass saved in a model folder (read_config, then config_from_dict naming the file)."""
    return config_from_dict(cls, read_config(folder), Path(folder) / CONFIG_NAME)


# ------------------------------------------------------------------------------------------ weights


def unreadable(path: Path, what: str, err: Exception) -> ValueError:
    reason = (str(err).splitlines() or [type(err).__name__])[0]
    return ValueError(f"{path}: not a readable {what} ({reason}); it may be truncated or another format: write it "
                      f"again, or get a fresh copy")


def read_safetensors_metadata(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, str]:
    """The text metadata in a safetensors file's header (a VAE file keeps its config there), read safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise unreadable(path, what, err) from err


def tensor_bytes(path: Path) -> int:
    """How many bytes of tensors a safetensors file holds: the file is 8 bytes (the header's length, little-endian),
    the JSON header, then every tensor's bytes back to back."""
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
    return path.stat().st_size - 8 - header_length


def read_safetensors(path: Path, what: str, progress: bool) -> dict[str, torch.Tensor]:
    """Tensor by tensor (as safetensors' own load_file does), so that a bar over bytes can follow a 4 GB file. Each
    tensor is read once, into its own memory: the load holds each weight once."""
    from tqdm import tqdm

    with safe_open(str(path), framework="pt") as f, tqdm(total=tensor_bytes(path), unit="B", unit_scale=True,
                                                         desc=what, file=sys.stderr, disable=not progress) as bar:
        state_dict = {}
        for name in f.keys():
            state_dict[name] = f.get_tensor(name)
            bar.update(state_dict[name].nbytes)
    return state_dict


def load_state_dict(path: str | os.PathLike, what: str = "safetensors file",
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Read a weights file without ever running code from it. Every weights file minildm reads comes through here.

    safetensors is read directly; a pickle file goes through `torch.load(weights_only=True)`, which refuses any
    object that is not a tensor or a plain container, so a malicious `.ckpt` cannot execute anything. `progress`
    shows a bar over a safetensors file's bytes on stderr (torch.load reads a pickle file in one go: one line says so).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path, what, progress)
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise unreadable(path, what, err) from err
    if path.suffix in PICKLE_SUFFIXES:
        if progress:
            print(f"{what} {path.name}: torch.load(weights_only=True) reads a {path.suffix} file in one go, with no "
                  f"progress to show (a .safetensors file shows a bar)", file=sys.stderr, flush=True)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            # torch names the object it refused ("Unsupported global: GLOBAL builtins.print"); keep just that
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            reason = (f"this one names {found.group(1)!r}, which is not a tensor" if found
                      else (str(err).splitlines() or ["unreadable"])[0])
            raise ValueError(
                f"{path}: refused to load: a pickle file may only hold tensors here, and {reason} (torch.load with "
                f"weights_only=True refused it); convert it to .safetensors in an environment you trust"
            ) from err
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # CompVis / Lightning checkpoints keep the weights one level down
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        return state
    raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors (or .ckpt/.pt/.bin)")


def number_kind(t: torch.Tensor) -> str:
    """What a tensor's numbers are: a float16 file may fill a float32 parameter, an int or bool file may not."""
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else "complex" if t.is_complex() else "integer"


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Copy `state_dict` into `model`, refusing any missing key, unexpected key, non-tensor, shape mismatch or
    dtype that cannot be the parameter's (float16 into float32 is fine; int or bool into float is not)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shared = [k for k in expected if k in state_dict]
    not_tensors = [f"{k}: {type(state_dict[k]).__name__}" for k in shared if not torch.is_tensor(state_dict[k])]
    tensors = [k for k in shared if torch.is_tensor(state_dict[k])]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in tensors if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    wrong_kind = [f"{k}: file {str(state_dict[k].dtype).removeprefix('torch.')} vs model "
                  f"{str(expected[k].dtype).removeprefix('torch.')}"
                  for k in tensors if number_kind(state_dict[k]) != number_kind(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if not_tensors:
        problems.append(f"{len(not_tensors)} values that are not tensors (first: {'; '.join(not_tensors[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if wrong_kind:
        problems.append(f"{len(wrong_kind)} tensors of the wrong dtype (first: {'; '.join(wrong_kind[:3])})")
    if problems:
        raise ValueError(f"{source}: does not fit the model: " + "; ".join(problems) + "; check that config.json "
                         "matches the weights and that they were saved from this kind of model")
    if any(t.is_meta for t in expected.values()):
        # a model built on the meta device (no memory): take the file's tensors as they are (assign), in the
        # model's dtype, instead of copying them into weights that were never allocated
        state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model
    model.load_state_dict(state_dict, strict=True)
    return model


def load_weights_into(model: torch.nn.Module, folder: str | os.PathLike,
                      name: str = WEIGHTS_NAME) -> torch.nn.Module:
    """`model` <- the weights file `name` in `folder` (a model folder's model.safetensors, or a checkpoint's
    ema.safetensors, discriminator.safetensors), read safely and loaded strictly."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return load_strict(model, load_state_dict(path), str(path))


# ------------------------------------------------------------------------------------------ optimizers


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


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
