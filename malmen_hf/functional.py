"""The editing maths of MALMEN as plain functions on tensors (ALGORITHM.md steps 2-3)."""

import torch


def value_differences(
    keys: torch.Tensor, pseudo_keys: torch.Tensor, pseudo_value_grads: torch.Tensor, lr: torch.Tensor
) -> torch.Tensor:
    """`d_i = -lr <k_i, k~_i> g~_i` for each token `i`: the value each key should map to, minus what it maps to now."""
    return -lr * (keys * pseudo_keys).sum(dim=-1, keepdim=True) * pseudo_value_grads


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32, or float64 if it already is: losses and solves never run in half precision."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def ridge_system(gram: torch.Tensor, log_lambda: torch.Tensor) -> torch.Tensor:
    """`gram + exp(log_lambda) I`: the matrix of every ridge normal equation solved here, forward and backward."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return gram + torch.exp(log_lambda.to(gram.dtype)) * eye


def least_squares_shift(gram: torch.Tensor, cross: torch.Tensor, log_lambda: torch.Tensor) -> torch.Tensor:
    """
    The ridge least-squares solution `S = (K^T K + exp(lambda) I)^-1 K^T D` of `K S ~= D`, in float32 (float64 if
    the inputs are float64), whatever the dtype of the base model.

    Args:
        gram (`torch.Tensor` of shape `(d_in, d_in)`): `K^T K`, summed over all tokens.
        cross (`torch.Tensor` of shape `(d_in, d_out)`): `K^T D`, summed over all tokens.
        log_lambda (`torch.Tensor`): scalar, the log of the ridge coefficient.

    Raises:
        `torch.linalg.LinAlgError` if the system is not positive definite (e.g. it holds NaN or infinity).
    """
    gram, cross = at_least_float32(gram), at_least_float32(cross)
    system = ridge_system(gram, log_lambda)
    # K^T K + exp(lambda) I is symmetric positive definite: Cholesky is the stable, cheap way to solve it.
    factor, info = torch.linalg.cholesky_ex(system)
    if info == 0:
        return torch.cholesky_solve(cross, factor)
    # With a small ridge, float32 rounding can leave a nearly singular K^T K slightly indefinite. K^T K is positive
    # semi-definite in exact arithmetic, so solve through its eigendecomposition with negative eigenvalues set to 0.
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    inverse = 1.0 / (eigenvalues.clamp_min(0) + torch.exp(log_lambda.double()))
    return (eigenvectors @ (inverse.unsqueeze(1) * (eigenvectors.T @ cross.double()))).to(gram.dtype)


def dual_least_squares_shift(keys: torch.Tensor, diffs: torch.Tensor, log_lambda: torch.Tensor) -> torch.Tensor:
    """
    The ridge least-squares solution of [`least_squares_shift`] from the keys and value differences themselves,
    through the `n x n` system of the tokens: `S = K^T (K K^T + exp(lambda) I)^-1 D` (the push-through identity).
    With fewer tokens `n` than key features `d_in` it is the cheaper of the two, in time and in memory.

    Args:
        keys (`torch.Tensor` of shape `(n, d_in)`): `K`, one token per row.
        diffs (`torch.Tensor` of shape `(n, d_out)`): `D`, the value differences of the same tokens.
        log_lambda (`torch.Tensor`): scalar, the log of the ridge coefficient.
    """
    keys, diffs = at_least_float32(keys), at_least_float32(diffs)
    system = ridge_system(keys @ keys.T, log_lambda)
    factor, info = torch.linalg.cholesky_ex(system)
    if info == 0:
        return keys.T @ torch.cholesky_solve(diffs, factor)
    # Rounding left K K^T + exp(lambda) I indefinite: the primal solve has the fallback for that.
    return least_squares_shift(keys.T @ keys, keys.T @ diffs, log_lambda)


def summed_shift(pseudo_cross: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """MEND's aggregation `S = -lr sum_i outer(k~_i, g~_i)`, from the summed outer products `K~^T G~`."""
    pseudo_cross = at_least_float32(pseudo_cross)
    return -lr.to(pseudo_cross.dtype) * pseudo_cross
