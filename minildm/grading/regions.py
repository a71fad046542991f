"""Solution regions: the lines of the package a student writes.

A region is an ordinary pair of comments around the lines that solve one task:

    def kl(self) -> Tensor:
        \"\"\"KL(N(mean, var) || N(0, I)) ...\"\"\"
        # BEGIN SOLUTION ch02.gaussian_kl
        return 0.5 * torch.sum(...)
        # END SOLUTION

The reference package stays complete and importable; a workbook keeps the two marker lines and puts a stub between
them, so the student writes the solution where it was and the grader can find it again. This module only reads and
rewrites text: it imports neither torch nor the rest of minildm.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

TASK_ID = re.compile(r"^ch\d\d\.[a-z][a-z0-9_]*$")
BEGIN = re.compile(r"^(?P<indent>[ \t]*)#\s*BEGIN SOLUTION\b\s*(?P<task>\S*)\s*$")
END = re.compile(r"^[ \t]*#\s*END SOLUTION\b.*$")


class RegionError(ValueError):
    """Markers that cannot be trusted: unbalanced, nested, or naming a task in the wrong form."""


@dataclass(frozen=True)
class Region:
    """One solution region. Line numbers are 0-based indices into the file's lines: `begin` and `end` are the two
    marker lines, the solution is lines[begin + 1:end]."""

    task: str
    path: str            # relative to the package's parent folder, e.g. "minildm/autoencoder.py"
    begin: int
    end: int
    indent: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.begin + 1}"


def is_marker(line: str) -> bool:
    """True for a BEGIN or END SOLUTION line (the chapters' quotes leave these out)."""
    return bool(BEGIN.match(line) or END.match(line))


def find_regions(text: str, path: str) -> list[Region]:
    """Every region in one file's text, in order; a RegionError names the file and line of the first bad marker."""
    regions, open_at, open_task, indent = [], None, "", ""
    for i, line in enumerate(text.splitlines()):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            task = begin["task"]
            if open_at is not None:
                raise RegionError(f"{path}:{i + 1}: BEGIN SOLUTION {task} inside the region {open_task} opened at line "
                                  f"{open_at + 1}; regions cannot nest: close the first with # END SOLUTION")
            if not TASK_ID.match(task):
                raise RegionError(f"{path}:{i + 1}: {task or 'a missing task id'} is not a task id; write "
                                  "# BEGIN SOLUTION chNN.name (e.g. ch02.gaussian_kl)")
            open_at, open_task, indent = i, task, begin["indent"]
        elif end:
            if open_at is None:
                raise RegionError(f"{path}:{i + 1}: END SOLUTION without a BEGIN SOLUTION above it")
            regions.append(Region(open_task, path, open_at, i, indent))
            open_at = None
    if open_at is not None:
        raise RegionError(f"{path}:{open_at + 1}: BEGIN SOLUTION {open_task} is never closed; add # END SOLUTION")
    return regions


def package_regions(root: str | Path, package: str = "minildm") -> list[Region]:
    """The regions of every .py file of the package under `root` (the folder that holds `minildm/`)."""
    root = Path(root)
    regions = []
    for file in sorted((root / package).rglob("*.py")):
        if "__pycache__" not in file.parts:
            regions += find_regions(file.read_text(encoding="utf-8"), file.relative_to(root).as_posix())
    return regions


def stub_line(indent: str, task: str, hint: str) -> str:
    """The one line a workbook has where the solution was: it fails loudly, naming the task and the way in."""
    text = f"{task}: {hint}".replace("\\", "\\\\").replace('"', '\\"')
    return f'{indent}raise NotImplementedError("{text}")'


def solution_lines(text: str, region: Region) -> list[str]:
    return text.splitlines()[region.begin + 1:region.end]


def replace_regions(text: str, replacements: dict[Region, list[str]]) -> str:
    """The text with each given region's solution lines replaced (marker lines kept); other regions untouched."""
    lines = text.splitlines()
    for region, new in sorted(replacements.items(), key=lambda item: -item[0].begin):   # bottom up
        lines[region.begin + 1:region.end] = new
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def enclosing_function(text: str, region: Region) -> str:
    """The qualified name of the innermost function or method holding the region ("DiagonalGaussian.kl").

    This is what a grader that keeps student code in another process swaps for a proxy: the region's whole
    function, called with the same arguments. A region outside any function is a RegionError."""
    best: list[str] = []

    def visit(node: ast.AST, names: list[str]) -> None:
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inside = child.lineno - 1 < region.begin and region.begin + 2 <= (child.end_lineno or 0)
                if inside:
                    here = [*names, child.name]
                    if not isinstance(child, ast.ClassDef):
                        best = here
                    visit(child, here)

    visit(ast.parse(text), [])
    if not best:
        raise RegionError(f"{region.where}: the region of {region.task} is not inside a function; a graded region "
                          "must be (part of) a function's body")
    return ".".join(best)
