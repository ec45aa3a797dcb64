"""Finding and shifting the linear layers MALMEN edits, whatever the architecture."""

import re
import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .functional import at_least_float32

# The MLP output projection of each architecture family, as (pattern, how many of the last blocks to edit).
# The first family whose pattern matches a module of the model wins.
DEFAULT_EDIT_PATTERNS: dict[str, list[str]] = {
    "gpt2": [r"transformer\.h\.(\d+)\.mlp\.c_proj"],
    "gptj": [r"transformer\.h\.(\d+)\.mlp\.fc_out"],
    "gpt_neox": [r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h"],
    "llama": [r"layers\.(\d+)\.mlp\.down_proj"],  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "t5": [
        r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo",
        r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.wo",
    ],
    "bert": [r"encoder\.layer\.(\d+)\.output\.dense"],
}
DEFAULT_NUM_EDITED_BLOCKS = 6


def default_edit_modules(model: nn.Module, num_blocks: int | None = None) -> list[str]:
    """
    Names of the MLP output projections of the last blocks of `model`: the paper's choice of edited layers.

    Args:
        model (`nn.Module`): The base model.
        num_blocks (`int`, *optional*):
            How many of the last blocks to edit (per stack for encoder-decoder models). Defaults to 6 for decoder-only
            and encoder-only models and 3 per stack for encoder-decoder models.
    """
    names = [name for name, _ in model.named_modules()]
    for patterns in DEFAULT_EDIT_PATTERNS.values():
        per_stack = [_match_blocks(names, pattern) for pattern in patterns]
        if not all(per_stack):
            continue
        if num_blocks is None:
            num_blocks = DEFAULT_NUM_EDITED_BLOCKS // len(patterns)
        selected = []
        for matches in per_stack:
            selected += [name for _, name in sorted(matches)[-num_blocks:]]
        return selected
    raise ValueError(
        f"Cannot pick default layers to edit for a {type(model).__name__}: none of the known architecture families "
        f"({', '.join(DEFAULT_EDIT_PATTERNS)}) matches its module names. Pass `edit_modules=[...]` with the names of "
        "the nn.Linear layers to edit (see `model.named_modules()`)."
    )


def _match_blocks(names: list[str], pattern: str) -> list[tuple[int, str]]:
    regex = re.compile(rf"(?:^|.*\.){pattern}$")
    return [(int(match.group(1)), name) for name in names if (match := regex.match(name))]


def get_edit_module(model: nn.Module, name: str) -> nn.Module:
    """
    Returns the editable linear layer `name` of `model`, or raises a `ValueError` saying what is wrong.

    A peft model (`PeftModel`, e.g. LoRA adapters) is edited in its base model, where the names are the base model's:
    a layer an adapter wraps is edited in its own weight (`base_layer`), under the adapter, which keeps working.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"The model ({type(model).__name__}) has no module named {name!r}: this editor was built for another "
            "architecture. Build one for this model with `MalmenEditorModel.for_model(model)`."
        ) from None
    base_layer = getattr(module, "base_layer", None)
    if not isinstance(module, (nn.Linear, Conv1D)) and isinstance(base_layer, (nn.Linear, Conv1D)):
        module = base_layer  # an adapter's wrapper (peft's lora.Linear): its input is the layer's input
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise ValueError(
            f"Module {name!r} is a {type(module).__name__}; MALMEN edits only nn.Linear and Conv1D layers."
        )
    return module


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """The `(d_in, d_out)` of a linear layer: `nn.Linear` stores `(d_out, d_in)`, GPT-2's `Conv1D` `(d_in, d_out)`."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
    else:
        d_out, d_in = module.weight.shape
    return int(d_in), int(d_out)


def shifted_weight(module: nn.Module, shift: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """
    The layer's weight (or `weight`, a tensor of its shape) plus a `(d_in, d_out)` shift, added in (at least) float32
    and cast once to the weight's dtype.
    """
    weight = module.weight if weight is None else weight
    delta = shift if isinstance(module, Conv1D) else shift.T
    return (at_least_float32(weight.detach()) + delta.to(weight.device)).to(weight.dtype)


def edited_modules(editor: nn.Module, model: nn.Module) -> dict[str, nn.Module]:
    """The model's edited modules, after checking they exist, are linear, and have the shapes the editor expects."""
    check_materialized(model)
    modules = {}
    for name, expected in zip(editor.config.edit_modules, editor.config.edit_module_shapes, strict=True):
        module = get_edit_module(model, name)
        if list(weight_shape(module)) != list(expected):
            raise ValueError(
                f"Module {name!r} has shape (d_in, d_out) = {weight_shape(module)} but this editor was built for "
                f"{tuple(expected)}: it belongs to another model. Build one for this model with "
                "`MalmenEditorModel.for_model(model)`."
            )
        modules[name] = module
    if not modules:
        raise ValueError("This editor edits no modules: its config has an empty `edit_modules`.")
    _warn_if_other_base_model(editor, model)
    return modules


def check_materialized(model: nn.Module) -> None:
    """A model loaded without its weights (on the meta device) can be neither run nor shifted."""
    if any(param.is_meta for param in model.parameters()):
        raise ValueError(
            "The model has weights on the meta device (created without loading them, e.g. under "
            "`init_empty_weights()` or with `device_map` offloading): load it with its weights on a real device "
            "(`from_pretrained(..., device_map=None)`) before editing it. Nothing was changed."
        )


def _warn_if_other_base_model(editor: nn.Module, model: nn.Module) -> None:
    """The shapes match (checked above), but an editor's quality is only known for the model it was trained for."""
    expected = editor.config.base_model_name_or_path
    actual = getattr(model.config, "_name_or_path", None)
    if expected and actual and _short_name(expected) != _short_name(actual):
        warnings.warn(
            f"This editor was made for {expected!r} but is editing {actual!r}. The layer shapes match, so the edit "
            "runs, but how well the editor works is only known for its own base model.",
            stacklevel=4,
        )


def _short_name(name_or_path: str) -> str:
    """`org/Model`, `/cache/model` and `model` name the same model here (a Hub id, its local copy, a short name)."""
    return name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
