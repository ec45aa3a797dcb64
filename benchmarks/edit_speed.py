"""
Speed and memory of `apply_edits`, against the FLOOR of one plain forward+backward over the same facts.

For N = 1, 10, 100, 1000 and 10000 CounterFact facts (`prompt -> target_new` from
`../shared/data/counterfact/edit.json`), this measures, on SmolLM2-135M with an untrained MALMEN editor (the last 6
`down_proj` layers, rank 1920):

- EDIT: the wall time of `editor.apply_edits(model, facts, ...)`, split into caching (the base model's forward and
  backward), hyper-network, and solve+apply as `EditHandle.timings` reports them, and its peak memory;
- FLOOR: the same facts, tokenized and batched exactly as `apply_edits` does (`tokenize_examples`, `batches_by_length`,
  `collate`), run through one ordinary fine-tuning step per batch: full logits, cross-entropy on the target tokens,
  `loss.backward()` with every parameter requiring a gradient, gradients zeroed between batches; and its peak memory.

EDIT/FLOOR near 1 means editing costs about one fine-tuning pass over the facts. Both times start from the raw facts
(tokenization included). Peak memory is the growth over the memory in use when the phase starts: on CUDA from
`torch.cuda.max_memory_allocated`, on CPU from the process's resident set size sampled every 2 ms by a background
thread (after `gc.collect()` and `malloc_trim`, so memory freed by an earlier phase is not counted as free).
The edits of each N are reverted before the next N.

Run from the repository root (the model is converted once from PyPI, see `malmen_hf.models`):

    python benchmarks/edit_speed.py                        # the full list of N on the default device
    python benchmarks/edit_speed.py --n 1 10 100 --threads 2
    python benchmarks/edit_speed.py --model path/to/local/causal-lm --output /tmp/edit_speed.json

Run it on an otherwise idle machine: torch's OpenMP threads spin-wait for each other, so when another process holds
a core, every forward becomes several times slower (on 2 cores with another job running, 2 threads were 5 to 20 times
slower than `--threads 1`; on the idle machine, 2 threads were 1.8 times faster).

It prints a markdown table and writes JSON (default `benchmarks/results/edit_speed.json`, rewritten after every N so
that an interrupted run keeps what it measured).
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import malmen_hf
from malmen_hf import MalmenEditorModel
from malmen_hf.facts import IGNORE_INDEX, batches_by_length, collate, pad_id_of, tokenize_examples
from malmen_hf.models import load_model_and_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "counterfact" / "edit.json"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "edit_speed.json"
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id of a causal LM")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CounterFact-style JSON (prompt, target_new)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10, 100, 1000, 10000], help="numbers of facts")
    parser.add_argument("--batch-size", type=int, default=32, help="facts per base-model batch")
    parser.add_argument("--editor-batch-size", type=int, default=1024, help="token positions per hyper-network pass")
    parser.add_argument("--rank", type=int, default=1920, help="hyper-network rank (capped by the editor)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.n) or args.batch_size < 1 or args.editor_batch_size < 1:
        parser.error("--n, --batch-size and --editor-batch-size must be positive")
    return args


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_facts(path: Path, n: int) -> list[tuple[str, str]]:
    with open(path) as file:
        records = json.load(file)
    if n > len(records):
        raise SystemExit(f"{path} has {len(records)} records, fewer than --n {n}")
    return [(record["prompt"], record["target_new"]) for record in records[:n]]


def run_edit(editor: MalmenEditorModel, model: nn.Module, facts, tokenizer, args, device: torch.device) -> dict:
    """Applies `facts`, measures time and memory, reverts them, and checks the weights came back."""
    checksum = _edited_checksum(editor, model)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        handle = editor.apply_edits(
            model, facts, tokenizer=tokenizer, batch_size=args.batch_size, editor_batch_size=args.editor_batch_size
        )
        _sync(device)
        wall = time.perf_counter() - start
    handle.revert()
    if _edited_checksum(editor, model) != checksum:
        raise RuntimeError("revert() did not restore the edited weights")
    phases = handle.timings
    return {
        "tokens": handle.num_tokens,
        "caching_s": phases["caching"],
        "hypernetwork_s": phases["hypernetwork"],
        "solve_and_apply_s": phases["solve_and_apply"],
        # Tokenization, batching and bookkeeping outside the three phases.
        "edit_other_s": wall - sum(phases.values()),
        "edit_total_s": wall,
        "edit_peak_mb": memory.growth_mb,
        "edit_peak_abs_mb": memory.peak / MB,
        "shift_norm_mean": sum(handle.shift_norms.values()) / len(handle.shift_norms),
    }


@torch.no_grad()
def _edited_checksum(editor: MalmenEditorModel, model: nn.Module) -> list[float]:
    return [float(model.get_submodule(name).weight.double().sum()) for name in editor.config.edit_modules]


def run_floor(model: nn.Module, facts, tokenizer, args, device: torch.device) -> dict:
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
            examples = tokenize_examples(tokenizer, [p for p, _ in facts], [t for _, t in facts], False)
            batches = batches_by_length(examples, args.batch_size)
            pad_id = pad_id_of(tokenizer)
            input_tokens = padded_tokens = 0
            for indices in batches:
                batch = collate([examples[i] for i in indices], pad_id, False)
                input_tokens += int(batch["attention_mask"].sum())
                padded_tokens += batch["input_ids"].numel()
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
            _sync(device)
            wall = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return {
        "floor_s": wall,
        "floor_peak_mb": memory.growth_mb,
        "floor_peak_abs_mb": memory.peak / MB,
        "input_tokens": input_tokens,
        "padded_tokens": padded_tokens,
        "batches": len(batches),
    }


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
        "git": _git_state(),
    }
    with contextlib.suppress(ImportError):
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def _git_state() -> dict:
    """The commit and the modified files of the checkout the benchmark ran from (read-only git commands)."""
    state = {}
    for key, command in (("commit", ["rev-parse", "HEAD"]), ("modified", ["status", "--porcelain"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            if result.returncode == 0:
                state[key] = result.stdout.strip() if key == "commit" else result.stdout.splitlines()
    return state


COLUMNS = [
    ("N", "n", "{}"),
    ("tokens", "tokens", "{}"),
    ("caching s", "caching_s", "{:.2f}"),
    ("hypernet s", "hypernetwork_s", "{:.2f}"),
    ("solve+apply s", "solve_and_apply_s", "{:.2f}"),
    ("edit total s", "edit_total_s", "{:.2f}"),
    ("floor s", "floor_s", "{:.2f}"),
    ("edit/floor", "edit_over_floor", "{:.2f}"),
    ("edit peak MB", "edit_peak_mb", "{:.0f}"),
    ("floor peak MB", "floor_peak_mb", "{:.0f}"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---:" for _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.data.is_file():
        raise SystemExit(f"No data at {args.data}: pass --data path/to/counterfact/edit.json")

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(device).eval()
    load_s = time.perf_counter() - start
    editor = MalmenEditorModel.for_model(model, rank=args.rank).to(device).eval()
    rank = min(args.rank, sum(editor.config.edit_module_shapes[0]))  # the editor caps it at d_in + d_out
    print(
        f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, loaded in "
        f"{load_s:.1f} s) on {device} with {torch.get_num_threads()} threads; editor of "
        f"{len(editor.config.edit_modules)} modules from {editor.config.edit_modules[0]}, rank {rank}",
        flush=True,
    )

    # Warm-up (lazy initialisation, first-call kernel selection) outside the measurements.
    warmup = load_facts(args.data, min(max(args.n), args.batch_size))
    run_edit(editor, model, warmup, tokenizer, args, device)
    run_floor(model, warmup, tokenizer, args, device)

    report = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["edit_speed.py", *argv]),
        "machine": machine_info(device),
        "settings": {
            "model": args.model,
            "data": str(args.data),
            "batch_size": args.batch_size,
            "editor_batch_size": args.editor_batch_size,
            "edit_modules": editor.config.edit_modules,
            "rank": rank,
            "n_blocks": editor.config.n_blocks,
            "model_load_s": load_s,
        },
        "results": [],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        facts = load_facts(args.data, n)
        row = {"n": n, **run_edit(editor, model, facts, tokenizer, args, device)}
        row.update(run_floor(model, facts, tokenizer, args, device))
        row["edit_over_floor"] = row["edit_total_s"] / row["floor_s"]
        report["results"].append(row)
        print(
            f"N={n}: edit {row['edit_total_s']:.2f} s (caching {row['caching_s']:.2f}, hypernet "
            f"{row['hypernetwork_s']:.2f}, solve+apply {row['solve_and_apply_s']:.2f}, "
            f"other {row['edit_other_s']:.2f}), floor {row['floor_s']:.2f} s, ratio {row['edit_over_floor']:.2f}",
            flush=True,
        )
        args.output.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(markdown_table(report["results"]))
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
