"""
Every ```python block of the README runs as written. The short names it uses resolve to tiny models (the
`tiny_short_names` fixture), the Hub is a local cache folder, and the data files it names are small ones written here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from malmen_hf.shipped import COUNTERFACT_SAMPLE

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.S | re.M)
# Runs each block in a fresh namespace, in a process where `huggingface_hub` uploads into the local Hub cache
# (HF_HUB_CACHE, read offline) and the released editors are the tiny ones of the fixture.
HARNESS = """
import json, os, shutil, sys, traceback
from pathlib import Path

from malmen_hf import modeling_malmen, shipped


class LocalHub:
    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
        commit = "0" * 40
        shutil.copytree(folder_path, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return commit


modeling_malmen.HfApi = LocalHub
packaged = shipped.package_data_dir
shipped.package_data_dir = lambda name: Path(os.environ["TINY_EDITORS"]) if name == "editors" else packaged(name)
for number, block in enumerate(json.loads(sys.argv[1]), 1):
    try:
        exec(compile(block, f"README.md python block {number}", "exec"), {"__name__": "__main__"})
    except Exception:
        traceback.print_exc()
        sys.exit(f"README.md python block {number} failed:\\n{block}")
    print(f"block {number} ran")
"""


def test_the_readme_has_the_blocks_this_test_knows():
    assert len(BLOCKS) == 5 and "apply_memit" in BLOCKS[1] and "push_to_hub" in BLOCKS[2]
    assert "evaluate.load" in BLOCKS[4]


def test_every_python_block_of_the_readme_runs(tiny_short_names, tmp_path):
    work = tmp_path / "work"  # the README's relative paths start from a checkout beside ../shared/data
    work.mkdir()
    (tmp_path / "shared" / "data" / "counterfact").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "counterfact" / "train.json").write_text(COUNTERFACT_SAMPLE.read_text())
    (work / "my_facts.jsonl").write_text(json.dumps({"prompt": "The capital of France is", "target": "Berlin"}))
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf"),
        "TINY_EDITORS": str(tmp_path / "package_editors"),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", HARNESS, json.dumps(BLOCKS)], env=env, cwd=work, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("block ")] == [
        f"block {number} ran" for number in range(1, len(BLOCKS) + 1)
    ]
    assert (work / "edited-model" / "tokenizer.json").is_file()
    manifest = json.loads((work / "my-edits" / "edit_manifest.json").read_text())
    assert manifest["base_model"] == "smollm2-135m"  # names, not this machine's folders
    assert manifest["editor"] == "your-name/malmen-smollm2-135m-counterfact"
