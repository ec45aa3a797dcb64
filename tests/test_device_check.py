"""The CPU path of `benchmarks/device_check.py`: the steps a lent GPU machine runs, on a tiny model."""

import json
import re
import subprocess
import sys

from tests import tiny
from tests.benchmark_scripts import load_benchmark
from tests.conftest import FACTS


def test_device_check_runs_its_steps_on_the_cpu(tmp_path, monkeypatch):
    carried = tmp_path / "carried"  # what `prepare` makes, without the wheels (the installed packages are used)
    tiny.gpt2_tokenizer().save_pretrained(carried / "tokenizer")
    facts = [{"prompt": prompt, "target_new": target} for prompt, target in FACTS]
    (carried / "counterfact.json").write_text(json.dumps(facts))
    monkeypatch.setattr(sys, "argv", ["device_check.py"])
    device_check = load_benchmark("device_check")

    summary = device_check.run(
        device_check.parse_args(
            ["run", "--carried", str(carried), "--output-dir", str(tmp_path / "out"), "--device", "cpu",
             "--model-size", "tiny", "--dtype", "float32", "--n", "3", "7"]
        )
    )  # fmt: skip

    assert summary["ok"], json.dumps(summary, indent=2)
    assert json.loads((tmp_path / "out" / "device_check.json").read_text()) == summary
    tests = summary["steps"]["tests"]
    # Without CUDA every device test is collected and skipped; with it they run (and must pass).
    assert tests["tests"] > 10 and tests["failures"] == tests["errors"] == 0
    speed = summary["steps"]["speed"]
    assert speed["settings"]["random_weights"] and speed["settings"]["dtype"] == "torch.float32"
    assert [row["n"] for row in speed["results"]] == [3, 7]
    for row in speed["results"]:
        assert row["edit_total_s"] > 0 and row["forward_s"] > 0 and row["edit_over_forward"] > 0
        assert row["tokens"] >= row["n"]
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"device_check.json", "edit_speed.json", "log.txt"}


def test_every_listed_device_test_file_holds_cuda_tests(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["device_check.py"])
    device_check = load_benchmark("device_check")
    assert "tests/test_caching.py" in device_check.DEVICE_TESTS  # the restricted backward, on the GPU too
    for path in device_check.DEVICE_TESTS:
        collected = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", path],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert collected.returncode == 0, collected.stdout + collected.stderr
        assert re.search(r"^(\d+)/\d+ tests collected", collected.stdout, re.M), (path, collected.stdout)
        assert int(re.search(r"^(\d+)/", collected.stdout, re.M).group(1)) > 0, path
