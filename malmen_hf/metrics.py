"""How well edits took: teacher-forced token accuracy and greedy answers."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .caching import scored_logits
from .facts import IGNORE_INDEX, batches_by_length, collate, pad_id_of, tokenize_examples

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def token_accuracy(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[float]:
    """
    Teacher-forced accuracy of each target: the share of its tokens that are the model's argmax when the prompt and
    the preceding target tokens are given. Averaged over facts, this is the paper's ES (on edit prompts) and GS (on
    rephrasings).

    Returns:
        `list[float]`: one accuracy in `[0, 1]` per `(prompt, target)` pair.
    """
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    examples = tokenize_examples(tokenizer, prompts, targets, is_encoder_decoder)
    accuracies = [0.0] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for indices in batches_by_length(examples, batch_size):
            batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), is_encoder_decoder)
            logits = scored_logits(model, batch, is_encoder_decoder)
            mask = batch["labels"] != IGNORE_INDEX
            hits = (logits.argmax(-1).cpu() == batch["labels"][mask]).float()
            rows = torch.arange(len(indices)).unsqueeze(1).expand_as(mask)[mask]
            per_row = torch.zeros(len(indices)).index_add_(0, rows, hits) / mask.sum(1)
            for row, index in enumerate(indices):
                accuracies[index] = float(per_row[row])
    finally:
        model.train(was_training)
    return accuracies


@torch.no_grad()
def greedy_answers(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """What the model answers to each prompt with greedy decoding (what a user sees), stripped of whitespace."""
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    padding_side = tokenizer.padding_side
    pad_token = tokenizer.pad_token
    tokenizer.padding_side = "right" if is_encoder_decoder else "left"  # decoder-only models continue on the right
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = model.get_input_embeddings().weight.device
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompt.rstrip() for prompt in prompts[start : start + batch_size]]
            inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new_tokens = output if is_encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token
    return answers
