"""The two losses of meta-training (ALGORITHM.md step 4): generalization of the edit, and locality around it."""

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..facts import IGNORE_INDEX
from ..functional import at_least_float32
from ..scoring import per_fact_loss, per_fact_mean, rows_of_scored_tokens, scored_logits

if TYPE_CHECKING:
    from ..facts import ModelKind


def generalization_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], example_weights: torch.Tensor, kind: "ModelKind"
) -> torch.Tensor:
    """Cross-entropy averaged over each example's target tokens, weighted so that each fact's rephrasings weigh 1."""
    logits = scored_logits(model, batch, kind)
    labels = batch["labels"][batch["labels"] != IGNORE_INDEX].to(logits.device)
    return per_fact_loss(logits, labels, rows_of_scored_tokens(batch["labels"]).to(logits.device), example_weights)


def locality_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], log_p_before: torch.Tensor, kind: "ModelKind"
) -> torch.Tensor:
    """KL(p_before || p_after) at each answer token, averaged per example, summed over the batch."""
    log_p_after = torch.log_softmax(at_least_float32(scored_logits(model, batch, kind)), dim=-1)
    log_p_before = log_p_before.to(log_p_after.device)
    token_kl = (log_p_before.exp() * (log_p_before - log_p_after)).sum(-1)
    return per_fact_mean(token_kl, rows_of_scored_tokens(batch["labels"]).to(token_kl.device))
