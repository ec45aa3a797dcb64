"""Editing a model with peft adapters (LoRA): the base model's layers are edited, under the adapters."""

import copy

import pytest
import torch

from malmen_hf import MalmenEditorModel
from tests import tiny
from tests.conftest import FACTS, assert_bit_identical, snapshot

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("adapted", [["down_proj"], ["q_proj", "v_proj"]], ids=["edited-layers-adapted", "others"])
def test_editing_a_lora_model_is_editing_its_merged_model(adapted):
    tokenizer = tiny.llama_tokenizer()
    base = tiny.llama_model(len(tokenizer))
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=adapted, init_lora_weights=False)  # random B: the adapter matters
    lora = peft.get_peft_model(copy.deepcopy(base), config).eval()
    merged = copy.deepcopy(lora).merge_and_unload()
    editor = MalmenEditorModel.for_model(merged, rank=4, lr_init=0.5)

    before_merged, before_lora = snapshot(merged), snapshot(lora)
    editor.apply_edits(merged, FACTS, tokenizer=tokenizer)
    handle = editor.apply_edits(lora, FACTS, tokenizer=tokenizer)
    for name in editor.config.edit_modules:
        expected = merged.get_submodule(name).weight - before_merged[f"{name}.weight"]
        weight_name = next(key for key in before_lora if key.endswith(f"{name}.weight") or
                           key.endswith(f"{name}.base_layer.weight"))  # fmt: skip
        shift = lora.state_dict()[weight_name] - before_lora[weight_name]
        assert expected.abs().max() > 1e-5  # the edit did something
        torch.testing.assert_close(shift, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    # The adapters stay as they were, and the edit reverts bit for bit.
    assert all(torch.equal(lora.state_dict()[key], value) for key, value in before_lora.items() if "lora_" in key)
    handle.revert()
    assert_bit_identical(lora, before_lora)
