import socket

import pytest
import torch

from malmen_hf import EditRequest, MalmenEditorModel
from malmen_hf.evaluation.metrics import (
    SCORES,
    agreement,
    edit_scores,
    evaluate_module_path,
    greedy_answers,
    greedy_exact_match,
    locality_predictions,
    scores_of_model,
    target_log_probs,
    token_accuracy,
    token_match_scores,
)
from malmen_hf.facts import model_kind, pad_id_of, tokenize_examples

PROMPTS, TARGETS = ["The capital of France is", "Apple was founded by"], ["Paris, France", "Steve Jobs"]


def target_positions_by_hand(model, tokenizer, prompt, target):
    """The logits predicting each target token, and those tokens, from one unpadded forward pass."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(f"{prompt} {target}")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0]
    positions = range(len(prompt_ids), len(full_ids))
    return torch.stack([logits[t - 1] for t in positions]), torch.tensor([full_ids[t] for t in positions])


def test_token_accuracy_matches_a_hand_computation(gpt2):
    model, tokenizer = gpt2
    expected = []
    for prompt, target in zip(PROMPTS, TARGETS, strict=True):
        logits, target_ids = target_positions_by_hand(model, tokenizer, prompt, target)
        expected.append((logits.argmax(-1) == target_ids).sum().item() / len(target_ids))
    assert token_accuracy(model, tokenizer, PROMPTS, TARGETS, batch_size=1) == expected
    assert token_accuracy(model, tokenizer, PROMPTS, TARGETS) == expected


def test_greedy_answers_match_one_prompt_at_a_time(gpt2):
    model, tokenizer = gpt2
    prompts = ["The capital of France is", "Apple"]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=3)
    for prompt, answer in zip(prompts, batched, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        output = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert answer == tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"


def test_agreement():
    assert agreement([[1, 2, 3], [4]], [[1, 0, 3], [5]]) == [2 / 3, 0.0]


def test_edit_scores_of_an_edit_that_changes_nothing(gpt2):
    model, tokenizer = gpt2
    requests = [
        EditRequest("The capital of France is", "Berlin", ("France's capital is",), "Apple was founded by", "Steve"),
        EditRequest("Toko Yasuda plays the", "piano", locality_prompt="The Louvre is in", locality_answer="Paris"),
    ]
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.0)
    scores = edit_scores(editor, model, tokenizer, requests)
    assert scores["LS"] == 1.0
    assert scores["ES"] == sum(token_accuracy(model, tokenizer, [r.prompt for r in requests], ["Berlin", "piano"])) / 2
    assert scores["GS"] == token_accuracy(model, tokenizer, ["France's capital is"], ["Berlin"])[0]


def test_edit_scores_revert_the_edit(gpt2):
    model, tokenizer = gpt2
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0)
    edit_scores(editor, model, tokenizer, [EditRequest("Apple was founded by", "Microsoft")])
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_target_log_probs_match_a_hand_computation(gpt2):
    model, tokenizer = gpt2
    expected = []
    for prompt, target in zip(PROMPTS, TARGETS, strict=True):
        logits, target_ids = target_positions_by_hand(model, tokenizer, prompt, target)
        expected.append(torch.log_softmax(logits, -1).gather(-1, target_ids[:, None]).mean())
    got = target_log_probs(model, tokenizer, PROMPTS, TARGETS)
    assert got == pytest.approx([float(value) for value in expected], abs=1e-5)


def _greedy_one_at_a_time(model, tokenizer, prompt, target):
    """The reference: one unpadded prompt, `generate`, and the decoded text compared with the target's tokens."""
    example = tokenize_examples(tokenizer, [prompt], [target], model_kind(model))[0]
    if model.config.is_encoder_decoder:
        prompt_ids, answer = example.input_ids, [t for t in example.labels if t != -100]
    else:
        start = next(t for t, label in enumerate(example.labels) if label != -100) + 1
        prompt_ids, answer = example.input_ids[:start], example.input_ids[start:]
    output = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=len(answer), do_sample=False, pad_token_id=pad_id_of(tokenizer)
    )
    new_tokens = output[0, 1:] if model.config.is_encoder_decoder else output[0, len(prompt_ids) :]
    generated = tokenizer.decode(new_tokens[: len(answer)], skip_special_tokens=True).strip()
    return float(generated == tokenizer.decode(answer, skip_special_tokens=True).strip()), generated


def answer_always(model, tokenizer, word):
    """
    Makes the greedy answer of `model` to any prompt `word` (one token), then EOS for an encoder-decoder: a large bonus
    on those logits, so that the batched comparison below has exact matches to find in every family.
    """
    kind = model_kind(model)
    answer = [t for t in tokenize_examples(tokenizer, ["x"], [word], kind)[0].labels if t != -100]
    assert len(answer) == (2 if kind == "seq2seq" else 1), answer
    decoder_inputs = {}
    if kind == "seq2seq":
        model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs: decoder_inputs.update(ids=kwargs["input_ids"]), with_kwargs=True
        )

    def bonus(module, args, logits):
        logits = logits.clone()
        if kind == "seq2seq":  # the word right after the decoder's start token, EOS after anything else
            first = (decoder_inputs["ids"] == model.config.decoder_start_token_id).to(logits.dtype)
            logits[..., answer[0]] += 1e4 * first
            logits[..., answer[1]] += 1e4 * (1 - first)
        else:
            logits[..., answer[0]] += 1e4
        return logits

    model.get_output_embeddings().register_forward_hook(bonus)


def test_greedy_exact_match_batched_equals_one_prompt_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = ["The capital of France is", "Apple", "Toko Yasuda, the famous player of the"]
    # Targets the model does continue with (its own greedy text, when it reads back as the same tokens), and not.
    own = [_greedy_one_at_a_time(model, tokenizer, prompt, "x y z")[1] or "x" for prompt in prompts]
    pairs = [(p, t) for p, t in zip(prompts, own, strict=True)] + [(p, "Berlin Wall") for p in prompts]
    expected = [_greedy_one_at_a_time(model, tokenizer, prompt, target)[0] for prompt, target in pairs]
    got = greedy_exact_match(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], batch_size=4)
    assert got == expected

    answer_always(model, tokenizer, "Paris")  # now exact matches exist in every family
    pairs = [(p, t) for p in prompts for t in ("Paris", "Berlin Wall", "Rome")]
    expected = [_greedy_one_at_a_time(model, tokenizer, prompt, target)[0] for prompt, target in pairs]
    got = greedy_exact_match(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], batch_size=4)
    assert got == expected == [1.0, 0.0, 0.0] * len(prompts)


def test_scores_of_the_unedited_model_against_independent_computations(gpt2):
    model, tokenizer = gpt2
    requests = [
        EditRequest(
            "The capital of France is",
            "Berlin",
            ("France's capital is",),
            "Apple was founded by",
            "Steve",
            ground_truth="Paris",
        ),  # fmt: skip
        EditRequest("Toko Yasuda plays the", "piano", (), "The Louvre is in", "Paris", ground_truth="guitar"),
        EditRequest("Apple was founded by", "Bill Gates"),  # no ground truth: left out of the CF scores
    ]
    before = locality_predictions(model, tokenizer, requests)
    scores = scores_of_model(model, tokenizer, requests, before, scores=list(SCORES))
    assert list(scores) == list(SCORES)
    assert scores["LS"] == 1.0
    loc = [("Apple was founded by", "Steve"), ("The Louvre is in", "Paris")]
    assert scores["LS_acc"] == pytest.approx(sum(token_accuracy(model, tokenizer, *zip(*loc, strict=True))) / 2)

    def wins(prompt, first, second):
        a, b = target_log_probs(model, tokenizer, [prompt, prompt], [first, second])
        return float(a > b)

    assert scores["CF_efficacy"] == pytest.approx(
        (wins("The capital of France is", "Berlin", "Paris") + wins("Toko Yasuda plays the", "piano", "guitar")) / 2
    )
    assert scores["CF_paraphrase"] == wins("France's capital is", "Berlin", "Paris")
    assert scores["CF_neighborhood"] == pytest.approx(
        (wins("Apple was founded by", "Paris", "Berlin") + wins("The Louvre is in", "guitar", "piano")) / 2
    )
    greedy = greedy_exact_match(model, tokenizer, [r.prompt for r in requests], [r.target for r in requests])
    assert scores["ES_greedy"] == pytest.approx(sum(greedy) / 3)


def test_an_unknown_score_is_refused(gpt2):
    model, tokenizer = gpt2
    with pytest.raises(ValueError, match=r"unknown scores \['XS'\].*'ES'"):
        scores_of_model(model, tokenizer, [EditRequest("a", "b")], [], scores=["ES", "XS"])


def test_an_edit_moves_the_counterfact_score(gpt2):
    model, tokenizer = gpt2
    requests = [EditRequest("The capital of France is", "Berlin", ("France's capital is",), ground_truth="Paris")]
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0, n_blocks=0)
    before = scores_of_model(model, tokenizer, requests, [], scores=["CF_efficacy", "ES"])
    after = edit_scores(editor, model, tokenizer, requests, scores=["CF_efficacy", "ES"])
    assert before["CF_efficacy"] == 0.0 and after["CF_efficacy"] == 1.0
    assert after["ES"] > before["ES"]


def test_the_evaluate_modules_load_offline_and_agree_with_the_functions(monkeypatch):
    import evaluate

    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: lookups.append(host) or [])
    accuracy = evaluate.load(evaluate_module_path("edit_accuracy"))
    predictions, references = [[1, 2, 3], [4], [5, 6]], [[1, 0, 3], [4], [7, 8]]
    assert accuracy.compute(predictions=predictions, references=references) == {
        "accuracy": pytest.approx((2 / 3 + 1 + 0) / 3),
        "exact_match": pytest.approx(1 / 3),
    }
    assert token_match_scores(predictions, references)["accuracy"] == pytest.approx(
        sum(agreement(predictions, references)) / 3
    )
    counterfact = evaluate.load(evaluate_module_path("counterfact_score"))
    result = counterfact.compute(predictions=[-1.0, -3.0, -0.5], references=[-2.0, -2.0, -0.5])
    assert result == {"score": pytest.approx(1 / 3), "mean_margin": pytest.approx(0.0)}
    assert lookups == []
    with pytest.raises(ValueError, match=r"no evaluate module 'bleu'.*counterfact_score"):
        evaluate_module_path("bleu")
