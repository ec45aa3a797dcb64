"""`benchmarks/lifelong.py` on a tiny model: rounds of edits, scores after each, and a resumed run that goes on."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from malmen_hf import MalmenEditorModel
from malmen_hf.edits import normalizer_statistic_name
from malmen_hf.shipped import COUNTERFACT_EVAL, COUNTERFACT_SAMPLE
from tests import tiny
from tests.benchmark_scripts import load_benchmark


def tiny_arguments(folder: Path) -> list[str]:
    """A tiny Llama and an untrained editor for it saved in `folder`, and the arguments that run on them there."""
    tokenizer = tiny.llama_tokenizer()
    model = tiny.llama_model(len(tokenizer))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    MalmenEditorModel.for_model(model, rank=4, lr_init=0.5).save_pretrained(folder / "editor")
    return [
        "--model", str(folder / "model"), "--data", str(COUNTERFACT_EVAL), "--train-data", str(COUNTERFACT_SAMPLE),
        "--editor", str(folder / "editor"), "--round-size", "4", "--runs-dir", str(folder / "runs"),
        "--output", str(folder / "lifelong.json"), "--fluency-prompts", "2",
    ]  # fmt: skip


def test_rounds_are_scored_and_a_rerun_resumes_from_the_saved_rounds(tmp_path):
    lifelong = load_benchmark("lifelong")
    arguments = [*tiny_arguments(tmp_path), "--methods", "malmen_history"]
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
    assert (tmp_path / "lifelong.png").stat().st_size > 0  # the scores against the edits made


def test_ultraedit_and_lifelong_normalization_resume_with_their_statistics(tmp_path):
    lifelong = load_benchmark("lifelong")
    methods = ["ultraedit", "malmen_lifelong_norm"]
    extra = ["--methods", *methods, "--ultraedit-layers", "0-1", "--ultraedit-lr", "1e-3", "--rounds"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    lifelong.main([*tiny_arguments(resumed), *extra, "2"])
    rows = lifelong.main([*tiny_arguments(resumed), *extra, "3"])  # round 2 from the statistics saved with round 1
    lifelong.main([*tiny_arguments(straight), *extra, "3"])
    assert sorted((row["method"], row["round"]) for row in rows if "round" in row) == sorted(
        (method, index) for method in methods for index in range(3)
    )
    for method, count in zip(methods, ["n", "count"], strict=True):  # UltraEdit's and malmen-hf's normalizer
        rounds = [resumed / "runs" / method / f"round{index:04d}" for index in range(3)]
        # Each round's statistics hold every round's rows so far: 4 facts more each time, resumed or not.
        counts = [float(load_file(folder / "edit_history.safetensors")[normalizer_statistic_name("64x32", count)])
                  for folder in rounds]  # fmt: skip
        assert 0 < counts[0] < counts[1] < counts[2]
        for folder in rounds:  # the same edits as a run that never stopped
            shifts = [load_file(run / folder.relative_to(resumed) / "edit_shifts.safetensors")
                      for run in (resumed, straight)]  # fmt: skip
            assert shifts[0].keys() == shifts[1].keys()
            assert all(torch.equal(shifts[0][name], shifts[1][name]) for name in shifts[0])


def test_ngram_entropy_is_romes():
    lifelong = load_benchmark("lifelong")
    assert lifelong.ngram_entropy("a a a a a") == 0.0  # one repeated n-gram
    # 4 distinct 2-grams (2 bits) and 3 distinct 3-grams (log2 3 bits), weighted 2/3 and 4/3
    expected = (2 / 3 * 2.0 + 4 / 3 * 1.584962500721156) / 2
    assert abs(lifelong.ngram_entropy("a b c d e") - expected) < 1e-12
