"""`malmen-hf eval`: score a model on N facts before and after editing them all at once with an editor."""

import argparse
import json
import shlex
import time
from pathlib import Path

from ..data import load_edit_requests
from ..evaluation.scores import SCORES, check_scores
from ..facts import EditRequest
from ..shipped import COUNTERFACT_EVAL
from .card import merge_into_card
from .common import (
    add_format_option,
    check_editor,
    check_file,
    check_model,
    editor_folder,
    non_negative_int,
    positive_int,
    status,
    table,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `malmen-hf eval` and its options to the command line's `subparsers`."""
    parser = subparsers.add_parser(
        "eval", help="score a model on N facts before and after editing them all at once with an editor"
    )
    parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id")
    parser.add_argument(
        "--editor",
        help="a released editor's short name or a saved editor (folder or Hub id); without it the unedited model only",
    )
    parser.add_argument(
        "--data",
        default=str(COUNTERFACT_EVAL),
        help="facts to edit (JSON or JSONL); default: 1,000 held-out CounterFact facts shipped with malmen-hf",
    )
    add_format_option(parser)
    parser.add_argument("--num-facts", type=positive_int, default=100, help="facts edited at once (N)")
    parser.add_argument("--offset", type=non_negative_int, default=0, help="records of the file to skip first")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="facts per base-model pass")
    parser.add_argument(
        "--scores",
        nargs="+",
        metavar="SCORE",
        help="scores to compute (default: all of evaluation.scores.SCORES: ES GS LS ...; see the README's Metrics)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--update-card",
        action="store_true",
        help="write the scores after the edit into the editor folder's model card (its results for other N stay)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Scores a model on N facts before and after editing them all at once with an editor; prints a table or JSON."""
    if args.update_card and not args.editor:
        raise ValueError("--update-card needs --editor (the folder whose card gets the scores)")
    check_file(args.data, "data")
    check_model(args.model)
    if args.editor:
        check_editor(args.editor)
    if args.update_card:
        editor_folder(args.editor)
    check_scores(args.scores or ())
    scores = args.scores or list(SCORES)
    requests = _read_requests(args)  # a bad file fails before torch loads
    import torch

    from .. import MalmenEditorModel
    from ..evaluation.metrics import locality_predictions, scores_of_model
    from ..offline_models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    editor = MalmenEditorModel.from_pretrained(args.editor) if args.editor else None
    results = {"model": args.model, "editor": args.editor, "data": str(args.data), "num_facts": len(requests)}
    results["command"] = shlex.join(["malmen-hf", *args.argv])
    status(f"Scoring the unedited model on {len(requests)} facts ...")
    locality_before = locality_predictions(model, tokenizer, requests, args.batch_size, progress=True)
    results["before"] = scores_of_model(model, tokenizer, requests, locality_before, args.batch_size, scores, True)
    if editor is not None:
        start = time.perf_counter()
        handle = editor.apply_edits(model, requests, tokenizer=tokenizer, batch_size=args.batch_size, progress=True)
        results["edit_seconds"] = time.perf_counter() - start
        status("Scoring the edited model ...")
        results["after"] = scores_of_model(model, tokenizer, requests, locality_before, args.batch_size, scores, True)
        handle.revert()
        if args.update_card:
            folder = editor_folder(args.editor)
            rows = [{"n": results["num_facts"], **results["after"]}]
            merge_into_card(folder / "README.md", editor, rows, editor_id=str(folder), data_name=Path(args.data).name)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    header = ["score", "before"] + (["after"] if args.editor else [])
    rows = [
        [name] + [f"{results[when][name]:.3f}" for when in ("before", "after") if when in results] for name in scores
    ]
    edited = f", edited in {results['edit_seconds']:.1f} s" if args.editor else " (no editor: unedited model only)"
    print(f"{len(requests)} facts from {args.data}{edited}\n" + table(header, rows, width=16))


def _read_requests(args: argparse.Namespace) -> list[EditRequest]:
    """The `--num-facts` records after the first `--offset` of `--data`."""
    requests = load_edit_requests(args.data, args.format, limit=args.offset + args.num_facts)[args.offset :]
    if len(requests) < args.num_facts:
        raise ValueError(
            f"{args.data} has {len(requests) + args.offset} records, fewer than --offset + --num-facts "
            f"({args.offset} + {args.num_facts})"
        )
    return requests
