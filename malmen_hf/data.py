"""Loaders that turn knowledge-editing data (CounterFact, zsRE, FEVER, plain fact files) into `EditRequest`s."""

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from .facts import EditRequest

FEVER_LABELS = ("SUPPORTS", "REFUTES")


@dataclass(frozen=True)
class _Layout:
    """Where one format keeps each `EditRequest` field."""

    prompt: str
    target: str
    rephrases: str
    locality_prompt: str
    locality_answer: str
    # The answer before the edit, read when present (for CounterFact's probability scores).
    ground_truth: str | None = None
    # The entity the fact is about, read when present (for editors that read keys at the subject's last token).
    subject: str | None = None
    # The generic format: only prompt and target are required, and unknown keys are an error (they are typos there).
    closed: bool = False
    # FEVER: the target and the locality answer are classifier labels.
    labels: tuple[str, ...] = ()

    def keys(self) -> dict[str, str]:
        """`EditRequest` field name -> this format's key."""
        return {
            "prompt": self.prompt,
            "target": self.target,
            "rephrases": self.rephrases,
            "locality_prompt": self.locality_prompt,
            "locality_answer": self.locality_answer,
            **({"ground_truth": self.ground_truth} if self.ground_truth else {}),
            **({"subject": self.subject} if self.subject else {}),
        }

    def required(self) -> tuple[str, ...]:
        if self.closed:
            return (self.prompt, self.target)
        return (self.prompt, self.target, self.rephrases, self.locality_prompt, self.locality_answer)


_LAYOUTS = {
    "counterfact": _Layout(
        "prompt",
        "target_new",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
        "ground_truth",
        "subject",
    ),
    "zsre": _Layout("src", "alt", "rephrase", "loc", "loc_ans", "answers", "subject"),
    "zsre_paper": _Layout("src", "ans", "rephrase", "loc", "loc_ans"),
    "fever": _Layout("prompt", "alt", "equiv_prompt", "unrel_prompt", "unrel_ans", labels=FEVER_LABELS),
    "generic": _Layout(
        "prompt", "target", "rephrases", "locality_prompt", "locality_answer", "ground_truth", "subject", closed=True
    ),
}

FORMATS: dict[str, tuple[str, ...]] = {name: layout.required() for name, layout in _LAYOUTS.items()}
"""Each format [`load_edit_requests`] reads, and the keys every record of that format must have."""


def load_edit_requests(
    path: str | os.PathLike, format: str = "auto", *, limit: int | None = None, skip_invalid: bool = False
) -> list[EditRequest]:
    """
    Reads a JSON array or JSON Lines file of edit records into [`EditRequest`]s, with their rephrasings and locality
    prompts. Values are taken as the file writes them (the standard library's `json`: no column types are inferred).

    The formats, with the keys each reads (other keys are ignored, except in `"generic"`):

    - `"counterfact"` (CounterFact, simplified MEND-style form): `prompt` -> `target_new`; rephrases:
      `rephrase_prompt`; locality: `locality_prompt` -> `locality_ground_truth`; `ground_truth` and `subject` when
      present.
    - `"zsre"` (zsRE, MEND's split files): `src` -> `alt`; rephrases: `rephrase`; locality: `loc` -> `loc_ans`, kept
      as given (e.g. `"nq question: who sings ..."`); the first of `answers`, when present, as `ground_truth`;
      `subject` when present.
    - `"zsre_paper"` (zsRE, the MALMEN paper's files): `src` -> `ans`; rephrases: `rephrase`; locality: `loc` ->
      `loc_ans`.
    - `"fever"` (FEVER fact checking, for a binary classifier head): `prompt` -> `alt`; rephrases: `equiv_prompt`;
      locality: `unrel_prompt` -> `unrel_ans`. `alt` and `unrel_ans` must be `"SUPPORTS"` or `"REFUTES"`.
    - `"generic"`: `EditRequest`'s own field names: `prompt`, `target`, and optionally `rephrases` (a string or a
      list of strings), `locality_prompt` and `locality_answer` (given together), `ground_truth`, `subject`. Any
      other key is an error.

    In every format but `"generic"` all five keys are required ([`FORMATS`] lists the required keys). A rephrase key
    may hold one string or a list of strings. A key whose value is `null` counts as missing.

    Args:
        path (`str` or `os.PathLike`):
            A `.json` file holding an array of records, or a JSON Lines file with one record per line.
        format (`str`, *optional*, defaults to `"auto"`):
            One of `"counterfact"`, `"zsre"`, `"zsre_paper"`, `"fever"`, `"generic"`, or `"auto"`: the format whose
            required keys are all present (and not `null`) in the first record. No match, or more than one, is an
            error that asks for an explicit `format`.
        limit (`int`, *optional*):
            Read only the first `limit` records.
        skip_invalid (`bool`, *optional*, defaults to `False`):
            Leave malformed records out instead of failing, with a warning that counts them and names the first
            few (for public files with a few broken records, such as an empty zsRE target).

    Returns:
        `list[EditRequest]`: One request per record, in file order. Nothing is skipped unless `skip_invalid`.

    Raises:
        `FileNotFoundError`: If `path` is not a file.
        `ValueError`: If the file is not JSON, holds no records, its format is unknown or cannot be detected, or a
            record is malformed. The message names the file, the record's index (from 0) and the key, e.g.
            `"data/cf.json, record 3: missing key 'target_new'"`.

    Example:

    ```python
    >>> from malmen_hf.data import load_edit_requests
    >>> requests = load_edit_requests("../shared/data/counterfact/train.json", limit=2)
    >>> requests[0].prompt, requests[0].target
    ('Toko Yasuda, the', 'piano')
    ```
    """
    _check_arguments(format, limit)
    path = os.fspath(path)
    records = _read_records(path)
    layout = _LAYOUTS[_detect_format(path, records[0]) if format == "auto" else format]
    requests, errors = [], []
    for index, record in enumerate(islice(records, limit)):
        try:
            requests.append(_to_edit_request(path, index, record, layout))
        except ValueError as error:
            if not skip_invalid:
                raise
            errors.append(str(error))
    if errors:
        shown = "; ".join(errors[:3]) + ("; ..." if len(errors) > 3 else "")
        warnings.warn(f"{path}: skipped {len(errors)} malformed record(s): {shown}", stacklevel=2)
    if not requests:
        raise ValueError(f"{path}: no valid record (all {len(errors)} were malformed)")
    return requests


def _check_arguments(format: str, limit: int | None) -> None:
    if format != "auto" and format not in _LAYOUTS:
        raise ValueError(f"Unknown format {format!r}: use 'auto' or one of {_describe_formats()}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer or None, got {limit!r}")


def _describe_formats() -> str:
    return "; ".join(f"{name!r} (required keys: {', '.join(keys)})" for name, keys in FORMATS.items())


def _read_records(path: str) -> list[dict[str, Any]]:
    """The records of a JSON array file or a JSON Lines file, in file order, read with the standard library."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such data file: '{path}'")
    try:
        with open(path, encoding="utf-8-sig") as file:  # a leading byte order mark is no part of the JSON
            records = _parse_records(file.read())
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: cannot be read as a JSON array of records or as JSON Lines ({error})") from None
    if not records:
        raise ValueError(f"{path}: the file holds no records")
    return records


def _parse_records(text: str) -> list[dict[str, Any]]:
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:  # its own message would say "line 1" of the one line it saw
                raise ValueError(f"line {number} column {error.colno}: {error.msg}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {index} is {json.dumps(record)[:80]}, not an object")
    return records


def _detect_format(path: str, record: Mapping[str, Any]) -> str:
    # A key whose value is null counts as missing, as it does in every record.
    keys = sorted(key for key, value in record.items() if value is not None)
    matches = [name for name, required in FORMATS.items() if set(required) <= set(keys)]
    if len(matches) == 1:
        return matches[0]
    problem = f"match several formats {matches}" if matches else "match no known format"
    raise ValueError(
        f"{path}: the keys of record 0 {keys} {problem}; pass `format=` explicitly. "
        f"Known formats: {_describe_formats()}"
    )


def _to_edit_request(path: str, index: int, record: Mapping[str, Any], layout: _Layout) -> EditRequest:
    try:
        return EditRequest(**_fields(record, layout))
    except ValueError as error:
        raise ValueError(f"{path}, record {index}: {error}") from None


def _fields(record: Mapping[str, Any], layout: _Layout) -> dict[str, Any]:
    """The `EditRequest` keyword arguments of one record, checked key by key so errors name the file's keys."""
    if layout.closed:
        _reject_unknown_keys(record, layout)
    fields = {}
    for field, key in layout.keys().items():
        value = record.get(key)
        if value is None:
            if key in layout.required():
                raise ValueError(f"missing key {key!r}")
            continue
        if field == "rephrases":
            fields[field] = _rephrases(key, value)
        elif field == "ground_truth" and isinstance(value, list):
            answers = _rephrases(key, value)
            if not answers:
                raise ValueError(f"{key!r} must hold at least one answer, got []")
            fields[field] = answers[0]  # zsRE's `answers`: the first is the one the model should give
        else:
            fields[field] = _text(key, value)
    for field in ("target", "locality_answer"):
        if layout.labels and fields[field] not in layout.labels:
            key = layout.keys()[field]
            raise ValueError(f"{key!r} must be {' or '.join(layout.labels)}, got {fields[field]!r}")
    return fields


def _reject_unknown_keys(record: Mapping[str, Any], layout: _Layout) -> None:
    unknown = sorted(key for key, value in record.items() if value is not None and key not in layout.keys().values())
    if unknown:
        raise ValueError(f"unknown keys {unknown}; the keys of a generic record are {list(layout.keys().values())}")


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {value!r}")
    if not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _rephrases(key: str, value: Any) -> tuple[str, ...]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) and text.strip() for text in texts):
        raise ValueError(f"{key!r} must be a non-empty string or a list of them, got {value!r}")
    return tuple(texts)
