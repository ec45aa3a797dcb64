import pytest
import torch

from malmen_hf import least_squares_shift, summed_shift, value_differences
from malmen_hf.functional import dual_least_squares_shift


def test_least_squares_shift_matches_lstsq_of_the_ridge_system():
    torch.manual_seed(0)
    keys, diffs = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    log_lambda = torch.tensor(0.3)

    shift = least_squares_shift((keys.T @ keys).float(), (keys.T @ diffs).float(), log_lambda)

    # Ridge regression is ordinary least squares on [K; sqrt(lambda) I] S = [D; 0].
    ridge_rows = torch.exp(log_lambda / 2).double() * torch.eye(6, dtype=torch.float64)
    expected = torch.linalg.lstsq(
        torch.cat([keys, ridge_rows]), torch.cat([diffs, torch.zeros(6, 3).double()])
    ).solution
    assert shift.dtype == torch.float32
    assert (
        least_squares_shift((keys.T @ keys).bfloat16(), (keys.T @ diffs).bfloat16(), log_lambda).dtype == torch.float32
    )
    torch.testing.assert_close(shift.double(), expected, rtol=1e-4, atol=1e-5)


def test_least_squares_shift_with_fewer_tokens_than_features():
    torch.manual_seed(1)
    keys, diffs = torch.randn(3, 8), torch.randn(3, 5)
    shift = least_squares_shift(keys.T @ keys, keys.T @ diffs, torch.tensor(-2.0))
    expected = torch.linalg.solve(keys.T @ keys + torch.exp(torch.tensor(-2.0)) * torch.eye(8), keys.T @ diffs)
    torch.testing.assert_close(shift, expected, rtol=1e-4, atol=1e-5)


def test_summed_shift_is_the_sum_of_outer_products():
    torch.manual_seed(2)
    pseudo_keys, pseudo_grads = torch.randn(10, 4), torch.randn(10, 3)
    lr = torch.tensor(0.5)
    expected = -lr * sum(torch.outer(k, g) for k, g in zip(pseudo_keys, pseudo_grads, strict=True))
    torch.testing.assert_close(summed_shift(pseudo_keys.T @ pseudo_grads, lr), expected)


def test_value_differences():
    keys, pseudo_keys, pseudo_grads = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 3)
    lr = torch.tensor(2.0)
    expected = torch.stack(
        [-2.0 * torch.dot(k, kt) * g for k, kt, g in zip(keys, pseudo_keys, pseudo_grads, strict=True)]
    )
    torch.testing.assert_close(value_differences(keys, pseudo_keys, pseudo_grads, lr), expected)


def test_least_squares_shift_falls_back_to_float64_when_float32_is_not_definite():
    torch.manual_seed(3)
    # Two almost parallel large keys: their float32 Gram matrix is singular to rounding, and the ridge is tiny.
    base = torch.randn(64, dtype=torch.float64) * 100
    keys = torch.stack([base, base + 1e-6 * torch.randn(64, dtype=torch.float64)] * 8)
    diffs = torch.randn(16, 4, dtype=torch.float64)
    log_lambda = torch.tensor(-12.0)
    gram = (keys.T @ keys).float()
    assert torch.linalg.cholesky_ex(gram + torch.exp(log_lambda) * torch.eye(64)).info != 0
    shift = least_squares_shift(gram, (keys.T @ diffs).float(), log_lambda)
    assert torch.isfinite(shift).all()


@pytest.mark.parametrize("num_tokens", [3, 40])
def test_dual_least_squares_shift_equals_the_primal_one(num_tokens):
    torch.manual_seed(4)
    keys, diffs = torch.randn(num_tokens, 8, dtype=torch.float64), torch.randn(num_tokens, 5, dtype=torch.float64)
    log_lambda = torch.tensor(-1.5)
    expected = least_squares_shift(keys.T @ keys, keys.T @ diffs, log_lambda)
    torch.testing.assert_close(dual_least_squares_shift(keys, diffs, log_lambda), expected)
    assert dual_least_squares_shift(keys.float(), diffs.bfloat16(), log_lambda).dtype == torch.float32
