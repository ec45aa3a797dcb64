"""Bad input fails with a message that says what is wrong, and leaves every weight and flag as it was."""

import pytest
import torch

from malmen_hf import EditRequest, MalmenConfig, MalmenEditorModel, edits
from tests import tiny
from tests.conftest import assert_bit_identical, snapshot


def user_state(model):
    """Every weight, each module's train/eval mode and each parameter's `requires_grad`."""
    return (
        snapshot(model),
        {name: module.training for name, module in model.named_modules()},
        [param.requires_grad for param in model.parameters()],
    )


def assert_unchanged(model, state):
    before, modes, flags = state
    assert_bit_identical(model, before)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert [param.requires_grad for param in model.parameters()] == flags
    assert not getattr(model, "_malmen_edit_handles", [])


@pytest.fixture
def setup(gpt2):
    model, tokenizer = gpt2
    model.train()
    model.transformer.h[1].eval()  # a submodule the user keeps in eval mode
    model.lm_head.weight.requires_grad_(False)  # tied to wte: a user-frozen parameter
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0)
    state = user_state(model)
    yield model, tokenizer, editor
    assert_unchanged(model, state)


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        ([], "`facts` is empty"),
        (None, "`facts` must be a list of facts, got NoneType"),
        (
            [("The capital of France is", "Berlin"), ("The capital of  France is ", "Rome")],
            "facts 0 and 1 give the prompt 'The capital of  France is ' two targets",
        ),
        (("The capital of France is", "Berlin"), "wrap a single fact in a list"),
        ({"prompt": "a", "target": "b"}, "wrap a single fact in a list"),
        ([("The capital of France is", "")], "fact 0: 'target' must be a non-empty string"),
        ([("ok", "fine"), {"prompt": "x", "target_new": "y"}], r"fact 1: unknown keys \['target_new'\]"),
        ([("ok", "fine"), ("a", "b", "c")], "fact 1: expected an EditRequest, a dict or a \\(prompt, target\\) pair"),
        ([("ok", "fine"), 42], "fact 1: expected"),
        ([{"prompt": "x", "target": "y", "locality_prompt": "z"}], "must be given together"),
        ([("word " * 80, "long")], "takes at most 64"),
    ],
)
def test_invalid_facts(setup, facts, message):
    model, tokenizer, editor = setup
    with pytest.raises(ValueError, match=message):
        editor.apply_edits(model, facts, tokenizer=tokenizer)


@pytest.mark.parametrize(("option", "value"), [("batch_size", 0), ("editor_batch_size", -1), ("batch_size", 1.5)])
def test_invalid_batch_sizes(setup, option, value):
    model, tokenizer, editor = setup
    with pytest.raises(ValueError, match=f"{option} must be a positive integer"):
        editor.apply_edits(model, [("a", "b")], tokenizer=tokenizer, **{option: value})


def test_editor_for_another_architecture(setup):
    model, tokenizer, _ = setup
    other = MalmenEditorModel.for_model(tiny.gptj_model(64), rank=4)
    with pytest.raises(ValueError, match="has no module named 'transformer.h.0.mlp.fc_out'.*for_model"):
        other.apply_edits(model, [("a", "b")], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="has no module named"):
        other.attach(model, tokenizer)


def test_editor_for_other_shapes(setup):
    model, tokenizer, editor = setup
    config = MalmenConfig(**{**editor.config.to_dict(), "edit_module_shapes": [[128, 64], [128, 32]]})
    with pytest.raises(
        ValueError, match=r"has shape \(d_in, d_out\) = \(128, 32\) but this editor was built for \(128, 64\)"
    ):
        MalmenEditorModel(config).apply_edits(model, [("a", "b")], tokenizer=tokenizer)


def test_editor_for_another_base_model_of_the_same_shapes_warns(gpt2, recwarn):
    model, tokenizer = gpt2
    model.config._name_or_path = "/cache/models/tiny-gpt2"
    facts = [("The capital of France is", "Berlin")]
    for same in ("org/tiny-gpt2", "tiny-gpt2", "/cache/models/tiny-gpt2/"):
        MalmenEditorModel.for_model(model, rank=4, base_model_name_or_path=same).apply_edits(
            model, facts, tokenizer=tokenizer
        ).revert()
    assert not [w for w in recwarn if "was made for" in str(w.message)]
    other = MalmenEditorModel.for_model(model, rank=4, base_model_name_or_path="org/other-gpt2")
    with pytest.warns(UserWarning, match=r"made for 'org/other-gpt2' but is editing '/cache/models/tiny-gpt2'"):
        other.apply_edits(model, facts, tokenizer=tokenizer).revert()


def test_editor_of_a_non_linear_module(setup):
    model, tokenizer, editor = setup
    config = MalmenConfig(
        **{**editor.config.to_dict(), "edit_modules": ["transformer.h.0.ln_1", "transformer.h.1.mlp.c_proj"]}
    )
    with pytest.raises(ValueError, match="is a LayerNorm; MALMEN edits only nn.Linear and Conv1D"):
        MalmenEditorModel(config).apply_edits(model, [("a", "b")], tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("parameter", "value"), [("lr", float("nan")), ("lr", float("inf")), ("log_lambda", float("nan"))]
)
def test_non_finite_solve(setup, facts, parameter, value):
    model, tokenizer, editor = setup
    with torch.no_grad():
        getattr(editor.nets["128x32"], parameter).fill_(value)
    with pytest.raises(ValueError, match="no weight was changed"):
        editor.apply_edits(model, facts, tokenizer=tokenizer)


def test_failure_while_caching(setup):
    model, tokenizer, editor = setup
    bad_tokenizer = tiny.gpt2_tokenizer()
    bad_tokenizer.add_tokens([f"<extra{i}>" for i in range(10)])  # ids past the model's vocabulary
    with pytest.raises(IndexError):
        editor.apply_edits(model, [("The capital <extra9>", "Rome")], tokenizer=bad_tokenizer)


def test_failure_while_applying_restores_the_first_layers(setup, facts, monkeypatch):
    model, tokenizer, editor = setup
    calls = []
    real_shifted_weight = edits.shifted_weight

    def fail_on_second_layer(module, shift):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real_shifted_weight(module, shift)

    monkeypatch.setattr(edits, "shifted_weight", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        editor.apply_edits(model, facts, tokenizer=tokenizer)
    assert len(calls) == 2


def test_failure_in_the_hyper_network_restores_flags_at_once(setup, facts, monkeypatch):
    model, tokenizer, editor = setup

    def broken_net(*args, **kwargs):
        raise RuntimeError("hyper-network failure (simulated)")

    monkeypatch.setattr(editor.nets["128x32"], "forward", broken_net)
    state = user_state(model)
    with pytest.raises(RuntimeError, match="simulated") as error:
        editor.apply_edits(model, facts, tokenizer=tokenizer)
    # While the traceback (and with it the caching generator's frame) is alive: restored at once, not when collected.
    assert error.tb is not None
    assert_unchanged(model, state)


def test_repeated_facts_are_edited_once(gpt2, facts):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0)
    with pytest.warns(UserWarning, match=r"2 fact\(s\) were given more than once; each is edited once"):
        handle = editor.apply_edits(model, facts + facts[:2], tokenizer=tokenizer)
    twice = snapshot(model)
    handle.revert()
    assert handle.num_facts == len(facts) and handle.facts == [EditRequest(*fact) for fact in facts]
    editor.apply_edits(model, facts, tokenizer=tokenizer)
    assert_bit_identical(model, twice)


def test_an_infinite_lambda_warns_that_nothing_changed(gpt2, facts):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0)
    with torch.no_grad():
        editor.nets["128x32"].log_lambda[1] = float("inf")
    with pytest.warns(UserWarning, match=r"left the weights of \['transformer.h.1.mlp.c_proj'\] unchanged") as caught:
        editor.apply_edits(model, facts, tokenizer=tokenizer)
    assert len([w for w in caught if "unchanged" in str(w.message)]) == 1


def test_a_shift_too_small_for_bf16_weights_warns_naming_the_layers(gpt2, facts, recwarn):
    model, tokenizer = gpt2
    model.to(torch.bfloat16)
    MalmenEditorModel.for_model(model, rank=4, lr_init=1.0).apply_edits(model, facts, tokenizer=tokenizer)
    assert not [w for w in recwarn if "unchanged" in str(w.message)]  # a shift of ordinary size changes the weights
    before = snapshot(model)
    tiny_lr = MalmenEditorModel.for_model(model, rank=4, lr_init=1e-9)
    with pytest.warns(UserWarning, match=r"\['transformer.h.0.mlp.c_proj', 'transformer.h.1.mlp.c_proj'\].*bfloat16"):
        handle = tiny_lr.apply_edits(model, facts, tokenizer=tokenizer)
    assert_bit_identical(model, before)
    assert all(norm > 0 for norm in handle.shift_norms.values())


def test_a_model_on_the_meta_device_is_refused(gpt2, facts):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=1.0)
    with torch.device("meta"):
        empty = tiny.gpt2_model(len(tokenizer))
    with pytest.raises(ValueError, match="weights on the meta device"):
        editor.apply_edits(empty, facts, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="weights on the meta device"):
        editor.attach(empty, tokenizer)
    assert not getattr(empty, "_malmen_edit_handles", [])
