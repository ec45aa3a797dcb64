"""
Teacher values for distilling a MALMEN editor from MEMIT: each training fact's residual `h` and optimized change
`delta` ([`optimize_residuals`]), computed once and kept as a cached dataset. The folder holds safetensors shards of
`chunk_size` facts each and the settings that produced them (`teacher_settings.json`): an interrupted run resumes at
the first missing shard, and a run with other settings, another model or other facts is refused instead of mixing
old values in. The values cost tens of passes of the base model per fact; keep the folder out of git.
"""

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..caching import frozen
from ..facts import FactLike, as_edit_requests
from ..memit import MemitSettings, optimize_residuals

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SETTINGS_NAME = "teacher_settings.json"
FORMAT_VERSION = 1


def teacher_values(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    facts: Iterable[FactLike],
    cache_dir: str | os.PathLike,
    *,
    residual_module: str,
    context_templates: Sequence[Sequence[str]],
    settings: MemitSettings | None = None,
    chunk_size: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    MEMIT's residual `h` and value change `delta` of each fact, `(num_facts, hidden_size)` each, read from
    `cache_dir` where they were computed before and computed (and saved, shard by shard) where not.

    Raises:
        `ValueError` if `cache_dir` holds values made with other settings, templates or model, or for other facts.
    """
    requests = as_edit_requests(facts)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    settings = settings or MemitSettings()
    folder = Path(cache_dir)
    _check_settings(folder, _identity(model, residual_module, context_templates, settings, chunk_size))
    residuals, deltas = [], []
    starts = range(0, len(requests), chunk_size)
    for start in tqdm(starts, desc="Teacher values", unit="shard", disable=not progress):
        chunk = requests[start : start + chunk_size]
        path = folder / f"values-{start:07d}.safetensors"
        digest = _facts_digest(chunk)
        if path.exists():
            tensors, metadata = _load_shard(path)
            if metadata.get("facts_sha256") != digest:
                raise ValueError(
                    f"{path} holds the teacher values of other facts than facts {start}-{start + len(chunk) - 1}: "
                    "give the same facts in the same order as the run that made this folder, or use another folder."
                )
        else:
            started = time.perf_counter()
            with frozen(model), torch.enable_grad():
                residual, delta = optimize_residuals(
                    model, tokenizer, chunk, residual_module=residual_module, context_templates=context_templates,
                    settings=settings, batch_size=batch_size,
                )  # fmt: skip
            tensors = {"residual": residual.contiguous(), "delta": delta.contiguous()}
            seconds = f"{time.perf_counter() - started:.3f}"  # what the values cost, for benchmarks that read them
            _save_shard(path, tensors, {"facts_sha256": digest, "num_facts": str(len(chunk)), "seconds": seconds})
        residuals.append(tensors["residual"])
        deltas.append(tensors["delta"])
    return torch.cat(residuals), torch.cat(deltas)


def cached_teacher_settings(cache_dir: str | os.PathLike) -> tuple[dict, int]:
    """
    The settings a cache folder's values were made with (`teacher_settings.json`: `residual_module`,
    `context_templates`, `settings`, `chunk_size`, ...) and how many facts, from the first, its complete shards hold.
    """
    folder = Path(cache_dir)
    if not (folder / SETTINGS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no teacher values (no {SETTINGS_NAME}): compute them first.")
    identity = json.loads((folder / SETTINGS_NAME).read_text())
    count = 0
    while (path := folder / f"values-{count:07d}.safetensors").is_file():
        count += int(_load_shard(path)[1]["num_facts"])
    return identity, count


def teacher_seconds(cache_dir: str | os.PathLike, num_facts: int) -> float | None:
    """
    How long computing the values of the first `num_facts` facts of a cache folder took (from each shard's record,
    counting a shard's share when only part of it is asked for); `None` if a shard has no record of its time.
    """
    folder, total, counted = Path(cache_dir), 0.0, 0
    while counted < num_facts:
        path = folder / f"values-{counted:07d}.safetensors"
        if not path.is_file():
            return None
        metadata = _load_shard(path)[1]
        if "seconds" not in metadata:
            return None
        in_shard = int(metadata["num_facts"])
        total += float(metadata["seconds"]) * min(in_shard, num_facts - counted) / in_shard
        counted += in_shard
    return total


def _identity(model, residual_module, context_templates, settings: MemitSettings, chunk_size: int) -> dict:
    """What makes two runs' values the same: written once per folder and compared on every later run."""
    return {
        "format_version": FORMAT_VERSION,
        "base_model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "dtype": str(model.get_input_embeddings().weight.dtype),
        "residual_module": residual_module,
        "context_templates": [list(group) for group in context_templates],
        "settings": dataclasses.asdict(settings),
        "chunk_size": chunk_size,
    }


def _check_settings(folder: Path, identity: dict) -> None:
    path = folder / SETTINGS_NAME
    if path.exists():
        found = json.loads(path.read_text())
        if found != identity:
            differ = sorted(key for key in {*found, *identity} if found.get(key) != identity.get(key))
            raise ValueError(
                f"{folder} holds teacher values made with other settings ({', '.join(differ)} differ): use another "
                "folder for these settings, or remove this one to start again."
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(identity, indent=1) + "\n")
    os.replace(temporary, path)


def _facts_digest(requests) -> str:
    content = json.dumps([dataclasses.astuple(request) for request in requests], ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Written aside and renamed into place: a run killed while saving leaves no partial shard."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, path)


def _load_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(path), metadata


__all__ = ["cached_teacher_settings", "teacher_seconds", "teacher_values"]
