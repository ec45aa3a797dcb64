"""Step 1 (caching): the backward of a causal model runs over the positions that reach a wanted one only."""

import contextlib
import copy

import pytest
import torch

from malmen_hf import caching
from malmen_hf.caching import cache_keys_and_value_grads, frozen, needed_positions
from malmen_hf.facts import collate, pad_id_of, tokenize_edit_prompts
from malmen_hf.layers import default_edit_modules
from tests.test_subject_positions import REQUESTS


def test_needed_positions_run_from_the_first_wanted_to_the_last_scored():
    wanted = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    scored = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(needed_positions(wanted, scored), expected)


def cache(model, tokenizer, token_positions):
    """Keys and value gradients of every default edited module on all facts, padded to the longest, in one batch."""
    modules = {name: model.get_submodule(name) for name in default_edit_modules(model)}
    examples = tokenize_edit_prompts(tokenizer, REQUESTS, "causal")
    batch = collate(examples, pad_id_of(tokenizer), "causal")
    with frozen(model), torch.enable_grad():
        return cache_keys_and_value_grads(model, modules, batch, "causal", token_positions=token_positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_positions", ["target", "subject_last", "all"])
@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_backward_over_the_needed_positions_equals_the_full_backward(
    _built, monkeypatch, family, token_positions, dtype, device
):
    model, tokenizer = _built[family]
    model = copy.deepcopy(model).to(device, dtype)
    restricted_layers = []
    apply = caching._InputGradientAtRows.apply
    monkeypatch.setattr(
        caching._InputGradientAtRows, "apply", lambda *args: restricted_layers.append(1) or apply(*args)
    )
    restricted = cache(model, tokenizer, token_positions)
    # every linear layer after the first edited one: its own block's (none before it in GPT-2's Conv1D c_proj) and
    # those of the blocks after
    assert restricted_layers

    monkeypatch.setattr(caching, "input_gradients_at", lambda model, needed: contextlib.nullcontext())
    full = cache(model, tokenizer, token_positions)
    assert restricted.keys() == full.keys()
    for name, (keys, grads) in full.items():
        assert torch.equal(restricted[name][0], keys)
        scale = grads.abs().max().clamp_min(1e-30)  # the last layer's gradient at the subject is zero
        tolerance = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(restricted[name][1] / scale, grads / scale, rtol=0, atol=tolerance)
