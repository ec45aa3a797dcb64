"""
malmen-hf as a user installs it: a wheel built from this checkout, installed offline into a fresh virtual environment
and used from another folder, where the checkout's `editors/` and `../shared/data` are out of reach.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import load_file

from malmen_hf.shipped import DEFAULT_EDITOR

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with only the built wheel installed (its dependencies come from this one)."""
    root = tmp_path_factory.mktemp("install")
    # Built from a copy of the checkout's files (tracked, or new and not ignored): an in-tree build would leave build/
    # behind, whose stale copies of deleted files a later wheel would ship.
    for name in _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT).split("\0"):
        if name and (REPO_ROOT / name).is_file():
            (root / "source" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, root / "source" / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "-w", root / "dist", root / "source")  # fmt: skip
    (wheel,) = (root / "dist").glob("malmen_hf-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", root / "venv")
    python = root / "venv" / "bin" / "python"
    site_packages = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    # A plain path line puts this environment's packages (torch, transformers, ...) after the fresh ones, without
    # running their .pth files: the checkout's editable install stays invisible there.
    (site_packages / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps", "--quiet", wheel)
    return root / "venv"


def test_the_wheel_ships_the_released_editor_and_loads_it_by_short_name(venv, tmp_path):
    script = f"""
import json, malmen_hf
from malmen_hf import MalmenEditorModel
from malmen_hf.evaluation.cards import template_path
from malmen_hf.shipped import COUNTERFACT_SAMPLE, shipped_editors

editor = MalmenEditorModel.from_pretrained({DEFAULT_EDITOR!r})
editor.save_pretrained("reloaded")
print(json.dumps({{
    "package": malmen_hf.__file__, "editors": {{name: str(path) for name, path in shipped_editors().items()}},
    "name_or_path": editor.name_or_path, "template": str(template_path()), "sample": COUNTERFACT_SAMPLE.is_file(),
}}))
"""
    result = json.loads(_run(venv / "bin" / "python", "-c", script, cwd=tmp_path).splitlines()[-1])
    assert result["package"].startswith(str(venv)) and result["template"].startswith(str(venv))
    assert list(result["editors"]) == [DEFAULT_EDITOR] and result["editors"][DEFAULT_EDITOR].startswith(str(venv))
    assert result["name_or_path"] == DEFAULT_EDITOR and result["sample"]
    # Whatever the checkout's editor folder holds is what the wheel ships (saved again under this version's names:
    # the released editor was saved by malmen-hf 0.1, which called `log_lambda` `lamda`).
    shipped = load_file(REPO_ROOT / "editors" / DEFAULT_EDITOR / "model.safetensors")
    shipped = {name.replace(".lamda", ".log_lambda"): tensor for name, tensor in shipped.items()}
    reloaded = load_file(tmp_path / "reloaded" / "model.safetensors")
    assert shipped.keys() == reloaded.keys() and all(torch.equal(shipped[k], reloaded[k]) for k in shipped)
    help_text = _run(venv / "bin" / "malmen-hf", "demo", "--help", cwd=tmp_path, env={**os.environ, "COLUMNS": "300"})
    assert f"default: {DEFAULT_EDITOR}" in help_text


def test_the_quickstart_notebook_runs_on_smollm2_with_the_released_editor(venv, tmp_path):
    """The notebook as committed (the real model, the released editor), executed by the wheel's environment."""
    notebook = REPO_ROOT / "notebooks" / "quickstart.ipynb"
    script = f"""
import nbformat, sys
from nbclient import NotebookClient

notebook = nbformat.read({str(notebook)!r}, as_version=4)
notebook.cells.append(nbformat.v4.new_code_cell("print('malmen_hf from', malmen_hf.__file__)"))  # which one ran
NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={{"metadata": {{"path": "."}}}}).execute()
nbformat.write(notebook, "executed.ipynb")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the Hub is out of reach: the model comes from the PyPI conversion
    _run(venv / "bin" / "python", "-c", script, cwd=tmp_path, env=env)
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outputs = [output for cell in executed.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert f"malmen_hf from {venv}" in text and "editor: malmen-smollm2-135m-counterfact for smollm2-135m" in text
    assert "Reverted: the weights are back, bit for bit." in text
    assert [output for output in outputs if "image/png" in output.get("data", {})]  # the card shipped in the wheel


def _run(*command, **kwargs) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout
