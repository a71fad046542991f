"""What `minildm grade` reports: per test, per task (points, status, hints), and the whole grade with its isolation.

The report is built from the trusted side's log alone (runner.py); `table()` is what a student reads, `to_json()`
what grade.json holds, including the isolation level the worker ran at (isolation.py) and where the tests ran.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minildm.grading.isolation import DESCRIPTIONS, WARNINGS
from minildm.grading.tasks import TASKS, Task

TESTS_RUN = ("in the grader's own process, on the reference package; the student's code ran only in the worker, "
             "through a proxy for each graded function")


@dataclass
class TestResult:
    nodeid: str
    task: str
    points: float
    outcome: str = "not run"     # passed, failed, not started, needs <task>, timed out, crashed, skipped, not run
    message: str = ""
    exception: str | None = None  # the exception's class name, when it failed

    @property
    def name(self) -> str:
        return self.nodeid.split("::", 1)[-1]


@dataclass
class TaskGrade:
    task: Task
    status: str                  # passed, partial, failed, not started, needs <task>, does not import
    earned: float
    possible: float
    tests: list[TestResult] = field(default_factory=list)
    note: str = ""


@dataclass
class GradeReport:
    impl: Path
    tests_from: Path
    grades: list[TaskGrade]
    reference_for: list[str]
    problems: list[str]
    isolation: str = "none"      # a key of isolation.DESCRIPTIONS

    @property
    def earned(self) -> float:
        return sum(g.earned for g in self.grades)

    @property
    def possible(self) -> float:
        return sum(g.possible for g in self.grades)

    def to_json(self) -> dict:
        return {
            "score": self.earned, "max_score": self.possible,
            "graded": str(self.impl), "tests": str(self.tests_from),
            "use_reference_for": self.reference_for, "problems": self.problems,
            "isolation": {"level": self.isolation, "description": DESCRIPTIONS[self.isolation],
                          "warning": WARNINGS[self.isolation], "tests_ran": TESTS_RUN},
            "tasks": [{"task": g.task.id, "title": g.task.title, "status": g.status, "points": g.earned,
                       "max_points": g.possible, "note": g.note,
                       "hint": "" if g.status == "passed" else g.task.message(),
                       "tests": [asdict(t) for t in g.tests]} for g in self.grades],
        }

    def table(self, width: int = 110) -> str:
        """The report a student reads: one row per task, then what failed and the hint for each unfinished one."""
        col = max([len(g.task.id) for g in self.grades] + [4])
        indent = " " * (col + 4)

        def wrapped(text: str) -> list[str]:
            return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ")

        lines = [f"Graded: {self.impl}", f"Tests:  {self.tests_from}", f"Isolation: {DESCRIPTIONS[self.isolation]}",
                 f"The tests ran {TESTS_RUN}"]
        if WARNINGS[self.isolation]:
            lines.append(f"WARNING: {WARNINGS[self.isolation]}")
        if self.reference_for:
            lines.append(f"Using the reference for: {', '.join(self.reference_for)} (not graded)")
        lines += [f"problem: {p}" for p in self.problems]
        lines += ["", f"{'task':<{col}}  {'status':<16} points"]
        for g in self.grades:
            lines.append(f"{g.task.id:<{col}}  {g.status:<16} {fmt(g.earned)}/{fmt(g.possible)}")
            if g.note:
                lines += wrapped(g.note)
            for t in g.tests:
                if t.outcome not in ("passed", "not started") and g.status not in ("not started", "does not import"):
                    lines += wrapped(f"{t.outcome}: {t.name}" + (f": {t.message}" if t.message else ""))
            if g.status != "passed":
                lines += wrapped(f"hint: {g.task.message()}")
        lines += ["", f"Score {fmt(self.earned)}/{fmt(self.possible)}"]
        return "\n".join(lines)


def fmt(x: float) -> str:
    return f"{round(x, 2):g}"


# ------------------------------------------------------------------------------------------------ scoring


STOPPED = {"CallTimedOut": "timed out", "WorkerGone": "crashed", "TaskStopped": "not run"}   # proxy.py's


def classify(result: TestResult) -> TestResult:
    """Name the failure a student needs to know about: their own stub, another task's stub they depend on, or a
    call the proxy stopped (a hang, a crash, or a task already stopped)."""
    if result.outcome == "failed" and result.exception in STOPPED:
        result.outcome = STOPPED[result.exception]
    if result.outcome == "failed" and result.exception == "NotImplementedError":
        owner = result.message.split(":", 1)[0].strip()
        if owner == result.task:
            result.outcome, result.message = "not started", ""
        elif owner in TASKS:
            result.outcome = f"needs {owner}"
            result.message = f"this test calls {owner}, which is not done yet (or grade with --use-reference-for " \
                             f"{TASKS[owner].chapter})"
    return result


def grade_task(task: Task, tests: list[TestResult], broken_file: str | None, why: str) -> TaskGrade:
    counted = [t for t in tests if t.outcome != "skipped"]
    possible = sum(t.points for t in counted)
    if broken_file:
        return TaskGrade(task, "does not import", 0.0, possible, tests, f"{why} (0 points; the rest was graded)")
    if not tests:
        return TaskGrade(task, "no tests", 0.0, 0.0, tests, "no test carries @pytest.mark.task for this task")
    earned = sum(t.points for t in counted if t.outcome == "passed")
    outcomes = {t.outcome for t in counted}
    if outcomes == {"passed"}:
        status = "passed"
    elif outcomes == {"not started"}:
        status = "not started"
    elif "passed" in outcomes:
        status = "partial"
    elif len(outcomes) == 1 and next(iter(outcomes)).startswith("needs "):
        status = next(iter(outcomes))
    else:
        status = "failed"
    skipped = len(tests) - len(counted)
    return TaskGrade(task, status, earned, possible, tests, f"{skipped} skipped test(s) not counted" if skipped else "")


def check_report_path(path: Path) -> None:
    """grade.json may replace an earlier grade report, never anything else (a FileExistsError says so)."""
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and {"score", "max_score", "tasks"} <= set(earlier)):
            raise FileExistsError(f"{path} exists and is not a grade report; pass --report with another file name")


def write_report(report: GradeReport, path: Path) -> None:
    check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
