"""The notebooks under ``notebooks/`` run from top to bottom without an error (issue 8, "Notebooks").

Each notebook is executed the way nbmake does it, with nbclient in a fresh ``python3`` kernel (the
venv's ipykernel) whose working directory is ``notebooks/``, so plain ``pytest`` runs them; the
notebooks hold their own assertions (modes agree with ``step``, the implicit attention matrix
reproduces the engine's output, trained models reach the accuracy the text claims), and a failing
cell fails the test with that cell's traceback. ``pytest --nbmake notebooks`` does the same.

Notebooks are committed without outputs, so that a diff shows code changes only; the last test
checks that.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_tour", "02_train_and_generalise", "03_recurrent_vs_parallel", "04_state_capacity_mqar",
            "05_implicit_attention"]
# Seconds one cell may take before the run is declared hung (each notebook takes about a minute on 2
# busy cores; the longest cell trains six small models).
CELL_TIMEOUT = 600


def test_every_issue_notebook_exists():
    missing = sorted(set(EXPECTED) - {path.stem for path in NOTEBOOKS})
    assert not missing, f"notebooks missing from {NOTEBOOK_DIR}: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits this environment: keep tfds' cache of generated datasets out of $HOME (the
    # notebooks that build one pass their own temporary data_dir; this catches any that does not).
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path / "tfds"))
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()                # raises CellExecutionError naming the cell on the first failure
    ran = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert ran and all(cell.execution_count is not None for cell in ran), f"{path.name}: a cell did not run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    with_outputs = [i for i, cell in enumerate(notebook.cells)
                    if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not with_outputs, f"{path.name}: clear the outputs of cells {with_outputs} before committing"
