"""benchmarks/distill_probe.py: its ridge student is the least-squares map an independent solver finds."""

import torch

from malmen_hf.training.distillation import DistillationData
from tests.benchmark_scripts import load_benchmark


def _data(generator: torch.Generator, rows: int) -> DistillationData:
    name = "layers.0.mlp.down_proj"
    keys, grads = torch.randn(rows, 6, generator=generator), torch.randn(rows, 5, generator=generator)
    targets = torch.randn(rows, 5, generator=generator)
    return DistillationData({name: keys}, {name: grads}, {name: targets})


def test_ridge_loss_matches_lstsq_of_the_augmented_system():
    probe = load_benchmark("distill_probe")
    generator = torch.Generator().manual_seed(0)
    fitted, held_out = _data(generator, 40), _data(generator, 9)
    name, strength = "layers.0.mlp.down_proj", 3.0

    def features(data):
        keys, grads = data.keys[name].double(), data.value_grads[name].double()
        return torch.cat((keys / keys.norm(dim=1, keepdim=True), grads / grads.norm(dim=1, keepdim=True)), 1)

    inputs = features(fitted)
    # min |X W - Y|^2 + s |W|^2 is the plain least squares of X stacked on sqrt(s) I, Y on zeros.
    stacked = torch.cat((inputs, strength**0.5 * torch.eye(inputs.shape[1], dtype=inputs.dtype)))
    targets = torch.cat((fitted.targets[name].double(), torch.zeros(inputs.shape[1], 5, dtype=inputs.dtype)))
    weights = torch.linalg.lstsq(stacked, targets).solution
    truth = held_out.targets[name].double()
    expected = ((features(held_out) @ weights - truth).square().sum() / truth.square().sum()).item()

    assert (
        abs(probe.ridge_loss(fitted, held_out, strength) - expected) < 1e-6 * expected
    )  # the probe normalizes in float32
    assert probe.ridge_loss(fitted, held_out, 1e9) > 0.99  # all but zero weights: as bad as predicting zero
