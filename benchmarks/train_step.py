"""
Time and peak memory of one MALMEN meta-training step, against the FLOOR of one plain forward+backward.

For F = 32, 128 and 512 facts per step (CounterFact `train.json`, with their rephrasings and locality prompts), on
SmolLM2-135M with an editor of the last 6 `down_proj` layers, this runs `--steps` meta-training steps after one
warm-up step (`meta_gradient`, clipping, Adam, as `train_editor` does) and reports the mean wall time per step and
the peak memory growth over the steps. The FLOOR is one ordinary fine-tuning pass (full logits, backward into every
parameter) over the same F facts' edit prompts, batched the same way. A step does more than the FLOOR: it caches on
the edit prompts, then runs the rephrasings forward and backward, and the locality prompts twice forward and once
backward, so STEP/FLOOR of about 2 to 3 is expected; what should stay flat is the peak memory as F grows.

    python benchmarks/train_step.py                          # F = 32, 128, 512
    python benchmarks/train_step.py --facts-per-step 32 --steps 2

It prints a markdown table and writes JSON (default `benchmarks/results/train_step.json`).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from malmen_hf import MalmenEditorModel, load_edit_requests
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.training.meta_gradient import meta_gradient

from common import MB, REPO_ROOT, PeakMemory, command_line, machine_info, markdown_table, run_floor, sync

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "counterfact" / "train.json"
COLUMNS = [
    ("facts/step", "facts_per_step", "{}"),
    ("step s", "step_s", "{:.2f}"),
    ("floor s", "floor_s", "{:.2f}"),
    ("step/floor", "step_over_floor", "{:.2f}"),
    ("step peak MB", "step_peak_mb", "{:.0f}"),
    ("floor peak MB", "floor_peak_mb", "{:.0f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id of a causal LM")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CounterFact-style JSON")
    parser.add_argument("--facts-per-step", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per setting (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=32, help="facts per base-model batch")
    parser.add_argument("--editor-batch-size", type=int, default=1024, help="token positions per hyper-network pass")
    parser.add_argument("--rank", type=int, default=1920, help="hyper-network rank")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "train_step.json")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser.parse_args(argv)


def measure_steps(editor, model, tokenizer, steps_of_facts, args, device) -> tuple[float, float]:
    """Mean seconds per meta-training step and peak memory growth (MB) over `steps_of_facts`."""
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-5)

    def step(facts):
        optimizer.zero_grad(set_to_none=True)
        meta_gradient(editor, model, facts, tokenizer, batch_size=args.batch_size,
                      editor_batch_size=args.editor_batch_size)  # fmt: skip
        torch.nn.utils.clip_grad_norm_(editor.parameters(), 1.0)
        optimizer.step()

    step(steps_of_facts[0])  # warm-up: allocator, Adam state
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for facts in steps_of_facts[1:]:
            step(facts)
        sync(device)
        seconds = (time.perf_counter() - start) / (len(steps_of_facts) - 1)
    return seconds, memory.growth_mb


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(device).eval()
    needed = max(args.facts_per_step) * (args.steps + 1)
    requests = load_edit_requests(args.data, "counterfact", limit=needed)
    report = {"command": command_line(__file__), "machine": machine_info(device), "results": []}
    for facts_per_step in args.facts_per_step:
        editor = MalmenEditorModel.for_model(model, rank=args.rank).to(device)
        steps_of_facts = [requests[i * facts_per_step : (i + 1) * facts_per_step] for i in range(args.steps + 1)]
        step_s, step_mb = measure_steps(editor, model, tokenizer, steps_of_facts, args, device)
        pairs = [(request.prompt, request.target) for request in steps_of_facts[-1]]
        floor = run_floor(model, pairs, tokenizer, args.batch_size, device)
        row = {
            "facts_per_step": facts_per_step,
            "step_s": step_s,
            "step_peak_mb": step_mb,
            "floor_s": floor["floor_s"],
            "floor_peak_mb": floor["floor_peak_mb"],
            "step_over_floor": step_s / floor["floor_s"],
            "editor_parameters": sum(p.numel() for p in editor.parameters()),
            "editor_mb": sum(p.numel() * p.element_size() for p in editor.parameters()) / MB,
        }
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    print(markdown_table(report["results"], COLUMNS))
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
