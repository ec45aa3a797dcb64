"""
Lifelong normalization (`MalmenConfig.lifelong_normalization`): each round's rows are merged into the model's running
statistics before any of them is normalized; the editor is unchanged; exact under revert and across processes.
"""

import copy

import torch

from malmen_hf import EditRequest, edit_history, fit_normalizer, load_edits
from malmen_hf.edits import normalizer_statistic_name
from tests.conftest import FACTS, assert_bit_identical, snapshot
from tests.test_apply_edits import assert_close_at_scale, untrained_editor

ROUNDS = [FACTS[:3], FACTS[3:5], FACTS[5:]]


def requests(facts):
    return [EditRequest(prompt, target) for prompt, target in facts]


def statistics(editor) -> dict[str, torch.Tensor]:
    """The editor's normalizer buffers, under the names a model's edit history gives them."""
    return {normalizer_statistic_name(key, buffer): tensor for key, net in editor.nets.items()
            for buffer, tensor in net.normalizer.state_dict().items()}  # fmt: skip


def test_each_round_is_normalized_with_statistics_that_include_it(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model, lifelong_normalization=True)
    fit_normalizer(editor, model, requests(FACTS[5:]), tokenizer)  # statistics to start from
    editor_state = snapshot(editor)
    # What each round should do: a frozen editor whose statistics are fitted on every earlier round's rows and this
    # round's, each on the model as its round found it.
    expected = copy.deepcopy(editor)
    expected.config.lifelong_normalization = False
    for facts in ROUNDS[:2]:
        as_found, before = copy.deepcopy(model), snapshot(model)
        fit_normalizer(expected, as_found, requests(facts), tokenizer)
        expected.apply_edits(as_found, facts, tokenizer=tokenizer)
        # Small batches both sides: every row must still wait for the statistics of the whole round.
        editor.apply_edits(model, facts, tokenizer=tokenizer, batch_size=1, editor_batch_size=2)
        for name in editor.config.edit_modules:
            key = f"{name}.weight"
            expected_delta = as_found.state_dict()[key] - before[key]
            assert_close_at_scale(model.state_dict()[key] - before[key], expected_delta)
        history = edit_history(model)
        assert statistics(expected).keys() <= history.keys()
        for name, statistic in statistics(expected).items():
            # float32 statistics merged in other batches: equal up to float32 rounding
            torch.testing.assert_close(history[name], statistic, rtol=1e-5, atol=1e-6 * float(statistic.abs().max()))
    assert_bit_identical(editor, editor_state)  # the statistics are the model's, not the editor's


def test_reverting_a_round_restores_its_statistics_and_saved_rounds_continue_them(gpt2, tmp_path):
    model, tokenizer = gpt2
    pristine, fresh = snapshot(model), copy.deepcopy(model)
    # A fresh normalizer (count 0) takes the first round's statistics; the history of keys is kept beside them.
    editor = untrained_editor(model, lifelong_normalization=True, history_weight=1.0)
    handles = []
    for index, facts in enumerate(ROUNDS[:2]):
        handles.append(editor.apply_edits(model, facts, tokenizer=tokenizer))
        handles[-1].save(tmp_path / f"round{index}")
    two_rounds, history = snapshot(model), edit_history(model)
    assert statistics(editor).keys() < history.keys()  # and the layers' K^T K
    assert all(not torch.equal(history[name], tensor) for name, tensor in statistics(editor).items())

    for index in range(2):  # another process: the base model and the saved rounds, in order
        load_edits(fresh, tmp_path / f"round{index}")
    assert edit_history(fresh).keys() == history.keys()
    assert all(torch.equal(edit_history(fresh)[name], tensor) for name, tensor in history.items())
    third = editor.apply_edits(model, ROUNDS[2], tokenizer=tokenizer)
    editor.apply_edits(fresh, ROUNDS[2], tokenizer=tokenizer)
    assert_bit_identical(fresh, snapshot(model))
    assert all(torch.equal(edit_history(fresh)[name], tensor) for name, tensor in edit_history(model).items())

    third.revert()
    assert_bit_identical(model, two_rounds)
    assert edit_history(model).keys() == history.keys()
    assert all(edit_history(model)[name] is tensor for name, tensor in history.items())
    for handle in handles[::-1]:
        handle.revert()
    assert edit_history(model) == {}
    assert_bit_identical(model, pristine)
