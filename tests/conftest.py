"""Fixtures shared by several test modules. `one_thread` lives in tests/tasks/taskcheck.py, because `minildm grade`
copies only tests/tasks into a workbook; the rest of the suite takes it from there."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tasks"))

from taskcheck import one_thread  # noqa: E402,F401  (tiny tensors gain nothing from threads on a busy machine)
