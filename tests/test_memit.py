"""
MEMIT in the library against a transcription of its official code (kmeng01/memit: `compute_z`, `compute_ks`,
`execute_memit`), fact by fact with `torch.optim.Adam` as there, on a tiny GPT-2 with the same templates and
covariance: the same values and the same weight change. The model has a block above the edited ones: a delta in the
last block's output would reach no target token (the head reads each position alone).
"""

import contextlib
import copy

import pytest
import torch

from malmen_hf import MalmenEditorModel, edit_history, memit
from malmen_hf.caching import frozen
from malmen_hf.memit import MemitSettings, apply_memit, generate_context_templates, optimize_residuals
from tests import tiny
from tests.conftest import SUBJECT_REQUESTS, assert_bit_identical, snapshot

REQUESTS = SUBJECT_REQUESTS[:5]
TEMPLATES = [["{}"], ["The Louvre is in Paris. {}", "Because of Rome. {}"]]
MODULES = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
RESIDUAL = "transformer.h.1"
PRESERVE = 4.0  # MEMIT's mom2_update_weight


@pytest.fixture(scope="module")
def setup():
    tokenizer = tiny.gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as MEMIT's experiments set it
    model = tiny.gpt2_model(
        len(tokenizer), num_layers=3
    ).double()  # float64: the two orders of summation agree to 1e-10
    editor = MalmenEditorModel.for_model(
        model, edit_modules=MODULES, covariance_weight=PRESERVE / len(REQUESTS), covariance_rank=10**6,
        log_lambda_init=-60.0,
    ).double()  # fmt: skip
    # A well-conditioned covariance (the tiny corpus has fewer tokens than key features): MEMIT solves without a ridge.
    generator = torch.Generator().manual_seed(0)
    for name in MODULES:
        factor = torch.randn(128, 512, generator=generator, dtype=torch.float64)
        editor.key_covariance(name).fit(factor @ factor.T, 512)
    return model, tokenizer, editor


# ---- The transcription of MEMIT's code (their names, one fact at a time) ----


def memit_lookup_index(tokenizer, template: str, subject: str) -> int:
    """`repr_tools.get_words_idxs_in_templates(..., subtoken="last")`: prefix, word and suffix tokenized apart."""
    prefix = template[: template.index("{}")]
    word = subject
    if prefix:
        assert prefix[-1] == " "
        prefix, word = prefix[:-1], f" {subject.strip()}"
    return len(tokenizer(prefix)["input_ids"]) + len(tokenizer(word)["input_ids"]) - 1


def memit_compute_z(model, tokenizer, request, block, templates, hp: MemitSettings) -> torch.Tensor:
    prompt = request.prompt.replace(request.subject, "{}")
    target_ids = tokenizer(" " + request.target)["input_ids"]
    rewriting = [
        context.format(prompt) + tokenizer.decode(target_ids[:-1]) for group in templates for context in group
    ]
    all_prompts = [*rewriting, "{} is a"]
    input_tok = tokenizer([p.format(request.subject) for p in all_prompts], padding=True, return_tensors="pt")
    targets = torch.full((len(rewriting), input_tok["input_ids"].shape[1]), -100)
    for i in range(len(rewriting)):
        length = int(input_tok["attention_mask"][i].sum())
        targets[i, length - len(target_ids) : length] = torch.tensor(target_ids)
    lookups = [memit_lookup_index(tokenizer, p, request.subject) for p in all_prompts]
    delta = torch.zeros(model.config.n_embd, dtype=torch.float64, requires_grad=True)
    target_init = kl_init = None

    def edit_output(module, args, output):
        nonlocal target_init
        hidden = output[0] if isinstance(output, tuple) else output
        if target_init is None:
            target_init = hidden[0, lookups[0]].detach().clone()
        hidden = hidden.clone()
        for i, index in enumerate(lookups):
            hidden[i, index] += delta
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    optimizer = torch.optim.Adam([delta], lr=hp.step_size)
    handle = model.get_submodule(block).register_forward_hook(edit_output)
    try:
        for step in range(hp.num_steps):
            optimizer.zero_grad()
            logits = model(**input_tok).logits
            kl_log_probs = torch.log_softmax(logits[-1:, lookups[-1]], dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits[: len(rewriting)], dim=2)
            # MEMIT's labels sit at the positions that predict them (the prompt's last token predicts the first).
            picked = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
            mask = (targets != -100).double()
            nll = (-(picked * mask).sum(1) / len(target_ids)).mean()
            kl = torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
            loss = nll + hp.kl_factor * kl + hp.weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)
            if loss < hp.stop_loss or step == hp.num_steps - 1:
                break
            loss.backward()
            optimizer.step()
            max_norm = hp.clamp_norm_factor * target_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    return target_init + delta.detach()


def memit_read(model, tokenizer, prompts, subjects, module_name, read_input):
    """`get_module_input_output_at_words`: a module's input or output at each prompt's subject's last token."""
    found = []
    handle = model.get_submodule(module_name).register_forward_hook(
        lambda module, args, output: found.append(args[0] if read_input else output)
    )
    try:
        with torch.no_grad():
            for prompt, subject in zip(prompts, subjects, strict=True):
                model(**tokenizer(prompt.format(subject), return_tensors="pt"))
    finally:
        handle.remove()
    return torch.stack(
        [value[0, memit_lookup_index(tokenizer, p, s)] for value, p, s in zip(found, prompts, subjects, strict=True)]
    )


def memit_execute(model, tokenizer, requests, zs, templates, covariances) -> dict[str, torch.Tensor]:
    weights = {name: model.get_submodule(name).weight for name in MODULES}
    copies = {name: weight.detach().clone() for name, weight in weights.items()}
    prompts = [r.prompt.replace(r.subject, "{}") for r in requests]
    subjects = [r.subject for r in requests]
    updates = {}
    try:
        for i, name in enumerate(MODULES):
            contexts = [context.format(p) for p in prompts for group in templates for context in group]
            words = [s for s in subjects for group in templates for _ in group]
            keys = memit_read(model, tokenizer, contexts, words, name, read_input=True)
            per_fact = keys.view(len(requests), -1, keys.shape[-1])
            layer_ks = torch.stack([per_fact[:, :1].mean(1), per_fact[:, 1:].mean(1)], 1).mean(1).T  # (d_in, n)
            current = memit_read(model, tokenizer, prompts, subjects, RESIDUAL, read_input=False).T
            adj_k = torch.linalg.solve(PRESERVE * covariances[name] + layer_ks @ layer_ks.T, layer_ks)
            resid = (zs.T - current) / (len(MODULES) - i)
            updates[name] = resid @ adj_k.T  # (d_out, d_in): a Conv1D weight is (d_in, d_out)
            with torch.no_grad():
                weights[name][...] = copies[name] + updates[name].T
    finally:
        with torch.no_grad():
            for name, weight in weights.items():
                weight[...] = copies[name]
    return updates


# ---- The tests ----


def test_values_match_memits_compute_z(setup):
    model, tokenizer, _ = setup
    settings = MemitSettings(num_steps=12)
    with frozen(model), torch.enable_grad():
        residuals, deltas = optimize_residuals(
            model, tokenizer, REQUESTS, residual_module=RESIDUAL, context_templates=TEMPLATES, settings=settings,
            batch_size=3,
        )  # fmt: skip
        expected = torch.stack([memit_compute_z(model, tokenizer, r, RESIDUAL, TEMPLATES, settings) for r in REQUESTS])
    assert (deltas.norm(dim=1) / residuals.norm(dim=1)).min() > 0.05  # the values did move
    torch.testing.assert_close(residuals + deltas, expected, rtol=1e-7, atol=1e-7)


def test_weight_change_matches_memits_and_reverts_bit_for_bit(setup):
    model, tokenizer, editor = setup
    before = snapshot(model)
    settings = MemitSettings(num_steps=8)
    targets = torch.stack([memit_compute_z(model, tokenizer, r, RESIDUAL, TEMPLATES, settings) for r in REQUESTS])
    covariances = {name: editor.key_covariance(name).matrix() for name in MODULES}
    expected = memit_execute(model, tokenizer, REQUESTS, targets, TEMPLATES, covariances)
    handle = apply_memit(editor, model, REQUESTS, tokenizer=tokenizer, settings=settings, context_templates=TEMPLATES)
    assert handle.aggregation == "memit" and handle.num_facts == len(REQUESTS)
    for name in MODULES:
        shift = model.get_submodule(name).weight.detach() - before[f"{name}.weight"]
        torch.testing.assert_close(shift, expected[name].T, rtol=1e-7, atol=1e-10)
        assert expected[name].abs().max() > 1e-3
    handle.revert()
    assert_bit_identical(model, before)


def test_lower_blocks_replayed_give_the_same_values_as_running_them(monkeypatch):
    # (GPT-2's blocks are replayed in the tests above, against the transcription that runs every block.)
    tokenizer = tiny.llama_tokenizer()
    model = tiny.llama_model(len(tokenizer)).double()
    kwargs = dict(residual_module="model.layers.0", context_templates=TEMPLATES, settings=MemitSettings(num_steps=6))
    with frozen(model), torch.enable_grad():
        replayed = optimize_residuals(model, tokenizer, REQUESTS[:3], **kwargs)
        monkeypatch.setattr(
            memit,
            "_lower_blocks_replayed",
            lambda model, name, batch: contextlib.nullcontext(model.get_submodule(name)),
        )
        every_block = optimize_residuals(model, tokenizer, REQUESTS[:3], **kwargs)
    assert [block.__class__.__name__ for block in model.model.layers] == ["LlamaDecoderLayer"] * 2
    assert (replayed[1].norm(dim=1) / replayed[0].norm(dim=1)).min() > 0.05
    torch.testing.assert_close(replayed, every_block, rtol=1e-7, atol=1e-9)


def test_context_templates_are_memits_shape_and_reproducible():
    tokenizer = tiny.gpt2_tokenizer()
    model = tiny.gpt2_model(len(tokenizer))
    state = torch.random.get_rng_state()
    templates = generate_context_templates(model, tokenizer, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert templates == generate_context_templates(model, tokenizer, seed=3)
    assert templates[0] == ["{}"] and len(templates[1]) == 5
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1])


def test_facts_without_a_subject_are_refused_before_anything_runs(setup):
    model, tokenizer, editor = setup
    before = snapshot(model)
    with pytest.raises(ValueError, match="fact 1: MEMIT .* needs a 'subject'"):
        apply_memit(editor, model, [REQUESTS[0], ("The capital of Italy is", "Paris")], tokenizer=tokenizer)
    assert_bit_identical(model, before)


def test_null_space_projector_keeps_alphaedits_small_singular_directions():
    generator = torch.Generator().manual_seed(1)
    factor = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    covariance = factor @ torch.diag(torch.logspace(-4, 1, 16, dtype=torch.float64)) @ factor.T
    eigenvalues = torch.linalg.eigvalsh(covariance)
    fraction = float(eigenvalues[:5].sum() / eigenvalues.sum()) * 1.0001  # the five smallest directions
    # AlphaEdit's get_project: the singular vectors of the covariance whose singular values are below a threshold.
    u, s, _ = torch.linalg.svd(covariance)
    small = s < (eigenvalues[4] + eigenvalues[5]) / 2
    torch.testing.assert_close(memit.null_space_projector(covariance, fraction), u[:, small] @ u[:, small].T)
    assert int(small.sum()) == 5


def alphaedit_execute(model, tokenizer, requests, zs, templates, projectors, cache_c, l2) -> dict[str, torch.Tensor]:
    """jianghoucheng/AlphaEdit's `apply_AlphaEdit_to_model` loop (keys (d_in, n), weights updated layer by layer,
    then `cache_c` grows by each layer's keys recomputed on the edited model); returns each layer's update."""
    prompts = [r.prompt.replace(r.subject, "{}") for r in requests]
    subjects = [r.subject for r in requests]
    updates = {}

    def layer_keys(name):
        contexts = [context.format(p) for p in prompts for group in templates for context in group]
        words = [s for s in subjects for group in templates for _ in group]
        per_fact = memit_read(model, tokenizer, contexts, words, name, read_input=True).view(len(requests), 3, -1)
        return torch.stack([per_fact[:, :1].mean(1), per_fact[:, 1:].mean(1)], 1).mean(1).T

    for i, name in enumerate(MODULES):
        keys = layer_keys(name)
        current = memit_read(model, tokenizer, prompts, subjects, RESIDUAL, read_input=False).T
        resid = (zs.T - current) / (len(MODULES) - i)
        eye = torch.eye(keys.shape[0], dtype=keys.dtype)
        updates[name] = torch.linalg.solve(
            projectors[name] @ (keys @ keys.T + cache_c[name]) + l2 * eye, projectors[name] @ keys @ resid.T
        )  # (d_in, d_out): a Conv1D weight's shape
        with torch.no_grad():
            model.get_submodule(name).weight[...] += updates[name]
    for name in MODULES:
        cache_c[name] = cache_c[name] + layer_keys(name) @ layer_keys(name).T
    return updates


def test_alphaedit_rounds_match_alphaedits_code_and_keep_the_history(setup):
    model, tokenizer, _ = setup
    model = copy.deepcopy(model)
    before = snapshot(model)
    editor = MalmenEditorModel.for_model(
        model, edit_modules=MODULES, covariance_weight=1.0, covariance_rank=10**6, log_lambda_init=0.0,
        history_weight=1.0,  # AlphaEdit adds the earlier rounds' K K^T as they are
    ).double()  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for name in MODULES:
        factor = torch.randn(128, 40, generator=generator, dtype=torch.float64)  # 88 directions nearly unused
        editor.key_covariance(name).fit(factor @ factor.T + 1e-6 * torch.eye(128, dtype=torch.float64), 1)
    projectors = {name: memit.null_space_projector(editor.key_covariance(name).matrix(), 1e-3) for name in MODULES}
    settings = MemitSettings(num_steps=6)
    reference = copy.deepcopy(model)
    cache_c = {name: torch.zeros(128, 128, dtype=torch.float64) for name in MODULES}
    handles = []
    for facts in (REQUESTS[:3], REQUESTS[3:]):
        zs = torch.stack([memit_compute_z(reference, tokenizer, r, RESIDUAL, TEMPLATES, settings) for r in facts])
        expected = alphaedit_execute(reference, tokenizer, facts, zs, TEMPLATES, projectors, cache_c, l2=1.0)
        weights = snapshot(model)
        handles.append(apply_memit(
            editor, model, facts, tokenizer=tokenizer, settings=settings, context_templates=TEMPLATES,
            null_space_fraction=1e-3,
        ))  # fmt: skip
        assert handles[-1].aggregation == "alphaedit"
        for name in MODULES:
            shift = model.get_submodule(name).weight.detach() - weights[f"{name}.weight"]
            torch.testing.assert_close(shift, expected[name], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(edit_history(model)[name].double(), cache_c[name], rtol=1e-6, atol=1e-9)
    for handle in reversed(handles):
        handle.revert()
    assert_bit_identical(model, before)
    assert edit_history(model) == {}


def test_a_memit_round_keeps_the_normalizer_statistics_of_earlier_rounds(setup):
    model, tokenizer, _ = setup
    model = copy.deepcopy(model)
    malmen = MalmenEditorModel.for_model(model, edit_modules=MODULES, lifelong_normalization=True, history_weight=1.0)
    malmen.apply_edits(model, REQUESTS[:2], tokenizer=tokenizer)
    before = edit_history(model)
    statistics = [name for name in before if name not in MODULES]
    editor = MalmenEditorModel.for_model(model, edit_modules=MODULES, history_weight=1.0)
    settings = MemitSettings(num_steps=2)
    handle = apply_memit(
        editor, model, REQUESTS[2:], tokenizer=tokenizer, settings=settings, context_templates=TEMPLATES
    )
    after = edit_history(model)
    assert statistics and all(torch.equal(after[name], before[name]) for name in statistics)
    assert all(not torch.equal(after[name], before[name]) for name in MODULES)  # this round's keys are added
    handle.revert()
    assert all(edit_history(model)[name] is before[name] for name in before)
