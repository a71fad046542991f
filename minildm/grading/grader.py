"""`minildm grade`: run the task tests against a student's copy and report points, per task, with hints.

The student's files are never touched and never trusted. The grader works in a scratch folder, work/ (the
grader's own plans sit beside it, in trusted/):

    minildm/                      a copy of the student's package, with
                                  - the reference put into the regions of chapters given to --use-reference-for,
                                  - the reference file in place of any file that does not import (its tasks get 0)
    tests/tasks/                  the task tests of *this* installation (not the student's copy of them)
    tests/extra_N/                an instructor's hidden tests (--extra-tests)
    minildm_grade_plugin.py       grading/plugin.py: selects the tests, logs each outcome as a JSON line
    out/                          the one folder the worker may write: the logs

pytest runs there in a worker process, isolated as far as the machine allows (isolation.py: namespaces, a user id
of its own, resource limits; the report names the level). The grader reads the log as it grows: a test that runs
longer than the timeout is killed with its process, marked "timed out", and the tests after it run in a fresh
process, so a hanging exercise fails only its own test; the other tests of its task are not run (one hang costs
one timeout per task, not one per test; a crash likewise). A test's points count when it passes; a task whose tests
all stop at its own NotImplementedError is "not started".
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minildm.grading.isolation import DESCRIPTIONS, WARNINGS, Sandbox, available_level
from minildm.grading.regions import (
    RegionError,
    find_regions,
    replace_regions,
    solution_lines,
)
from minildm.grading.tasks import TASKS, Task, chapter_ids, select
from minildm.grading.workbook import IGNORED, MANIFEST
from minildm.quotes import REPO_ROOT
from minildm.saving import read_json

HERE = Path(__file__).resolve().parent
PLUGIN = "minildm_grade_plugin"
MAX_MESSAGE = 600                     # as plugin.MAX_MESSAGE: what one test may say in the report
IMPORT_CHECK = "minildm_grade_importcheck"
WORKER, CODEC = "minildm_grade_worker", "minildm_grade_codec"      # issue 18, step 2 (worker.py, codec.py)
PYTEST_INI = """[pytest]
addopts = --strict-markers -p no:cacheprovider
markers =
    task(id): the exercise this test grades, e.g. ch02.gaussian_kl
    points(n): what passing this test earns (default 1), shared by its parametrized cases
    slow: takes more than a few seconds
    oracle: compares against diffusers
"""


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
                          "warning": WARNINGS[self.isolation]},
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

        lines = [f"Graded: {self.impl}", f"Tests:  {self.tests_from}", f"Isolation: {DESCRIPTIONS[self.isolation]}"]
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


# ------------------------------------------------------------------------------------------ what to grade


def find_workbook(start: Path) -> Path | None:
    """The workbook folder holding `start` (a folder with the build's manifest), if any."""
    for folder in [start, *start.parents]:
        if (folder / MANIFEST).is_file():
            return folder
    return None


def resolve_impl(impl: str | Path | None) -> Path:
    """--impl, else the workbook the current folder is in, else the reference package itself."""
    if impl is None:
        return find_workbook(Path.cwd().resolve()) or REPO_ROOT
    folder = Path(impl).resolve()
    if not (folder / "minildm" / "__init__.py").is_file():
        raise FileNotFoundError(f"--impl {impl} holds no minildm/__init__.py; pass the folder that "
                                "`minildm workbook build` wrote (the one with minildm/, tests/ and WORKBOOK.md)")
    return folder


def default_tasks(impl: Path, patterns: list[str] | None) -> list[Task]:
    if patterns:
        return select(patterns)
    manifest = impl / MANIFEST
    if manifest.is_file():
        ids = [i for i in read_json(manifest).get("tasks", []) if i in TASKS]
        return select(ids) if ids else select(None)
    return select(None)


# ------------------------------------------------------------------------------------ the scratch folder


def put_reference(sandbox: Path, chapters: list[str]) -> list[str]:
    """Copy the reference's solution regions of these chapters into the sandbox's package; returns problems."""
    problems = []
    by_file: dict[str, list] = {}
    for file in sorted((REPO_ROOT / "minildm").rglob("*.py")):
        path = file.relative_to(REPO_ROOT).as_posix()
        ref_text = file.read_text(encoding="utf-8")
        for region in find_regions(ref_text, path):
            if TASKS.get(region.task) and TASKS[region.task].chapter in chapters:
                by_file.setdefault(path, []).append((region, solution_lines(ref_text, region)))
    for path, wanted in by_file.items():
        target = sandbox / path
        try:
            text = target.read_text(encoding="utf-8")
            theirs = find_regions(text, path)
        except (OSError, RegionError) as err:
            problems.append(f"could not put the reference into {path}: {err}")
            continue
        replacements = {}
        for ref_region, lines in wanted:
            same = [r for r in theirs if r.task == ref_region.task]
            mine = [r for r in (w[0] for w in wanted) if r.task == ref_region.task]
            if len(same) != len(mine):
                problems.append(f"{path}: the BEGIN/END SOLUTION markers of {ref_region.task} are missing or "
                                "changed, so its reference could not be put in; restore them from a fresh workbook")
                continue
            replacements[same[mine.index(ref_region)]] = lines
        target.write_text(replace_regions(text, replacements), encoding="utf-8")
    return problems


def differing_modules(sandbox: Path) -> list[str]:
    """Modules of the sandbox's package whose file is not byte-identical to the reference's."""
    names = []
    for file in sorted((sandbox / "minildm").rglob("*.py")):
        rel = file.relative_to(sandbox)
        ref = REPO_ROOT / rel
        if file.name == "__main__.py" or (ref.is_file() and ref.read_bytes() == file.read_bytes()):
            continue
        parts = list(rel.with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def repair_imports(box: Sandbox, python: str, timeout: float) -> tuple[dict[str, str], list[str]]:
    """Put the reference file in place of each file that stops the package from importing.

    Returns {relative file: what is wrong with it (file:line: error)} and problems that could not be repaired.
    """
    broken: dict[str, str] = {}
    sandbox = box.work
    for attempt in range(10):
        modules = ["minildm", *differing_modules(sandbox)]
        output = box.trusted / f"importcheck-{attempt}.out"
        with open(output, "w") as out:
            proc = start(box, [python, f"{IMPORT_CHECK}.py", *modules], f"importcheck-{attempt}", out)
            try:
                proc.wait(timeout)
                found = json.loads(output.read_text(errors="replace").strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                kill(proc)
                slow = f"importing it took more than {timeout:g} s"
                found = {m: {"file": None, "line": 0, "error": slow} for m in modules}
            except (json.JSONDecodeError, IndexError):
                return broken, [f"the import check failed: {output.read_text(errors='replace').strip()[-500:]}"]
        if not isinstance(found, dict) or set(found) != set(modules):
            return broken, ["the import check gave an answer that is not one entry per module"]
        failures = [f for f in found.values() if f]
        if not failures:
            return broken, []
        fixed_one = False
        for failure in failures:
            rel = failure["file"]
            if rel is None:          # a hang or an error we cannot place: every file that differs is suspect
                for module in differing_modules(sandbox):
                    fixed_one |= restore(sandbox, module_file(sandbox, module), failure["error"], broken)
            elif rel not in broken:
                fixed_one |= restore(sandbox, rel, f"{rel}:{failure['line']}: {failure['error']}", broken)
        if not fixed_one:
            return broken, [f"the package does not import: {failures[0]['error']}"]
    return broken, ["the package still does not import after putting back 10 reference files"]


def module_file(sandbox: Path, module: str) -> str:
    path = Path(*module.split("."))
    return (path / "__init__.py" if (sandbox / path).is_dir() else path.with_suffix(".py")).as_posix()


def restore(sandbox: Path, rel: str, why: str, broken: dict[str, str]) -> bool:
    ref = REPO_ROOT / rel
    if not rel.startswith("minildm/") or not ref.is_file() or rel in broken:
        return False
    shutil.copy2(ref, sandbox / rel)
    broken[rel] = why
    return True


def tasks_in(impl: Path, files: list[str]) -> dict[str, str]:
    """Task id -> file, for the regions of these files (the student's markers if readable, else the reference's)."""
    found = {}
    for rel in files:
        for root in (impl, REPO_ROOT):
            try:
                regions = find_regions((root / rel).read_text(encoding="utf-8"), rel)
            except (OSError, RegionError, UnicodeDecodeError):
                continue
            found.update({r.task: rel for r in regions})
            break
    return found


def copy_worker(folder: Path) -> Path:
    """Put the step-2 worker and its codec into `folder` under names a student's package cannot shadow; returns the
    worker's script."""
    shutil.copy2(HERE / "codec.py", folder / f"{CODEC}.py")
    shutil.copy2(HERE / "worker.py", folder / f"{WORKER}.py")
    return folder / f"{WORKER}.py"


def start(box: Sandbox, argv: list[str], name: str, out) -> subprocess.Popen:
    """Start `argv` in the worker (see isolation.py), its output to the open file `out`."""
    box.seal()
    command, env, preexec = box.command(argv, name)
    return subprocess.Popen(command, cwd=box.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec)


def prepare(impl: Path, tests: Path, extra: list[Path]) -> Sandbox:
    top = Path(tempfile.mkdtemp(prefix="minildm-grade-"))
    box = Sandbox(top / "trusted", top / "work", available_level())
    box.trusted.mkdir(mode=0o700)
    sandbox = box.work
    shutil.copytree(impl / "minildm", sandbox / "minildm", ignore=IGNORED)
    shutil.copytree(tests, sandbox / "tests" / "tasks", ignore=IGNORED)
    for n, folder in enumerate(extra, 1):
        shutil.copytree(folder, sandbox / "tests" / f"extra_{n}", ignore=IGNORED)
    shutil.copy2(HERE / "plugin.py", sandbox / f"{PLUGIN}.py")
    shutil.copy2(HERE / "importcheck.py", sandbox / f"{IMPORT_CHECK}.py")
    (sandbox / "pytest.ini").write_text(PYTEST_INI)
    return box


# ---------------------------------------------------------------------------------------- running pytest


def run_tests(box: Sandbox, task_ids: list[str], zero: set[str], python: str, timeout: float) -> tuple[dict, list]:
    """Run the selected tests, restarting after a hang or a crash; returns ({nodeid: TestResult}, problems).

    After a test times out or kills the worker, the other tests of its task are not run (0 points): one hang
    costs one timeout per task, not one per test."""
    results: dict[str, TestResult] = {}
    problems: list[str] = []
    stopped: dict[str, str] = {}          # task -> "timed out" or "crashed": its other tests are not run
    targets = ["tests"]
    for attempt in range(100):
        log = box.out / f"grade-{attempt}.jsonl"
        cmd = [python, "-m", "pytest", "-q", "-p", PLUGIN, "--grade-log", f"{box.root}/out/{log.name}",
               "--grade-package", box.root, "--grade-tasks", ",".join(task_ids), "--grade-zero", ",".join(zero),
               *targets]
        with open(box.trusted / f"pytest-{attempt}.out", "w") as out:
            proc = start(box, cmd, f"pytest-{attempt}", out)
            running, killed = watch(proc, log, timeout)
        events = read_log(log)
        for e in events:
            if e["event"] == "collected" and e["nodeid"] not in results:
                results[e["nodeid"]] = TestResult(e["nodeid"], e["task"], float(e["points"]))
            elif e["event"] == "result" and e["nodeid"] in results:
                r = results[e["nodeid"]]
                r.outcome, r.message, r.exception = e["outcome"], e.get("message") or "", e.get("exception")
            elif e["event"] in ("fatal", "collect_error"):
                problems.append(f"{e.get('nodeid', 'pytest')}: {e.get('message', '')}")
        if running is not None and running in results:
            r = results[running]
            r.outcome = "timed out" if killed else "crashed"
            r.message = (f"still running after {timeout:g} s; stopped (an endless loop?)" if killed else
                         f"the test process died (exit code {proc.returncode}) during this test")
            stopped[r.task] = r.outcome
        if any(e["event"] == "fatal" for e in events):
            break
        if not results:
            output = (box.trusted / f"pytest-{attempt}.out").read_text(errors="replace").strip().splitlines()
            problems.append("pytest ran no task test: " + " | ".join(output[-5:]))
            break
        for r in results.values():
            if r.outcome == "not run" and r.task in stopped:
                r.message = f"not run: an earlier test of this task {stopped[r.task]}"
        remaining = [n for n, r in results.items() if r.outcome == "not run" and r.task not in zero | set(stopped)]
        if not remaining or running is None:
            break
        targets = remaining
    return results, problems


def watch(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[str | None, bool]:
    """Wait for pytest; kill it when one test runs past the timeout. Returns (the test running at the end, killed)."""
    running, since, offset = None, time.monotonic(), 0
    while True:
        done = proc.poll() is not None
        if log.exists():
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for event in map(parse_event, complete.decode("utf-8", errors="replace").splitlines()):
                if event is None:
                    continue
                if event["event"] == "start":
                    running, since = event["nodeid"], time.monotonic()
                elif event["event"] == "result" and event["nodeid"] == running:
                    running = None
        if done:
            return running, False
        if running is not None and time.monotonic() - since > timeout:
            kill(proc)
            return running, True
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """Kill the worker: its direct children first (pid 1 of its PID namespace takes every process in it along,
    even one that left the process group), then its process group."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


EVENT_FIELDS = {"event": str, "nodeid": str, "task": str, "points": (int, float), "outcome": str,
                "message": (str, type(None)), "exception": (str, type(None))}


def parse_event(line: str) -> dict | None:
    """One log line, or None if it is not a well-formed event (the log is written by the worker: never trusted
    to be valid; a malformed line must not stop the grader). Messages are cut to the plugin's length."""
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    if any(not isinstance(event[k], kind) for k, kind in EVENT_FIELDS.items() if k in event):
        return None
    if event["event"] in ("collected", "start", "result") and "nodeid" not in event:
        return None
    if event["event"] == "collected" and ("task" not in event or "points" not in event):
        return None
    if event["event"] == "result" and "outcome" not in event:
        return None
    for key in ("message", "exception"):
        if isinstance(event.get(key), str):
            event[key] = event[key][:MAX_MESSAGE]
    return event


def read_log(log: Path) -> list[dict]:
    if not log.exists():
        return []
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return [e for e in map(parse_event, lines) if e is not None]   # a killed process's last line may be cut


# ------------------------------------------------------------------------------------------------ scoring


def classify(result: TestResult) -> TestResult:
    """Name the failure a student needs to know about: their own stub, or another task's stub they depend on."""
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
        results, more = run_tests(box, [t.id for t in chosen], set(zero), python, timeout)
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
