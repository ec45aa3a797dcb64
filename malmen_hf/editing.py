"""
`apply_edits` (ALGORITHM.md steps 1-3 in one call) and `attach`: the public entry to editing a model.

Step 1 runs in `caching.py`, step 2 in the editor (`modeling_malmen.py`), step 3 in `solve.py`; `edits.py` shifts the
weights and keeps the way back.
"""

import contextlib
import math
import time
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .caching import cached_batches
from .edits import EditHandle, apply_shifts, edit_history, revert_edits
from .facts import (
    IGNORE_INDEX,
    EditRequest,
    FactLike,
    as_edit_requests,
    batches_by_length,
    model_kind,
    pad_id_of,
    tokenize_edit_prompts,
)
from .layers import edited_modules
from .solve import NormalEquationSums

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def apply_edits(
    editor: nn.Module,
    model: "PreTrainedModel",
    facts: Iterable[FactLike],
    *,
    tokenizer: "PreTrainedTokenizerBase",
    batch_size: int = 32,
    editor_batch_size: int = 1024,
    progress: bool = False,
    keep_shifts: bool = True,
) -> EditHandle:
    """
    Edits `model` in place so that it answers each fact's prompt with its target, with one least-squares (or
    summed) weight shift per edited layer. Also a method of the editor: `editor.apply_edits(model, facts, ...)`.

    Args:
        editor ([`MalmenEditorModel`]):
            The editor, built for `model`'s layers.
        model ([`PreTrainedModel`]):
            A causal or seq2seq language model with the layers this editor was built for.
        facts (iterable of [`EditRequest`], `dict` or `(prompt, target)` pairs):
            The facts to write into the model.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The base model's tokenizer.
        batch_size (`int`, defaults to 32):
            Facts per forward/backward pass of the base model. Does not change the result.
        editor_batch_size (`int`, defaults to 1024):
            Token positions per pass of the hyper-network. Does not change the result.
        progress (`bool`, defaults to `False`):
            Show a progress bar over the base-model batches.
        keep_shifts (`bool`, defaults to `True`):
            Keep the weight shifts on the handle, so that `handle.save(folder)` can write them (they take as
            much memory as the edited weights in float32: turn it off for very large edited layers).

    Returns:
        [`EditHandle`]: what changed (modules, shift norms, number of facts and tokens, timings); its `revert()`
        restores the weights bit for bit. Nothing is changed when an error is raised.
    """
    requests = _without_duplicates(as_edit_requests(facts))
    if not isinstance(editor_batch_size, int) or editor_batch_size < 1:
        raise ValueError(f"editor_batch_size must be a positive integer, got {editor_batch_size!r}")
    modules = edited_modules(editor, model)
    kind = model_kind(model)
    examples = tokenize_edit_prompts(tokenizer, requests, kind)
    batches = batches_by_length(examples, batch_size)
    _check_lengths(model, examples)

    timings = {"caching": 0.0, "hypernetwork": 0.0, "solve_and_apply": 0.0}
    lifelong = editor.config.lifelong_normalization
    sums = NormalEquationSums(
        editor, modules, num_facts=len(requests), dual=True, history=edit_history(model),
        lifelong_normalization=lifelong,
    )  # fmt: skip
    # Lifelong normalization normalizes every row with statistics that hold the whole call's rows: all rows wait.
    rows = _RowBuffer(math.inf if lifelong else editor_batch_size)
    start = time.perf_counter()
    stream = cached_batches(
        model, modules, examples, batches,
        pad_id=pad_id_of(tokenizer), kind=kind, token_positions=editor.config.token_positions,
    )  # fmt: skip
    # closing(): if the hyper-network fails mid-way, the model's flags and mode are restored before the error leaves.
    with (
        contextlib.closing(stream),
        tqdm(total=len(batches), desc="Editing", unit="batch", disable=not progress) as bar,
    ):
        for cached in stream:
            bar.update(1)
            timings["caching"] += time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                sums.update_normalizers(cached)
                sums.add(rows.full_chunks(cached), editor_batch_size)
            timings["hypernetwork"] += time.perf_counter() - start
            start = time.perf_counter()

    start = time.perf_counter()
    with torch.no_grad():
        sums.add(rows.rest(), editor_batch_size)
    timings["hypernetwork"] += time.perf_counter() - start

    start = time.perf_counter()
    handle = apply_shifts(
        model,
        modules,
        sums.solve(),
        facts=requests,
        num_tokens=sum(sum(label != IGNORE_INDEX for label in example.labels) for example in examples),
        aggregation=editor.config.aggregation,
        timings=timings,
        editor_name_or_path=getattr(editor, "name_or_path", None) or None,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        keep_shifts=keep_shifts,
        history=sums.history_after(),
    )
    timings["solve_and_apply"] = time.perf_counter() - start
    return handle


def _without_duplicates(requests: list[EditRequest]) -> list[EditRequest]:
    """
    `requests` with each repeated fact kept once (with a warning); two targets for the same prompt are refused, since
    one least-squares shift cannot make a prompt continue with both.
    """
    first_of: dict[str, int] = {}
    unique, repeated = [], 0
    for index, request in enumerate(requests):
        key = " ".join(request.prompt.split())
        if key not in first_of:
            first_of[key] = index
            unique.append(request)
        elif requests[first_of[key]].target.strip() != request.target.strip():
            raise ValueError(
                f"facts {first_of[key]} and {index} give the prompt {request.prompt!r} two targets "
                f"({requests[first_of[key]].target!r} and {request.target!r}): keep one of them. Nothing was changed."
            )
        elif requests[first_of[key]] == request:
            repeated += 1
        else:
            unique.append(request)  # the same edit, with other rephrasings or locality prompts to score
    if repeated:
        warnings.warn(f"{repeated} fact(s) were given more than once; each is edited once.", stacklevel=3)
    return unique


def _check_lengths(model: nn.Module, examples: list) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(example.input_ids) for example in examples)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(
            f"A fact is {longest} tokens long but the model takes at most {limit}: shorten its prompt or target."
        )


class _RowBuffer:
    """
    Holds each module's cached rows (keys and value gradients) until they fill an editor batch. One base-model batch
    has few target tokens (about 37 in 32 CounterFact facts), and a hyper-network pass reads all its weights whatever
    the number of rows: passes over full editor batches read them far less often. Memory stays below one editor batch
    per module, whatever the number of facts.
    """

    def __init__(self, size: int | float):
        self.size = size  # rows per editor batch; `math.inf` holds every row until `rest()`
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def full_chunks(
        self, cached: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adds a batch's rows; returns, per module, the rows that fill whole editor batches (the rest waits)."""
        ready = {}
        for name, pair in cached.items():
            self.pending.setdefault(name, []).append(pair)
            held = sum(keys.shape[0] for keys, _ in self.pending[name])
            if held >= self.size:
                keys, value_grads = self._take(name)
                full = held - held % self.size
                ready[name] = (keys[:full], value_grads[:full])
                if full < held:
                    self.pending[name] = [(keys[full:], value_grads[full:])]
        return ready

    def rest(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The rows still waiting, per module."""
        return {name: self._take(name) for name in list(self.pending)}

    def _take(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.pending.pop(name)
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([keys for keys, _ in pairs]), torch.cat([value_grads for _, value_grads in pairs])


class MalmenEditableMixin:
    """Methods given to a base model by [`MalmenEditorModel.attach`]."""

    def apply_edits(self, facts: Iterable[FactLike], **kwargs: Any) -> EditHandle:
        """Applies `facts` with the attached editor and tokenizer (see [`apply_edits`])."""
        return apply_edits(self.malmen_editor, self, facts, tokenizer=self.malmen_tokenizer, **kwargs)

    def revert_edits(self) -> int:
        """Reverts every edit applied to this model, newest first, bit for bit; returns how many calls were undone."""
        return revert_edits(self)

    def detach_editor(self) -> None:
        """Removes the attached editor and gives the model back its own class. Applied edits stay applied."""
        del self.__dict__["malmen_editor"], self.__dict__["malmen_tokenizer"]
        self.__class__ = self.__class__.__bases__[1]

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The class made by `attach` is not importable by its name: pickle (and `copy`) rebuild it from the model's
        # own class instead. The state (weights, editor, tokenizer, applied edits) is the model's `__dict__`.
        return _new_editable, (type(self).__bases__[1],), self.__getstate__()


_EDITABLE_CLASSES: dict[type, type] = {}


def _editable_class(base_class: type) -> type:
    """`base_class` with [`MalmenEditableMixin`], one per base class."""
    if base_class not in _EDITABLE_CLASSES:
        # Keep the class name: `save_pretrained` writes it to config.json as the architecture to load.
        _EDITABLE_CLASSES[base_class] = type(
            base_class.__name__, (MalmenEditableMixin, base_class), {"__module__": base_class.__module__}
        )
    return _EDITABLE_CLASSES[base_class]


def _new_editable(base_class: type) -> nn.Module:
    """An empty attached model of `base_class`, whose state pickle then sets (see `__reduce_ex__`)."""
    return object.__new__(_editable_class(base_class))


def attach_editor(
    editor: nn.Module, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase"
) -> "PreTrainedModel":
    """
    Gives `model` the methods `apply_edits(facts, ...)`, `revert_edits()` and `detach_editor()`, backed by `editor`
    and `tokenizer` (in the spirit of peft's `inject_adapter_in_model`). The model keeps its class name, so
    `model.save_pretrained` is unaffected. Also a method of the editor: `editor.attach(model, tokenizer)`.

    Returns:
        The same `model` object.
    """
    edited_modules(editor, model)
    base_class = type(model)
    if isinstance(model, MalmenEditableMixin):
        base_class = base_class.__bases__[1]
    # Plain attributes, not submodules: the editor must stay out of the model's state dict.
    model.__dict__["malmen_editor"] = editor
    model.__dict__["malmen_tokenizer"] = tokenizer
    model.__class__ = _editable_class(base_class)
    return model
