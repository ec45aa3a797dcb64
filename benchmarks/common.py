"""
Measuring tools shared by the benchmarks: peak memory, the floors (a plain forward+backward, a plain no-grad forward),
machine info, tables.
"""

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import malmen_hf
from malmen_hf.facts import IGNORE_INDEX, batches_by_length, collate, pad_id_of, tokenize_examples

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def without_contradictions(facts: list, prompt_and_target: Callable[[Any], tuple[str, str]]) -> list:
    """
    `facts` without those that give an earlier fact's prompt another target. `apply_edits` refuses such pairs, since
    one shift cannot make a prompt continue with two answers; CounterFact's edit.json has 79 of them, the first at
    record 1091 (so the first 1,000 records are all kept).
    """
    first_target: dict[str, str] = {}
    kept = []
    for fact in facts:
        prompt, target = prompt_and_target(fact)
        key = " ".join(prompt.split())
        if first_target.setdefault(key, target.strip()) == target.strip():
            kept.append(fact)
    return kept


def load_counterfact_requests(path: str | Path, format: str = "auto") -> list:
    """A CounterFact-style file's facts as `EditRequest`s, without those `without_contradictions` leaves out."""
    from malmen_hf import load_edit_requests

    return without_contradictions(load_edit_requests(path, format), lambda request: (request.prompt, request.target))


def sweep_splits(records: list) -> tuple[list, list, list]:
    """
    The fixed splits of CounterFact's train.json (without contradictions) for choosing settings: the facts to train
    on, the trainer's own validation facts (256, to keep its best editor), and the last 1,000, which score the result
    (`benchmarks/sweep.py`) or bound it (`benchmarks/oracle.py`). `edit.json` is left for the final report.
    """
    return records[:-1256], records[-1256:-1000], records[-1000:]


def band_modules(layers: str) -> list[str]:
    """`"12-17"` -> the MLP output projections (`down_proj`, Llama's names, as SmolLM2's) of blocks 12 to 17."""
    first, last = (int(part) for part in layers.split("-"))
    return [f"model.layers.{i}.mlp.down_proj" for i in range(first, last + 1)]


def memit_editor(
    model, tokenizer, modules: list[str], train_facts: list, *, preserve: float, log_lambda: float = -2.0,
    history_weight: float = 0.0, covariance_facts: int = 1000,
) -> "malmen_hf.MalmenEditorModel":  # fmt: skip
    """
    The editor MEMIT (`malmen_hf.apply_memit`) writes with: the layers `modules`, keys at the subject's last token,
    the preserved keys' covariance at full rank fitted on the prompts of the first `covariance_facts` training facts,
    weighted `preserve` per fact.
    """
    from malmen_hf.training.fitting import covariance_texts

    editor = malmen_hf.MalmenEditorModel.for_model(
        model, edit_modules=modules, token_positions="subject_last", covariance_weight=preserve,
        covariance_rank=model.get_submodule(modules[0]).in_features, log_lambda_init=log_lambda,
        history_weight=history_weight,
    )  # fmt: skip
    malmen_hf.fit_key_covariance(editor, model, covariance_texts(train_facts, covariance_facts), tokenizer)
    return editor


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that ran `script` with `argv` (default: this process's), as typed from the repository root."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


class PeakMemory:
    """
    Peak memory growth of this process during a `with` block, in bytes: CUDA allocations on a CUDA device, else the
    resident set size sampled by a background thread.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / MB

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        import psutil
    except ImportError:  # read it from /proc (Linux)
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def _malloc_trim() -> None:
    """Hands memory that glibc keeps after `free` back to the system, so RSS starts from what is really in use."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_floor(model: nn.Module, facts, tokenizer, batch_size: int, device: torch.device) -> dict:
    """
    One ordinary fine-tuning pass (without the optimizer step) over the facts, batched as `apply_edits` batches them:
    full logits, mean cross-entropy on the target tokens, `backward` into every parameter.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)
    try:
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            batches = CollatedBatches(facts, tokenizer, batch_size)
            for batch in batches:
                model.zero_grad(set_to_none=True)
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                ).logits
                # collate's causal labels are already shifted (labels[t] is scored at position t): no shift here.
                loss = nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), batch["labels"].to(device).flatten(), ignore_index=IGNORE_INDEX
                )
                loss.backward()
            sync(device)
            wall = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return {
        "floor_s": wall,
        "floor_peak_mb": memory.growth_mb,
        "floor_peak_abs_mb": memory.peak / MB,
        **batches.counts,
    }


@torch.no_grad()
def run_forward(model: nn.Module, facts, tokenizer, batch_size: int, device: torch.device) -> dict:
    """
    One plain no-grad forward over the facts, batched as `apply_edits` batches them: what a user's
    `model(input_ids, attention_mask)` costs on the same tokens (full logits, as transformers computes by default).
    """
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        batches = CollatedBatches(facts, tokenizer, batch_size)
        for batch in batches:
            plain_forward(model, batch, device)
        sync(device)
        wall = time.perf_counter() - start
    return {"forward_s": wall, "forward_peak_mb": memory.growth_mb, "forward_peak_abs_mb": memory.peak / MB}


@torch.no_grad()
def plain_forward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """What a user's `model(input_ids, attention_mask)` runs on a collated batch: no graph, full logits."""
    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)


class CollatedBatches:
    """
    The facts tokenized, sorted and padded as `apply_edits` does (`tokenize_examples`, `batches_by_length`,
    `collate`), as an iterable of collated batches that counts the real and padded tokens it yields.
    """

    def __init__(self, facts, tokenizer, batch_size: int):
        self.examples = tokenize_examples(tokenizer, [p for p, _ in facts], [t for _, t in facts], "causal")
        self.batches = batches_by_length(self.examples, batch_size)
        self.pad_id = pad_id_of(tokenizer)
        self.counts = {"input_tokens": 0, "padded_tokens": 0, "batches": len(self.batches)}

    def __iter__(self):
        for indices in self.batches:
            batch = collate([self.examples[i] for i in indices], self.pad_id, "causal")
            self.counts["input_tokens"] += int(batch["attention_mask"].sum())
            self.counts["padded_tokens"] += batch["input_ids"].numel()
            yield batch


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "malmen_hf": malmen_hf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_state(),
    }
    with contextlib.suppress(ImportError):
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def git_state() -> dict:
    """The commit and the modified files of the checkout the benchmark ran from (read-only git commands)."""
    state = {}
    for key, command in (("commit", ["rev-parse", "HEAD"]), ("modified", ["status", "--porcelain"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                state[key] = result.stdout.strip() if key == "commit" else result.stdout.splitlines()
    return state


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in columns) + " |")
    return "\n".join(lines)
