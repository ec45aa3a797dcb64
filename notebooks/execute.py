"""
Runs notebooks on the real model and writes them back with their outputs as Jupyter shows them: each progress bar in
its last state (not one output per update), and no warning about this environment's missing ipywidgets.

    python notebooks/execute.py notebooks/train_editor.ipynb [...]

The kernel runs in the repository root (the notebooks' relative folders, such as `runs/notebook-editor`, land there).
`tests/test_notebooks.py` checks what is committed: a real run, no warnings of this kind, no folder of this machine.
"""

import argparse
import os
import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
CURSOR_MOVES = re.compile(r"\x1b\[\d*[ABCDK]")  # what tqdm writes to redraw nested bars; a notebook ignores it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a cell may take")
    args = parser.parse_args()
    for path in args.notebooks:
        start = time.monotonic()
        notebook = execute(path, args.timeout)
        nbformat.write(notebook, path)
        print(f"{path}: executed in {time.monotonic() - start:.0f} s")


def execute(path: Path, timeout: int) -> nbformat.NotebookNode:
    """The notebook at `path`, executed in a fresh kernel, with its stream outputs as Jupyter displays them."""
    notebook = nbformat.read(path, as_version=4)
    # Without ipywidgets, tqdm.auto warns once and draws text bars: the warning is about this environment (Colab and
    # Jupyter with ipywidgets draw widget bars), not something a reader should see. It is filtered by its message: a
    # category of tqdm cannot be named there (PYTHONWARNINGS is read before site-packages is on the path).
    env = {**os.environ, "PYTHONWARNINGS": "ignore:IProgress not found"}
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    client.execute(env=env)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = as_displayed(cell.outputs)
    return notebook


def as_displayed(outputs: list) -> list:
    """
    Consecutive stream outputs of one stream merged, each line as it stands after its carriage returns (a progress
    bar's last state), and empty ones dropped.
    """
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if output.output_type == "stream" and previous is not None and previous.get("name") == output.name:
            previous.text += output.text
        else:
            merged.append(output)
    for output in merged:
        if output.output_type == "stream":
            lines = CURSOR_MOVES.sub("", output.text).split("\n")
            output.text = "\n".join(_last_state(line) for line in lines)
    return [output for output in merged if output.output_type != "stream" or output.text.strip()]


def _last_state(line: str) -> str:
    """What a line written with carriage returns shows at the end: its last non-empty part."""
    parts = [part for part in line.split("\r") if part.strip()]
    return parts[-1].rstrip() if parts else ""


if __name__ == "__main__":
    main()
