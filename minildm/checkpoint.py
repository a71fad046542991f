"""Saving and loading models as folders: `config.json` + `model.safetensors`, written atomically, loaded strictly.

A model folder looks like a diffusers one, so people recognise it. Four promises:

- nothing in a checkpoint ever runs code: weights are safetensors (plain tensors); pickle files (`.ckpt`, `.pt`,
  `.bin`) are opened only with `torch.load(weights_only=True)`, which refuses anything but tensors and containers;
- a save never leaves a broken checkpoint where a good one was: we write into a temporary folder beside the target
  and swap it in with `os.replace`, the one file-system step that is atomic; a crash between the two renames of
  the swap is finished by `recover_interrupted_save` the next time the folder is loaded or saved;
- a save never deletes what we did not write: every folder records its kind and its files (the "_minildm" entry of
  its config.json or pipeline.json); we save over a folder only if it is ours and of the same kind, and keep the
  old one as NAME.old-N unless it is a training checkpoint replacing its own previous self;
- a load is all or nothing, and loads exactly what was saved: a missing file, a missing config field, a missing
  or unexpected key, a shape or dtype mismatch is an error that names the file and the mismatch, never a silent
  partial load or a default standing in for a saved value.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ------------------------------------------------------------------------------------------ JSON files


def parse_json(text: str, source: str | os.PathLike) -> Any:
    """JSON text -> value. Invalid JSON is a one-line error naming the source and the line, so it can be fixed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: line {err.lineno} column {err.colno}: not valid JSON ({err.msg}); fix it "
                         f"there, or restore the file from where it came") from err


def read_json(path: str | os.PathLike) -> Any:
    """Every JSON file minildm reads (config.json, vocab.json, pipeline.json, trainer.json, ...) comes through here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a JSON file (byte {err.start} is not UTF-8 text); restore the file from "
                         f"where it came") from err
    return parse_json(text, path)


def write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------- what a folder of ours holds

# Every folder we write records what it is and which files we put in it, as {"kind": ..., "files": [...]} under
# this key of its top-level pipeline.json or config.json (diffusers keeps "_class_name" there the same way), or in
# a .minildm.json when it has neither. A save over an existing folder reads it to know what may be replaced.
MANIFEST_KEY = "_minildm"
MANIFEST_HOLDERS = ("pipeline.json", CONFIG_NAME, ".minildm.json")
KINDS = ("model", "pipeline", "vae-training-checkpoint", "ldm-training-checkpoint")


def with_manifest(files: dict[str, Any], kind: str) -> dict[str, Any]:
    """`files` with the manifest entry added to the first holder among them (or to a new .minildm.json)."""
    holder = next(name for name in MANIFEST_HOLDERS if name in files or name == MANIFEST_HOLDERS[-1])
    content = files.get(holder, {})
    if isinstance(content, bytes):
        content = parse_json(content.decode("utf-8"), holder)
    names = sorted({*files, holder})
    return {**files, holder: {**content, MANIFEST_KEY: {"kind": kind, "files": names}}}


def read_manifest(folder: Path) -> dict | None:
    for name in MANIFEST_HOLDERS:
        if (folder / name).is_file():
            try:
                content = read_json(folder / name)
            except ValueError:
                return None
            manifest = content.get(MANIFEST_KEY) if isinstance(content, dict) else None
            return manifest if isinstance(manifest, dict) else None
    return None


def legacy_kind(folder: Path) -> str | None:
    """The kind of a folder saved before manifests existed, judged by the files our saves always write."""
    def has(name: str) -> bool:
        return (folder / name).is_file()

    if has("pipeline.json") and (folder / "unet").is_dir():
        return "pipeline"
    if has(CONFIG_NAME) and has(WEIGHTS_NAME):
        if has("trainer.json"):
            return "ldm-training-checkpoint" if has("ema.safetensors") else "vae-training-checkpoint"
        return "model"
    return None


def files_in(folder: Path) -> set[str]:
    """Every file (and link) under `folder`, as relative POSIX paths ("unet/config.json")."""
    found = set()
    for root, dirs, names in os.walk(folder):
        base = Path(root).relative_to(folder)
        found |= {(base / name).as_posix() for name in names}
        found |= {(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()}
    return found


def few(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_replaceable(folder: Path, kind: str, keep_old: bool, names: set[str]) -> set[str]:
    """Refuse to save over anything but our own folder of the same kind; return the files in it that are ours. A
    folder from before manifests counts as ours if legacy_kind recognises it, and its files if we write the same
    names now. When the old folder will not be kept (`keep_old` False), a file we did not write in it is refused."""
    if not folder.exists():
        return set()
    if not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; save the {kind} under another name, or move the file away")
    present = files_in(folder)
    if not present:
        return set()                                           # an empty folder: nothing in it to lose
    manifest = read_manifest(folder)
    found = manifest.get("kind") if manifest else legacy_kind(folder)
    if found is None:
        raise FileExistsError(f"{folder} already exists and minildm did not write it (it holds {few(present)}); "
                              f"save the {kind} to a new folder, or move that one away first")
    if found != kind:
        raise FileExistsError(f"{folder} holds a minildm {found}, not a {kind}; save the {kind} to another folder")
    ours = set(manifest.get("files", [])) if manifest else names
    foreign = present - ours
    if foreign and not keep_old:
        raise FileExistsError(f"{folder} holds {few(foreign)}, which minildm did not write; move "
                              f"{'it' if len(foreign) == 1 else 'them'} out of the folder (this {kind} is replaced "
                              f"on every save) and save again")
    return ours


def free_old_name(folder: str | os.PathLike) -> Path:
    """NAME.old-N with N the first number not taken: where a replaced folder is kept."""
    folder = Path(folder)
    n = 1
    while folder.with_name(f"{folder.name}.old-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}.old-{n}")


def put_away(aside: Path, folder: Path, keep_old: bool, ours: set[str]) -> None:
    """The folder a save replaced: deleted if it may go and holds only our files, otherwise kept as NAME.old-N."""
    left = files_in(aside)
    if not left or (not keep_old and left <= ours):
        shutil.rmtree(aside)
        return
    kept = free_old_name(folder)
    os.rename(aside, kept)
    print(f"minildm: kept the previous {folder.name} as {kept}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ saving


def write_folder_atomically(folder: str | os.PathLike, files: dict[str, Any], *, kind: str,
                            keep_old: bool = True) -> Path:
    """Write `files` ({name: dict for JSON | dict of tensors for safetensors | bytes}) as `folder`, atomically.
    Names may contain folders ("unet/model.safetensors"), so a pipeline of several models is written in one swap.

    The files go into a fresh temporary folder next to `folder`; only when every one is written and flushed does
    the temporary folder take the place of the old one. An interruption leaves the old checkpoint untouched. An
    existing folder is replaced only if it is ours and of the same `kind`; it is kept as NAME.old-N (`keep_old`),
    or deleted when a training checkpoint replaces its own previous self.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; use one of {', '.join(KINDS)}")
    folder = Path(folder)
    recover_interrupted_save(folder)                 # a save cut short earlier is finished first
    ours = check_replaceable(folder, kind, keep_old, {*files, *MANIFEST_HOLDERS})
    tmp = new_temporary_folder(folder)
    aside, moved = folder.parent / f".{folder.name}.old-{os.getpid()}", False
    try:
        write_files(tmp, with_manifest(files, kind))
        if folder.exists():
            # os.replace cannot put a folder over a non-empty folder: move the old one aside first, then swap.
            os.replace(folder, aside)
            moved = True
        os.replace(tmp, folder)
    except BaseException:
        if moved and aside.exists() and not folder.exists():
            os.replace(aside, folder)  # the swap failed after the old folder moved aside: put it back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved:
        put_away(aside, folder, keep_old, ours)
    return folder


def write_files(tmp: Path, files: dict[str, Any]) -> None:
    umask = os.umask(0)
    os.umask(umask)
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
            write_json(path, content)
        else:
            raise ValueError(f"{name}: give bytes, or a dict for a .json / .safetensors file")
        os.chmod(path, 0o666 & ~umask)
        with open(path, "rb") as f:
            os.fsync(f.fileno())


# The temporary names a save uses beside its target carry the process id (.NAME.tmp-PID-xxxx, .NAME.old-PID,
# .FILE.tmp-PID), so that a later process can tell a crashed save's leftovers from a save still running.
TEMP_NAME = re.compile(r"\.(?:tmp|old)-(\d+)(?:-[^/]*)?$")


def new_temporary_folder(folder: Path) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private (0700); a checkpoint gets the usual permissions
    return tmp


def is_stale(path: Path) -> bool:
    """A temporary name of ours whose process is gone. Our own process counts as gone: its saves run one at a time
    and are over when anything else runs, so a name with our id is a leftover of an earlier process that had it."""
    match = TEMP_NAME.search(path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return False                     # no safe way to ask whether another process lives: leave its files alone
    try:
        os.kill(pid, 0)                  # signal 0 sends nothing; it only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:
        return False                     # it exists, under another user
    return False


def recover_interrupted_save(folder: str | os.PathLike) -> Path | None:
    """Finish what a save cut short left behind, and say what was done in one line on stderr:
    `folder` missing beside a `.NAME.old-PID` (the crash fell between the swap's two renames): put it back;
    a `.NAME.old-PID` beside `folder` (the crash came after the swap): keep it as NAME.old-N; unfinished
    `.NAME.tmp-PID-*` folders beside it and `.FILE.tmp-PID` files in it: remove them. Only names whose process is
    gone are touched (so one process saves a given folder at a time, as the trainers' rank 0 does). Returns the
    restored folder, or None when nothing was restored."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return None
    name = glob.escape(folder.name)
    olds = [p for p in sorted(folder.parent.glob(f".{name}.old-*")) if p.is_dir() and is_stale(p)]
    temps = [p for p in sorted(folder.parent.glob(f".{name}.tmp-*")) if p.is_dir() and is_stale(p)]
    if folder.is_dir():
        temps += [p for p in sorted(folder.glob(".*.tmp-*")) if p.is_file() and is_stale(p)]
    done, restored = [], None
    if olds and not folder.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        olds.remove(newest)
        os.replace(newest, folder)
        restored = folder
        done.append(f"restored it from {newest.name}, where a save cut short between its two renames had left it")
    for old in olds:
        kept = free_old_name(folder)
        os.rename(old, kept)
        done.append(f"kept the previous copy a cut-short save had set aside as {kept.name}")
    for temp in temps:
        shutil.rmtree(temp) if temp.is_dir() else temp.unlink()
        done.append(f"removed {temp.name}, left by a save that never finished")
    if done:
        print(f"minildm: {folder}: " + "; ".join(done), file=sys.stderr)
    return restored


def save_file_atomically(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                         metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file, written beside `path` and renamed over it: a crash never leaves half a file there.
    In a folder of ours it joins the folder's manifest (a VAE file beside the model it was tuned from)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    record_written(path)
    return path


def record_written(path: Path) -> None:
    """Add a file we just wrote into one of our folders to that folder's manifest, so later saves know it is ours."""
    for name in MANIFEST_HOLDERS:
        holder = path.parent / name
        if holder.is_file():
            content = read_json(holder)
            manifest = content.get(MANIFEST_KEY) if isinstance(content, dict) else None
            if isinstance(manifest, dict) and path.name not in manifest.get("files", []):
                manifest["files"] = sorted([*manifest.get("files", []), path.name])
                tmp = holder.with_name(f".{holder.name}.tmp-{os.getpid()}")
                write_json(tmp, content)
                os.replace(tmp, holder)
            return


def model_files(model: torch.nn.Module, config: Any, extra_files: dict | None = None) -> dict[str, Any]:
    """The files of a model folder: config.json (from a dataclass or dict), model.safetensors, and any extras."""
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {CONFIG_NAME: config_dict, WEIGHTS_NAME: model.state_dict(), **(extra_files or {})}


def save_model(folder: str | os.PathLike, model: torch.nn.Module, config: Any, extra_files: dict | None = None) -> Path:
    """Save `model` (its state dict) and its `config` (a dataclass or dict) as a model folder; a model folder
    already there is kept as NAME.old-N."""
    return write_folder_atomically(folder, model_files(model, config, extra_files), kind="model")


# ------------------------------------------------------------------------------------------ configs

# Config fields renamed since configs of their class were first saved: {class: {old name: new name}}. A saved
# config with the old spelling still loads, with one warning per field; saving it again writes the new name.
RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "UNetConfig": {"block_channels": "block_out_channels", "norm_groups": "norm_num_groups"},   # the VAE's spelling
}
# Fields added after configs of their class were first saved, with the value that reproduces the behaviour from
# before they existed: {class: {field: value}}. Only these may be missing from a saved config (one warning per
# field); any other missing field is an error, since a default could build another model than the one saved.
# Empty so far: every field of every config has been saved since its class existed.
ADDED_FIELDS: dict[str, dict[str, Any]] = {}
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


def load_state_dict(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """Read a weights file without ever running code from it. Every weights file minildm reads comes through here.

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
            raise unreadable(path, what, err) from err
    if path.suffix in PICKLE_SUFFIXES:
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
