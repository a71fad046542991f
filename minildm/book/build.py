"""Build the staged book into a static site with Sphinx, MyST-NB and the Sphinx Book Theme, all offline.

Why this generator: Sphinx's search is built in and runs in the browser from a prebuilt index (no service, no
CDN); MyST-NB reads the notebooks without executing them (`nb_execution_mode = "off"`: the site shows what is
committed) and the book theme gives each notebook page its download button; MyST's `dollarmath` turns `$...$`
and `$$...$$` into math that MathJax 3 typesets. Sphinx would fetch MathJax from a CDN, so `mathjax_path` points
at a copy of MathJax 3.2.2's own files taken from the `django-static-mathjax` wheel (MathJax's es5 distribution
as a plain package; Django is not needed). The theme uses the system's fonts and bundles its icons.

The site is written to a temporary folder beside `--out` and swapped in whole. A folder that this command did not
build is never written over; one it built is replaced, and kept as NAME.old-N if someone added files to it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from minildm.book.stage import Book, stage_book
from minildm.quotes import REPO_ROOT

MARKER = ".minildm-book.json"             # in every site we build: the files we wrote, so a rebuild may replace them
MATHJAX_PARTS = ("tex-chtml.js", "input", "output/chtml", "output/chtml.js", "ui", "a11y", "adaptors")


@dataclass
class Site:
    out: Path
    book: Book
    pages: int                     # HTML pages written
    seconds: float                 # wall time of the whole build
    warnings: list[str]


def require_extra() -> None:
    """Name the missing package and the command that installs it, instead of a bare ModuleNotFoundError."""
    import importlib.util

    missing = [m for m in ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_copybutton", "mathjax")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the book needs {', '.join(missing)}, which is not installed; install the book's extra: "
                          "pip install -e \".[book]\"")


def mathjax_source() -> Path:
    """MathJax 3's es5 folder, from the `mathjax` package that django-static-mathjax installs."""
    import mathjax

    folder = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (folder / "tex-chtml.js").is_file():
        raise ImportError(f"{folder} has no tex-chtml.js: the installed `mathjax` package is not MathJax 3's files; "
                          "reinstall the book's extra: pip install --force-reinstall django-static-mathjax")
    return folder


def copy_mathjax(static: Path) -> None:
    """The parts of MathJax that TeX input with HTML output loads (its speech files, 4 MB, are left out)."""
    src, dst = mathjax_source(), static / "mathjax"
    for part in MATHJAX_PARTS:
        (dst / part).parent.mkdir(parents=True, exist_ok=True)
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
        else:
            shutil.copyfile(src / part, dst / part)


def sphinx_settings(static: Path) -> dict:
    """Sphinx's configuration (what a conf.py would hold)."""
    return {
        "project": "minildm",
        "author": "the minildm authors",
        "html_title": "minildm: latent diffusion, built to be read",
        "extensions": ["myst_nb", "sphinx_copybutton", "sphinx.ext.mathjax"],
        "myst_enable_extensions": ["dollarmath", "amsmath"],
        "myst_heading_anchors": 3,                       # "#the-claim" links to a chapter's sections
        "nb_execution_mode": "off",                      # the notebooks as committed: no kernel runs in the build
        "exclude_patterns": ["chapters/*/**"],           # figures/ and the like are files, not pages
        "html_theme": "sphinx_book_theme",
        "html_theme_options": {"use_download_button": True, "home_page_in_toc": True, "show_toc_level": 2,
                               "navbar_persistent": []},     # the sidebar has the search box already
        "html_context": {"default_mode": "light"},          # an empty mode makes the theme log a console error
        "html_favicon": str(Path(__file__).with_name("favicon.svg")),   # else the browser asks for /favicon.ico
        "html_static_path": [str(static)],
        "html_sourcelink_suffix": "",                    # the download button offers the .ipynb itself
        "html_last_updated_fmt": None,
        "mathjax_path": "mathjax/tex-chtml.js",          # relative to _static: our copy, not the CDN
        # an undefined macro (\frc) is a visible error (and one the browser test counts), not quiet red text
        "mathjax3_config": {"tex": {"packages": {"[-]": ["noundefined"]}}},
        "suppress_warnings": ["myst.header"],            # chapters may skip a heading level; that is not an error
    }


def replaceable(out: Path) -> set[str] | None:
    """Refuse an `out` we did not build; return the files of the site in it (None when there is nothing)."""
    from minildm.saving import few, files_in

    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file; build the site into a folder (--out site/)")
    present = files_in(out)
    if not present:
        return None
    if MARKER not in present:
        raise FileExistsError(f"{out} already exists and minildm did not build it (it holds {few(present)}); "
                              "choose another --out, or move that folder away first")
    return set(json.loads((out / MARKER).read_text(encoding="utf-8"))["files"])


def build(out: str | os.PathLike, root: str | os.PathLike = REPO_ROOT, chapters: str | os.PathLike | None = None,
          notebooks: str | os.PathLike | None = None, strict: bool = False) -> Site:
    """Build the book into the folder `out`. `strict` turns Sphinx's warnings into errors."""
    require_extra()
    from sphinx.application import Sphinx

    from minildm.saving import files_in, put_away

    start = time.perf_counter()
    out = Path(out).resolve()
    ours = replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    messages = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="minildm-book-") as work:
        stage, static = Path(work) / "src", Path(work) / "static"
        book = stage_book(stage, Path(root), chapters, notebooks)
        copy_mathjax(static)
        try:
            app = Sphinx(stage, None, tmp, Path(work) / "doctrees", "html", sphinx_settings(static),
                         status=None, warning=messages, freshenv=True, warningiserror=strict,
                         exception_on_warning=strict)
            with warnings.catch_warnings():           # the theme uses Sphinx APIs that Sphinx 11 will drop
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                app.build()
            if app.statuscode:
                raise RuntimeError(f"Sphinx failed to build the book:\n{messages.getvalue()}")
            shutil.rmtree(tmp / ".doctrees", ignore_errors=True)
            files = sorted(files_in(tmp) | {MARKER})
            (tmp / MARKER).write_text(json.dumps({"kind": "book-site", "files": files}, indent=1), encoding="utf-8")
            if out.exists():
                os.replace(out, aside)              # a folder cannot replace a non-empty folder: move it aside first
            os.replace(tmp, out)
        except BaseException:
            if aside.exists() and not out.exists():
                os.replace(aside, out)              # the swap failed half-way: put the old site back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if aside.exists():
        put_away(aside, out, keep_old=False, ours=ours or set())
    pages = sum(1 for f in files if f.endswith(".html"))
    lines = [line for line in messages.getvalue().splitlines() if line.strip()]
    return Site(out, book, pages, time.perf_counter() - start, lines)
