"""Forbidden functions: while a task test runs, the functions that would do the exercise's work raise.

One resolution for both places a graded function can run. A task test calls `taskcheck.forbid(monkeypatch, task,
*targets)`: under `minildm grade` the student's code runs in the worker, so the targets only go into `ACTIVE`
(the plugin of trusted.py swaps proxies in, and each proxied call sends them along); the worker (worker.py, which
imports this file's copy as minildm_grade_forbid) applies them around that one call. In a plain pytest run of the
task tests against the package itself, they are applied in-process, undone by the test's monkeypatch.

A target is "module.path:attribute.path" ("torch.distributions:kl_divergence"). A package that is not loaded yet
(diffusers, usually) is blocked whole instead: importing it fails, and loading it just to patch it would cost
seconds. Besides the attribute itself, any name in a loaded minildm module bound to the same object (as after
`from torch.distributions import kl_divergence`) is replaced too. Standard library only: the worker imports it
beside the student's package.
"""

from __future__ import annotations

import importlib
import sys

REMOTE = False               # set by trusted.py when the graded functions are proxies: forbid() only records
ACTIVE: dict = {"task": "", "targets": []}      # what the test running now forbids (sent with each proxied call)


class Forbidden:
    """While active, each target raises AssertionError naming the task. `patcher` (a pytest monkeypatch) undoes
    the changes at the end of a test; without one, leaving the `with` block undoes them."""

    def __init__(self, targets, task: str, patcher=None):
        self.targets, self.task, self.patcher, self.undo = list(targets), task, patcher, []

    def __enter__(self):
        for target in self.targets:
            module_name, _, attribute = target.partition(":")
            top = module_name.split(".")[0]
            if top not in sys.modules:
                self.setitem(sys.modules, top, None)          # `import diffusers` now raises ImportError
                continue
            owner = importlib.import_module(module_name)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name)

            def refuse(*args, _target=f"{module_name}.{attribute}", **kwargs):
                raise AssertionError(f"{self.task} must be written by hand: it may not call {_target}")

            self.setattr(owner, name, refuse)
            for module in [m for n, m in list(sys.modules.items()) if m is not None and n.split(".")[0] == "minildm"]:
                for bound, value in list(vars(module).items()):
                    if value is original:
                        self.setattr(module, bound, refuse)
        return self

    def setattr(self, owner, name, value) -> None:
        if self.patcher is not None:
            self.patcher.setattr(owner, name, value)
            return
        self.undo.append((owner, name, getattr(owner, name), False))
        setattr(owner, name, value)

    def setitem(self, owner: dict, name, value) -> None:
        if self.patcher is not None:
            self.patcher.setitem(owner, name, value)
            return
        self.undo.append((owner, name, owner.get(name, KeyError), True))
        owner[name] = value

    def __exit__(self, *exc):
        for owner, name, old, item in reversed(self.undo):
            if not item:
                setattr(owner, name, old)
            elif old is KeyError:
                owner.pop(name, None)
            else:
                owner[name] = old
        self.undo = []


def forbid(monkeypatch, task: str, *targets: str) -> None:
    """Forbid the targets for the rest of the test (see the module docstring for where they take effect)."""
    if REMOTE:
        monkeypatch.setitem(ACTIVE, "task", task)
        monkeypatch.setitem(ACTIVE, "targets", [*ACTIVE["targets"], *targets])
    else:
        Forbidden(targets, task, monkeypatch).__enter__()
