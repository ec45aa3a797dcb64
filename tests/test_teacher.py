"""The teacher values' cache: the same values as computing them directly, resumed shard by shard, never mixed."""

import pytest
import torch

from malmen_hf.caching import frozen
from malmen_hf.memit import MemitSettings, optimize_residuals
from malmen_hf.training import teacher
from malmen_hf.training.teacher import teacher_values
from tests import tiny
from tests.conftest import SUBJECT_REQUESTS

REQUESTS = SUBJECT_REQUESTS[:5]
TEMPLATES = [["{}"], ["Because of Rome. {}"]]
SETTINGS = MemitSettings(num_steps=4)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny.gpt2_tokenizer()
    return tiny.gpt2_model(len(tokenizer), num_layers=3), tokenizer


def cached(model, tokenizer, folder, requests=REQUESTS, **kwargs):
    kwargs = {"residual_module": "transformer.h.1", "context_templates": TEMPLATES, "settings": SETTINGS, **kwargs}
    return teacher_values(model, tokenizer, requests, folder, chunk_size=2, **kwargs)


def test_cached_values_are_the_direct_ones_and_an_interrupted_run_resumes(model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    with frozen(model), torch.enable_grad():
        expected = optimize_residuals(
            model, tokenizer, REQUESTS, residual_module="transformer.h.1", context_templates=TEMPLATES,
            settings=SETTINGS,
        )  # fmt: skip
    first = cached(model, tokenizer, tmp_path)
    torch.testing.assert_close(first, expected)
    assert sorted(path.name for path in tmp_path.glob("values-*")) == [
        "values-0000000.safetensors", "values-0000002.safetensors", "values-0000004.safetensors",
    ]  # fmt: skip
    # A run stopped before its last shard: only that shard is computed again, and the values are the same.
    (tmp_path / "values-0000004.safetensors").unlink()
    computed = []
    original = teacher.optimize_residuals
    monkeypatch.setattr(teacher, "optimize_residuals", lambda *a, **k: computed.append(len(a[2])) or original(*a, **k))
    torch.testing.assert_close(cached(model, tokenizer, tmp_path), expected)
    assert computed == [1]
    # Everything cached: nothing is computed.
    torch.testing.assert_close(cached(model, tokenizer, tmp_path), expected)
    assert computed == [1]


def test_other_settings_or_facts_are_refused_not_mixed(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cached(model, tokenizer, tmp_path, requests=REQUESTS[:2])
    with pytest.raises(ValueError, match=r"made with other settings \(settings differ\)"):
        cached(model, tokenizer, tmp_path, settings=MemitSettings(num_steps=5))
    with pytest.raises(ValueError, match=r"made with other settings \(context_templates, residual_module differ\)"):
        cached(model, tokenizer, tmp_path, residual_module="transformer.h.0", context_templates=[["{}"]])
    with pytest.raises(ValueError, match="holds the teacher values of other facts than facts 0-1"):
        cached(model, tokenizer, tmp_path, requests=REQUESTS[1:3])
