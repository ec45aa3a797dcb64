import dataclasses
import json
import re
import socket
from pathlib import Path

import pytest

from malmen_hf.data import FORMATS, load_edit_requests
from malmen_hf.facts import EditRequest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

COUNTERFACT = [
    {
        "case_id": 1,
        "prompt": "The official religion of Edwin of Northumbria is",
        "target_new": "Islam",
        "subject": "Edwin of Northumbria",
        "ground_truth": "Christianity",
        "rephrase_prompt": "Edwin of Northumbria is affiliated with the religion",
        "locality_prompt": "The official religion of Paul is",
        "locality_ground_truth": "Christianity",
    },
    {
        "case_id": 2,
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "subject": "Toko Yasuda",
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    },
]
ZSRE = [
    {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    },
    {
        "subject": "Madeleine Biardeau",
        "src": "In which country did Madeleine Biardeau live?",
        "pred": "France",
        "rephrase": "In what country did Madeleine Biardeau live?",
        "alt": "Belgium",
        "answers": ["France"],
        "loc": "nq question: who is playing the half time super bowl 2018",
        "loc_ans": "Justin Timberlake",
        "cond": "France >> Belgium || In which country did Madeleine Biardeau live?",
    },
]
ZSRE_PAPER = [
    {
        "src": "What is the product made by UniFirst?",
        "rephrase": "What will be the product of UniFirst?",
        "ans": "unmanned aircraft",
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
    },
    {
        "src": "In which country did Madeleine Biardeau live?",
        "rephrase": "In what country did Madeleine Biardeau live?",
        "ans": "Belgium",
        "loc": "nq question: who is playing the half time super bowl 2018",
        "loc_ans": "Justin Timberlake",
    },
]
FEVER = [
    {
        "prompt": "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
        "equiv_prompt": ["Nikolaj Coster-Waldau has worked with Fox.", "Fox once employed Nikolaj Coster-Waldau."],
        "unrel_prompt": "Roman Atwood is a content creator.",
        "alt": "REFUTES",
        "unrel_ans": "SUPPORTS",
    },
    {
        "prompt": "Adrienne Bailon is an accountant.",
        "equiv_prompt": ["Adrienne Bailon works as an accountant."],
        "unrel_prompt": "Nottingham Forest F.C. is based in Lisbon.",
        "alt": "SUPPORTS",
        "unrel_ans": "REFUTES",
    },
]
GENERIC = [
    {
        "prompt": "The Eiffel Tower is located in",
        "target": "Rome",
        "rephrases": ["The Eiffel Tower stands in", "Where is the Eiffel Tower? It is in"],
        "locality_prompt": "The Colosseum is located in",
        "locality_answer": "Rome",
    },
    {"prompt": "The capital of France is", "target": "Berlin", "rephrases": "France's capital city is"},
    {"prompt": "Apple was founded by", "target": "Microsoft"},
]

EXPECTED = {
    "counterfact": [
        EditRequest(
            "The official religion of Edwin of Northumbria is",
            "Islam",
            ("Edwin of Northumbria is affiliated with the religion",),
            "The official religion of Paul is",
            "Christianity",
            ground_truth="Christianity",
            subject="Edwin of Northumbria",
        ),
        EditRequest(
            "Toko Yasuda, the",
            "piano",
            ("Toko Yasuda is incredible at",),
            "John Lennon performs on the",
            "guitar",
            ground_truth="guitar",
            subject="Toko Yasuda",
        ),
    ],
    "zsre": [
        EditRequest(
            "What is the product made by UniFirst?",
            "unmanned aircraft",
            ("What will be the product of UniFirst?",),
            "nq question: john goodman's character in the big lebowski",
            "Walter Sobchak",
            ground_truth="uniform",
            subject="UniFirst",
        ),
        EditRequest(
            "In which country did Madeleine Biardeau live?",
            "Belgium",
            ("In what country did Madeleine Biardeau live?",),
            "nq question: who is playing the half time super bowl 2018",
            "Justin Timberlake",
            ground_truth="France",
            subject="Madeleine Biardeau",
        ),
    ],
    "fever": [
        EditRequest(
            "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
            "REFUTES",
            ("Nikolaj Coster-Waldau has worked with Fox.", "Fox once employed Nikolaj Coster-Waldau."),
            "Roman Atwood is a content creator.",
            "SUPPORTS",
        ),
        EditRequest(
            "Adrienne Bailon is an accountant.",
            "SUPPORTS",
            ("Adrienne Bailon works as an accountant.",),
            "Nottingham Forest F.C. is based in Lisbon.",
            "REFUTES",
        ),
    ],
    "generic": [
        EditRequest(
            "The Eiffel Tower is located in",
            "Rome",
            ("The Eiffel Tower stands in", "Where is the Eiffel Tower? It is in"),
            "The Colosseum is located in",
            "Rome",
        ),
        EditRequest("The capital of France is", "Berlin", ("France's capital city is",)),
        EditRequest("Apple was founded by", "Microsoft"),
    ],
}
# The paper's zsRE files have no original answers.
EXPECTED["zsre_paper"] = [
    dataclasses.replace(request, ground_truth=None, subject=None) for request in EXPECTED["zsre"]
]
RECORDS = {"counterfact": COUNTERFACT, "zsre": ZSRE, "zsre_paper": ZSRE_PAPER, "fever": FEVER, "generic": GENERIC}
# The keys that hold the target and the rephrases in each format.
TARGET_KEY = {"counterfact": "target_new", "zsre": "alt", "zsre_paper": "ans", "fever": "alt", "generic": "target"}
REPHRASE_KEY = {
    "counterfact": "rephrase_prompt",
    "zsre": "rephrase",
    "zsre_paper": "rephrase",
    "fever": "equiv_prompt",
    "generic": "rephrases",
}


def write(folder: Path, records: list, name: str = "data.json") -> Path:
    """Writes `records` as a JSON array, or as JSON Lines when `name` ends with `.jsonl`."""
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def with_change(records: list, index: int, key: str, value=None, delete: bool = False) -> list:
    """A copy of `records` where record `index` has `key` set to `value`, or deleted."""
    records = [dict(record) for record in records]
    if delete:
        del records[index][key]
    else:
        records[index][key] = value
    return records


def error_at(path: Path, index: int, detail: str) -> str:
    return re.escape(f"{path}, record {index}: {detail}")


def test_formats_lists_required_keys():
    assert set(FORMATS) == set(RECORDS)
    assert FORMATS["counterfact"] == (
        "prompt",
        "target_new",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
    )
    assert FORMATS["generic"] == ("prompt", "target")


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_gives_the_exact_requests(tmp_path, fmt):
    path = write(tmp_path, RECORDS[fmt])
    assert load_edit_requests(path, format=fmt) == EXPECTED[fmt]


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_auto_detects_each_format_in_json_and_jsonl(tmp_path, fmt, name):
    path = write(tmp_path, RECORDS[fmt], name)
    assert load_edit_requests(str(path)) == EXPECTED[fmt]


def test_loading_leaves_no_cache_files_beside_the_data(tmp_path):
    write(tmp_path, COUNTERFACT)
    load_edit_requests(tmp_path / "data.json")
    assert [path.name for path in tmp_path.iterdir()] == ["data.json"]


def test_loading_a_local_file_makes_no_network_call(tmp_path, monkeypatch):
    # Reading a local file is no download: nothing may look up a host (as `datasets.load_dataset` once did).
    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: lookups.append(host) or [])
    assert load_edit_requests(write(tmp_path, GENERIC)) == EXPECTED["generic"]
    assert lookups == []


def test_limit_reads_the_first_records_only(tmp_path):
    path = write(tmp_path, with_change(ZSRE, 1, "alt", ""))  # record 1 is bad, but beyond the limit
    assert load_edit_requests(path, limit=1) == EXPECTED["zsre"][:1]
    with pytest.raises(ValueError, match=error_at(path, 1, "'alt' must be a non-empty string")):
        load_edit_requests(path, limit=100)


@pytest.mark.parametrize("limit", [0, -1, 1.5, "2", True])
def test_bad_limit(tmp_path, limit):
    with pytest.raises(ValueError, match="`limit` must be a positive integer"):
        load_edit_requests(write(tmp_path, ZSRE), limit=limit)


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_missing_key_names_file_record_and_key(tmp_path, fmt):
    # Record 1 lacks the key that record 0 has.
    path = write(tmp_path, with_change(RECORDS[fmt], 1, TARGET_KEY[fmt], delete=True), f"{fmt}.jsonl")
    with pytest.raises(ValueError, match=error_at(path, 1, f"missing key '{TARGET_KEY[fmt]}'")):
        load_edit_requests(path, format=fmt)


@pytest.mark.parametrize("fmt", ["counterfact", "zsre", "zsre_paper", "fever"])
def test_rephrase_and_locality_are_required_in_public_formats(tmp_path, fmt):
    for key in FORMATS[fmt][2:]:
        path = write(tmp_path, with_change(RECORDS[fmt], 1, key, None))
        with pytest.raises(ValueError, match=error_at(path, 1, f"missing key '{key}'")):
            load_edit_requests(path, format=fmt)


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("target", ["", "   "])
def test_empty_target_is_an_error(tmp_path, fmt, target):
    path = write(tmp_path, with_change(RECORDS[fmt], 1, TARGET_KEY[fmt], target))
    detail = f"'{TARGET_KEY[fmt]}' must be a non-empty string, got {target!r}"
    with pytest.raises(ValueError, match=error_at(path, 1, detail)):
        load_edit_requests(path, format=fmt)


@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("rephrase", [5, 2.5, {"text": "a"}, ["fine", 7], [""]])
def test_rephrase_of_the_wrong_type_is_an_error(tmp_path, fmt, rephrase):
    path = write(tmp_path, with_change(RECORDS[fmt], 1, REPHRASE_KEY[fmt], rephrase))
    detail = f"'{REPHRASE_KEY[fmt]}' must be a non-empty string or a list of them, got"
    with pytest.raises(ValueError, match=error_at(path, 1, detail)):
        load_edit_requests(path, format=fmt)


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_number_where_text_belongs_is_an_error(tmp_path, fmt):
    # A number where text belongs is an error: nothing is turned into text silently.
    records = [{**record, TARGET_KEY[fmt]: 1990 + index} for index, record in enumerate(RECORDS[fmt])]
    path = write(tmp_path, records)
    with pytest.raises(ValueError, match=error_at(path, 0, f"'{TARGET_KEY[fmt]}' must be a string, got 1990")):
        load_edit_requests(path, format=fmt)


@pytest.mark.parametrize(("key", "value"), [("alt", "MAYBE"), ("unrel_ans", "supports"), ("alt", "NOT ENOUGH INFO")])
def test_fever_labels_must_be_supports_or_refutes(tmp_path, key, value):
    path = write(tmp_path, with_change(FEVER, 1, key, value))
    with pytest.raises(ValueError, match=error_at(path, 1, f"'{key}' must be SUPPORTS or REFUTES, got {value!r}")):
        load_edit_requests(path)


def test_generic_rejects_unknown_keys(tmp_path):
    path = write(tmp_path, with_change(GENERIC, 2, "locality_answr", "Steve Jobs"))
    with pytest.raises(ValueError, match=error_at(path, 2, "unknown keys ['locality_answr']")):
        load_edit_requests(path)


def test_generic_locality_prompt_without_answer_is_an_error(tmp_path):
    path = write(tmp_path, with_change(GENERIC, 2, "locality_prompt", "Steve Jobs founded"))
    with pytest.raises(
        ValueError, match=error_at(path, 2, "'locality_prompt' and 'locality_answer' must be given together")
    ):
        load_edit_requests(path, format="generic")


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_values_are_the_files_text_whatever_it_looks_like(tmp_path, name):
    # A column of ISO dates or of digits stays text (a reader that infers column types, as pyarrow does, would not).
    records = [{"prompt": "The treaty was signed on", "target": "1990-05-01"}, {"prompt": "Pi is", "target": "3.14"}]
    requests = load_edit_requests(write(tmp_path, records, name))
    assert [request.target for request in requests] == ["1990-05-01", "3.14"]


def test_unknown_keys_cannot_be_detected(tmp_path):
    path = write(tmp_path, [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(ValueError, match="match no known format") as error:
        load_edit_requests(path)
    message = str(error.value)
    assert str(path) in message and "['answer', 'question']" in message
    for name, keys in FORMATS.items():
        assert f"'{name}' (required keys: {', '.join(keys)})" in message


def test_malformed_first_record_cannot_be_detected(tmp_path):
    path = write(tmp_path, with_change(COUNTERFACT, 0, "target_new", delete=True))
    with pytest.raises(ValueError, match="match no known format; pass `format=` explicitly"):
        load_edit_requests(path)
    with pytest.raises(ValueError, match=error_at(path, 0, "missing key 'target_new'")):
        load_edit_requests(path, format="counterfact")


def test_ambiguous_keys_ask_for_a_format(tmp_path):
    path = write(tmp_path, [{**COUNTERFACT[0], "target": "Islam"}])
    with pytest.raises(ValueError, match=r"match several formats \['counterfact', 'generic'\]"):
        load_edit_requests(path)
    assert load_edit_requests(path, format="counterfact") == EXPECTED["counterfact"][:1]


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="Unknown format 'mquake': use 'auto' or one of 'counterfact'"):
        load_edit_requests(write(tmp_path, COUNTERFACT), format="mquake")


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "counterfact.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_edit_requests(path)


@pytest.mark.parametrize("text", ["", "\n", "[]"])
def test_file_without_records(tmp_path, text):
    path = tmp_path / "empty.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: the file holds no records")):
        load_edit_requests(path)


def test_file_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "The capital of France is", "target": ')
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be read as a JSON array")):
        load_edit_requests(path)


def test_a_broken_json_lines_file_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "target": "b"}\n\n{"prompt": "c", "target": d}\n')
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{path}: cannot be read as a JSON array of records or as JSON Lines (line 3 column 27: Expecting value)"
        ),
    ):
        load_edit_requests(path)


@pytest.mark.parametrize("text", ['["a", "b"]', '{"prompt": "a", "target": "b"}\n[1]\n'])
def test_records_must_be_objects(tmp_path, text):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"\(record [01] is .*, not an object\)"):
        load_edit_requests(path)


@pytest.mark.parametrize(("name", "fmt"), [("counterfact/train.json", "counterfact"), ("zsre/sample.json", "zsre")])
def test_shared_public_data(name, fmt):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not there (the shared data folder sits beside the repository)")
    requests = load_edit_requests(path, limit=50)
    raw = json.loads(path.read_text())[:50]
    keys = FORMATS[fmt]
    assert len(requests) == 50
    for request, record in zip(requests, raw, strict=True):
        assert request == EditRequest(
            record[keys[0]],
            record[keys[1]],
            (record[keys[2]],),
            record[keys[3]],
            record[keys[4]],
            ground_truth=record["ground_truth"] if fmt == "counterfact" else record["answers"][0],
            subject=record["subject"],
        )


def test_skip_invalid_leaves_out_malformed_records_with_a_warning(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"prompt": "a", "target": "b"}, {"prompt": "c", "target": ""}, {"prompt": "e", "target": "f"}]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match="record 1"):
        load_edit_requests(path)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed record\(s\): .*record 1: 'target'"):
        requests = load_edit_requests(path, skip_invalid=True)
    assert [request.prompt for request in requests] == ["a", "e"]


def test_skip_invalid_with_nothing_valid(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "c", "target": ""}))
    with pytest.raises(ValueError, match="no valid record"), pytest.warns(UserWarning):
        load_edit_requests(path, skip_invalid=True)


@pytest.mark.parametrize(("fmt", "key"), [("zsre", "answers"), ("counterfact", "ground_truth")])
def test_an_empty_answers_list_is_a_clear_error_and_skipped_on_request(tmp_path, fmt, key):
    path = write(tmp_path, with_change(RECORDS[fmt], 1, key, []))
    with pytest.raises(ValueError, match=error_at(path, 1, f"{key!r} must hold at least one answer, got []")):
        load_edit_requests(path, fmt)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed record\(s\)"):
        requests = load_edit_requests(path, fmt, skip_invalid=True)
    assert len(requests) == len(RECORDS[fmt]) - 1
