"""
The base model's logits at the scored positions of a batch, and losses averaged per fact: what caching (step 1),
training (step 4) and the metrics all score with.
"""

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from .facts import IGNORE_INDEX
from .functional import at_least_float32

if TYPE_CHECKING:
    from .facts import ModelKind


def per_fact_mean(
    token_values: torch.Tensor, row_of_token: torch.Tensor, row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """
    The mean of `token_values` over each fact's (batch row's) tokens, summed over facts (each weighted by
    `row_weights` when given): each fact weighs the same whatever its length, and its gradient does not depend on the
    other facts of its batch.
    """
    tokens_per_row = torch.bincount(row_of_token).clamp_min(1).to(token_values.dtype)
    weights = 1.0 / tokens_per_row[row_of_token]
    if row_weights is not None:
        weights = weights * row_weights.to(weights.device, weights.dtype)[row_of_token]
    return (token_values * weights).sum()


def per_fact_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_of_token: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Cross-entropy averaged over each fact's target tokens, then summed over facts, each weighted by `row_weights`
    when given (see [`per_fact_mean`]).

    Args:
        logits (`torch.Tensor` of shape `(n, vocab)`): logits at the scored positions only.
        labels (`torch.Tensor` of shape `(n,)`): the target token of each scored position.
        row_of_token (`torch.Tensor` of shape `(n,)`): the fact (batch row) each scored position belongs to.
    """
    token_losses = nn.functional.cross_entropy(at_least_float32(logits), labels, reduction="none")
    return per_fact_mean(token_losses, row_of_token, row_weights)


def rows_of_scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The batch row of each scored position (`labels != -100`), in the order `logits[mask]` flattens them."""
    mask = labels != IGNORE_INDEX
    return torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]


def scored_logits(model: nn.Module, batch: dict[str, torch.Tensor], kind: "ModelKind") -> torch.Tensor:
    """
    The logits at the scored positions of a collated batch (`labels != -100`), flattened to `(n, vocab)`.

    For causal models the language-model head runs on those positions only (`logits_to_keep` with a boolean mask),
    which saves most of the head's cost. A one-logit classifier's logit `z` becomes the two-class logits `(0, z)`
    (REFUTES, SUPPORTS): their softmax is `(1 - sigmoid(z), sigmoid(z))`, so the cross-entropy is the binary
    cross-entropy, the KL divergence the Bernoulli one, and the argmax the predicted label.
    """
    device = model.get_input_embeddings().weight.device
    label_mask = batch["labels"] != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if kind == "classifier":
        logits = model(**inputs).logits  # (batch, 1)
        return torch.cat((torch.zeros_like(logits), logits), dim=-1)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"].to(device))
        inputs["decoder_attention_mask"] = batch["decoder_attention_mask"].to(device)
    elif "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(**inputs, logits_to_keep=label_mask.to(device), use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])
    logits = model(**inputs, use_cache=False).logits
    return logits[label_mask.to(logits.device)]
