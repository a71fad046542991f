"""Lay the book's sources out as one Sphinx source folder, transformed for the web but never edited in place.

The chapters, notebooks and README stay what a reader of the repository sees; the site needs a little more, which
is added here, to copies, at every build:

- each chapter gets a line under its title linking its notebook (rendered, and as a download), and each
  `<!-- quote: minildm/x.py::Name -->` marker gets a link above its code block to the quoted lines of the source;
- each notebook gets a download link under its title (and, while it is stored without outputs, a note saying so);
- the package's files become pages (`source/minildm/x.md`) cut at every quoted object, so that a quote can link
  to the exact lines and the page can list the chapters that quote it;
- the front page is the README's overview, its "Read the book" section and its chapter table (the reading order),
  with the table's chapters and notebooks turned into links; the notation page is `notation.md` beside this file.

Chapters are found by name (`NN-*.md`), so a new chapter joins the navigation when its file lands; everything a
chapter folder holds besides its chapters (`figures/`, ...) is copied beside them, so image links keep working.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from minildm.quotes import REPO_ROOT, find_quotes, object_lines

CHAPTER_GLOB = "[0-9][0-9]-*.md"          # 01-pixels-and-latents.md, ...: the number is the reading order
NOTATION = Path(__file__).with_name("notation.md")
README_SECTIONS = ("Read the book", "What is here")   # the front page, after the README's overview


class BookError(ValueError):
    """The sources cannot make a book: a folder or a README section is missing. The message says what to do."""


@dataclass
class Book:
    """What was staged: Sphinx document names (paths without suffix, relative to the stage folder)."""

    chapters: list[str] = field(default_factory=list)
    notebooks: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def chapter_files(folder: Path) -> list[Path]:
    """The chapters in reading order: every `NN-*.md` in `folder`, by name."""
    return sorted(Path(folder).glob(CHAPTER_GLOB))


def number(path: Path) -> str:
    return path.name[:2]


def title(markdown: str, fallback: str) -> str:
    """The text of the first `# ` heading."""
    match = re.search(r"^# +(.+?)\s*$", markdown, re.MULTILINE)
    return match[1] if match else fallback


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def escape(text: str) -> str:
    """Plain text for Markdown: `__init__.py` is a file name, not bold."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)


def fenced(code: str, info: str, options: str = "") -> str:
    """A fenced block that the code itself cannot close: one backtick more than its longest run."""
    runs = [len(run) for run in re.findall(r"`+", code)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}{info}\n{options}\n{code}\n{fence}\n"


# ------------------------------------------------------------------------------------------ the package's files


def source_doc(path: str) -> str:
    """minildm/kernels/flash.py -> source/minildm/kernels/flash"""
    return "source/" + path.removesuffix(".py")


def quote_label(path: str, name: str) -> str:
    """The Sphinx label of a quoted object's lines on its source page."""
    return "src-" + slug(f"{path}-{name}")


def source_page(path: str, text: str, quoted: dict[str, tuple[int, int, list[str]]]) -> str:
    """One package file as a page: the list of its quoted objects, then its code cut where each of them starts.

    `quoted` maps an object's name to (first line, last line, the chapter documents that quote it).
    """
    lines = text.splitlines()
    parts = [f"# {escape(path)}\n"]
    doc = ast.get_docstring(ast.parse(text)) if path.endswith(".py") else None
    if doc:
        parts.append(doc.split("\n\n")[0].replace("\n", " ") + "\n")
    if quoted:
        parts.append("Quoted in the book:\n")
        for name, (first, last, chapters) in sorted(quoted.items(), key=lambda item: item[1][0]):
            where = ", ".join(f"{{doc}}`/{c}`" for c in sorted(set(chapters)))
            parts.append(f"- {{ref}}`{name}, lines {first}-{last} <{quote_label(path, name)}>` in {where}")
        parts.append("")
    starts = sorted({first: name for name, (first, _, _) in quoted.items()}.items())
    cuts = [1] + [first for first, _ in starts if first > 1] + [len(lines) + 1]
    label_at = {first: quote_label(path, name) for first, name in starts}
    for begin, end in zip(cuts, cuts[1:]):
        chunk = lines[begin - 1:end - 1]
        lead = next((i for i, line in enumerate(chunk) if line.strip()), len(chunk))
        if lead == len(chunk):
            continue                                    # blank lines only: nothing to show
        if begin in label_at:
            parts.append(f"({label_at[begin]})=")
        # a code block drops its leading blank lines, so the numbering starts at the first line it shows
        parts.append(fenced("\n".join(chunk[lead:]).rstrip(), "{code-block} python",
                            f":lineno-start: {begin + lead}"))
    return "\n".join(parts)


def stage_sources(stage: Path, root: Path, files: list[str],
                  quotes: dict[str, dict[str, tuple[int, int, list[str]]]]) -> list[str]:
    """A page for each file of the package and an index page listing them with their docstrings' first line."""
    rows = []
    for path in files:
        text = (root / path).read_text(encoding="utf-8")
        doc = source_doc(path)
        (stage / f"{doc}.md").parent.mkdir(parents=True, exist_ok=True)
        (stage / f"{doc}.md").write_text(source_page(path, text, quotes.get(path, {})), encoding="utf-8")
        summary = (ast.get_docstring(ast.parse(text)) or "").split("\n\n")[0].replace("\n", " ")
        rows.append(f"| {{doc}}`{path} </{doc}>` | {summary.replace('|', '/')} |")
    index = ["# The code, file by file", "", "Every file of the package. Each quote in a chapter links to its lines "
             "here.", "", "| file | what it is for |", "|---|---|", *rows, "",
             "```{toctree}", ":hidden:", "", *[f"/{source_doc(p)}" for p in files], "```", ""]
    (stage / "source" / "index.md").write_text("\n".join(index), encoding="utf-8")
    return ["source/index", *[source_doc(p) for p in files]]


# ------------------------------------------------------------------------------------------ chapters and notebooks


PATH_SPAN = re.compile(r"`((?:minildm|chapters|notebooks)/[\w/.-]+\.(?:py|md|ipynb))`")


def link_paths(text: str, docs: dict[str, str]) -> str:
    """Every inline `minildm/x.py`, `chapters/NN-x.md` or `notebooks/NN-x.ipynb` that is a page of the site becomes
    a link to it; fenced code blocks are left as they are."""
    out, fence = [], None
    for line in text.split("\n"):
        opening = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and opening:
            fence = opening[1]
        elif fence is not None and line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
            fence = None
        elif fence is None:
            line = PATH_SPAN.sub(lambda m: f"{{doc}}`{m[1]} </{docs[m[1]]}>`" if m[1] in docs else m[0], line)
        out.append(line)
    return "\n".join(out)



def stage_chapter(chapter: Path, doc: str, notebook: str | None, root: Path,
                  quotes: dict[str, dict[str, tuple[int, int, list[str]]]]) -> str:
    """The chapter's text with its notebook linked under the title and a source link above every quote."""
    lines = chapter.read_text(encoding="utf-8").splitlines()
    inserts: list[tuple[int, list[str]]] = []        # (index of the line to insert before, lines)
    for q in find_quotes(chapter):
        _, first, last = object_lines(q.path, q.name, root)
        quotes.setdefault(q.path, {}).setdefault(q.name, (first, last, []))[2].append(doc)
        link = f"{{ref}}`Source: {q.path}, lines {first}-{last} <{quote_label(q.path, q.name)}>`"
        inserts.append((q.line - 1, ["", link, ""]))
    heading = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if notebook is not None and heading is not None:
        inserts.append((heading + 1, ["", f"*The notebook:* {{doc}}`read it here </{notebook}>` or "
                                          f"{{download}}`download it </{notebook}.ipynb>` and run it.", ""]))
    for at, new in sorted(inserts, key=lambda item: item[0], reverse=True):    # bottom up: indices stay valid
        lines[at:at] = new
    return "\n".join(lines) + "\n"


def stage_notebook(src: Path, dst: Path, doc: str) -> None:
    """The notebook with a download link under its title (its first cell), and a note while it has no outputs."""
    nb = json.loads(src.read_text(encoding="utf-8"))
    has_outputs = any(cell.get("outputs") for cell in nb["cells"] if cell["cell_type"] == "code")
    text = f"*Download {{download}}`{src.name} </{doc}.ipynb>` and run it in Jupyter.*"
    if not has_outputs:
        text += (" *This page shows the notebook as it is stored, without its outputs: run it to see them (each "
                 "notebook runs top to bottom on a CPU in under two minutes).*")
    cell = {"cell_type": "markdown", "id": "minildm-book-download", "metadata": {}, "source": [text]}
    first = nb["cells"][0] if nb["cells"] else None
    at = 1 if first and first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ") else 0
    nb["cells"].insert(at, cell)
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ the front page


def readme_section(readme: str, heading: str) -> str:
    """The body of the README's `## heading` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    if match is None:
        raise BookError(f"README.md has no '## {heading}' section, which the book's front page shows; add it back "
                        "or change README_SECTIONS in minildm/book/stage.py")
    return match[1].strip()


def link_chapters(text: str, chapters: dict[str, str], docs: dict[str, str]) -> str:
    """The README's chapter table with each row's number linked to its chapter and its notebook's path shortened
    to a link named "notebook" (a long path would not wrap), where they exist."""
    def chapter(match: re.Match) -> str:
        doc = chapters.get(match[1])
        return f"| {{doc}}`{match[1]} </{doc}>` |" if doc else match[0]

    def notebook(match: re.Match) -> str:
        doc = docs.get(match[1])
        return f"| {{doc}}`notebook </{doc}>` |" if doc else match[0]

    text = re.sub(r"^\| *(\d\d) *\|", chapter, text, flags=re.MULTILINE)
    return re.sub(r"\| *`(notebooks/[\w.-]+\.ipynb)` *\| *$", notebook, text, flags=re.MULTILINE)


def front_page(readme: str, book: Book, docs: dict[str, str]) -> str:
    overview = readme.split("\n## ", 1)[0].split("\n", 1)[1].strip()      # after the "# minildm" title
    chapters = {doc.split("/")[1][:2]: doc for doc in book.chapters}
    parts = ["# minildm: latent diffusion, built to be read", "", overview, ""]
    for heading in README_SECTIONS:
        section = link_chapters(readme_section(readme, heading), chapters, docs)
        parts += [f"## {heading}", "", link_paths(section, docs), ""]

    def toctree(caption: str, docs: list[str]) -> list[str]:
        return ["```{toctree}", ":hidden:", f":caption: {caption}", "", *[f"/{d}" for d in docs], "```", ""]

    parts += toctree("Front matter", ["notation"]) + toctree("Chapters", book.chapters)
    parts += toctree("Notebooks", book.notebooks) + toctree("Source", ["source/index"])
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ all of it


def stage_book(stage: Path, root: Path = REPO_ROOT, chapters_dir: Path | None = None,
               notebooks_dir: Path | None = None) -> Book:
    """Write the Sphinx source folder `stage` from the repository at `root` (chapters and notebooks from there
    unless given). Returns the documents it wrote, in reading order."""
    root = Path(root)
    chapters_dir = Path(chapters_dir) if chapters_dir is not None else root / "chapters"
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else root / "notebooks"
    chapters = chapter_files(chapters_dir)
    if not chapters:
        raise BookError(f"{chapters_dir} holds no chapter (no file named like 01-name.md); pass the folder that "
                        "holds the chapters with --chapters")
    book = Book()
    (stage / "chapters").mkdir(parents=True)
    (stage / "notebooks").mkdir()
    for item in chapters_dir.iterdir():               # figures/ and whatever else the chapters link to
        if item.is_dir():
            shutil.copytree(item, stage / "chapters" / item.name)
    notebooks = {number(p): p for p in sorted(notebooks_dir.glob("[0-9][0-9]-*.ipynb"))}
    sources = sorted(p.relative_to(root).as_posix() for p in (root / "minildm").rglob("*.py"))
    docs = {path: source_doc(path) for path in sources}     # what an inline path in the text links to
    docs |= {f"notebooks/{nb.name}": f"notebooks/{nb.stem}" for nb in notebooks.values()}
    docs |= {f"chapters/{c.name}": f"chapters/{c.stem}" for c in chapters}
    for nb in notebooks.values():
        doc = f"notebooks/{nb.stem}"
        stage_notebook(nb, stage / f"{doc}.ipynb", doc)
        book.notebooks.append(doc)
    quotes: dict[str, dict[str, tuple[int, int, list[str]]]] = {}
    for chapter in chapters:
        doc = f"chapters/{chapter.stem}"
        nb = notebooks.get(number(chapter))
        text = stage_chapter(chapter, doc, f"notebooks/{nb.stem}" if nb else None, root, quotes)
        (stage / f"{doc}.md").write_text(link_paths(text, docs), encoding="utf-8")
        book.chapters.append(doc)
    book.sources = stage_sources(stage, root, sources, quotes)
    shutil.copyfile(NOTATION, stage / "notation.md")
    readme = (root / "README.md").read_text(encoding="utf-8")
    (stage / "index.md").write_text(front_page(readme, book, docs), encoding="utf-8")
    return book
