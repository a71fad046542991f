"""`python -m minildm.book build --out site/`: the book as a static website (see minildm/book/__init__.py)."""

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
