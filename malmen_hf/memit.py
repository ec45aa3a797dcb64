"""
MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023; github.com/kmeng01/memit) as a value source
beside the hyper-network: each fact's value change is found by gradient descent instead of predicted, then written
into the editor's layers with the same keys (the subject's last token), preserved-key covariance, least squares,
handles, revert and artifacts as [`apply_edits`].

The two steps, as MEMIT's code does them:

1. **Values** ([`optimize_residuals`], MEMIT's `compute_z`): per fact, a vector `delta` added to the residual stream
   (the output of the block holding the last edited layer) at the subject's last token, optimized with Adam on the
   target's negative log-likelihood averaged over the edit prompt behind a few short context prefixes that the model
   itself writes ([`generate_context_templates`]: what makes the edit carry over to other phrasings), plus a KL term
   that keeps the prediction after `"{subject} is a"`, a weight decay on `|delta|` and a clamp of `|delta|` relative
   to the residual it is added to.
2. **Spreading** ([`spread_residuals`], MEMIT's `execute_memit`): from the lowest edited layer up, each layer writes
   its share `1 / (layers left)` of what is still missing at the residual, by least squares with the preserved keys,
   `S = (K^T K + a n C0 + e^lambda I)^-1 K^T R`; the next layer's keys and the remaining residual are read again on
   the model with the layers below edited.

The per-fact optimization makes it slow: tens of forward and backward passes per fact (on 2 CPU cores, minutes per
hundred facts of a 135M model), against one pass for a trained MALMEN editor. It needs no training, so it edits any
supported causal model well, and it is the teacher a MALMEN editor can be distilled from.
"""

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .caching import frozen, input_gradients_at, needed_positions
from .edits import EditHandle, apply_shifts, edit_history, shift_weights
from .facts import (
    IGNORE_INDEX,
    EditRequest,
    FactLike,
    TokenizedExample,
    as_edit_requests,
    collate,
    encode_texts,
    model_kind,
    pad_id_of,
    subject_last_position,
    tokenize_examples,
)
from .functional import at_least_float32, least_squares_shift
from .layers import edited_modules
from .scoring import scored_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KL_TEMPLATE = "{} is a"
"""MEMIT's prompt whose next-token distribution (after the subject) the value step keeps (`kl_prompts`)."""
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
"""The words MEMIT's context prefixes start with; the model writes the rest."""


@dataclass(frozen=True)
class MemitSettings:
    """
    The value step's settings; the defaults are those of MEMIT's GPT-J configuration (`hparams/MEMIT`).

    Args:
        num_steps (`int`, defaults to 25): at most this many forward passes per fact (`v_num_grad_steps`); the last
            one only measures, so `num_steps - 1` Adam steps at most.
        step_size (`float`, defaults to 0.5): Adam's learning rate on `delta` (`v_lr`).
        weight_decay (`float`, defaults to 0.5): weight of `|delta| / |h|^2` in the loss (`v_weight_decay`).
        kl_factor (`float`, defaults to 0.0625): weight of the KL term on `"{subject} is a"`.
        clamp_norm_factor (`float`, defaults to 0.75): `|delta|` is kept below this times `|h|`, the residual it is
            added to.
        stop_loss (`float`, defaults to 0.05): a fact stops once its loss is below this.
        residual_module (`str`, *optional*): the module whose output gets `delta`; defaults to the transformer block
            that holds the last edited layer (`model.layers.17` for `model.layers.17.mlp.down_proj`).
    """

    num_steps: int = 25
    step_size: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    stop_loss: float = 0.05
    residual_module: str | None = None

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        for name in ("step_size", "weight_decay", "kl_factor", "clamp_norm_factor", "stop_loss"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def generate_context_templates(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", *, length: int = 10, seed: int = 0
) -> list[list[str]]:
    """
    MEMIT's context templates: `[["{}"], [five short texts the model writes, each followed by ". {}"]]`, the texts
    sampled (top-5) from the starts in `CONTEXT_STARTS`, `length` tokens each. `"{}"` is where a fact's prompt goes.
    Deterministic for a `seed` (the global random state is left as it was).
    """
    device = model.get_input_embeddings().weight.device
    texts = []
    with frozen(model), torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in CONTEXT_STARTS:
            input_ids = torch.tensor([encode_texts(tokenizer, [start])[0]], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                top_k=5,
                max_length=max(length, input_ids.shape[1] + 1),
                pad_token_id=pad_id_of(tokenizer),
            )
            texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    # Braces would be read as placeholders.
    return [["{}"], [text.replace("{", " ").replace("}", " ") + ". {}" for text in texts]]


def _fill(template: str, prompt: str) -> str:
    """`template` with the prompt in place of its `"{}"` (not `str.format`: the prompt may hold braces)."""
    before, _, after = template.partition("{}")
    return before + prompt + after


def residual_module_name(module_names: Sequence[str]) -> str:
    """
    The transformer block holding the last of `module_names` (the MLP output projections of consecutive blocks):
    `model.layers.17.mlp.down_proj` -> `model.layers.17`, `transformer.h.5.mlp.c_proj` -> `transformer.h.5`.
    """
    return module_names[-1].rsplit(".", 2)[0]


def _checked_requests(facts: Iterable[FactLike]) -> list[EditRequest]:
    requests = as_edit_requests(facts)
    for index, request in enumerate(requests):
        if request.subject is None:
            raise ValueError(
                f"fact {index}: MEMIT reads its keys and writes its values at the subject's last token, so every "
                "fact needs a 'subject' that occurs in its prompt."
            )
    return requests


@dataclass
class _ValueBatch:
    """The rewriting prompts (one per context template) and the KL prompt of a few facts, collated together."""

    batch: dict[str, torch.Tensor]
    fact_of_row: torch.Tensor  # (rows,) index of the fact (within the batch) each row belongs to
    lookup: torch.Tensor  # (rows,) the subject's last token in each row
    is_kl: torch.Tensor  # (rows,) whether the row is the fact's KL prompt
    first_rows: torch.Tensor  # (facts,) the row of each fact's plain prompt (the "{}" template)


def _value_batch(
    tokenizer: "PreTrainedTokenizerBase", requests: Sequence[EditRequest], templates: Sequence[str]
) -> _ValueBatch:
    prompts = [_fill(template, request.prompt) for request in requests for template in templates]
    examples = tokenize_examples(
        tokenizer, prompts, [request.target for request in requests for _ in templates], "causal"
    )
    lookups = [
        subject_last_position(tokenizer, prompt, request.subject)
        for prompt, request in zip(prompts, [r for r in requests for _ in templates], strict=True)
    ]
    kl_prompts = [KL_TEMPLATE.format(request.subject) for request in requests]
    for ids, prompt, request in zip(encode_texts(tokenizer, kl_prompts), kl_prompts, requests, strict=True):
        examples.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * len(ids)))
        lookups.append(subject_last_position(tokenizer, prompt, request.subject))
    num_facts, per_fact = len(requests), len(templates)
    return _ValueBatch(
        batch=collate(examples, pad_id_of(tokenizer), "causal"),
        fact_of_row=torch.cat((torch.arange(num_facts).repeat_interleave(per_fact), torch.arange(num_facts))),
        lookup=torch.tensor(lookups),
        is_kl=torch.arange(len(examples)) >= num_facts * per_fact,
        first_rows=torch.arange(num_facts) * per_fact,
    )


class _Replay(nn.Module):
    """
    Stands in for a transformer block during the value step, so that the blocks below the residual one run once per
    batch instead of once per step (nothing below it depends on `delta`): below, it hands its input on; at the
    residual block, it returns that block's output recorded once, at the rows of the current pass.
    """

    def __init__(self, recorded: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.recorded, self.as_tuple = recorded, as_tuple
        self.rows: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        hidden = self.recorded[self.rows] if self.recorded is not None else kwargs.get("hidden_states", *args[:1])
        return (hidden,) if self.as_tuple else hidden


@contextlib.contextmanager
def _lower_blocks_replayed(model: nn.Module, residual_module: str, batch: dict[str, torch.Tensor]) -> Iterator:
    """
    Within the block, the blocks up to `residual_module` (in its `nn.ModuleList`) are [`_Replay`]s of one pass over
    `batch`; yields the module that now gives the residual (the replay, or the block itself where the model's blocks
    are not a list of modules that return their hidden states alone).
    """
    parent_name, _, index = residual_module.rpartition(".")
    blocks = model.get_submodule(parent_name) if parent_name else None
    if not isinstance(blocks, nn.ModuleList) or not index.isdigit():
        yield model.get_submodule(residual_module)
        return
    index = int(index)
    recorded = []
    handle = blocks[index].register_forward_hook(lambda module, args, output: recorded.append(output))
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            model.base_model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            )
    finally:
        handle.remove()
    output = recorded[0]
    if isinstance(output, tuple) and len(output) > 1:
        yield blocks[index]  # the block returns more than its hidden states: let it run
        return
    as_tuple = isinstance(output, tuple)
    replay = _Replay(output[0] if as_tuple else output, as_tuple)
    passing = _Replay(None, as_tuple)
    originals = list(blocks[: index + 1])
    try:
        for position in range(index):
            blocks[position] = passing
        blocks[index] = replay
        yield replay
    finally:
        for position, block in enumerate(originals):
            blocks[position] = block


class _ResidualEdit:
    """A forward hook adding each row's `delta` to the residual at its lookup position (and recording it there)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.delta: torch.Tensor | None = None
        self.rows = self.positions = None
        self.residual: torch.Tensor | None = None  # the residual at the lookup positions, before delta

    def __enter__(self) -> "_ResidualEdit":
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        self.residual = hidden[self.rows, self.positions].detach()
        if self.delta is None:
            return None
        edited = hidden.index_put((self.rows, self.positions), self.delta.to(hidden.dtype), accumulate=True)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited


def optimize_residuals(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    facts: Iterable[FactLike],
    *,
    residual_module: str,
    context_templates: Sequence[Sequence[str]],
    settings: MemitSettings | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    MEMIT's value step for each fact: the residual `h` (the output of `residual_module` at the subject's last token
    of the edit prompt) and the change `delta` that makes the model say the target (see the module's docstring).
    Facts are optimized `batch_size` at a time, each with its own Adam state and stopping point, so the result does
    not depend on `batch_size`. The model should be frozen (see [`frozen`]).

    Returns:
        `(h, delta)`, two tensors `(num_facts, hidden_size)` in (at least) float32: MEMIT's target is `h + delta`.
    """
    settings = settings or MemitSettings()
    requests = _checked_requests(facts)
    templates = [template for group in context_templates for template in group]
    residuals, deltas = [], []
    starts = range(0, len(requests), batch_size)
    for start in tqdm(starts, desc="MEMIT values", unit="batch", disable=not progress):
        prepared = _value_batch(tokenizer, requests[start : start + batch_size], templates)
        residual, delta = _optimize_batch(model, residual_module, prepared, settings)
        residuals.append(residual)
        deltas.append(delta)
    return torch.cat(residuals), torch.cat(deltas)


def _optimize_batch(
    model: nn.Module, residual_module: str, prepared: _ValueBatch, settings: MemitSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    device = model.get_input_embeddings().weight.device
    num_facts = prepared.first_rows.shape[0]
    embeddings = model.get_input_embeddings().weight
    delta = torch.zeros(num_facts, embeddings.shape[1], device=device, dtype=at_least_float32(embeddings).dtype)
    adam_mean, adam_var = torch.zeros_like(delta), torch.zeros_like(delta)
    # float64: in float32, Adam's bias correction 1 - 0.999^t is off by 1e-5 relative (torch computes it in Python).
    steps_taken = torch.zeros(num_facts, device=device, dtype=torch.float64)
    facts = torch.arange(num_facts)  # the facts still optimized (stopped ones leave the batch)
    residual = kl_initial = None
    with (
        _lower_blocks_replayed(model, residual_module, prepared.batch) as module,
        _ResidualEdit(module) as editing,
    ):
        for step in range(settings.num_steps):
            rows = torch.isin(prepared.fact_of_row, facts).nonzero().squeeze(1)
            # Within this pass, the batch's fact facts[i] is fact i: each row's place in `facts`.
            place = torch.full((num_facts,), -1, dtype=torch.long)
            place[facts] = torch.arange(facts.shape[0])
            row_place = place[prepared.fact_of_row[rows]].to(device)
            fact_delta = delta[facts.to(device)].requires_grad_(True)
            editing.rows = torch.arange(rows.shape[0], device=device)
            if isinstance(module, _Replay):
                module.rows = rows.to(device)
            editing.positions = prepared.lookup[rows].to(device)
            editing.delta = fact_delta[row_place]
            losses, kl_log_probs = _losses(model, prepared, rows, row_place, facts.shape[0], device)
            if step == 0:
                # delta is still zero: this pass reads the unedited residual and KL distribution (as MEMIT's does).
                residual = at_least_float32(editing.residual[prepared.first_rows.to(device)])
                kl_initial = kl_log_probs.detach()
            on_device = facts.to(device)
            kl = (kl_log_probs.exp() * (kl_log_probs - kl_initial[on_device])).sum(-1)
            decay = settings.weight_decay * fact_delta.norm(dim=-1) / residual[on_device].norm(dim=-1) ** 2
            total = losses + settings.kl_factor * kl + decay
            going_on = (total.detach() >= settings.stop_loss).cpu()
            if step == settings.num_steps - 1 or not going_on.any():
                break
            # Each fact's loss depends on its own delta only: one backward gives every fact its own gradient.
            (grad,) = torch.autograd.grad(total[going_on.to(device)].sum(), fact_delta)
            facts = facts[going_on]
            on_device = facts.to(device)
            _adam_step(delta, grad[going_on.to(device)], on_device, adam_mean, adam_var, steps_taken, settings)
            _clamp(delta, on_device, settings.clamp_norm_factor * residual[on_device].norm(dim=-1))
    return residual.cpu(), delta.cpu()


def _losses(
    model, prepared: _ValueBatch, rows, row_place, num_active: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per active fact: the mean over its rewriting prompts of the target's NLL per token, and the KL log-probs."""
    batch = {key: value[rows] for key, value in prepared.batch.items() if key != "subject_positions"}
    is_kl = prepared.is_kl[rows]
    lookup_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    lookup_mask[torch.arange(rows.shape[0]), prepared.lookup[rows]] = True
    kl_mask = lookup_mask & is_kl.unsqueeze(1)
    label_mask = batch["labels"] != IGNORE_INDEX
    # The logits are needed where targets are scored and at each KL prompt's lookup position (label 0 marks it).
    batch["labels"] = torch.where(kl_mask, 0, batch["labels"])
    scored = label_mask | kl_mask
    with input_gradients_at(model, needed_positions(lookup_mask, scored).to(device)):
        log_probs = torch.log_softmax(at_least_float32(scored_logits(model, batch, "causal")), dim=-1)
    flat_is_kl = kl_mask[scored].to(device)
    labels = batch["labels"][scored].to(device)
    token_rows = torch.arange(rows.shape[0]).unsqueeze(1).expand_as(scored)[scored].to(device)
    target_log_probs = log_probs[~flat_is_kl].gather(1, labels[~flat_is_kl].unsqueeze(1)).squeeze(1)
    target_rows = token_rows[~flat_is_kl]
    # MEMIT: per prompt, the sum of the target tokens' NLL over the target's length; then the mean over prompts.
    per_row = log_probs.new_zeros(rows.shape[0]).index_add(0, target_rows, -target_log_probs)
    per_row = per_row / torch.bincount(target_rows, minlength=rows.shape[0]).clamp_min(1)
    rewriting = ~is_kl.to(device)
    per_fact = log_probs.new_zeros(num_active).index_add(0, row_place[rewriting], per_row[rewriting])
    prompts_per_fact = torch.bincount(row_place[rewriting], minlength=num_active).clamp_min(1)
    kl_log_probs = log_probs.new_zeros(num_active, log_probs.shape[1])
    kl_log_probs = kl_log_probs.index_copy(0, row_place[is_kl.to(device)], log_probs[flat_is_kl])
    return per_fact / prompts_per_fact, kl_log_probs


def _adam_step(delta, grad, facts, mean, var, steps, settings: MemitSettings, betas=(0.9, 0.999), eps=1e-8) -> None:
    """`torch.optim.Adam`'s update (its defaults) on the rows `facts` of `delta` only: each fact has its own state."""
    steps[facts] += 1
    mean[facts] = betas[0] * mean[facts] + (1 - betas[0]) * grad
    var[facts] = betas[1] * var[facts] + (1 - betas[1]) * grad.square()
    first_correction = (1 - betas[0] ** steps[facts]).to(delta.dtype)
    second_correction = (1 - betas[1] ** steps[facts]).sqrt().to(delta.dtype)
    denominator = var[facts].sqrt() / second_correction.unsqueeze(1) + eps
    delta[facts] -= (settings.step_size / first_correction).unsqueeze(1) * mean[facts] / denominator


def _clamp(delta: torch.Tensor, facts: torch.Tensor, max_norms: torch.Tensor) -> None:
    """MEMIT's projection of each `delta` into the ball of radius `clamp_norm_factor * |h|`."""
    norms = delta[facts].norm(dim=-1)
    over = norms > max_norms
    delta[facts[over]] = delta[facts[over]] * (max_norms[over] / norms[over]).unsqueeze(1)


def _read_at_subjects(
    model: nn.Module,
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    subjects: Sequence[str],
    inputs_of: dict[str, nn.Module],
    outputs_of: dict[str, nn.Module],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """
    The inputs of the modules `inputs_of` and the outputs of `outputs_of` at the subject's last token of each prompt,
    in (at least) float32, `(len(prompts), size)` each (no grad).
    """
    found: dict[str, list[torch.Tensor]] = {name: [] for name in (*inputs_of, *outputs_of)}
    positions = None

    def hook_for(name: str, read_input: bool):
        def hook(module, args, output):
            value = args[0] if read_input else (output[0] if isinstance(output, tuple) else output)
            found[name].append(at_least_float32(value[torch.arange(value.shape[0]), positions.to(value.device)]).cpu())

        return hook

    hooks = [module.register_forward_hook(hook_for(name, True)) for name, module in inputs_of.items()]
    hooks += [module.register_forward_hook(hook_for(name, False)) for name, module in outputs_of.items()]
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk, chunk_subjects = prompts[start : start + batch_size], subjects[start : start + batch_size]
                ids = encode_texts(tokenizer, list(chunk))
                positions = torch.tensor(
                    [subject_last_position(tokenizer, p, s) for p, s in zip(chunk, chunk_subjects, strict=True)]
                )
                examples = [TokenizedExample(input_ids=row, labels=[IGNORE_INDEX] * len(row)) for row in ids]
                batch = collate(examples, pad_id_of(tokenizer), "causal")
                # The transformer body holds every layer read here: the language-model head is not needed.
                model.base_model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(values) for name, values in found.items()}


def spread_residuals(
    editor: nn.Module,
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    facts: Iterable[FactLike],
    targets: torch.Tensor,
    *,
    residual_module: str,
    context_templates: Sequence[Sequence[str]],
    batch_size: int = 32,
    progress: bool = False,
    history: dict[str, torch.Tensor] | None = None,
    null_space_fraction: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """
    MEMIT's spreading: the weight shift `(d_in, d_out)` of each of the editor's layers that together move the residual
    at each fact's subject to its target `h + delta` (see the module's docstring). Layer by layer from the lowest, the
    keys (the layer's input at the subject's last token, averaged over the context templates as MEMIT does) and the
    residual still missing are read on the model with the lower layers' shifts applied; each layer takes
    `1 / (layers left)` of it, by the least squares of the editor (its covariance weight, covariance and lambda, and
    `history_weight` times the earlier rounds' `history`). With `null_space_fraction`, AlphaEdit's solve instead (see
    [`null_space_projector`]). The model is left as it was.

    Returns:
        The shifts, and each layer's `K^T K` of these facts (what the edit history adds).
    """
    requests = _checked_requests(facts)
    modules = edited_modules(editor, model)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    names = sorted(modules, key=order.__getitem__)
    residual_of = {residual_module: model.get_submodule(residual_module)}
    plain_prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    originals: dict[str, torch.Tensor] = {}
    shifts, grams = {}, {}
    weighted_history = {name: editor.config.history_weight * gram.double() for name, gram in (history or {}).items()}
    try:
        for index, name in enumerate(tqdm(names, desc="MEMIT layers", unit="layer", disable=not progress)):
            keys = _template_mean_keys(model, tokenizer, requests, modules[name], name, context_templates, batch_size)
            current = _read_at_subjects(model, tokenizer, plain_prompts, subjects, {}, residual_of, batch_size)
            residual = (targets - current[residual_module]).double() / (len(names) - index)
            keys = keys.double()
            earlier = weighted_history.get(name)
            if null_space_fraction is None:
                shift = _least_squares(editor, name, keys, residual, len(requests), earlier)
            else:
                shift = _projected_least_squares(editor, name, keys, residual, null_space_fraction, earlier)
            shifts[name], grams[name] = shift.float(), (keys.T @ keys).float()
            originals.update(shift_weights({name: modules[name]}, {name: shifts[name]}))
    finally:
        with torch.no_grad():
            for name, weight in originals.items():
                modules[name].weight.copy_(weight)
    return shifts, grams


def _template_mean_keys(model, tokenizer, requests, module, name, context_templates, batch_size) -> torch.Tensor:
    """MEMIT's `compute_ks`: each fact's key averaged over the templates of each group, then over the groups."""
    flat = [template for group in context_templates for template in group]
    prompts = [_fill(template, request.prompt) for request in requests for template in flat]
    subjects = [request.subject for request in requests for _ in flat]
    keys = _read_at_subjects(model, tokenizer, prompts, subjects, {name: module}, {}, batch_size)[name]
    keys = keys.view(len(requests), len(flat), -1)
    group_means, start = [], 0
    for group in context_templates:
        group_means.append(keys[:, start : start + len(group)].mean(1))
        start += len(group)
    return torch.stack(group_means, 1).mean(1)


def _least_squares(editor, name: str, keys, values, num_facts: int, earlier: torch.Tensor | None) -> torch.Tensor:
    """
    `(K^T K + a n C0 + b H + e^lambda I)^-1 K^T R`, with the editor's `a`, `C0` and lambda for `name` and the earlier
    rounds' weighted keys `b H` (`earlier`), in float64.
    """
    gram = keys.T @ keys
    if editor.config.covariance_weight > 0:
        gram = gram + editor.config.covariance_weight * num_facts * _covariance(editor, name)
    if earlier is not None:
        gram = gram + earlier
    net, layer_index = editor.net_for(name)
    return least_squares_shift(gram, keys.T @ values, net.log_lambda[layer_index].detach().double())


def _covariance(editor: nn.Module, name: str) -> torch.Tensor:
    covariance = editor.key_covariance(name)
    if covariance is None or covariance.count == 0:
        raise ValueError(
            f"The editor has no preserved keys' covariance fitted for {name!r}: build it with covariance_weight > 0 "
            "and call `malmen_hf.fit_key_covariance(editor, model, texts, tokenizer)` first. No weight was changed."
        )
    return covariance.matrix().double()


def null_space_projector(covariance: torch.Tensor, fraction: float) -> torch.Tensor:
    """
    AlphaEdit's projector `P = U U^T` onto the directions the preserved keys hardly use: the eigenvectors of their
    covariance with the smallest eigenvalues that together hold at most `fraction` of its trace. (AlphaEdit's code
    keeps the singular values below a fixed 2e-2, which does not carry over across models and scales.)
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending
    energy = eigenvalues.clamp_min(0).cumsum(0)
    kept = eigenvectors[:, energy <= fraction * energy[-1]]
    return kept @ kept.T


def _projected_least_squares(editor, name: str, keys, values, fraction: float, earlier: torch.Tensor | None):
    """
    AlphaEdit's solve (jianghoucheng/AlphaEdit, `AlphaEdit_main.py`): `S = (P (K^T K + b H) + e^lambda I)^-1 P K^T R`,
    `P` the null-space projector of the editor's covariance for `name`; the shift then leaves the preserved keys'
    outputs (nearly) untouched by construction. `e^lambda` is AlphaEdit's `L2`.
    """
    projector = null_space_projector(_covariance(editor, name), fraction)
    gram = keys.T @ keys + (earlier if earlier is not None else 0)
    net, layer_index = editor.net_for(name)
    ridge = torch.exp(net.log_lambda[layer_index].detach().double()) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(projector @ gram + ridge, projector @ keys.T @ values)


def apply_memit(
    editor: nn.Module,
    model: "PreTrainedModel",
    facts: Iterable[FactLike],
    *,
    tokenizer: "PreTrainedTokenizerBase",
    settings: MemitSettings | None = None,
    context_templates: Sequence[Sequence[str]] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    keep_shifts: bool = True,
    residual_targets: torch.Tensor | None = None,
    null_space_fraction: float | None = None,
) -> EditHandle:
    """
    Edits `model` in place with MEMIT's values (see the module's docstring) written into `editor`'s layers by its
    least squares: no trained editor needed. Slow: tens of passes per fact (minutes per hundred facts of SmolLM2-135M
    on 2 CPU cores); `progress=True` shows how far it is.

    Args:
        editor ([`MalmenEditorModel`]):
            Gives the edited layers (consecutive MLP output projections, e.g. `model.layers.12-17.mlp.down_proj`), the
            preserved keys' weight `a` and covariance `C0` (fitted with [`fit_key_covariance`]; MEMIT's
            `mom2_update_weight` is `a` times the number of facts) and the ridge `e^lambda`. Its hyper-networks are
            not used.
        model ([`PreTrainedModel`]): A causal language model with those layers.
        facts (iterable of [`EditRequest`], `dict` or `(prompt, target)` pairs): each with its `subject`.
        tokenizer ([`PreTrainedTokenizerBase`]): The model's tokenizer.
        settings ([`MemitSettings`], *optional*): The value step's settings (MEMIT's GPT-J ones by default).
        context_templates (`list[list[str]]`, *optional*): Defaults to [`generate_context_templates`].
        batch_size (`int`, defaults to 16): Facts optimized together. Does not change the result.
        progress (`bool`, defaults to `False`): Show progress bars.
        keep_shifts (`bool`, defaults to `True`): As in [`apply_edits`].
        residual_targets (`torch.Tensor` of shape `(num_facts, hidden_size)`, *optional*): MEMIT's targets `h + delta`
            of these facts computed before (by [`optimize_residuals`] or `malmen_hf.training.teacher.teacher_values`,
            with the same settings and templates): the value step is skipped.
        null_space_fraction (`float`, *optional*): AlphaEdit (Fang et al., ICLR 2025) instead of MEMIT's solve: the
            shift is projected onto the directions of the editor's covariance that hold at most this fraction of its
            energy (e.g. 0.01; see [`null_space_projector`]), `S = (P (K^T K + b H) + e^lambda I)^-1 P K^T R`.

    An editor with `history_weight > 0` adds the earlier rounds' keys (`malmen_hf.edit_history(model)`) to the solve
    and this round's to the history, as [`apply_edits`] does.

    Returns:
        [`EditHandle`]: as [`apply_edits`]'s, with `aggregation="memit"` (or `"alphaedit"`); `revert()` restores the
        weights bit for bit. Nothing is changed when an error is raised.
    """
    requests = _checked_requests(facts)
    if model_kind(model) != "causal":
        raise ValueError("MEMIT edits causal language models (its values sit at the subject in the prompt).")
    modules = edited_modules(editor, model)
    settings = settings or MemitSettings()
    residual_module = settings.residual_module or residual_module_name(list(modules))
    templates = context_templates or generate_context_templates(model, tokenizer)
    if residual_targets is not None and residual_targets.shape[0] != len(requests):
        raise ValueError(f"{residual_targets.shape[0]} residual targets for {len(requests)} facts: give one per fact.")
    timings = {}
    start = time.perf_counter()
    if residual_targets is None:
        with frozen(model), torch.enable_grad():
            residuals, deltas = optimize_residuals(
                model, tokenizer, requests, residual_module=residual_module, context_templates=templates,
                settings=settings, batch_size=batch_size, progress=progress,
            )  # fmt: skip
        residual_targets = residuals + deltas
    timings["values"] = time.perf_counter() - start
    start = time.perf_counter()
    keeps_history = editor.config.history_weight > 0
    history = edit_history(model) if keeps_history else {}
    with frozen(model):
        shifts, grams = spread_residuals(
            editor, model, tokenizer, requests, residual_targets, residual_module=residual_module,
            context_templates=templates, batch_size=2 * batch_size, progress=progress, history=history,
            null_space_fraction=null_space_fraction,
        )  # fmt: skip
    timings["spreading"] = time.perf_counter() - start
    num_tokens = sum(len(example.labels) - example.labels.count(IGNORE_INDEX) for example in tokenize_examples(
        tokenizer, [r.prompt for r in requests], [r.target for r in requests], "causal"
    ))  # fmt: skip
    # Only the layers' K^T K grow: whatever else the history holds (an editor's normalizer statistics) carries on.
    after = {
        **history,
        **{name: history[name].to(gram) + gram if name in history else gram for name, gram in grams.items()},
    }
    return apply_shifts(
        model, modules, shifts, facts=requests, num_tokens=num_tokens, timings=timings,
        aggregation="memit" if null_space_fraction is None else "alphaedit",
        editor_name_or_path=getattr(editor, "name_or_path", None) or None,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None, keep_shifts=keep_shifts,
        history=after if keeps_history else None,
    )  # fmt: skip


__all__ = [
    "MemitSettings",
    "apply_memit",
    "generate_context_templates",
    "null_space_projector",
    "optimize_residuals",
    "spread_residuals",
]
