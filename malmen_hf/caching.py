"""Step 1 of MALMEN: the keys and value gradients of the edited layers on a batch of teacher-forced facts."""

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .facts import IGNORE_INDEX, TokenizedExample, collate
from .scoring import per_fact_loss, rows_of_scored_tokens, scored_logits

if TYPE_CHECKING:
    from .facts import ModelKind


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


def cached_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    examples: list[TokenizedExample],
    batches: list[list[int]],
    *,
    pad_id: int,
    kind: "ModelKind",
    token_positions: str,
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """
    Yields, batch after batch, the keys and value gradients of each edited module (see
    [`cache_keys_and_value_grads`]), with the model frozen and in eval mode meanwhile.
    """
    encoder_modules = encoder_module_names(model, modules, kind)
    if token_positions == "subject_last":
        _check_subjects(examples, kind)
    with frozen(model), torch.enable_grad():
        for indices in batches:
            batch = collate([examples[i] for i in indices], pad_id, kind)
            yield cache_keys_and_value_grads(model, modules, batch, kind, encoder_modules, token_positions)


def encoder_module_names(model: nn.Module, modules: dict[str, nn.Module], kind: "ModelKind") -> set[str]:
    """The edited modules that read every non-padding input position: an encoder's, or all of a classifier's."""
    if kind == "classifier":
        return set(modules)
    if kind != "seq2seq":
        return set()
    encoder_ids = {id(module) for module in model.get_encoder().modules()}
    return {name for name, module in modules.items() if id(module) in encoder_ids}


def _check_subjects(examples: list[TokenizedExample], kind: "ModelKind") -> None:
    """Keys read at the subject's last token need each fact's subject (and a causal model, whose prompt has it)."""
    if kind != "causal":
        raise ValueError(
            f"token_positions='subject_last' is for causal language models; this is a {kind} model. Use an editor "
            "with token_positions='target' or 'all'."
        )
    for index, example in enumerate(examples):
        if example.subject_end is None:
            raise ValueError(
                f"fact {index}: this editor reads its keys at the subject's last token (token_positions="
                "'subject_last'), so every fact needs a 'subject' that occurs in its prompt."
            )
