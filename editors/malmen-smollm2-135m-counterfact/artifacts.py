"""
Applied edits as files: the weight shifts (safetensors) and a JSON manifest of the facts, the editor and the base
model. Loading them onto a fresh copy of the same base model gives bit for bit the weights of the original edit.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .facts import EditRequest
from .layers import get_edit_module, weight_shape

if TYPE_CHECKING:
    from .editing import EditHandle

MANIFEST_NAME = "edit_manifest.json"
SHIFTS_NAME = "edit_shifts.safetensors"
FORMAT = "malmen-hf-edits"
FORMAT_VERSION = 1


def save_edits(handle: "EditHandle", save_directory: str | os.PathLike) -> None:
    """Writes `handle`'s shifts and manifest to `save_directory` (see [`EditHandle.save`])."""
    if not handle.applied:
        raise RuntimeError("These edits were reverted: save them while they are applied (before `revert()`).")
    if handle._shifts is None:
        raise RuntimeError("This handle kept no shifts: apply the edits with `keep_shifts=True` to save them.")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    shifts = {name: shift.detach().cpu().contiguous() for name, shift in handle._shifts.items()}
    # Each file is written beside its final name and renamed into place, the manifest last: a failed save leaves the
    # previous files as they were, and a manifest never describes a shifts file that is not there.
    temporary = folder / f".{SHIFTS_NAME}.tmp"
    save_file(shifts, temporary, metadata={"format": FORMAT})
    modules = {
        name: {
            "shape": list(original.shape),
            "dtype": str(original.dtype).removeprefix("torch."),
            "original_sha256": tensor_sha256(original),
        }
        for name, original in handle._original_weights.items()
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": handle.base_model_name_or_path,
        "editor": handle.editor_name_or_path,
        "aggregation": handle.aggregation,
        "num_tokens": handle.num_tokens,
        "modules": modules,
        "shifts_sha256": file_sha256(temporary),
        "facts": [dataclasses.asdict(fact) for fact in handle.facts],
    }
    os.replace(temporary, folder / SHIFTS_NAME)
    temporary = folder / f".{MANIFEST_NAME}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, folder / MANIFEST_NAME)


def load_edits(model: nn.Module, directory: str | os.PathLike) -> "EditHandle":
    """
    Applies edits saved with [`EditHandle.save`] to `model`, a fresh copy of the base model they were made on.

    Everything is checked before any weight changes: the manifest's format, that the shifts file is the one the
    manifest describes (not modified or truncated), and that each edited module exists with the recorded shape and
    the very weights the edit was made on (so edits made on another base model are refused).

    Returns:
        [`EditHandle`]: as `apply_edits` returns it; `revert()` restores the weights bit for bit.

    Raises:
        `FileNotFoundError`: If the folder lacks the manifest or the shifts file.
        `ValueError`: If anything does not match; the model is then unchanged.
    """
    from .editing import _EDIT_STACK, EditHandle, _apply_shifts

    folder = Path(directory)
    manifest = _read_manifest(folder)
    shifts = _read_shifts(folder, manifest)
    modules = {}
    for name, record in manifest["modules"].items():
        module = get_edit_module(model, name)
        original = module.weight
        if list(original.shape) != record["shape"] or str(original.dtype).removeprefix("torch.") != record["dtype"]:
            raise ValueError(
                f"{folder}: module {name!r} is {tuple(original.shape)} {original.dtype} here but the edits were made "
                f"on {tuple(record['shape'])} {record['dtype']} weights of {manifest['base_model']!r}; nothing was "
                "changed"
            )
        if tensor_sha256(original) != record["original_sha256"]:
            raise ValueError(
                f"{folder}: the weights of {name!r} are not the ones these edits were made on (a different base "
                f"model than {manifest['base_model']!r}, or weights already edited); load them onto a fresh copy of "
                "that model. Nothing was changed."
            )
        if tuple(shifts[name].shape) != weight_shape(module):
            raise ValueError(
                f"{folder}: the shift of {name!r} has shape {tuple(shifts[name].shape)}, not (d_in, d_out)"
            )
        modules[name] = module
    handle = EditHandle(
        modules=list(modules),
        shift_norms={name: float(shift.norm()) for name, shift in shifts.items()},
        num_facts=len(manifest["facts"]),
        num_tokens=manifest["num_tokens"],
        aggregation=manifest["aggregation"],
        timings={},
        _model=model,
        _original_weights=_apply_shifts(modules, shifts),
        facts=[EditRequest(**{**fact, "rephrases": tuple(fact["rephrases"])}) for fact in manifest["facts"]],
        editor_name_or_path=manifest["editor"],
        base_model_name_or_path=manifest["base_model"],
        _shifts=shifts,
    )
    model.__dict__.setdefault(_EDIT_STACK, []).append(handle)
    return handle


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no saved edits ({MANIFEST_NAME} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); nothing was changed") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a malmen-hf edit manifest (its 'format' is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {manifest.get('format_version')!r}; this malmen-hf reads version "
            f"{FORMAT_VERSION}: upgrade malmen-hf"
        )
    return manifest


def _read_shifts(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
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
    if set(shifts) != set(manifest["modules"]):
        raise ValueError(f"{path} holds shifts for {sorted(shifts)}, its manifest for {sorted(manifest['modules'])}")
    return shifts


def tensor_sha256(tensor: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes, whatever its dtype and device."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
