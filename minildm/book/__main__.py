"""`python -m minildm.book build --out site/`: the book as a static website (see minildm/book/__init__.py).

`python -m minildm.book figures [NN ...]` runs the notebooks (all, or chapters NN) top to bottom with recording on,
so that they write the chapters' figures and numbers (record.py), then checks the chapters against them;
`python -m minildm.book check` only checks.
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
    sub.add_parser("check", help="check the chapters' marked numbers and figure links against the records")
    args = parser.parse_args(argv)
    if args.command == "figures":
        return run_notebooks(args.chapters)
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


def run_notebooks(chapters: list[str]) -> int:
    """Execute the chosen notebooks in the repository root with MINILDM_BOOK_RECORD=1, one after another."""
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
    env = dict(os.environ, **{RECORD_ENV: "1"},
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for path in chosen:
        start = time.time()
        notebook = nbformat.read(path, as_version=4)                # executed in memory: the file stays clean
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
