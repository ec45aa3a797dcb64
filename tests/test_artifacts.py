"""Applied edits saved as files and loaded onto a fresh copy of the base model."""

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from malmen_hf import EditRequest, MalmenEditorModel, load_edits
from malmen_hf.edits import tensor_sha256
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
        (lambda folder: (folder / "edit_manifest.json").write_text("{"), "is not valid UTF-8 JSON"),
        (lambda folder: (folder / "edit_manifest.json").write_bytes(b'{"format": "\xff"}'), "is not valid UTF-8"),
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


def rewrite(folder, manifest_change=None, shifts_change=None, rehash=True):
    """Changes a saved artifact as a careless (or naive) hand would, recomputing its hashes when `rehash`."""
    manifest = json.loads((folder / "edit_manifest.json").read_text())
    shifts = load_file(folder / "edit_shifts.safetensors")
    if shifts_change:
        shifts_change(shifts, manifest)
        save_file(shifts, folder / "edit_shifts.safetensors")
    if manifest_change:
        manifest_change(manifest)
    if rehash:  # True: every hash, as a determined hand would; "shifts": only that of the shifts file
        manifest["shifts_sha256"] = hashlib.sha256((folder / "edit_shifts.safetensors").read_bytes()).hexdigest()
    if rehash is True:
        manifest["shift_norms"] = {name: float(shift.norm()) for name, shift in shifts.items()}
        content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        manifest["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (folder / "edit_manifest.json").write_text(json.dumps(manifest))


def scale_shifts(factor):
    def change(shifts, manifest):
        for name in shifts:
            shifts[name] = shifts[name] * factor

    return change


def transpose_shifts(shifts, manifest):
    for name in shifts:
        shifts[name] = shifts[name].T.contiguous()


def first_fact(**fields):
    return lambda manifest: manifest["facts"][0].update(fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(manifest_change=first_fact(target="")), "fact 0: 'target' must be a non-empty string"),
        (dict(manifest_change=first_fact(target_new="Rome")), r"fact 0: unknown keys \['target_new'\]"),
        (dict(manifest_change=first_fact(target="Paris"), rehash=False), "was modified after it was saved"),
        (dict(manifest_change=lambda manifest: manifest["facts"].append(manifest["facts"][0]), rehash=False),
         "was modified after it was saved"),
        (dict(manifest_change=lambda m: m.pop("shifts_sha256"), rehash=False), "no valid 'shifts_sha256'"),
        (dict(manifest_change=lambda manifest: manifest.update(num_tokens="7")), "no valid 'num_tokens'"),
        (dict(shifts_change=scale_shifts(float("nan"))), "is not a finite 2-d float tensor"),
        (dict(shifts_change=scale_shifts(1e4), rehash="shifts"), "was modified after it was saved"),
        (dict(shifts_change=scale_shifts(1e4), rehash=False), "modified or truncated"),
        (dict(shifts_change=transpose_shifts), "has shape"),
    ],
)  # fmt: skip
def test_a_modified_manifest_or_shift_is_refused_and_changes_nothing(edited, change, message):
    _, fresh, _, folder = edited
    pristine = snapshot(fresh)
    rewrite(folder, **change)
    with pytest.raises(ValueError, match=message):
        load_edits(fresh, folder)
    assert_bit_identical(fresh, pristine)
    assert not getattr(fresh, "_malmen_edit_handles", [])


def test_shifts_of_modules_the_editor_does_not_edit_are_refused(gpt2, tmp_path):
    model, tokenizer = gpt2
    fresh = copy.deepcopy(model)
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    editor.apply_edits(model, FACTS, tokenizer=tokenizer).save(tmp_path)

    def add_foreign(shifts, manifest):
        shifts["transformer.h.0.attn.c_proj"] = torch.full((32, 32), 1e-3)
        original = fresh.get_submodule("transformer.h.0.attn.c_proj").weight
        record = {"shape": list(original.shape), "dtype": "float32", "original_sha256": tensor_sha256(original)}
        manifest["modules"]["transformer.h.0.attn.c_proj"] = record

    rewrite(tmp_path, shifts_change=add_foreign)  # a consistent artifact: only the editor can tell
    pristine = snapshot(fresh)
    with pytest.raises(ValueError, match=r"shifts \['transformer.h.0.attn.c_proj'\], which the editor does not edit"):
        load_edits(fresh, tmp_path, editor=editor)
    editor.attach(fresh, tokenizer)
    with pytest.raises(ValueError, match="which the editor does not edit"):
        load_edits(fresh, tmp_path)  # the attached editor
    assert_bit_identical(fresh, pristine)
    assert not getattr(fresh, "_malmen_edit_handles", [])


def test_loading_onto_a_meta_device_model_is_refused(edited):
    _, fresh, _, folder = edited
    with torch.device("meta"):
        empty = type(fresh)(fresh.config)
    with pytest.raises(ValueError, match="weights on the meta device"):
        load_edits(empty, folder)
    assert not getattr(empty, "_malmen_edit_handles", [])


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
        "malmen_hf.edits.save_file", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full"))
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
