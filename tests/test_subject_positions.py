"""Editors that read their keys at the subject's last token (`token_positions="subject_last"`, as ROME and MEMIT)."""

import copy
import json

import pytest
import torch
from tokenizers import normalizers
from transformers.pytorch_utils import Conv1D

from malmen_hf import EditRequest, MalmenEditorModel, load_edit_requests
from malmen_hf.facts import subject_last_position, tokenize_edit_prompts
from tests import tiny
from tests.conftest import FACTS, SUBJECT_REQUESTS, assert_bit_identical, snapshot
from tests.test_apply_edits import assert_close_at_scale, edit_deltas, hf_example, untrained_editor

REQUESTS = SUBJECT_REQUESTS


def subject_token(tokenizer, text, subject):
    """The first token after which the decoded text holds the whole subject."""
    ids = tokenizer(text)["input_ids"]
    return next(i for i in range(len(ids)) if subject in tokenizer.decode(ids[: i + 1]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_subject_end_is_the_token_that_completes_the_subject(_built, family):
    _, tokenizer = _built[family]
    examples = tokenize_edit_prompts(tokenizer, REQUESTS, "causal")
    for example, request in zip(examples, REQUESTS, strict=True):
        assert example.subject_end == subject_token(tokenizer, request.prompt, request.subject), request

    # The Llama-style tokenizer holds the subject's end in a longer token, "▁Darrieux's": the count of the prefix's
    # tokens would point one token too far.
    if family == "llama":
        assert tokenizer.convert_ids_to_tokens(examples[2].input_ids[examples[2].subject_end]) == "▁Darrieux's"


def reference_subject_keys_and_grads(model, tokenizer, requests, module_name):
    """Each fact's key and value gradient at its subject's last token, by plain autograd on transformers' loss."""
    module = model.get_submodule(module_name)
    keys, grads = [], []
    for request in requests:
        captured = {}

        def hook(mod, args, output, captured=captured):
            output.retain_grad()
            captured.update(key=args[0], output=output)

        handle = module.register_forward_hook(hook)
        model.zero_grad()
        model(**hf_example(model, tokenizer, request.prompt, request.target)).loss.backward()
        handle.remove()
        position = subject_token(tokenizer, request.prompt, request.subject)
        keys.append(captured["key"][0, position].detach())
        grads.append(captured["output"].grad[0, position])
    return torch.stack(keys).double(), torch.stack(grads).double()


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_subject_last_shift_matches_independent_least_squares(_built, family):
    model, tokenizer = _built[family]
    model = copy.deepcopy(model)
    editor = untrained_editor(model, log_lambda_init=-1.0, token_positions="subject_last")
    deltas = edit_deltas(editor, model, tokenizer, REQUESTS)
    # The last block's output at the subject's token reaches no later position, so only the first block changes.
    first, last = editor.config.edit_modules
    assert list(deltas) == [f"{first}.weight"]

    for name in editor.config.edit_modules:
        keys, grads = reference_subject_keys_and_grads(model, tokenizer, REQUESTS, name)
        diffs = -editor.config.lr_init * keys.square().sum(-1, keepdim=True) * grads
        ridge_rows = torch.exp(torch.tensor(editor.config.log_lambda_init / 2)).double() * torch.eye(keys.shape[1])
        zeros = torch.zeros(keys.shape[1], grads.shape[1]).double()
        expected = torch.linalg.lstsq(torch.cat([keys, ridge_rows.double()]), torch.cat([diffs, zeros])).solution
        if name == last:
            assert not expected.any()
            continue
        module = model.get_submodule(name)
        delta = deltas[f"{name}.weight"]
        assert_close_at_scale((delta if isinstance(module, Conv1D) else delta.T).double(), expected)


def test_subject_last_does_not_depend_on_batch_size(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model, token_positions="subject_last")
    one = edit_deltas(editor, model, tokenizer, REQUESTS, batch_size=1)
    all_at_once = edit_deltas(editor, model, tokenizer, REQUESTS, batch_size=len(REQUESTS))
    assert one.keys() == all_at_once.keys() and one
    for name, delta in one.items():
        assert_close_at_scale(delta, all_at_once[name])


def test_a_fact_without_subject_is_refused_and_nothing_changes(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model, token_positions="subject_last")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"fact 2: .*needs a 'subject'"):
        editor.apply_edits(model, [*REQUESTS[:2], FACTS[2]], tokenizer=tokenizer)
    assert_bit_identical(model, before)


def test_subject_last_is_refused_for_a_seq2seq_model(t5):
    model, tokenizer = t5
    editor = untrained_editor(model, token_positions="subject_last")
    before = snapshot(model)
    with pytest.raises(ValueError, match="causal language models"):
        editor.apply_edits(model, REQUESTS, tokenizer=tokenizer)
    assert_bit_identical(model, before)


def test_a_subject_must_occur_in_the_prompt():
    with pytest.raises(ValueError, match="'subject' must be a non-empty part of the prompt"):
        EditRequest("The capital of France is", "Berlin", subject="Germany")
    with pytest.raises(ValueError, match="'subject' must be a non-empty part of the prompt"):
        EditRequest("The capital of France is", "Berlin", subject=" ")


def test_target_positions_ignore_the_subject(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model)
    with_subject = edit_deltas(editor, model, tokenizer, REQUESTS)
    without = edit_deltas(editor, model, tokenizer, FACTS)
    assert with_subject.keys() == without.keys() and with_subject
    assert all(torch.equal(delta, without[name]) for name, delta in with_subject.items())


def test_loaders_read_the_subject(tmp_path):
    record = {
        "case_id": 1, "prompt": "The official religion of Edwin of Northumbria is", "target_new": "Islam",
        "subject": "Edwin of Northumbria", "ground_truth": "Christianity",
        "rephrase_prompt": "Edwin of Northumbria is affiliated with the religion",
        "locality_prompt": "The official religion of Paul is", "locality_ground_truth": "Christianity",
    }  # fmt: skip
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([record]))
    (request,) = load_edit_requests(path)
    assert request.subject == "Edwin of Northumbria"
    path.write_text(json.dumps([{**record, "subject": "Paul of Tarsus"}]))
    with pytest.raises(ValueError, match="record 0: 'subject' must be a non-empty part of the prompt"):
        load_edit_requests(path)


def test_config_round_trip(gpt2, tmp_path):
    model, _ = gpt2
    untrained_editor(model, token_positions="subject_last").save_pretrained(tmp_path)
    assert MalmenEditorModel.from_pretrained(tmp_path).config.token_positions == "subject_last"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_slow_tokenizer_finds_the_token_that_completes_the_subject(_built, family):
    _, tokenizer = _built[family]
    slow = copy.copy(tokenizer)
    slow.__class__ = type("SlowTokenizer", (type(tokenizer),), {"is_fast": property(lambda self: False)})
    for request in REQUESTS:
        expected = subject_token(tokenizer, request.prompt, request.subject)
        assert subject_last_position(slow, request.prompt, request.subject) == expected, request


def test_a_subject_ending_in_a_character_the_normalizer_drops_ends_at_the_token_before():
    tokenizer = tiny.gpt2_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("!", "")
    prompt = "Apple! was founded by"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    apple_ends_at = len(tokenizer("Apple")["input_ids"]) - 1
    assert tokens[subject_last_position(tokenizer, prompt, "Apple!")] == tokens[apple_ends_at]
