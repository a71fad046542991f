"""Checks for the task tests: failures that say what is wrong (shape, dtype, errors, where) and where to read.

These live with the tests, not in the package: `minildm grade` runs them in its own process on the reference, where
the graded functions are proxies to the student's code (minildm/grading/trusted.py), and a student's copy of them
is never used. A failure never shows the reference solution, only what was expected of the output.
"""

from __future__ import annotations

import pytest
import torch


def section(task: str) -> str:
    """Where the chapter explains the task (from the task list)."""
    try:
        from minildm.grading.tasks import TASKS
        return f" (see chapter {TASKS[task].number}, section: {TASKS[task].section})"
    except Exception:                                     # noqa: BLE001 - a message must never fail the check
        return ""


def fail(task: str, message: str) -> None:
    pytest.fail(f"{message}{section(task)}", pytrace=False)


def check_close(actual, expected: torch.Tensor, task: str, what: str, atol: float = 1e-5, rtol: float = 1e-5,
                dtype: torch.dtype | None = None) -> None:
    """`actual` must be a tensor of expected's shape (and `dtype`, if given) within atol + rtol * |expected|."""
    if not isinstance(actual, torch.Tensor):
        fail(task, f"{what}: expected a tensor of shape {tuple(expected.shape)}, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        fail(task, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if dtype is not None and actual.dtype != dtype:
        fail(task, f"{what}: dtype {actual.dtype}, expected {dtype}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    error = (a - e).abs()
    bad = ~(error <= atol + rtol * e.abs())                # NaN counts as bad
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0]) if a.ndim else ()
        rel = (error / e.abs().clamp_min(1e-12))[bad]
        fail(task, f"{what}: {int(bad.sum())} of {a.numel()} values differ; max abs error "
                   f"{error[bad].max().item():.3g}, max rel error {rel.max().item():.3g}; first at index {first}: "
                   f"got {a[first].item():.6g}, expected {e[first].item():.6g}")


def check_number(actual, expected: float, task: str, what: str, rel: float = 1e-6, abs_: float = 0.0) -> None:
    """A plain number within rel * |expected| + abs_ of the expected one."""
    if isinstance(actual, torch.Tensor) and actual.numel() == 1:
        actual = actual.item()
    if not isinstance(actual, (int, float)):
        fail(task, f"{what}: expected a number, got {type(actual).__name__}")
    if not abs(actual - expected) <= rel * abs(expected) + abs_:
        fail(task, f"{what}: got {actual:.6g}, expected {expected:.6g} (error {abs(actual - expected):.3g})")


def forbid(monkeypatch, task: str, *targets: str) -> None:
    """Make the named functions ("torch.distributions:kl_divergence") raise for the rest of the test, so the
    exercise cannot hand the work to torch or diffusers (grading/forbid.py: in-process, or, under `minildm grade`,
    around each call of the student's code in the worker)."""
    from minildm.grading import forbid as forbidding

    forbidding.forbid(monkeypatch, task, *targets)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine torch's threads wait for each other (a
    20 ms forward becomes 400 ms): a module that asks for this runs on one thread, and the setting is given back.
    It lives here because `minildm grade` copies only tests/tasks; tests/conftest.py imports it for the rest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
