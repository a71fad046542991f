"""Every notebook runs top to bottom, and is stored clean (no outputs, no execution counts)."""

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs_or_execution_counts(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them "
                       f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})")



@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_with_an_id_on_every_cell(path):
    """nbformat 4.5 requires cell ids (a missing one is a warning now, an error in future nbformat versions)."""
    import nbformat

    text = path.read_text(encoding="utf-8")
    # the raw JSON: nbformat.reads would quietly add the missing ids before we could see them
    missing = [i for i, cell in enumerate(json.loads(text)["cells"]) if "id" not in cell]
    assert not missing, f"{path.name}: cells {missing} have no id; give each a unique one (nbformat's normalize)"
    nbformat.validate(nbformat.reads(text, as_version=nbformat.NO_CONVERT))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="ipykernel provides the python3 kernel the notebooks run in")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel is installed (python -m ipykernel install --user)")

    notebook = nbformat.read(path, as_version=4)
    # The kernel runs in the repository root and can import minildm whether or not it is pip-installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    start = time.time()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed while running:\n{err}", pytrace=False)
    print(f"{path.name}: executed in {time.time() - start:.1f} s")
