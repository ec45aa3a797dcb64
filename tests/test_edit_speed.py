"""`benchmarks/edit_speed.py` on a tiny model: repeated measurements are reported as medians of side-by-side runs."""

import json
import statistics

from tests import tiny
from tests.benchmark_scripts import load_benchmark
from tests.conftest import FACTS


def test_repeats_report_the_medians_of_ratios_measured_side_by_side(tmp_path):
    tokenizer = tiny.gpt2_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny.gpt2_model(len(tokenizer)).config.save_pretrained(tmp_path / "model")
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": prompt, "target_new": target} for prompt, target in FACTS]))
    edit_speed = load_benchmark("edit_speed")

    report = edit_speed.main(
        ["--model", str(tmp_path / "model"), "--random-weights", "--tokenizer", str(tmp_path / "tokenizer"),
         "--data", str(data), "--n", "3", "--floors", "forward", "--repeats", "3", "--device", "cpu",
         "--output", str(tmp_path / "speed.json")]
    )  # fmt: skip

    (row,) = report["results"]
    assert len(row["repeats"]) == 3
    ratios = [repeat["edit_total_s"] / repeat["forward_s"] for repeat in row["repeats"]]
    assert [repeat["edit_over_forward"] for repeat in row["repeats"]] == ratios
    assert row["edit_over_forward"] == statistics.median(ratios)
    assert row["forward_s"] == statistics.median(repeat["forward_s"] for repeat in row["repeats"])
    assert json.loads((tmp_path / "speed.json").read_text())["results"][0]["repeats"] == row["repeats"]
