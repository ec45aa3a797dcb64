import copy
import pickle

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from malmen_hf import EditRequest, MalmenEditorModel, revert_edits
from tests.conftest import FACTS, assert_bit_identical, snapshot

# lr and lambda of the training-free editor, tuned per family to the scale of the tiny models' keys.
TRAINING_FREE = {"gpt2": (1.0, 0.0), "gptj": (1.0, 0.0), "llama": (100.0, -5.0), "t5": (1.0, 0.0)}


def family_of(model) -> str:
    return {"GPT2LMHeadModel": "gpt2", "GPTJForCausalLM": "gptj", "LlamaForCausalLM": "llama"}.get(
        type(model).__name__, "t5"
    )


def untrained_editor(model, **kwargs):
    lr, log_lambda = TRAINING_FREE[family_of(model)]
    kwargs = {"rank": 8, "lr_init": lr, "log_lambda_init": log_lambda, **kwargs}
    return MalmenEditorModel.for_model(model, **kwargs)


def weight_deltas(model, before):
    after = model.state_dict()
    return {name: after[name] - before[name] for name in before if not torch.equal(after[name], before[name])}


def edit_deltas(editor, model, tokenizer, facts, **kwargs):
    """The weight changes `apply_edits` makes; the edit is reverted before returning."""
    before = snapshot(model)
    handle = editor.apply_edits(model, facts, tokenizer=tokenizer, **kwargs)
    deltas = weight_deltas(model, before)
    handle.revert()
    return deltas


def assert_close_at_scale(actual, expected, tolerance=1e-4):
    """Equal up to `tolerance` of the largest entry: weight deltas are differences of float32 weights."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * float(expected.abs().max()))


def hf_example(model, tokenizer, prompt, target):
    """
    One fact as transformers' own loss expects it (unshifted labels), written independently of malmen_hf, on the
    model's device.
    """
    if model.config.is_encoder_decoder:
        ids = tokenizer(prompt)["input_ids"]
        labels = tokenizer(text_target=target)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(f"{prompt} {target}")["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
    return {
        "input_ids": torch.tensor([ids], device=model.device),
        "labels": torch.tensor([labels], device=model.device),
    }


def target_log_probs(model, tokenizer, facts):
    """Mean log-probability of each fact's target tokens, from transformers' own loss."""
    with torch.no_grad():
        return torch.tensor([-model(**hf_example(model, tokenizer, *fact)).loss for fact in facts])


def reference_keys_and_grads(model, tokenizer, facts, module_name):
    """Keys and value gradients by plain autograd on transformers' loss, one fact at a time, in float64 on the CPU."""
    module = model.get_submodule(module_name)
    keys, grads = [], []
    for prompt, target in facts:
        captured = {}

        def hook(mod, args, output, captured=captured):
            output.retain_grad()
            captured.update(key=args[0], output=output)

        handle = module.register_forward_hook(hook)
        example = hf_example(model, tokenizer, prompt, target)
        model.zero_grad()
        model(**example).loss.backward()  # the mean over the fact's target tokens
        handle.remove()
        if model.config.is_encoder_decoder:
            positions = slice(None)  # every encoder token, or every decoder (= target) token
        else:
            # positions whose next token is a target token
            prompt_length = int((example["labels"][0] == -100).sum())
            positions = slice(prompt_length - 1, example["input_ids"].shape[1] - 1)
        keys.append(captured["key"][0, positions].detach())
        grads.append(captured["output"].grad[0, positions])
    return torch.cat(keys).double().cpu(), torch.cat(grads).double().cpu()


def test_shift_matches_independent_least_squares(model_and_tokenizer, facts, device):
    model, tokenizer = model_and_tokenizer
    model.to(device)
    editor = untrained_editor(model, log_lambda_init=-1.0).to(device)
    deltas = edit_deltas(editor, model, tokenizer, facts)

    for name in editor.config.edit_modules:
        keys, grads = reference_keys_and_grads(model, tokenizer, facts, name)
        lr = editor.config.lr_init
        # An untrained editor is the identity: the value difference of each token is -lr |k|^2 g.
        diffs = -lr * keys.square().sum(-1, keepdim=True) * grads
        ridge_rows = (
            torch.exp(torch.tensor(editor.config.log_lambda_init / 2)).double() * torch.eye(keys.shape[1]).double()
        )
        zeros = torch.zeros(keys.shape[1], grads.shape[1]).double()
        expected = torch.linalg.lstsq(torch.cat([keys, ridge_rows]), torch.cat([diffs, zeros])).solution
        module = model.get_submodule(name)
        delta = deltas[f"{name}.weight"].cpu()
        delta = delta if isinstance(module, Conv1D) else delta.T
        assert_close_at_scale(delta.double(), expected)


def test_shift_with_more_tokens_than_key_features_matches_least_squares(gpt2, facts):
    """apply_edits solves the n x n system of the tokens while they are fewer than d_in, then sums K^T K and K^T D."""
    model, tokenizer = gpt2
    many = [(f"{copy} {prompt}", target) for copy in range(20) for prompt, target in facts]
    editor = untrained_editor(model, log_lambda_init=-1.0)
    deltas = edit_deltas(editor, model, tokenizer, many, editor_batch_size=16)
    for name in editor.config.edit_modules:
        keys, grads = reference_keys_and_grads(model, tokenizer, many, name)
        assert keys.shape[0] > keys.shape[1]
        diffs = -editor.config.lr_init * keys.square().sum(-1, keepdim=True) * grads
        system = keys.T @ keys + torch.exp(torch.tensor(editor.config.log_lambda_init)).double() * torch.eye(
            keys.shape[1]
        )
        expected = torch.linalg.solve(system, keys.T @ diffs)
        assert_close_at_scale(deltas[f"{name}.weight"].double(), expected)


def test_sum_aggregation_is_the_sum_of_outer_products(gpt2, facts):
    model, tokenizer = gpt2
    editor = untrained_editor(model, aggregation="sum", lr_init=0.1)
    deltas = edit_deltas(editor, model, tokenizer, facts)
    for name in editor.config.edit_modules:
        keys, grads = reference_keys_and_grads(model, tokenizer, facts, name)
        expected = -0.1 * sum(torch.outer(k, g) for k, g in zip(keys, grads, strict=True))
        assert_close_at_scale(deltas[f"{name}.weight"].double(), expected)


@pytest.mark.parametrize("aggregation", ["least_squares", "sum"])
def test_result_does_not_depend_on_batch_sizes(model_and_tokenizer, facts, aggregation, device):
    model, tokenizer = model_and_tokenizer
    model.to(device)
    editor = untrained_editor(model, aggregation=aggregation).to(device)
    results = [
        edit_deltas(editor, model, tokenizer, facts, batch_size=batch_size, editor_batch_size=editor_batch_size)
        for batch_size, editor_batch_size in [(1, 1), (3, 1024), (len(facts), 1), (len(facts), 1024)]
    ]
    for result in results[1:]:
        assert result.keys() == results[0].keys()
        for name in result:
            assert_close_at_scale(result[name], results[0][name])


def test_untrained_editor_makes_targets_more_likely(model_and_tokenizer, facts):
    model, tokenizer = model_and_tokenizer
    before = target_log_probs(model, tokenizer, facts)
    handle = untrained_editor(model).apply_edits(model, facts, tokenizer=tokenizer)
    after = target_log_probs(model, tokenizer, facts)
    assert (after - before).mean() > 0.1
    assert (after > before).float().mean() >= 0.7
    assert handle.num_facts == len(facts)
    assert handle.num_tokens >= len(facts)
    assert all(norm > 0 for norm in handle.shift_norms.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_then_revert_is_bit_exact(model_and_tokenizer, facts, dtype, device):
    model, tokenizer = model_and_tokenizer
    model.to(device, dtype)
    before = snapshot(model)
    editor = untrained_editor(model).to(device)
    handle = editor.apply_edits(model, facts, tokenizer=tokenizer)
    assert weight_deltas(model, before), "the edit changed nothing"
    assert all(model.get_submodule(name).weight.dtype == dtype for name in handle.modules)
    handle.revert()
    assert_bit_identical(model, before)
    assert not handle.applied


def test_stacked_edits_revert_in_order(gpt2, facts):
    model, tokenizer = gpt2
    model.to(torch.bfloat16)
    editor = untrained_editor(model)
    original = snapshot(model)
    first = editor.apply_edits(model, facts[:3], tokenizer=tokenizer)
    after_first = snapshot(model)
    second = editor.apply_edits(model, facts[3:], tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="revert those first"):
        first.revert()
    second.revert()
    assert_bit_identical(model, after_first)
    first.revert()
    assert_bit_identical(model, original)
    with pytest.raises(RuntimeError, match="already reverted"):
        first.revert()


def test_revert_edits_undoes_every_call(gpt2, facts):
    model, tokenizer = gpt2
    editor = untrained_editor(model)
    original = snapshot(model)
    for fact in facts[:3]:
        editor.apply_edits(model, [fact], tokenizer=tokenizer)
    assert revert_edits(model) == 3
    assert_bit_identical(model, original)
    assert revert_edits(model) == 0


def test_attach_gives_the_model_apply_and_revert(gpt2, facts, tmp_path):
    model, tokenizer = gpt2
    class_name = type(model).__name__
    original = snapshot(model)
    editor = untrained_editor(model)
    assert editor.attach(model, tokenizer) is model
    assert type(model).__name__ == class_name

    handle = model.apply_edits(facts, batch_size=2)
    assert handle.num_facts == len(facts)
    edited = snapshot(model)
    model.save_pretrained(tmp_path)  # an ordinary checkpoint: no editor weights, the original architecture
    reloaded = type(model).__bases__[1].from_pretrained(tmp_path)
    assert_bit_identical(reloaded, edited)
    assert model.revert_edits() == 1
    assert_bit_identical(model, original)
    model.detach_editor()
    assert not hasattr(model, "apply_edits")


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))])
def test_an_attached_edited_model_can_be_copied_and_pickled(gpt2, facts, duplicate):
    model, tokenizer = gpt2
    original = snapshot(model)
    untrained_editor(model).attach(model, tokenizer)
    model.apply_edits(facts[:3])
    edited = snapshot(model)

    twin = duplicate(model)
    assert type(twin) is type(model) and isinstance(twin, type(model).__bases__[1])
    assert_bit_identical(twin, edited)
    twin.apply_edits(facts[3:])  # the copy edits with its own copy of the editor, and reverts its own edits
    assert twin.revert_edits() == 2
    assert_bit_identical(twin, original)
    assert_bit_identical(model, edited)
    twin.detach_editor()
    assert type(twin) is type(model).__bases__[1]


def test_user_state_is_restored(gpt2, facts):
    model, tokenizer = gpt2
    model.train()
    model.transformer.h[0].mlp.eval()  # one submodule in eval mode: it stays so
    model.transformer.wte.weight.requires_grad_(False)
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    with torch.no_grad():  # apply_edits needs gradients internally, whatever the caller's context
        untrained_editor(model).apply_edits(model, facts, tokenizer=tokenizer)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags


def test_edit_request_forms_are_equivalent(gpt2):
    model, tokenizer = gpt2
    editor = untrained_editor(model)
    forms = [
        [("The capital of France is", "Berlin")],
        [{"prompt": "The capital of France is", "target": "Berlin"}],
        [EditRequest("The capital of France is", "Berlin", rephrases="France's capital is")],
    ]
    results = [edit_deltas(editor, model, tokenizer, facts) for facts in forms]
    assert_same_edits(editor, results)


def test_a_copied_editor_gives_the_same_shift(gpt2, facts):
    model, tokenizer = gpt2
    editor = untrained_editor(model)
    first = edit_deltas(editor, model, tokenizer, facts)
    second = edit_deltas(copy.deepcopy(editor), model, tokenizer, facts)
    assert_same_edits(editor, [first, second])


def assert_same_edits(editor, results):
    """Every result changed exactly the weights of the editor's modules (an edit that changes nothing fails), alike."""
    edited = {f"{name}.weight" for name in editor.config.edit_modules}
    for result in results:
        assert result.keys() == edited
        assert all(delta.abs().max() > 0 for delta in result.values())
        for name in result:
            torch.testing.assert_close(result[name], results[0][name])


def test_half_precision_editor_accumulates_in_float32(gpt2, facts):
    model, tokenizer = gpt2
    editor = untrained_editor(model, n_blocks=0)
    many = [(f"{copy} {prompt}", target) for copy in range(20) for prompt, target in facts]  # 140 distinct facts
    expected = edit_deltas(editor, model, tokenizer, many, batch_size=1)
    actual = edit_deltas(editor.to(torch.bfloat16), model, tokenizer, many, batch_size=1)
    for name in expected:
        # bf16 keys and value differences are rounded, but 140 batches of running sums are not
        assert_close_at_scale(actual[name], expected[name], tolerance=2e-2)


def test_a_weight_changed_or_replaced_after_the_edit_is_not_silently_overwritten(gpt2):
    model, tokenizer = gpt2
    pristine = snapshot(model)
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    handle = editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    first, second = editor.config.edit_modules
    after_edit = snapshot(model)
    with torch.no_grad():
        model.get_submodule(first).weight[0, 0] += 1.0  # the user's own change, after the edit
    changed = snapshot(model)
    with pytest.raises(RuntimeError, match=f"The weight of '{first}' was changed since these edits were applied"):
        handle.revert()
    assert_bit_identical(model, changed)
    assert handle.applied
    model.load_state_dict(after_edit)  # copies into the same tensors: the edit's own weights again
    model.get_submodule(second).weight = torch.nn.Parameter(model.get_submodule(second).weight.detach().clone())
    with pytest.raises(RuntimeError, match=f"The weight of '{second}' was replaced since"):
        handle.revert()
    handle.revert(force=True)
    assert_bit_identical(model, pristine)
    assert not handle.applied


def test_a_revert_that_fails_half_way_restores_nothing(gpt2):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.5)
    handle = editor.apply_edits(model, FACTS, tokenizer=tokenizer)
    edited = snapshot(model)
    second = editor.config.edit_modules[1]
    handle._original_weights[second] = torch.zeros(3)  # copying it into the layer fails, after the first is restored
    with pytest.raises(RuntimeError):
        handle.revert()
    assert_bit_identical(model, edited)
    assert handle.applied
