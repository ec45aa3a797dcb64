"""`apply_edits`: cache, run the hyper-networks, solve, and shift the base model's weights in place, undoably."""

import contextlib
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .caching import cache_keys_and_value_grads, frozen
from .facts import (
    IGNORE_INDEX,
    EditRequest,
    FactLike,
    TokenizedExample,
    as_edit_requests,
    batches_by_length,
    collate,
    model_kind,
    pad_id_of,
    tokenize_edit_prompts,
)
from .functional import dual_least_squares_shift, least_squares_shift, summed_shift, value_differences
from .layers import get_edit_module, shifted_weight, weight_shape

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_EDIT_STACK = "_malmen_edit_handles"


@dataclass
class EditHandle:
    """
    What one [`~MalmenEditorModel.apply_edits`] call changed, and the way back.

    Attributes:
        modules (`list[str]`): the edited modules.
        shift_norms (`dict[str, float]`): the Frobenius norm of the weight shift of each module.
        num_facts (`int`): how many facts were edited.
        num_tokens (`int`): how many target tokens they have.
        aggregation (`str`): `"least_squares"` or `"sum"`.
        timings (`dict[str, float]`): seconds spent caching, in the hyper-networks, and solving and applying.
        facts (`list[EditRequest]`): the facts that were edited.
        editor_name_or_path (`str`, *optional*): where the editor was loaded from.
        base_model_name_or_path (`str`, *optional*): the edited model's name or folder.
    """

    modules: list[str]
    shift_norms: dict[str, float]
    num_facts: int
    num_tokens: int
    aggregation: str
    timings: dict[str, float]
    _model: nn.Module = field(repr=False)
    _original_weights: dict[str, torch.Tensor] = field(repr=False)
    facts: list[EditRequest] = field(default_factory=list, repr=False)
    editor_name_or_path: str | None = None
    base_model_name_or_path: str | None = None
    _shifts: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        """Whether these edits are still applied to the model."""
        return self in getattr(self._model, _EDIT_STACK, [])

    def revert(self) -> None:
        """Restores the weights this call changed, bit for bit. Later edits that are still applied must go first."""
        stack = getattr(self._model, _EDIT_STACK, [])
        if self not in stack:
            raise RuntimeError("These edits are not applied to the model (they were already reverted).")
        if stack[-1] is not self:
            raise RuntimeError(
                f"{len(stack) - stack.index(self) - 1} later apply_edits call(s) are still applied on top of these "
                "edits: revert those first (newest first), or call `revert_edits(model)` to undo all of them."
            )
        with torch.no_grad():
            for name, weight in self._original_weights.items():
                self._model.get_submodule(name).weight.copy_(weight)
        stack.pop()
        self._original_weights = {}

    def save(self, save_directory: str | os.PathLike) -> None:
        """
        Saves these edits as an artifact: `edit_shifts.safetensors` (each module's weight shift) and
        `edit_manifest.json` (the facts, the editor, the base model, the SHA-256 of every weight the edit was made on,
        of the shifts file and of the manifest's own content: an integrity check, not a signature). [`load_edits`]
        applies them to a fresh copy of the base model with a bit-identical result. Save while the edits are
        applied. The folder is written aside and swapped into place: a failed save leaves the previous one.
        """
        from .artifacts import save_edits

        save_edits(self, save_directory)


def revert_edits(model: nn.Module) -> int:
    """Reverts every edit applied to `model`, newest first; returns how many `apply_edits` calls were undone."""
    stack = getattr(model, _EDIT_STACK, [])
    count = len(stack)
    while stack:
        stack[-1].revert()
    return count


def _push_handle(model: nn.Module, handle: EditHandle) -> None:
    """Records `handle` on `model` (a plain attribute: it must stay out of the state dict)."""
    model.__dict__.setdefault(_EDIT_STACK, []).append(handle)


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
    """Functional form of [`MalmenEditorModel.apply_edits`]."""
    requests = _without_duplicates(as_edit_requests(facts))
    if not isinstance(editor_batch_size, int) or editor_batch_size < 1:
        raise ValueError(f"editor_batch_size must be a positive integer, got {editor_batch_size!r}")
    modules = _checked_modules(editor, model)
    examples = tokenize_edit_prompts(tokenizer, requests, model_kind(model))
    batches = batches_by_length(examples, batch_size)
    _check_lengths(model, examples)

    timings = {"caching": 0.0, "hypernetwork": 0.0, "solve_and_apply": 0.0}
    sums = _NormalEquationSums(editor, modules, num_facts=len(requests), dual=True)
    rows = _RowBuffer(editor_batch_size)
    start = time.perf_counter()
    # closing(): if the hyper-network fails mid-way, the model's flags and mode are restored before the error leaves.
    stream = cached_batches(editor, model, modules, examples, batches, pad_id_of(tokenizer))
    with (
        contextlib.closing(stream),
        tqdm(total=len(batches), desc="Editing", unit="batch", disable=not progress) as bar,
    ):
        for cached in stream:
            bar.update(1)
            timings["caching"] += time.perf_counter() - start
            start = time.perf_counter()
            with torch.no_grad():
                sums.add(rows.full_chunks(cached), editor_batch_size)
            timings["hypernetwork"] += time.perf_counter() - start
            start = time.perf_counter()

    start = time.perf_counter()
    with torch.no_grad():
        sums.add(rows.rest(), editor_batch_size)
    timings["hypernetwork"] += time.perf_counter() - start

    start = time.perf_counter()
    shifts = sums.solve()
    handle = EditHandle(
        modules=list(modules),
        shift_norms={name: float(shift.norm()) for name, shift in shifts.items()},
        num_facts=len(requests),
        num_tokens=sum(sum(label != IGNORE_INDEX for label in example.labels) for example in examples),
        aggregation=editor.config.aggregation,
        timings=timings,
        _model=model,
        _original_weights=_apply_shifts(modules, shifts),
        facts=requests,
        editor_name_or_path=getattr(editor, "name_or_path", None) or None,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        _shifts=shifts if keep_shifts else None,
    )
    _push_handle(model, handle)
    timings["solve_and_apply"] = time.perf_counter() - start
    return handle


def cached_batches(
    editor: nn.Module,
    model: nn.Module,
    modules: dict[str, nn.Module],
    examples: list[TokenizedExample],
    batches: list[list[int]],
    pad_id: int,
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """
    Yields, batch after batch, the keys and value gradients of each edited module (see
    [`cache_keys_and_value_grads`]), with the model frozen and in eval mode meanwhile.
    """
    kind = model_kind(model)
    encoder_modules = _encoder_module_names(model, modules)
    if editor.config.token_positions == "subject_last":
        _check_subjects(examples, kind)
    with frozen(model), torch.enable_grad():
        for indices in batches:
            batch = collate([examples[i] for i in indices], pad_id, kind)
            yield cache_keys_and_value_grads(
                model, modules, batch, kind, encoder_modules, editor.config.token_positions
            )


def _check_subjects(examples: list[TokenizedExample], kind: str) -> None:
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


def _checked_modules(editor: nn.Module, model: nn.Module) -> dict[str, nn.Module]:
    """The model's edited modules, after checking they exist, are linear, and have the shapes the editor expects."""
    _check_materialized(model)
    modules = {}
    for name, expected in zip(editor.config.edit_modules, editor.config.edit_module_shapes, strict=True):
        module = get_edit_module(model, name)
        if list(weight_shape(module)) != list(expected):
            raise ValueError(
                f"Module {name!r} has shape (d_in, d_out) = {weight_shape(module)} but this editor was built for "
                f"{tuple(expected)}: it belongs to another model. Build one for this model with "
                "`MalmenEditorModel.for_model(model)`."
            )
        modules[name] = module
    if not modules:
        raise ValueError("This editor edits no modules: its config has an empty `edit_modules`.")
    _warn_if_other_base_model(editor, model)
    return modules


def _check_materialized(model: nn.Module) -> None:
    """A model loaded without its weights (on the meta device) can be neither run nor shifted."""
    if any(param.is_meta for param in model.parameters()):
        raise ValueError(
            "The model has weights on the meta device (created without loading them, e.g. under "
            "`init_empty_weights()` or with `device_map` offloading): load it with its weights on a real device "
            "(`from_pretrained(..., device_map=None)`) before editing it. Nothing was changed."
        )


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


def _warn_if_other_base_model(editor: nn.Module, model: nn.Module) -> None:
    """The shapes match (checked above), but an editor's quality is only known for the model it was trained for."""
    expected = editor.config.base_model_name_or_path
    actual = getattr(model.config, "_name_or_path", None)
    if expected and actual and _short_name(expected) != _short_name(actual):
        warnings.warn(
            f"This editor was made for {expected!r} but is editing {actual!r}. The layer shapes match, so the edit "
            "runs, but how well the editor works is only known for its own base model.",
            stacklevel=4,
        )


def _short_name(name_or_path: str) -> str:
    """`org/Model`, `/cache/model` and `model` name the same model here (a Hub id, its local copy, a short name)."""
    return name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()


def _check_lengths(model: nn.Module, examples: list) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(example.input_ids) for example in examples)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(
            f"A fact is {longest} tokens long but the model takes at most {limit}: shorten its prompt or target."
        )


def _encoder_module_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """The edited modules that read every non-padding input position: an encoder's, or all of a classifier's."""
    kind = model_kind(model)
    if kind == "classifier":
        return set(modules)
    if kind != "seq2seq":
        return set()
    encoder_ids = {id(module) for module in model.get_encoder().modules()}
    return {name for name, module in modules.items() if id(module) in encoder_ids}


class _RowBuffer:
    """
    Holds each module's cached rows (keys and value gradients) until they fill an editor batch. One base-model batch
    has few target tokens (about 37 in 32 CounterFact facts), and a hyper-network pass reads all its weights whatever
    the number of rows: passes over full editor batches read them far less often. Memory stays below one editor batch
    per module, whatever the number of facts.
    """

    def __init__(self, size: int):
        self.size = size
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


class _NormalEquationSums:
    """
    Running sums over all tokens of `K^T K` and `K^T D` (least squares) or `K~^T G~` (sum) for each edited module:
    the editor is frozen, so each batch is folded in at once and memory does not grow with the number of facts.

    With `dual`, a least-squares module keeps its keys and value differences instead, as long as it has at most
    `d_in` of them, and is solved through the `n x n` system of its tokens ([`dual_least_squares_shift`]): cheaper
    in time and memory with fewer tokens than key features. Training back-propagates through the sums: no `dual`.
    """

    def __init__(self, editor: nn.Module, modules: dict[str, nn.Module], num_facts: int, dual: bool = False):
        self.editor = editor
        self.least_squares = editor.config.aggregation == "least_squares"
        self.num_facts = num_facts
        # The preserved keys' covariance is a d_in x d_in term of the normal equation: no n x n dual form then.
        self.covariance_weight = editor.config.covariance_weight if self.least_squares else 0.0
        dual = dual and self.covariance_weight == 0
        if self.covariance_weight > 0:
            _check_covariances_fitted(editor, modules)
        # The running sums stay in (at least) float32 even for a half-precision editor: they add up many batches.
        self.device, self.dtype = editor.device, torch.promote_types(editor.dtype, torch.float32)
        self.names = list(modules)
        self.gram, self.cross = {}, {}
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # the dual modules' (keys, diffs)
        for name, module in modules.items():
            d_in, d_out = weight_shape(module)
            if dual and self.least_squares:
                empty = torch.empty(0, d_in + d_out, device=self.device, dtype=self.dtype)
                self.rows[name] = [(empty[:, :d_in], empty[:, d_in:])]
                continue
            self.cross[name] = torch.zeros(d_in, d_out, device=self.device, dtype=self.dtype)
            if self.least_squares:
                self.gram[name] = torch.zeros(d_in, d_in, device=self.device, dtype=self.dtype)

    def add(self, cached: dict[str, tuple[torch.Tensor, torch.Tensor]], editor_batch_size: int) -> None:
        for name, (keys, value_grads) in cached.items():
            net, layer_index = self.editor.net_for(name)
            for start in range(0, keys.shape[0], editor_batch_size):
                chunk_keys = keys[start : start + editor_batch_size].to(self.device, self.editor.dtype)
                chunk_grads = value_grads[start : start + editor_batch_size].to(self.device, self.editor.dtype)
                pseudo_keys, pseudo_grads = net(chunk_keys, chunk_grads, layer_index)
                if self.least_squares:
                    diffs = value_differences(chunk_keys, pseudo_keys, pseudo_grads, net.lr[layer_index])
                    self._add_rows(name, chunk_keys.to(self.dtype), diffs.to(self.dtype))
                else:
                    self.cross[name].addmm_(pseudo_keys.T.to(self.dtype), pseudo_grads.to(self.dtype))

    def _add_rows(self, name: str, keys: torch.Tensor, diffs: torch.Tensor) -> None:
        if name in self.rows:
            self.rows[name].append((keys, diffs))
            if sum(held.shape[0] for held, _ in self.rows[name]) <= keys.shape[1]:
                return
            # More tokens than key features: from now on the sums are the smaller and the cheaper.
            keys, diffs = self._stacked_rows(name)
            del self.rows[name]
            self.gram[name] = keys.new_zeros(keys.shape[1], keys.shape[1])
            self.cross[name] = keys.new_zeros(keys.shape[1], diffs.shape[1])
        self.gram[name].addmm_(keys.T, keys)
        self.cross[name].addmm_(keys.T, diffs)

    def system_gram(self, name: str) -> torch.Tensor:
        """`K^T K + a n C0`: the normal equation's matrix without its ridge (MEMIT's preserved keys, when `a > 0`)."""
        if self.covariance_weight == 0:
            return self.gram[name]
        covariance = self.editor.key_covariance(name).matrix().to(self.gram[name])
        return self.gram[name] + self.covariance_weight * self.num_facts * covariance

    def _stacked_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([keys for keys, _ in self.rows[name]]), torch.cat([diffs for _, diffs in self.rows[name]])

    def solve(self) -> dict[str, torch.Tensor]:
        shifts = {}
        for name in self.names:
            net, layer_index = self.editor.net_for(name)
            try:
                if name in self.rows:
                    shift = dual_least_squares_shift(*self._stacked_rows(name), net.lamda[layer_index].detach())
                elif self.least_squares:
                    shift = least_squares_shift(
                        self.system_gram(name), self.cross[name], net.lamda[layer_index].detach()
                    )
                else:
                    shift = summed_shift(self.cross[name], net.lr[layer_index].detach())
            except torch.linalg.LinAlgError as error:
                raise ValueError(
                    f"The least-squares solve for {name!r} failed ({error}). Raise the editor's lambda (a larger "
                    "ridge) or look for NaN weights in the model; no weight was changed."
                ) from None
            if not torch.isfinite(shift).all():
                raise ValueError(
                    f"The weight shift for {name!r} is not finite (the keys or gradients overflowed, or lr is too "
                    "large for this model's dtype); no weight was changed."
                )
            shifts[name] = shift
        return shifts


def _check_covariances_fitted(editor: nn.Module, modules: dict[str, nn.Module]) -> None:
    unfitted = [name for name in modules if editor.key_covariance(name).count == 0]
    if unfitted:
        raise ValueError(
            f"This editor weighs the preserved keys' covariance (covariance_weight={editor.config.covariance_weight}) "
            f"but has none fitted for {unfitted}: call `malmen_hf.fit_key_covariance(editor, model, texts, "
            "tokenizer)` with text the edits should leave alone (or set covariance_weight=0). No weight was changed."
        )


def _apply_shifts(modules: dict[str, nn.Module], shifts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Adds each shift to its module's weight; returns copies of the original weights. All or nothing. Warns once,
    naming them, about the layers whose weights did not change.
    """
    originals: dict[str, torch.Tensor] = {}
    unchanged = []
    try:
        with torch.no_grad():
            for name, shift in shifts.items():
                weight = modules[name].weight
                new_weight = shifted_weight(modules[name], shift)
                originals[name] = weight.detach().clone()
                if torch.equal(new_weight, originals[name]):
                    unchanged.append(name)
                weight.copy_(new_weight)
    except BaseException:
        with torch.no_grad():
            for name, original in originals.items():
                modules[name].weight.copy_(original)
        raise
    if unchanged:
        dtype = next(iter(modules.values())).weight.dtype
        in_float32 = ", or edit the model in float32" if dtype in (torch.float16, torch.bfloat16) else ""
        warnings.warn(
            f"The edit left the weights of {unchanged} unchanged: their shifts are zero (e.g. an infinite lambda) "
            f"or too small to change a {dtype} weight. Raise the editor's lr or lower its lambda{in_float32}.",
            stacklevel=3,
        )
    return originals


class MalmenEditableMixin:
    """Methods given to a base model by [`MalmenEditorModel.attach`]."""

    def apply_edits(self, facts: Iterable[FactLike], **kwargs: Any) -> EditHandle:
        """Applies `facts` with the attached editor and tokenizer (see [`MalmenEditorModel.apply_edits`])."""
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
    model: "PreTrainedModel", editor: nn.Module, tokenizer: "PreTrainedTokenizerBase"
) -> "PreTrainedModel":
    """Adds [`MalmenEditableMixin`] to the `model` instance, backed by `editor` and `tokenizer` (in the spirit of
    peft's `inject_adapter_in_model`)."""
    _checked_modules(editor, model)
    base_class = type(model)
    if isinstance(model, MalmenEditableMixin):
        base_class = base_class.__bases__[1]
    # Plain attributes, not submodules: the editor must stay out of the model's state dict.
    model.__dict__["malmen_editor"] = editor
    model.__dict__["malmen_tokenizer"] = tokenizer
    model.__class__ = _editable_class(base_class)
    return model
