import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PreTrainedModel

from malmen_hf import MalmenConfig, MalmenEditorModel, default_edit_modules
from tests import tiny

REPO_ROOT = Path(__file__).resolve().parent.parent


def trained_looking_editor(**kwargs) -> MalmenEditorModel:
    """An editor whose every parameter and buffer holds non-default values, as after training."""
    config = MalmenConfig(
        edit_modules=["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj", "lm_head"],
        edit_module_shapes=[[128, 32], [128, 32], [32, 320]],
        rank=8,
        **kwargs,
    )
    editor = MalmenEditorModel(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in editor.state_dict().values():
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    return editor


def test_one_net_per_shape_shared_by_layers():
    editor = trained_looking_editor()
    assert sorted(editor.nets) == ["128x32", "32x320"]
    assert editor.nets["128x32"].lr.shape == (2,)
    assert editor.net_for("transformer.h.1.mlp.c_proj")[1] == 1
    assert editor.net_for("lm_head")[1] == 0


def test_fresh_editor_is_the_identity():
    editor = MalmenEditorModel.for_model(tiny.gpt2_model(64), rank=4, lr_init=0.5, log_lambda_init=-1.0)
    keys, grads = torch.randn(5, 128), torch.randn(5, 32)
    pseudo_keys, pseudo_grads = editor(keys, grads, "transformer.h.0.mlp.c_proj")
    torch.testing.assert_close(pseudo_keys, keys)
    torch.testing.assert_close(pseudo_grads, grads)
    assert editor.nets["128x32"].lr.tolist() == [0.5, 0.5]
    assert editor.nets["128x32"].log_lambda.tolist() == [-1.0, -1.0]


def test_save_and_load_round_trip_bit_exact(tmp_path):
    editor = trained_looking_editor(aggregation="sum", lr_init=3e-4)
    editor.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "modeling_malmen.py", "configuration_malmen.py"} <= set(
        os.listdir(tmp_path)
    )
    reloaded = MalmenEditorModel.from_pretrained(tmp_path)
    without_path = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(reloaded.config) == without_path(editor.config)
    saved = editor.state_dict()
    assert reloaded.state_dict().keys() == saved.keys()
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == saved[name].dtype and torch.equal(tensor, saved[name]), name
    assert set(load_file(tmp_path / "model.safetensors")) == set(saved)


def test_an_editor_saved_under_the_old_names_of_log_lambda_loads(tmp_path):
    """malmen-hf 0.1 saved `log_lambda_init` as `lambda_init` in config.json and `log_lambda` as `lamda` weights."""
    editor = trained_looking_editor(log_lambda_init=-1.5)
    editor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["lambda_init"] = config.pop("log_lambda_init")
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = {name.replace(".log_lambda", ".lamda"): tensor for name, tensor in editor.state_dict().items()}
    save_file(weights, tmp_path / "model.safetensors", {"format": "pt"})
    reloaded = MalmenEditorModel.from_pretrained(tmp_path)
    assert reloaded.config.log_lambda_init == -1.5 and not hasattr(reloaded.config, "lambda_init")
    for name, tensor in editor.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # Saved again, it is saved under the new names, and loads again.
    reloaded.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(editor.state_dict())
    assert "lambda_init" not in json.loads((tmp_path / "again" / "config.json").read_text())
    for name, tensor in MalmenEditorModel.from_pretrained(tmp_path / "again").state_dict().items():
        assert torch.equal(tensor, editor.state_dict()[name]), name


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "config.json").unlink(), "holds no MALMEN editor: its config edits no modules"),
        (lambda folder: save_file({k: v for k, v in load_file(folder / "model.safetensors").items()
                                   if k != "nets.128x32.lr"}, folder / "model.safetensors", {"format": "pt"}),
         r"do not match the editor its config describes \({'missing_keys': \['nets.128x32.lr'\]}\)"),
        (lambda folder: save_file({**load_file(folder / "model.safetensors"), "extra": torch.zeros(1)},
                                  folder / "model.safetensors", {"format": "pt"}), "'unexpected_keys': \\['extra'\\]"),
    ],
)  # fmt: skip
def test_an_incomplete_editor_folder_fails_at_load_time(tmp_path, damage, message):
    trained_looking_editor().save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        MalmenEditorModel.from_pretrained(tmp_path)


def test_a_base_models_folder_is_refused_as_an_editor(tmp_path):
    tiny.gpt2_model(64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no MALMEN editor: its config edits no modules .*base model's folder"):
        MalmenEditorModel.from_pretrained(tmp_path)


def test_saving_over_an_editor_replaces_it_whole_and_keeps_other_files(tmp_path):
    trained_looking_editor().save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "model-00001-of-00002.safetensors").write_text("a stale shard of an older save")
    trained_looking_editor(aggregation="sum").save_pretrained(tmp_path)
    reloaded = MalmenEditorModel.from_pretrained(tmp_path)
    assert reloaded.config.aggregation == "sum" and (tmp_path / "notes.txt").read_text() == "kept"
    assert not (tmp_path / "model-00001-of-00002.safetensors").exists()
    assert [path.name for path in tmp_path.parent.iterdir() if path.name.startswith(f".{tmp_path.name}")] == []


def test_saving_through_a_link_replaces_its_target(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    trained_looking_editor(aggregation="sum").save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert MalmenEditorModel.from_pretrained(tmp_path / "target").config.aggregation == "sum"


def test_a_failed_save_leaves_the_previous_editor(tmp_path, monkeypatch):
    trained_looking_editor().save_pretrained(tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trained_looking_editor(aggregation="sum").save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_auto_classes_know_malmen(tmp_path):
    editor = trained_looking_editor()
    editor.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MalmenConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MalmenEditorModel)
    assert torch.equal(loaded.nets["32x320"].blocks[1].B, editor.nets["32x320"].blocks[1].B)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_malmen.MalmenConfig",
        "AutoModel": "modeling_malmen.MalmenEditorModel",
    }


def test_remote_code_loads_and_edits_without_malmen_hf(tmp_path, gpt2, facts):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0)
    with torch.no_grad():
        editor.nets["128x32"].blocks[0].B.normal_()
    editor.save_pretrained(tmp_path / "editor")
    expected = editor.apply_edits(model, facts, tokenizer=tokenizer).shift_norms
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel
        from tests import tiny
        editor = AutoModel.from_pretrained({str(tmp_path / "editor")!r}, trust_remote_code=True)
        assert "malmen_hf" not in sys.modules, "the library was imported"
        assert type(editor).__module__.startswith("transformers_modules"), type(editor).__module__
        tokenizer = tiny.gpt2_tokenizer()
        model = tiny.gpt2_model(len(tokenizer))
        before = {{k: v.clone() for k, v in model.state_dict().items()}}
        handle = editor.apply_edits(model, {facts!r}, tokenizer=tokenizer)
        print(sorted(handle.shift_norms.items()))
        handle.revert()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    norms = dict(eval(result.stdout.strip().splitlines()[-1]))
    assert norms.keys() == expected.keys()
    for name, norm in norms.items():
        assert norm == pytest.approx(expected[name], rel=1e-5)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (tiny.gpt2_model, ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
        (tiny.gptj_model, ["transformer.h.0.mlp.fc_out", "transformer.h.1.mlp.fc_out"]),
        (tiny.gpt_neox_model, ["gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_4h_to_h"]),
        (tiny.llama_model, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        (
            tiny.t5_model,
            [
                "encoder.block.0.layer.1.DenseReluDense.wo",
                "encoder.block.1.layer.1.DenseReluDense.wo",
                "decoder.block.0.layer.2.DenseReluDense.wo",
                "decoder.block.1.layer.2.DenseReluDense.wo",
            ],
        ),
        (tiny.bert_model, ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]),
    ],
)
def test_default_edit_modules_per_family(build, expected):
    model = build(64)
    assert default_edit_modules(model) == expected
    editor = MalmenEditorModel.for_model(model, rank=4)
    assert editor.config.edit_modules == expected
    assert len(editor.nets) == 1


def test_default_edit_modules_takes_the_last_blocks():
    model = tiny.gpt2_model(64)
    assert default_edit_modules(model, num_blocks=1) == ["transformer.h.1.mlp.c_proj"]


def test_for_model_with_explicit_modules_and_shapes():
    model = tiny.llama_model(64)
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.o_proj"]
    editor = MalmenEditorModel.for_model(model, edit_modules=names, rank=4, aggregation="sum")
    assert editor.config.edit_module_shapes == [[64, 32], [32, 64], [32, 32]]
    assert sorted(editor.nets) == ["32x32", "32x64", "64x32"]
    assert editor.config.aggregation == "sum"


def test_unknown_architecture_asks_for_names():
    with pytest.raises(ValueError, match="Pass `edit_modules=\\[...\\]`"):
        default_edit_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"n_blocks": -1}, "n_blocks"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"token_positions": "prompt"}, "token_positions"),
        ({"lr_init": float("nan")}, "lr_init"),
        ({"log_lambda_init": float("inf")}, "log_lambda_init"),
        ({"edit_modules": ["a", "a"], "edit_module_shapes": [[1, 2], [1, 2]]}, "edit_modules"),
        ({"edit_modules": ["a"], "edit_module_shapes": [[1, 0]]}, "edit_module_shapes"),
        ({"edit_modules": ["a"], "edit_module_shapes": []}, "edit_module_shapes"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(StrictDataclassError, match=field):
        MalmenConfig(**kwargs)


def test_a_config_claiming_other_shapes_than_the_weights_is_refused_before_allocating(tmp_path, monkeypatch):
    trained_looking_editor().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # 6 GB of hyper-networks at rank 1,920 if they were built: refused from the weights file's header alone.
    config["edit_module_shapes"] = [[200_000, 32], [200_000, 32], [32, 320]]
    config["rank"] = 1920
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(
        PreTrainedModel, "from_pretrained", lambda *args, **kwargs: pytest.fail("built before checked")
    )
    with pytest.raises(
        ValueError, match=r"do not match the editor its config describes .*'nets.200000x32.blocks.0.A'"
    ):
        MalmenEditorModel.from_pretrained(tmp_path)
    # Same names, other shapes (a config edited by hand): refused the same way.
    config = json.loads((tmp_path / "config.json").read_text())
    config["edit_module_shapes"], config["rank"] = [[128, 32], [128, 32], [32, 320]], 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mismatched_keys.*nets.128x32.blocks.0.A: \(160, 8\) in the file"):
        MalmenEditorModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("nets.128x32.lr", torch.tensor([float("nan"), 1.0]), "nets.128x32.lr in .* holds NaN or infinite values"),
        ("nets.128x32.normalizer.var", -torch.ones(160), "normalizer.var in .* holds a negative variance"),
        ("nets.128x32.log_lambda", torch.tensor([1, 2]), r"not floating point: \['nets.128x32.log_lambda \(I64\)'\]"),
    ],
)
def test_an_editor_with_impossible_values_is_refused_at_load_time(tmp_path, name, value, message):
    trained_looking_editor().save_pretrained(tmp_path)
    save_file({**load_file(tmp_path / "model.safetensors"), name: value}, tmp_path / "model.safetensors",
              {"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match=message):
        MalmenEditorModel.from_pretrained(tmp_path)
