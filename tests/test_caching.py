"""Step 1 runs a causal model's first positions without a graph (`caching.run_prefix`): the result must not change."""

import pytest
import torch

from malmen_hf import EditRequest, caching
from malmen_hf.facts import IGNORE_INDEX, collate, pad_id_of, tokenize_edit_prompts
from malmen_hf.layers import default_edit_modules, get_edit_module
from tests import tiny

FACTS = [
    EditRequest(prompt="The capital of France is", target="Rome", subject="France"),
    EditRequest(prompt="The Eiffel Tower stands in the city of", target="Berlin", subject="Eiffel Tower"),
    EditRequest(prompt="Paris is the city of love in", target="Italy and Spain", subject="Paris"),
]
MODELS = {
    "gpt2": (tiny.gpt2_model, tiny.gpt2_tokenizer),
    "llama": (tiny.llama_model, tiny.llama_tokenizer),
    "gptj": (tiny.gptj_model, tiny.gpt2_tokenizer),
    "gpt_neox": (tiny.gpt_neox_model, tiny.gpt2_tokenizer),
}


@pytest.mark.parametrize("token_positions", ["target", "subject_last"])
@pytest.mark.parametrize("family", list(MODELS))
def test_keys_and_value_grads_do_not_change_when_the_prefix_runs_without_a_graph(family, token_positions, monkeypatch):
    build, build_tokenizer = MODELS[family]
    tokenizer = build_tokenizer()
    model = build(len(tokenizer)).double()
    modules = {name: get_edit_module(model, name) for name in default_edit_modules(model)}
    batch = collate(tokenize_edit_prompts(tokenizer, FACTS, "causal"), pad_id_of(tokenizer), "causal")
    needed = caching.token_position_mask(batch, "causal", token_positions) | (batch["labels"] != IGNORE_INDEX)
    assert caching.run_prefix(model, batch, "causal", needed)[0] > 0  # else this test compares a pass with itself

    def cache(model):
        with caching.frozen(model), torch.enable_grad():
            return caching.cache_keys_and_value_grads(model, modules, batch, "causal", (), token_positions)

    with_prefix = cache(model)
    monkeypatch.setattr(caching, "run_prefix", lambda *args: (0, None))
    in_one_pass = cache(model)
    for name, (keys, value_grads) in in_one_pass.items():
        torch.testing.assert_close(with_prefix[name][0], keys, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(with_prefix[name][1], value_grads, rtol=1e-12, atol=1e-14)
