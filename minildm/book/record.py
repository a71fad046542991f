"""What the notebooks record for their chapters: the figures the chapter shows and the numbers its prose quotes.

A chapter never types a number it did not get from code. Its notebook records each one, by name, with the text the
chapter shows, and the chapter marks where it quotes it with an HTML comment, invisible when rendered:

    # in notebooks/02-the-vae.ipynb
    book = Record("02")
    book.number("round_trip_psnr", psnr, f"{psnr:.2f} dB")             # -> chapters/numbers/02.json
    book.figure(fig, "beta-sweep", "Reconstructions at four beta")     # -> chapters/figures/02-beta-sweep.png

    <!-- in chapters/02-the-vae.md -->
    The round trip keeps 33.02 dB<!-- n:round_trip_psnr --> of PSNR.

`check` (run by the tests, next to the quote check) fails when the text just before a marker is not the recorded
text, when a marker names a number nobody recorded, and when a figure a chapter links is missing or a saved figure
is linked by no chapter. A timing is recorded with `measured=` (the machine and threads it ran on): its marker must
name a recorded number, and the prose is free to round it, since a timing is a fact of one run, not of the code.

Recording writes files only when `python -m minildm.book figures` runs the notebooks (it sets MINILDM_BOOK_RECORD=1):
running a notebook by hand, or in the tests, computes and prints the same numbers and leaves the committed ones be.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from minildm.quotes import REPO_ROOT

RECORD_ENV = "MINILDM_BOOK_RECORD"
NUMBERS_DIR, FIGURES_DIR = "numbers", "figures"
MARKER = re.compile(r"<!--\s*n:(?P<name>[a-z0-9_]+)\s*-->")
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\((?P<path>figures/[^)\s]+)\)")
NAME = re.compile(r"^[a-z0-9_]+$")
FIGURE_NAME = re.compile(r"^[a-z0-9-]+$")
FIGURE_DPI = 80                          # a chapter figure is read on a screen: 80 dpi keeps it under ~150 KB


def recording() -> bool:
    return os.environ.get(RECORD_ENV) == "1"


class Record:
    """A notebook's recorder for chapter `number` ("02"): `number(...)` and `figure(...)` return what they show."""

    def __init__(self, chapter: str, chapters_dir: str | os.PathLike = REPO_ROOT / "chapters"):
        if not re.fullmatch(r"\d\d", chapter):
            raise ValueError(f"chapter must be its two-digit number, as in its file name ('02'), got {chapter!r}")
        self.chapter, self.folder = chapter, Path(chapters_dir)
        self.path = self.folder / NUMBERS_DIR / f"{chapter}.json"
        self.numbers: dict[str, dict] = {}

    def number(self, name: str, value: float | int, text: str, measured: str | None = None) -> str:
        """Record `value` as the chapter shows it (`text`); `measured` says where a timing was taken. Returns text."""
        if not NAME.fullmatch(name):
            raise ValueError(f"a number's name is lower_case_with_underscores, got {name!r}")
        entry = {"value": value, "text": text}
        if measured:
            entry["measured"] = measured
        self.numbers[name] = entry
        if recording():                       # the whole file, every time: a notebook stopped half-way loses nothing
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stored = read_numbers(self.path)
            stored.update(self.numbers)
            self.path.write_text(json.dumps(dict(sorted(stored.items())), indent=1, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
        return text

    def figure(self, fig, name: str, alt: str):
        """Save a matplotlib figure as chapters/figures/NN-name.png (palette PNG, small), when recording. `alt` is
        the text the chapter gives it; kept here so the notebook says what the figure shows. Returns the figure."""
        if not FIGURE_NAME.fullmatch(name):
            raise ValueError(f"a figure's name is lower-case-with-dashes, got {name!r}")
        if not alt.strip():
            raise ValueError(f"figure {name!r} needs alt text: what a reader who cannot see it should know")
        if recording():
            from PIL import Image

            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight", facecolor="white")
            image = Image.open(buffer).convert("RGB").quantize(256)          # a palette: a third of the bytes
            path = self.folder / FIGURES_DIR / f"{self.chapter}-{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, optimize=True)
        return fig


def read_numbers(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{name: {{value, text}}}}; record it again: python -m minildm.book figures")
    return data


@dataclass
class Problem:
    chapter: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.chapter}:{self.line}: {self.message}"


def check_chapter(chapter: Path) -> list[Problem]:
    """The chapter's marked numbers against its notebook's record, and its figure links against the files."""
    folder = chapter.parent
    numbers = read_numbers(folder / NUMBERS_DIR / f"{chapter.name[:2]}.json")
    problems = []
    for line_number, line in enumerate(chapter.read_text(encoding="utf-8").splitlines(), 1):
        for match in MARKER.finditer(line):
            name, before = match["name"], line[:match.start()]
            entry = numbers.get(name)
            if entry is None:
                problems.append(Problem(chapter, line_number, f"number {name!r} is not recorded in "
                                        f"{NUMBERS_DIR}/{chapter.name[:2]}.json; record it in the notebook and run "
                                        f"python -m minildm.book figures {chapter.name[:2]}"))
            elif "measured" not in entry and not before.endswith(entry["text"]):
                shown = before[-len(entry["text"]) - 10:]
                problems.append(Problem(chapter, line_number, f"the prose shows ...{shown!r} before number {name!r}, "
                                        f"but the notebook recorded {entry['text']!r}; correct the prose"))
        for match in IMAGE_LINK.finditer(line):
            if not (folder / match["path"]).is_file():
                problems.append(Problem(chapter, line_number, f"figure {match['path']} does not exist; make it with "
                                        f"python -m minildm.book figures {chapter.name[:2]}"))
    return problems


def unreferenced_figures(chapters_dir: Path) -> list[Path]:
    """Saved figures that no chapter links: made for nothing, or a link that was renamed."""
    linked = {match["path"] for chapter in chapters_dir.glob("[0-9][0-9]-*.md")
              for match in IMAGE_LINK.finditer(chapter.read_text(encoding="utf-8"))}
    return sorted(p for p in (chapters_dir / FIGURES_DIR).glob("*") if f"{FIGURES_DIR}/{p.name}" not in linked)


def check(chapters_dir: str | os.PathLike = REPO_ROOT / "chapters") -> list[str]:
    """Everything wrong with the chapters' numbers and figures, one line each (empty: all is well)."""
    chapters_dir = Path(chapters_dir)
    problems = [str(p) for chapter in sorted(chapters_dir.glob("[0-9][0-9]-*.md")) for p in check_chapter(chapter)]
    problems += [f"{p}: no chapter links this figure; link it where the text discusses it, or delete it"
                 for p in unreferenced_figures(chapters_dir)]
    return problems
