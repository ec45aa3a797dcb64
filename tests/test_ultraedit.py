"""
`benchmarks/ultraedit.py` against UltraEdit's own update, transcribed from their code: two rounds on a tiny Llama in
float64, the weights and the running statistics after each, and the exact revert of each round.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from malmen_hf import EditRequest, edit_history
from malmen_hf.edits import normalizer_statistic_name
from malmen_hf.facts import tokenize_edit_prompts
from tests import tiny
from tests.benchmark_scripts import load_benchmark
from tests.conftest import FACTS, assert_bit_identical, snapshot

# gate_proj and up_proj share a shape, hence one normalizer (as in their Llama-3 runs); down_proj has its own.
MODULES = ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
# Answers of several tokens: UltraEdit's statistics take the unbiased variance of each batch's rows (NaN for one).
TARGETS = ["Tokyo Tower", "Paris and Rome", "English and French", "Microsoft Google", "the guitar", "Berlin Madrid"]
REQUESTS = [EditRequest(prompt, target) for (prompt, _), target in zip(FACTS, TARGETS, strict=False)]
ROUNDS = [REQUESTS[:3], REQUESTS[3:]]
# (d_in, d_out) of the edited layers, as their `get_shape` gives it, and malmen-hf's key of the net of that shape.
SHAPE_KEYS = {(32, 64): "32x64", (64, 32): "64x32"}
LR = 2.0**-10  # about 1e-3, exactly: the editor holds its lr in float32 before `.double()`
EDITOR_BATCH_SIZE = 4  # their editor.batch_size: rows per padded chunk, which changes nothing


# ---------------------------------------------------------------------------------------------------------------------
# REFERENCE: UltraEdit's update, transcribed from XiaojieGu/UltraEdit (commit 0beb222) in plain torch, one fact per
# tuple (dataset.batch_size 1), in float64 where they cast to float32. Not malmen-hf code: do not reuse elsewhere.
# ---------------------------------------------------------------------------------------------------------------------
class RunningMeanStd(nn.Module):  # nets.py:5-30
    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("n", torch.zeros(1))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.zeros(size))
        self.register_buffer("std", torch.zeros(size))

    def update(self, x: torch.FloatTensor):
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        self.n = n

    def forward(self, x: torch.FloatTensor) -> torch.FloatTensor:
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


def get_shape(module):  # util.py:38-41
    shape = tuple(module.weight.shape)
    return shape[::-1] if isinstance(module, nn.Linear) else shape


def pad_tensor(tensor, target_length, dim=0, padding_value=0):  # editor/ultraedit.py:26-38 (its unused mask left out)
    tensor_length = tensor.size(dim)
    if tensor_length >= target_length:
        return tensor.narrow(dim, 0, target_length)
    pad_shape = list(tensor.shape)
    pad_shape[dim] = target_length - tensor_length
    padding = torch.full(pad_shape, padding_value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, padding], dim=dim)


class Tracer:  # util.py:140-166: keys and value gradients at the answer tokens (editor.token == "ans")
    def __init__(self, module, cache_mask):
        cache_indices = torch.where(cache_mask)

        def forward_hook(module, inputs, outputs):
            self.keys = inputs[0][cache_indices].detach()

        def backward_hook(module, inputs_grad, outputs_grad):
            self.values_grad = outputs_grad[0][cache_indices].detach()

        self.handles = [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]


def reference_cache(model, tuples, normalizers):  # editor/ultraedit.py:101-125
    cached = {name: ([], []) for name in MODULES}
    for t in tuples:
        tracers = {name: Tracer(model.get_submodule(name), t["labels"] != -100) for name in MODULES}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])["logits"]
        ans_indice = torch.where(t["labels"] != -100)  # util.py:44-56, cross_entropy
        F.cross_entropy(logits[ans_indice], t["labels"][ans_indice]).backward()
        for tracer in tracers.values():
            for handle in tracer.handles:
                handle.remove()
        for name in MODULES:
            shape = get_shape(model.get_submodule(name))
            keys, values_grad = tracers[name].keys.to(torch.float64), tracers[name].values_grad.to(torch.float64)
            normalizers[str(shape)].update(torch.cat((keys, values_grad), -1))
            cached[name][0].append(keys)
            cached[name][1].append(values_grad)
    return cached


def reference_param_shifts(model, cached, normalizers):  # editor/ultraedit.py:60-97
    param_shifts = {}
    for name in MODULES:
        shape = get_shape(model.get_submodule(name))
        lifelong_normalizer = normalizers[str(shape)]
        hidden_states, values_grad = torch.cat(cached[name][0]), torch.cat(cached[name][1])
        v_feature = torch.empty((0, shape[1]), dtype=torch.float64)
        for start_idx in range(0, hidden_states.shape[0], EDITOR_BATCH_SIZE):
            end_idx = start_idx + EDITOR_BATCH_SIZE
            hidden_states_once = pad_tensor(hidden_states[start_idx:end_idx], EDITOR_BATCH_SIZE, 0)
            values_grad_once = pad_tensor(values_grad[start_idx:end_idx], EDITOR_BATCH_SIZE, 0)
            with torch.no_grad():
                z_feature = lifelong_normalizer(torch.cat((hidden_states_once, values_grad_once), -1))
                hidden_states_hat, pesudo_values_hat = z_feature.split([shape[0], shape[1]], -1)
                coeffs = -LR * (hidden_states_hat * hidden_states_hat).sum(-1).unsqueeze(-1)
            v_feature = torch.cat((v_feature, coeffs * pesudo_values_hat))
        with torch.no_grad():
            mat = hidden_states.T @ hidden_states + torch.eye(shape[0], dtype=torch.float64)
        v_feature = v_feature[: hidden_states.shape[0], :]
        param_shifts[name] = torch.linalg.solve(mat, hidden_states.T @ v_feature)
    return param_shifts


def reference_edit_model(model, param_shifts):  # editor/base.py:59-71, is_reverse=False
    for name, param_shift in param_shifts.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            param_shift = param_shift.T
        module.weight.data += param_shift.to(module.weight.data.dtype)


def reference_tuples(tokenizer, facts):
    """Their `tok_tuples` (data/zsre.py): the prompt and the answer but its last token, labels shifted by one."""
    tuples = []
    for example in tokenize_edit_prompts(tokenizer, facts, "causal"):
        input_ids, labels = torch.tensor([example.input_ids[:-1]]), torch.tensor([example.labels[:-1]])
        tuples.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return tuples


# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def llama64():
    tokenizer = tiny.llama_tokenizer()
    return tiny.llama_model(len(tokenizer)).double(), tokenizer


# Their tracer hooks the first edited layer, whose input needs no gradient: torch warns, and the hook still fires.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_two_rounds_match_ultraedits_update_and_each_reverts_exactly(llama64):
    ultraedit = load_benchmark("ultraedit")
    model, tokenizer = llama64
    reference = copy.deepcopy(model)
    for param in reference.parameters():  # model.py: only the edited weights require gradients
        param.requires_grad = False
    for name in MODULES:
        reference.get_submodule(name).weight.requires_grad = True
    normalizers = {str(shape): RunningMeanStd(sum(shape)).double() for shape in SHAPE_KEYS}
    editor = ultraedit.ultraedit_editor(model, MODULES, lr=LR).double()

    states, histories, handles = [snapshot(model)], [edit_history(model)], []
    for facts in ROUNDS:
        tuples = reference_tuples(tokenizer, facts)
        assert all((t["labels"] != -100).sum() >= 2 for t in tuples)
        cached = reference_cache(reference, tuples, normalizers)
        reference_edit_model(reference, reference_param_shifts(reference, cached, normalizers))
        handles.append(editor.apply_edits(model, facts, tokenizer=tokenizer, batch_size=1, editor_batch_size=5))

        for name in MODULES:
            key = f"{name}.weight"
            expected, actual = reference.state_dict()[key], model.state_dict()[key]
            shift = expected - states[-1][key]
            assert shift.abs().max() > 1e-3 * states[-1][key].abs().max()  # the round moved the weight
            torch.testing.assert_close(actual - states[-1][key], shift, rtol=0, atol=1e-10 * shift.abs().max())
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
        history = edit_history(model)
        for shape, shape_key in SHAPE_KEYS.items():
            for buffer, statistic in normalizers[str(shape)].state_dict().items():
                name = normalizer_statistic_name(shape_key, buffer)
                torch.testing.assert_close(history[name], statistic, rtol=1e-10, atol=1e-12 * statistic.abs().max())
        states.append(snapshot(model))
        histories.append(history)

    for handle, state, history in zip(handles[::-1], states[-2::-1], histories[-2::-1], strict=True):
        handle.revert()
        assert_bit_identical(model, state)
        assert edit_history(model).keys() == history.keys()
        assert all(edit_history(model)[name] is tensor for name, tensor in history.items())
