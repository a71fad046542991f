"""A student who wants marks without the work: each attack is planted in a task's solution region of a built
workbook and graded end to end. It must score 0 on its own task, leave the other tasks' scores and the
reference's files as they were, and leak no reference or hidden-test text into the report.

Several attacks share one grading run (each in its own task, with solved tasks beside them as controls), so the
suite grades a few times, not once per attack.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from test_grading import copy_of, reference_solution, workbook, write_solution  # noqa: F401 - workbook: a fixture

from minildm.grading import grader, plugin
from minildm.grading.isolation import available_level

ROOT = Path(__file__).resolve().parent.parent
SOLVED = ["ch01.twonn", "ch02.reparameterize"]            # the controls: full marks whatever the attacks do
SECRET_LINE = "the hidden test's own secret line 7f3a"


def fingerprint(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for file in sorted(folder.rglob("*.py")):
            if "__pycache__" not in file.parts:
                digest.update(file.as_posix().encode() + file.read_bytes())
    return digest.hexdigest()


def reference_lines(task: str) -> list[str]:
    return [line.strip() for line in reference_solution(task).splitlines() if len(line.strip()) > 12]


def attacked(workbook_folder: Path, tmp_path: Path, attacks: dict[str, str]) -> Path:
    student = copy_of(workbook_folder, tmp_path)
    for task in SOLVED:
        write_solution(student, task, reference_solution(task))
    for task, code in attacks.items():
        write_solution(student, task, code)
    return student


def check(report, attacks: dict[str, str], before: str) -> None:
    """The attacked tasks score 0, the controls full marks, the reference is untouched, and nothing leaks."""
    by_id = {g.task.id: g for g in report.grades}
    for task in attacks:
        assert by_id[task].earned == 0 and by_id[task].possible > 0, (task, by_id[task].status, by_id[task].tests)
    for task in SOLVED:
        assert by_id[task].status == "passed", (task, [(t.name, t.outcome, t.message) for t in by_id[task].tests])
    assert fingerprint(ROOT / "minildm", ROOT / "tests") == before
    said = [t.message for g in report.grades for t in g.tests] + report.problems + [g.note for g in report.grades]
    text = "\n".join(said)                                   # what student code could put into the report
    for task in by_id:
        for line in reference_lines(task):
            assert line not in text, (task, line)
    assert SECRET_LINE not in text


READ_THE_REFERENCE = f'''
import importlib.metadata, pathlib
found = []
for file in importlib.metadata.distribution("minildm").files or []:
    try:
        found.append(file.locate().read_text())                     # direct_url.json, the editable finder
    except Exception:
        pass
for path in [{str(ROOT / "minildm" / "autoencoder.py")!r}, {str(ROOT / "tests" / "tasks" / "taskcheck.py")!r}]:
    try:
        found.append(pathlib.Path(path).read_text())
    except Exception:
        pass
raise ValueError("\\n".join(found)[:300] or "nothing found")
'''

DELETE_THE_TESTS = '''
import pathlib, minildm
here = pathlib.Path(minildm.__file__).parent.parent
for file in list(here.rglob("test_ch02_tasks.py")) + list(here.rglob("taskcheck.py")):
    try:
        file.write_text("")
    except Exception:
        pass
    try:
        file.unlink()
    except Exception:
        pass
raise NotImplementedError("ch02.psnr: gave up")
'''

WRITE_OUTSIDE = f'''
import pathlib
for path in [{str(ROOT / "minildm" / "planted.py")!r}, {str(ROOT / "planted.txt")!r}, "/planted.txt",
             "/var/tmp/planted.txt", str(pathlib.Path.home() / "planted.txt"), "STUDENT/planted.txt",
             "STUDENT/minildm/metrics.py"]:
    try:
        pathlib.Path(path).write_text("planted")
    except Exception:
        pass
raise NotImplementedError("ch02.gaussian_kl: gave up")
'''

ALLOCATE = '''
big = torch.empty(10**13, dtype=torch.uint8)
return z0 + big[0]
'''

EXIT = '''
import os
os._exit(0)
'''


@pytest.mark.slow
def test_reading_deleting_writing_allocating_and_exiting_score_zero_and_change_nothing(workbook, tmp_path):  # noqa: F811
    if available_level() == "none":
        pytest.skip("this machine allows no isolation (neither root nor user namespaces): the report warns instead")
    attacks = {"ch01.latent_shape": READ_THE_REFERENCE, "ch02.psnr": DELETE_THE_TESTS,
               "ch02.gaussian_kl": WRITE_OUTSIDE.replace("STUDENT", str(tmp_path / "student")),
               "ch03.q_sample": ALLOCATE, "ch03.eps_to_z0": EXIT}
    before = fingerprint(ROOT / "minildm", ROOT / "tests")
    student = attacked(workbook, tmp_path, attacks)
    started = time.monotonic()
    report = grader.grade(student, ["ch01", "ch02.psnr", "ch02.gaussian_kl", "ch02.reparameterize", "ch03"])
    print(f"graded 5 attacks in {time.monotonic() - started:.1f} s at isolation {report.isolation}")
    check(report, attacks, before)
    shape = {g.task.id: g for g in report.grades}["ch01.latent_shape"]
    messages = [t.message for t in shape.tests]
    assert "nothing found" in messages and not any("def " in m or "import" in m for m in messages), messages
    assert not (ROOT / "minildm" / "planted.py").exists() and not (ROOT / "planted.txt").exists()
    assert not Path("/planted.txt").exists() and not Path("/var/tmp/planted.txt").exists()
    assert not (student / "planted.txt").exists() and "planted" not in (student / "minildm" / "metrics.py").read_text()
    psnr = {g.task.id: g for g in report.grades}["ch02.psnr"]
    assert psnr.possible == grader.grade(ROOT, ["ch02.psnr"]).possible        # no test went missing


DAEMON = '''
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", "1001.25"])
    os._exit(0)
time.sleep(0.5)
raise NotImplementedError("ch02.gaussian_kl: gave up")
'''

LOOP = '''
while True:
    pass
'''

FORK_BOMB = '''
import os, time
for _ in range(2000):
    try:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    except OSError:
        break
raise NotImplementedError("ch02.psnr: gave up")
'''


def sleepers() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"1001.25" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_daemon_a_fork_bomb_and_an_endless_loop_are_ended_and_cost_one_timeout(workbook, tmp_path):  # noqa: F811
    if available_level() == "none":
        pytest.skip("ending a detached daemon needs a PID namespace (root or user namespaces)")
    attacks = {"ch01.latent_shape": LOOP, "ch02.gaussian_kl": DAEMON, "ch02.psnr": FORK_BOMB}
    before = fingerprint(ROOT / "minildm", ROOT / "tests")
    student = attacked(workbook, tmp_path, attacks)
    started = time.monotonic()
    report = grader.grade(student, ["ch01", "ch02.gaussian_kl", "ch02.psnr", "ch02.reparameterize"], timeout=3)
    took = time.monotonic() - started
    print(f"graded 3 attacks in {took:.1f} s")
    grade_json = tmp_path / "grade.json"
    grader.write_report(report, grade_json)
    written = grade_json.read_text()
    check(report, attacks, before)
    shape = {g.task.id: g for g in report.grades}["ch01.latent_shape"]
    assert [t.outcome for t in shape.tests].count("timed out") == 1, [(t.name, t.outcome) for t in shape.tests]
    assert all(t.outcome == "not run" for t in shape.tests if t.outcome != "timed out")
    time.sleep(1.5)
    assert sleepers() == [] and grade_json.read_text() == written


MONKEYPATCH_PYTEST = '''
import _pytest.python
_pytest.python.Function.runtest = lambda self: None
raise NotImplementedError("ch01.latent_shape: gave up")
'''

READ_HIDDEN = '''
import pathlib
found = [p.read_text() for p in pathlib.Path("/").glob("tmp/**/test_secret*.py")]
found += [p.read_text() for p in pathlib.Path.cwd().rglob("test_secret*.py")]
raise ValueError("\\n".join(found)[-3000:] or "nothing found")
'''


FORGE_A_VALUE_ERROR = '''
import dataclasses
schedule = sampler.schedule
fake = type(schedule).__new__(type(schedule))          # a result whose constructor raises ValueError in the grader
for f in dataclasses.fields(schedule):
    object.__setattr__(fake, f.name, getattr(schedule, f.name))
object.__setattr__(fake, "num_timesteps", 1)
return fake
'''


@pytest.mark.slow
def test_monkeypatching_pytest_reading_hidden_tests_or_forging_an_error_scores_zero(workbook, tmp_path):  # noqa: F811
    if available_level() == "none":
        pytest.skip("without namespaces the worker can read the grader's folder: the report warns instead")
    attacks = {"ch01.latent_shape": MONKEYPATCH_PYTEST, "ch02.psnr": READ_HIDDEN,
               "ch08.img2img_start": FORGE_A_VALUE_ERROR}
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "test_secret.py").write_text(f'''import pytest
import torch
from minildm.metrics import psnr

@pytest.mark.task("ch02.psnr")
def test_secret():
    """{SECRET_LINE}"""
    assert psnr(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).shape == (1,)
''')
    before = fingerprint(ROOT / "minildm", ROOT / "tests")
    student = attacked(workbook, tmp_path, attacks)
    report = grader.grade(student, ["ch01", "ch02.psnr", "ch02.reparameterize", "ch08.img2img_start"],
                          extra_tests=[str(hidden)])
    check(report, attacks, before)


@pytest.mark.parametrize("level", ["root", "userns", "none"])
def test_the_report_and_grade_json_name_the_isolation_level_and_warn_when_it_is_weaker(level):
    report = grader.GradeReport(ROOT, ROOT / "tests" / "tasks", [], [], [], level)
    data = report.to_json()["isolation"]
    assert data["level"] == level and data["description"] in report.table()
    assert "grader's own process" in data["tests_ran"] and data["tests_ran"] in report.table()
    assert (data["warning"] == "") == (level == "root")
    assert ("WARNING: NO ISOLATION" in report.table()) == (level == "none")


def test_this_machine_offers_namespaces_when_run_as_root():
    if os.geteuid() == 0:                                 # CI: the attacks above are only stopped with namespaces
        assert available_level() == "root", "running as root, but `unshare --mount --pid --net ...` fails here"
    assert available_level() in ("root", "userns", "none")


@pytest.mark.parametrize("line", ["{", "[1, 2]", '{"event": "result"}', '{"event": "collected", "nodeid": "x"}',
                                  '{"event": "result", "nodeid": 3, "outcome": "passed"}', "[" * 100000])
def test_a_malformed_log_line_from_the_worker_is_ignored_not_a_crash_of_the_grader(line):
    assert grader.parse_event(line) is None


def test_a_log_message_is_cut_to_the_plugins_length():
    event = grader.parse_event(json.dumps({"event": "result", "nodeid": "t", "outcome": "failed",
                                           "message": "x" * 10**6}))
    assert event is not None and len(event["message"]) == grader.MAX_MESSAGE == plugin.MAX_MESSAGE


def test_every_graded_region_is_inside_a_function_the_grader_can_name():
    from minildm.grading.regions import RegionError, enclosing_function, find_regions
    from minildm.grading.workbook import check_markers

    names = {}
    for task, regions in check_markers(ROOT).items():
        for region in regions:
            if not region.path.startswith("minildm/grading/"):       # regions.py's docstring shows an example
                names[task] = enclosing_function((ROOT / region.path).read_text(), region)
    assert sorted(names) == sorted(check_markers(ROOT))
    assert names["ch02.gaussian_kl"] == "DiagonalGaussian.kl" and names["ch02.psnr"] == "psnr"
    assert names["ch05.resblock"] == "TimestepResBlock.forward"
    outside = "x = 1\n# BEGIN SOLUTION ch01.a\ny = 2\n# END SOLUTION\n"
    with pytest.raises(RegionError, match="not inside a function"):
        enclosing_function(outside, find_regions(outside, "m.py")[0])


def test_the_worker_gets_a_user_id_no_account_or_process_has():
    import pwd

    from minildm.grading.isolation import worker_user

    uid, gid = worker_user()
    assert uid == gid and uid > 0
    if uid != pwd.getpwnam("nobody").pw_uid:
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)
        owners = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                owners.add(os.stat(f"/proc/{pid}").st_uid)
            except OSError:                               # ended meanwhile
                continue
        assert uid not in owners
