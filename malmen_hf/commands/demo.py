"""`malmen-hf demo`: edit a real model with a few hundred CounterFact facts at once, show it, revert it."""

import argparse
import json
import sys

from ..data import load_edit_requests
from ..demo import DEFAULT_MODEL, DEMO_SCORES, HAND_WRITTEN_FACTS, TRAINING_FREE
from ..facts import EditRequest
from ..shipped import COUNTERFACT_EVAL, DEFAULT_EDITOR
from .common import answers_table, check_editor, check_file, check_model, non_negative_int, positive_int, status, table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `malmen-hf demo` and its options to the command line's `subparsers`."""
    parser = subparsers.add_parser("demo", help="edit a real model with CounterFact facts, show it, revert it")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="short name, local folder or Hub id")
    parser.add_argument(
        "--editor",
        default=DEFAULT_EDITOR,
        help=f"a released editor's short name, a saved editor (folder or Hub id), or {TRAINING_FREE!r} (the untrained "
        "editor, its normalizer fitted on CounterFact facts shipped with malmen-hf); default: %(default)s",
    )
    parser.add_argument(
        "--data",
        help="CounterFact JSON (simplified form); default: 1,000 held-out CounterFact facts shipped with "
        "malmen-hf (malmen_hf.shipped.COUNTERFACT_EVAL)",
    )
    parser.add_argument("--num-facts", type=positive_int, default=300, help="CounterFact records edited at once")
    parser.add_argument("--show", type=non_negative_int, default=5, help="CounterFact edits printed")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="facts per base-model pass")
    parser.add_argument(
        "--lr", type=float, help="training-free editor's lr (default: malmen_hf.training.fitting.TRAINING_FREE_LR)"
    )
    parser.add_argument(
        "--log-lambda",
        type=float,
        help="training-free editor's log ridge coefficient (default: training.fitting.TRAINING_FREE_LOG_LAMBDA)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Edits a real model with a few hundred facts at once, shows the answers change, then reverts them."""
    data = check_file(args.data if args.data is not None else COUNTERFACT_EVAL, "data")
    check_model(args.model)
    if args.editor != TRAINING_FREE:
        check_editor(args.editor)
    counterfact = load_edit_requests(data, "counterfact", limit=args.num_facts)  # a bad file fails before torch loads
    import torch

    from ..demo import edit_and_compare, load_editable_model
    from ..evaluation.metrics import greedy_answers

    torch.manual_seed(0)
    hand_written = [EditRequest(prompt, target) for prompt, target in HAND_WRITTEN_FACTS]
    requests, shown = counterfact + hand_written, hand_written + counterfact[: args.show]
    model, tokenizer = load_editable_model(
        args.model, args.editor, lr=args.lr, log_lambda=args.log_lambda, status=status
    )
    result = edit_and_compare(
        model, tokenizer, requests, shown, batch_size=args.batch_size, progress=True, status=status
    )
    model.revert_edits()
    restored = greedy_answers(model, tokenizer, [request.prompt for request in shown])
    before = [row["before"] for row in result.answers]
    answers = [row | {"after_revert": answer} for row, answer in zip(result.answers, restored, strict=True)]
    handle, seconds = result.handle, result.seconds
    if args.json:
        summary = {"num_facts": handle.num_facts, "num_target_tokens": handle.num_tokens, "edit_seconds": seconds}
        summary |= {"timings": handle.timings, "num_layers": len(handle.modules), "answers": answers}
        summary |= {"before": result.scores_before, "after": result.scores_after, "reverted": restored == before}
        print(json.dumps(summary, indent=1))
    else:
        _print_demo(handle, seconds, answers, result.scores_before, result.scores_after, restored == before)
    if restored != before:
        sys.exit(1)


def _print_demo(handle, seconds, answers, scores_before, scores_after, reverted) -> None:
    timings = handle.timings
    print(
        f"\nEdited {handle.num_facts} facts ({handle.num_tokens} target tokens) in one call, {seconds:.1f} s "
        f"(caching {timings['caching']:.1f} s, hyper-network {timings['hypernetwork']:.1f} s, "
        f"solve+apply {timings['solve_and_apply']:.1f} s), {len(handle.modules)} layers.\n"
    )
    print(answers_table(answers))
    rows = [
        [f"{name} ({key})", f"{scores_before[key]:.3f}", f"{scores_after[key]:.3f}"]
        for key, name in DEMO_SCORES.items()
    ]
    print("\n" + table(["score over all edited facts", "before", "after"], rows))
    print(f"\nReverted: {'all original answers are back' if reverted else 'SOME ANSWERS DIFFER AFTER REVERT'}.")
