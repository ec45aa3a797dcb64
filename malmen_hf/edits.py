"""
Applied edits: the handle of each `apply_edits` call and the model's stack of them (exact undo), the shifting of the
weights itself, and edits as files: the weight shifts (safetensors) and a JSON manifest of the facts, the editor and
the base model. Loading them onto a fresh copy of the same base model gives bit for bit the weights of the original
edit.

The manifest holds the SHA-256 of the shifts file and of its own content: an integrity check against damaged or
carelessly modified files, not a signature (anyone who changes an artifact can recompute both).
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .facts import EditRequest, as_edit_requests
from .layers import check_materialized, get_edit_module, shifted_weight, weight_shape
from .saving import atomic_directory, file_sha256

MANIFEST_NAME = "edit_manifest.json"
SHIFTS_NAME = "edit_shifts.safetensors"
HISTORY_NAME = "edit_history.safetensors"
FORMAT = "malmen-hf-edits"
FORMAT_VERSION = 2
# Every field of a manifest, with its JSON type(s).
_MANIFEST_FIELDS = {
    "format": str, "format_version": int, "base_model": (str, type(None)), "editor": (str, type(None)),
    "aggregation": str, "num_tokens": int, "modules": dict, "shift_norms": dict, "shifts_sha256": str,
    "facts": list, "manifest_sha256": str,
}  # fmt: skip


_EDIT_STACK = "_malmen_edit_handles"
_EDIT_HISTORY = "_malmen_edit_history"


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
    # Per module, the weight tensor the edit shifted (checked by `revert`).
    _edited_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # The model's edit history before and after this round (`None`: the round kept none); see `edit_history`.
    _history_before: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _history_after: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        """Whether these edits are still applied to the model."""
        return self in getattr(self._model, _EDIT_STACK, [])

    def revert(self, force: bool = False) -> None:
        """
        Restores the weights this call changed, bit for bit, all or nothing. Later edits that are still applied must
        go first.

        Args:
            force (`bool`, defaults to `False`): Restore even a weight that was replaced or changed since the edit by
                something other than malmen-hf (that change is then lost). Without it, such a revert is refused.
        """
        stack = getattr(self._model, _EDIT_STACK, [])
        if self not in stack:
            raise RuntimeError("These edits are not applied to the model (they were already reverted).")
        if stack[-1] is not self:
            raise RuntimeError(
                f"{len(stack) - stack.index(self) - 1} later apply_edits call(s) are still applied on top of these "
                "edits: revert those first (newest first), or call `revert_edits(model)` to undo all of them."
            )
        weights = {name: self._current_weight(name) for name in self._original_weights}
        if not force:
            self._check_unchanged(weights)
        restored: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, original in self._original_weights.items():
                    edited = weights[name].detach().clone()
                    weights[name].copy_(original)
                    restored.append((weights[name], edited))
        except BaseException:
            with torch.no_grad():  # all or nothing: the layers restored so far get their edited weights back
                for weight, edited in restored:
                    weight.copy_(edited)
            raise
        stack.pop()
        if self._history_after is not None:  # the history as it was before this round, the very same tensors
            _set_history(self._model, self._history_before)
        self._original_weights = {}

    def _current_weight(self, name: str) -> torch.Tensor:
        try:
            return get_edit_module(self._model, name).weight
        except ValueError:
            raise RuntimeError(f"The model no longer has the edited module {name!r}: nothing was reverted.") from None

    def _check_unchanged(self, weights: dict[str, torch.Tensor]) -> None:
        """
        Each edited weight must be the very tensor the edit shifted, still holding what the edit left there: the
        original weight plus the kept shift, recomputed as `shift_weights` computed it (bit for bit, on its device;
        without kept shifts only the tensor's identity is checked).
        """
        for name, weight in weights.items():
            parameter = self._edited_weights.get(name)
            if parameter is None:
                continue
            changed = False
            if weight is parameter and self._shifts is not None:
                module = get_edit_module(self._model, name)
                edited = shifted_weight(module, self._shifts[name], self._original_weights[name])
                changed = not torch.equal(weight.detach(), edited)
            if weight is not parameter or changed:
                what = "was replaced" if weight is not parameter else "was changed"
                raise RuntimeError(
                    f"The weight of {name!r} {what} since these edits were applied, by something other than "
                    "malmen-hf: reverting would overwrite that change. Nothing was reverted; call "
                    "`revert(force=True)` to restore the weights from before the edit anyway."
                )

    def save(self, save_directory: str | os.PathLike) -> None:
        """
        Saves these edits as an artifact: `edit_shifts.safetensors` (each module's weight shift) and
        `edit_manifest.json` (the facts, the editor, the base model, the SHA-256 of every weight the edit was made on,
        of the shifts file and of the manifest's own content: an integrity check, not a signature). [`load_edits`]
        applies them to a fresh copy of the base model with a bit-identical result. Save while the edits are
        applied. The folder is written aside and swapped into place: a failed save leaves the previous one.
        """
        save_edits(self, save_directory)


def edit_history(model: nn.Module) -> dict[str, torch.Tensor]:
    """
    What the rounds of edits applied to `model` leave for the later ones (empty when there is nothing):

    - from editors with `history_weight > 0`, the keys of those rounds: per edited layer (by its name), the sum of
      `K^T K` over them, one `d_in x d_in` matrix, which later rounds add to their normal equation;
    - from editors with `lifelong_normalization`, the running statistics of each hyper-network's normalizer after the
      last such round, under their names in the editor's state dict (see [`normalizer_statistic_name`]), which later
      rounds continue from.

    Reverting a round restores it as it was before that round. Saved with each round's edits ([`EditHandle.save`])
    and set again by [`load_edits`], so a history continues in another process.
    """
    return dict(model.__dict__.get(_EDIT_HISTORY) or {})


def normalizer_statistic_name(shape_key: str, buffer: str) -> str:
    """
    The name, in a model's edit history, of the buffer `buffer` of the running normalizer of the editor's
    hyper-network `shape_key` (`"{d_in}x{d_out}"`): its name in the editor's state dict.
    """
    return f"nets.{shape_key}.normalizer.{buffer}"


_NORMALIZER_STATISTIC = re.compile(r"nets\.\d+x\d+\.normalizer\.\w+")


def _set_history(model: nn.Module, history: dict[str, torch.Tensor] | None) -> None:
    # A plain attribute, like the stack of handles: the history stays out of the state dict.
    if history:
        model.__dict__[_EDIT_HISTORY] = history
    else:
        model.__dict__.pop(_EDIT_HISTORY, None)


def revert_edits(model: nn.Module) -> int:
    """Reverts every edit applied to `model`, newest first; returns how many `apply_edits` calls were undone."""
    stack = getattr(model, _EDIT_STACK, [])
    count = len(stack)
    while stack:
        stack[-1].revert()
    return count


def apply_shifts(
    model: nn.Module,
    modules: dict[str, nn.Module],
    shifts: dict[str, torch.Tensor],
    *,
    facts: list[EditRequest],
    num_tokens: int,
    aggregation: str,
    timings: dict[str, float],
    editor_name_or_path: str | None,
    base_model_name_or_path: str | None,
    keep_shifts: bool = True,
    history: dict[str, torch.Tensor] | None = None,
) -> EditHandle:
    """
    Adds each shift to its module's weight (all or nothing, see [`shift_weights`]) and records the edit on `model`:
    the returned handle reverts it. `history`, when given, becomes the model's edit history (see [`edit_history`]).
    """
    handle = EditHandle(
        modules=list(modules),
        shift_norms={name: float(shift.norm()) for name, shift in shifts.items()},
        num_facts=len(facts),
        num_tokens=num_tokens,
        aggregation=aggregation,
        timings=timings,
        _model=model,
        _original_weights=shift_weights(modules, shifts),
        facts=facts,
        editor_name_or_path=editor_name_or_path,
        base_model_name_or_path=base_model_name_or_path,
        _shifts=shifts if keep_shifts else None,
        _edited_weights={name: module.weight for name, module in modules.items()},
        _history_before=edit_history(model) if history is not None else None,
        _history_after=history,
    )
    # A plain attribute: the stack must stay out of the state dict.
    model.__dict__.setdefault(_EDIT_STACK, []).append(handle)
    if history is not None:
        _set_history(model, history)
    return handle


def shift_weights(modules: dict[str, nn.Module], shifts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
            stacklevel=4,
        )
    return originals


def save_edits(handle: "EditHandle", save_directory: str | os.PathLike) -> None:
    """Writes `handle`'s shifts and manifest to `save_directory` (see [`EditHandle.save`])."""
    if not handle.applied:
        raise RuntimeError("These edits were reverted: save them while they are applied (before `revert()`).")
    if handle._shifts is None:
        raise RuntimeError("This handle kept no shifts: apply the edits with `keep_shifts=True` to save them.")
    shifts = {name: shift.detach().cpu().contiguous() for name, shift in handle._shifts.items()}
    modules = {
        name: {
            "shape": list(original.shape),
            "dtype": str(original.dtype).removeprefix("torch."),
            "original_sha256": tensor_sha256(original),
        }
        for name, original in handle._original_weights.items()
    }
    # The folder is written aside and put in place in one step: a failed or killed save leaves the previous one.
    with atomic_directory(save_directory) as folder:
        save_file(shifts, folder / SHIFTS_NAME, metadata={"format": FORMAT})
        history = {}
        if handle._history_after is not None:
            # The model's edit history after this round: loading these edits in another process continues it.
            history = {name: tensor.detach().cpu().contiguous() for name, tensor in handle._history_after.items()}
            save_file(history, folder / HISTORY_NAME, metadata={"format": FORMAT})
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": handle.base_model_name_or_path,
            "editor": handle.editor_name_or_path,
            "aggregation": handle.aggregation,
            "num_tokens": handle.num_tokens,
            "modules": modules,
            "shift_norms": {name: float(shift.norm()) for name, shift in shifts.items()},
            "shifts_sha256": file_sha256(folder / SHIFTS_NAME),
            "facts": [dataclasses.asdict(fact) for fact in handle.facts],
        }
        if history:
            manifest["history_sha256"] = file_sha256(folder / HISTORY_NAME)
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, allow_nan=False), encoding="utf-8")


def load_edits(model: nn.Module, directory: str | os.PathLike, *, editor: nn.Module | None = None) -> "EditHandle":
    """
    Applies edits saved with [`EditHandle.save`] to `model`, a fresh copy of the base model they were made on.

    Everything is checked before any weight changes: the manifest (its format, its fields, its facts, and that its
    content matches its own SHA-256), that the shifts file is the one the manifest describes (not modified or
    truncated), that every shift is finite and has its layer's shape, that each edited module is an editable layer
    of the model with the recorded shape and the very weights the edit was made on (so edits made on another base
    model are refused), and that the editor edits each of them. The SHA-256s guard against damaged and carelessly
    modified files; they are not a signature: only load artifacts from sources you trust.

    Args:
        model (`nn.Module`): A fresh copy of the base model the edits were made on.
        directory (`str` or `os.PathLike`): The folder `handle.save` wrote.
        editor ([`MalmenEditorModel`], *optional*): When given (by default, the editor attached to `model`), every
            shifted module must be one its config edits.

    Returns:
        [`EditHandle`]: as `apply_edits` returns it; `revert()` restores the weights bit for bit.

    Raises:
        `FileNotFoundError`: If the folder lacks the manifest or the shifts file.
        `ValueError`: If anything does not match; the model is then unchanged.
    """
    folder = Path(directory)
    manifest = _read_manifest(folder)
    try:
        facts = as_edit_requests(manifest["facts"])
    except ValueError as error:
        raise ValueError(f"{folder / MANIFEST_NAME}: {error}; nothing was changed") from None
    shifts = _read_shifts(folder, manifest)
    check_materialized(model)
    modules = {name: _checked_module(model, folder, manifest, name, shifts[name]) for name in manifest["modules"]}
    _check_editor_modules(folder, modules, editor if editor is not None else getattr(model, "malmen_editor", None))
    history = _read_history(folder, manifest)
    return apply_shifts(  # all or nothing: the last step that can fail
        model,
        modules,
        shifts,
        facts=facts,
        num_tokens=manifest["num_tokens"],
        aggregation=manifest["aggregation"],
        timings={},
        editor_name_or_path=manifest["editor"],
        base_model_name_or_path=manifest["base_model"],
        history=history,
    )


def _read_history(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """
    The edit history saved with the edits (edits made with `history_weight > 0` or `lifelong_normalization`),
    checked; else `None`.
    """
    digest = manifest.get("history_sha256")
    if digest is None:
        return None
    path = folder / HISTORY_NAME
    if not isinstance(digest, str) or not path.is_file() or file_sha256(path) != digest:
        raise ValueError(
            f"{path} is missing or is not the file its manifest describes (its SHA-256 differs); nothing was changed"
        )
    history = load_file(path)
    for name, tensor in history.items():
        if _NORMALIZER_STATISTIC.fullmatch(name):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{path}: the statistic {name!r} is not finite; nothing was changed")
        elif tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1] or not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: the history of {name!r} is not a finite square matrix; nothing was changed")
    return history


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no saved edits ({MANIFEST_NAME} is missing)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({error}); nothing was changed") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a malmen-hf edit manifest (its 'format' is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {manifest.get('format_version')!r}; this malmen-hf reads version "
            f"{FORMAT_VERSION} only (version 1 manifests carry no digest of their own content): save the edits "
            "again with this version, or use the malmen-hf version that wrote them"
        )
    for name, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            raise ValueError(
                f"{path} has no valid {name!r} (got {manifest.get(name)!r}): it was modified or not written by "
                "malmen-hf; nothing was changed"
            )
    if _manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise ValueError(
            f"{path} was modified after it was saved (its content does not match its 'manifest_sha256'); nothing "
            "was changed"
        )
    return manifest


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """The SHA-256 of the manifest's content (all but this digest), in a canonical JSON form."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_shifts(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = folder / SHIFTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: {SHIFTS_NAME} is missing")
    if file_sha256(path) != manifest["shifts_sha256"]:
        raise ValueError(
            f"{path} is not the file its manifest describes (modified or truncated: its SHA-256 differs); "
            "nothing was changed"
        )
    try:
        shifts = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} cannot be read ({error}); nothing was changed") from None
    if set(shifts) != set(manifest["modules"]) or set(shifts) != set(manifest["shift_norms"]):
        raise ValueError(f"{path} holds shifts for {sorted(shifts)}, its manifest for {sorted(manifest['modules'])}")
    for name, shift in shifts.items():
        if not shift.is_floating_point() or shift.dim() != 2 or not torch.isfinite(shift).all():
            raise ValueError(f"{path}: the shift of {name!r} is not a finite 2-d float tensor; nothing was changed")
        if not math.isclose(float(shift.norm()), manifest["shift_norms"][name], rel_tol=1e-5):
            raise ValueError(
                f"{path}: the shift of {name!r} has norm {float(shift.norm()):.6g}, its manifest says "
                f"{manifest['shift_norms'][name]!r}; nothing was changed"
            )
    return shifts


def _checked_module(model: nn.Module, folder: Path, manifest: dict, name: str, shift: torch.Tensor) -> nn.Module:
    """The module `name` of `model`, after checking that the edit was made on its very weights."""
    record = manifest["modules"][name]
    module = get_edit_module(model, name)
    original = module.weight
    dtype = str(original.dtype).removeprefix("torch.")
    if not isinstance(record, dict) or list(original.shape) != record.get("shape") or dtype != record.get("dtype"):
        raise ValueError(
            f"{folder}: module {name!r} is {tuple(original.shape)} {original.dtype} here but the edits were made on "
            f"{record!r} weights of {manifest['base_model']!r}; nothing was changed"
        )
    if tensor_sha256(original) != record.get("original_sha256"):
        raise ValueError(
            f"{folder}: the weights of {name!r} are not the ones these edits were made on (a different base "
            f"model than {manifest['base_model']!r}, or weights already edited); load them onto a fresh copy of "
            "that model. Nothing was changed."
        )
    if tuple(shift.shape) != weight_shape(module):
        raise ValueError(
            f"{folder}: the shift of {name!r} has shape {tuple(shift.shape)}, not (d_in, d_out) = "
            f"{weight_shape(module)}; nothing was changed"
        )
    return module


def _check_editor_modules(folder: Path, modules: dict[str, nn.Module], editor: nn.Module | None) -> None:
    if editor is None:
        return
    foreign = sorted(set(modules) - set(editor.config.edit_modules))
    if foreign:
        raise ValueError(
            f"{folder} shifts {foreign}, which the editor does not edit (its config edits "
            f"{editor.config.edit_modules}); nothing was changed"
        )


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes, whatever its dtype and device."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()
