"""The notebooks in experiments/notebooks run top to bottom (nbclient)."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_surgery_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  path = os.path.join(REPO, "experiments", "notebooks", "surgery.ipynb")
  nb = nbformat.read(path, as_version=4)
  # The kernel inherits the environment: this checkout's jaxrec, a few
  # steps, runs in tmp_path (the session's JAXREC_CACHE is already set).
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  monkeypatch.setenv("JAXREC_NOTEBOOK_STEPS", "4")
  monkeypatch.setenv("JAXREC_NOTEBOOK_RUNS", str(tmp_path))
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(
                                       tmp_path)}})
  client.execute()  # Raises CellExecutionError naming the failing cell.
  outputs = "".join(o.get("text", "") for cell in nb.cells
                    if cell.cell_type == "code" for o in cell.outputs)
  assert "max |shallow - deep|" in outputs
  assert os.path.exists(tmp_path / "grown_ft" / "metrics.json")
