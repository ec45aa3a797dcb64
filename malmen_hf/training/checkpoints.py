"""
Training checkpoints of safetensors and JSON only: resuming unpickles nothing, so a checkpoint folder cannot run code.

A checkpoint `step_XXXXXXXX/` holds `editor.safetensors` (the editor's weights and buffers), `optimizer.safetensors`
(Adam's moment and step tensors), `rng.safetensors` (torch's random generator states) and `trainer_state.json` (the
step, the best validation score, the history, the optimizer's hyper-parameters, and the SHA-256 of each file). It is
written to a temporary folder and renamed into place when complete, so a killed save never leaves a partial one.
"""

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..saving import atomic_directory, file_sha256

STATE_NAME = "trainer_state.json"
FORMAT = "malmen-hf-checkpoint"
FORMAT_VERSION = 1
_FOLDER = re.compile(r"step_\d{8}")
_TENSOR_FILES = ("editor.safetensors", "optimizer.safetensors", "rng.safetensors")
# What the checkpoint itself records in trainer_state.json; the rest is the trainer's state, returned as it was given.
_OWN_KEYS = ("format", "format_version", "optimizer", "files")


def checkpoint_folder(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"step_{step:08d}"


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints in `checkpoints_dir`, oldest first."""
    folders = checkpoints_dir.glob("step_*") if checkpoints_dir.is_dir() else []
    return sorted(path for path in folders if _FOLDER.fullmatch(path.name) and (path / STATE_NAME).is_file())


def save_checkpoint(
    folder: Path, editor: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]
) -> None:
    """Writes a checkpoint to `folder` all at once (see the module's docstring)."""
    optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer.state_dict())
    tensors = {
        "editor.safetensors": {name: tensor.detach() for name, tensor in editor.state_dict().items()},
        "optimizer.safetensors": optimizer_tensors,
        "rng.safetensors": _rng_states(),
    }
    with atomic_directory(folder) as temporary:
        for name, values in tensors.items():
            save_file({key: value.cpu().contiguous() for key, value in values.items()}, temporary / name)
        state = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **trainer_state,
            "optimizer": optimizer_rest,
            "files": {name: file_sha256(temporary / name) for name in _TENSOR_FILES},
        }
        (temporary / STATE_NAME).write_text(json.dumps(state, indent=1))


def load_checkpoint(folder: Path, editor: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """
    Restores the editor, the optimizer and the random generators from a checkpoint; returns the trainer's state.

    Raises:
        `ValueError`: If the folder is not a complete checkpoint of this format, or does not fit this editor; the
            editor and the optimizer are then unchanged.
    """
    state = _read_state(folder)
    tensors = {}
    for name in _TENSOR_FILES:
        path = folder / name
        if not path.is_file() or file_sha256(path) != state["files"].get(name):
            raise ValueError(f"{path} is missing, truncated or modified (its SHA-256 differs from {STATE_NAME})")
        try:
            tensors[name] = load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path} cannot be read ({error})") from None
    saved, current = tensors["editor.safetensors"], editor.state_dict()
    if saved.keys() != current.keys() or any(saved[key].shape != current[key].shape for key in saved):
        raise ValueError(
            f"{folder} is a checkpoint of another editor (its tensors are not this editor's: "
            f"{sorted(saved.keys() ^ current.keys()) or 'other shapes'}); resume with the settings it was made with"
        )
    try:
        optimizer.load_state_dict(_join_optimizer_state(tensors["optimizer.safetensors"], state["optimizer"]))
    except (KeyError, ValueError) as error:
        raise ValueError(f"{folder} holds an optimizer state that does not fit this editor ({error})") from None
    editor.load_state_dict(saved)
    _set_rng_states(tensors["rng.safetensors"])
    return {key: value for key, value in state.items() if key not in _OWN_KEYS}


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_NAME
    if not path.is_file():
        pickles = sorted(path.name for path in folder.glob("*.pkl"))
        reason = (
            f"it holds pickles ({', '.join(pickles)}), which can run code when loaded: it was written by an older "
            "malmen-hf or by someone else, and is not loaded"
            if pickles
            else "it was interrupted while saving"
        )
        raise ValueError(
            f"{folder} is not a complete malmen-hf checkpoint (no {STATE_NAME}): {reason}. Resume from a complete one "
            "(`--resume-from-checkpoint` alone picks the newest complete one) or start afresh."
        )
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a malmen-hf checkpoint of format version {FORMAT_VERSION}")
    expected = {"step": int, "best_score": float, "history": list, "optimizer": dict, "files": dict}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path} has no valid {key!r} (got {state.get(key)!r})")
    return state


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as tensors (`state.<param>.<name>`) and JSON (the groups and any plain numbers)."""
    tensors, numbers = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach()
            else:
                numbers[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "numbers": numbers}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for key, number in rest["numbers"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = number
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_states() -> dict[str, torch.Tensor]:
    """torch's random generators (the fact order has its own seeded generator; these cover anything else)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda_{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda_{index}"] for index in range(len(states) - 1)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
