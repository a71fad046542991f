"""`minildm grade`: run the task tests against a student's copy and report points, per task, with hints.

The student's code and the tests never share a process (issue 18). The task tests, the hidden tests, the reference
and the report stay in the grader: the tests run in a trusted pytest process on the reference package (runner.py),
where each graded function is a proxy (trusted.py, proxy.py) that asks a worker process to run the student's
version (worker.py). Only tensors, numbers and plain JSON cross (codec.py: never pickle). The worker is walled off as
far as the machine allows (isolation.py: namespaces, a user id of its own, resource limits); the report and
grade.json name the level. A test's points count when it passes; a task whose tests all stop at its own
NotImplementedError is "not started".

    scratch.py   what is graded, and the scratch folder (the student's copy, import repairs, the worker's files)
    runner.py    the trusted pytest run, watched, and its log read
    report.py    per-test and per-task results, scoring, the table and grade.json
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from minildm.grading.report import GradeReport, check_report_path, classify, grade_task, write_report  # noqa: F401
from minildm.grading.runner import MAX_MESSAGE, parse_event, run_tests  # noqa: F401 - also the grader's names
from minildm.grading.scratch import default_tasks, prepare, put_reference, repair_imports, resolve_impl, tasks_in
from minildm.grading.tasks import TASKS, chapter_ids
from minildm.quotes import REPO_ROOT


def grade(impl: str | Path | None = None, patterns: list[str] | None = None, extra_tests: list[str] | None = None,
          use_reference_for: list[str] | None = None, timeout: float = 60.0, python: str = sys.executable,
          keep: bool = False) -> GradeReport:
    """Grade the tasks matching `patterns` in the copy at `impl` (see the module docstring)."""
    impl = resolve_impl(impl)
    if importlib.util.find_spec("pytest") is None:
        raise FileNotFoundError("grading needs pytest; install it with pip install pytest (or the dev extra)")
    tests = REPO_ROOT / "tests" / "tasks"
    if not tests.is_dir():
        tests = impl / "tests" / "tasks"
        if not tests.is_dir():
            raise FileNotFoundError(f"no task tests: neither {REPO_ROOT / 'tests/tasks'} nor {tests} exists; "
                                    "grade with a minildm installed from its source tree (`pip install -e .`)")
    extra = []
    for folder in extra_tests or []:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--extra-tests {folder} is not a folder; pass a folder of test_*.py files")
        extra.append(Path(folder).resolve())
    reference_for = chapter_ids(use_reference_for)
    chosen = [t for t in default_tasks(impl, patterns) if t.chapter not in reference_for]
    if not chosen:
        raise ValueError(f"nothing to grade: every selected task is in {', '.join(reference_for)}, which "
                         "--use-reference-for takes from the reference")

    box = prepare(impl, tests, extra)
    try:
        problems = put_reference(box.work, reference_for)
        broken, more = repair_imports(box, python, max(timeout, 120.0))
        problems += more
        broken_tasks = tasks_in(impl, list(broken))
        zero = [t.id for t in chosen if t.id in broken_tasks]
        proxied = [t for t in TASKS if TASKS[t].chapter not in reference_for]
        results, more = run_tests(box, [t.id for t in chosen], proxied, set(zero), timeout)
        problems += more
    finally:
        if not keep:
            shutil.rmtree(box.work.parent, ignore_errors=True)
    grades = []
    for task in chosen:
        tests_of = [classify(r) for r in results.values() if r.task == task.id]
        file = broken_tasks.get(task.id)
        grades.append(grade_task(task, tests_of, file, broken.get(file, "")))
    return GradeReport(impl, tests, grades, reference_for, problems, box.level)


