"""
What an editor learns without meta-training: the statistics of its inputs (the normalizer), the preserved keys'
covariance, and with them the training-free editor.
"""

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..caching import cached_batches, encoder_module_names, frozen
from ..data import load_edit_requests
from ..facts import (
    IGNORE_INDEX,
    EditRequest,
    TokenizedExample,
    batches_by_length,
    collate,
    model_kind,
    pad_id_of,
    tokenize_edit_prompts,
)
from ..layers import edited_modules, weight_shape
from ..modeling_malmen import MalmenEditorModel
from ..shipped import COUNTERFACT_SAMPLE

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The training-free editor's settings: chosen for SmolLM2-135M by `benchmarks/quality.py --tune` (the mean of all
# scores when 128 held-out CounterFact training facts are edited at once), the best of lr 1e-5 ... 1e-3 and
# log lambda 0, 2, 4.
TRAINING_FREE_LR = 1e-3
TRAINING_FREE_LOG_LAMBDA = 2.0


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
    modules = edited_modules(editor, model)
    kind = model_kind(model)
    examples = tokenize_edit_prompts(tokenizer, requests, kind)
    stream = cached_batches(
        model, modules, examples, batches_by_length(examples, batch_size),
        pad_id=pad_id_of(tokenizer), kind=kind, token_positions=editor.config.token_positions,
    )  # fmt: skip
    with contextlib.closing(stream):
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
    modules = edited_modules(editor, model)
    kind = model_kind(model)
    examples = _checked_texts(model, tokenizer, texts, kind)
    decoder_modules = set(modules) - encoder_module_names(model, modules, kind)
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
    runner = _module_to_run(model, kind, modules)
    try:
        with frozen(model), torch.no_grad():
            for indices in batches_by_length(examples, batch_size):
                batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), kind)
                _run_for_keys(model, runner, batch, kind)
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
    broken = [name for name in modules if not torch.isfinite(sums[name]).all()]
    if broken:
        # Checked for every layer before any is fitted: the editor keeps its earlier covariance whole.
        raise ValueError(
            f"The keys of {broken} are not finite on these texts (NaN or infinite weights in the model?): no "
            "covariance was fitted, the editor's earlier one is unchanged."
        )
    for name in modules:
        editor.key_covariance(name).fit(sums[name], counts[name])


def _checked_texts(model, tokenizer, texts: Sequence[str], kind: str) -> list[TokenizedExample]:
    """The texts as examples, refusing what would fit nothing or fail half-way: no text, or one too long."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ValueError("`texts` must be a list of strings (text the edits should leave alone).")
    examples = [_as_plain_text_example(tokenizer, text, kind) for text in texts if text.strip()]
    if not examples:
        raise ValueError(
            f"`texts` holds no text ({len(texts)} empty strings): give text the edits should leave alone, e.g. "
            "`covariance_texts(facts)`. The editor's covariance is unchanged."
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    for index, example in enumerate(examples):
        if isinstance(limit, int) and len(example.input_ids) > limit:
            raise ValueError(
                f"text {index} is {len(example.input_ids)} tokens long but the model takes at most {limit}: "
                "shorten or split it. The editor's covariance is unchanged."
            )
    return examples


def covariance_texts(requests: Sequence[EditRequest], max_facts: int = 1000) -> list[str]:
    """The texts [`train_editor`] fits a missing key covariance on: every prompt of the first `max_facts` facts."""
    return [text for r in requests[:max_facts] for text in (r.prompt, *r.rephrases, r.locality_prompt) if text]


def _as_plain_text_example(tokenizer, text: str, kind: str) -> TokenizedExample:
    """A text to read, not to score: no labels, except the decoder's copy of the text for an encoder-decoder."""
    input_ids = tokenizer(text.strip())["input_ids"]
    return TokenizedExample(
        input_ids=input_ids, labels=input_ids if kind == "seq2seq" else [IGNORE_INDEX] * len(input_ids)
    )


def _module_to_run(model: nn.Module, kind: str, modules: dict[str, nn.Module]) -> nn.Module:
    """
    What fitting runs to reach every edited module: a causal LM's transformer body when no edited module is its head
    (the head's output is not needed, and it is the model's largest matrix: 49,152 x 576 for SmolLM2), else the model.
    """
    body = model.base_model
    inside = {id(module) for module in body.modules()}
    if kind == "causal" and body is not model and all(id(module) in inside for module in modules.values()):
        return body
    return model


def _run_for_keys(model, runner: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> None:
    """Runs `runner` (see [`_module_to_run`]) so that the hooks see every edited module's inputs."""
    device = model.get_input_embeddings().weight.device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"].to(device))
        inputs["decoder_attention_mask"] = batch["decoder_attention_mask"].to(device)
    elif kind == "causal":
        inputs["use_cache"] = False
    runner(**inputs)


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
        model, edit_modules, n_blocks=0, lr_init=lr, log_lambda_init=log_lambda, **config_kwargs
    )
    if fit_requests is None:
        fit_requests = load_edit_requests(COUNTERFACT_SAMPLE, "counterfact")
    fit_normalizer(editor, model, fit_requests, tokenizer, batch_size=batch_size)
    if editor.config.covariance_weight > 0:
        fit_key_covariance(editor, model, covariance_texts(fit_requests), tokenizer, batch_size=batch_size)
    return editor
