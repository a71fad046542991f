"""The book's website: staged from the chapters as they are, built offline, and read in a real browser.

The fast tests check the staging (what the site adds to copies of the chapters). The slow ones build the site with
a fixture chapter beside the real ones (a PNG, a GIF, inline and display math, a quote), serve it on 127.0.0.1 and
drive the system's headless Chromium with Playwright over every page. They skip, saying why, where the book's
extra or Chromium is missing; .ci/run installs both. Screenshots of each chapter's first screen go to a pytest
temporary folder (printed) or to $BOOK_SCREENSHOTS.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from minildm.book.stage import chapter_files, link_paths, quote_label, source_page, stage_chapter
from minildm.quotes import REPO_ROOT, object_lines, object_source

FIXTURE = "99-fixture-figures-and-math.md"
FIXTURE_TEXT = r"""# 99 — Fixture: a figure, an animation and math

The noise level $\bar\alpha_t$ falls with $t$, and the latent at step $t$ is

$$
z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon .
$$

![A left-to-right gradient: the fixture figure](figures/fixture-gradient.png)

![Two frames: the fixture animation](figures/fixture-frames.gif)

<!-- quote: minildm/autoencoder.py::latent_shape -->
```python
{quote}
```
"""
FIXTURE_MATH = 4                   # three inline formulas and one displayed


def fixture_text() -> str:
    return FIXTURE_TEXT.replace("{quote}", object_source("minildm/autoencoder.py", "latent_shape"))


# ------------------------------------------------------------------------------------------ staging (fast)


def test_chapters_are_found_by_their_number_in_reading_order(tmp_path):
    for name in ["10-later.md", "02-second.md", "01-first.md", "notes.md", "1-bad.md"]:
        (tmp_path / name).write_text("# x\n")
    assert [p.name for p in chapter_files(tmp_path)] == ["01-first.md", "02-second.md", "10-later.md"]


def test_each_quote_links_to_the_lines_it_quotes_and_the_notebook_is_linked_under_the_title(tmp_path):
    chapter = tmp_path / "01-x.md"
    chapter.write_text(fixture_text())
    quotes = {}
    text = stage_chapter(chapter, "chapters/01-x", "notebooks/01-x", REPO_ROOT, quotes)
    _, first, last = object_lines("minildm/autoencoder.py", "latent_shape")
    label = quote_label("minildm/autoencoder.py", "latent_shape")
    lines = text.splitlines()
    marker = lines.index("<!-- quote: minildm/autoencoder.py::latent_shape -->")
    assert lines[marker - 2] == f"{{ref}}`Source: minildm/autoencoder.py, lines {first}-{last} <{label}>`"
    assert lines[marker + 1] == "```python"                   # the quote block still follows its marker
    assert "{doc}`read it here </notebooks/01-x>`" in lines[2]
    assert quotes == {"minildm/autoencoder.py": {"latent_shape": (first, last, ["chapters/01-x"])}}


def test_a_source_page_is_cut_where_each_quoted_object_starts_with_the_files_own_line_numbers():
    text = "\n".join(f"line{i}" for i in range(1, 11)) + "\n"
    page = source_page("minildm/x.py", text, {"f": (4, 6, ["chapters/01-a"]), "g": (8, 10, ["chapters/02-b"])})
    starts = [int(n) for n in re.findall(r":lineno-start: (\d+)", page)]
    assert starts == [1, 4, 8]
    after_label = page.split(f"({quote_label('minildm/x.py', 'g')})=")[1]
    assert after_label.split("\n")[1:4] == ["```{code-block} python", ":lineno-start: 8", "line8"]


def test_inline_paths_become_links_but_code_blocks_stay_as_they_are():
    docs = {"minildm/schedule.py": "source/minildm/schedule"}
    text = "See `minildm/schedule.py` and `minildm/nope.py`.\n```bash\ncat `minildm/schedule.py`\n```\n"
    out = link_paths(text, docs).split("\n")
    assert out[0] == "See {doc}`minildm/schedule.py </source/minildm/schedule>` and `minildm/nope.py`."
    assert out[2] == "cat `minildm/schedule.py`"


def test_build_refuses_a_folder_it_did_not_build(tmp_path):
    from minildm.book.build import build

    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="minildm did not build it"):
        build(mine)
    assert (mine / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ the built site (slow)


def needs_book_extra():
    from minildm.book.build import require_extra

    try:
        require_extra()
    except ImportError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The real chapters plus the fixture chapter (a PNG, a GIF, math, a quote), built with warnings as errors."""
    needs_book_extra()
    from PIL import Image

    from minildm.book.build import build

    chapters = tmp_path_factory.mktemp("chapters")
    for item in (REPO_ROOT / "chapters").iterdir():
        if item.is_dir():
            shutil.copytree(item, chapters / item.name)
        elif item.suffix == ".md":
            shutil.copyfile(item, chapters / item.name)
    (chapters / "figures").mkdir(exist_ok=True)
    Image.linear_gradient("L").resize((96, 48)).convert("RGB").save(chapters / "figures" / "fixture-gradient.png")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    frames[0].save(chapters / "figures" / "fixture-frames.gif", save_all=True, append_images=frames[1:], duration=200)
    (chapters / FIXTURE).write_text(fixture_text(), encoding="utf-8")
    return build(tmp_path_factory.mktemp("book") / "site", chapters=chapters, strict=True)


@pytest.mark.slow
def test_site_builds_every_chapter_notebook_and_source_page_with_nothing_from_the_network(site):
    out = site.out
    chapters = [p.stem for p in chapter_files(REPO_ROOT / "chapters")] + [Path(FIXTURE).stem]
    assert [doc.split("/")[1] for doc in site.book.chapters] == chapters
    for doc in site.book.chapters + site.book.notebooks + site.book.sources + ["index", "notation", "search"]:
        assert (out / f"{doc}.html").is_file(), doc
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert {"fixture-gradient.png", "fixture-frames.gif"} <= {f.name for f in (out / "_images").iterdir()}
    remote = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.IGNORECASE)
    for page in out.rglob("*.html"):
        assert not remote.search(page.read_text(encoding="utf-8")), f"{page} loads something from the network"


def chromium() -> str | None:
    return os.environ.get("BOOK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(Quiet, directory=str(site.out))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def aborted_icon(request) -> bool:
    """The browser asks for the tab's icon after the page has loaded; going on to the next page cancels that."""
    return request.failure == "net::ERR_ABORTED" and request.url.endswith("/favicon.svg")


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# In the page: the images that did not load, the math elements and what MathJax made of them, and the visible text
# outside code (where no $ should be left).
PAGE_STATE = """async () => {
  const images = [...document.images];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener("load", done); img.addEventListener("error", done); setTimeout(done, 10000); })));
  const maths = document.querySelectorAll(".math").length;
  if (maths && window.MathJax && MathJax.startup) await MathJax.startup.promise;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let text = "";
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.parentElement.closest("pre, code, script, style, textarea, mjx-container, .math")) text += node.data;
  }
  return {
    broken: images.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute("src")),
    maths, typeset: document.querySelectorAll("mjx-container").length,
    errors: document.querySelectorAll("mjx-merror").length,
    text,
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    copy_buttons: document.querySelectorAll("button.copybtn").length,
    search_box: document.querySelectorAll("input[name=q], form[action*=search]").length,
  };
}"""


@pytest.mark.slow
def test_every_page_loads_cleanly_in_chromium_with_images_math_links_and_search(site, server, tmp_path_factory):
    needs_book_extra()
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: "
                                                                   "pip install -e \".[dev]\"")
    shots = Path(os.environ.get("BOOK_SCREENSHOTS") or tmp_path_factory.mktemp("book-screens"))
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p.relative_to(site.out).as_posix() for p in site.out.rglob("*.html")
                   if not p.relative_to(site.out).parts[0].startswith("_"))
    problems, states = [], {}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        current = {"url": ""}
        page.on("console", lambda m: m.type == "error" and problems.append(f"{current['url']}: console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"{current['url']}: page error: {e}"))
        page.on("requestfailed", lambda r: aborted_icon(r) or problems.append(
            f"{current['url']}: request failed ({r.failure}): {r.url}"))
        page.on("response", lambda r: r.status >= 400 and problems.append(f"{current['url']}: {r.status} {r.url}"))
        for name in pages:
            current["url"] = name
            page.goto(f"{server}/{name}", wait_until="load")
            state = states[name] = page.evaluate(PAGE_STATE)
            problems += [f"{name}: image did not load: {src}" for src in state["broken"]]
            if state["maths"] and (state["typeset"] < state["maths"] or state["errors"]):
                problems.append(f"{name}: {state['maths']} formulas, {state['typeset']} typeset, "
                                f"{state['errors']} MathJax errors")
            for raw in re.findall(r"\$\$|\$[^$\s][^$\n]*\$", state["text"]):
                problems.append(f"{name}: math left as text: {raw[:60]!r}")
            if not state["search_box"]:
                problems.append(f"{name}: no search box")
            if name.startswith("chapters/"):
                page.screenshot(path=str(shots / f"{Path(name).stem}.png"))
        page.goto(f"{server}/search.html?q=classifier-free%20guidance", wait_until="load")
        page.wait_for_selector("#search-results .search-summary", timeout=60_000)
        found = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(a => a.href)")
        browser.close()
    print(f"\nscreenshots of each chapter's first screen: {shots}")

    problems += broken_links(server, states)
    fixture = states[f"chapters/{Path(FIXTURE).stem}.html"]
    assert fixture["typeset"] >= FIXTURE_MATH and fixture["maths"] == FIXTURE_MATH, fixture
    quote_links = [href for href in fixture["links"] if "/source/minildm/autoencoder.html#src-" in href]
    assert len(quote_links) == 1, f"the fixture's one quote should link to its source once: {quote_links}"
    assert any("08-the-pipeline" in href for href in found), f"search for classifier-free guidance found {found}"
    for name, state in states.items():
        if name.startswith("chapters/"):
            assert state["copy_buttons"] > 0, f"{name} has no copy button on its code"
        if name.startswith("notebooks/"):
            assert any("_downloads/" in h and h.endswith(".ipynb") for h in state["links"]), f"{name}: no download"
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:60])


def broken_links(server: str, states: dict) -> list[str]:
    """Every link to this site must reach a page, and a #fragment an element with that id on it."""
    pages: dict[str, str | None] = {}

    def fetch(path: str) -> str | None:
        if path not in pages:
            try:
                with urllib.request.urlopen(f"{server}{path}") as response:
                    pages[path] = response.read().decode("utf-8", "replace")
            except urllib.error.HTTPError:
                pages[path] = None
        return pages[path]

    problems = []
    for name, state in states.items():
        for href in set(state["links"]):
            url = urlsplit(href)
            if f"{url.scheme}://{url.netloc}" != server:
                continue                                          # another site: not ours to check
            path = unquote(url.path) + ("index.html" if url.path.endswith("/") else "")
            body = fetch(path)
            if body is None:
                problems.append(f"{name}: link to a missing page: {href}")
            elif url.fragment and path.endswith(".html") and \
                    not re.search(rf"""\bid=["']{re.escape(unquote(url.fragment))}["']""", body):
                problems.append(f"{name}: link to a missing anchor: {href}")
    return problems
