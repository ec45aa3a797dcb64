"""`benchmarks/lifelong.py` on a tiny model: rounds of edits, scores after each, and a resumed run that goes on."""

import json

from malmen_hf import MalmenEditorModel
from malmen_hf.shipped import COUNTERFACT_EVAL, COUNTERFACT_SAMPLE
from tests import tiny
from tests.benchmark_scripts import load_benchmark


def test_rounds_are_scored_and_a_rerun_resumes_from_the_saved_rounds(tmp_path):
    lifelong = load_benchmark("lifelong")
    tokenizer = tiny.llama_tokenizer()
    model = tiny.llama_model(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    MalmenEditorModel.for_model(model, rank=4, lr_init=0.5).save_pretrained(tmp_path / "editor")
    arguments = [
        "--model", str(tmp_path / "model"), "--data", str(COUNTERFACT_EVAL), "--train-data", str(COUNTERFACT_SAMPLE),
        "--editor", str(tmp_path / "editor"), "--methods", "malmen_history", "--round-size", "4",
        "--runs-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "lifelong.json"), "--fluency-prompts", "2",
    ]  # fmt: skip
    lifelong.main([*arguments, "--rounds", "2"])
    rows = lifelong.main([*arguments, "--rounds", "3"])  # goes on from the two saved rounds
    rounds = [row for row in rows if row["method"] == "malmen_history" and "round" in row]
    assert [(row["round"], row["edited"]) for row in rounds] == [(0, 4), (1, 8), (2, 12)]
    assert all(0 <= row[name] <= 1 for row in rounds for name in ("ES", "GS", "LS", "first_ES"))
    assert sorted(path.name for path in (tmp_path / "runs" / "malmen_history").iterdir()) == [
        "round0000", "round0001", "round0002",
    ]  # fmt: skip
    assert (tmp_path / "runs" / "malmen_history" / "round0002" / "edit_history.safetensors").is_file()
    finals = [row for row in rows if "fluency" in row]
    assert [row["method"] for row in finals] == ["unedited", "malmen_history"]
    assert json.loads((tmp_path / "lifelong.json").read_text())["rows"] == rows


def test_ngram_entropy_is_romes():
    lifelong = load_benchmark("lifelong")
    assert lifelong.ngram_entropy("a a a a a") == 0.0  # one repeated n-gram
    # 4 distinct 2-grams (2 bits) and 3 distinct 3-grams (log2 3 bits), weighted 2/3 and 4/3
    expected = (2 / 3 * 2.0 + 4 / 3 * 1.584962500721156) / 2
    assert abs(lifelong.ngram_entropy("a b c d e") - expected) < 1e-12
