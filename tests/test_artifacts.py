"""Applied edits saved as files and loaded onto a fresh copy of the base model."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from malmen_hf import EditRequest, MalmenEditorModel, load_edits
from tests.conftest import assert_bit_identical, snapshot

FACTS = [
    EditRequest("The Eiffel Tower is located in", "Rome", ("The Eiffel Tower is in",), "The Louvre is in", "Paris"),
    EditRequest("The capital of France is", "Berlin", ground_truth="Paris"),
]


@pytest.fixture
def edited(model_and_tokenizer, tmp_path):
    """A model edited in place, a pristine copy of it from before the edit, and the saved edit."""
    model, tokenizer = model_and_tokenizer
    fresh = copy.deepcopy(model)
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    handle = editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    handle.save(tmp_path / "edit")
    return model, fresh, handle, tmp_path / "edit"


def test_saved_edits_load_onto_a_fresh_model_bit_for_bit_and_revert(edited):
    model, fresh, handle, folder = edited
    pristine = snapshot(fresh)
    loaded = load_edits(fresh, folder)
    assert_bit_identical(fresh, snapshot(model))
    assert loaded.modules == handle.modules and loaded.facts == FACTS and loaded.num_tokens == handle.num_tokens
    assert loaded.shift_norms == pytest.approx(handle.shift_norms)
    manifest = json.loads((folder / "edit_manifest.json").read_text())
    assert manifest["facts"][1]["ground_truth"] == "Paris" and set(manifest["modules"]) == set(handle.modules)
    loaded.revert()
    assert_bit_identical(fresh, pristine)


def tamper(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: tamper(folder / "edit_shifts.safetensors"), "modified or truncated"),
        (lambda folder: truncate(folder / "edit_shifts.safetensors"), "modified or truncated"),
        (lambda folder: (folder / "edit_shifts.safetensors").unlink(), "edit_shifts.safetensors is missing"),
        (lambda folder: (folder / "edit_manifest.json").write_text("{"), "is not valid JSON"),
        (
            lambda folder: (folder / "edit_manifest.json").write_text('{"format": "x"}'),
            "not a malmen-hf edit manifest",
        ),
    ],
)
def test_a_damaged_artifact_is_refused_and_changes_nothing(edited, damage, message):
    _, fresh, _, folder = edited
    pristine = snapshot(fresh)
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_edits(fresh, folder)
    assert_bit_identical(fresh, pristine)
    assert not getattr(fresh, "_malmen_edit_handles", [])


def test_edits_of_another_base_model_are_refused(edited):
    model, fresh, _, folder = edited
    with pytest.raises(ValueError, match="are not the ones these edits were made on"):
        load_edits(model, folder)  # already edited: not the weights the edit was made on
    other = copy.deepcopy(fresh)
    with torch.no_grad():
        next(iter(other.parameters())).add_(1.0)  # any weight but an edited one differs: still the same layers
    first_edited = json.loads((folder / "edit_manifest.json").read_text())["modules"]
    other.get_submodule(next(iter(first_edited))).weight.data.mul_(1.5)
    pristine = snapshot(other)
    with pytest.raises(ValueError, match="Nothing was changed"):
        load_edits(other, folder)
    assert_bit_identical(other, pristine)


def test_saving_needs_the_edit_applied_and_its_shifts(gpt2, tmp_path):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    handle = editor.apply_edits(model, FACTS, tokenizer=tokenizer, keep_shifts=False)
    with pytest.raises(RuntimeError, match="keep_shifts=True"):
        handle.save(tmp_path / "edit")
    handle.revert()
    handle = editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    handle.revert()
    with pytest.raises(RuntimeError, match="were reverted"):
        handle.save(tmp_path / "edit")
    assert not (tmp_path / "edit").exists()


def test_a_failed_save_keeps_the_previous_artifact(edited, monkeypatch):
    model, fresh, handle, folder = edited
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    monkeypatch.setattr(
        "malmen_hf.artifacts.save_file", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        handle.save(folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_an_edited_model_saves_as_an_ordinary_transformers_model(gpt2, tmp_path):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    editor.attach(model, tokenizer)
    model.apply_edits(FACTS)
    model.save_pretrained(tmp_path / "edited")
    config = (tmp_path / "edited" / "config.json").read_text()
    assert "malmen" not in config.lower()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    assert_bit_identical(reloaded, snapshot(model))
