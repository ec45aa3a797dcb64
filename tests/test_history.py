"""Lifelong editing: earlier rounds' keys in the normal equation, exact under revert and across processes."""

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from malmen_hf import edit_history, load_edits
from tests.conftest import FACTS, assert_bit_identical, snapshot
from tests.test_apply_edits import assert_close_at_scale, reference_keys_and_grads, untrained_editor

ROUNDS = [FACTS[:3], FACTS[3:5], FACTS[5:]]
WEIGHT = 2.0  # b: the weight of the earlier rounds' keys


def test_a_later_round_solves_with_the_earlier_rounds_keys(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model, log_lambda_init=-1.0, history_weight=WEIGHT)
    earlier_keys = {name: reference_keys_and_grads(model, tokenizer, ROUNDS[0], name)[0] for name in
                    editor.config.edit_modules}  # fmt: skip
    editor.apply_edits(model, ROUNDS[0], tokenizer=tokenizer)
    for name, keys in earlier_keys.items():
        torch.testing.assert_close(edit_history(model)[name].double(), keys.T @ keys, rtol=1e-5, atol=1e-5)
    before = snapshot(model)
    editor.apply_edits(model, ROUNDS[1], tokenizer=tokenizer)
    for name in editor.config.edit_modules:
        # An independent least squares: this round's rows, the earlier round's keys (weight b, target 0) and the ridge.
        keys, grads = reference_keys_and_grads(model_at(before, model), tokenizer, ROUNDS[1], name)
        diffs = -editor.config.lr_init * keys.square().sum(-1, keepdim=True) * grads
        ridge = torch.exp(torch.tensor(editor.config.log_lambda_init / 2)).double() * torch.eye(keys.shape[1])
        rows = torch.cat([keys, WEIGHT**0.5 * earlier_keys[name], ridge.double()])
        targets = torch.cat([diffs, torch.zeros(rows.shape[0] - keys.shape[0], diffs.shape[1]).double()])
        expected = torch.linalg.lstsq(rows, targets).solution
        delta = model.state_dict()[f"{name}.weight"] - before[f"{name}.weight"]
        delta = delta if isinstance(model.get_submodule(name), Conv1D) else delta.T
        assert_close_at_scale(delta.double(), expected)


def model_at(state, model):
    """A copy of `model` with the weights of `state`."""
    copied = copy.deepcopy(model)
    copied.load_state_dict(state)
    return copied


def test_reverting_a_round_restores_the_history_before_it_bit_for_bit(gpt2):
    model, tokenizer = gpt2
    pristine = snapshot(model)
    editor = untrained_editor(model, history_weight=WEIGHT)
    first = editor.apply_edits(model, ROUNDS[0], tokenizer=tokenizer)
    after_first = edit_history(model)
    second = editor.apply_edits(model, ROUNDS[1], tokenizer=tokenizer)
    assert all(not torch.equal(edit_history(model)[name], gram) for name, gram in after_first.items())
    with pytest.raises(RuntimeError, match="1 later apply_edits call"):
        first.revert()  # a middle round: refused, nothing changes
    second.revert()
    history = edit_history(model)
    assert history.keys() == after_first.keys()
    assert all(torch.equal(history[name], gram) for name, gram in after_first.items())
    first.revert()
    assert edit_history(model) == {}
    assert_bit_identical(model, pristine)


def test_a_history_saved_with_the_edits_continues_in_another_process(gpt2, tmp_path):
    model, tokenizer = gpt2
    fresh = copy.deepcopy(model)
    editor = untrained_editor(model, history_weight=WEIGHT)
    for index, facts in enumerate(ROUNDS[:2]):
        editor.apply_edits(model, facts, tokenizer=tokenizer).save(tmp_path / f"round{index}")
    # Another process: the base model, the saved rounds loaded in order, then the next round.
    for index in range(2):
        load_edits(fresh, tmp_path / f"round{index}")
    for name, gram in edit_history(model).items():
        assert torch.equal(edit_history(fresh)[name], gram)
    editor.apply_edits(model, ROUNDS[2], tokenizer=tokenizer)
    editor.apply_edits(fresh, ROUNDS[2], tokenizer=tokenizer)
    assert_bit_identical(fresh, snapshot(model))


def test_without_a_history_weight_no_history_is_kept(gpt2, tmp_path):
    model, tokenizer = gpt2
    editor = untrained_editor(model)
    handle = editor.apply_edits(model, ROUNDS[0], tokenizer=tokenizer)
    assert edit_history(model) == {}
    handle.save(tmp_path / "edits")
    assert not (tmp_path / "edits" / "edit_history.safetensors").exists()
