"""Editing a model whose blocks accelerate has dispatched to several devices (a `device_map`)."""

import copy

import pytest
import torch
from accelerate import dispatch_model

from malmen_hf import MalmenEditorModel
from tests.conftest import assert_bit_identical, snapshot
from tests.test_apply_edits import assert_close_at_scale, edit_deltas, untrained_editor, weight_deltas


def split_device_map(device: torch.device) -> dict[str, int | str]:
    """The tiny Llama's embeddings and first block on `device`, its second block, norm and head on the CPU."""
    first = (device.index or 0) if device.type == "cuda" else "cpu"
    return {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.layers.0": first,
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }


def test_edit_of_a_model_split_by_device_map_equals_the_single_device_edit(_built, facts, device):
    model, tokenizer = _built["llama"]
    single = copy.deepcopy(model).to(device)
    editor = untrained_editor(single).to(device)
    expected = edit_deltas(editor, single, tokenizer, facts)

    # main_device="cpu": the blocks mapped to the CPU run there. (With a GPU as the main device, accelerate offloads
    # them instead: their weights wait on the meta device, which apply_edits refuses.) force_hooks: on a CPU-only
    # machine both halves are on the CPU, and the model still runs through accelerate's hooks.
    split = dispatch_model(copy.deepcopy(model), split_device_map(device), main_device="cpu", force_hooks=True)
    assert {param.device.type for param in split.model.layers[0].parameters()} == {device.type}
    assert {param.device.type for param in split.model.layers[1].parameters()} == {"cpu"}
    assert all(hasattr(split.get_submodule(name), "_hf_hook") for name in split_device_map(device))
    before = snapshot(split)
    handle = editor.apply_edits(split, facts, tokenizer=tokenizer)
    actual = weight_deltas(split, before)
    handle.revert()
    assert_bit_identical(split, before)

    assert actual.keys() == expected.keys() == {f"{name}.weight" for name in editor.config.edit_modules}
    for name, delta in actual.items():
        assert delta.device == split.get_parameter(name).device
        assert_close_at_scale(delta.to(device), expected[name])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_model_offloaded_by_device_map_is_refused(_built, facts):
    """A device map that offloads blocks to the CPU while a GPU runs them leaves their weights on the meta device."""
    model, tokenizer = _built["llama"]
    editor = MalmenEditorModel.for_model(model, rank=4).cuda()
    offloaded = dispatch_model(copy.deepcopy(model), split_device_map(torch.device("cuda")))
    with pytest.raises(ValueError, match="meta device"):
        editor.apply_edits(offloaded, facts, tokenizer=tokenizer)
