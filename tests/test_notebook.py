"""The quick-start notebook runs top to bottom in a real Jupyter kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes_without_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_FAST", "1")
    monkeypatch.chdir(tmp_path)
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert "reloaded by plain Keras: same predictions" in outputs
    assert (tmp_path / "quickstart.keras").exists()
    assert (tmp_path / "quickstart_curves.png").stat().st_size > 1000
