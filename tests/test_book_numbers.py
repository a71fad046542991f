"""Every number a chapter quotes comes from its notebook: the marked numbers and the figure links are checked
against what the notebooks recorded (minildm/book/record.py), and the check can fail."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from minildm.book import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_every_marked_number_and_figure_in_the_chapters_matches_the_notebooks_records():
    problems = record.check(ROOT / "chapters")
    assert not problems, "\n".join(problems) + "\n(record again with: python -m minildm.book figures NN)"


def a_book(tmp_path: Path, prose: str, numbers: dict, figures: tuple[str, ...] = ()) -> Path:
    chapters = tmp_path / "chapters"
    (chapters / "numbers").mkdir(parents=True)
    (chapters / "numbers" / "42.json").write_text(json.dumps(numbers))
    (chapters / "figures").mkdir()
    for name in figures:
        (chapters / "figures" / name).write_bytes(b"\x89PNG")
    (chapters / "42-scratch.md").write_text(f"# Scratch\n\n{prose}\n")
    return chapters


def test_prose_that_differs_from_the_record_is_named_with_its_line_and_the_recorded_text(tmp_path):
    chapters = a_book(tmp_path, "The VAE keeps 33.10 dB<!-- n:psnr --> of PSNR.", {"psnr": {"value": 33.02,
                                                                                        "text": "33.02 dB"}})
    [problem] = record.check(chapters)
    assert "42-scratch.md:3" in problem and "'33.02 dB'" in problem and "psnr" in problem, problem
    fixed = a_book(tmp_path / "b", "The VAE keeps 33.02 dB<!-- n:psnr --> of PSNR.", {"psnr": {"value": 33.02,
                                                                                           "text": "33.02 dB"}})
    assert record.check(fixed) == []


def test_a_marker_nobody_recorded_and_a_missing_or_unlinked_figure_are_each_a_problem(tmp_path):
    chapters = a_book(tmp_path, "It is 7<!-- n:seven -->.\n\n![a plot](figures/42-missing.png)", {},
                      figures=("42-orphan.png",))
    problems = record.check(chapters)
    assert len(problems) == 3, problems
    assert any("'seven' is not recorded" in p for p in problems)
    assert any("figures/42-missing.png does not exist" in p for p in problems)
    assert any("42-orphan.png: no chapter links this figure" in p for p in problems)


def test_a_measured_timing_is_checked_for_presence_not_value(tmp_path):
    numbers = {"step_seconds": {"value": 0.78, "text": "0.78 s", "measured": "2-core CPU, 2 threads"}}
    assert record.check(a_book(tmp_path, "A step takes about 0.8 s<!-- n:step_seconds -->.", numbers)) == []
    assert record.check(a_book(tmp_path / "b", "A step takes 0.8 s<!-- n:step_secs -->.", numbers))


def test_recording_writes_only_when_asked_and_the_figure_is_a_small_png(tmp_path, monkeypatch):
    book = record.Record("42", tmp_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(100), [i ** 0.5 for i in range(100)])
    monkeypatch.delenv(record.RECORD_ENV, raising=False)
    assert book.number("answer", 42, "42") == "42"
    book.figure(fig, "curve", "the square root, rising ever more slowly")
    assert not any(tmp_path.iterdir()), "a notebook run without recording must leave the committed files alone"
    monkeypatch.setenv(record.RECORD_ENV, "1")
    book.number("answer", 42, "42")
    book.number("seconds", 1.5, "1.5 s", measured="a laptop")
    book.figure(fig, "curve", "the square root, rising ever more slowly")
    plt.close(fig)
    stored = json.loads((tmp_path / "numbers" / "42.json").read_text())
    assert stored == {"answer": {"value": 42, "text": "42"},
                      "seconds": {"value": 1.5, "text": "1.5 s", "measured": "a laptop"}}
    png = tmp_path / "figures" / "42-curve.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 150_000


@pytest.mark.parametrize("call, says", [
    (lambda b: b.number("Bad Name", 1, "1"), "lower_case_with_underscores"),
    (lambda b: b.figure(None, "a_plot", "alt"), "lower-case-with-dashes"),
    (lambda b: b.figure(None, "a-plot", "  "), "needs alt text"),
    (lambda b: record.Record("2"), "two-digit number"),
])
def test_bad_names_are_one_line_errors(tmp_path, call, says):
    with pytest.raises(ValueError, match=says):
        call(record.Record("42", tmp_path))


def test_figures_cells_keeps_the_named_cells_in_the_notebooks_order_and_names_an_unknown_one():
    import nbformat

    from minildm.book.__main__ import only_cells

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(f"x = {i}", id=f"c{i}") for i in range(4)]
    notebook.cells.insert(1, nbformat.v4.new_markdown_cell("words", id="m"))
    kept = only_cells(notebook, ["c3", "c0", "m"])
    assert [cell.id for cell in kept.cells] == ["c0", "m", "c3"]
    with pytest.raises(ValueError, match="no cell with id c9; the code cells are c0, c3"):
        only_cells(kept, ["c9"])


@pytest.mark.parametrize("argv, says", [
    (["figures", "--cells", "cell-01"], "--cells needs exactly one chapter"),
    (["figures", "06", "--cells", "no-such-cell"], "06-training.ipynb: no cell with id no-such-cell"),
])
def test_figures_cells_refuses_what_it_cannot_run_before_starting_a_kernel(argv, says, capsys):
    from minildm.book.__main__ import main

    assert main(argv) == 2
    assert says in capsys.readouterr().err
