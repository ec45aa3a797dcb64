"""`malmen-hf edit`: edit a model with facts, print the answers before and after, save the model or the edits."""

import argparse
import json
import time

from ..data import load_edit_requests
from ..facts import EditRequest
from ..shipped import DEFAULT_EDITOR
from .common import (
    add_format_option,
    answers_table,
    check_editor,
    check_file,
    check_model,
    non_negative_int,
    positive_int,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `malmen-hf edit` and its options to the command line's `subparsers`."""
    parser = subparsers.add_parser("edit", help="edit a model with facts, print the answers before and after, save")
    parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id")
    parser.add_argument(
        "--editor",
        default=DEFAULT_EDITOR,
        help="a released editor's short name or a saved editor (folder or Hub id); default: %(default)s",
    )
    parser.add_argument("--facts", help="facts to edit (JSON or JSONL, any format `train` reads)")
    add_format_option(parser)
    parser.add_argument(
        "--fact", nargs=2, action="append", metavar=("PROMPT", "TARGET"), help="a fact to edit (repeatable)"
    )
    parser.add_argument("--show", type=non_negative_int, default=10, help="facts whose answers are printed")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="facts per base-model pass")
    parser.add_argument("--save-model", help="save the edited model here (an ordinary transformers folder)")
    parser.add_argument("--save-edits", help="save the edit artifact here (shifts + manifest)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Edits a model with facts from a file or the command line; prints the answers before and after; saves."""
    if not args.facts and not args.fact:
        raise ValueError("no facts: give --facts FILE and/or --fact PROMPT TARGET")
    if args.facts:
        check_file(args.facts, "facts")
    check_model(args.model)
    check_editor(args.editor)
    # Every fact is read and checked before torch loads: a bad file or fact fails at once.
    requests = load_edit_requests(args.facts, args.format) if args.facts else []
    requests += [EditRequest(prompt, target) for prompt, target in args.fact or []]
    from .. import MalmenEditorModel
    from ..evaluation.metrics import greedy_answers
    from ..offline_models import load_model_and_tokenizer

    editor = MalmenEditorModel.from_pretrained(args.editor)
    model, tokenizer = load_model_and_tokenizer(args.model)
    shown = requests[: args.show]
    before = greedy_answers(model, tokenizer, [request.prompt for request in shown])
    start = time.perf_counter()
    handle = editor.apply_edits(model, requests, tokenizer=tokenizer, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - start
    after = greedy_answers(model, tokenizer, [request.prompt for request in shown])
    if args.save_edits:
        handle.save(args.save_edits)
    if args.save_model:
        from ..saving import atomic_directory

        # Written aside and swapped in: Ctrl-C during the save leaves the folder as it was, never half-written.
        with atomic_directory(args.save_model) as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    answers = [
        {"prompt": r.prompt, "target": r.target, "before": b, "after": a}
        for r, b, a in zip(shown, before, after, strict=True)
    ]
    if args.json:
        summary = {"num_facts": handle.num_facts, "edit_seconds": seconds, "answers": answers}
        print(json.dumps({**summary, "saved_edits": args.save_edits, "saved_model": args.save_model}, indent=1))
        return
    print(f"Edited {handle.num_facts} facts in {seconds:.1f} s.\n")
    print(answers_table(answers))
    for what, folder in (
        ("edits (load with malmen_hf.load_edits)", args.save_edits),
        ("edited model", args.save_model),
    ):
        if folder:
            print(f"Saved the {what} to {folder}")
