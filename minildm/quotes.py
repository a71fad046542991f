"""The chapters quote the package; this module keeps the quotes true.

A chapter never retypes code. It marks a quote with one HTML comment line, invisible when the Markdown is rendered,
and puts a fenced Python block right under it:

    <!-- quote: minildm/autoencoder.py::DiagonalGaussian.kl -->
    ```python
    def kl(self) -> Tensor:
        ...
    ```

The name after `::` is a module-level function, class or assignment (`latent_shape`, `ResBlock`, `EVAL_SEED`) or a
method (`Class.method`). The block must hold exactly that object's source as Python's `ast` sees it: from its first
decorator to its last line, dedented, without the `# BEGIN/END SOLUTION` lines that mark exercises (see
`minildm.grading`). `check` lists every quote that has drifted from the package, with a diff; `sync` rewrites the
blocks from the source. From the command line:

    python -m minildm.quotes check chapters/
    python -m minildm.quotes sync chapters/
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from minildm.grading.regions import is_marker

REPO_ROOT = Path(__file__).resolve().parent.parent     # quote paths are relative to the repository root
MARKER = re.compile(r"^<!--\s*quote:\s*(?P<path>\S+?)::(?P<name>[A-Za-z_][\w.]*)\s*-->\s*$")
FENCE_OPEN = "```python"
FENCE_CLOSE = "```"


class QuoteError(ValueError):
    """A quote that cannot be checked: its marker is malformed, or it names a file or object that does not exist.

    `reason` says what is wrong and what to do; `chapter` and `line` say where, when known.
    """

    def __init__(self, reason: str, chapter: Path | None = None, line: int = 0):
        self.reason, self.chapter, self.line = reason, chapter, line
        super().__init__(f"{chapter}:{line}: {reason}" if chapter is not None else reason)


@dataclass
class Quote:
    """One quote in a chapter. Line numbers are 1-based, as an editor shows them."""

    chapter: Path        # the Markdown file
    line: int            # the line of the <!-- quote: ... --> marker
    path: str            # the quoted file, relative to the repository root
    name: str            # "function", "Class" or "Class.method"
    body: list[str]      # the lines between the fences, as the chapter has them now
    end: int             # the line of the closing fence

    @property
    def where(self) -> str:
        return f"{self.chapter}:{self.line}"

    @property
    def target(self) -> str:
        return f"{self.path}::{self.name}"


@dataclass
class Problem:
    """A quote that does not match the package: `diff` says how (empty when the quote could not be resolved)."""

    chapter: Path
    line: int
    target: str
    message: str
    diff: str = ""

    def __str__(self) -> str:
        text = f"{self.chapter}:{self.line}: {self.target}: {self.message}"
        return f"{text}\n{self.diff}" if self.diff else text


# ------------------------------------------------------------------------------------------- reading chapters


def find_quotes(chapter: str | Path) -> list[Quote]:
    """Every quote in one Markdown file, in order. A marker must be followed at once by a ```python block.

    Markers inside other fenced blocks are ignored, so a chapter can show the syntax itself in an example.
    """
    chapter = Path(chapter)
    lines = chapter.read_text(encoding="utf-8").splitlines()
    quotes, i, in_fence = [], 0, False
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("<!--") and "quote:" in line:
            match = MARKER.match(line)
            if match is None:
                raise QuoteError(f"malformed quote marker {line!r}; write it as <!-- quote: minildm/file.py::name "
                                 "--> (name = function, Class or Class.method)", chapter, i + 1)
            target = f"{match['path']}::{match['name']}"
            if i + 1 >= len(lines) or lines[i + 1].strip() != FENCE_OPEN:
                raise QuoteError(f"the quote of {target} must be followed on the next line by a {FENCE_OPEN} block; "
                                 "add one (it may be empty) and run `python -m minildm.quotes sync` to fill it",
                                 chapter, i + 1)
            end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == FENCE_CLOSE), None)
            if end is None:
                raise QuoteError(f"the {FENCE_OPEN} block of the quote of {target} is never closed; add a line "
                                 f"with {FENCE_CLOSE}", chapter, i + 2)
            quotes.append(Quote(chapter, i + 1, match["path"], match["name"], lines[i + 2:end], end + 1))
            i = end                                         # continue after the closing fence
        i += 1
    return quotes


def markdown_files(paths) -> list[Path]:
    """Files as given, folders expanded to their *.md files (sorted)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.md")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder; pass a chapter (.md) or a folder of chapters")
    return files


# --------------------------------------------------------------------------------------- reading the package


def definitions(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body defines: functions, classes and simple `NAME = ...` assignments."""
    found: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def object_lines(path: str, name: str, root: str | Path = REPO_ROOT) -> tuple[str, int, int]:
    """The text of the file `path` (relative to `root`) and the first and last line (1-based) of `name` in it,
    decorators included: where a reader finds the quoted object (the book links each quote to these lines)."""
    file = Path(root) / path
    if not file.is_file():
        raise QuoteError(f"the quote names {path}, which does not exist under {Path(root)}; fix the path in the "
                         "<!-- quote: ... --> line (it is relative to the repository root) or delete the quote")
    text = file.read_text(encoding="utf-8")
    node: ast.AST = ast.parse(text, filename=str(file))
    parts = name.split(".")
    for depth, part in enumerate(parts):
        body = getattr(node, "body", None)
        names = definitions(body) if isinstance(body, list) else {}
        if part not in names:
            scope = path if depth == 0 else f"{path}::{'.'.join(parts[:depth])}"
            available = ", ".join(sorted(names)) or "nothing quotable"
            raise QuoteError(f"{scope} has no function, class or assignment {part!r} (it defines: "
                             f"{available}); fix the name in the <!-- quote: ... --> line or delete the quote")
        node = names[part]
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return text, first, node.end_lineno


def object_source(path: str, name: str, root: str | Path = REPO_ROOT) -> str:
    """The source of `name` in the file `path` (relative to `root`): decorators included, dedented, no final newline."""
    text, first, last = object_lines(path, name, root)
    lines = text.splitlines()[first - 1:last]
    lines = [line for line in lines if not is_marker(line)]     # exercise markers are for the workbook, not the reader
    return textwrap.dedent("\n".join(lines)).rstrip("\n")


def expected_block(quote: Quote, root: str | Path = REPO_ROOT) -> list[str]:
    """The lines that belong between the quote's fences; a QuoteError names the chapter line if the object is gone."""
    try:
        return object_source(quote.path, quote.name, root).split("\n")
    except QuoteError as err:
        raise QuoteError(err.reason, quote.chapter, quote.line) from None


# ------------------------------------------------------------------------------------------ check and sync


def check(paths, root: str | Path = REPO_ROOT) -> list[Problem]:
    """Every quote under `paths` (chapters or folders) that differs from the package, or cannot be resolved."""
    problems = []
    for chapter in markdown_files(paths):
        try:
            quotes = find_quotes(chapter)
        except QuoteError as err:
            problems.append(Problem(chapter, err.line, "(quote marker)", err.reason))
            continue
        for q in quotes:
            try:
                want = expected_block(q, root)
            except QuoteError as err:
                problems.append(Problem(chapter, q.line, q.target, err.reason))
                continue
            if q.body != want:
                diff = difflib.unified_diff(q.body, want, f"{q.where} (chapter)", f"{q.target} (package)", lineterm="")
                problems.append(Problem(chapter, q.line, q.target,
                                        "the quoted code differs from the package; run "
                                        "`python -m minildm.quotes sync chapters/`", "\n".join(diff)))
    return problems


def sync(paths, root: str | Path = REPO_ROOT) -> list[Problem]:
    """Rewrite every drifted quote from the package source; returns what was rewritten.

    All quotes are resolved before any file is touched: if one names a missing file or object, nothing is written
    and a QuoteError lists every such quote.
    """
    plans, unresolved = [], []
    for chapter in markdown_files(paths):
        quotes = find_quotes(chapter)
        wanted = []
        for q in quotes:
            try:
                wanted.append((q, expected_block(q, root)))
            except QuoteError as err:
                unresolved.append(str(err))
        plans.append((chapter, wanted))
    if unresolved:
        raise QuoteError("nothing was rewritten; these quotes cannot be resolved:\n" + "\n".join(unresolved))
    rewritten = []
    for chapter, wanted in plans:
        drifted = [(q, want) for q, want in wanted if q.body != want]
        if not drifted:
            continue
        text = chapter.read_text(encoding="utf-8")
        lines = text.splitlines()
        for q, want in reversed(drifted):          # bottom up, so earlier line numbers stay valid
            lines[q.line + 1:q.end - 1] = want     # between the opening fence (line q.line + 1) and the closing one
            rewritten.append(Problem(chapter, q.line, q.target, "rewritten from the package"))
        chapter.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""), encoding="utf-8")
    return sorted(rewritten, key=lambda p: (str(p.chapter), p.line))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m minildm.quotes",
                                     description="Check or refresh the code quoted in the chapters.")
    parser.add_argument("action", choices=["check", "sync"])
    parser.add_argument("paths", nargs="*", default=[str(REPO_ROOT / "chapters")], help="chapters or folders")
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            problems = check(args.paths)
            for p in problems:
                print(p, end="\n\n")
            files = markdown_files(args.paths)
            print(f"{len(problems)} problem(s) in {len(files)} chapter(s)" if problems
                  else f"all quotes in {len(files)} chapter(s) match the package")
            return 1 if problems else 0
        rewritten = sync(args.paths)
        for p in rewritten:
            print(f"{p.chapter}:{p.line}: {p.target}: {p.message}")
        print(f"rewrote {len(rewritten)} quote(s)")
        return 0
    except (QuoteError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
