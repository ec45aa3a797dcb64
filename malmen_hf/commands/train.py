"""`malmen-hf train`: meta-train an editor for a model on a data file."""

import argparse
import dataclasses
import re

from ..data import load_edit_requests
from ..training.arguments import MalmenTrainingArguments
from .common import (
    add_format_option,
    check_editor,
    check_file,
    check_model,
    finite_float,
    non_negative_int,
    positive_int,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `malmen-hf train` and its options to the command line's `subparsers`."""
    parser = subparsers.add_parser("train", help="meta-train an editor for a model on a data file")
    parser.add_argument("--model", required=True, help="short name, local folder or Hub id of the base model")
    parser.add_argument("--data", required=True, help="training facts (JSON or JSONL)")
    add_format_option(parser)
    parser.add_argument("--eval-data", help="held-out facts for validation (default: split off --data)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out")
    parser.add_argument("--editor", help="a saved editor to go on training (default: a new one)")
    parser.add_argument("--edit-modules", nargs="+", help="layers to edit (default: per architecture family)")
    parser.add_argument("--rank", type=positive_int, default=1920, help="rank of the hyper-network blocks")
    parser.add_argument("--n-blocks", type=non_negative_int, default=2, help="residual blocks per hyper-net")
    parser.add_argument("--lr-init", type=finite_float, default=1e-6, help="initial per-layer lr")
    parser.add_argument("--log-lambda-init", type=finite_float, default=0.0, help="initial per-layer log ridge")
    parser.add_argument("--aggregation", default="least_squares", choices=["least_squares", "sum"])
    parser.add_argument(
        "--token-positions",
        default="target",
        choices=["target", "all", "subject_last"],
        help="positions whose keys and value gradients are used: those scored on the target, every one, or the last "
        "token of each fact's subject (facts need a subject, as CounterFact and zsRE records have)",
    )
    _add_training_arguments(parser)
    parser.set_defaults(run=run)


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field of `MalmenTrainingArguments`, documented by its docstring."""
    entry = re.compile(r"^ {8}(\w+) \(.*?\): (.*(?:\n {12}.*)*)", re.M)  # "name (`type`, ...): text"
    docs = dict(entry.findall(MalmenTrainingArguments.__doc__))
    for field in dataclasses.fields(MalmenTrainingArguments):
        flag = "--" + field.name.replace("_", "-")
        help_text = " ".join(docs.get(field.name, "").split())
        if field.type == "bool" or field.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        elif field.name == "output_dir":
            parser.add_argument(flag, required=True, help=help_text)
        elif field.name == "resume_from_checkpoint":
            parser.add_argument(flag, nargs="?", const=True, default=None, help=help_text)
        else:
            kind = {"float": float, "int": int}.get(type(field.default).__name__, str)
            # Optional numbers default to None: their type is read from the annotation.
            if field.type in ("int | None", int | None):
                kind = int
            elif field.type in ("float | None", float | None):
                kind = float
            parser.add_argument(flag, type=kind, default=field.default, help=help_text)


def run(args: argparse.Namespace) -> None:
    """Meta-trains an editor for a model on a data file (see `train_editor`)."""
    for path, what in ((args.data, "data"), (args.eval_data, "eval data")):
        if path:
            check_file(path, what)
    check_model(args.model)
    if args.editor:
        check_editor(args.editor)
    # Both files are read and checked before torch loads: a bad record fails at once.
    requests = load_edit_requests(args.data, args.format)
    if args.eval_data:
        eval_requests = load_edit_requests(args.eval_data, args.format)
    else:
        # Hold out the last facts of the training file: choose settings on data the editor was not trained on.
        held_out = max(1, round(len(requests) * args.eval_fraction))
        requests, eval_requests = requests[:-held_out], requests[-held_out:]
    from .. import MalmenEditorModel, train_editor
    from ..offline_models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.editor:
        editor = MalmenEditorModel.from_pretrained(args.editor)
    else:
        editor_options = {
            key: getattr(args, key)
            for key in ("rank", "n_blocks", "lr_init", "log_lambda_init", "aggregation", "token_positions")
        }
        editor = MalmenEditorModel.for_model(
            model, edit_modules=args.edit_modules, base_model_name_or_path=args.model, **editor_options
        )
    options = {field.name: getattr(args, field.name) for field in dataclasses.fields(MalmenTrainingArguments)}
    train_editor(editor, model, tokenizer, requests, MalmenTrainingArguments(**options), eval_requests)
