"""notebooks/quickstart.ipynb runs top to bottom (tiny mode, about 40 s on 2 CPU cores)."""

import json
import os

import pytest

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` skips it in the inner loop

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


INSTALL_PROBE = """
import json, subprocess, sys
calls = []
subprocess.check_call = lambda args, **kw: calls.append(args[4:])  # record, do not install
cell = next(c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code")
src = "".join(cell["source"]).replace('CPT_JAX_SOURCE = ""', f"CPT_JAX_SOURCE = {sys.argv[2]!r}")
try:
    exec(src, {})
except RuntimeError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit()
except ModuleNotFoundError:  # nothing was really installed from a URL
    pass
print(json.dumps({"calls": calls}))
"""


def _install_cell(cwd, source=""):
    """Runs the notebook's install cell in a Python without site-packages (so cpt_jax is
    not installed), pip replaced by a recorder; returns its calls or its error."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-I", "-S", "-c", INSTALL_PROBE, NOTEBOOK, source],
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_install_cell_finds_a_checkout_or_asks_for_a_source(tmp_path):
    repo = tmp_path / "clone"
    (repo / "cpt_jax").mkdir(parents=True)
    (repo / "cpt_jax" / "__init__.py").write_text('__version__ = "probe"\n')
    (repo / "setup.cfg").write_text("")
    (repo / "notebooks").mkdir()
    # a checkout above the working directory (notebooks/ of a clone) or below it (Colab)
    for cwd in (repo / "notebooks", tmp_path):
        assert _install_cell(cwd) == {"calls": [["-q", "-e", str(repo)]]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    msg = _install_cell(elsewhere)["error"]
    assert "no checkout was found" in msg and "set CPT_JAX_SOURCE" in msg
    # the marked variable: a git URL (pip needs the git+ scheme) or a wheel as given
    url = "https://example.org/group/cpt_jax.git"
    assert _install_cell(elsewhere, url)["calls"] == [["-q", f"git+{url}"]]


def test_scaling_notebook_runs_on_a_sweep(tmp_path, monkeypatch):
    from synthetic_sweep import write_sweep

    monkeypatch.setenv("CPT_SCALING_SWEEP", write_sweep(tmp_path))
    monkeypatch.setenv("CPT_SCALING_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT)  # this checkout's cpt_jax
    path = os.path.join(ROOT, "notebooks", "scaling.ipynb")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    markdown = "".join(o["data"]["text/markdown"] for o in outputs
                       if "text/markdown" in o.get("data", {}))
    # the synthetic sweep is built so that replay 0 -> 0.25 wins and 0.25 -> 0.5 loses
    assert "Replay 0 -> 0.25 vs the next model size, at matched FLOPs: yes" in markdown
    assert "Replay 0.25 -> 0.5 vs the next model size, at matched FLOPs: no" in markdown
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    text = "".join(o.get("text", "") for o in outputs)
    assert "18 finished points in 9 cells; 0 unfinished" in text
    assert "replay 0.25: b = 0.300" in text
    assert (tmp_path / "out" / "analysis.md").exists()
