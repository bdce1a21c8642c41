"""The notebooks in ``notebooks/`` run top to bottom with their (small) default parameters.

Each notebook is executed in a fresh kernel with ``nbclient``, in a temporary working directory (the notebooks write
only below it), exactly as a user would run it. Together they take about 1.5 minutes on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.timeout(600)

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; the slowest (training, evaluation) take ~10 s


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01-quickstart.ipynb", "02-train-your-own-label-pair.ipynb",
                                           "03-batch-restore-a-plate-on-a-cluster.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # The first code cell holds the parameters (papermill's "parameters" tag), and a markdown cell before it says
    # what to change for real data.
    assert "parameters" in code[0].metadata.get("tags", []), path.name
    intro = " ".join(c.source for c in nb.cells[:nb.cells.index(code[0])] if c.cell_type == "markdown")
    assert "Parameters." in intro and ("real data" in intro or "your own" in intro), path.name
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} shows no figure"
