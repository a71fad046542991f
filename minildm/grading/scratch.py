"""The scratch folder of `minildm grade`: what is graded, and the two folders the grading works in.

The student's files are never touched and never trusted. The grader copies them into a fresh folder:

    trusted/                      the grader's own (mode 700; the worker never sees it)
        tests/tasks/              the task tests of *this* installation (not the student's copy of them)
        tests/extra_N/            an instructor's hidden tests (--extra-tests)
        pytest.ini, out/          pytest's settings; the log of the trusted pytest run; the worker's plans
    work/                         what the worker sees (read-only but for out/)
        minildm/                  a copy of the student's package, with
                                  - the reference put into the regions of chapters given to --use-reference-for,
                                  - the reference file in place of any file that does not import (its tasks get 0)
        minildm_grade_worker.py   worker.py, with codec.py and forbid.py beside it under minildm_grade_* names
        minildm_grade_importcheck.py  importcheck.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from minildm.grading.isolation import Sandbox, available_level
from minildm.grading.regions import (
    RegionError,
    find_regions,
    replace_regions,
    solution_lines,
)
from minildm.grading.tasks import TASKS, Task, select
from minildm.grading.workbook import IGNORED, MANIFEST
from minildm.quotes import REPO_ROOT
from minildm.saving import read_json

HERE = Path(__file__).resolve().parent
IMPORT_CHECK = "minildm_grade_importcheck"
WORKER, CODEC, FORBID = "minildm_grade_worker", "minildm_grade_codec", "minildm_grade_forbid"
PYTEST_INI = """[pytest]
addopts = --strict-markers -p no:cacheprovider
markers =
    task(id): the exercise this test grades, e.g. ch02.gaussian_kl
    points(n): what passing this test earns (default 1), shared by its parametrized cases
    slow: takes more than a few seconds
    oracle: compares against diffusers
"""


# ------------------------------------------------------------------------------------------ what to grade


def find_workbook(start: Path) -> Path | None:
    """The workbook folder holding `start` (a folder with the build's manifest), if any."""
    for folder in [start, *start.parents]:
        if (folder / MANIFEST).is_file():
            return folder
    return None


def resolve_impl(impl: str | Path | None) -> Path:
    """--impl, else the workbook the current folder is in, else the reference package itself."""
    if impl is None:
        return find_workbook(Path.cwd().resolve()) or REPO_ROOT
    folder = Path(impl).resolve()
    if not (folder / "minildm" / "__init__.py").is_file():
        raise FileNotFoundError(f"--impl {impl} holds no minildm/__init__.py; pass the folder that "
                                "`minildm workbook build` wrote (the one with minildm/, tests/ and WORKBOOK.md)")
    return folder


def default_tasks(impl: Path, patterns: list[str] | None) -> list[Task]:
    if patterns:
        return select(patterns)
    manifest = impl / MANIFEST
    if manifest.is_file():
        ids = [i for i in read_json(manifest).get("tasks", []) if i in TASKS]
        return select(ids) if ids else select(None)
    return select(None)


# ------------------------------------------------------------------------------------ the scratch folder


def put_reference(sandbox: Path, chapters: list[str]) -> list[str]:
    """Copy the reference's solution regions of these chapters into the sandbox's package; returns problems."""
    problems = []
    by_file: dict[str, list] = {}
    for file in sorted((REPO_ROOT / "minildm").rglob("*.py")):
        path = file.relative_to(REPO_ROOT).as_posix()
        ref_text = file.read_text(encoding="utf-8")
        for region in find_regions(ref_text, path):
            if TASKS.get(region.task) and TASKS[region.task].chapter in chapters:
                by_file.setdefault(path, []).append((region, solution_lines(ref_text, region)))
    for path, wanted in by_file.items():
        target = sandbox / path
        try:
            text = target.read_text(encoding="utf-8")
            theirs = find_regions(text, path)
        except (OSError, RegionError) as err:
            problems.append(f"could not put the reference into {path}: {err}")
            continue
        replacements = {}
        for ref_region, lines in wanted:
            same = [r for r in theirs if r.task == ref_region.task]
            mine = [r for r in (w[0] for w in wanted) if r.task == ref_region.task]
            if len(same) != len(mine):
                problems.append(f"{path}: the BEGIN/END SOLUTION markers of {ref_region.task} are missing or "
                                "changed, so its reference could not be put in; restore them from a fresh workbook")
                continue
            replacements[same[mine.index(ref_region)]] = lines
        target.write_text(replace_regions(text, replacements), encoding="utf-8")
    return problems


def differing_modules(sandbox: Path) -> list[str]:
    """Modules of the sandbox's package whose file is not byte-identical to the reference's."""
    names = []
    for file in sorted((sandbox / "minildm").rglob("*.py")):
        rel = file.relative_to(sandbox)
        ref = REPO_ROOT / rel
        if file.name == "__main__.py" or (ref.is_file() and ref.read_bytes() == file.read_bytes()):
            continue
        parts = list(rel.with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def repair_imports(box: Sandbox, python: str, timeout: float) -> tuple[dict[str, str], list[str]]:
    """Put the reference file in place of each file that stops the package from importing.

    Returns {relative file: what is wrong with it (file:line: error)} and problems that could not be repaired.
    """
    broken: dict[str, str] = {}
    sandbox = box.work
    for attempt in range(10):
        modules = ["minildm", *differing_modules(sandbox)]
        output = box.trusted / f"importcheck-{attempt}.out"
        with open(output, "w") as out:
            proc = start(box, [python, f"{IMPORT_CHECK}.py", *modules], f"importcheck-{attempt}", out)
            try:
                proc.wait(timeout)
                found = json.loads(output.read_text(errors="replace").strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                kill(proc)
                slow = f"importing it took more than {timeout:g} s"
                found = {m: {"file": None, "line": 0, "error": slow} for m in modules}
            except (json.JSONDecodeError, IndexError):
                return broken, [f"the import check failed: {output.read_text(errors='replace').strip()[-500:]}"]
        if not isinstance(found, dict) or set(found) != set(modules):
            return broken, ["the import check gave an answer that is not one entry per module"]
        failures = [f for f in found.values() if f]
        if not failures:
            return broken, []
        fixed_one = False
        for failure in failures:
            rel = failure["file"]
            if rel is None:          # a hang or an error we cannot place: every file that differs is suspect
                for module in differing_modules(sandbox):
                    fixed_one |= restore(sandbox, module_file(sandbox, module), failure["error"], broken)
            elif rel not in broken:
                fixed_one |= restore(sandbox, rel, f"{rel}:{failure['line']}: {failure['error']}", broken)
        if not fixed_one:
            return broken, [f"the package does not import: {failures[0]['error']}"]
    return broken, ["the package still does not import after putting back 10 reference files"]


def module_file(sandbox: Path, module: str) -> str:
    path = Path(*module.split("."))
    return (path / "__init__.py" if (sandbox / path).is_dir() else path.with_suffix(".py")).as_posix()


def restore(sandbox: Path, rel: str, why: str, broken: dict[str, str]) -> bool:
    ref = REPO_ROOT / rel
    if not rel.startswith("minildm/") or not ref.is_file() or rel in broken:
        return False
    shutil.copy2(ref, sandbox / rel)
    broken[rel] = why
    return True


def tasks_in(impl: Path, files: list[str]) -> dict[str, str]:
    """Task id -> file, for the regions of these files (the student's markers if readable, else the reference's)."""
    found = {}
    for rel in files:
        for root in (impl, REPO_ROOT):
            try:
                regions = find_regions((root / rel).read_text(encoding="utf-8"), rel)
            except (OSError, RegionError, UnicodeDecodeError):
                continue
            found.update({r.task: rel for r in regions})
            break
    return found


def copy_worker(folder: Path) -> Path:
    """Put the worker, its codec and forbid.py into `folder` under names a student's package cannot shadow; returns
    the worker's script."""
    shutil.copy2(HERE / "codec.py", folder / f"{CODEC}.py")
    shutil.copy2(HERE / "forbid.py", folder / f"{FORBID}.py")
    shutil.copy2(HERE / "worker.py", folder / f"{WORKER}.py")
    return folder / f"{WORKER}.py"


def start(box: Sandbox, argv: list[str], name: str, out) -> subprocess.Popen:
    """Start `argv` in the worker (see isolation.py), its output to the open file `out`."""
    box.seal()
    command, env, preexec = box.command(argv, name)
    return subprocess.Popen(command, cwd=box.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec)


def prepare(impl: Path, tests: Path, extra: list[Path]) -> Sandbox:
    """The two folders of the module docstring, filled."""
    top = Path(tempfile.mkdtemp(prefix="minildm-grade-"))
    box = Sandbox(top / "trusted", top / "work", available_level())
    box.trusted.mkdir(mode=0o700)
    shutil.copytree(impl / "minildm", box.work / "minildm", ignore=IGNORED)
    shutil.copytree(tests, box.trusted / "tests" / "tasks", ignore=IGNORED)
    for n, folder in enumerate(extra, 1):
        shutil.copytree(folder, box.trusted / "tests" / f"extra_{n}", ignore=IGNORED)
    (box.trusted / "out").mkdir()
    (box.trusted / "pytest.ini").write_text(PYTEST_INI)
    shutil.copy2(HERE / "importcheck.py", box.work / f"{IMPORT_CHECK}.py")
    copy_worker(box.work)
    return box


def kill(proc: subprocess.Popen) -> None:
    """Kill the worker: its direct children first (pid 1 of its PID namespace takes every process in it along,
    even one that left the process group), then its process group."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()
