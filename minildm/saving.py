"""Saving as folders: `config.json` + `model.safetensors` (the shape of a diffusers folder), written atomically,
never over what we did not write.

- a save never leaves a broken folder where a good one was: we write into a temporary folder beside the target and
  swap it in with `os.replace`, the one file-system step that is atomic; a crash between the two renames of the swap
  is finished by `recover_interrupted_save` the next time the folder is loaded or saved;
- a save never deletes what we did not write: every folder records its kind and its files (the "_minildm" entry of
  its config.json or pipeline.json); we save over a folder only if it is ours and of the same kind, and keep the old
  one as NAME.old-N unless it is a training checkpoint replacing its own previous self.

Every JSON file minildm reads or writes goes through `read_json` / `write_json` here, so an invalid one is named with
its line. Loading what was saved, strictly, is checkpoint.py's.
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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
