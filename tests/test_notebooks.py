"""The notebooks run end to end (on a tiny model: their parameters cell switches them to the real one)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY_PARAMETERS = {
    "quickstart.ipynb": 'MODEL = "tiny"\nEDITOR = None',
    "train_editor.ipynb": (
        'MODEL = "tiny"\nDATA = None\nOUTPUT_DIR = "editor"\nMAX_STEPS = 2\nFACTS_PER_STEP = 4\nNUM_PROCESSES = 1'
    ),
    "share_on_hub.ipynb": 'EDITOR = None\nREPO_ID = "org/editor"\nPUSH = False\nLOCAL_FOLDER = "shared"',
}


def test_every_notebook_is_tested():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(TINY_PARAMETERS)


@pytest.mark.parametrize("name", sorted(TINY_PARAMETERS))
def test_notebook_runs_end_to_end(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    parameters.source = TINY_PARAMETERS[name]
    assert "colab.research.google.com" in notebook.cells[0].source  # the "Open in Colab" badge
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    if name == "train_editor.ipynb":
        assert (tmp_path / "editor" / "model.safetensors").is_file()
    if name == "share_on_hub.ipynb":
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "shared").iterdir()}
