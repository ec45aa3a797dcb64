"""`benchmarks/edit_speed.py` on a tiny model: repeated measurements are reported as medians of side-by-side runs."""

import json
import statistics

from tests import tiny
from tests.benchmark_scripts import load_benchmark
from tests.conftest import FACTS


def tiny_model_arguments(tmp_path) -> list[str]:
    """A random tiny GPT-2 (config folder), its tokenizer and the test facts, as `edit_speed.py` arguments."""
    tokenizer = tiny.gpt2_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny.gpt2_model(len(tokenizer)).config.save_pretrained(tmp_path / "model")
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": prompt, "target_new": target} for prompt, target in FACTS]))
    return ["--model", str(tmp_path / "model"), "--random-weights", "--tokenizer", str(tmp_path / "tokenizer"),
            "--data", str(data), "--device", "cpu", "--output", str(tmp_path / "speed.json")]  # fmt: skip


def test_repeats_report_the_medians_of_ratios_measured_side_by_side(tmp_path):
    edit_speed = load_benchmark("edit_speed")
    report = edit_speed.main([*tiny_model_arguments(tmp_path), "--n", "3", "--floors", "forward", "--repeats", "3"])

    (row,) = report["results"]
    assert len(row["repeats"]) == 3
    ratios = [repeat["edit_total_s"] / repeat["forward_s"] for repeat in row["repeats"]]
    assert [repeat["edit_over_forward"] for repeat in row["repeats"]] == ratios
    assert row["edit_over_forward"] == statistics.median(ratios)
    assert row["forward_s"] == statistics.median(repeat["forward_s"] for repeat in row["repeats"])
    assert json.loads((tmp_path / "speed.json").read_text())["results"][0]["repeats"] == row["repeats"]


def test_the_paired_forward_runs_once_per_batch_inside_the_edit(tmp_path):
    edit_speed = load_benchmark("edit_speed")
    cache = edit_speed.caching.cache_keys_and_value_grads
    report = edit_speed.main([*tiny_model_arguments(tmp_path), "--n", "5", "--batch-size", "2", "--floors", "paired"])

    (row,) = report["results"]
    assert row["paired_batches"] == 3  # 5 facts in batches of 2
    assert row["paired_forward_s"] > 0 and row["paired_edit_s"] > 0
    assert row["edit_over_paired_forward"] == row["paired_edit_s"] / row["paired_forward_s"]
    assert "edit_total_s" in row and "forward_s" not in row  # the EDIT alone still runs, for its phases and memory
    assert edit_speed.caching.cache_keys_and_value_grads is cache
