"""The grader's own pytest process: the task tests run here, on the reference package, and reach the student's code
only through proxies (issue 18).

`minildm grade` runs `pytest -p minildm.grading.plugin -p minildm.grading.trusted --grade-proxy PLAN.json` in its
trusted folder, with the reference package on the path. Before the test files are imported, this plugin replaces
the function around every graded region (regions.enclosing_function) of the tasks the student writes by
`proxy.proxied(...)`, so `from minildm.metrics import psnr` in a test gets the proxy, and so does a reference
function that calls `psnr` itself. The worker that answers (worker.py) is started inside isolation.py's walls by the
plan's Sandbox. Whatever the student's code does there, it cannot touch this process: pytest, the plugin, the tests,
the hidden tests and the log all live here.

The plan (written by runner.py, read here): {"trusted": folder, "work": folder, "level": "root" | "userns" |
"none", "user": [uid, gid] | null, "timeout": seconds, "startup": seconds, "tasks": [task ids to proxy]}.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

from minildm.grading import forbid
from minildm.grading.codec import path_of
from minildm.grading.isolation import Sandbox
from minildm.grading.proxy import Client, proxied
from minildm.grading.regions import enclosing_function, package_regions

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent      # the folder that holds the reference's minildm/
WORKER_SCRIPT = "minildm_grade_worker.py"                          # scratch.copy_worker's name for worker.py
_client: Client | None = None


def pytest_addoption(parser):
    parser.getgroup("minildm-grade").addoption("--grade-proxy", default=None,
                                               help="the plan of the worker that runs the student's code")


def graded_functions(tasks: set[str]) -> dict[str, str]:
    """{"minildm.metrics:psnr": "ch02.psnr", ...}: the function around each region of these tasks."""
    found = {}
    for region in package_regions(PACKAGE_ROOT):
        if region.task in tasks and not region.path.startswith("minildm/grading/"):
            text = (PACKAGE_ROOT / region.path).read_text(encoding="utf-8")
            module = region.path.removesuffix(".py").replace("/", ".")
            found[f"{module}:{enclosing_function(text, region)}"] = region.task
    return found


def result_classes() -> dict[str, type]:
    """The classes a worker's answer may be built as here: the dataclasses and namedtuples of the loaded minildm
    modules (their constructors only store fields)."""
    allowed = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "minildm" or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name and (
                    dataclasses.is_dataclass(value) or issubclass(value, tuple) and hasattr(value, "_fields")):
                allowed[path_of(value)] = value
    return allowed


def swap(target: str, stand_in) -> None:
    """Put `stand_in` where `target` is, and wherever a loaded minildm module bound the same function by name."""
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    static = inspect.getattr_static(owner, name)
    original = getattr(owner, name)
    setattr(owner, name, staticmethod(stand_in) if isinstance(static, staticmethod) else stand_in)
    if path:
        return
    for loaded, module in list(sys.modules.items()):
        if loaded.split(".")[0] == "minildm" and module is not None:
            for bound, value in list(vars(module).items()):
                if value is original:
                    setattr(module, bound, stand_in)


def install(plan: dict) -> Client:
    """Start nothing yet: swap the proxies in; the client starts the worker at the first call."""
    box = Sandbox(Path(plan["trusted"]), Path(plan["work"]), plan["level"],
                  user=tuple(plan["user"]) if plan["user"] else None)
    log = open(box.trusted / "worker.err", "ab")                   # noqa: SIM115 - open for the whole session
    count = [0]

    def start() -> subprocess.Popen:
        count[0] += 1
        command, env, preexec = box.command([sys.executable, WORKER_SCRIPT], f"worker-{count[0]}")
        return subprocess.Popen(command, cwd=box.work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, start_new_session=True, preexec_fn=preexec)

    targets = graded_functions(set(plan["tasks"]))
    modules = sorted({t.partition(":")[0] for t in targets})
    for module in modules:
        importlib.import_module(module)
    client = Client(start, plan["timeout"], result_classes(), warm={"op": "import", "modules": modules},
                    startup=plan["startup"])
    forbid.REMOTE = True
    for target, task in targets.items():
        swap(target, proxied(client, target, task, forbid=lambda: forbid.ACTIVE))
    return client


def pytest_configure(config):
    global _client
    plan_file = config.getoption("--grade-proxy")
    if plan_file:
        _client = install(json.loads(Path(plan_file).read_text(encoding="utf-8")))


def pytest_runtest_logfinish(nodeid, location):
    if _client is not None:
        _client.forget()


def pytest_unconfigure(config):
    if _client is not None:
        _client.close()
