"""malmen-hf: MALMEN model editing, native to the Hugging Face ecosystem."""

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it. Those submodules import torch and transformers (seconds), so they are
# imported on the first use of any of these names (PEP 562): `import malmen_hf` and `malmen-hf --help` stay fast.
_EXPORTS = {
    "EditHandle": "edits",
    "EditRequest": "facts",
    "FORMATS": "data",
    "MalmenConfig": "configuration_malmen",
    "MalmenEditableMixin": "editing",
    "MalmenEditorModel": "modeling_malmen",
    "MalmenPreTrainedModel": "modeling_malmen",
    "MalmenTrainingArguments": "training.arguments",
    "MemitSettings": "memit",
    "apply_edits": "editing",
    "apply_memit": "memit",
    "default_edit_modules": "layers",
    "edit_history": "edits",
    "fit_key_covariance": "training.fitting",
    "fit_normalizer": "training.fitting",
    "generate_context_templates": "memit",
    "least_squares_shift": "functional",
    "load_edit_requests": "data",
    "load_edits": "edits",
    "revert_edits": "edits",
    "summed_shift": "functional",
    "train_editor": "training.trainer",
    "training_free_editor": "training.fitting",
    "value_differences": "functional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_api()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _import_api() -> None:
    """Imports every public name at once and registers the editor with transformers' Auto classes."""
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    from transformers import AutoConfig, AutoModel

    config_class, model_class = globals()["MalmenConfig"], globals()["MalmenEditorModel"]
    AutoConfig.register("malmen", config_class)
    AutoModel.register(config_class, model_class)
    # Saved editors carry their code, so they also load with `trust_remote_code=True` where malmen_hf is not installed.
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
