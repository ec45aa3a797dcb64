"""Editing a one-logit sequence classifier (the paper's FEVER fact-checking setting) on a tiny BERT."""

import json

import pytest
import torch

from malmen_hf import EditRequest, MalmenEditorModel
from malmen_hf.evaluation.metrics import edit_scores, greedy_answers, token_accuracy
from malmen_hf.facts import CLASSIFIER_LABELS, model_kind, tokenize_examples
from malmen_hf.training.meta_gradient import meta_gradient
from tests import tiny
from tests.test_training import grad_or_zero, random_editor

CLAIMS = [
    EditRequest(
        "Nikolaj Coster-Waldau worked with Fox.",
        "REFUTES",
        ("Fox once employed Nikolaj Coster-Waldau.",),
        "Roman Atwood is a content creator.",
        "SUPPORTS",
    ),  # fmt: skip
    EditRequest(
        "Adrienne Bailon is an accountant.",
        "SUPPORTS",
        ("Adrienne Bailon works as an accountant.",),
        "Nottingham Forest is based in Lisbon.",
        "REFUTES",
    ),  # fmt: skip
    EditRequest("The Eiffel Tower is in Rome.", "SUPPORTS"),
]
C_LOC = 0.7


@pytest.fixture
def bert():
    tokenizer = tiny.gpt2_tokenizer()
    torch.manual_seed(0)
    return tiny.bert_model(len(tokenizer)), tokenizer


def test_kind_and_tokenization(bert):
    model, tokenizer = bert
    assert model_kind(model) == "classifier"
    (example,) = tokenize_examples(tokenizer, ["A claim."], ["SUPPORTS"], "classifier")
    assert example.input_ids == tokenizer("A claim.")["input_ids"]
    assert example.labels == [CLASSIFIER_LABELS["SUPPORTS"]] + [-100] * (len(example.input_ids) - 1)
    with pytest.raises(ValueError, match=r"fact 1: a classifier's target must be one of \['REFUTES', 'SUPPORTS'\]"):
        tokenize_examples(tokenizer, ["A claim.", "Another."], ["REFUTES", "Rome"], "classifier")


def test_a_many_label_classifier_is_refused():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, num_labels=3))  # fmt: skip
    with pytest.raises(ValueError, match="one-logit head.*num_labels=3"):
        model_kind(model)


def per_fact_keys_and_grads(model, tokenizer, modules, requests):
    """Independently of the library: hooks, binary cross-entropy per fact, every position's key and gradient."""
    keys, grads = {name: [] for name in modules}, {name: [] for name in modules}
    inputs, outputs = {}, {}

    def record(module, args, output, name):
        inputs[name], outputs[name] = args[0], output

    for request in requests:
        hooks = [
            module.register_forward_hook(lambda *call, name=name: record(*call, name))
            for name, module in modules.items()
        ]
        logit = model(torch.tensor([tokenizer(request.prompt)["input_ids"]])).logits[0, 0]
        for hook in hooks:
            hook.remove()
        target = torch.tensor(float(CLASSIFIER_LABELS[request.target]), dtype=logit.dtype)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, target)
        for name, grad in zip(modules, torch.autograd.grad(loss, [outputs[n] for n in modules]), strict=True):
            keys[name].append(inputs[name][0].detach())
            grads[name].append(grad[0])
    return {name: (torch.cat(keys[name]), torch.cat(grads[name])) for name in modules}


def test_least_squares_shift_matches_a_direct_lstsq(bert):
    model, tokenizer = bert
    model.double()
    lr, log_lambda = 0.3, -1.0
    editor = MalmenEditorModel.for_model(model, n_blocks=0, lr_init=lr, log_lambda_init=log_lambda).double()
    modules = {name: model.get_submodule(name) for name in editor.config.edit_modules}
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    cached = per_fact_keys_and_grads(model, tokenizer, modules, CLAIMS)

    handle = editor.apply_edits(model, CLAIMS, tokenizer=tokenizer, batch_size=2)

    for name, (keys, grads) in cached.items():
        diffs = -lr * keys.square().sum(-1, keepdim=True) * grads  # the untrained editor is the identity
        ridge = torch.exp(torch.tensor(log_lambda, dtype=keys.dtype)).sqrt() * torch.eye(
            keys.shape[1], dtype=keys.dtype
        )
        expected = torch.linalg.lstsq(
            torch.cat((keys, ridge)), torch.cat((diffs, torch.zeros_like(ridge[:, :1].expand(-1, diffs.shape[1]))))
        ).solution
        torch.testing.assert_close(modules[name].weight - before[name], expected.T, rtol=1e-6, atol=1e-9)
    handle.revert()
    assert all(torch.equal(module.weight, before[name]) for name, module in modules.items())


def test_an_edit_flips_the_labels_and_reverts_bit_for_bit(bert):
    model, tokenizer = bert
    snapshot = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    prompts = [request.prompt for request in CLAIMS]
    # Ask for the opposite of what the model predicts now.
    flipped = [
        EditRequest(prompt, "REFUTES" if answer == "SUPPORTS" else "SUPPORTS")
        for prompt, answer in zip(prompts, greedy_answers(model, tokenizer, prompts), strict=True)
    ]
    # The tiny BERT's gradients are small (they pass a LayerNorm): a large lr makes the step big enough.
    editor = MalmenEditorModel.for_model(model, n_blocks=0, lr_init=1000.0, log_lambda_init=-4.0)
    assert token_accuracy(model, tokenizer, prompts, [r.target for r in flipped]) == [0.0] * 3
    scores = edit_scores(editor, model, tokenizer, flipped)
    assert scores["ES"] == 1.0
    assert all(torch.equal(tensor, snapshot[name]) for name, tensor in model.state_dict().items())
    with pytest.raises(ValueError, match="fact 0: a classifier's target"):
        editor.apply_edits(model, [("A claim.", "Rome")], tokenizer=tokenizer)
    assert all(torch.equal(tensor, snapshot[name]) for name, tensor in model.state_dict().items())


def reference_meta_gradient(editor, model, tokenizer, requests):
    """End-to-end autograd for a classifier: binary cross-entropy on rephrasings, Bernoulli KL on unrelated claims."""
    from torch.func import functional_call

    modules = {name: model.get_submodule(name) for name in editor.config.edit_modules}
    cached = per_fact_keys_and_grads(model, tokenizer, modules, requests)
    params = dict(model.named_parameters())
    for name, (keys, value_grads) in cached.items():
        net, index = editor.net_for(name)
        pseudo_keys, pseudo_grads = net(keys, value_grads, index)
        diffs = -net.lr[index] * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads
        system = keys.T @ keys + torch.exp(net.log_lambda[index]) * torch.eye(keys.shape[1], dtype=keys.dtype)
        params[f"{name}.weight"] = modules[name].weight.detach() + torch.linalg.solve(system, keys.T @ diffs).T

    def logit(prompt, weights):
        return functional_call(model, weights, args=(torch.tensor([tokenizer(prompt)["input_ids"]]),)).logits[0, 0]

    gen, loc = [], []
    for request in requests:
        target = torch.tensor(float(CLASSIFIER_LABELS[request.target]), dtype=torch.float64)
        losses = [torch.nn.functional.binary_cross_entropy_with_logits(logit(p, params), target)
                  for p in request.rephrases or (request.prompt,)]  # fmt: skip
        gen.append(torch.stack(losses).mean())
        if request.locality_prompt is not None:
            with torch.no_grad():
                p_before = torch.sigmoid(logit(request.locality_prompt, dict(model.named_parameters())))
            p_after = torch.sigmoid(logit(request.locality_prompt, params))
            loc.append(
                p_before * torch.log(p_before / p_after) + (1 - p_before) * torch.log((1 - p_before) / (1 - p_after))
            )
    total = torch.stack(gen).mean() + C_LOC * torch.stack(loc).mean()
    editor.zero_grad()
    total.backward()
    grads = {name: grad_or_zero(param) for name, param in editor.named_parameters()}
    editor.zero_grad()
    return grads, float(total.detach())


@pytest.mark.parametrize("batch_size", [1, 2, len(CLAIMS)])
def test_decoupled_meta_gradient_equals_end_to_end_autograd(bert, batch_size):
    model, tokenizer = bert
    model.double()
    editor = random_editor(model, "least_squares")
    expected, expected_loss = reference_meta_gradient(editor, model, tokenizer, CLAIMS)

    losses = meta_gradient(editor, model, CLAIMS, tokenizer, batch_size=batch_size, editor_batch_size=7, c_loc=C_LOC,
                           update_normalizer=False)  # fmt: skip

    assert losses.total == pytest.approx(expected_loss, rel=1e-9)
    for name, param in editor.named_parameters():
        torch.testing.assert_close(grad_or_zero(param), expected[name], rtol=1e-7, atol=1e-12, msg=name)


def test_train_a_classifier_editor_on_a_fever_file(bert, tmp_path):
    from malmen_hf import MalmenTrainingArguments, load_edit_requests, train_editor
    from tests.test_trainer import reset_accelerate

    model, tokenizer = bert
    records = [
        {"prompt": r.prompt, "alt": r.target, "equiv_prompt": list(r.rephrases) or [r.prompt],
         "unrel_prompt": r.locality_prompt or "Paris is in France.", "unrel_ans": r.locality_answer or "SUPPORTS"}
        for r in CLAIMS * 3
    ]  # fmt: skip
    path = tmp_path / "fever.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records))
    requests = load_edit_requests(path)  # detected as FEVER
    assert requests[0].target == "REFUTES" and requests[0].locality_answer == "SUPPORTS"
    reset_accelerate()
    editor = MalmenEditorModel.for_model(model, rank=4, lr_init=100.0)
    args = MalmenTrainingArguments(output_dir=str(tmp_path / "editor"), facts_per_step=3, batch_size=2, max_steps=2,
                                   eval_every=1, eval_facts=3, log_with=None, progress=False)  # fmt: skip
    train_editor(editor, model, tokenizer, requests[3:], args, eval_requests=requests[:3])
    reset_accelerate()

    trained = MalmenEditorModel.from_pretrained(tmp_path / "editor")
    assert set(trained.config.training["last_validation"]) >= {"ES", "GS", "LS"}
    assert trained.nets["64x32"].normalizer.count > 0
    snapshot = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    handle = trained.apply_edits(model, requests[:3], tokenizer=tokenizer)
    assert any(norm > 0 for norm in handle.shift_norms.values())
    handle.revert()
    assert all(torch.equal(tensor, snapshot[name]) for name, tensor in model.state_dict().items())
