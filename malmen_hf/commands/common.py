"""What the subcommands share: checks of paths and names before any slow work, argument types, and plain output."""

import argparse
import math
import os
import sys
from pathlib import Path

from ..shipped import resolve_editor


def check_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a `Path`; a `"<what> not found"` error if it is not a file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path} is not a file")
    return Path(path)


def check_model(name_or_path: str) -> None:
    """A folder, a short name, or a Hub id that can be had: else a "model not found" error, before any slow work."""
    from ..offline_models import OFFLINE_MODELS, check_source

    check_source(name_or_path, "model", OFFLINE_MODELS)


def check_editor(name_or_path: str) -> None:
    """A released editor's short name, a saved editor's folder or a Hub id that can be had: else "editor not found"."""
    from ..offline_models import check_source
    from ..shipped import shipped_editors

    check_source(name_or_path, "editor", shipped_editors())
    if os.path.isdir(name_or_path):
        editor_folder(name_or_path)


def editor_folder(path: str) -> Path:
    """The folder of a saved editor (a released editor's short name resolved); "editor not found" without a config."""
    folder = Path(resolve_editor(path))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"editor not found: {folder} is not a saved editor folder (no config.json)")
    return folder


def status(message: str) -> None:
    """Progress messages go to stderr (beside the progress bars), so that `--json` output stays parseable."""
    print(message, file=sys.stderr, flush=True)


def table(header: list[str], rows: list[list[str]], width: int = 44) -> str:
    """A plain-text table; cells are put on one line and cut to `width` characters."""
    cells = [[_one_line(cell, width) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _one_line(cell: object, width: int) -> str:
    text = " ".join(str(cell).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def answers_table(answers: list[dict[str, str]]) -> str:
    """The table of the prompts, their new targets and the greedy answers before and after an edit."""
    rows = [[row["prompt"], row["target"], row["before"], row["after"]] for row in answers]
    return table(["prompt", "new target", "answer before", "answer after"], rows)


def positive_int(text: str) -> int:
    """An argument type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argument type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argument type: a number that is neither infinite nor NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """`--format` of the commands that read a facts file (see `malmen_hf.load_edit_requests`)."""
    parser.add_argument(
        "--format",
        default="auto",
        help="format of the data file: auto (detected from its keys) or a name in malmen_hf.FORMATS",
    )
