"""Running the task tests for `minildm grade`: the trusted pytest process, watched, and its log read.

pytest runs in the grader's trusted folder, on the reference package, with the grade plugin (plugin.py: selects the
tests, logs each outcome as a JSON line) and trusted.py (swaps a proxy in for every graded function; the student's
code runs in the worker it starts). A hanging or crashing student call is the proxy's to stop: that test fails with
CallTimedOut or WorkerGone, and the task's later calls fail at once (report.classify names them "timed out",
"crashed", "not run"), so one hang costs one timeout per task. The grader still watches the log: a test that runs far
past the timeout (a hang in the grader's own process) is killed with its process, and the tests after it run in a
fresh one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from minildm.grading.isolation import Sandbox
from minildm.grading.report import TestResult
from minildm.grading.scratch import kill
from minildm.grading.trusted import PACKAGE_ROOT

MAX_MESSAGE = 600                     # as plugin.MAX_MESSAGE: what one test may say in the report
STARTUP = 120.0                       # seconds for the worker to start and import the student's package


def trusted_pytest(box: Sandbox, proxied: list[str], argv: list[str], name: str, timeout: float,
                   out) -> subprocess.Popen:
    """Start pytest in the trusted folder, on the reference package, with the proxies of trusted.py."""
    plan = {"trusted": str(box.trusted), "work": str(box.work), "level": box.level,
            "user": list(box.user) if box.user else None, "timeout": timeout, "startup": max(timeout, STARTUP),
            "tasks": proxied}
    plan_file = box.trusted / f"proxy-{name}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "minildm.grading.plugin", "-p", "minildm.grading.trusted",
               "--grade-proxy", str(plan_file), *argv]
    return subprocess.Popen(command, cwd=box.trusted, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_tests(box: Sandbox, task_ids: list[str], proxied: list[str], zero: set[str],
              timeout: float) -> tuple[dict, list]:
    """Run the selected tests, restarting after a hang; returns ({nodeid: TestResult}, problems). `proxied`: the
    tasks whose functions are the student's (the others: --use-reference-for)."""
    results: dict[str, TestResult] = {}
    problems: list[str] = []
    stopped: dict[str, str] = {}          # task -> "timed out" or "crashed": its other tests are not run
    targets = ["tests"]
    for attempt in range(100):
        log = box.trusted / "out" / f"grade-{attempt}.jsonl"
        argv = ["--grade-log", str(log), "--grade-package", str(PACKAGE_ROOT), "--grade-tasks", ",".join(task_ids),
                "--grade-zero", ",".join(zero), *targets]
        with open(box.trusted / f"pytest-{attempt}.out", "w") as out:
            proc = trusted_pytest(box, proxied, argv, str(attempt), timeout, out)
            running, killed = watch(proc, log, 2 * timeout + STARTUP)
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
            r.message = (f"still running after {2 * timeout + STARTUP:g} s; stopped" if killed else
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


EVENT_FIELDS = {"event": str, "nodeid": str, "task": str, "points": (int, float), "outcome": str,
                "message": (str, type(None)), "exception": (str, type(None))}


def parse_event(line: str) -> dict | None:
    """One log line, or None if it is not a well-formed event (a malformed line, as a killed process's last one,
    must not stop the grader). Messages are cut to the plugin's length."""
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


