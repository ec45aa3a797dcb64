"""Compiled models, layers whose gradient never arrives, and the output head."""

import copy

import pytest
import torch

from malmen_hf import MalmenEditorModel
from tests.conftest import FACTS, assert_bit_identical, snapshot


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6 cannot run compiled code eagerly")
@pytest.mark.parametrize("backend", ["inductor", "eager"])
def test_a_compiled_model_gets_the_same_edit_as_the_plain_one(gpt2, backend):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    plain = editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    expected = {name: tensor.clone() for name, tensor in plain._shifts.items()}
    plain.revert()
    compiled_copy = copy.deepcopy(model)
    before = snapshot(compiled_copy)
    compiled = torch.compile(compiled_copy, backend=backend)
    compiled(**tokenizer("The capital of France is", return_tensors="pt"))  # compiled, with no hook registered
    for _ in range(2):  # twice: a graph dynamo kept from an earlier call must not be reused either
        handle = editor.apply_edits(compiled, FACTS, tokenizer=tokenizer)
        for name, shift in expected.items():
            assert torch.equal(handle._shifts[name], shift), name
        handle.revert()
    assert_bit_identical(compiled_copy, before)


def test_a_layer_the_loss_does_not_reach_is_an_error_not_a_zero_edit(gpt2):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    before = snapshot(model)
    # The block's MLP output is cut from the graph: the edited projection inside it gets no gradient.
    hook = model.transformer.h[1].mlp.register_forward_hook(lambda module, args, output: output.detach())
    try:
        with pytest.raises(RuntimeError, match=r"No gradient reached the edited layer 'transformer.h.1.mlp.c_proj'"):
            editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    finally:
        hook.remove()
    assert_bit_identical(model, before)


def test_editing_the_output_head_is_refused_clearly(gpt2):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, edit_modules=["lm_head"], rank=4, lr_init=0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match="'lm_head' is the model's output head: MALMEN edits layers inside the model"):
        editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    assert_bit_identical(model, before)
