"""`benchmarks/quality.py --resume`: which earlier rows are kept, and when an earlier run is refused."""

import json

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def run(settings: dict, rows: list, command: str = "python benchmarks/quality.py") -> dict:
    return {"command": command, "machine": {"cpu_count": 2}, "settings": settings, "rows": rows}


SETTINGS = {"n": [1, 10], "methods": ["malmen", "no_edit"], "tune": True, "ft_lr": 5e-4, "resume": False}


def test_resume_keeps_earlier_rows_and_their_provenance(quality, tmp_path):
    path = tmp_path / "quality.json"
    earlier_rows = [{"method": "malmen", "n": 1, "ES": 0.8}, {"method": "no_edit", "n": 1, "ES": 0.0}]
    path.write_text(json.dumps(run(SETTINGS, earlier_rows, command="python benchmarks/quality.py --n 1")))

    # More N and methods only add rows to measure: the earlier rows stay valid.
    settings = {**SETTINGS, "n": [1, 10, 10000], "methods": ["malmen", "mend", "no_edit"], "resume": True}
    merged = quality.resumed(run(settings, []), path)

    assert merged["rows"] == earlier_rows
    assert merged["settings"] == settings
    assert merged["earlier_runs"] == [{"command": "python benchmarks/quality.py --n 1", "machine": {"cpu_count": 2}}]


def test_resume_without_earlier_file_measures_everything(quality, tmp_path):
    results = run(SETTINGS, [])
    assert quality.resumed(results, tmp_path / "missing.json") is results


def test_resume_refuses_rows_measured_with_other_settings(quality, tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(run(SETTINGS, [{"method": "malmen", "n": 1, "ES": 0.8}])))
    before = path.read_bytes()
    with pytest.raises(SystemExit, match=r"other settings \(ft_lr, tune\); drop --resume"):
        quality.resumed(run({**SETTINGS, "ft_lr": 1e-3, "tune": False}, []), path)
    assert path.read_bytes() == before
