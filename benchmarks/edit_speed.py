"""
Speed and memory of `apply_edits`, against two floors: one plain forward+backward, and one plain forward, over the
same facts.

For N = 1, 10, 100, 1000 and 10000 CounterFact facts (`prompt -> target_new` from
`../shared/data/counterfact/edit.json`), this measures, on SmolLM2-135M with an untrained MALMEN editor (the last 6
`down_proj` layers, rank 1920):

- EDIT: the wall time of `editor.apply_edits(model, facts, ...)`, split into caching (the base model's forward and
  backward), hyper-network, and solve+apply as `EditHandle.timings` reports them, and its peak memory;
- FLOOR: the same facts, tokenized and batched exactly as `apply_edits` does (`tokenize_examples`, `batches_by_length`,
  `collate`), run through one ordinary fine-tuning step per batch: full logits, cross-entropy on the target tokens,
  `loss.backward()` with every parameter requiring a gradient, gradients zeroed between batches; and its peak memory;
- FORWARD: the same batches through one plain no-grad forward (`model(input_ids, attention_mask)`, full logits), and
  its peak memory;
- PAIRED (`--floors paired`): the same forward, batch by batch inside an EDIT call, each just before the edit's own
  pass over that batch, its time taken out of the EDIT's. EDIT and floor then alternate every second or so, and a
  slow spell of a shared machine falls on both: on this project's 2-core machine the forward over the same 2,048
  facts took 55 to 85 s within one run, and the whole-run ratios scattered from 0.74 to 1.44 around it.

EDIT/FLOOR near 1 means editing costs about one fine-tuning pass over the facts; EDIT/FORWARD near 1, about one
forward. All times start from the raw facts (tokenization included). Peak memory is the growth over the memory in
use when the phase starts: on CUDA from `torch.cuda.max_memory_allocated`, on CPU from the process's resident set size
sampled every 2 ms by a background thread (after `gc.collect()` and `malloc_trim`, so memory freed by an earlier phase
is not counted as free).
The edits of each N are reverted before the next N.

Run from the repository root (the model is converted once from PyPI, see `malmen_hf.offline_models`):

    python benchmarks/edit_speed.py                        # the full list of N on the default device
    python benchmarks/edit_speed.py --n 1 10 100 --threads 2
    python benchmarks/edit_speed.py --n 512 2048 --floors forward --repeats 3   # medians of 3, order alternating
    python benchmarks/edit_speed.py --n 512 2048 --floors paired --repeats 3    # EDIT and forward batch by batch
    python benchmarks/edit_speed.py --model path/to/local/causal-lm --output /tmp/edit_speed.json
    # random weights in a model's shape (a folder with its config.json), with the tokenizer's vocabulary:
    python benchmarks/edit_speed.py --model gptj-config-folder --random-weights --tokenizer tokenizer-folder \
        --dtype bfloat16 --n 1024 4096 --floors forward

Run it on an otherwise idle machine: torch's OpenMP threads spin-wait for each other, so when another process holds
a core, every forward becomes several times slower (on 2 cores with another job running, 2 threads were 5 to 20 times
slower than `--threads 1`; on the idle machine, 2 threads were 1.8 times faster).

It prints a markdown table and writes JSON (default `benchmarks/results/edit_speed.json`, rewritten after every N so
that an interrupted run keeps what it measured).
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from malmen_hf import MalmenEditorModel, caching
from malmen_hf.offline_models import load_model_and_tokenizer

from common import (
    MB,
    PeakMemory,
    command_line,
    machine_info,
    markdown_table,
    plain_forward,
    run_floor,
    run_forward,
    sync,
    without_contradictions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "counterfact" / "edit.json"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "edit_speed.json"


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
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure each N this many times, alternating the order; report medians"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument(
        "--floors",
        nargs="+",
        choices=["train", "forward", "paired"],
        default=["train", "forward"],
        help="the floors to measure",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build --model (a folder with a config.json) with random weights and the vocabulary of --tokenizer",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--dtype", default=None, help="the model's dtype, e.g. bfloat16 (default: as loaded)")
    args = parser.parse_args(argv)
    if args.random_weights and args.tokenizer is None:
        parser.error("--random-weights needs --tokenizer")
    if any(n < 1 for n in args.n) or min(args.batch_size, args.editor_batch_size, args.repeats) < 1:
        parser.error("--n, --batch-size, --editor-batch-size and --repeats must be positive")
    return args


def load_facts(path: Path) -> list[tuple[str, str]]:
    with open(path) as file:
        records = json.load(file)
    return without_contradictions([(record["prompt"], record["target_new"]) for record in records], lambda fact: fact)


def measure_once(editor, model, facts, tokenizer, args, device, floors_first: bool) -> dict:
    """
    One EDIT and each floor on the same facts, and their ratios. With `floors_first` the floors run before the edit:
    repeats alternate the order, so that a slow spell of the machine does not always fall on the same side.
    """
    row = {}
    floors = [FLOORS[floor] for floor in args.floors if floor in FLOORS]  # "paired" runs inside an EDIT
    if "paired" in args.floors:
        row.update(run_paired(editor, model, facts, tokenizer, args, device))
    if not floors_first:
        row.update(run_edit(editor, model, facts, tokenizer, args, device))
    for run, _, _ in floors:
        row.update(run(model, facts, tokenizer, args.batch_size, device))
    if floors_first:
        row.update(run_edit(editor, model, facts, tokenizer, args, device))
    for _, seconds, ratio in floors:
        row[ratio] = row["edit_total_s"] / row[seconds]
    return row


def run_paired(editor: MalmenEditorModel, model: nn.Module, facts, tokenizer, args, device: torch.device) -> dict:
    """
    One EDIT with the plain no-grad forward of each batch run inside it, just before the edit's own pass over the
    batch (the same collated tokens): the EDIT's time without those forwards, theirs, and the ratio.
    """
    paired = PairedForward(device)
    with paired.inside_edits():
        handle, wall = timed_edit(editor, model, facts, tokenizer, args, device)
    handle.revert()
    edit_s = wall - paired.seconds
    return {
        "paired_edit_s": edit_s,
        "paired_forward_s": paired.seconds,
        "edit_over_paired_forward": edit_s / paired.seconds,
        "paired_batches": paired.batches,
    }


class PairedForward:
    """Runs and times a plain no-grad forward of each batch that `apply_edits` caches, just before it caches it."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.batches = device, 0.0, 0

    @contextlib.contextmanager
    def inside_edits(self):
        cache = caching.cache_keys_and_value_grads

        def forward_then_cache(model, modules, batch, *args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            plain_forward(model, batch, self.device)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            self.batches += 1
            return cache(model, modules, batch, *args, **kwargs)

        caching.cache_keys_and_value_grads = forward_then_cache  # what `caching.cached_batches` calls per batch
        try:
            yield
        finally:
            caching.cache_keys_and_value_grads = cache


def timed_edit(editor: MalmenEditorModel, model: nn.Module, facts, tokenizer, args, device: torch.device):
    """`editor.apply_edits` with the benchmark's batch sizes: its handle and its wall time."""
    start = time.perf_counter()
    handle = editor.apply_edits(
        model, facts, tokenizer=tokenizer, batch_size=args.batch_size, editor_batch_size=args.editor_batch_size
    )
    sync(device)
    return handle, time.perf_counter() - start


def medians(repeats: list[dict]) -> dict:
    """Each measure's median over the repeats; a ratio's is the median of the ratios measured side by side."""
    return {key: statistics.median(repeat[key] for repeat in repeats) for key in repeats[0]}


def run_edit(editor: MalmenEditorModel, model: nn.Module, facts, tokenizer, args, device: torch.device) -> dict:
    """Applies `facts`, measures time and memory, reverts them, and checks the weights came back."""
    checksum = _edited_checksum(editor, model)
    with PeakMemory(device) as memory:
        handle, wall = timed_edit(editor, model, facts, tokenizer, args, device)
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


COLUMNS = [
    ("N", "n", "{}"),
    ("tokens", "tokens", "{}"),
    ("caching s", "caching_s", "{:.2f}"),
    ("hypernet s", "hypernetwork_s", "{:.2f}"),
    ("solve+apply s", "solve_and_apply_s", "{:.2f}"),
    ("edit total s", "edit_total_s", "{:.2f}"),
    ("floor s", "floor_s", "{:.2f}"),
    ("edit/floor", "edit_over_floor", "{:.2f}"),
    ("forward s", "forward_s", "{:.2f}"),
    ("edit/forward", "edit_over_forward", "{:.2f}"),
    ("paired: edit s", "paired_edit_s", "{:.2f}"),
    ("paired: forward s", "paired_forward_s", "{:.2f}"),
    ("paired: edit/forward", "edit_over_paired_forward", "{:.2f}"),
    ("edit peak MB", "edit_peak_mb", "{:.0f}"),
    ("floor peak MB", "floor_peak_mb", "{:.0f}"),
    ("forward peak MB", "forward_peak_mb", "{:.0f}"),
]
FLOORS = {
    "train": (run_floor, "floor_s", "edit_over_floor"),
    "forward": (run_forward, "forward_s", "edit_over_forward"),
}


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model on `device` in eval mode: loaded, or built with random weights from a config (`--random-weights`)."""
    if not args.random_weights:
        model, tokenizer = load_model_and_tokenizer(args.model)
        if args.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return model.to(device, getattr(torch, args.dtype) if args.dtype else None).eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = AutoConfig.from_pretrained(args.model)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    # Built on the device itself: initializing a 6B model's random weights on the CPU would take minutes.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype or "float32"))
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.data.is_file():
        raise SystemExit(f"No data at {args.data}: pass --data path/to/counterfact/edit.json")

    start = time.perf_counter()
    model, tokenizer = load_model(args, device)
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
    all_facts = load_facts(args.data)
    warmup = all_facts[: min(max(args.n), args.batch_size)]
    run_edit(editor, model, warmup, tokenizer, args, device)
    for floor in args.floors:
        if floor in FLOORS:
            FLOORS[floor][0](model, warmup, tokenizer, args.batch_size, device)

    report = {
        "command": command_line(__file__, argv),
        "machine": machine_info(device),
        "settings": {
            "model": args.model,
            "random_weights": args.random_weights,
            "dtype": str(next(model.parameters()).dtype),
            "weights_mb": sum(param.numel() * param.element_size() for param in model.parameters()) / MB,
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
        if n > len(all_facts):
            print(f"N={n}: skipped, {args.data} has only {len(all_facts)} facts without contradictions", flush=True)
            continue
        facts = all_facts[:n]
        repeats = [
            measure_once(editor, model, facts, tokenizer, args, device, floors_first=repeat % 2 == 1)
            for repeat in range(args.repeats)
        ]
        row = {"n": n, **medians(repeats)}
        if args.repeats > 1:
            row["repeats"] = repeats
        floors = []
        for name in args.floors:
            if name == "paired":
                floors.append(
                    f"paired: edit {row['paired_edit_s']:.2f} s, forward {row['paired_forward_s']:.2f} s "
                    f"(edit/forward {row['edit_over_paired_forward']:.2f})"
                )
                continue
            _, seconds, ratio = FLOORS[name]
            floors.append(f"{name} {row[seconds]:.2f} s (edit/{name} {row[ratio]:.2f})")
        report["results"].append(row)
        print(
            f"N={n}: edit {row['edit_total_s']:.2f} s (caching {row['caching_s']:.2f}, hypernet "
            f"{row['hypernetwork_s']:.2f}, solve+apply {row['solve_and_apply_s']:.2f}, "
            f"other {row['edit_other_s']:.2f}), {', '.join(floors)}, peak {row['edit_peak_mb']:.0f} MB",
            flush=True,
        )
        args.output.write_text(json.dumps(report, indent=2) + "\n")

    print()
    measured = report["results"][0].keys() if report["results"] else ()
    print(markdown_table(report["results"], [column for column in COLUMNS if column[1] in measured]))
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
