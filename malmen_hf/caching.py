"""Step 1 of MALMEN: the keys and value gradients of the edited layers on a batch of teacher-forced facts."""

import contextlib
import inspect
from collections.abc import Iterator, Sequence
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


class _LayerRecorder:
    """Forward hooks that record each edited layer's input (the key) and output (to differentiate against)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in self.outputs:
                raise RuntimeError(f"Module {name!r} ran twice in one forward pass; MALMEN cannot edit shared layers.")
            if not output.requires_grad:
                # The base model's weights are frozen while caching: the graph starts at the first edited layer.
                output.requires_grad_(True)
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return hook


def cache_keys_and_value_grads(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batch: dict[str, torch.Tensor],
    kind: "ModelKind",
    encoder_modules: Sequence[str] = (),
    token_positions: str = "target",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """
    Runs the base model on a collated batch and returns, for each edited module, the keys `(n, d_in)` and the value
    gradients `dL/d(output)` `(n, d_out)` at the selected token positions, where `L` is [`per_fact_loss`].

    The model's parameters should not require gradients (see [`frozen`]): the backward then reaches only
    the earliest edited layer and forms no weight gradient.

    Args:
        encoder_modules: the edited modules that sit in the encoder of an encoder-decoder model, or every edited
            module of a classifier; they use every non-padding (encoder) position.
        token_positions: `"target"` (the positions scored on target tokens), `"all"` (every non-padding position) or
            `"subject_last"` (each row's `batch["subject_positions"]`).
    """
    recorder = _LayerRecorder(modules)
    with recorder.recording():
        logits = scored_logits(model, batch, kind)
    label_mask = batch["labels"] != IGNORE_INDEX
    rows = rows_of_scored_tokens(batch["labels"]).to(logits.device)
    loss = per_fact_loss(logits, batch["labels"][label_mask].to(logits.device), rows)

    names = list(modules)
    grads = torch.autograd.grad(loss, [recorder.outputs[name] for name in names], allow_unused=True)
    decoder_mask = token_position_mask(batch, kind, token_positions)
    result = {}
    for name, grad in zip(names, grads, strict=True):
        mask = batch["attention_mask"] if name in encoder_modules else decoder_mask
        keys = recorder.inputs[name]
        if grad is None:  # the layer does not reach the loss (e.g. a decoder layer after the last scored position)
            grad = torch.zeros_like(recorder.outputs[name])
        mask = mask.bool().to(keys.device)
        result[name] = (keys[mask], grad.detach()[mask.to(grad.device)])
    return result


def token_position_mask(batch: dict[str, torch.Tensor], kind: "ModelKind", token_positions: str) -> torch.Tensor:
    """
    Which positions of a collated batch's (decoder) sequence the edited layers are read at, as a boolean
    `(batch, length)` mask: see `MalmenConfig.token_positions`.
    """
    if token_positions == "target":
        return batch["labels"] != IGNORE_INDEX
    if token_positions == "subject_last":
        mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        mask[torch.arange(mask.shape[0]), batch["subject_positions"]] = True
        return mask
    return (batch["decoder_attention_mask"] if kind == "seq2seq" else batch["attention_mask"]).bool()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """
    Puts `model` in eval mode with no parameter requiring gradients, and restores both afterwards: each module's own
    mode (a model in training with a submodule in eval mode comes back so) and each parameter's flag.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()  # dropout off: caching must be deterministic
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
