"""`python -m minildm.book build --out site/`: the book as a static website (see minildm/book/__init__.py).

`python -m minildm.book figures [NN ...]` runs the notebooks (all, or chapters NN) top to bottom with recording on,
so that they write the chapters' figures and numbers (record.py), then checks the chapters against them;
`--cells ID,ID` runs only those cells of the one chosen notebook, in the notebook's order (to record what reads a new
benchmark result without re-timing the live cells on a machine that is busy today); `python -m minildm.book check`
only checks.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm.book",
                                     description="Build the chapters, notebooks and source into a static website.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the site (offline; nothing is executed)")
    build.add_argument("--out", required=True, help="the folder to write the site to (a new one, or a site built "
                                                    "here before)")
    build.add_argument("--chapters", default=None, help="the folder of NN-name.md chapters (default: chapters/)")
    build.add_argument("--notebooks", default=None, help="the folder of NN-name.ipynb notebooks (default: notebooks/)")
    build.add_argument("--strict", action="store_true", help="fail on any warning of the generator")
    figures = sub.add_parser("figures", help="run the notebooks to record the chapters' figures and numbers")
    figures.add_argument("chapters", nargs="*", help="two-digit chapter numbers (default: every notebook)")
    figures.add_argument("--cells", type=lambda text: text.split(","), default=None,
                         help="only these cells (their ids, comma-separated) of the one chosen notebook; include the "
                              "cells whose names they use")
    sub.add_parser("check", help="check the chapters' marked numbers and figure links against the records")
    args = parser.parse_args(argv)
    if args.command == "figures":
        return run_notebooks(args.chapters, args.cells)
    if args.command == "check":
        return report_check()
    try:
        from minildm.book.build import build as build_site
        from minildm.book.stage import BookError
        site = build_site(args.out, chapters=args.chapters, notebooks=args.notebooks, strict=args.strict)
    except (BookError, FileExistsError, FileNotFoundError, ImportError) as err:
        if os.environ.get("MINILDM_TRACEBACK"):
            raise
        print(f"python -m minildm.book build: error: {err}", file=sys.stderr)
        return 1
    for line in site.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"built {site.pages} pages ({len(site.book.chapters)} chapters, {len(site.book.notebooks)} notebooks, "
          f"{len(site.book.sources)} source pages) into {site.out} in {site.seconds:.1f} s; open it with: "
          f"python -m http.server -d {site.out} 8000")
    return 0


def report_check() -> int:
    from minildm.book.record import check

    problems = check()
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s)" if problems else "every marked number and figure matches its notebook's record")
    return 1 if problems else 0


def only_cells(notebook, ids: list[str]):
    """`notebook` keeping only the cells with these ids, in its own order; an id it lacks is an error."""
    unknown = [i for i in ids if i not in {cell.get("id") for cell in notebook.cells}]
    if unknown:
        raise ValueError(f"no cell with id {', '.join(unknown)}; the code cells are "
                         + ", ".join(cell.get("id") for cell in notebook.cells if cell.cell_type == "code"))
    notebook.cells = [cell for cell in notebook.cells if cell.get("id") in ids]
    return notebook


def run_notebooks(chapters: list[str], cells: list[str] | None = None) -> int:
    """Execute the chosen notebooks in the repository root with MINILDM_BOOK_RECORD=1, one after another (of the one
    chosen notebook, only `cells` when given)."""
    import time

    import nbclient
    import nbformat

    from minildm.book.record import RECORD_ENV
    from minildm.quotes import REPO_ROOT

    notebooks = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
    chosen = [p for p in notebooks if not chapters or p.name[:2] in chapters]
    unknown = sorted(set(chapters) - {p.name[:2] for p in notebooks})
    if unknown or not chosen:
        print(f"python -m minildm.book figures: error: no notebook for chapter(s) {', '.join(unknown) or chapters}; "
              f"the notebooks are {', '.join(p.name[:2] for p in notebooks)}", file=sys.stderr)
        return 2
    if cells and len(chosen) != 1:
        print("python -m minildm.book figures: error: --cells needs exactly one chapter (figures 06 --cells ...)",
              file=sys.stderr)
        return 2
    env = dict(os.environ, **{RECORD_ENV: "1"},
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for path in chosen:
        start = time.time()
        notebook = nbformat.read(path, as_version=4)                # executed in memory: the file stays clean
        if cells:
            try:
                notebook = only_cells(notebook, cells)
            except ValueError as err:
                print(f"python -m minildm.book figures: error: {path.name}: {err}", file=sys.stderr)
                return 2
        client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO_ROOT)}})
        try:
            client.execute(env=env)
        except nbclient.exceptions.CellExecutionError as err:
            print(f"{path.name} failed; nothing after the failing cell was recorded:\n{err}", file=sys.stderr)
            return 1
        print(f"{path.name}: recorded in {time.time() - start:.0f} s")
    return report_check()


if __name__ == "__main__":
    sys.exit(main())
