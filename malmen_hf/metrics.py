"""How well edits took: ES / GS / LS as the paper reports them, and greedy answers (what a user sees)."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .caching import scored_logits
from .facts import (
    IGNORE_INDEX,
    EditRequest,
    batches_by_length,
    collate,
    is_encoder_decoder,
    pad_id_of,
    tokenize_examples,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .modeling_malmen import MalmenEditorModel


@torch.no_grad()
def teacher_forced_predictions(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[tuple[list[int], list[int]]]:
    """
    For each `(prompt, target)`, the model's argmax at each target position given the prompt and the preceding target
    tokens, and the target tokens themselves: `(predicted_ids, target_ids)`.
    """
    encoder_decoder = is_encoder_decoder(model)
    examples = tokenize_examples(tokenizer, prompts, targets, encoder_decoder)
    results: list[tuple[list[int], list[int]]] = [([], [])] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for indices in batches_by_length(examples, batch_size):
            batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), encoder_decoder)
            predicted = scored_logits(model, batch, encoder_decoder).argmax(-1).cpu()
            mask = batch["labels"] != IGNORE_INDEX
            lengths = mask.sum(1).tolist()
            for index, row_predictions, row_targets in zip(
                indices, predicted.split(lengths), batch["labels"][mask].split(lengths), strict=True
            ):
                results[index] = (row_predictions.tolist(), row_targets.tolist())
    finally:
        model.train(was_training)
    return results


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
    return [
        _share_equal(predicted, target)
        for predicted, target in teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size)
    ]


def agreement(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> list[float]:
    """Per example, the share of positions whose argmax token is the same before and after an edit (the paper's LS)."""
    return [_share_equal(a, b) for a, b in zip(before, after, strict=True)]


def _share_equal(first: Sequence[int], second: Sequence[int]) -> float:
    return sum(a == b for a, b in zip(first, second, strict=True)) / max(len(first), 1)


def locality_predictions(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    batch_size: int = 32,
) -> list[list[int]]:
    """The model's teacher-forced argmax at the locality answer positions of each request that has one."""
    pairs = [(r.locality_prompt, r.locality_answer) for r in requests if r.locality_prompt is not None]
    if not pairs:
        return []
    prompts, answers = zip(*pairs, strict=True)
    return [predicted for predicted, _ in teacher_forced_predictions(model, tokenizer, prompts, answers, batch_size)]


def scores_of_model(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    locality_before: Sequence[Sequence[int]],
    batch_size: int = 32,
) -> dict[str, float]:
    """
    The paper's scores of `model` (edited or not) on `requests`:

    - `ES`: mean teacher-forced accuracy of the targets on the edit prompts;
    - `GS`: the same on the rephrasings (requests without any are left out);
    - `LS`: mean share of locality answer positions whose argmax is the one in `locality_before` (see
      [`locality_predictions`], taken on the unedited model).

    Returns:
        `dict[str, float]` with `ES`, `GS`, `LS` (`nan` where no request has what the score needs).
    """
    rephrased = [(text, r.target) for r in requests for text in r.rephrases]
    gs = token_accuracy(model, tokenizer, *zip(*rephrased, strict=True), batch_size) if rephrased else []
    return {
        "ES": _mean(token_accuracy(model, tokenizer, [r.prompt for r in requests], [r.target for r in requests],
                                   batch_size)),
        "GS": _mean(gs),
        "LS": _mean(agreement(locality_before, locality_predictions(model, tokenizer, requests, batch_size))),
    }  # fmt: skip


def edit_scores(
    editor: "MalmenEditorModel",
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    batch_size: int = 32,
) -> dict[str, float]:
    """Applies all `requests` at once with `editor`, returns ES / GS / LS (see [`scores_of_model`]), and reverts."""
    before = locality_predictions(model, tokenizer, requests, batch_size)
    handle = editor.apply_edits(model, requests, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return scores_of_model(model, tokenizer, requests, before, batch_size)
    finally:
        handle.revert()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def greedy_answers(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """What the model answers to each prompt with greedy decoding (what a user sees), stripped of whitespace."""
    encoder_decoder = is_encoder_decoder(model)
    padding_side = tokenizer.padding_side
    pad_token = tokenizer.pad_token
    tokenizer.padding_side = "right" if encoder_decoder else "left"  # decoder-only models continue on the right
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
            new_tokens = output if encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token
    return answers
