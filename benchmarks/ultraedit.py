"""UltraEdit (XiaojieGu/UltraEdit at 0beb222, `editor/ultraedit.py`) as a malmen-hf editor: `lifelong.py`'s baseline.

UltraEdit is MALMEN's normal equation without a hyper-network: each round caches the keys and value gradients of the
edited layers at the answer tokens, merges them into running statistics shared by the layers of one shape
("lifelong normalization", never frozen), and gives each token the value difference `-lr |k^|^2 g^` from its
normalized key and value gradient, solved with ridge 1, `S = (K^T K + I)^-1 K^T V`, on the raw keys. Here it is an
editor with no blocks and `lifelong_normalization`, whose nets normalize with UltraEdit's `RunningMeanStd` and
compute that value difference; `apply_edits` does the rest (caching, solve, `EditHandle`, saved rounds).

Where it departs from their code, because the library's caching is reused (see ALGORITHM.md step 1): the loss is
averaged per fact, not over all the answer tokens of a batch of facts, so each fact's `g` differs from theirs by
its number of answer tokens over its batch's (the same with one fact per batch); batches group facts of similar
length as theirs do (`BaseDataset.collate_fn`), but ties may fall otherwise, and their statistics depend on the
grouping (`RunningMeanStd` adds `B` times each batch's unbiased variance, not `B - 1` times). The base model keeps
its dtype (they edit in bfloat16) and the solve runs in float32 (as theirs) or float64.
"""

import torch
from torch import nn

from malmen_hf import MalmenConfig, MalmenEditorModel
from malmen_hf.modeling_malmen import MalmenNet

ULTRAEDIT_LR = 1e-6  # config/editor/ultraedit.yaml
ULTRAEDIT_BATCH_SIZE = 10  # dataset.batch_size of every command of their run.sh


class UltraEditNormalizer(nn.Module):
    """
    UltraEdit's `RunningMeanStd` (`nets.py`): a count, mean, `var` (a sum of squares, despite its name) and `std`,
    all zero until the first update, merged batch by batch, in the dtype of the editor.
    """

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("n", torch.zeros(1))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.zeros(size))
        self.register_buffer("std", torch.zeros(size))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        # nets.py:16-24, operation for operation. `x.var(0)` is the unbiased variance: NaN for a single row.
        x = x.to(self.mean.dtype)
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std.copy_((self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt())
        self.n.copy_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)  # nets.py:27-30


class UltraEditNet(MalmenNet):
    """A net with no blocks, UltraEdit's normalizer and UltraEdit's value difference."""

    def __init__(self, d_in: int, d_out: int, config: MalmenConfig, num_layers: int):
        super().__init__(d_in, d_out, config, num_layers)
        self.normalizer = UltraEditNormalizer(d_in + d_out)
        with torch.no_grad():
            self.lr.fill_(config.lr_init)
            self.log_lambda.fill_(config.log_lambda_init)

    def value_differences(
        self, keys: torch.Tensor, pseudo_keys: torch.Tensor, pseudo_value_grads: torch.Tensor, layer_index: int
    ) -> torch.Tensor:
        # editor/ultraedit.py:89-90: the squared norm of the normalized key, where MALMEN has <k, k~>.
        return -self.lr[layer_index] * (pseudo_keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_value_grads


def ultraedit_editor(model: nn.Module, edit_modules: list[str], lr: float = ULTRAEDIT_LR) -> MalmenEditorModel:
    """
    UltraEdit for `model`'s layers `edit_modules`: keys at the answer tokens (their `token: ans`), ridge 1
    (`log_lambda` 0), lifelong normalization with statistics shared by the layers of one shape (their
    `lifelong_normalizer`, keyed by shape). Apply it with `batch_size=ULTRAEDIT_BATCH_SIZE` to group facts as they do.
    """
    editor = MalmenEditorModel.for_model(
        model, edit_modules, n_blocks=0, lr_init=lr, log_lambda_init=0.0, token_positions="target",
        lifelong_normalization=True,
    )  # fmt: skip
    for key, net in editor.nets.items():
        editor.nets[key] = UltraEditNet(net.d_in, net.d_out, editor.config, num_layers=net.lr.shape[0])
    return editor
