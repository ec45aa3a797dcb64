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


def test_the_paired_forward_runs_once_per_batch_inside_the_edit(tmp_path, monkeypatch):
    edit_speed = load_benchmark("edit_speed")
    # A clock that only the plain forwards (1 s each) and the edit's cached passes (0.25 s each) move.
    clock = [0.0]
    monkeypatch.setattr(edit_speed.time, "perf_counter", lambda: clock[0])
    plain_forward, cache = edit_speed.plain_forward, edit_speed.caching.cache_keys_and_value_grads
    model_passes = []

    def timed_plain_forward(model, *args, **kwargs):
        hook = model.register_forward_hook(lambda *_: model_passes.append(1))
        try:
            plain_forward(model, *args, **kwargs)  # it must really run the model
        finally:
            hook.remove()
        clock[0] += 1.0

    def timed_cache(*args, **kwargs):
        clock[0] += 0.25
        return cache(*args, **kwargs)

    monkeypatch.setattr(edit_speed, "plain_forward", timed_plain_forward)
    monkeypatch.setattr(edit_speed.caching, "cache_keys_and_value_grads", timed_cache)
    report = edit_speed.main([*tiny_model_arguments(tmp_path), "--n", "5", "--batch-size", "2", "--floors", "paired"])

    (row,) = report["results"]
    assert row["paired_batches"] == 3 and len(model_passes) == 3  # 5 facts in batches of 2, one forward each
    assert row["paired_forward_s"] == 3.0
    assert row["paired_edit_s"] == 0.75  # the EDIT's 3.75 s less the forwards run inside it
    assert row["edit_over_paired_forward"] == 0.25
    assert "edit_total_s" in row and "forward_s" not in row  # the EDIT alone still runs, for its phases and memory
    assert edit_speed.caching.cache_keys_and_value_grads is timed_cache  # restored after the paired EDIT


def test_repeats_alternate_which_runs_first(tmp_path, monkeypatch):
    edit_speed = load_benchmark("edit_speed")
    order = []
    measures = ["edit_total_s", "caching_s", "hypernetwork_s", "solve_and_apply_s", "edit_other_s", "edit_peak_mb"]
    monkeypatch.setattr(edit_speed, "run_edit", lambda *a, **k: order.append("edit") or dict.fromkeys(measures, 1.0))
    forward = lambda *a, **k: order.append("forward") or {"forward_s": 1.0}  # noqa: E731
    monkeypatch.setitem(edit_speed.FLOORS, "forward", (forward, "forward_s", "edit_over_forward"))
    edit_speed.main([*tiny_model_arguments(tmp_path), "--n", "3", "--floors", "forward", "--repeats", "3"])
    # After the warm-up (edit, then forward): the EDIT first, then the floor first, then the EDIT first again.
    assert order == ["edit", "forward", "edit", "forward", "forward", "edit", "edit", "forward"]
