"""Step 1 of MALMEN: the keys and value gradients of the edited layers on a batch of teacher-forced facts."""

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

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


class _InputGradientAtRows(torch.autograd.Function):
    """
    A linear layer's output, already computed, whose backward forms the gradient of the layer's input at the given
    rows of its `(batch * length)` positions only, and zero at the others.
    """

    @staticmethod
    def forward(ctx, inputs, output, weight, rows, weight_is_in_by_out):
        ctx.save_for_backward(weight, rows.to(weight.device))
        ctx.input_shape, ctx.input_device, ctx.weight_is_in_by_out = inputs.shape, inputs.device, weight_is_in_by_out
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        weight, rows = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1]).index_select(0, rows)
        grad_rows = grad_rows @ (weight.T if ctx.weight_is_in_by_out else weight)
        grad_input = grad_rows.new_zeros(ctx.input_shape.numel() // ctx.input_shape[-1], ctx.input_shape[-1])
        grad_input = grad_input.index_copy_(0, rows, grad_rows).view(ctx.input_shape)
        # A model split over devices (device_map) hands a layer its input from the previous device.
        return grad_input.to(ctx.input_device), None, None, None, None


@contextlib.contextmanager
def input_gradients_at(model: nn.Module, needed: torch.Tensor) -> Iterator[None]:
    """
    Within the block, the backward of each of `model`'s linear layers (`nn.Linear`, GPT-2's `Conv1D`) that runs on
    the `(batch, length)` positions of `needed` forms its input's gradient at the `needed` positions only.

    Exact for a causal model when `needed` holds, in each row, every position from the first whose gradient is
    wanted to the last scored one: a position's hidden states only reach later positions, so the gradients at the
    earlier positions never flow back into wanted ones, and those after the last scored position are zero. The
    backward through the blocks after the first edited layer then costs a few rows per fact instead of its whole
    prompt (CounterFact: about 1 in 8 positions).
    """
    if needed.all():  # no padding and every position wanted: the full backward is the same, without the copies
        yield
        return
    rows = needed.flatten().nonzero().squeeze(1)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        inputs = args[0] if args else None
        if not (torch.is_tensor(inputs) and inputs.requires_grad and inputs.shape[:-1] == needed.shape):
            return None  # before the first edited layer (no graph), or not one row per position
        if module.weight.device.type == "meta":
            return None  # offloaded by accelerate until its next forward: keep autograd's own backward
        weight_is_in_by_out = type(module) is Conv1D  # Conv1D computes x @ W, nn.Linear x @ W.T
        return _InputGradientAtRows.apply(inputs, output.detach(), module.weight, rows, weight_is_in_by_out)

    linears = [module for module in model.modules() if type(module) in (nn.Linear, Conv1D)]
    # prepend: the layer recorder's hooks must see (and differentiate against) the output this hook returns.
    handles = [module.register_forward_hook(hook, prepend=True) for module in linears]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def needed_positions(wanted: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """
    The `(batch, length)` positions whose gradient a causal model's backward must form to reach the `wanted` ones
    from the loss at the `scored` ones: in each row, from its first wanted or scored position to its last scored one.
    """
    after_first = (wanted | scored).long().cumsum(1) > 0
    up_to_last = scored.flip(1).long().cumsum(1).flip(1) > 0
    return after_first & up_to_last


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
    the earliest edited layer and forms no weight gradient. For a causal model it also runs over the positions that
    reach a selected one only (see [`input_gradients_at`]).

    Args:
        encoder_modules: the edited modules that sit in the encoder of an encoder-decoder model, or every edited
            module of a classifier; they use every non-padding (encoder) position.
        token_positions: `"target"` (the positions scored on target tokens), `"all"` (every non-padding position) or
            `"subject_last"` (each row's `batch["subject_positions"]`).
    """
    label_mask = batch["labels"] != IGNORE_INDEX
    decoder_mask = token_position_mask(batch, kind, token_positions)
    device = model.get_input_embeddings().weight.device
    restricted = (
        input_gradients_at(model, needed_positions(decoder_mask, label_mask).to(device))
        if kind == "causal"
        else contextlib.nullcontext()
    )
    recorder = _LayerRecorder(modules)
    with restricted, recorder.recording():
        logits = scored_logits(model, batch, kind)
    rows = rows_of_scored_tokens(batch["labels"]).to(logits.device)
    loss = per_fact_loss(logits, batch["labels"][label_mask].to(logits.device), rows)

    names = list(modules)
    grads = torch.autograd.grad(loss, [recorder.outputs[name] for name in names], allow_unused=True)
    result = {}
    for name, grad in zip(names, grads, strict=True):
        mask = batch["attention_mask"] if name in encoder_modules else decoder_mask
        keys = recorder.inputs[name]
        if grad is None:
            # A silent zero would edit this layer by nothing while the others take the whole edit.
            raise RuntimeError(
                f"No gradient reached the edited layer {name!r}: its output is not part of what the loss is computed "
                "from (a layer the model's forward skips or replaces, e.g. a compiled forward on torch < 2.6, or a "
                "layer after every scored position). Edit the plain model, or edit other layers. Nothing was changed."
            )
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
    mode (a model in training with a submodule in eval mode comes back so) and each parameter's flag. A compiled
    model (`torch.compile`) runs eagerly meanwhile: the hooks that read keys and gradients must see every layer, and
    a compiled graph can leave an edited layer's output out of the graph the loss is differentiated through.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()  # dropout off: caching must be deterministic
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        with _eager():
            yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def _eager() -> contextlib.AbstractContextManager:
    """Compiled code runs eagerly within the block (torch >= 2.6); nothing changes where torch cannot do this."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


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
    _check_not_the_head(model, modules, kind)
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


def _check_not_the_head(model: nn.Module, modules: dict[str, nn.Module], kind: "ModelKind") -> None:
    """A causal model's head runs on the scored positions only: it has no key at the others to read."""
    head = model.get_output_embeddings() if kind == "causal" else None
    for name, module in modules.items():
        if module is head:
            raise ValueError(
                f"{name!r} is the model's output head: MALMEN edits layers inside the model (e.g. the MLP output "
                "projections, `malmen_hf.default_edit_modules(model)`), not the head. Nothing was changed."
            )


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
