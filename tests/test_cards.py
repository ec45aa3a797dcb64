import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from malmen_hf import MalmenConfig, MalmenEditorModel
from malmen_hf.evaluation.cards import card_results, editor_card

RESULTS = [{"n": 1, "ES": 1.0, "GS": 0.5, "LS": 0.875}, {"n": 100, "ES": 0.91, "GS": 0.25, "LS": None}]


def test_editor_card_metadata_and_tables(gpt2, tmp_path):
    model, _ = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, base_model_name_or_path="smollm2-135m")
    editor.config.training = {"facts_per_step": 32, "meta_lr": 5e-5, "output_dir": "runs/x"}
    card = editor_card(editor, RESULTS, editor_id="org/editor", dataset="counterfact", results_command="make bench")

    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()  # the YAML metadata survives a round trip
    assert data["library_name"] == "malmen-hf"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the short name's Hub id
    assert data["datasets"] == ["counterfact"] and data["license"] == "apache-2.0"
    assert {"model-editing", "malmen", "least-squares"} <= set(data["tags"])
    index = data["model-index"][0]
    assert index["name"] == "org/editor"
    metrics = {(r["dataset"]["config"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert metrics == {("N=1", "ES"): 1.0, ("N=1", "GS"): 0.5, ("N=1", "LS"): 0.875, ("N=100", "ES"): 0.91,
                       ("N=100", "GS"): 0.25}  # fmt: skip

    text = card.content
    assert "| N | ES | GS | LS |" in text and "| 100 | 0.910 | 0.250 |  |" in text
    assert "| facts_per_step | `32` |" in text and "output_dir" not in text
    assert 'MalmenEditorModel.from_pretrained("org/editor")' in text
    assert "Measured with `make bench`" in text


def test_card_results_reads_back_the_rows_of_the_cards_dataset(gpt2, tmp_path):
    model, _ = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4)
    editor_card(editor, RESULTS, dataset="counterfact").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    rows = [{"n": 1, "ES": 1.0, "GS": 0.5, "LS": 0.875}, {"n": 100, "ES": 0.91, "GS": 0.25}]  # None is no result
    assert card_results(card) == card_results(card, "counterfact") == rows
    assert card_results(card, "zsre") == []


def test_editor_card_without_results_or_training(gpt2):
    model, _ = gpt2
    card = editor_card(MalmenEditorModel.for_model(model, rank=4))
    assert "model-index" not in card.data.to_dict()
    assert "## Results" not in card.content and "## Training" not in card.content


GOLDEN = Path(__file__).parent / "golden" / "editor_card.md"


def test_golden_card():
    """The whole rendered card, compared with the reviewed copy (regenerate it with UPDATE_GOLDEN=1)."""
    config = MalmenConfig(
        edit_modules=["model.layers.28.mlp.down_proj", "model.layers.29.mlp.down_proj"],
        edit_module_shapes=[[1536, 576], [1536, 576]],
        rank=256,
        token_positions="all",
        base_model_name_or_path="smollm2-135m",
        training={"facts_per_step": 32, "meta_lr": 0.0002, "c_loc": 3.0, "steps": 300, "best_score": 0.512},
    )
    results = [{"n": 1, "ES": 0.8, "GS": 0.2, "LS": 0.7}, {"n": 1000, "ES": 0.183, "GS": 0.084, "LS": 0.721}]
    card = editor_card(MalmenEditorModel(config), results, editor_id="org/malmen-smollm2", dataset="counterfact",
                       results_command="python benchmarks/quality.py")  # fmt: skip
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(str(card))
        pytest.fail(f"UPDATE_GOLDEN is set: {GOLDEN} was rewritten; review its diff, then run without UPDATE_GOLDEN")
    assert str(card) == GOLDEN.read_text()


def test_card_usage_snippet_runs(gpt2, tmp_path):
    """The card's usage code, run as written against a saved base model and editor, edits and reverts."""
    model, tokenizer = gpt2
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    editor = MalmenEditorModel.for_model(model, rank=4, base_model_name_or_path=str(tmp_path / "base"))
    editor.save_pretrained(tmp_path / "editor")
    card = editor_card(editor, editor_id=str(tmp_path / "editor"))

    snippet = re.search(r"```python\n(.*?)```", card.content, re.DOTALL).group(1)
    namespace = {}
    exec(snippet, namespace)
    assert len(namespace["handle"].facts) == 1
    edited = namespace["model"]
    assert all(torch.equal(edited.state_dict()[name], value) for name, value in model.state_dict().items())
