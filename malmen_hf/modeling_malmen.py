"""The MALMEN editor: hyper-networks that turn a base model's keys and value gradients into pseudo pairs."""

import importlib
import inspect
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import cached_file

from .configuration_malmen import MalmenConfig
from .editing import apply_edits, attach_editor
from .functional import value_differences
from .layers import default_edit_modules, get_edit_module, weight_shape
from .saving import atomic_directory
from .shipped import resolve_editor


class MalmenNormalizer(nn.Module):
    """Per-feature running mean and variance of the hyper-network's inputs, frozen outside editor training."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """
        Merges the statistics of the rows of `x` into the running ones (Chan et al.'s parallel algorithm).
        `all_reduce` (a sum across processes) merges the rows of every process, so all keep the same statistics.
        """
        x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        sums = torch.stack((x.sum(0), x.square().sum(0), torch.full_like(x[0], x.shape[0])))
        if all_reduce is not None:
            sums = all_reduce(sums)
        batch_count = sums[2, 0]
        if batch_count == 0:
            return
        batch_mean = sums[0] / batch_count
        batch_var = (sums[1] / batch_count - batch_mean.square()).clamp_min(0)
        if self.count == 0:
            # The initial (0, 1) statistics only make an untrained editor the identity: do not average them in.
            self.mean.copy_(batch_mean)
            self.var.copy_(batch_var)
            self.count.copy_(batch_count)
            return
        total = self.count + batch_count
        weight = batch_count / total
        delta = batch_mean - self.mean
        self.mean.copy_(self.mean + delta * weight)
        self.var.copy_(self.var * (1 - weight) + batch_var * weight + delta.square() * weight * (1 - weight))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.var.sqrt().clamp_min(self.eps)


class MalmenKeyCovariance(nn.Module):
    """
    The covariance `C0` (mean `k k^T`) of an edited layer's inputs on other text, kept as its leading eigenvectors
    `U` and eigenvalues, plus the mean of the other eigenvalues as an isotropic floor:
    `C0 ~ U diag(eigenvalues - floor) U^T + floor I`.
    """

    def __init__(self, size: int, rank: int):
        super().__init__()
        self.register_buffer("basis", torch.zeros(size, min(rank, size)))
        self.register_buffer("eigenvalues", torch.zeros(min(rank, size)))
        self.register_buffer("floor", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def fit(self, sum_of_outer_products: torch.Tensor, count: int) -> None:
        """Sets `C0 = sum_of_outer_products / count`, truncated to the leading eigenvectors."""
        eigenvalues, eigenvectors = torch.linalg.eigh(sum_of_outer_products.double() / count)  # ascending
        rank = self.eigenvalues.shape[0]
        rest = eigenvalues[:-rank].clamp_min(0)
        self.basis.copy_(eigenvectors[:, -rank:])
        self.eigenvalues.copy_(eigenvalues[-rank:].clamp_min(0))
        self.floor.copy_(rest.mean() if rest.numel() else 0.0)
        self.count.fill_(count)

    def matrix(self) -> torch.Tensor:
        """`C0` as a `(size, size)` matrix."""
        eye = torch.eye(self.basis.shape[0], dtype=self.basis.dtype, device=self.basis.device)
        return (self.basis * (self.eigenvalues - self.floor)) @ self.basis.T + self.floor * eye


class MalmenBlock(nn.Module):
    """`x + scale[m] * max(x A B + b, 0) + shift[m]`: B starts at zero, so a fresh block is the identity."""

    def __init__(self, size: int, rank: int, num_layers: int):
        super().__init__()
        rank = min(rank, size)
        self.A = nn.Parameter(torch.empty(size, rank))
        self.B = nn.Parameter(torch.empty(rank, size))
        self.bias = nn.Parameter(torch.empty(size))
        self.scale = nn.Parameter(torch.empty(num_layers, size))
        self.shift = nn.Parameter(torch.empty(num_layers, size))

    def forward(self, x: torch.Tensor, layer_index: int) -> torch.Tensor:
        # clamp(min=0), not relu: the same values, but its gradient at exactly 0 is 1 where relu's is 0. A fresh
        # block (B = 0, bias = 0) has every pre-activation at exactly 0, so with relu A, B and the bias would never
        # get a gradient and training could only move `shift` and `lr`. MALMEN's code uses `clamp(0)` too.
        hidden = (x @ self.A @ self.B + self.bias).clamp(min=0)
        return x + self.scale[layer_index] * hidden + self.shift[layer_index]


class MalmenNet(nn.Module):
    """The hyper-network shared by all edited layers of one `(d_in, d_out)` shape, with per-layer lr and lambda."""

    def __init__(self, d_in: int, d_out: int, config: MalmenConfig, num_layers: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        size = d_in + d_out
        self.normalizer = MalmenNormalizer(size, config.normalizer_eps)
        self.blocks = nn.ModuleList(MalmenBlock(size, config.rank, num_layers) for _ in range(config.n_blocks))
        self.lr = nn.Parameter(torch.empty(num_layers))
        self.log_lambda = nn.Parameter(torch.empty(num_layers))  # the log of the ridge coefficient

    def forward(
        self,
        keys: torch.Tensor,
        value_grads: torch.Tensor,
        layer_index: int,
        normalizer: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The pseudo keys and pseudo value gradients of the rows `(keys, value_grads)` of layer `layer_index`.

        Args:
            normalizer (`nn.Module`, *optional*): Statistics to normalize with instead of the net's own: the running
                ones of lifelong normalization (see `MalmenConfig.lifelong_normalization`).
        """
        normalizer = self.normalizer if normalizer is None else normalizer
        hidden = normalizer(torch.cat((keys, value_grads), dim=-1))
        for block in self.blocks:
            hidden = block(hidden, layer_index)
        pseudo_keys, pseudo_value_grads = hidden.split([self.d_in, self.d_out], dim=-1)
        return pseudo_keys, pseudo_value_grads

    def value_differences(
        self, keys: torch.Tensor, pseudo_keys: torch.Tensor, pseudo_value_grads: torch.Tensor, layer_index: int
    ) -> torch.Tensor:
        """Step 2's value differences `d = -lr[m] <k, k~> g~` of layer `layer_index` (see [`value_differences`])."""
        return value_differences(keys, pseudo_keys, pseudo_value_grads, self.lr[layer_index])


class MalmenPreTrainedModel(PreTrainedModel):
    config_class = MalmenConfig
    base_model_prefix = "malmen"
    main_input_name = "keys"
    _no_split_modules = ["MalmenNet"]

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> "MalmenPreTrainedModel":
        """
        [`~PreTrainedModel.from_pretrained`], also by the short name of an editor released with malmen-hf (e.g.
        `"malmen-smollm2-135m-counterfact"`, see `malmen_hf.shipped`). The editor then keeps that name as its
        `name_or_path`, so that what records it (edit manifests) names it rather than a folder of this machine.
        """
        folder = resolve_editor(pretrained_model_name_or_path)
        loaded = super().from_pretrained(folder, *args, **kwargs)
        if folder != pretrained_model_name_or_path:
            editor = loaded[0] if isinstance(loaded, tuple) else loaded  # (editor, info) with output_loading_info
            editor.name_or_path = editor.config.name_or_path = pretrained_model_name_or_path
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Every initial value lives here: from_pretrained builds modules on the meta device, then calls this.
        if isinstance(module, MalmenBlock):
            init.normal_(module.A, std=1.0 / math.sqrt(module.A.shape[0]))
            init.zeros_(module.B)
            init.zeros_(module.bias)
            init.ones_(module.scale)
            init.zeros_(module.shift)
        elif isinstance(module, MalmenNormalizer):
            init.zeros_(module.mean)
            init.ones_(module.var)
            init.zeros_(module.count)
        elif isinstance(module, MalmenKeyCovariance):
            for buffer in module.buffers():
                init.zeros_(buffer)
        elif isinstance(module, MalmenNet):
            init.constant_(module.lr, self.config.lr_init)
            init.constant_(module.log_lambda, self.config.log_lambda_init)


class MalmenEditorModel(MalmenPreTrainedModel):
    """
    A MALMEN editor: one hyper-network per distinct shape of the edited layers. It maps the keys and value gradients
    of a base model on a batch of facts to pseudo keys and value gradients; [`~MalmenEditorModel.apply_edits`]
    aggregates them into one weight shift per layer by least squares and applies it to the base model in place.

    Example:

    ```python
    >>> from malmen_hf import MalmenEditorModel
    >>> editor = MalmenEditorModel.for_model(model, lr_init=1e-3)  # an untrained (training-free) editor
    >>> handle = editor.apply_edits(model, [("The Eiffel Tower is in", "Rome")], tokenizer=tokenizer)
    >>> handle.revert()  # the weights are back, bit for bit
    ```
    """

    def __init__(self, config: MalmenConfig):
        super().__init__(config)
        layers_per_shape: dict[str, int] = {}
        self._layer_index = {}
        for name, key in zip(config.edit_modules, config.shape_keys, strict=True):
            self._layer_index[name] = layers_per_shape.get(key, 0)
            layers_per_shape[key] = self._layer_index[name] + 1
        self.nets = nn.ModuleDict(
            {
                key: MalmenNet(*map(int, key.split("x")), config=config, num_layers=num_layers)
                for key, num_layers in layers_per_shape.items()
            }
        )
        if config.covariance_weight > 0:
            # Only editors that use it hold it: editors saved without one still load.
            self.key_covariances = nn.ModuleList(
                MalmenKeyCovariance(d_in, config.covariance_rank) for d_in, _ in config.edit_module_shapes
            )
        self.post_init()

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        edit_modules: Sequence[str] | None = None,
        **config_kwargs: Any,
    ) -> "MalmenEditorModel":
        """
        Builds an untrained editor for `model`: the training-free mode, or the starting point of meta-training.

        Args:
            model ([`PreTrainedModel`]): The base model to edit.
            edit_modules (`list[str]`, *optional*):
                Names of the `nn.Linear` / `Conv1D` layers to edit. Defaults to the MLP output projections of the last
                blocks, chosen per architecture family (see [`default_edit_modules`]).
            config_kwargs:
                Further [`MalmenConfig`] fields (`rank`, `n_blocks`, `lr_init`, `log_lambda_init`, `aggregation`, ...).
        """
        names = list(edit_modules) if edit_modules is not None else default_edit_modules(model)
        shapes = [list(weight_shape(get_edit_module(model, name))) for name in names]
        base_config = getattr(model, "config", None)
        config_kwargs.setdefault("base_model_name_or_path", getattr(base_config, "_name_or_path", None) or None)
        config = MalmenConfig(edit_modules=names, edit_module_shapes=shapes, **config_kwargs)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> "MalmenEditorModel":
        """
        [`~PreTrainedModel.from_pretrained`], refusing a folder that does not hold a whole editor: one without a
        config that names the edited modules, or whose weights lack, add or reshape any tensor (which would otherwise
        be initialized afresh with only a log line).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs["key_mapping"] = {**_RENAMED_WEIGHTS, **(kwargs.get("key_mapping") or {})}
        # The config is checked before transformers builds the editor: one that edits no modules has no parameter,
        # and transformers' loading steps fail on that with a bare StopIteration (5.25) instead of a clear error.
        if not isinstance(kwargs.get("config"), MalmenConfig):
            kwargs["config"] = _editor_config(pretrained_model_name_or_path, kwargs)
        _check_weight_shapes(pretrained_model_name_or_path, kwargs["config"], kwargs)
        editor, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        problems = {kind: sorted(map(str, keys)) for kind in _LOAD_PROBLEMS if (keys := info.get(kind))}
        if problems:
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} do not match the editor its config describes "
                f"({problems}): the folder is damaged or mixes two editors. Save the editor again."
            )
        _check_values(editor, pretrained_model_name_or_path)
        return (editor, info) if output_loading_info else editor

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """
        [`~PreTrainedModel.save_pretrained`], plus a model card (`README.md`, see `malmen_hf.evaluation.cards`) when
        the folder has none yet and malmen-hf is installed (an existing card, e.g. one with results, is kept). The
        folder is written aside and put in place in one step: a failed or killed save leaves the previous one as it
        was.
        """
        if _SAVES_ORIGINAL_FORMAT:
            # transformers would save a loaded editor under the names it was renamed from (`_RENAMED_WEIGHTS`): an
            # editor is always saved under this version's names.
            kwargs.setdefault("save_original_format", False)
        if not kwargs.get("is_main_process", True):
            super().save_pretrained(save_directory, *args, **kwargs)  # writes nothing on other processes
            return
        with atomic_directory(save_directory, stale=lambda name: _WEIGHT_FILE.fullmatch(name) is not None) as folder:
            super().save_pretrained(folder, *args, **kwargs)
            if not (Path(save_directory) / "README.md").exists():
                card = _editor_card(self, editor_id=str(save_directory))
                if card is not None:
                    card.save(folder / "README.md")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        model_card: Any = None,
    ) -> Any:
        """
        Uploads the editor (config, safetensors weights, its code for `trust_remote_code`, and a model card) to the
        Hub repository `repo_id` in one commit, creating the repository if needed.

        Args:
            repo_id (`str`): `"org/name"` (or `"name"` in your namespace).
            commit_message (`str`, *optional*), commit_description (`str`, *optional*): Of the commit.
            private (`bool`, *optional*): Visibility of a repository this call creates.
            token (`str` or `bool`, *optional*): The Hub token (default: the stored one).
            revision (`str`, *optional*): The branch to push to.
            create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to the branch.
            model_card (`huggingface_hub.ModelCard`, *optional*): The card to upload; by default the one
                `malmen_hf.evaluation.cards.editor_card` renders for `repo_id` (with results when `config.training`
                has them).

        Returns:
            `huggingface_hub.CommitInfo`: the commit (or pull request) made.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            card = model_card if model_card is not None else _editor_card(self, editor_id=repo_id)
            if card is not None:
                card.save(Path(folder) / "README.md")
            self.save_pretrained(folder)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload MALMEN editor",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    def key_covariance(self, module_name: str) -> MalmenKeyCovariance | None:
        """The preserved keys' covariance of `module_name`, or `None` when `config.covariance_weight` is 0."""
        if self.config.covariance_weight == 0:
            return None
        return self.key_covariances[self.config.edit_modules.index(module_name)]

    def net_for(self, module_name: str) -> tuple[MalmenNet, int]:
        """The hyper-network that serves `module_name` and the module's index among the layers it serves."""
        key = self.config.shape_keys[self.config.edit_modules.index(module_name)]
        return self.nets[key], self._layer_index[module_name]

    def forward(
        self, keys: torch.Tensor, value_grads: torch.Tensor, module_name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Maps keys `(n, d_in)` and value gradients `(n, d_out)` of the edited module `module_name` to the pseudo keys
        and pseudo value gradients (in the normalized space of the hyper-network).
        """
        net, layer_index = self.net_for(module_name)
        return net(keys, value_grads, layer_index)

    # The functional forms, as methods: `editor.apply_edits(model, facts, tokenizer=...)`, `editor.attach(model,
    # tokenizer)` (one signature and one docstring each, in editing.py).
    apply_edits = apply_edits
    attach = attach_editor


__all__ = ["MalmenEditorModel", "MalmenPreTrainedModel"]

_LOAD_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")
# Weights saved by malmen-hf 0.1 under older names, and their names now.
_RENAMED_WEIGHTS = {"lamda": "log_lambda"}
_SAVES_ORIGINAL_FORMAT = "save_original_format" in inspect.signature(PreTrainedModel.save_pretrained).parameters
# Weight files a previous save may have left under other names (shards): a new save replaces them all.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


_FLOATING_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
_CONFIG_LOADING_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "proxies",
)


def _editor_config(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> MalmenConfig:
    """The editor config at `name_or_path` (a released editor's short name too); a clear error if it is not one."""
    folder = resolve_editor(name_or_path)
    hub_kwargs = {key: kwargs[key] for key in _CONFIG_LOADING_KWARGS if key in kwargs}
    try:
        config = MalmenConfig.from_pretrained(folder, **hub_kwargs)
    except OSError as error:
        raise ValueError(
            f"{name_or_path} holds no MALMEN editor: it has no readable config.json ({error}). Save an editor there "
            "with `save_pretrained`, or give the folder or Hub id of one."
        ) from None
    if not config.edit_modules:
        raise ValueError(
            f"{name_or_path} holds no MALMEN editor: its config edits no modules (is its config.json missing, or "
            "is it a base model's folder?). Save an editor there with `save_pretrained`."
        )
    return config


def _check_weight_shapes(name_or_path: str | os.PathLike, config: MalmenConfig, kwargs: dict[str, Any]) -> None:
    """
    Compares the tensors the config describes (names and shapes) with those in the weights file's header (read
    without the weights), before anything is allocated: a small folder whose config claims huge layers is refused at
    once instead of allocating them first.
    """
    hub_kwargs = {key: kwargs[key] for key in _CONFIG_LOADING_KWARGS if key in kwargs}
    path = cached_file(
        resolve_editor(name_or_path), "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if path is None:
        return  # sharded or another format: transformers compares the shapes as it loads them
    renames = {**_RENAMED_WEIGHTS, **(kwargs.get("key_mapping") or {})}
    with safe_open(path, framework="pt") as weights:
        slices = {_renamed(name, renames): weights.get_slice(name) for name in weights.keys()}  # noqa: SIM118
        found = {name: tuple(piece.get_shape()) for name, piece in slices.items()}
        not_floating = sorted(f"{name} ({piece.get_dtype()})" for name, piece in slices.items()
                              if piece.get_dtype() not in _FLOATING_DTYPES)  # fmt: skip
    if not_floating:
        raise ValueError(
            f"The weights in {name_or_path} hold tensors that are not floating point: {not_floating[:5]}: the editor "
            "is damaged. Save or train it again."
        )
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in MalmenEditorModel(config).state_dict().items()}
    problems = {
        "missing_keys": sorted(set(expected) - set(found)),
        "unexpected_keys": sorted(set(found) - set(expected)),
        "mismatched_keys": sorted(f"{name}: {found[name]} in the file, {shape} in the config"
                                  for name, shape in expected.items() if name in found and found[name] != shape),
    }  # fmt: skip
    problems = {kind: names[:20] for kind, names in problems.items() if names}
    if problems:
        raise ValueError(
            f"The weights in {name_or_path} do not match the editor its config describes ({problems}): the folder "
            "is damaged or mixes two editors. Save the editor again."
        )


def _check_values(editor: MalmenEditorModel, name_or_path: str | os.PathLike) -> None:
    """Values no saved editor holds: NaN or infinite ones, or a negative variance (the dtypes are checked before)."""
    for name, tensor in editor.state_dict().items():
        if not torch.isfinite(tensor).all():
            problem = "holds NaN or infinite values"
        elif name.endswith("normalizer.var") and (tensor < 0).any():
            problem = "holds a negative variance"
        else:
            continue
        raise ValueError(f"{name} in {name_or_path} {problem}: the editor is damaged. Save or train it again.")


def _renamed(name: str, renames: dict[str, str]) -> str:
    """A weight's name after `from_pretrained`'s `key_mapping` (regular expressions, as transformers applies them)."""
    for pattern, replacement in renames.items():
        name = re.sub(pattern, replacement, name)
    return name


def _editor_card(editor: MalmenEditorModel, editor_id: str) -> Any:
    """The editor's model card, or `None` where malmen-hf is not installed (this file loaded as Hub remote code)."""
    try:
        cards = importlib.import_module(
            "malmen_hf.evaluation.cards"
        )  # not a relative import: remote code does not copy it
    except ImportError:
        return None
    return cards.editor_card(editor, editor_id=editor_id)
