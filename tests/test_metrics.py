import torch

from malmen_hf.metrics import greedy_answers, token_accuracy


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
