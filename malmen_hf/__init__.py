"""malmen-hf: MALMEN model editing, native to the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel

from .artifacts import load_edits
from .configuration_malmen import MalmenConfig
from .data import FORMATS, load_edit_requests
from .editing import EditHandle, MalmenEditableMixin, apply_edits, revert_edits
from .facts import EditRequest
from .functional import least_squares_shift, summed_shift, value_differences
from .layers import default_edit_modules
from .modeling_malmen import MalmenEditorModel, MalmenPreTrainedModel
from .trainer import MalmenTrainingArguments, train_editor
from .training import fit_normalizer

__version__ = "0.1.0"

AutoConfig.register("malmen", MalmenConfig)
AutoModel.register(MalmenConfig, MalmenEditorModel)
# Saved editors carry their code, so they also load with `trust_remote_code=True` where malmen_hf is not installed.
MalmenConfig.register_for_auto_class()
MalmenEditorModel.register_for_auto_class("AutoModel")

__all__ = [
    "EditHandle",
    "EditRequest",
    "FORMATS",
    "MalmenConfig",
    "MalmenEditableMixin",
    "MalmenEditorModel",
    "MalmenPreTrainedModel",
    "MalmenTrainingArguments",
    "apply_edits",
    "default_edit_modules",
    "fit_normalizer",
    "least_squares_shift",
    "load_edits",
    "load_edit_requests",
    "revert_edits",
    "summed_shift",
    "train_editor",
    "value_differences",
]
