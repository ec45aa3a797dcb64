"""Meta-training of MALMEN editors: the decoupled meta-gradient of ALGORITHM.md step 4."""

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .caching import frozen, per_fact_loss, per_fact_mean, rows_of_scored_tokens, scored_logits
from .data import load_edit_requests
from .editing import _apply_shifts, _checked_modules, _encoder_module_names, _NormalEquationSums, cached_batches
from .facts import (
    IGNORE_INDEX,
    EditRequest,
    TokenizedExample,
    batches_by_length,
    collate,
    model_kind,
    pad_id_of,
    tokenize_edit_prompts,
    tokenize_examples,
)
from .functional import at_least_float32, value_differences
from .layers import weight_shape
from .modeling_malmen import MalmenEditorModel
from .shipped import COUNTERFACT_SAMPLE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The training-free editor's settings: chosen for SmolLM2-135M by `benchmarks/quality.py --tune` (the mean of all
# scores when 128 held-out CounterFact training facts are edited at once), the best of lr 1e-5 ... 1e-3 and
# log lambda 0, 2, 4.
TRAINING_FREE_LR = 1e-3
TRAINING_FREE_LOG_LAMBDA = 2.0


@dataclass
class MetaLosses:
    """The losses of one meta-training step, measured with the edit applied."""

    generalization: float
    locality: float
    total: float
    num_facts: int


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
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
    modules = _checked_modules(editor, model)
    kind = model_kind(model)
    pad_id = pad_id_of(tokenizer)
    num_facts = int(reduce(torch.tensor(float(len(requests)), dtype=torch.float64)))
    keys, value_grads = _cache_all(editor, model, modules, requests, tokenizer, batch_size, pad_id)
    if update_normalizer:
        for name in modules:
            net, _ = editor.net_for(name)
            net.normalizer.update(torch.cat((keys[name], value_grads[name]), dim=-1), all_reduce=all_reduce)

    sums = _NormalEquationSums(editor, modules, num_facts=num_facts)
    with torch.no_grad():
        sums.add({name: (keys[name], value_grads[name]) for name in modules}, editor_batch_size)
        for totals in (sums.gram, sums.cross):
            totals.update({name: reduce(total) for name, total in totals.items()})
    shifts = sums.solve()

    gen_examples, gen_rows = _generalization_examples(requests, tokenizer, kind, generalization_on_edit_prompt)
    loc_requests = [request for request in requests if request.locality_prompt is not None]
    loc_examples = tokenize_examples(
        tokenizer,
        [request.locality_prompt for request in loc_requests],
        [request.locality_answer for request in loc_requests],
        kind,
    )
    loc_batches = batches_by_length(loc_examples, batch_size) if loc_examples else []

    num_locality = int(reduce(torch.tensor(float(len(loc_examples)), dtype=torch.float64)))
    weight_grads, losses = _grads_of_shifted_model(
        model, modules, shifts, gen_examples, gen_rows, num_facts, loc_examples, num_locality, loc_batches,
        batch_size, pad_id, kind, c_loc,
    )  # fmt: skip
    weight_grads = {name: reduce(grad) for name, grad in weight_grads.items()}
    generalization, locality = reduce(torch.tensor([losses.generalization, losses.locality], dtype=torch.float64))

    # Each process back-propagates its own tokens; the sum over processes is the gradient of all facts.
    earlier = {param: param.grad for param in editor.parameters()}
    editor.zero_grad(set_to_none=True)
    lambda_grads = [
        _backward_through_solve(
            editor, name, keys[name], value_grads[name], sums, shifts[name], weight_grads[name], editor_batch_size
        )
        for name in modules
    ]
    for param, grad in earlier.items():
        local = torch.zeros_like(param) if param.grad is None else param.grad
        param.grad = reduce(local) if grad is None else grad + reduce(local)
    # The lambda gradient comes from the summed normal equation: it is global already, so it is added after the sum.
    for net, layer_index, lambda_grad in filter(None, lambda_grads):
        net.lamda.grad[layer_index] += lambda_grad
    return MetaLosses(
        generalization=float(generalization),
        locality=float(locality),
        total=float(generalization + c_loc * locality),
        num_facts=num_facts,
    )


def fit_normalizer(
    editor: nn.Module,
    model: "PreTrainedModel",
    requests: Sequence[EditRequest],
    tokenizer: "PreTrainedTokenizerBase",
    *,
    batch_size: int = 32,
) -> None:
    """
    Merges the keys and value gradients of `model` on `requests` into the editor's running statistics, without
    training anything else.

    This is what makes an untrained (training-free) editor usable: its blocks are the identity on *normalized*
    inputs, so its value differences are the standardized gradients only once the statistics are fitted. Training
    does this at every step (see [`meta_gradient`]); call it once before using an untrained editor.
    """
    modules = _checked_modules(editor, model)
    examples = tokenize_edit_prompts(tokenizer, requests, model_kind(model))
    batches = batches_by_length(examples, batch_size)
    with contextlib.closing(cached_batches(editor, model, modules, examples, batches, pad_id_of(tokenizer))) as stream:
        for cached in stream:
            for name, (keys, value_grads) in cached.items():
                net, _ = editor.net_for(name)
                inputs = torch.cat((keys, value_grads), dim=-1)
                net.normalizer.update(inputs.to(net.normalizer.mean.device))


def fit_key_covariance(
    editor: nn.Module,
    model: "PreTrainedModel",
    texts: Sequence[str],
    tokenizer: "PreTrainedTokenizerBase",
    *,
    batch_size: int = 32,
) -> None:
    """
    Fits the preserved keys' covariance `C0` of each edited layer (see `MalmenConfig.covariance_weight`): the mean
    `k k^T` of the layer's inputs over every token of `texts`, text whose continuations the edits should leave alone
    (MEMIT uses Wikipedia; the prompts of other facts do well). An encoder-decoder model reads each text on both
    sides. Replaces any earlier fit; [`train_editor`] fits it from its training facts when it is missing.
    """
    if editor.config.covariance_weight == 0:
        raise ValueError(
            "This editor has covariance_weight=0: build it with covariance_weight > 0 to use a covariance."
        )
    modules = _checked_modules(editor, model)
    kind = model_kind(model)
    examples = [_as_plain_text_example(tokenizer, text, kind) for text in texts]
    decoder_modules = set(modules) - _encoder_module_names(model, modules)
    sums = {
        name: torch.zeros(weight_shape(module)[0], weight_shape(module)[0], dtype=torch.float64)
        for name, module in modules.items()
    }
    counts = dict.fromkeys(modules, 0)
    inputs_of: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _, args, __, name=name: inputs_of.__setitem__(name, args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        with frozen(model), torch.no_grad():
            for indices in batches_by_length(examples, batch_size):
                batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), kind)
                _run_for_keys(model, batch, kind)
                for name in modules:
                    mask = batch[
                        "decoder_attention_mask" if kind == "seq2seq" and name in decoder_modules else "attention_mask"
                    ]
                    keys = inputs_of[name][mask.bool().to(inputs_of[name].device)].float()
                    sums[name] += (keys.T @ keys).double().cpu()  # float32 per batch, summed in float64
                    counts[name] += keys.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
    for name in modules:
        editor.key_covariance(name).fit(sums[name], counts[name])


def covariance_texts(requests: Sequence[EditRequest], max_facts: int = 1000) -> list[str]:
    """The texts [`train_editor`] fits a missing key covariance on: every prompt of the first `max_facts` facts."""
    return [text for r in requests[:max_facts] for text in (r.prompt, *r.rephrases, r.locality_prompt) if text]


def _as_plain_text_example(tokenizer, text: str, kind: str) -> TokenizedExample:
    """A text to read, not to score: no labels, except the decoder's copy of the text for an encoder-decoder."""
    input_ids = tokenizer(text.strip())["input_ids"]
    return TokenizedExample(
        input_ids=input_ids, labels=input_ids if kind == "seq2seq" else [IGNORE_INDEX] * len(input_ids)
    )


def _run_for_keys(model, batch: dict[str, torch.Tensor], kind: str) -> None:
    device = model.get_input_embeddings().weight.device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"].to(device))
        inputs["decoder_attention_mask"] = batch["decoder_attention_mask"].to(device)
    elif kind == "causal":
        inputs.update(logits_to_keep=1, use_cache=False)  # the head's output is not needed
    model(**inputs)


def training_free_editor(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    fit_requests: Sequence[EditRequest] | None = None,
    *,
    edit_modules: Sequence[str] | None = None,
    lr: float = TRAINING_FREE_LR,
    log_lambda: float = TRAINING_FREE_LOG_LAMBDA,
    batch_size: int = 32,
    **config_kwargs,
) -> MalmenEditorModel:
    """
    The training-free MALMEN editor of `model`: an untrained hyper-network without blocks (each value difference is
    then the standardized value gradient, scaled by `lr`) and the least-squares aggregation with ridge
    `exp(log_lambda)`, its normalizer fitted on `fit_requests` (see [`fit_normalizer`]), and its preserved keys'
    covariance on their prompts when `covariance_weight > 0` is given (see [`fit_key_covariance`]).

    The defaults are the settings the quality benchmark (`benchmarks/quality.py`) uses and chose for SmolLM2-135M on
    CounterFact training facts: lr 1e-3, log lambda 2, the normalizer fitted on the first 512 training facts (shipped
    as `malmen_hf.shipped.COUNTERFACT_SAMPLE`). It edits many facts at once with a high ES but a low locality (LS):
    see the README's quality table.

    Args:
        model ([`PreTrainedModel`]): The base model to edit.
        tokenizer ([`PreTrainedTokenizerBase`]): Its tokenizer.
        fit_requests (sequence of [`EditRequest`], *optional*): Facts whose keys and value gradients fit the
            normalizer. Defaults to the shipped CounterFact sample.
        edit_modules (`list[str]`, *optional*): The layers to edit (default: per architecture family).
        lr (`float`, defaults to 1e-3): The per-layer learning rate of every edited layer.
        log_lambda (`float`, defaults to 2.0): The log of the ridge coefficient of every edited layer.
        batch_size (`int`, defaults to 32): Facts per forward/backward pass while fitting.
        config_kwargs: Further [`MalmenConfig`] fields (e.g. `base_model_name_or_path`).
    """
    editor = MalmenEditorModel.for_model(
        model, edit_modules, n_blocks=0, lr_init=lr, lambda_init=log_lambda, **config_kwargs
    )
    if fit_requests is None:
        fit_requests = load_edit_requests(COUNTERFACT_SAMPLE, "counterfact")
    fit_normalizer(editor, model, fit_requests, tokenizer, batch_size=batch_size)
    if editor.config.covariance_weight > 0:
        fit_key_covariance(editor, model, covariance_texts(fit_requests), tokenizer, batch_size=batch_size)
    return editor


def _cache_all(editor, model, modules, requests, tokenizer, batch_size, pad_id):
    """Every token's key and value gradient per module, on the editor's device and dtype (training needs them)."""
    kind = model_kind(model)
    examples = tokenize_edit_prompts(tokenizer, requests, kind)
    keys = {name: [] for name in modules}
    value_grads = {name: [] for name in modules}
    batches = batches_by_length(examples, batch_size)
    with contextlib.closing(cached_batches(editor, model, modules, examples, batches, pad_id)) as stream:
        for cached in stream:
            for name, (batch_keys, batch_grads) in cached.items():
                keys[name].append(batch_keys.to(editor.device, editor.dtype))
                value_grads[name].append(batch_grads.to(editor.device, editor.dtype))
    return (
        {name: torch.cat(chunks) for name, chunks in keys.items()},
        {name: torch.cat(chunks) for name, chunks in value_grads.items()},
    )


def _generalization_examples(requests, tokenizer, kind, with_edit_prompt):
    """(prompt, target) examples of `L_gen` and the request each belongs to: the rephrasings, plus the edit prompt if
    `with_edit_prompt` or if a request has no rephrasing."""
    prompts, targets, rows = [], [], []
    for row, request in enumerate(requests):
        prompts_of_fact = (*request.rephrases, request.prompt) if with_edit_prompt else request.rephrases
        for prompt in prompts_of_fact or (request.prompt,):
            prompts.append(prompt)
            targets.append(request.target)
            rows.append(row)
    return tokenize_examples(tokenizer, prompts, targets, kind), rows


def _grads_of_shifted_model(
    model, modules, shifts, gen_examples, gen_rows, num_facts, loc_examples, num_locality, loc_batches,
    batch_size, pad_id, kind, c_loc,
):  # fmt: skip
    """With the shifts applied, `dL_meta/dS` per module as a `(d_in, d_out)` matrix, and the losses."""
    originals = _apply_shifts(modules, shifts)
    shifted = {name: module.weight.detach().clone() for name, module in modules.items()}
    try:
        with frozen(model):
            # Only the edited weights take gradients: dL/dS is what the closed-form backward needs.
            for module in modules.values():
                module.weight.requires_grad_(True)
                module.weight.grad = None
            rephrasings_per_fact = Counter(gen_rows)
            gen_loss = 0.0
            for indices in batches_by_length(gen_examples, batch_size):
                batch = collate([gen_examples[i] for i in indices], pad_id, kind)
                weights = torch.tensor([1.0 / rephrasings_per_fact[gen_rows[i]] for i in indices])
                loss = _generalization_loss(model, batch, weights, kind)
                (loss / num_facts).backward()
                gen_loss += float(loss.detach()) / num_facts
            loc_loss = 0.0
            for indices in loc_batches:
                batch = collate([loc_examples[i] for i in indices], pad_id, kind)
                # The unedited distribution, batch by batch: memory does not grow with the number of facts.
                with torch.no_grad():
                    _copy_weights(modules, originals)
                    logits = at_least_float32(scored_logits(model, batch, kind))
                    log_p_before = torch.log_softmax(logits, -1)
                    _copy_weights(modules, shifted)
                loss = _locality_loss(model, batch, log_p_before, kind)
                (c_loc * loss / num_locality).backward()
                loc_loss += float(loss.detach()) / num_locality
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
        generalization=gen_loss, locality=loc_loss, total=gen_loss + c_loc * loc_loss, num_facts=num_facts
    )
    return grads, losses


def _copy_weights(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        modules[name].weight.copy_(weight)


def _generalization_loss(model, batch, example_weights, kind) -> torch.Tensor:
    """Cross-entropy averaged over each example's target tokens, weighted so that each fact's rephrasings weigh 1."""
    logits = scored_logits(model, batch, kind)
    labels = batch["labels"][batch["labels"] != IGNORE_INDEX].to(logits.device)
    return per_fact_loss(logits, labels, rows_of_scored_tokens(batch["labels"]).to(logits.device), example_weights)


def _locality_loss(model, batch, log_p_before, kind) -> torch.Tensor:
    """KL(p_before || p_after) at each answer token, averaged per example, summed over the batch."""
    log_p_after = torch.log_softmax(at_least_float32(scored_logits(model, batch, kind)), dim=-1)
    log_p_before = log_p_before.to(log_p_after.device)
    token_kl = (log_p_before.exp() * (log_p_before - log_p_after)).sum(-1)
    return per_fact_mean(token_kl, rows_of_scored_tokens(batch["labels"]).to(token_kl.device))


def _backward_through_solve(editor, name, keys, value_grads, sums, shift, shift_grad, editor_batch_size):
    """
    Closed-form backward through `S = (K^T K + e^lambda I)^-1 K^T D` (or MEND's sum), then through the hyper-network
    on this process's tokens (into `.grad`). Returns `(net, layer_index, dL/dlambda)`, or `None` for the sum.
    """
    net, layer_index = editor.net_for(name)
    shift_grad = shift_grad.to(shift.device, shift.dtype)
    if sums.least_squares:
        log_lambda = net.lamda[layer_index]
        eye = torch.eye(keys.shape[1], device=keys.device, dtype=keys.dtype)
        system = sums.system_gram(name) + torch.exp(log_lambda.detach()) * eye
        solved = torch.linalg.solve(system, shift_grad)  # M^-1 G, with M symmetric
        lambda_grad = -torch.exp(log_lambda.detach()) * (solved * shift).sum()
    for start in range(0, keys.shape[0], editor_batch_size):
        chunk_keys = keys[start : start + editor_batch_size]
        chunk_grads = value_grads[start : start + editor_batch_size]
        pseudo_keys, pseudo_grads = net(chunk_keys, chunk_grads, layer_index)
        if sums.least_squares:
            diffs = value_differences(chunk_keys, pseudo_keys, pseudo_grads, net.lr[layer_index])
            # dL/dD = K M^-1 G: each token's value difference sees the gradient of its own row.
            surrogate = (diffs * (chunk_keys @ solved)).sum()
        else:
            surrogate = -net.lr[layer_index] * (pseudo_keys.T @ pseudo_grads * shift_grad).sum()
        surrogate.backward()
    return (net, layer_index, lambda_grad) if sums.least_squares else None
