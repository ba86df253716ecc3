"""notebooks/quickstart.ipynb runs top to bottom (tiny mode, about 40 s on 2 CPU cores)."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # The kernel is a fresh process that inherits this environment: tiny budget, outputs
    # under tmp_path, and one CPU device (compiling for the 8 forced test devices is slower).
    monkeypatch.setenv("CPT_QUICKSTART_TINY", "1")
    monkeypatch.setenv("CPT_QUICKSTART_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # as conftest
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any(m.startswith("| run | method | replay rate |") for m in markdown)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3

    rows = {r["run"]: r for r in json.load(open(tmp_path / "report" / "report.json"))["rows"]}
    assert set(rows) == {"sequential", "replay"}
    assert rows["replay"]["replay_rate"] == 0.5
    # what the notebook is there to show: without replay the earlier domains are forgotten
    # more, and the final model is worse on average; replay costs more training FLOPs
    assert rows["sequential"]["forgetting"] > rows["replay"]["forgetting"]
    assert rows["sequential"]["retained_loss"] > rows["replay"]["retained_loss"]
    assert rows["replay"]["flops"] > rows["sequential"]["flops"]
