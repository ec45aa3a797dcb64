"""`malmen-hf card`: write a saved editor's model card, with measured results merged into those it has."""

import argparse
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .common import check_file, editor_folder, status

if TYPE_CHECKING:
    from ..modeling_malmen import MalmenEditorModel


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `malmen-hf card` and its options to the command line's `subparsers`."""
    parser = subparsers.add_parser("card", help="write the model card (README.md) of a saved editor")
    parser.add_argument("--editor", required=True, help="the saved editor folder (or a released editor's name)")
    parser.add_argument("--results", help="JSON from `malmen-hf eval --json` or benchmarks/quality.py")
    parser.add_argument("--method", default="malmen", help="which method's rows of a benchmark JSON")
    parser.add_argument("--editor-id", help="the Hub id users load it from (default: the folder)")
    parser.add_argument(
        "--dataset", help="the data the results were measured on (default: the card's, else the results' data file)"
    )
    parser.add_argument("--output", help="where to write the card (default: <editor>/README.md)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """
    Writes the model card (README.md) of a saved editor with results from `eval --json` or the quality benchmark,
    merged into the results the card already has: a row per N, the new one replacing an old one of the same N.
    """
    editor_dir = editor_folder(args.editor)
    rows, command, data_name = _results_of_file(Path(args.results), args.method) if args.results else ([], None, None)
    from .. import MalmenEditorModel

    editor = MalmenEditorModel.from_pretrained(editor_dir)
    output = Path(args.output) if args.output else editor_dir / "README.md"
    existing = output if output.is_file() else editor_dir / "README.md"
    card_text = existing.read_text() if existing.is_file() else None
    merge_into_card(
        output, editor, rows, editor_id=args.editor_id or str(editor_dir), dataset=args.dataset,
        data_name=data_name, command=command, card_text=card_text,
    )  # fmt: skip


def merge_into_card(
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

    from ..evaluation.cards import card_results

    if card_text is None and output.is_file():
        card_text = output.read_text()
    old = ModelCard(card_text) if card_text else None
    old_dataset = (old.data.datasets or [None])[0] if old is not None else None
    dataset = dataset or old_dataset or data_name or "unknown"
    if old_dataset is not None and old_dataset != dataset:
        status(f"The card's results on {old_dataset} are replaced by results on {dataset} (a card shows one dataset)")
    earlier = card_results(old, dataset) if old is not None else []
    new_n = {row["n"] for row in rows}
    merged = sorted([row for row in earlier if row["n"] not in new_n] + list(rows), key=lambda row: row["n"])
    commands = _commands_in_card(card_text) if earlier and len(merged) > len(rows) else []
    commands += [command] if command and command not in commands else []
    _write_card(output, editor, merged, editor_id=editor_id, dataset=dataset, commands=commands)


def _write_card(
    output: Path,
    editor: "MalmenEditorModel",
    results: list[dict],
    *,
    editor_id: str,
    dataset: str,
    commands: list[str],
) -> None:
    from ..evaluation.cards import editor_card

    model_card = editor_card(editor, results, editor_id=editor_id, dataset=dataset, results_command=commands)
    temporary = output.with_name(f".{output.name}.tmp")
    model_card.save(temporary)
    os.replace(temporary, output)  # a failed write leaves the previous card as it was
    status(f"Wrote {output}" + (f" with {len(results)} result rows" if results else ""))


def _commands_in_card(card_text: str | None) -> list[str]:
    """The commands a card says its results were measured with (its "Measured with `...`" line)."""
    line = re.search(r"^Measured with (.*)\.$", card_text or "", re.M)
    return re.findall(r"`([^`]+)`", line.group(1)) if line else []


def _results_of_file(path: Path, method: str) -> tuple[list[dict], str | None, str | None]:
    """Result rows, the command and the data file's name, from `eval --json` output or `benchmarks/quality.py`."""
    try:
        data = json.loads(check_file(path, "results").read_text())
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
