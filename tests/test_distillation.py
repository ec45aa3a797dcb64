"""Distilling an editor from a teacher's value changes: the data, the loss by hand, training and its exact resume."""

import shutil

import pytest
import torch

from malmen_hf import MalmenEditorModel
from malmen_hf.caching import cache_keys_and_value_grads, frozen
from malmen_hf.facts import collate, pad_id_of, tokenize_edit_prompts
from malmen_hf.training.distillation import (
    DistillationArguments,
    distill_editor,
    distillation_data,
    distillation_loss,
)
from tests import tiny
from tests.conftest import SUBJECT_REQUESTS

REQUESTS = SUBJECT_REQUESTS[:6]
MODULES = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny.gpt2_tokenizer()
    model = tiny.gpt2_model(len(tokenizer), num_layers=3)
    # A teacher the hyper-network can learn: one change shared by the facts (its shift), plus a little noise.
    noise = torch.randn(len(REQUESTS) + 1, 32, generator=torch.Generator().manual_seed(0))
    return model, tokenizer, noise[0] + 0.1 * noise[1:]


def new_editor(model) -> MalmenEditorModel:
    torch.manual_seed(0)
    return MalmenEditorModel.for_model(model, edit_modules=MODULES, token_positions="subject_last", rank=4)


def test_data_holds_each_facts_own_key_gradient_and_share_of_the_teacher(setup):
    model, tokenizer, deltas = setup
    data = distillation_data(new_editor(model), model, tokenizer, REQUESTS, deltas, batch_size=4)
    modules = {name: model.get_submodule(name) for name in MODULES}
    with frozen(model), torch.enable_grad():
        for index in (0, 3):
            (example,) = tokenize_edit_prompts(tokenizer, [REQUESTS[index]], "causal")
            batch = collate([example], pad_id_of(tokenizer), "causal")
            alone = cache_keys_and_value_grads(model, modules, batch, "causal", token_positions="subject_last")
            for name in MODULES:
                torch.testing.assert_close(data.keys[name][index], alone[name][0][0])
                torch.testing.assert_close(data.value_grads[name][index], alone[name][1][0])
                torch.testing.assert_close(data.targets[name][index], deltas[index] / 2)


def test_loss_matches_a_hand_computation(setup):
    model, tokenizer, deltas = setup
    editor = new_editor(model)
    data = distillation_data(editor, model, tokenizer, REQUESTS, deltas)
    net = editor.nets["128x32"]
    with torch.no_grad():
        net.normalizer.update(torch.cat((data.keys[MODULES[0]], data.value_grads[MODULES[0]]), dim=-1))
        net.lr.copy_(torch.tensor([0.3, -0.2]))
    rows = torch.tensor([0, 2, 5])
    expected = []
    for layer, name in enumerate(MODULES):
        inputs = torch.cat((data.keys[name][rows], data.value_grads[name][rows]), dim=-1)
        normalized = (inputs - net.normalizer.mean) / net.normalizer.var.sqrt().clamp_min(editor.config.normalizer_eps)
        # A fresh editor's blocks are the identity: the pseudo pair is the normalized pair.
        pseudo_keys, pseudo_grads = normalized[:, :128], normalized[:, 128:]
        diffs = -net.lr[layer] * (data.keys[name][rows] * pseudo_keys).sum(1, keepdim=True) * pseudo_grads
        targets = deltas[rows] / 2
        expected.append(((diffs - targets) ** 2).sum() / (targets**2).sum())
    torch.testing.assert_close(distillation_loss(editor, data, rows), sum(expected) / 2)


def test_distillation_lowers_the_loss_and_resumes_exactly(setup, tmp_path):
    model, tokenizer, deltas = setup
    data = distillation_data(new_editor(model), model, tokenizer, REQUESTS, deltas)
    everything = torch.arange(len(REQUESTS))
    args = DistillationArguments(str(tmp_path / "run"), max_steps=60, learning_rate=5e-2, batch_size=4,
                                 checkpoint_every=30, progress=False)  # fmt: skip
    editor = new_editor(model)
    losses = distill_editor(editor, data, args)
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0] < 0.5  # the scaled gradient starts below 1
    assert distillation_loss(editor, data, everything) < 0.5
    # Interrupted after step 30: a new process resumes from that checkpoint and ends where the whole run ended.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000060")
    resumed = new_editor(model)
    assert len(distill_editor(resumed, data, args)) == 30
    for name, tensor in editor.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_an_editor_reading_other_positions_is_refused(setup):
    model, tokenizer, deltas = setup
    editor = MalmenEditorModel.for_model(model, edit_modules=MODULES, token_positions="target")
    with pytest.raises(ValueError, match="token_positions='subject_last'"):
        distillation_data(editor, model, tokenizer, REQUESTS, deltas)


def test_a_fresh_editor_fits_per_fact_changes_through_its_blocks(setup, tmp_path):
    # Each fact its own change (no shared part): only the blocks can fit it, not the per-layer `shift` or `lr`. A
    # fresh block (B = 0, bias = 0) sits exactly at its nonlinearity's kink: with relu's zero gradient there, its
    # weights would never move and the loss would stay where `shift` alone brings it.
    model, tokenizer, _ = setup
    deltas = torch.randn(len(REQUESTS), 32, generator=torch.Generator().manual_seed(1))
    data = distillation_data(new_editor(model), model, tokenizer, REQUESTS, deltas)
    args = DistillationArguments(str(tmp_path / "run"), max_steps=200, learning_rate=2e-2, batch_size=6,
                                 checkpoint_every=200, progress=False)  # fmt: skip
    editor = new_editor(model)
    distill_editor(editor, data, args)
    for block in editor.nets["128x32"].blocks:
        assert block.B.abs().max() > 0 and block.bias.abs().max() > 0
    assert distillation_loss(editor, data, torch.arange(len(REQUESTS))) < 0.3
