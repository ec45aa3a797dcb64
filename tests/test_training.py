import pytest
import torch
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from malmen_hf import EditRequest, MalmenEditorModel
from malmen_hf.caching import cache_keys_and_value_grads, frozen
from malmen_hf.facts import collate, pad_id_of, tokenize_examples
from malmen_hf.training.fitting import fit_normalizer
from malmen_hf.training.meta_gradient import meta_gradient

REQUESTS = [
    EditRequest("The Eiffel Tower is located in", "Rome", ("The Eiffel Tower is in",), "The Colosseum is in", "Rome"),
    EditRequest("The capital of France is", "Berlin", ("France's capital is", "The French capital is")),
    EditRequest("Apple was founded by", "Microsoft", (), "Steve Jobs founded", "Apple"),
    EditRequest("Toko Yasuda plays the", "piano", ("Toko Yasuda is a player of the",), "The Louvre is in", "Paris"),
    EditRequest("The Louvre is a museum in", "Tokyo", locality_prompt="Berlin is in", locality_answer="Germany"),
]
C_LOC = 0.7


def random_editor(model, aggregation):
    """An editor with every parameter away from its initial value, in float64."""
    editor = MalmenEditorModel.for_model(model, rank=6, lr_init=0.5, log_lambda_init=-0.5, aggregation=aggregation)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in editor.named_parameters():
            if name.endswith((".B", ".bias", ".shift")):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return editor.double()


def teacher_forced_loss(model, params, tokenizer, prompt, target):
    """The mean cross-entropy over the target tokens, computed here in float64 (transformers' loss upcasts only to
    float32)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(f"{prompt} {target}")["input_ids"]
    logits = functional_call(model, params, args=(torch.tensor([full_ids], device=model.device),)).logits[0]
    positions = slice(len(prompt_ids) - 1, len(full_ids) - 1)  # each predicts the next token, a target token
    targets = torch.tensor(full_ids[len(prompt_ids) :], device=model.device)
    loss = torch.nn.functional.cross_entropy(logits[positions], targets)
    return loss, full_ids, len(prompt_ids)


def grad_or_zero(param):
    return torch.zeros_like(param) if param.grad is None else param.grad.clone()


def reference_meta_gradient(editor, model, tokenizer, requests, with_edit_prompt=False, preserved=None):
    """End-to-end autograd: the hyper-network, a direct torch.linalg.solve, and the losses in one graph."""
    modules = {name: model.get_submodule(name) for name in editor.config.edit_modules}
    examples = tokenize_examples(tokenizer, [r.prompt for r in requests], [r.target for r in requests], "causal")
    batch = collate(examples, pad_id_of(tokenizer), "causal")
    with frozen(model), torch.enable_grad():
        cached = cache_keys_and_value_grads(model, modules, batch, "causal")
    params = dict(model.named_parameters())
    for name, (keys, value_grads) in cached.items():
        net, index = editor.net_for(name)
        pseudo_keys, pseudo_grads = net(keys, value_grads, index)
        if editor.config.aggregation == "least_squares":
            diffs = -net.lr[index] * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads
            eye = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
            system = keys.T @ keys + torch.exp(net.log_lambda[index]) * eye
            if preserved is not None:  # a n C0, the preserved keys' term
                system = system + preserved[name]
            shift = torch.linalg.solve(system, keys.T @ diffs)
        else:
            shift = -net.lr[index] * pseudo_keys.T @ pseudo_grads
        weight = modules[name].weight.detach()
        params[f"{name}.weight"] = weight + (shift if isinstance(modules[name], Conv1D) else shift.T)

    gen_losses = []
    for request in requests:
        prompts = (*request.rephrases, request.prompt) if with_edit_prompt else request.rephrases or (request.prompt,)
        losses = [teacher_forced_loss(model, params, tokenizer, p, request.target)[0] for p in prompts]
        gen_losses.append(torch.stack(losses).mean())
    loc_losses = []
    for request in requests:
        if request.locality_prompt is None:
            continue
        after, full_ids, prompt_length = teacher_forced_loss(
            model, params, tokenizer, request.locality_prompt, request.locality_answer
        )
        positions = slice(prompt_length - 1, len(full_ids) - 1)
        with torch.no_grad():
            log_p_before = torch.log_softmax(
                model(torch.tensor([full_ids], device=model.device)).logits[0, positions], -1
            )
        input_ids = torch.tensor([full_ids], device=model.device)
        logits_after = functional_call(model, params, args=(input_ids,)).logits[0, positions]
        log_p_after = torch.log_softmax(logits_after, -1)
        loc_losses.append((log_p_before.exp() * (log_p_before - log_p_after)).sum(-1).mean())
    total = torch.stack(gen_losses).mean() + C_LOC * torch.stack(loc_losses).mean()
    editor.zero_grad()
    total.backward()
    grads = {name: grad_or_zero(param) for name, param in editor.named_parameters()}
    editor.zero_grad()
    model.zero_grad(set_to_none=True)
    return grads, float(total.detach())


@pytest.mark.parametrize("aggregation", ["least_squares", "sum"])
@pytest.mark.parametrize(("batch_size", "editor_batch_size"), [(1, 1), (2, 5), (len(REQUESTS), 4096)])
def test_decoupled_meta_gradient_equals_end_to_end_autograd(gpt2, aggregation, batch_size, editor_batch_size, device):
    model, tokenizer = gpt2
    model.to(device, torch.float64)
    editor = random_editor(model, aggregation).to(device)
    expected, expected_loss = reference_meta_gradient(editor, model, tokenizer, REQUESTS)
    weights_before = {name: param.clone() for name, param in model.state_dict().items()}

    losses = meta_gradient(
        editor, model, REQUESTS, tokenizer, batch_size=batch_size, editor_batch_size=editor_batch_size,
        c_loc=C_LOC, update_normalizer=False,
    )  # fmt: skip

    assert losses.total == pytest.approx(expected_loss, rel=1e-9)
    for name, param in editor.named_parameters():
        torch.testing.assert_close(grad_or_zero(param), expected[name], rtol=1e-7, atol=1e-12, msg=name)
        assert (grad_or_zero(param).abs().max() > 0) == (aggregation == "least_squares" or "log_lambda" not in name), (
            name
        )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights_before[name]), name
    assert all(param.grad is None for param in model.parameters())


def test_meta_gradient_with_the_edit_prompt_in_the_generalization_loss(gpt2):
    model, tokenizer = gpt2
    model.double()
    editor = random_editor(model, "least_squares")
    _, loss_on_rephrasings = reference_meta_gradient(editor, model, tokenizer, REQUESTS)
    expected, expected_loss = reference_meta_gradient(editor, model, tokenizer, REQUESTS, with_edit_prompt=True)
    losses = meta_gradient(
        editor, model, REQUESTS, tokenizer, batch_size=2, c_loc=C_LOC, update_normalizer=False,
        generalization_on_edit_prompt=True,
    )  # fmt: skip
    # The edit prompts' own keys make the edited model's loss there sensitive to how the normal equation is solved
    # (Cholesky here, LU in the reference): agreement to 1e-7 rather than 1e-9.
    assert losses.total == pytest.approx(expected_loss, rel=1e-7)
    assert losses.total != pytest.approx(loss_on_rephrasings, rel=1e-3)
    for name, param in editor.named_parameters():
        torch.testing.assert_close(grad_or_zero(param), expected[name], rtol=1e-5, atol=1e-10, msg=name)


def test_normalizer_updates_only_when_asked(gpt2):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.1)
    normalizer = editor.nets["128x32"].normalizer
    meta_gradient(editor, model, REQUESTS, tokenizer, update_normalizer=False)
    assert normalizer.count == 0 and torch.equal(normalizer.var, torch.ones_like(normalizer.var))
    meta_gradient(editor, model, REQUESTS, tokenizer)
    assert normalizer.count > 0
    assert not torch.equal(normalizer.mean, torch.zeros_like(normalizer.mean))


def test_normalizer_statistics_match_the_data():
    from malmen_hf.modeling_malmen import MalmenNormalizer

    normalizer = MalmenNormalizer(3, eps=1e-5)
    data = torch.randn(100, 3) * torch.tensor([1.0, 5.0, 0.1]) + 2
    for chunk in data.split([7, 50, 43]):
        normalizer.update(chunk)
    torch.testing.assert_close(normalizer.mean, data.mean(0))
    torch.testing.assert_close(normalizer.var, data.var(0, unbiased=False))
    assert normalizer.count == 100


@pytest.mark.parametrize("batch_size", [1, 2, len(REQUESTS)])
def test_fit_normalizer_matches_the_statistics_of_every_cached_token(gpt2, batch_size):
    model, tokenizer = gpt2
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=0.1)
    modules = {name: model.get_submodule(name) for name in editor.config.edit_modules}
    examples = tokenize_examples(tokenizer, [r.prompt for r in REQUESTS], [r.target for r in REQUESTS], "causal")
    with frozen(model), torch.enable_grad():
        cached = cache_keys_and_value_grads(
            model, modules, collate(examples, pad_id_of(tokenizer), "causal"), "causal"
        )
    rows = torch.cat([torch.cat(pair, dim=-1) for pair in cached.values()]).double()  # all layers share one net
    weights_before = {name: param.clone() for name, param in editor.state_dict().items() if "normalizer" not in name}

    fit_normalizer(editor, model, REQUESTS, tokenizer, batch_size=batch_size)

    normalizer = editor.nets["128x32"].normalizer
    assert normalizer.count == rows.shape[0]
    torch.testing.assert_close(normalizer.mean.double(), rows.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalizer.var.double(), rows.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    for name, tensor in weights_before.items():
        assert torch.equal(editor.state_dict()[name], tensor), name
    assert all(param.grad is None for param in model.parameters())
