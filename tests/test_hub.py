"""Sharing editors on the Hub, tested without a network: a local cache layout and a replaced HfApi."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from safetensors import safe_open

from malmen_hf import MalmenEditorModel, modeling_malmen
from tests.conftest import assert_bit_identical, snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_save_pretrained_writes_a_card_and_keeps_an_existing_one(gpt2, tmp_path):
    model, _ = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, base_model_name_or_path="org/tiny-gpt2")
    editor.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "malmen-hf" and card.data.base_model == "org/tiny-gpt2"
    (tmp_path / "README.md").write_text("my own card")
    editor.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"


def test_an_editor_in_the_hub_cache_loads_by_repo_id_offline(gpt2, tmp_path):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    # The layout huggingface_hub leaves after a download: blobs behind snapshots/<commit>, refs/main naming it.
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot_dir = tmp_path / "hub" / "models--org--tiny-editor" / "snapshots" / commit
    editor.save_pretrained(snapshot_dir)
    (tmp_path / "hub" / "models--org--tiny-editor" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-editor" / "refs" / "main").write_text(commit)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    script = f"""
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
import malmen_hf, torch
editor = malmen_hf.MalmenEditorModel.from_pretrained("org/tiny-editor")
assert type(AutoModel.from_pretrained("org/tiny-editor")).__name__ == "MalmenEditorModel"
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "base")!r})
handle = editor.apply_edits(model, [("The capital of France is", "Berlin")], tokenizer=tokenizer)
print("edited", sorted(handle.shift_norms))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "edited ['transformer.h.0.mlp.c_proj', 'transformer.h.1.mlp.c_proj']" in result.stdout


class FakeHfApi:
    """Records what `push_to_hub` would send: the repository it creates and the files of its one commit."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **options):
        files = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", repo_id, files, options))
        shutil.copytree(folder_path, self.uploaded)
        return "commit-info"


def test_push_to_hub_uploads_the_editor_and_its_card_in_one_commit(gpt2, tmp_path, monkeypatch):
    model, _ = gpt2
    FakeHfApi.calls = []
    FakeHfApi.uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(modeling_malmen, "HfApi", FakeHfApi)
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5, base_model_name_or_path="org/tiny-gpt2")
    result = editor.push_to_hub("org/editor", private=True, token="hf_x", commit_message="First", create_pr=True)

    assert result == "commit-info"
    assert [call[0] for call in FakeHfApi.calls] == ["create_repo", "upload_folder"]
    assert FakeHfApi.calls[0] == ("create_repo", "org/editor", True, True, "hf_x")
    _, repo_id, files, options = FakeHfApi.calls[1]
    assert repo_id == "org/editor"
    assert options == {"commit_message": "First", "commit_description": None, "revision": None, "create_pr": True}
    assert {"config.json", "model.safetensors", "README.md", "modeling_malmen.py"} <= set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt")) or "pytorch_model" in name]
    with safe_open(FakeHfApi.uploaded / "model.safetensors", "pt") as weights:  # the editor's own tensors only
        names = weights.keys()
    assert names and all(name.startswith("nets.") for name in names)
    card = ModelCard.load(FakeHfApi.uploaded / "README.md")
    assert 'MalmenEditorModel.from_pretrained("org/editor")' in card.content
    reloaded = MalmenEditorModel.from_pretrained(FakeHfApi.uploaded)
    assert_bit_identical(reloaded, snapshot(editor))
