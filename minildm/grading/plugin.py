"""The pytest side of `minildm grade`: select the tests of the chosen tasks and log every outcome as it happens.

The grader's trusted pytest process loads it with `-p minildm.grading.plugin` (runner.py). It imports nothing from
minildm, so it also works in a plain pytest run of the task tests. It writes one JSON line per event to
--grade-log, flushed at once, so that when a test hangs or kills the interpreter the grader still knows which test
it was and what the others did:

    {"event": "collected", "nodeid": ..., "task": "ch02.gaussian_kl", "points": 2.0}
    {"event": "start", "nodeid": ...}
    {"event": "result", "nodeid": ..., "outcome": "passed" | "failed" | "skipped", "exception": ..., "message": ...}

A hang in the student's code is the proxy's to stop (proxy.py); the grader also watches the log from outside.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MAX_MESSAGE = 600
_phases: dict[str, list] = {}     # nodeid -> (phase, outcome, exception, message) so far
_config = None                     # the pytest config, for hooks that do not receive it


def pytest_addoption(parser):
    group = parser.getgroup("minildm-grade")
    group.addoption("--grade-log", default=None, help="append JSON lines here (set by `minildm grade`)")
    group.addoption("--grade-tasks", default="", help="comma-separated task ids to run; others are deselected")
    group.addoption("--grade-zero", default="", help="task ids to collect (for their points) but not run")
    group.addoption("--grade-package", default=None, help="the folder the graded minildm must be imported from")


def _log(config, **event) -> None:
    path = config.getoption("--grade-log")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


def _ids(config, name: str) -> set[str]:
    return set(filter(None, config.getoption(name).split(",")))


def pytest_sessionstart(session):
    """Refuse to grade anything but the copy we were asked to grade (an installed minildm must not sneak in)."""
    folder = session.config.getoption("--grade-package")
    if not folder:
        return
    try:
        import minildm
    except BaseException as err:                                  # noqa: BLE001 - report whatever it was
        _log(session.config, event="fatal", message=f"import minildm failed: {type(err).__name__}: {err}")
        pytest.exit("import minildm failed", returncode=3)
    where = Path(minildm.__file__).resolve().parent.parent
    if where != Path(folder).resolve():
        _log(session.config, event="fatal", message=f"minildm was imported from {where}, not from {folder}")
        pytest.exit("wrong minildm", returncode=3)


def _marker_arg(item, name: str):
    marker = item.get_closest_marker(name)
    return marker.args[0] if marker is not None and marker.args else None


def pytest_collection_modifyitems(session, config, items):
    wanted, zero = _ids(config, "--grade-tasks"), _ids(config, "--grade-zero")
    keep, drop = [], []
    cases: dict[str, int] = {}                     # a parametrized test's points are shared by its cases
    for item in items:
        cases[item.nodeid.split("[")[0]] = cases.get(item.nodeid.split("[")[0], 0) + 1
    for item in items:
        task = _marker_arg(item, "task")
        if task is None:
            _log(config, event="ignored", nodeid=item.nodeid, reason="no @pytest.mark.task(...) marker")
            drop.append(item)
            continue
        if wanted and task not in wanted:
            drop.append(item)
            continue
        points = _marker_arg(item, "points")
        points = (1 if points is None else points) / cases[item.nodeid.split("[")[0]]
        _log(config, event="collected", nodeid=item.nodeid, task=task, points=points)
        (drop if task in zero else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_collectreport(report):
    if report.failed:
        message = str(report.longrepr).strip().splitlines()
        _log(_config, event="collect_error", nodeid=report.nodeid, message=" | ".join(message[-3:])[:MAX_MESSAGE])


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logstart(nodeid, location):
    _log(_config, event="start", nodeid=nodeid)


def _short(text: str) -> str:
    """The exception's own message, without pytest's assertion introspection (which would show the test's code)."""
    lines = []
    for line in text.splitlines():
        if line.startswith(("assert ", "where ", "+  where", " +  where")):
            break
        lines.append(line)
    text = " ".join(line.strip() for line in lines if line.strip())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " ..."


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    phases = _phases.setdefault(item.nodeid, [])
    exception = message = None
    if call.excinfo is not None:
        exception = call.excinfo.type.__name__
        message = str(call.excinfo.value) if report.failed else str(getattr(call.excinfo.value, "msg", ""))
    phases.append((report.when, report.outcome, exception, _short(message or "")))


def pytest_runtest_logfinish(nodeid, location):
    phases = _phases.pop(nodeid, [])
    failed = [p for p in phases if p[1] == "failed"]
    skipped = [p for p in phases if p[1] == "skipped"]
    if failed:
        when, _, exception, message = failed[0]
        outcome = "failed"
        if when != "call":
            message = f"(in test {when}) {message}"
    elif skipped:
        _, _, exception, message = skipped[0]
        outcome = "skipped"
    else:
        outcome, exception, message = "passed", None, ""
    _log(_config, event="result", nodeid=nodeid, outcome=outcome, exception=exception, message=message)

