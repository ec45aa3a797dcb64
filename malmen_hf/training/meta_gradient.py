"""Meta-training of MALMEN editors: the decoupled meta-gradient of ALGORITHM.md step 4."""

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..caching import cached_batches, frozen
from ..edits import shift_weights
from ..facts import (
    EditRequest,
    TokenizedExample,
    batches_by_length,
    collate,
    model_kind,
    pad_id_of,
    tokenize_edit_prompts,
    tokenize_examples,
)
from ..functional import at_least_float32
from ..layers import edited_modules
from ..scoring import scored_logits
from ..solve import NormalEquationSums, backward_through_solve
from .losses import generalization_loss, locality_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..facts import ModelKind

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MetaLosses:
    """The losses of one meta-training step, measured with the edit applied."""

    generalization: float
    locality: float
    total: float
    num_facts: int


@dataclass
class _MetaExamples:
    """What the meta-losses are measured on: the generalization examples (and the fact of each), the locality ones."""

    generalization: list[TokenizedExample]
    fact_of_generalization: list[int]
    locality: list[TokenizedExample]
    num_facts: int  # over all processes, as the two below
    num_locality: int


def meta_gradient(
    editor: nn.Module,
    model: "PreTrainedModel",
    requests: Sequence[EditRequest],
    tokenizer: "PreTrainedTokenizerBase",
    *,
    batch_size: int = 32,
    editor_batch_size: int = 1024,
    c_loc: float = 1.0,
    generalization_on_edit_prompt: bool = False,
    update_normalizer: bool = True,
    all_reduce: Reduce | None = None,
) -> MetaLosses:
    """
    Adds `dL_meta / d(editor)` to the `.grad` of the editor's parameters, for one step on `requests`, without ever
    holding the base model's graph for more than one batch (MALMEN's decoupled back-propagation).

    `L_meta = L_gen + c_loc * L_loc`: `L_gen` is the cross-entropy of each target on its rephrasings (on the edit
    prompt when a request has none), `L_loc` the KL divergence of the unedited from the edited model's next-token
    distribution on each locality prompt's answer tokens; both averaged per fact, then over facts.

    Steps: cache keys and value gradients; compute the shift `S` without editor graph; apply it, accumulate
    `G = dL_meta/dS` over base-model batches, remove it; back-propagate through the normal equation in closed form;
    re-run the hyper-network chunk by chunk with gradients.

    Args:
        generalization_on_edit_prompt (`bool`, defaults to `False`):
            Score `L_gen` on the edit prompt too, as one more rephrasing of each fact (CounterFact's rephrasings
            start with an unrelated sentence, so they alone may teach the editor little about the prompt itself).
        update_normalizer (`bool`, defaults to `True`):
            Merge this step's keys and value gradients into the hyper-networks' running statistics first.
        all_reduce (`Callable`, *optional*):
            A sum across processes (e.g. `lambda t: accelerator.reduce(t, "sum")`) when the step's facts are split
            between processes: each passes its own `requests`. The normal equation, the statistics and `dL/dS` are
            summed, so every process solves the same system, and the editor's gradients are summed too: the result is
            the gradient of one process holding all the facts.
    """
    reduce = all_reduce or (lambda tensor: tensor)
    modules = edited_modules(editor, model)
    kind = model_kind(model)
    pad_id = pad_id_of(tokenizer)
    keys, value_grads = _cache_all(editor, model, modules, requests, tokenizer, batch_size=batch_size, kind=kind)
    if update_normalizer:
        for name in modules:
            net, _ = editor.net_for(name)
            net.normalizer.update(torch.cat((keys[name], value_grads[name]), dim=-1), all_reduce=all_reduce)

    examples = _meta_examples(requests, tokenizer, kind, generalization_on_edit_prompt, reduce)
    sums = NormalEquationSums(editor, modules, num_facts=examples.num_facts)
    with torch.no_grad():
        sums.add({name: (keys[name], value_grads[name]) for name in modules}, editor_batch_size)
        for totals in (sums.gram, sums.cross):
            totals.update({name: reduce(total) for name, total in totals.items()})
    shifts = sums.solve()

    weight_grads, losses = _grads_of_shifted_model(
        model, modules, shifts, examples, batch_size=batch_size, pad_id=pad_id, kind=kind, c_loc=c_loc
    )
    weight_grads = {name: reduce(grad) for name, grad in weight_grads.items()}
    generalization, locality = reduce(torch.tensor([losses.generalization, losses.locality], dtype=torch.float64))

    # Each process back-propagates its own tokens; the sum over processes is the gradient of all facts.
    earlier = {param: param.grad for param in editor.parameters()}
    editor.zero_grad(set_to_none=True)
    lambda_grads = [
        backward_through_solve(
            editor, name, keys=keys[name], value_grads=value_grads[name], sums=sums, shift=shifts[name],
            shift_grad=weight_grads[name], editor_batch_size=editor_batch_size,
        )
        for name in modules
    ]  # fmt: skip
    for param, grad in earlier.items():
        local = torch.zeros_like(param) if param.grad is None else param.grad
        param.grad = reduce(local) if grad is None else grad + reduce(local)
    # The lambda gradient comes from the summed normal equation: it is global already, so it is added after the sum.
    for net, layer_index, lambda_grad in filter(None, lambda_grads):
        net.log_lambda.grad[layer_index] += lambda_grad
    return MetaLosses(
        generalization=float(generalization),
        locality=float(locality),
        total=float(generalization + c_loc * locality),
        num_facts=examples.num_facts,
    )


def _cache_all(
    editor: nn.Module,
    model: nn.Module,
    modules: dict[str, nn.Module],
    requests: Sequence[EditRequest],
    tokenizer: "PreTrainedTokenizerBase",
    *,
    batch_size: int,
    kind: "ModelKind",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every token's key and value gradient per module, on the editor's device and dtype (training needs them)."""
    examples = tokenize_edit_prompts(tokenizer, requests, kind)
    keys = {name: [] for name in modules}
    value_grads = {name: [] for name in modules}
    stream = cached_batches(
        model, modules, examples, batches_by_length(examples, batch_size),
        pad_id=pad_id_of(tokenizer), kind=kind, token_positions=editor.config.token_positions,
    )  # fmt: skip
    with contextlib.closing(stream):
        for cached in stream:
            for name, (batch_keys, batch_grads) in cached.items():
                keys[name].append(batch_keys.to(editor.device, editor.dtype))
                value_grads[name].append(batch_grads.to(editor.device, editor.dtype))
    return (
        {name: torch.cat(chunks) for name, chunks in keys.items()},
        {name: torch.cat(chunks) for name, chunks in value_grads.items()},
    )


def _meta_examples(
    requests: Sequence[EditRequest],
    tokenizer: "PreTrainedTokenizerBase",
    kind: "ModelKind",
    with_edit_prompt: bool,
    reduce: Reduce,
) -> _MetaExamples:
    """
    The `L_gen` examples: each request's rephrasings, plus its edit prompt if `with_edit_prompt` or if it has no
    rephrasing; the `L_loc` examples: the locality prompts with their answers.
    """
    prompts, targets, facts = [], [], []
    for index, request in enumerate(requests):
        prompts_of_fact = (*request.rephrases, request.prompt) if with_edit_prompt else request.rephrases
        for prompt in prompts_of_fact or (request.prompt,):
            prompts.append(prompt)
            targets.append(request.target)
            facts.append(index)
    local = [request for request in requests if request.locality_prompt is not None]
    locality = tokenize_examples(
        tokenizer, [r.locality_prompt for r in local], [r.locality_answer for r in local], kind
    )
    return _MetaExamples(
        generalization=tokenize_examples(tokenizer, prompts, targets, kind),
        fact_of_generalization=facts,
        locality=locality,
        num_facts=int(reduce(torch.tensor(float(len(requests)), dtype=torch.float64))),
        num_locality=int(reduce(torch.tensor(float(len(locality)), dtype=torch.float64))),
    )


def _grads_of_shifted_model(
    model: nn.Module,
    modules: dict[str, nn.Module],
    shifts: dict[str, torch.Tensor],
    examples: _MetaExamples,
    *,
    batch_size: int,
    pad_id: int,
    kind: "ModelKind",
    c_loc: float,
) -> tuple[dict[str, torch.Tensor], MetaLosses]:
    """With the shifts applied, `dL_meta/dS` per module as a `(d_in, d_out)` matrix, and the losses."""
    originals = shift_weights(modules, shifts)
    shifted = {name: module.weight.detach().clone() for name, module in modules.items()}
    try:
        with frozen(model):
            # Only the edited weights take gradients: dL/dS is what the closed-form backward needs.
            for module in modules.values():
                module.weight.requires_grad_(True)
                module.weight.grad = None
            gen_loss = _backward_generalization(model, examples, batch_size=batch_size, pad_id=pad_id, kind=kind)
            loc_loss = 0.0
            for indices in batches_by_length(examples.locality, batch_size) if examples.locality else []:
                batch = collate([examples.locality[i] for i in indices], pad_id, kind)
                # The unedited distribution, batch by batch: memory does not grow with the number of facts.
                with torch.no_grad():
                    _copy_weights(modules, originals)
                    log_p_before = torch.log_softmax(at_least_float32(scored_logits(model, batch, kind)), -1)
                    _copy_weights(modules, shifted)
                loss = locality_loss(model, batch, log_p_before, kind)
                (c_loc * loss / examples.num_locality).backward()
                loc_loss += float(loss.detach()) / examples.num_locality
            grads = {}
            for name, module in modules.items():
                # A process may hold no example of its own: its share of dL/dS is then zero.
                grad = torch.zeros_like(module.weight) if module.weight.grad is None else module.weight.grad
                grads[name] = grad if isinstance(module, Conv1D) else grad.T
    finally:
        with torch.no_grad():
            _copy_weights(modules, originals)
        for module in modules.values():
            module.weight.grad = None
    losses = MetaLosses(
        generalization=gen_loss, locality=loc_loss, total=gen_loss + c_loc * loc_loss, num_facts=examples.num_facts
    )
    return grads, losses


def _backward_generalization(
    model: nn.Module, examples: _MetaExamples, *, batch_size: int, pad_id: int, kind: "ModelKind"
) -> float:
    """Back-propagates `L_gen` (each fact's rephrasings weigh 1 in all) batch by batch; returns its value."""
    rephrasings_per_fact = Counter(examples.fact_of_generalization)
    total = 0.0
    for indices in batches_by_length(examples.generalization, batch_size):
        batch = collate([examples.generalization[i] for i in indices], pad_id, kind)
        facts = [examples.fact_of_generalization[i] for i in indices]
        weights = torch.tensor([1.0 / rephrasings_per_fact[fact] for fact in facts])
        loss = generalization_loss(model, batch, weights, kind)
        (loss / examples.num_facts).backward()
        total += float(loss.detach()) / examples.num_facts
    return total


def _copy_weights(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        modules[name].weight.copy_(weight)
