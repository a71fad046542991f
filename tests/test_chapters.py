"""The chapters quote the package and never retype it: every quote must match the source, and the checker must
be able to fail."""

import re
from pathlib import Path

import pytest

from minildm import quotes

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.md"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NUMBERED = re.compile(r"^(\d\d)-[a-z0-9-]+$")

KL_SOURCE = quotes.object_source("minildm/autoencoder.py", "DiagonalGaussian.kl", root=ROOT)


def write_chapter(folder: Path, block: str, name: str = "DiagonalGaussian.kl") -> Path:
    """A small chapter with text around one quote, so we can check that sync touches only the block."""
    path = folder / "99-scratch.md"
    path.write_text(f"# Scratch\n\nSome prose.\n\n<!-- quote: minildm/autoencoder.py::{name} -->\n```python\n"
                    f"{block}\n```\n\nMore prose after the quote.\n", encoding="utf-8")
    return path


def test_there_are_chapters_to_check():
    assert CHAPTERS, f"no chapters found in {ROOT / 'chapters'}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_quote_in_the_chapter_matches_the_package_source(chapter):
    problems = quotes.check([chapter], root=ROOT)
    assert not problems, ("quoted code has drifted from the package (fix with `python -m minildm.quotes sync "
                          "chapters/`):\n\n" + "\n\n".join(map(str, problems)))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_quotes_the_package_at_least_once(chapter):
    assert quotes.find_quotes(chapter), f"{chapter.name} has no <!-- quote: ... --> block; chapters show real code"


def test_a_drifted_quote_is_detected_with_its_line_and_a_diff(tmp_path):
    drifted = KL_SOURCE.replace("- 1.0 -", "- 2.0 -")
    assert drifted != KL_SOURCE
    chapter = write_chapter(tmp_path, drifted)
    problems = quotes.check([chapter], root=ROOT)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.line == 5 and problem.target == "minildm/autoencoder.py::DiagonalGaussian.kl", problem
    assert "- 2.0 -" in problem.diff and "- 1.0 -" in problem.diff, problem.diff
    assert any(line.startswith("-") and "2.0" in line for line in problem.diff.splitlines()), problem.diff
    assert any(line.startswith("+") and "1.0" in line for line in problem.diff.splitlines()), problem.diff


def test_sync_rewrites_a_drifted_quote_from_the_source_and_leaves_the_prose_alone(tmp_path):
    chapter = write_chapter(tmp_path, "def kl(self):\n    return 'something else'")
    rewritten = quotes.sync([chapter], root=ROOT)
    assert [(p.line, p.target) for p in rewritten] == [(5, "minildm/autoencoder.py::DiagonalGaussian.kl")]
    assert quotes.check([chapter], root=ROOT) == []
    text = chapter.read_text()
    assert text.startswith("# Scratch\n\nSome prose.\n\n") and text.endswith("```\n\nMore prose after the quote.\n")
    assert KL_SOURCE in text
    assert quotes.sync([chapter], root=ROOT) == [], "a second sync must find nothing to do"


def test_an_empty_block_is_filled_by_sync(tmp_path):
    chapter = tmp_path / "98-empty.md"
    chapter.write_text("<!-- quote: minildm/autoencoder.py::latent_shape -->\n```python\n```\n")
    assert len(quotes.check([chapter], root=ROOT)) == 1
    quotes.sync([chapter], root=ROOT)
    source = quotes.object_source("minildm/autoencoder.py", "latent_shape", root=ROOT)
    assert quotes.find_quotes(chapter)[0].body == source.split("\n")


def test_a_quote_keeps_decorators_and_is_dedented():
    source = quotes.object_source("minildm/autoencoder.py", "AutoencoderConfig.downsampling_factor", root=ROOT)
    assert source.startswith("@property\ndef downsampling_factor(self)"), source
    assert not source.endswith("\n")


@pytest.mark.parametrize("name, expected", [
    ("DiagonalGaussian.kll", "DiagonalGaussian has no function, class or assignment 'kll'"),
    ("NoSuchThing", "has no function, class or assignment 'NoSuchThing'"),
])
def test_a_quote_of_a_missing_object_names_the_chapter_line_and_what_to_do(tmp_path, name, expected):
    chapter = write_chapter(tmp_path, KL_SOURCE, name=name)
    before = chapter.read_text()
    problems = quotes.check([chapter], root=ROOT)
    assert len(problems) == 1 and problems[0].line == 5, problems
    message = str(problems[0])
    assert f"{chapter}:5" in message and expected in message and "fix the name" in message, message
    with pytest.raises(quotes.QuoteError, match=r"nothing was rewritten(.|\n)*99-scratch.md:5"):
        quotes.sync([chapter], root=ROOT)
    assert chapter.read_text() == before, "sync must not touch any file when a quote cannot be resolved"


def test_a_quote_of_a_missing_file_says_the_path_is_relative_to_the_repository(tmp_path):
    chapter = tmp_path / "97-missing.md"
    chapter.write_text("text\n<!-- quote: minildm/no_such_module.py::f -->\n```python\n```\n")
    problems = quotes.check([chapter], root=ROOT)
    assert len(problems) == 1 and problems[0].line == 2, problems
    assert "minildm/no_such_module.py, which does not exist" in problems[0].message
    assert "relative to the repository root" in problems[0].message


def test_a_marker_without_a_code_block_under_it_is_reported(tmp_path):
    chapter = tmp_path / "96-bad.md"
    chapter.write_text("<!-- quote: minildm/autoencoder.py::latent_shape -->\nprose instead of a code block\n")
    problems = quotes.check([chapter], root=ROOT)
    assert len(problems) == 1 and problems[0].line == 1 and "must be followed" in problems[0].message, problems


def test_a_marker_shown_inside_another_code_block_is_an_example_not_a_quote(tmp_path):
    chapter = tmp_path / "95-example.md"
    chapter.write_text("```markdown\n<!-- quote: minildm/no_such_module.py::f -->\n```\n\n"
                       "<!-- quote: minildm/autoencoder.py::DiagonalGaussian.kl -->\n"
                       f"```python\n{KL_SOURCE}\n```\n")
    found = quotes.find_quotes(chapter)
    assert [(q.line, q.name) for q in found] == [(5, "DiagonalGaussian.kl")], found
    assert quotes.check([chapter], root=ROOT) == []


def test_the_command_line_check_fails_on_drift_and_passes_after_sync(tmp_path, capsys):
    chapter = write_chapter(tmp_path, KL_SOURCE.replace("0.5", "0.25"))
    assert quotes.main(["check", str(tmp_path)]) == 1
    assert "differs from the package" in capsys.readouterr().out
    assert quotes.main(["sync", str(tmp_path)]) == 0
    assert quotes.main(["check", str(chapter)]) == 0


def test_every_chapter_has_a_notebook_with_the_same_number_and_vice_versa():
    chapter_numbers = {}
    for path in CHAPTERS:
        match = NUMBERED.match(path.stem)
        assert match, f"{path.name}: chapters are named NN-words-with-dashes.md"
        assert match[1] not in chapter_numbers, f"two chapters numbered {match[1]}: {path.name} and another"
        chapter_numbers[match[1]] = path.name
    notebook_numbers = {}
    for path in NOTEBOOKS:
        match = NUMBERED.match(path.stem)
        assert match, f"{path.name}: notebooks are named NN-words-with-dashes.ipynb"
        notebook_numbers[match[1]] = path.name
    missing_notebooks = sorted(set(chapter_numbers) - set(notebook_numbers))
    missing_chapters = sorted(set(notebook_numbers) - set(chapter_numbers))
    assert not missing_notebooks, f"chapters without a notebook: {[chapter_numbers[n] for n in missing_notebooks]}"
    assert not missing_chapters, f"notebooks without a chapter: {[notebook_numbers[n] for n in missing_chapters]}"
