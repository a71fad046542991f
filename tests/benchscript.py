"""Load a script from benchmarks/ as a module, for the tests of the pieces it defines; skip the calling test module
where benchmarks/ is absent (a classroom workbook ships the package and its tests, not benchmarks/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module, or a module-level skip where the file is not in this copy."""
    script = BENCHMARKS / f"{name}.py"
    if not script.is_file():
        pytest.skip(f"benchmarks/{name}.py is not in this copy of the repository", allow_module_level=True)
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
