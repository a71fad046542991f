"""The classroom machinery: solution markers, the workbook builder and the grader.

The end-to-end tests build a real workbook, change it the way students do (solve a task, get one wrong, write an
endless loop, break a file's syntax) and grade it in a child process, exactly as `minildm grade` does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minildm.cli import main
from minildm.grading import grader
from minildm.grading.regions import (
    RegionError,
    find_regions,
    replace_regions,
    solution_lines,
)
from minildm.grading.tasks import TASKS, select
from minildm.grading.workbook import MANIFEST, build_workbook, check_markers, find_leaks, package_lines_outside

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ markers


def test_regions_are_found_with_their_task_and_indentation():
    text = "def f():\n    # BEGIN SOLUTION ch09.thing\n    return 1\n    # END SOLUTION\n"
    [region] = find_regions(text, "x.py")
    assert (region.task, region.begin, region.end, region.indent) == ("ch09.thing", 1, 3, "    ")
    assert solution_lines(text, region) == ["    return 1"]
    assert replace_regions(text, {region: ["    return 2"]}) == text.replace("return 1", "return 2")


@pytest.mark.parametrize("text, complaint", [
    ("# BEGIN SOLUTION ch01.a\n# BEGIN SOLUTION ch01.b\n# END SOLUTION\n# END SOLUTION\n", "cannot nest"),
    ("x = 1\n# END SOLUTION\n", "without a BEGIN"),
    ("# BEGIN SOLUTION ch01.a\nx = 1\n", "never closed"),
    ("# BEGIN SOLUTION reparameterize\n# END SOLUTION\n", "is not a task id"),
    ("# BEGIN SOLUTION\n# END SOLUTION\n", "a missing task id"),
])
def test_broken_markers_are_errors_that_name_the_file_and_line(text, complaint):
    with pytest.raises(RegionError, match=complaint) as err:
        find_regions(text, "minildm/x.py")
    assert "minildm/x.py:" in str(err.value)


def test_every_registered_task_is_marked_in_the_package_and_every_marker_is_registered():
    by_task = check_markers(ROOT)
    assert sorted(by_task) == sorted(TASKS)
    assert len({t.chapter for t in TASKS.values()}) >= 2 and len(TASKS) >= 5


def test_an_unknown_task_id_in_the_package_is_an_error(tmp_path):
    shutil.copytree(ROOT / "minildm", tmp_path / "minildm", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    extra = tmp_path / "minildm" / "extra.py"
    extra.write_text("def f():\n    # BEGIN SOLUTION ch02.no_such_task\n    return 1\n    # END SOLUTION\n")
    with pytest.raises(RegionError, match="unknown task id ch02.no_such_task"):
        check_markers(tmp_path)


def test_every_task_section_is_a_heading_of_its_chapter():
    for task in TASKS.values():
        [chapter] = (ROOT / "chapters").glob(f"{task.number}-*.md")
        headings = {line.lstrip("#").strip() for line in chapter.read_text().splitlines() if line.startswith("#")}
        assert task.section in headings, f"{task.id}: no heading {task.section!r} in {chapter.name}"


def test_every_task_is_listed_in_its_chapter_exercises():
    for task in TASKS.values():
        [chapter] = (ROOT / "chapters").glob(f"{task.number}-*.md")
        assert f"`{task.id}`" in chapter.read_text(), f"{chapter.name} does not list the graded task {task.id}"


def test_selecting_an_unknown_task_lists_the_known_ones():
    assert [t.id for t in select(["ch02.gaussian_kl", "ch01"])] == ["ch01.latent_shape", "ch01.twonn",
                                                                     "ch02.gaussian_kl"]
    assert {t.id for t in select(["ch02.*"])} == {t for t in TASKS if t.startswith("ch02.")}
    with pytest.raises(ValueError, match="known tasks: ch01.latent_shape"):
        select(["ch02.reparametrise"])


# ------------------------------------------------------------------------------------------------ workbook


@pytest.fixture(scope="module")
def workbook(tmp_path_factory) -> Path:
    return build_workbook(tmp_path_factory.mktemp("built") / "workbook").out


def copy_of(workbook: Path, tmp_path: Path) -> Path:
    student = tmp_path / "student"
    shutil.copytree(workbook, student)
    return student


def write_solution(student: Path, task: str, code: str) -> None:
    """Put `code` (unindented) between the task's markers, as a student would."""
    for file in (student / "minildm").rglob("*.py"):
        text = file.read_text()
        regions = [r for r in find_regions(text, str(file)) if r.task == task]
        if regions:
            lines = [regions[0].indent + line if line else line for line in textwrap.dedent(code).splitlines()]
            file.write_text(replace_regions(text, {regions[0]: lines}))
            return
    raise AssertionError(f"no region for {task} in {student}")


def reference_solution(task: str) -> str:
    for file in (ROOT / "minildm").rglob("*.py"):
        text = file.read_text()
        for region in find_regions(text, str(file)):
            if region.task == task:
                return textwrap.dedent("\n".join(solution_lines(text, region)))
    raise AssertionError(task)


def test_the_workbook_has_every_solution_replaced_by_a_stub_that_names_its_task(workbook):
    # a solution line the package also has outside every region (Heun repeats Euler's step) may stay in the copy
    elsewhere = package_lines_outside(ROOT, [r for found in check_markers(ROOT).values() for r in found])
    for task in TASKS:
        solution = reference_solution(task)
        text = "\n".join(p.read_text() for p in (workbook / "minildm").rglob("*.py"))
        assert f'raise NotImplementedError("{task}: ' in text
        own = [line.strip() for line in solution.strip().splitlines() if line.strip() not in elsewhere]
        assert own and own[-1] not in text, f"{task}'s last line of its own survived"
    assert json.loads((workbook / MANIFEST).read_text())["tasks"] == list(TASKS)
    assert (workbook / "WORKBOOK.md").is_file() and (workbook / "conftest.py").is_file()
    for name in ["tests/tasks/test_ch02_tasks.py", "chapters/02-the-vae.md", "notebooks/02-the-vae.ipynb"]:
        assert (workbook / name).is_file(), name


def test_the_workbook_chapters_quote_the_stub_not_the_solution(workbook):
    chapter = (workbook / "chapters" / "02-the-vae.md").read_text()
    assert 'raise NotImplementedError("ch02.gaussian_kl: ' in chapter
    assert "0.5 * torch.sum(self.mean.pow(2)" not in chapter
    assert "BEGIN SOLUTION" not in chapter


def test_a_leaked_solution_line_is_found_wherever_it_is(tmp_path):
    (tmp_path / "notes.md").write_text("# notes\n    mse = (a - b).pow(2).flatten(1).mean(dim=1)\n")
    leaks = find_leaks(tmp_path, {"ch02.psnr": ["    mse = (a - b).pow(2).flatten(1).mean(dim=1)", "    return h"]},
                       common={"return h"})
    assert leaks == ["notes.md:2: a line of the solution of ch02.psnr: 'mse = (a - b).pow(2).flatten(1).mean(dim=1)'"]


def test_building_selected_tasks_stubs_only_those(tmp_path):
    out = build_workbook(tmp_path / "wb", ["ch02.gaussian_kl"]).out
    text = (out / "minildm" / "autoencoder.py").read_text()
    assert 'raise NotImplementedError("ch02.gaussian_kl: ' in text
    assert "NotImplementedError(\"ch02.reparameterize" not in text and "self.mean + self.std * eps" in text


def test_an_existing_folder_is_refused_and_force_keeps_it_aside(tmp_path, capsys):
    out = tmp_path / "wb"
    out.mkdir()
    (out / "my_solution.py").write_text("weeks of work")
    assert main(["workbook", "build", "--out", str(out), "--tasks", "ch01"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "already exists" in err
    assert (out / "my_solution.py").read_text() == "weeks of work"
    assert main(["workbook", "build", "--out", str(out), "--tasks", "ch01", "--force"]) == 0
    assert (tmp_path / "wb.old-1" / "my_solution.py").read_text() == "weeks of work"
    assert (out / MANIFEST).is_file()


def test_an_unknown_task_for_the_builder_or_grader_is_a_one_line_error_listing_the_known(tmp_path, capsys):
    assert main(["workbook", "build", "--out", str(tmp_path / "wb"), "--tasks", "ch02.kl"]) == 1
    assert main(["grade", "ch99", "--impl", str(ROOT)]) == 1
    assert main(["grade", "--use-reference-for", "ch9", "--impl", str(ROOT)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("ch02.gaussian_kl" in line or "ch01" in line for line in lines), lines
    assert not (tmp_path / "wb").exists()


def test_the_workbook_test_suite_collects_and_tests_its_own_package(workbook):
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=workbook,
                             capture_output=True, text=True, timeout=300, check=False)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert "error" not in collect.stdout.lower().split("collected")[-1], collect.stdout[-2000:]
    if sys.version_info >= (3, 11):            # -P: no current folder on sys.path, as with a plain `pytest`
        code = "import pytest, sys; sys.exit(pytest.main(['-q', 'tests/tasks', '-k', 'kl_of_the_standard']))"
        run = subprocess.run([sys.executable, "-P", "-c", code], cwd=workbook, capture_output=True, text=True,
                             timeout=300, check=False)
        assert "ch02.gaussian_kl: KL = 1/2" in run.stdout, run.stdout[-2000:]


# -------------------------------------------------------------------------------------------------- grader


def test_the_reference_scores_full_marks(tmp_path):
    report = grader.grade(ROOT)
    bad = [(g.task.id, g.status, [(t.name, t.outcome, t.message) for t in g.tests if t.outcome != "passed"])
           for g in report.grades if g.status != "passed"]
    assert not bad and not report.problems, (bad, report.problems)
    assert report.earned == report.possible > 0
    assert {g.task.id for g in report.grades} == set(TASKS)


def test_a_fresh_workbook_scores_zero_and_every_failure_is_its_own_stub(workbook):
    report = grader.grade(workbook)
    assert report.earned == 0 and report.possible > 0 and not report.problems
    for g in report.grades:
        assert g.status == "not started", (g.task.id, g.status, [(t.name, t.outcome, t.message) for t in g.tests])
        assert g.tests and all(t.outcome == "not started" and t.exception == "NotImplementedError" for t in g.tests)


def test_a_student_with_two_tasks_solved_one_wrong_one_hanging_and_one_broken_file(workbook, tmp_path):
    student = copy_of(workbook, tmp_path)
    write_solution(student, "ch02.reparameterize", reference_solution("ch02.reparameterize"))
    write_solution(student, "ch01.latent_shape", reference_solution("ch01.latent_shape"))
    # the KL without its 1/2: every value twice too large
    write_solution(student, "ch02.gaussian_kl",
                   "return torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))")
    # hangs on batches of 4 images only
    write_solution(student, "ch02.psnr", "while x.shape[0] == 4:\n    pass\n" + reference_solution("ch02.psnr"))
    # a syntax error in train.py
    write_solution(student, "ch02.scale_factor", "return float(1 / (")
    report = grader.grade(student, ["ch01", "ch02"], timeout=4)
    by_id = {g.task.id: g for g in report.grades}

    assert by_id["ch01.latent_shape"].status == "passed"
    assert by_id["ch02.reparameterize"].status == "passed"
    assert by_id["ch01.twonn"].status == "not started"

    kl = by_id["ch02.gaussian_kl"]
    assert kl.status == "partial" and 0 < kl.earned < kl.possible
    message = next(t.message for t in kl.tests if t.outcome == "failed" and "closed_form" in t.name)
    for needed in ("values differ", "max abs error", "max rel error", "first at index",
                   "chapter 02, section: The KL to N(0, I), in closed form"):
        assert needed in message, message

    psnr = by_id["ch02.psnr"]
    outcomes = {t.name: t.outcome for t in psnr.tests}
    assert outcomes.pop("test_psnr_of_identical_images_is_finite") == "timed out", psnr.tests
    assert outcomes.pop("test_psnr_clamps_images_to_their_range_first") == "not run"    # one hang, one timeout
    assert set(outcomes.values()) == {"passed"} and psnr.status == "partial"

    scale = by_id["ch02.scale_factor"]
    assert scale.status == "does not import" and scale.earned == 0 and scale.possible > 0
    assert "minildm/train_vae.py:" in scale.note and "SyntaxError" in scale.note

    table = report.table()
    assert "Score " in table and "timed out" in table
    for task in ("ch02.gaussian_kl", "ch02.psnr", "ch02.scale_factor"):    # never show the reference code
        for line in reference_solution(task).splitlines():
            if len(line.strip()) > 12 and "while" not in line:
                assert line.strip() not in table, line


def test_use_reference_for_unblocks_a_chapter_and_grades_the_rest(workbook, tmp_path):
    student = copy_of(workbook, tmp_path)
    write_solution(student, "ch02.gaussian_kl", reference_solution("ch02.gaussian_kl"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "test_hidden.py").write_text(textwrap.dedent('''
        import pytest
        import torch

        from minildm.autoencoder import DiagonalGaussian, latent_shape


        @pytest.mark.task("ch02.gaussian_kl")
        @pytest.mark.points(3)
        def test_kl_of_a_64_pixel_image_latent():
            c, h, w = latent_shape(64, 64)                 # needs chapter 1's latent_shape
            assert DiagonalGaussian(torch.zeros(1, 2 * c, h, w)).kl().item() == 0.0


        def test_without_a_task_is_ignored():
            raise AssertionError("never run")
    '''))
    stuck = grader.grade(student, ["ch02.gaussian_kl"], extra_tests=[str(hidden)])
    [kl] = stuck.grades
    hidden_result = next(t for t in kl.tests if "hidden" in t.nodeid)
    assert hidden_result.outcome == "needs ch01.latent_shape" and "--use-reference-for ch01" in hidden_result.message
    assert kl.status == "partial" and kl.earned == kl.possible - 3

    unblocked = grader.grade(student, None, extra_tests=[str(hidden)], use_reference_for=["ch01"])
    ids = {g.task.id: g for g in unblocked.grades}
    assert not any(t.startswith("ch01.") for t in ids)
    assert ids["ch02.gaussian_kl"].status == "passed" and ids["ch02.psnr"].status == "not started"
    assert "Using the reference for: ch01" in unblocked.table()
    # the student's own file still has their stub for chapter 1
    assert 'NotImplementedError("ch01.latent_shape' in (student / "minildm" / "autoencoder.py").read_text()


def test_calling_torch_distributions_for_the_kl_does_not_pass(workbook, tmp_path):
    student = copy_of(workbook, tmp_path)
    write_solution(student, "ch02.gaussian_kl", """
        from torch.distributions import Normal, kl_divergence
        q = Normal(self.mean, self.std)
        return kl_divergence(q, Normal(torch.zeros_like(self.mean), 1.0)).sum(dim=(1, 2, 3))
    """)
    [kl] = grader.grade(student, ["ch02.gaussian_kl"]).grades
    assert kl.status == "failed", kl
    assert any("must be written by hand" in t.message for t in kl.tests), [t.message for t in kl.tests]


def test_grade_cli_prints_the_table_and_writes_grade_json_but_never_over_a_foreign_file(workbook, tmp_path,
                                                                                            capsys, monkeypatch):
    monkeypatch.chdir(workbook)                            # inside a workbook: it is graded by default
    foreign = tmp_path / "grade.json"
    foreign.write_text("my notes")
    assert main(["grade", "ch01.latent_shape", "--report", str(foreign)]) == 1
    assert foreign.read_text() == "my notes" and "--report" in capsys.readouterr().err
    report = tmp_path / "out" / "grade.json"
    assert main(["grade", "ch01.latent_shape", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"Graded: {workbook}" in out and "not started" in out and "Score 0/" in out
    data = json.loads(report.read_text())
    assert data["score"] == 0 and data["max_score"] > 0 and data["tasks"][0]["task"] == "ch01.latent_shape"
    assert data["tasks"][0]["hint"].startswith("return (C, H / f, W / f)")
    assert data["isolation"]["level"] in ("root", "userns", "none") and "Isolation: " in out


def test_a_workbook_file_that_does_not_compile_is_reported_with_its_line(tmp_path):
    from minildm.grading.workbook import compile_errors

    (tmp_path / "minildm").mkdir()
    (tmp_path / "minildm" / "good.py").write_text("x = 1\n")
    (tmp_path / "minildm" / "bad.py").write_text("def f():\n    # BEGIN SOLUTION ch01.a\n# END SOLUTION\n")
    [error] = compile_errors(tmp_path)
    assert error.startswith("minildm/bad.py:") and "indented block" in error, error
