"""How well edits took: ES / GS / LS as the paper reports them, and greedy answers (what a user sees)."""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..caching import frozen
from ..facts import (
    CLASSIFIER_LABELS,
    IGNORE_INDEX,
    EditRequest,
    batches_by_length,
    collate,
    model_kind,
    pad_id_of,
    tokenize_examples,
)
from ..scoring import scored_logits
from .scores import DEFAULT_SCORES, check_scores
from .scores import SCORES as SCORES  # where the scores are computed is where their names were always imported from

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..modeling_malmen import MalmenEditorModel


def teacher_forced_predictions(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    *,
    desc: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """
    For each `(prompt, target)`, the model's argmax at each target position given the prompt and the preceding target
    tokens, and the target tokens themselves: `(predicted_ids, target_ids)`. With `desc`, a progress bar of that name
    counts the batches (on stderr).
    """

    def argmax(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    rows = _scan_targets(model, tokenizer, prompts, targets, batch_size=batch_size, reduce=argmax, desc=desc)
    return [(predicted.tolist(), target.tolist()) for predicted, target in rows]


def target_log_probs(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    *,
    desc: str | None = None,
) -> list[float]:
    """
    The mean log-probability of each target's tokens given its prompt (teacher-forced), the quantity CounterFact's
    probability comparisons use (a mean per token, so that targets of different lengths compare fairly). With `desc`,
    a progress bar of that name counts the batches (on stderr).
    """

    def log_probs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), -1).gather(-1, target_ids.to(logits.device)[:, None])[:, 0]

    rows = _scan_targets(model, tokenizer, prompts, targets, batch_size=batch_size, reduce=log_probs, desc=desc)
    return [float(values.mean()) for values, _ in rows]


@torch.no_grad()
def _scan_targets(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    desc: str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(reduce(logits, target_ids), target_ids)` per pair, with the logits at its target positions."""
    kind = model_kind(model)
    examples = tokenize_examples(tokenizer, prompts, targets, kind)
    results: list = [None] * len(examples)
    with frozen(model):  # eval mode (no dropout), restored afterwards
        for indices in _batches(examples, batch_size, desc):
            batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), kind)
            mask = batch["labels"] != IGNORE_INDEX
            target_ids = batch["labels"][mask]
            reduced = reduce(scored_logits(model, batch, kind), target_ids).cpu()
            lengths = mask.sum(1).tolist()
            for index, values, row_targets in zip(
                indices, reduced.split(lengths), target_ids.split(lengths), strict=True
            ):
                results[index] = (values, row_targets)
    return results


def token_accuracy(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    *,
    desc: str | None = None,
) -> list[float]:
    """
    Teacher-forced accuracy of each target: the share of its tokens that are the model's argmax when the prompt and
    the preceding target tokens are given. Averaged over facts, this is the paper's ES (on edit prompts) and GS (on
    rephrasings). With `desc`, a progress bar of that name counts the batches (on stderr).

    Returns:
        `list[float]`: one accuracy in `[0, 1]` per `(prompt, target)` pair.
    """
    return [
        _share_equal(predicted, target)
        for predicted, target in teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size, desc=desc)
    ]


def agreement(before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]) -> list[float]:
    """Per example, the share of positions whose argmax token is the same before and after an edit (the paper's LS)."""
    return [_share_equal(a, b) for a, b in zip(before, after, strict=True)]


def token_match_scores(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> dict[str, float]:
    """
    `accuracy`: the mean share of positions where `predictions` match `references`, sequence by sequence (ES, GS and
    LS are this, see [`SCORES`]); `exact_match`: the share of sequences that match everywhere. What the
    `edit_accuracy` evaluate module computes.
    """
    shares = [_share_equal(predicted, reference) for predicted, reference in zip(predictions, references, strict=True)]
    return {"accuracy": _mean(shares), "exact_match": _mean([float(share == 1.0) for share in shares])}


def evaluate_module_path(name: str) -> str:
    """
    The folder of one of the `evaluate` modules shipped with malmen-hf (`"edit_accuracy"`, `"counterfact_score"`),
    for `evaluate.load(evaluate_module_path(name))`, which works offline.
    """
    path = Path(__file__).parent / "metric_modules" / name
    if not (path / f"{name}.py").is_file():
        known = sorted(folder.name for folder in path.parent.iterdir() if folder.is_dir())
        raise ValueError(f"no evaluate module {name!r} in malmen-hf; the modules are {known}")
    return str(path)


def _share_equal(first: Sequence[int], second: Sequence[int]) -> float:
    return sum(a == b for a, b in zip(first, second, strict=True)) / max(len(first), 1)


def locality_predictions(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[int]]:
    """
    The model's teacher-forced argmax at the locality answer positions of each request that has one (`progress`:
    show a progress bar on stderr).
    """
    pairs = [(r.locality_prompt, r.locality_answer) for r in requests if r.locality_prompt is not None]
    if not pairs:
        return []
    prompts, answers = zip(*pairs, strict=True)
    desc = "Scoring locality" if progress else None
    predictions = teacher_forced_predictions(model, tokenizer, prompts, answers, batch_size, desc=desc)
    return [predicted for predicted, _ in predictions]


def scores_of_model(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    locality_before: Sequence[Sequence[int]],
    batch_size: int = 32,
    scores: Sequence[str] = DEFAULT_SCORES,
    progress: bool = False,
) -> dict[str, float]:
    """
    Scores of `model` (edited or not) on `requests`. The paper's three are the default:

    - `ES`: mean teacher-forced accuracy of the targets on the edit prompts;
    - `GS`: the same on the rephrasings (requests without any are left out);
    - `LS`: mean share of locality answer positions whose argmax is the one in `locality_before` (see
      [`locality_predictions`], taken on the unedited model).

    [`SCORES`] lists the others: `LS_acc` (locality as accuracy against the dataset's answer), the greedy exact
    matches `ES_greedy` / `GS_greedy` (what a user sees), and CounterFact's probability comparisons `CF_efficacy`,
    `CF_paraphrase`, `CF_neighborhood` (requests without a `ground_truth` are left out). With `progress`, a progress
    bar per score counts the batches (on stderr).

    Returns:
        `dict[str, float]` with the requested `scores` (`nan` where no request has what a score needs).
    """
    check_scores(scores)
    edit_pairs = [(r.prompt, r.target) for r in requests]
    rephrase_pairs = [(text, r.target) for r in requests for text in r.rephrases]
    locality_pairs = [(r.locality_prompt, r.locality_answer) for r in requests if r.locality_prompt is not None]
    results = {}

    def desc(name: str) -> str | None:
        return f"Scoring {name}" if progress else None

    for name, pairs in (("ES", edit_pairs), ("GS", rephrase_pairs)):
        if name in scores:
            results[name] = _mean(token_accuracy(model, tokenizer, *_columns(pairs), batch_size, desc=desc(name)))
    if {"LS", "LS_acc"} & set(scores):
        predictions = teacher_forced_predictions(
            model, tokenizer, *_columns(locality_pairs), batch_size, desc=desc("LS")
        )
        if "LS" in scores:
            results["LS"] = _mean(agreement(locality_before, [predicted for predicted, _ in predictions]))
        if "LS_acc" in scores:
            results["LS_acc"] = _mean([_share_equal(predicted, answer) for predicted, answer in predictions])
    for name, pairs in (("ES_greedy", edit_pairs), ("GS_greedy", rephrase_pairs)):
        if name in scores:
            results[name] = _mean(greedy_exact_match(model, tokenizer, *_columns(pairs), batch_size, desc=desc(name)))
    counterfact = [name for name in scores if name.startswith("CF_")]
    results.update(
        _counterfact_scores(model, tokenizer, requests, batch_size=batch_size, scores=counterfact, desc=desc)
    )
    return {name: results[name] for name in scores}


def _columns(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [prompt for prompt, _ in pairs], [answer for _, answer in pairs]


def _counterfact_scores(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    *,
    batch_size: int,
    scores: Sequence[str],
    desc: Callable[[str], str | None],
) -> dict[str, float]:
    """CounterFact's comparisons of P(new target) with P(ground truth), on the requests that have a ground truth."""
    known = [r for r in requests if r.ground_truth is not None]
    prompts = {
        "CF_efficacy": [r.prompt for r in known],
        "CF_paraphrase": [text for r in known for text in r.rephrases],
        "CF_neighborhood": [r.locality_prompt for r in known if r.locality_prompt is not None],
    }
    facts = {
        "CF_efficacy": known,
        "CF_paraphrase": [r for r in known for _ in r.rephrases],
        "CF_neighborhood": [r for r in known if r.locality_prompt is not None],
    }
    results = {}
    for name in scores:
        targets, truths = [r.target for r in facts[name]], [r.ground_truth for r in facts[name]]
        new = target_log_probs(model, tokenizer, prompts[name], targets, batch_size, desc=desc(name))
        true = target_log_probs(model, tokenizer, prompts[name], truths, batch_size, desc=desc(name))
        # Efficacy and paraphrase ask for the new target to win; the neighborhood asks for the truth to stay ahead.
        wins = probability_wins(true, new) if name == "CF_neighborhood" else probability_wins(new, true)
        results[name] = _mean(wins)
    return results


def probability_wins(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """`1.0` where the log-probability in `first` is above the one in `second`, else `0.0` (CounterFact's scores)."""
    return [float(a > b) for a, b in zip(first, second, strict=True)]


def edit_scores(
    editor: "MalmenEditorModel",
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence[EditRequest],
    batch_size: int = 32,
    scores: Sequence[str] = DEFAULT_SCORES,
) -> dict[str, float]:
    """Applies all `requests` at once with `editor`, returns the `scores` (see [`scores_of_model`]), and reverts."""
    before = locality_predictions(model, tokenizer, requests, batch_size)
    handle = editor.apply_edits(model, requests, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return scores_of_model(model, tokenizer, requests, before, batch_size, scores)
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
    kind = model_kind(model)
    if kind == "classifier":  # its answer is the predicted label
        labels = {index: name for name, index in CLASSIFIER_LABELS.items()}
        predictions = teacher_forced_predictions(model, tokenizer, prompts, ["SUPPORTS"] * len(prompts), batch_size)
        return [labels[predicted[0]] for predicted, _ in predictions]
    padding_side = tokenizer.padding_side
    pad_token = tokenizer.pad_token
    tokenizer.padding_side = "right" if kind == "seq2seq" else "left"  # decoder-only models continue on the right
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
            new_tokens = output if kind == "seq2seq" else output[:, inputs["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        tokenizer.pad_token = pad_token
    return answers


@torch.no_grad()
def greedy_exact_match(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
    *,
    desc: str | None = None,
) -> list[float]:
    """
    `1.0` for each `(prompt, target)` whose greedy continuation, as many tokens long as the target, reads as the
    target (what a user sees), else `0.0`. The prompts are the exact token ids the teacher-forced scores use. With
    `desc`, a progress bar of that name counts the batches (on stderr).
    """
    kind = model_kind(model)
    if kind == "classifier":  # a classifier's answer is its label: the teacher-forced argmax
        return token_accuracy(model, tokenizer, prompts, targets, batch_size, desc=desc)
    examples = tokenize_examples(tokenizer, prompts, targets, kind)
    pad_id = pad_id_of(tokenizer)
    device = model.get_input_embeddings().weight.device
    matches = [0.0] * len(examples)
    with frozen(model):
        for indices in _batches(examples, batch_size, desc):
            inputs, answers = zip(*(_prompt_and_answer(examples[i], kind) for i in indices), strict=True)
            input_ids, attention_mask = _pad_prompts(inputs, pad_id, left=kind == "causal")
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max(len(ids) for ids in answers),
                do_sample=False,
                pad_token_id=pad_id,
            )
            # An encoder-decoder's output starts with the decoder start token; a decoder-only one with the prompt.
            new_tokens = output[:, 1:] if kind == "seq2seq" else output[:, input_ids.shape[1] :]
            for index, row, answer in zip(indices, new_tokens.tolist(), answers, strict=True):
                generated = tokenizer.decode(row[: len(answer)], skip_special_tokens=True).strip()
                matches[index] = float(generated == tokenizer.decode(answer, skip_special_tokens=True).strip())
    return matches


def _batches(examples, batch_size: int, desc: str | None) -> Iterable[list[int]]:
    """`batches_by_length`, counted by a progress bar on stderr when `desc` names one."""
    batches = batches_by_length(examples, batch_size)
    return tqdm(batches, desc=desc, unit="batch", leave=False) if desc is not None else batches


def _prompt_and_answer(example, kind: str) -> tuple[list[int], list[int]]:
    """The prompt's token ids and the target's, from a teacher-forced example."""
    if kind == "seq2seq":
        return example.input_ids, [token for token in example.labels if token != IGNORE_INDEX]
    first_scored = next(t for t, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[: first_scored + 1], example.input_ids[first_scored + 1 :]


def _pad_prompts(prompts: Sequence[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads prompts to one width (on the left for decoder-only models, which continue on the right)."""
    width = max(len(ids) for ids in prompts)
    rows, masks = [], []
    for ids in prompts:
        padding = [pad_id] * (width - len(ids))
        rows.append(padding + ids if left else ids + padding)
        masks.append([0] * len(padding) + [1] * len(ids) if left else [1] * len(ids) + [0] * len(padding))
    return torch.tensor(rows), torch.tensor(masks)
