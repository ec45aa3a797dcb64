"""The preserved keys' covariance in the normal equation (`MalmenConfig.covariance_weight`, MEMIT's C0 term)."""

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from malmen_hf import (
    MalmenEditorModel,
    MalmenTrainingArguments,
    fit_key_covariance,
    train_editor,
    training_free_editor,
)
from malmen_hf.training.fitting import covariance_texts
from malmen_hf.training.meta_gradient import meta_gradient
from tests import tiny
from tests.conftest import FACTS, assert_bit_identical, snapshot
from tests.test_apply_edits import assert_close_at_scale, edit_deltas, reference_keys_and_grads, untrained_editor
from tests.test_trainer import TRAIN
from tests.test_training import C_LOC, REQUESTS, grad_or_zero, random_editor, reference_meta_gradient

OTHER_TEXT = ["The Louvre is a museum in Paris, France.", "Apple was founded by Steve Jobs in California", "Berlin"]


def reference_covariance(model, tokenizer, texts, module_name):
    """The mean k k^T over every token of each text, one text at a time, in float64."""
    module = model.get_submodule(module_name)
    captured = []
    handle = module.register_forward_hook(lambda mod, args, out: captured.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            if model.config.is_encoder_decoder:
                # The decoder reads the text teacher-forced: its inputs are the text shifted right.
                decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=torch.tensor([ids]))
                model(input_ids=torch.tensor([ids]), decoder_input_ids=decoder_ids)
            else:
                model(input_ids=torch.tensor([ids]))
    handle.remove()
    keys = torch.cat(captured)
    return keys.T @ keys / keys.shape[0]


def fitted_editor(model, tokenizer, **kwargs):
    editor = untrained_editor(model, **{"covariance_weight": 0.5, "covariance_rank": 10**6, **kwargs})
    fit_key_covariance(editor, model, OTHER_TEXT, tokenizer, batch_size=2)
    return editor


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fitted_covariance_is_the_mean_outer_product_of_every_token(_built, family):
    model, tokenizer = _built[family]
    editor = fitted_editor(model, tokenizer)
    for name in editor.config.edit_modules:
        expected = reference_covariance(model, tokenizer, OTHER_TEXT, name)
        # Relative to the matrix's scale: most of a Llama layer's entries are below 1e-5.
        fitted, scale = editor.key_covariance(name).matrix().double(), expected.abs().max().item()
        torch.testing.assert_close(fitted, expected, rtol=1e-4, atol=1e-5 * scale)


def test_a_covariance_of_the_language_model_head_reads_every_token(gpt2):
    """The head is the one edited module outside the transformer body: fitting then runs the whole model."""
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(
        model, ["transformer.h.1.mlp.c_proj", "lm_head"], rank=4, covariance_weight=0.5, covariance_rank=10**6
    )
    fit_key_covariance(editor, model, OTHER_TEXT, tokenizer, batch_size=2)
    for name in editor.config.edit_modules:
        expected = reference_covariance(model, tokenizer, OTHER_TEXT, name)
        torch.testing.assert_close(editor.key_covariance(name).matrix().double(), expected, rtol=1e-4, atol=1e-5)


def test_a_low_rank_covariance_keeps_the_leading_eigenvectors_and_a_floor(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model, covariance_weight=1.0, covariance_rank=4)
    fit_key_covariance(editor, model, OTHER_TEXT, tokenizer)
    name = editor.config.edit_modules[0]
    eigenvalues, vectors = torch.linalg.eigh(reference_covariance(model, tokenizer, OTHER_TEXT, name))
    floor = eigenvalues[:-4].clamp_min(0).mean()
    top = vectors[:, -4:]
    expected = (top * (eigenvalues[-4:] - floor)) @ top.T + floor * torch.eye(len(eigenvalues), dtype=torch.float64)
    torch.testing.assert_close(editor.key_covariance(name).matrix().double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_shift_solves_the_normal_equation_with_the_covariance(_built, family):
    model, tokenizer = _built[family]
    model = copy.deepcopy(model)
    editor = fitted_editor(model, tokenizer, log_lambda_init=-1.0)
    deltas = edit_deltas(editor, model, tokenizer, FACTS)
    assert deltas.keys() == {f"{name}.weight" for name in editor.config.edit_modules}
    for name in editor.config.edit_modules:
        keys, grads = reference_keys_and_grads(model, tokenizer, FACTS, name)
        diffs = -editor.config.lr_init * keys.square().sum(-1, keepdim=True) * grads
        covariance = reference_covariance(model, tokenizer, OTHER_TEXT, name)
        system = keys.T @ keys + 0.5 * len(FACTS) * covariance + torch.exp(torch.tensor(-1.0)) * torch.eye(len(keys.T))
        expected = torch.linalg.solve(system.double(), keys.T @ diffs)
        delta = deltas[f"{name}.weight"]
        delta = delta if isinstance(model.get_submodule(name), Conv1D) else delta.T
        assert_close_at_scale(delta.double(), expected, tolerance=1e-3)


def test_the_covariance_moves_the_shift_off_the_preserved_keys(gpt2):
    model, tokenizer = gpt2
    name = "transformer.h.0.mlp.c_proj"  # Conv1D: the weight delta is the shift (d_in, d_out)
    covariance = reference_covariance(model, tokenizer, OTHER_TEXT, name)

    def change_on_preserved_keys(editor):
        shift = edit_deltas(editor, model, tokenizer, FACTS)[f"{name}.weight"].double()
        return float(torch.trace(shift.T @ covariance @ shift))

    changes = [change_on_preserved_keys(untrained_editor(model, log_lambda_init=-1.0))]
    changes += [
        change_on_preserved_keys(fitted_editor(model, tokenizer, log_lambda_init=-1.0, covariance_weight=weight))
        for weight in (1.0, 10.0)
    ]
    assert changes[0] > changes[1] > changes[2] and changes[2] < 0.5 * changes[0]


def test_an_unfitted_covariance_is_refused_and_nothing_changes(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model, covariance_weight=1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="fit_key_covariance"):
        editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    assert_bit_identical(model, before)
    with pytest.raises(ValueError, match="covariance_weight=0"):
        fit_key_covariance(untrained_editor(model), model, OTHER_TEXT, tokenizer)


def test_saved_covariance_reloads_and_editors_without_one_still_load(gpt2, tmp_path):
    model, tokenizer = gpt2
    editor = fitted_editor(model, tokenizer)
    editor.save_pretrained(tmp_path / "with")
    reloaded = MalmenEditorModel.from_pretrained(tmp_path / "with")
    for name in editor.config.edit_modules:
        assert torch.equal(reloaded.key_covariance(name).matrix(), editor.key_covariance(name).matrix())
    untrained_editor(model).save_pretrained(tmp_path / "without")
    assert MalmenEditorModel.from_pretrained(tmp_path / "without").key_covariance(name) is None


def test_meta_gradient_with_the_covariance_equals_end_to_end_autograd(gpt2):
    model, tokenizer = gpt2
    model.double()
    editor = random_editor(model, "least_squares")
    editor.config.covariance_weight = 0.3
    with_covariance = MalmenEditorModel(editor.config).double()
    with_covariance.load_state_dict(editor.state_dict(), strict=False)
    fit_key_covariance(with_covariance, model, OTHER_TEXT, tokenizer)
    preserved = {
        name: 0.3 * len(REQUESTS) * with_covariance.key_covariance(name).matrix()
        for name in with_covariance.config.edit_modules
    }
    expected, expected_loss = reference_meta_gradient(with_covariance, model, tokenizer, REQUESTS, preserved=preserved)
    losses = meta_gradient(
        with_covariance, model, REQUESTS, tokenizer, batch_size=2, c_loc=C_LOC, update_normalizer=False
    )
    assert losses.total == pytest.approx(expected_loss, rel=1e-9)
    for name, param in with_covariance.named_parameters():
        torch.testing.assert_close(grad_or_zero(param), expected[name], rtol=1e-7, atol=1e-12, msg=name)


def test_training_fits_a_missing_covariance(tmp_path):
    tokenizer = tiny.gpt2_tokenizer()
    model = tiny.gpt2_model(len(tokenizer))
    editor = MalmenEditorModel.for_model(model, rank=8, lr_init=0.5, covariance_weight=0.5, covariance_rank=8)
    args = MalmenTrainingArguments(output_dir=str(tmp_path), facts_per_step=4, max_steps=1, progress=False)
    trained = train_editor(editor, model, tokenizer, TRAIN, args)
    expected = untrained_editor(model, covariance_weight=0.5, covariance_rank=8)
    fit_key_covariance(expected, model, covariance_texts(TRAIN), tokenizer)
    for name in trained.config.edit_modules:
        torch.testing.assert_close(trained.key_covariance(name).matrix(), expected.key_covariance(name).matrix())


def test_the_training_free_editor_fits_its_covariance_on_the_fitting_facts(gpt2):
    model, tokenizer = gpt2
    editor = training_free_editor(model, tokenizer, REQUESTS, covariance_weight=1.0, covariance_rank=8)
    expected = untrained_editor(model, covariance_weight=1.0, covariance_rank=8)
    fit_key_covariance(expected, model, covariance_texts(REQUESTS), tokenizer)
    for name in editor.config.edit_modules:
        torch.testing.assert_close(editor.key_covariance(name).matrix(), expected.key_covariance(name).matrix())
    editor.apply_edits(model, FACTS, tokenizer=tokenizer).revert()


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], r"`texts` holds no text \(0 empty strings\)"),
        (["", "  "], r"`texts` holds no text \(2 empty strings\)"),
        (["Berlin " * 100], "text 0 is .* tokens long but the model takes at most 64"),
        ("Berlin", "`texts` must be a list of strings"),
    ],
)
def test_fitting_on_texts_that_fit_nothing_is_refused_and_keeps_the_earlier_fit(gpt2, texts, message):
    model, tokenizer = gpt2
    editor = fitted_editor(model, tokenizer)
    before = snapshot(editor)
    with pytest.raises(ValueError, match=message):
        fit_key_covariance(editor, model, texts, tokenizer)
    assert_bit_identical(editor, before)


def test_a_model_with_nan_weights_fits_no_covariance(gpt2):
    model, tokenizer = gpt2
    editor = fitted_editor(model, tokenizer)
    before = snapshot(editor)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"keys of \['transformer.h.0.mlp.c_proj', .* are not finite"):
        fit_key_covariance(editor, model, OTHER_TEXT, tokenizer)
    assert_bit_identical(editor, before)
