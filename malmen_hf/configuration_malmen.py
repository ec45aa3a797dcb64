"""MALMEN editor configuration."""

import math
from typing import Literal

from huggingface_hub.dataclasses import strict, validated_field
from transformers import PreTrainedConfig


def _positive(value: int) -> None:
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")


def _non_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"must be a non-negative integer, got {value}")


def _non_negative_number(value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite non-negative number, got {value}")


def _finite(value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")


def _unique_names(names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"each module may be edited once, but {duplicates} appear more than once")
    if any(not name for name in names):
        raise ValueError("module names must be non-empty strings")


def _pairs_of_positive_ints(shapes: list[list[int]]) -> None:
    for shape in shapes:
        if len(shape) != 2 or any(not isinstance(size, int) or size <= 0 for size in shape):
            raise ValueError(f"each shape must be a pair of positive integers [d_in, d_out], got {shape}")


@strict(accept_kwargs=True)
class MalmenConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MalmenEditorModel`]: which layers of which base model it edits, and the size of its
    hyper-networks.

    Args:
        base_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the base model this editor was built for.
        base_model_revision (`str`, *optional*):
            Revision (branch, tag or commit) of the base model.
        edit_modules (`list[str]`, defaults to `[]`):
            Qualified names of the edited `nn.Linear` / `Conv1D` modules of the base model
            (e.g. `"model.layers.29.mlp.down_proj"`).
        edit_module_shapes (`list[list[int]]`, defaults to `[]`):
            `[d_in, d_out]` of each edited module, in the order of `edit_modules`. Modules of the same shape share one
            hyper-network.
        rank (`int`, defaults to 1920):
            Rank of the low-rank matrices inside each hyper-network block (capped at the block's width).
        n_blocks (`int`, defaults to 2):
            Number of residual blocks per hyper-network. `0` makes the editor a fixed identity map.
        lr_init (`float`, defaults to 1e-6):
            Initial value of the per-layer learning rate that scales value differences.
        log_lambda_init (`float`, defaults to 0.0):
            Initial value of the per-layer log ridge coefficient `log_lambda`: the normal equation adds
            `exp(log_lambda) * I`. (Configs saved by malmen-hf 0.1 call it `lambda_init`; they still load.)
        aggregation (`str`, defaults to `"least_squares"`):
            `"least_squares"` (MALMEN's normal equation) or `"sum"` (MEND's sum of per-token updates).
        token_positions (`str`, defaults to `"target"`):
            Which token positions of the edit prompts are cached: `"target"` (the positions scored on target tokens,
            as in the paper), `"all"` (every non-padding position) or `"subject_last"` (the last token of each fact's
            `subject`, where ROME and MEMIT read their keys: a rephrasing that names the same subject sees the same
            key, and a neighbour with another subject does not; every fact must then have a `subject`). Encoder
            layers of seq2seq models always use every non-padding encoder position.
        covariance_weight (`float`, defaults to 0.0):
            `a`: the weight, per edited fact, of the covariance `C0` of the keys of other text (the mean `k k^T` over
            its tokens, MEMIT's preserved keys) in the normal equation, `S = (K^T K + a n C0 + exp(lambda) I)^-1
            K^T D` for `n` facts: the shift then changes what the layer does on other text much less, where the ridge
            alone protects every direction alike. `0` leaves it out. `C0` is fitted with [`fit_key_covariance`] and
            saved with the editor.
        history_weight (`float`, defaults to 0.0):
            `b`: the weight of the keys of earlier rounds of edits on the same model in the normal equation,
            `S = (K^T K + a n C0 + b H + exp(lambda) I)^-1 K^T D` with `H` the sum of `K^T K` over the rounds applied
            before (lifelong editing: a later round keeps the values the earlier ones wrote at their keys). With
            `b > 0` every round adds its `K^T K` to the model's history (one `d_in x d_in` matrix per edited layer;
            see `malmen_hf.edits.edit_history`); `0` neither uses nor keeps one.
        covariance_rank (`int`, defaults to 128):
            How many leading eigenvectors of each `C0` are kept (the rest is replaced by their mean eigenvalue times
            the identity), which keeps a saved editor small.
        lifelong_normalization (`bool`, defaults to `False`):
            UltraEdit's lifelong normalization: each `apply_edits` call first merges the keys and value gradients of
            its facts into the hyper-networks' running statistics (per base-model batch and edited layer), then
            normalizes them with the result, so that the statistics follow the model as rounds of edits change it
            instead of staying those the editor was fitted or trained with (an editor trained on many facts has a
            large count: each round then moves them little). The statistics after each round belong to the model, as
            its edit history does (see `malmen_hf.edits.edit_history`): the editor is left unchanged, reverting a
            round restores them, and each round's saved edits carry them. All of a call's keys are held until the
            statistics are complete: memory grows with the number of facts.
        normalizer_eps (`float`, defaults to 1e-5):
            Lower bound on the running standard deviation when normalizing the hyper-network's inputs.
        training (`dict`, *optional*):
            How the editor was trained (set by [`train_editor`]: data, steps, settings, last validation scores).

    Example:

    ```python
    >>> from malmen_hf import MalmenConfig, MalmenEditorModel
    >>> config = MalmenConfig(edit_modules=["transformer.h.1.mlp.c_proj"], edit_module_shapes=[[128, 32]], rank=8)
    >>> editor = MalmenEditorModel(config)
    ```
    """

    model_type = "malmen"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    edit_modules: list[str] = validated_field(_unique_names, default_factory=list)
    edit_module_shapes: list[list[int]] = validated_field(_pairs_of_positive_ints, default_factory=list)
    rank: int = validated_field(_positive, default=1920)
    n_blocks: int = validated_field(_non_negative, default=2)
    lr_init: float | int = validated_field(_finite, default=1e-6)
    log_lambda_init: float | int = validated_field(_finite, default=0.0)
    aggregation: Literal["least_squares", "sum"] = "least_squares"
    token_positions: Literal["target", "all", "subject_last"] = "target"
    covariance_weight: float | int = validated_field(_non_negative_number, default=0.0)
    covariance_rank: int = validated_field(_positive, default=128)
    history_weight: float | int = validated_field(_non_negative_number, default=0.0)
    lifelong_normalization: bool = False
    normalizer_eps: float | int = validated_field(_positive, default=1e-5)
    training: dict | None = None

    def __post_init__(self, **kwargs):
        if "lambda_init" in kwargs:  # its name in configs saved by malmen-hf 0.1
            self.log_lambda_init = kwargs.pop("lambda_init")
        super().__post_init__(**kwargs)

    def validate_edit_modules(self):
        """Part of `@strict`-powered validation: every edited module has exactly one shape."""
        if len(self.edit_modules) != len(self.edit_module_shapes):
            raise ValueError(
                f"edit_module_shapes has {len(self.edit_module_shapes)} entries but edit_modules has "
                f"{len(self.edit_modules)}: give one [d_in, d_out] pair per edited module"
            )

    @property
    def shape_keys(self) -> list[str]:
        """The key of the shared hyper-network of each edited module, in the order of `edit_modules`."""
        return [f"{d_in}x{d_out}" for d_in, d_out in self.edit_module_shapes]


__all__ = ["MalmenConfig"]
