"""
Step 3 of MALMEN and its backward: the running sums of the normal equation of each edited layer, its solve into one
weight shift per layer, and the closed-form gradient through that solve that meta-training (step 4) needs.
"""

import copy

import torch
from torch import nn

from .edits import normalizer_statistic_name
from .functional import dual_least_squares_shift, least_squares_shift, summed_shift
from .layers import weight_shape


class NormalEquationSums:
    """
    Running sums over all tokens of `K^T K` and `K^T D` (least squares) or `K~^T G~` (sum) for each edited module:
    the editor is frozen, so each batch is folded in at once and memory does not grow with the number of facts.

    With `dual`, a least-squares module keeps its keys and value differences instead, as long as it has at most
    `d_in` of them, and is solved through the `n x n` system of its tokens ([`dual_least_squares_shift`]): cheaper
    in time and memory with fewer tokens than key features. Training back-propagates through the sums: no `dual`.

    With `lifelong_normalization` (see `MalmenConfig.lifelong_normalization`), the hyper-networks normalize with
    running copies of their normalizers, which start from the statistics in `history` (else the editor's own) and
    take in this round's rows through [`~NormalEquationSums.update_normalizers`], all before the first `add`.
    """

    def __init__(
        self,
        editor: nn.Module,
        modules: dict[str, nn.Module],
        num_facts: int,
        dual: bool = False,
        history: dict[str, torch.Tensor] | None = None,
        lifelong_normalization: bool = False,
    ):
        self.editor = editor
        self.least_squares = editor.config.aggregation == "least_squares"
        self.num_facts = num_facts
        # The preserved keys' covariance is a d_in x d_in term of the normal equation: no n x n dual form then.
        self.covariance_weight = editor.config.covariance_weight if self.least_squares else 0.0
        # Earlier rounds' keys (lifelong editing): another d_in x d_in term, and this round's K^T K is kept for them.
        self.history_weight = getattr(editor.config, "history_weight", 0.0) if self.least_squares else 0.0
        self.history = history or {}
        dual = dual and self.covariance_weight == 0 and self.history_weight == 0
        if self.covariance_weight > 0:
            _check_covariances_fitted(editor, modules)
        # The running sums stay in (at least) float32 even for a half-precision editor: they add up many batches.
        self.device, self.dtype = editor.device, torch.promote_types(editor.dtype, torch.float32)
        self.names = list(modules)
        self.shape_keys = dict(zip(editor.config.edit_modules, editor.config.shape_keys, strict=True))
        # Per hyper-network (by shape key), the running normalizer of lifelong normalization.
        self.normalizers: dict[str, nn.Module] = {}
        if lifelong_normalization:
            self.normalizers = {self.shape_keys[name]: self._running_normalizer(self.shape_keys[name])
                                for name in self.names}  # fmt: skip
        self.gram, self.cross = {}, {}
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # the dual modules' (keys, diffs)
        for name, module in modules.items():
            d_in, d_out = weight_shape(module)
            if dual and self.least_squares:
                empty = torch.empty(0, d_in + d_out, device=self.device, dtype=self.dtype)
                self.rows[name] = [(empty[:, :d_in], empty[:, d_in:])]
                continue
            self.cross[name] = torch.zeros(d_in, d_out, device=self.device, dtype=self.dtype)
            if self.least_squares:
                self.gram[name] = torch.zeros(d_in, d_in, device=self.device, dtype=self.dtype)

    def _running_normalizer(self, shape_key: str) -> nn.Module:
        """A copy of the normalizer of the hyper-network `shape_key`, with the statistics the history holds for it."""
        normalizer = copy.deepcopy(self.editor.nets[shape_key].normalizer)
        names = {buffer: normalizer_statistic_name(shape_key, buffer) for buffer in normalizer.state_dict()}
        if any(name in self.history for name in names.values()):
            normalizer.load_state_dict({buffer: self.history[name] for buffer, name in names.items()})
        return normalizer

    def update_normalizers(self, cached: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """
        Merges one base-model batch's rows into the running normalizers, module by module (nothing without lifelong
        normalization).
        """
        for name, (keys, value_grads) in cached.items():
            normalizer = self.normalizers.get(self.shape_keys[name])
            if normalizer is not None:
                normalizer.update(torch.cat((keys, value_grads), dim=-1).to(normalizer.mean.device))

    def add(self, cached: dict[str, tuple[torch.Tensor, torch.Tensor]], editor_batch_size: int) -> None:
        for name, (keys, value_grads) in cached.items():
            net, layer_index = self.editor.net_for(name)
            normalizer = self.normalizers.get(self.shape_keys[name])
            for start in range(0, keys.shape[0], editor_batch_size):
                chunk_keys = keys[start : start + editor_batch_size].to(self.device, self.editor.dtype)
                chunk_grads = value_grads[start : start + editor_batch_size].to(self.device, self.editor.dtype)
                pseudo_keys, pseudo_grads = net(chunk_keys, chunk_grads, layer_index, normalizer=normalizer)
                if self.least_squares:
                    diffs = net.value_differences(chunk_keys, pseudo_keys, pseudo_grads, layer_index)
                    self._add_rows(name, chunk_keys.to(self.dtype), diffs.to(self.dtype))
                else:
                    self.cross[name].addmm_(pseudo_keys.T.to(self.dtype), pseudo_grads.to(self.dtype))

    def _add_rows(self, name: str, keys: torch.Tensor, diffs: torch.Tensor) -> None:
        if name in self.rows:
            self.rows[name].append((keys, diffs))
            if sum(held.shape[0] for held, _ in self.rows[name]) <= keys.shape[1]:
                return
            # More tokens than key features: from now on the sums are the smaller and the cheaper.
            keys, diffs = self._stacked_rows(name)
            del self.rows[name]
            self.gram[name] = keys.new_zeros(keys.shape[1], keys.shape[1])
            self.cross[name] = keys.new_zeros(keys.shape[1], diffs.shape[1])
        self.gram[name].addmm_(keys.T, keys)
        self.cross[name].addmm_(keys.T, diffs)

    def system_gram(self, name: str) -> torch.Tensor:
        """
        `K^T K + a n C0 + b H`: the normal equation's matrix without its ridge (MEMIT's preserved keys, when `a > 0`;
        the keys of earlier rounds, when `b > 0` and the model has a history).
        """
        gram = self.gram[name]
        if self.covariance_weight > 0:
            covariance = self.editor.key_covariance(name).matrix().to(gram)
            gram = gram + self.covariance_weight * self.num_facts * covariance
        if self.history_weight > 0 and name in self.history:
            gram = gram + self.history_weight * self.history[name].to(gram)
        return gram

    def history_after(self) -> dict[str, torch.Tensor] | None:
        """
        The model's history once this round is applied (new tensors for what this round changes: `H + K^T K` per
        layer, the running normalizers' statistics; the rest as it was), or `None` when the editor keeps none
        (`history_weight` 0, or MEND's sum, and no lifelong normalization).
        """
        if self.history_weight == 0 and not self.normalizers:
            return None
        after = dict(self.history)
        if self.history_weight > 0:
            after.update({name: self.history[name].to(self.gram[name]) + self.gram[name] if name in self.history
                          else self.gram[name].clone() for name in self.names})  # fmt: skip
        for shape_key, normalizer in self.normalizers.items():
            after.update({normalizer_statistic_name(shape_key, buffer): statistic.detach().clone()
                          for buffer, statistic in normalizer.state_dict().items()})  # fmt: skip
        return after

    def _stacked_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([keys for keys, _ in self.rows[name]]), torch.cat([diffs for _, diffs in self.rows[name]])

    def solve(self) -> dict[str, torch.Tensor]:
        shifts = {}
        for name in self.names:
            net, layer_index = self.editor.net_for(name)
            try:
                if name in self.rows:
                    shift = dual_least_squares_shift(*self._stacked_rows(name), net.log_lambda[layer_index].detach())
                elif self.least_squares:
                    shift = least_squares_shift(
                        self.system_gram(name), self.cross[name], net.log_lambda[layer_index].detach()
                    )
                else:
                    shift = summed_shift(self.cross[name], net.lr[layer_index].detach())
            except torch.linalg.LinAlgError as error:
                raise ValueError(
                    f"The least-squares solve for {name!r} failed ({error}). Raise the editor's lambda (a larger "
                    "ridge) or look for NaN weights in the model; no weight was changed."
                ) from None
            if not torch.isfinite(shift).all():
                raise ValueError(
                    f"The weight shift for {name!r} is not finite (the keys or gradients overflowed, or lr is too "
                    "large for this model's dtype); no weight was changed."
                )
            shifts[name] = shift
        return shifts


def _check_covariances_fitted(editor: nn.Module, modules: dict[str, nn.Module]) -> None:
    unfitted = [name for name in modules if editor.key_covariance(name).count == 0]
    if unfitted:
        raise ValueError(
            f"This editor weighs the preserved keys' covariance (covariance_weight={editor.config.covariance_weight}) "
            f"but has none fitted for {unfitted}: call `malmen_hf.fit_key_covariance(editor, model, texts, "
            "tokenizer)` with text the edits should leave alone (or set covariance_weight=0). No weight was changed."
        )


def backward_through_solve(
    editor: nn.Module,
    name: str,
    *,
    keys: torch.Tensor,
    value_grads: torch.Tensor,
    sums: NormalEquationSums,
    shift: torch.Tensor,
    shift_grad: torch.Tensor,
    editor_batch_size: int,
) -> tuple[nn.Module, int, torch.Tensor] | None:
    """
    Closed-form backward (ALGORITHM.md step 4) through `S = M^-1 K^T D`, `M = K^T K + a n C0 + e^lambda I` (or
    MEND's sum), given `shift_grad = dL/dS`, then through the hyper-network on this process's tokens (into `.grad`).
    Returns `(net, layer_index, dL/dlambda)`, or `None` for the sum.
    """
    net, layer_index = editor.net_for(name)
    shift_grad = shift_grad.to(shift.device, shift.dtype)
    if sums.least_squares:
        log_lambda = net.log_lambda[layer_index].detach()
        # M^-1 G with M symmetric: the same solve (and fallback) as the forward one, on G instead of K^T D.
        solved = least_squares_shift(sums.system_gram(name), shift_grad, log_lambda)
        lambda_grad = -torch.exp(log_lambda) * (solved * shift).sum()
    for start in range(0, keys.shape[0], editor_batch_size):
        chunk_keys = keys[start : start + editor_batch_size]
        chunk_grads = value_grads[start : start + editor_batch_size]
        pseudo_keys, pseudo_grads = net(chunk_keys, chunk_grads, layer_index)
        if sums.least_squares:
            diffs = net.value_differences(chunk_keys, pseudo_keys, pseudo_grads, layer_index)
            # dL/dD = K M^-1 G: each token's value difference sees the gradient of its own row.
            surrogate = (diffs * (chunk_keys @ solved)).sum()
        else:
            surrogate = -net.lr[layer_index] * (pseudo_keys.T @ pseudo_grads * shift_grad).sum()
        surrogate.backward()
    return (net, layer_index, lambda_grad) if sums.least_squares else None
