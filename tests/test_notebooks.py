"""The notebooks run end to end (on a tiny model: their parameters cell switches them to the real one)."""

import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY_PARAMETERS = {
    "quickstart.ipynb": 'MODEL = "tiny"\nEDITOR = None',
    "train_editor.ipynb": (
        'MODEL = "tiny"\nDATA = None\nOUTPUT_DIR = "editor"\nMAX_STEPS = 2\nFACTS_PER_STEP = 4\nNUM_PROCESSES = 1'
    ),
    "share_on_hub.ipynb": (
        'EDITOR = None\nREPO_ID = "org/editor"\nRESULTS = None\nPUSH = False\nLOCAL_FOLDER = "shared"'
    ),
}


def test_every_notebook_is_tested():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(TINY_PARAMETERS)


def _execute(name: str, parameters: str, folder: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    (cell,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    cell.source = parameters
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()
    return notebook


@pytest.mark.parametrize("name", sorted(TINY_PARAMETERS))
def test_notebook_runs_end_to_end(name, tmp_path):
    notebook = _execute(name, TINY_PARAMETERS[name], tmp_path)
    assert "colab.research.google.com" in notebook.cells[0].source  # the "Open in Colab" badge
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    if name != "share_on_hub.ipynb":
        assert "MODEL = 'tiny': a RANDOM 2-layer GPT-2. Every answer and score below is meaningless" in text
    if name == "train_editor.ipynb":
        assert (tmp_path / "editor" / "model.safetensors").is_file()
        assert "Trained 2 steps; kept the editor of step" in text
        assert [output for output in outputs if "image/png" in output.get("data", {})]  # the training curves
    if name == "share_on_hub.ipynb":
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "shared").iterdir()}


def test_share_on_hub_refuses_to_push_a_card_without_results(tmp_path):
    parameters = TINY_PARAMETERS["share_on_hub.ipynb"].replace("PUSH = False", "PUSH = True")
    with pytest.raises(CellExecutionError, match="Refusing to push a card without measured results"):
        _execute("share_on_hub.ipynb", parameters, tmp_path)


def test_the_committed_notebooks_show_a_real_run():
    """
    Committed with the outputs of a run on SmolLM2-135M (not the tiny model), as Jupyter shows them
    (`notebooks/execute.py`: each progress bar in its last state), with their figures, and without errors, warnings
    about the environment, or this machine's folders.
    """
    folders = [
        str(folder)
        for folder in (Path.home(), Path(tempfile.gettempdir()), NOTEBOOKS.parent)
        if folder.parent != folder
    ]
    for name in TINY_PARAMETERS:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
        text = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs)
        assert outputs and not [output for output in outputs if output.output_type == "error"], name
        assert "RANDOM" not in text and "meaningless" not in text, name
        assert "Warning" not in text and "\r" not in text, name
        assert not [folder for folder in folders if folder in text], name
        figures = [output for output in outputs if "image/png" in output.get("data", {})]
        assert len(figures) == (0 if name == "share_on_hub.ipynb" else 1), name
