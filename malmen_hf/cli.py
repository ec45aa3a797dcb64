"""The `malmen-hf` command line."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .facts import EditRequest
from .metrics import greedy_answers, token_accuracy
from .modeling_malmen import MalmenEditorModel
from .models import load_model_and_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "edit.json"
HAND_WRITTEN_FACTS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome"),
    EditRequest("The capital of Japan is", "Madrid"),
    EditRequest("The CEO of the company malmen-hf is", "Ada Lovelace"),
]
# The training-free editor's settings for SmolLM2-135M, chosen on the first facts of counterfact/train.json.
TRAINING_FREE_LR = 1e-2
TRAINING_FREE_LAMBDA = 0.0


def counterfact_requests(path: Path, limit: int) -> list[EditRequest]:
    """The first `limit` records of a CounterFact file in the simplified (MEND-style) form, as edit requests."""
    records = json.loads(path.read_text())[:limit]
    return [
        EditRequest(
            prompt=record["prompt"],
            target=record["target_new"],
            rephrases=(record["rephrase_prompt"],),
            locality_prompt=record["locality_prompt"],
            locality_answer=record["locality_ground_truth"],
        )
        for record in records
    ]


def demo(args: argparse.Namespace) -> None:
    """Edits a real model with a few hundred facts at once, shows the answers change, then reverts them."""
    torch.manual_seed(0)
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.editor:
        editor = MalmenEditorModel.from_pretrained(args.editor)
    else:
        editor = MalmenEditorModel.for_model(model, lr_init=args.lr, lambda_init=args.log_lambda, n_blocks=0)
    data = Path(args.data)
    requests = counterfact_requests(data, args.num_facts) if data.is_file() else []
    if not requests:
        print(f"({data} not found: editing the hand-written facts only)")
    requests += HAND_WRITTEN_FACTS
    shown = HAND_WRITTEN_FACTS + requests[: args.show]
    editor.attach(model, tokenizer)

    before = greedy_answers(model, tokenizer, [request.prompt for request in shown])
    start = time.perf_counter()
    handle = model.apply_edits(requests, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    after = greedy_answers(model, tokenizer, [request.prompt for request in shown])

    print(
        f"\nEdited {handle.num_facts} facts ({handle.num_tokens} target tokens) in {seconds:.1f} s "
        f"(caching {handle.timings['caching']:.1f} s, hyper-network {handle.timings['hypernetwork']:.1f} s, "
        f"solve+apply {handle.timings['solve_and_apply']:.1f} s) on {len(handle.modules)} layers.\n"
    )
    print(
        _table(
            ["prompt", "new target", "before", "after"],
            [[r.prompt, r.target, b, a] for r, b, a in zip(shown, before, after, strict=True)],
        )
    )
    _print_scores(model, tokenizer, requests)

    model.revert_edits()
    restored = greedy_answers(model, tokenizer, [request.prompt for request in shown])
    status = "all original answers are back" if restored == before else "SOME ANSWERS DIFFER AFTER REVERT"
    print(f"\nReverted: {status}.")
    if restored != before:
        sys.exit(1)


def _print_scores(model, tokenizer, requests: list[EditRequest]) -> None:
    prompts = [request.prompt for request in requests]
    targets = [request.target for request in requests]
    edit_success = sum(token_accuracy(model, tokenizer, prompts, targets)) / len(requests)
    rephrased = [(request.rephrases[0], request.target) for request in requests if request.rephrases]
    rows = [["edit success (ES)", f"{edit_success:.3f}", str(len(requests))]]
    if rephrased:
        generalization = sum(token_accuracy(model, tokenizer, *zip(*rephrased, strict=True))) / len(rephrased)
        rows.append(["generalization (GS)", f"{generalization:.3f}", str(len(rephrased))])
    print("\n" + _table(["teacher-forced score", "value", "facts"], rows))


def _table(header: list[str], rows: list[list[str]], width: int = 44) -> str:
    cells = [
        [str(cell) if len(str(cell)) <= width else str(cell)[: width - 3] + "..." for cell in row]
        for row in [header, *rows]
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malmen-hf", description="MALMEN model editing for transformers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="edit a real model with CounterFact facts, show it, revert it")
    demo_parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id")
    demo_parser.add_argument("--editor", help="a saved editor (folder or Hub id); default: the training-free editor")
    demo_parser.add_argument("--data", default=str(DEFAULT_DATA), help="CounterFact JSON (simplified form)")
    demo_parser.add_argument("--num-facts", type=int, default=300, help="CounterFact records to edit at once")
    demo_parser.add_argument("--show", type=int, default=5, help="CounterFact edits to print before/after")
    demo_parser.add_argument("--batch-size", type=int, default=32, help="facts per base-model pass")
    demo_parser.add_argument("--lr", type=float, default=TRAINING_FREE_LR, help="training-free editor's lr")
    demo_parser.add_argument(
        "--log-lambda", type=float, default=TRAINING_FREE_LAMBDA, help="training-free editor's log ridge coefficient"
    )
    demo_parser.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"malmen-hf {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
