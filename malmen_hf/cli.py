"""
The `malmen-hf` command line.

This module imports only the standard library and malmen-hf's light modules: each command imports torch and
transformers (seconds) when it runs, after checking its paths and names, so that `--help` and bad input answer at once.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .demo import DEFAULT_MODEL, DEMO_SCORES, HAND_WRITTEN_FACTS, TRAINING_FREE
from .shipped import COUNTERFACT_EVAL, DEFAULT_EDITOR, resolve_editor
from .training.arguments import MalmenTrainingArguments

if TYPE_CHECKING:
    from .modeling_malmen import MalmenEditorModel

DEFAULT_DATA = COUNTERFACT_EVAL  # held-out CounterFact facts shipped with the package, wherever it is installed
BUSY_CORES = 0.5  # cores kept busy by other processes from which torch's threads should wait passively


def demo(args: argparse.Namespace) -> None:
    """Edits a real model with a few hundred facts at once, shows the answers change, then reverts them."""
    data = _demo_data(args.data)
    _check_model(args.model)
    if args.editor != TRAINING_FREE:
        _check_editor(args.editor)
    import torch

    from . import EditRequest, load_edit_requests
    from .demo import edit_and_compare, load_editable_model
    from .evaluation.metrics import greedy_answers

    torch.manual_seed(0)
    counterfact = load_edit_requests(data, "counterfact", limit=args.num_facts)
    hand_written = [EditRequest(prompt, target) for prompt, target in HAND_WRITTEN_FACTS]
    requests, shown = counterfact + hand_written, hand_written + counterfact[: args.show]
    model, tokenizer = load_editable_model(
        args.model, args.editor, lr=args.lr, log_lambda=args.log_lambda, status=_status
    )
    result = edit_and_compare(
        model, tokenizer, requests, shown, batch_size=args.batch_size, progress=True, status=_status
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


def _demo_data(data: str | None) -> Path:
    """The demo's CounterFact file: `--data`, else the held-out facts shipped with the package."""
    return _check_file(data if data is not None else DEFAULT_DATA, "data")


def _print_demo(handle, seconds, answers, scores_before, scores_after, reverted) -> None:
    timings = handle.timings
    print(
        f"\nEdited {handle.num_facts} facts ({handle.num_tokens} target tokens) in one call, {seconds:.1f} s "
        f"(caching {timings['caching']:.1f} s, hyper-network {timings['hypernetwork']:.1f} s, "
        f"solve+apply {timings['solve_and_apply']:.1f} s), {len(handle.modules)} layers.\n"
    )
    rows = [[row["prompt"], row["target"], row["before"], row["after"]] for row in answers]
    print(_table(["prompt", "new target", "answer before", "answer after"], rows))
    rows = [
        [f"{name} ({key})", f"{scores_before[key]:.3f}", f"{scores_after[key]:.3f}"]
        for key, name in DEMO_SCORES.items()
    ]
    print("\n" + _table(["score over all edited facts", "before", "after"], rows))
    print(f"\nReverted: {'all original answers are back' if reverted else 'SOME ANSWERS DIFFER AFTER REVERT'}.")


def _status(message: str) -> None:
    """Progress messages go to stderr (beside the progress bars), so that `--json` output stays parseable."""
    print(message, file=sys.stderr, flush=True)


def _table(header: list[str], rows: list[list[str]], width: int = 44) -> str:
    """A plain-text table; cells are put on one line and cut to `width` characters."""
    cells = [[_one_line(cell, width) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _one_line(cell: object, width: int) -> str:
    text = " ".join(str(cell).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_file(path: str | os.PathLike, what: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path} is not a file")
    return Path(path)


def _check_model(name_or_path: str) -> None:
    """A folder, a short name, or a Hub id that can be had: else a "model not found" error, before any slow work."""
    from .offline_models import OFFLINE_MODELS, check_source

    check_source(name_or_path, "model", OFFLINE_MODELS)


def _check_editor(name_or_path: str) -> None:
    from .offline_models import check_source
    from .shipped import shipped_editors

    check_source(name_or_path, "editor", shipped_editors())
    if os.path.isdir(name_or_path):
        _editor_folder(name_or_path)


def _check_scores(scores: list[str] | None) -> list[str]:
    from .evaluation.metrics import SCORES

    unknown = [name for name in scores or [] if name not in SCORES]
    if unknown:
        raise ValueError(f"unknown --scores {unknown}; the scores are {', '.join(SCORES)}")
    return scores or list(SCORES)


def train(args: argparse.Namespace) -> None:
    """Meta-trains an editor for a model on a data file (see `train_editor`)."""
    for path, what in ((args.data, "data"), (args.eval_data, "eval data")):
        if path:
            _check_file(path, what)
    _check_model(args.model)
    if args.editor:
        _check_editor(args.editor)
    from . import MalmenEditorModel, load_edit_requests, train_editor
    from .offline_models import load_model_and_tokenizer

    requests = load_edit_requests(args.data, args.format)
    if args.eval_data:
        eval_requests = load_edit_requests(args.eval_data, args.format)
    else:
        # Hold out the last facts of the training file: choose settings on data the editor was not trained on.
        held_out = max(1, round(len(requests) * args.eval_fraction))
        requests, eval_requests = requests[:-held_out], requests[-held_out:]
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


def evaluate_editor(args: argparse.Namespace) -> None:
    """Scores a model on N facts before and after editing them all at once with an editor; prints a table or JSON."""
    if args.update_card and not args.editor:
        raise ValueError("--update-card needs --editor (the folder whose card gets the scores)")
    _check_file(args.data, "data")
    _check_model(args.model)
    if args.editor:
        _check_editor(args.editor)
    if args.update_card:
        _editor_folder(args.editor)
    scores = _check_scores(args.scores)
    import torch

    from . import MalmenEditorModel, load_edit_requests
    from .evaluation.metrics import locality_predictions, scores_of_model
    from .offline_models import load_model_and_tokenizer

    torch.manual_seed(0)
    requests = load_edit_requests(args.data, args.format, limit=args.offset + args.num_facts)[args.offset :]
    if len(requests) < args.num_facts:
        raise ValueError(
            f"{args.data} has {len(requests) + args.offset} records, fewer than --offset + --num-facts "
            f"({args.offset} + {args.num_facts})"
        )
    model, tokenizer = load_model_and_tokenizer(args.model)
    editor = MalmenEditorModel.from_pretrained(args.editor) if args.editor else None
    results = {"model": args.model, "editor": args.editor, "data": str(args.data), "num_facts": len(requests)}
    results["command"] = shlex.join(["malmen-hf", *args.argv])
    _status(f"Scoring the unedited model on {len(requests)} facts ...")
    locality_before = locality_predictions(model, tokenizer, requests, args.batch_size, progress=True)
    results["before"] = scores_of_model(model, tokenizer, requests, locality_before, args.batch_size, scores, True)
    if editor is not None:
        start = time.perf_counter()
        handle = editor.apply_edits(model, requests, tokenizer=tokenizer, batch_size=args.batch_size, progress=True)
        results["edit_seconds"] = time.perf_counter() - start
        _status("Scoring the edited model ...")
        results["after"] = scores_of_model(model, tokenizer, requests, locality_before, args.batch_size, scores, True)
        handle.revert()
        if args.update_card:
            folder = _editor_folder(args.editor)
            rows = [{"n": results["num_facts"], **results["after"]}]
            _merge_into_card(folder / "README.md", editor, rows, editor_id=str(folder), data_name=Path(args.data).name)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    header = ["score", "before"] + (["after"] if args.editor else [])
    rows = [
        [name] + [f"{results[when][name]:.3f}" for when in ("before", "after") if when in results] for name in scores
    ]
    edited = f", edited in {results['edit_seconds']:.1f} s" if args.editor else " (no editor: unedited model only)"
    print(f"{len(requests)} facts from {args.data}{edited}\n" + _table(header, rows, width=16))


def card(args: argparse.Namespace) -> None:
    """
    Writes the model card (README.md) of a saved editor with results from `eval --json` or the quality benchmark,
    merged into the results the card already has: a row per N, the new one replacing an old one of the same N.
    """
    editor_dir = _editor_folder(args.editor)
    rows, command, data_name = _card_results(Path(args.results), args.method) if args.results else ([], None, None)
    from . import MalmenEditorModel

    editor = MalmenEditorModel.from_pretrained(editor_dir)
    output = Path(args.output) if args.output else editor_dir / "README.md"
    existing = output if output.is_file() else editor_dir / "README.md"
    card_text = existing.read_text() if existing.is_file() else None
    _merge_into_card(
        output, editor, rows, editor_id=args.editor_id or str(editor_dir), dataset=args.dataset,
        data_name=data_name, command=command, card_text=card_text,
    )  # fmt: skip


def _merge_into_card(
    output: Path,
    editor: "MalmenEditorModel",
    rows: list[dict],
    *,
    editor_id: str,
    dataset: str | None = None,
    data_name: str | None = None,
    command: str | None = None,
    card_text: str | None = None,
) -> None:
    """
    Writes `output` with the result `rows` merged into those of the existing card (`card_text`, by default the file
    at `output`), by (dataset, N). The dataset is `dataset` if given, else the card's, else `data_name`: a card
    shows one dataset, so rows of another one are replaced (and said so).
    """
    from huggingface_hub import ModelCard

    if card_text is None and output.is_file():
        card_text = output.read_text()
    old = ModelCard(card_text) if card_text else None
    old_dataset = (old.data.datasets or [None])[0] if old is not None else None
    dataset = dataset or old_dataset or data_name or "unknown"
    if old_dataset is not None and old_dataset != dataset:
        _status(f"The card's results on {old_dataset} are replaced by results on {dataset} (a card shows one dataset)")
    earlier = _results_in_card(old, dataset) if old is not None else []
    new_n = {row["n"] for row in rows}
    merged = sorted([row for row in earlier if row["n"] not in new_n] + list(rows), key=lambda row: row["n"])
    commands = _commands_in_card(card_text) if earlier and len(merged) > len(rows) else []
    commands += [command] if command and command not in commands else []
    _write_card(output, editor, merged, editor_id=editor_id, dataset=dataset, commands=commands)


def _editor_folder(path: str) -> Path:
    folder = Path(resolve_editor(path))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"editor not found: {folder} is not a saved editor folder (no config.json)")
    return folder


def _write_card(
    output: Path,
    editor: "MalmenEditorModel",
    results: list[dict],
    *,
    editor_id: str,
    dataset: str,
    commands: list[str],
) -> None:
    from .evaluation.cards import editor_card

    model_card = editor_card(editor, results, editor_id=editor_id, dataset=dataset, results_command=commands)
    temporary = output.with_name(f".{output.name}.tmp")
    model_card.save(temporary)
    os.replace(temporary, output)  # a failed write leaves the previous card as it was
    _status(f"Wrote {output}" + (f" with {len(results)} result rows" if results else ""))


def _results_in_card(card, dataset: str) -> list[dict]:
    """The result rows (one per N) of a card's model-index for `dataset`."""
    rows: dict[int, dict] = {}
    for result in card.data.eval_results or []:
        if result.dataset_name == dataset and (result.dataset_config or "").startswith("N="):
            n = int(result.dataset_config[2:])
            rows.setdefault(n, {"n": n})[result.metric_type] = result.metric_value
    return [rows[n] for n in sorted(rows)]


def _commands_in_card(card_text: str | None) -> list[str]:
    """The commands a card says its results were measured with (its "Measured with `...`" line)."""
    line = re.search(r"^Measured with (.*)\.$", card_text or "", re.M)
    return re.findall(r"`([^`]+)`", line.group(1)) if line else []


def _card_results(path: Path, method: str) -> tuple[list[dict], str | None, str | None]:
    """Result rows, the command and the data file's name, from `eval --json` output or `benchmarks/quality.py`."""
    try:
        data = json.loads(_check_file(path, "results").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    if not isinstance(data, dict):
        data = {}
    if "after" in data:
        if not (isinstance(data["after"], dict) and isinstance(data.get("num_facts"), int) and data.get("data")):
            raise ValueError(f"{path} looks like `malmen-hf eval --json` output but lacks num_facts, data or after")
        return [{"n": data["num_facts"], **data["after"]}], data.get("command"), Path(data["data"]).name
    if "rows" in data:
        if not isinstance(data["rows"], list) or not all(isinstance(row, dict) and "n" in row for row in data["rows"]):
            raise ValueError(f"{path} looks like a quality benchmark result but its rows are not objects with an n")
        rows = [row for row in data["rows"] if row.get("method") == method and "skipped" not in row]
        if not rows:
            raise ValueError(f"{path} has no results for method {method!r}")
        data_file = data.get("settings", {}).get("data")
        return rows, data.get("command"), Path(data_file).name if data_file else None
    raise ValueError(f"{path} is neither `malmen-hf eval --json` output nor a quality benchmark result")


def edit(args: argparse.Namespace) -> None:
    """Edits a model with facts from a file or the command line; prints the answers before and after; saves."""
    if not args.facts and not args.fact:
        raise ValueError("no facts: give --facts FILE and/or --fact PROMPT TARGET")
    if args.facts:
        _check_file(args.facts, "facts")
    _check_model(args.model)
    _check_editor(args.editor)
    from . import EditRequest, MalmenEditorModel, load_edit_requests
    from .evaluation.metrics import greedy_answers
    from .offline_models import load_model_and_tokenizer

    requests = load_edit_requests(args.facts, args.format) if args.facts else []
    requests += [EditRequest(prompt, target) for prompt, target in args.fact or []]
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
        from .saving import atomic_directory

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
    rows = [[row["prompt"], row["target"], row["before"], row["after"]] for row in answers]
    print(_table(["prompt", "new target", "answer before", "answer after"], rows))
    for what, folder in (
        ("edits (load with malmen_hf.load_edits)", args.save_edits),
        ("edited model", args.save_model),
    ):
        if folder:
            print(f"Saved the {what} to {folder}")


def push(args: argparse.Namespace) -> None:
    """Uploads a saved editor (with its card) or a saved edit artifact to a Hub repository, in one commit."""
    options = {"commit_message": args.commit_message, "revision": args.revision, "create_pr": args.create_pr}
    if args.edits:
        if not (Path(args.edits) / "edit_manifest.json").is_file():
            raise FileNotFoundError(f"edits not found: {args.edits} holds no edit_manifest.json")
        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
        repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
        commit = api.upload_folder(repo_id=repo_id, folder_path=args.edits, **options)
    else:
        folder = _editor_folder(args.editor)
        from huggingface_hub import ModelCard

        from . import MalmenEditorModel

        editor = MalmenEditorModel.from_pretrained(folder)
        card_path = folder / "README.md"
        model_card = ModelCard.load(card_path) if card_path.is_file() else None
        commit = editor.push_to_hub(
            args.repo_id, private=args.private, token=args.token, model_card=model_card, **options
        )
    print(f"Pushed to {args.repo_id}: {commit}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malmen-hf", description="MALMEN model editing for transformers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_demo, _add_train, _add_eval, _add_card, _add_edit, _add_push):
        add_command(commands)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        default="auto",
        help="format of the data file: auto (detected from its keys) or a name in malmen_hf.FORMATS",
    )


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo_parser = commands.add_parser("demo", help="edit a real model with CounterFact facts, show it, revert it")
    demo_parser.add_argument("--model", default=DEFAULT_MODEL, help="short name, local folder or Hub id")
    demo_parser.add_argument(
        "--editor",
        default=DEFAULT_EDITOR,
        help=f"a released editor's short name, a saved editor (folder or Hub id), or {TRAINING_FREE!r} (the untrained "
        "editor, its normalizer fitted on CounterFact facts shipped with malmen-hf); default: %(default)s",
    )
    demo_parser.add_argument(
        "--data",
        help="CounterFact JSON (simplified form); default: 1,000 held-out CounterFact facts shipped with "
        "malmen-hf (malmen_hf.shipped.COUNTERFACT_EVAL)",
    )
    demo_parser.add_argument("--num-facts", type=_positive_int, default=300, help="CounterFact records edited at once")
    demo_parser.add_argument("--show", type=_non_negative_int, default=5, help="CounterFact edits printed")
    demo_parser.add_argument("--batch-size", type=_positive_int, default=32, help="facts per base-model pass")
    demo_parser.add_argument(
        "--lr", type=float, help="training-free editor's lr (default: malmen_hf.training.fitting.TRAINING_FREE_LR)"
    )
    demo_parser.add_argument(
        "--log-lambda",
        type=float,
        help="training-free editor's log ridge coefficient (default: training.fitting.TRAINING_FREE_LOG_LAMBDA)",
    )
    demo_parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    demo_parser.set_defaults(run=demo)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train_parser = commands.add_parser("train", help="meta-train an editor for a model on a data file")
    train_parser.add_argument("--model", required=True, help="short name, local folder or Hub id of the base model")
    train_parser.add_argument("--data", required=True, help="training facts (JSON or JSONL)")
    _add_format_option(train_parser)
    train_parser.add_argument("--eval-data", help="held-out facts for validation (default: split off --data)")
    train_parser.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out")
    train_parser.add_argument("--editor", help="a saved editor to go on training (default: a new one)")
    train_parser.add_argument("--edit-modules", nargs="+", help="layers to edit (default: per architecture family)")
    train_parser.add_argument("--rank", type=_positive_int, default=1920, help="rank of the hyper-network blocks")
    train_parser.add_argument("--n-blocks", type=_non_negative_int, default=2, help="residual blocks per hyper-net")
    train_parser.add_argument("--lr-init", type=_finite_float, default=1e-6, help="initial per-layer lr")
    train_parser.add_argument("--log-lambda-init", type=_finite_float, default=0.0, help="initial per-layer log ridge")
    train_parser.add_argument("--aggregation", default="least_squares", choices=["least_squares", "sum"])
    train_parser.add_argument(
        "--token-positions",
        default="target",
        choices=["target", "all", "subject_last"],
        help="positions whose keys and value gradients are used: those scored on the target, every one, or the last "
        "token of each fact's subject (facts need a subject, as CounterFact and zsRE records have)",
    )
    _add_training_arguments(train_parser)
    train_parser.set_defaults(run=train)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    eval_parser = commands.add_parser(
        "eval", help="score a model on N facts before and after editing them all at once with an editor"
    )
    eval_parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id")
    eval_parser.add_argument(
        "--editor",
        help="a released editor's short name or a saved editor (folder or Hub id); without it the unedited model only",
    )
    eval_parser.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="facts to edit (JSON or JSONL); default: 1,000 held-out CounterFact facts shipped with malmen-hf",
    )
    _add_format_option(eval_parser)
    eval_parser.add_argument("--num-facts", type=_positive_int, default=100, help="facts edited at once (N)")
    eval_parser.add_argument("--offset", type=_non_negative_int, default=0, help="records of the file to skip first")
    eval_parser.add_argument("--batch-size", type=_positive_int, default=32, help="facts per base-model pass")
    eval_parser.add_argument(
        "--scores",
        nargs="+",
        metavar="SCORE",
        help="scores to compute (default: all of evaluation.metrics.SCORES: ES GS LS ...; see the README's Metrics)",
    )
    eval_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    eval_parser.add_argument(
        "--update-card",
        action="store_true",
        help="write the scores after the edit into the editor folder's model card (its results for other N stay)",
    )
    eval_parser.set_defaults(run=evaluate_editor)


def _add_card(commands: argparse._SubParsersAction) -> None:
    card_parser = commands.add_parser("card", help="write the model card (README.md) of a saved editor")
    card_parser.add_argument("--editor", required=True, help="the saved editor folder (or a released editor's name)")
    card_parser.add_argument("--results", help="JSON from `malmen-hf eval --json` or benchmarks/quality.py")
    card_parser.add_argument("--method", default="malmen", help="which method's rows of a benchmark JSON")
    card_parser.add_argument("--editor-id", help="the Hub id users load it from (default: the folder)")
    card_parser.add_argument(
        "--dataset", help="the data the results were measured on (default: the card's, else the results' data file)"
    )
    card_parser.add_argument("--output", help="where to write the card (default: <editor>/README.md)")
    card_parser.set_defaults(run=card)


def _add_edit(commands: argparse._SubParsersAction) -> None:
    edit_parser = commands.add_parser("edit", help="edit a model with facts, print the answers before and after, save")
    edit_parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id")
    edit_parser.add_argument(
        "--editor",
        default=DEFAULT_EDITOR,
        help="a released editor's short name or a saved editor (folder or Hub id); default: %(default)s",
    )
    edit_parser.add_argument("--facts", help="facts to edit (JSON or JSONL, any format `train` reads)")
    _add_format_option(edit_parser)
    edit_parser.add_argument(
        "--fact", nargs=2, action="append", metavar=("PROMPT", "TARGET"), help="a fact to edit (repeatable)"
    )
    edit_parser.add_argument("--show", type=_non_negative_int, default=10, help="facts whose answers are printed")
    edit_parser.add_argument("--batch-size", type=_positive_int, default=32, help="facts per base-model pass")
    edit_parser.add_argument("--save-model", help="save the edited model here (an ordinary transformers folder)")
    edit_parser.add_argument("--save-edits", help="save the edit artifact here (shifts + manifest)")
    edit_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    edit_parser.set_defaults(run=edit)


def _add_push(commands: argparse._SubParsersAction) -> None:
    push_parser = commands.add_parser("push", help="upload a saved editor or edit artifact to the Hugging Face Hub")
    what = push_parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--editor", help="a saved editor folder (its README.md card goes along, or one is rendered)")
    what.add_argument("--edits", help="a saved edit artifact folder (from `edit --save-edits` or `handle.save`)")
    push_parser.add_argument("--repo-id", required=True, help="the Hub repository, e.g. org/name")
    push_parser.add_argument("--private", action="store_true", help="create the repository private")
    push_parser.add_argument("--token", help="Hub token (default: the stored login)")
    push_parser.add_argument("--revision", help="branch to push to")
    push_parser.add_argument("--commit-message", help="message of the commit")
    push_parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push_parser.set_defaults(run=push)


def busy_cores(interval: float = 0.25) -> float | None:
    """
    How many cores were busy over the next `interval` seconds, from the kernel's counters (`/proc/stat`).

    Measured while this process sleeps, so it counts other processes only. `None` where there is no `/proc/stat`.
    """
    try:
        first = _cpu_times()
        time.sleep(interval)
        second = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = [after - before for before, after in zip(first, second, strict=True)]
    total = sum(elapsed)
    if total <= 0:
        return None
    idle = elapsed[3] + elapsed[4]  # idle and iowait
    return (total - idle) / total * (os.cpu_count() or 1)


def _cpu_times() -> list[int]:
    """The first eight fields of /proc/stat's `cpu` line: user, nice, system, idle, iowait, irq, softirq, steal."""
    with open("/proc/stat") as stat:
        return [int(field) for field in stat.readline().split()[1:9]]


def wait_passively_when_busy(environ: dict | None = None, busy: float | None = None) -> bool:
    """
    Sets `OMP_WAIT_POLICY=PASSIVE` when other processes keep at least `BUSY_CORES` cores busy, unless it is set.

    torch's OpenMP threads spin while they wait for each other; beside a busy neighbour the spinning takes the core
    that the awaited thread needs (`benchmarks/contention.py` measures it), while on an idle machine spinning is the
    faster choice, so the CLI decides at each start. OpenMP reads the policy once, when torch loads it: this must run
    before torch is imported. Returns whether it set the policy.
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return False
    busy = busy_cores() if busy is None else busy
    if busy is None or busy < BUSY_CORES:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if "torch" not in sys.modules and wait_passively_when_busy():
        _status(
            "Other programs keep a CPU core busy, so torch's threads wait passively instead of spinning (faster "
            "beside a busy neighbour); set OMP_WAIT_POLICY=ACTIVE or PASSIVE yourself to choose."
        )
    try:
        args.run(args)
    except Exception as error:
        # huggingface_hub's strict dataclasses (MalmenConfig) raise their own errors, not ValueError.
        if not isinstance(error, (ValueError, OSError)) and not type(error).__name__.startswith("StrictDataclass"):
            raise
        print(f"malmen-hf {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
