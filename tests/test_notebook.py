import os
import shutil

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Executes every cell of clip.ipynb in a scratch directory (its data and runs land there);
    any cell that raises fails the test. Its asserts check each hand-built piece against clip.py."""
    shutil.copy(os.path.join(ROOT, "clip.ipynb"), tmp_path / "clip.ipynb")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(tmp_path / "clip.ipynb", as_version=4)
    assert len(nb.cells) > 20
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "top-1" in outputs and (tmp_path / "runs" / "notebook" / "plots.png").exists()
