"""`minildm workbook build`: a student's copy of minildm with the chosen solutions taken out.

The copy holds the package, the tests, the chapters and the notebooks. Inside each chosen solution region the
lines become one `raise NotImplementedError("<task>: <hint> ...")` at the same indentation, between the same two
marker lines, so the student writes the solution where it was and the grader can find it. The chapters' quotes are
re-synced from the stubbed package, so the chapter shows the stub, not the answer.

Before the workbook is moved into place it is checked: every file byte-compiles, and no line of a removed
solution survives anywhere in it (package, tests, chapters, notebooks). An existing folder is never deleted:
without --force the build refuses; with --force the old folder is renamed to <name>.old-N first.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from minildm.grading.regions import (
    Region,
    RegionError,
    find_regions,
    is_marker,
    package_regions,
    stub_line,
)
from minildm.grading.tasks import TASKS, Task, select
from minildm.quotes import REPO_ROOT, sync
from minildm.saving import free_old_name, parse_json

MANIFEST = ".minildm-workbook.json"
COPIED = ["minildm", "tests", "chapters", "notebooks", "README.md", "pyproject.toml"]
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ipynb_checkpoints")
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".txt", ".json", ".cfg", ".ini"}
MIN_LEAK_LENGTH = 6       # shorter lines (")", "else:") say nothing about a solution

CONFTEST = '''"""Written by `minildm workbook build`: `pytest` run in this folder tests this folder's minildm
(your code), even when another minildm is installed (pytest puts the folder of a root conftest.py first on
sys.path)."""
'''


@dataclass
class Workbook:
    out: Path
    tasks: list[Task]
    moved_aside: Path | None      # where an existing folder went (with --force), else None


def check_markers(root: Path = REPO_ROOT) -> dict[str, list[Region]]:
    """Task id -> its regions in the package; a RegionError if a marker is broken, a task id is unknown, or a
    registered task has no region."""
    by_task: dict[str, list[Region]] = {}
    for region in package_regions(root):
        if region.task not in TASKS:
            raise RegionError(f"{region.where}: unknown task id {region.task}; register it in "
                              f"minildm/grading/tasks.py (known: {', '.join(TASKS)})")
        by_task.setdefault(region.task, []).append(region)
    missing = [t for t in TASKS if t not in by_task]
    if missing:
        raise RegionError(f"tasks {', '.join(missing)} are registered in minildm/grading/tasks.py but no "
                          "# BEGIN SOLUTION marks them in the package")
    return by_task


def source_tree(root: Path = REPO_ROOT) -> Path:
    lacking = [name for name in COPIED if not (root / name).exists()]
    if lacking:
        raise FileNotFoundError(f"{root} lacks {', '.join(lacking)}: building a workbook needs the minildm source "
                                "tree; clone the repository and install it with `pip install -e .`")
    return root


def stub_package(folder: Path, regions: list[Region]) -> None:
    """Replace each region's solution lines with its stub, file by file."""
    by_file: dict[str, list[Region]] = {}
    for region in regions:
        by_file.setdefault(region.path, []).append(region)
    for path, file_regions in by_file.items():
        file = folder / path
        lines = file.read_text(encoding="utf-8").split("\n")
        for region in sorted(file_regions, key=lambda r: -r.begin):              # bottom up keeps line numbers
            task = TASKS[region.task]
            lines[region.begin + 1:region.end] = [stub_line(region.indent, task.id, task.message())]
        file.write_text("\n".join(lines), encoding="utf-8")


def text_lines(file: Path) -> list[str]:
    """The lines a reader would see: for a notebook, the lines of its cells' sources."""
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix == ".ipynb":
        cells = parse_json(text, file).get("cells", [])
        return [line for cell in cells for line in "".join(cell.get("source", [])).splitlines()]
    return text.splitlines()


def find_leaks(folder: Path, solutions: dict[str, list[str]], common: set[str]) -> list[str]:
    """Every place in `folder` where a line of a removed solution appears (lines compared stripped and whole).

    `common` holds lines the package has outside the removed regions (`raise ValueError(`, `return h`): finding
    those says nothing about the solution, so they are not looked for.
    """
    wanted: dict[str, str] = {}
    for task, lines in solutions.items():
        for line in lines:
            s = line.strip()
            if len(s) >= MIN_LEAK_LENGTH and not is_marker(s) and s not in common:
                wanted[s] = task
    leaks = []
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in TEXT_SUFFIXES:
            for n, line in enumerate(text_lines(file), 1):
                task = wanted.get(line.strip())
                if task:
                    leaks.append(f"{file.relative_to(folder)}:{n}: a line of the solution of {task}: {line.strip()!r}")
    return leaks


def package_lines_outside(root: Path, regions: list[Region]) -> set[str]:
    """The stripped lines of the package's .py files, leaving out the given regions."""
    skip = {(r.path, i) for r in regions for i in range(r.begin, r.end + 1)}
    lines = set()
    for file in sorted((root / "minildm").rglob("*.py")):
        path = file.relative_to(root).as_posix()
        lines |= {line.strip() for i, line in enumerate(file.read_text(encoding="utf-8").splitlines())
                  if (path, i) not in skip}
    return lines


def compile_errors(folder: Path) -> list[str]:
    errors = []
    for file in sorted(folder.rglob("*.py")):
        try:
            compile(file.read_text(encoding="utf-8"), str(file), "exec")
        except SyntaxError as err:
            errors.append(f"{file.relative_to(folder)}:{err.lineno}: {err.msg}")
    return errors


def workbook_guide(tasks: list[Task], regions: dict[str, list[Region]]) -> str:
    rows = "\n".join(f"| `{t.id}` | {t.title} | `{regions[t.id][0].path}:{regions[t.id][0].begin + 2}` | "
                     f"{t.section} |" for t in tasks)
    return f"""# Your minildm workbook

Each task below is a function of the package with its solution taken out. Open the file at the line given: between
`# BEGIN SOLUTION <task>` and `# END SOLUTION` there is a `raise NotImplementedError(...)` with a hint. Replace it
with your code, and keep the two marker lines (the grader uses them). The chapter section explains the idea.

| task | what you build | where | chapter section |
|---|---|---|---|
{rows}

Check your work (from this folder):

```bash
minildm grade                      # every task of this workbook: a table of points and hints, and grade.json
minildm grade ch02                 # one chapter; or task ids such as ch02.gaussian_kl
python -m pytest tests/tasks -k gaussian_kl     # the same tests, with pytest's full output
minildm grade ch02 --use-reference-for ch01     # stuck on chapter 1? take its reference and go on
```

The rest of the test suite (`python -m pytest`) tests the whole package: it fails where your tasks are not done yet.
"""


def build_workbook(out: str | Path, patterns: list[str] | None = None, force: bool = False,
                   root: Path = REPO_ROOT) -> Workbook:
    """Write the workbook for the tasks matching `patterns` (all when None) to `out`; see the module docstring."""
    out, root = Path(out).resolve(), source_tree(root)
    for name in COPIED:
        if out == (root / name).resolve() or (root / name).resolve() in out.parents:
            raise ValueError(f"--out {out} is inside the source's {name}/; choose a folder outside it")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose a new --out, or add --force to build a fresh workbook "
                              f"there (the existing folder is kept, renamed to {free_old_name(out).name})")
    tasks = select(patterns)
    by_task = check_markers(root)
    chosen = [r for t in tasks for r in by_task[t.id]]

    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)                  # our own leftover from a crashed build only
    try:
        building.mkdir()
        for name in COPIED:
            src = root / name
            if src.is_dir():
                shutil.copytree(src, building / name, ignore=IGNORED)
            else:
                shutil.copy2(src, building / name)
        stub_package(building, chosen)
        sync([building / "chapters"], root=building)
        (building / "conftest.py").write_text(CONFTEST, encoding="utf-8")
        (building / "WORKBOOK.md").write_text(workbook_guide(tasks, by_task), encoding="utf-8")
        (building / MANIFEST).write_text(json.dumps({"format": 1, "tasks": [t.id for t in tasks]}, indent=2) + "\n")

        problems = compile_errors(building)
        solutions = {}
        for region in chosen:
            source = (root / region.path).read_text(encoding="utf-8").splitlines()
            solutions.setdefault(region.task, []).extend(source[region.begin + 1:region.end])
        problems += find_leaks(building, solutions, package_lines_outside(root, chosen))
        problems += [f"{r.where}: markers of {r.task} lost in the workbook" for r in chosen
                     if r.task not in {x.task for x in find_regions((building / r.path).read_text(), r.path)}]
        if problems:
            raise RegionError("the workbook failed its checks, nothing was written:\n  " + "\n  ".join(problems))
        moved = None
        if out.exists():
            moved = free_old_name(out)
            out.rename(moved)
        building.rename(out)
        return Workbook(out, tasks, moved)
    finally:
        shutil.rmtree(building, ignore_errors=True)
