import torch

from malmen_hf import EditRequest, MalmenEditorModel
from malmen_hf.metrics import agreement, edit_scores, greedy_answers, token_accuracy


def test_token_accuracy_matches_a_hand_computation(gpt2):
    model, tokenizer = gpt2
    prompts, targets = ["The capital of France is", "Apple was founded by"], ["Paris, France", "Steve Jobs"]
    expected = []
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(f"{prompt} {target}")["input_ids"]
        with torch.no_grad():
            predictions = model(torch.tensor([full_ids])).logits[0].argmax(-1)
        hits = [predictions[t - 1] == full_ids[t] for t in range(len(prompt_ids), len(full_ids))]
        expected.append(sum(hits).item() / len(hits))
    assert token_accuracy(model, tokenizer, prompts, targets, batch_size=1) == expected
    assert token_accuracy(model, tokenizer, prompts, targets) == expected


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
