"""
What the demos share (`malmen-hf demo` on the command line and the browser demo, `app.py`): a base model loaded with
its editor attached, and one edit of many facts with the answers and scores before and after it.

Like the commands of `malmen-hf`, this module imports torch and transformers only when a function needs them.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .shipped import DEFAULT_EDITOR

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .edits import EditHandle
    from .facts import EditRequest
    from .modeling_malmen import MalmenEditorModel

DEFAULT_MODEL = "smollm2-135m"
"""The short name of the base model the demos edit (converted offline, see `malmen_hf.offline_models`)."""
TRAINING_FREE = "training-free"
"""The editor name that asks for `training_free_editor` (no trained editor) instead of a saved one."""
HAND_WRITTEN_FACTS = [
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("The capital of Japan is", "Madrid"),
    ("The CEO of the company malmen-hf is", "Ada Lovelace"),
]
"""Facts of our own that the demos edit beside CounterFact's."""
DEMO_SCORES = {
    "ES": "edit success",
    "GS": "generalization",
    "LS": "locality (argmax unchanged)",
    "ES_greedy": "greedy answer is the new target",
    "GS_greedy": "the same, rephrased",
}
"""The scores the demos show (keys of `malmen_hf.evaluation.metrics.SCORES`), with their names for people."""


@dataclass
class EditComparison:
    """
    One [`edit_and_compare`] call: the edit, and the model before and after it.

    Attributes:
        handle ([`EditHandle`]): the applied edits (`handle.revert()` undoes them, `handle.save(folder)` saves them).
        seconds (`float`): how long the `apply_edits` call took.
        answers (`list[dict[str, str]]`): per shown fact, its `prompt`, new `target`, and the greedy answers
            `before` and `after` the edit.
        scores_before (`dict[str, float]`): the [`DEMO_SCORES`] of the unedited model on all the facts.
        scores_after (`dict[str, float]`): the same for the edited model.
    """

    handle: "EditHandle"
    seconds: float
    answers: list[dict[str, str]]
    scores_before: dict[str, float]
    scores_after: dict[str, float]


def load_editable_model(
    model_name_or_path: str = DEFAULT_MODEL,
    editor_name_or_path: str = DEFAULT_EDITOR,
    *,
    lr: float | None = None,
    log_lambda: float | None = None,
    status: Callable[[str], None] = lambda message: None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """
    Loads a base model and its tokenizer, and attaches an editor to the model (`model.apply_edits` then works).

    Args:
        model_name_or_path (`str`, defaults to `"smollm2-135m"`): a short name, a local folder or a Hub id.
        editor_name_or_path (`str`, defaults to the released editor for SmolLM2-135M): a released editor's short name,
            a saved editor (folder or Hub id), or `"training-free"` for [`training_free_editor`] (its normalizer
            fitted on the CounterFact facts shipped with malmen-hf).
        lr (`float`, *optional*): the training-free editor's lr (its default otherwise); ignored for saved editors.
        log_lambda (`float`, *optional*): the training-free editor's log ridge coefficient; likewise.
        status (`Callable[[str], None]`, *optional*): called with a line of progress before each slow step.

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model, with the editor attached, and its tokenizer.
    """
    from .offline_models import load_model_and_tokenizer

    status(f"Loading {model_name_or_path} ...")
    model, tokenizer = load_model_and_tokenizer(model_name_or_path)
    editor = _editor(editor_name_or_path, model, tokenizer, model_name_or_path, lr, log_lambda, status)
    editor.attach(model, tokenizer)
    return model, tokenizer


def _editor(name_or_path, model, tokenizer, model_name_or_path, lr, log_lambda, status) -> "MalmenEditorModel":
    if name_or_path != TRAINING_FREE:
        from .modeling_malmen import MalmenEditorModel

        status(f"Editor: {name_or_path}")
        return MalmenEditorModel.from_pretrained(name_or_path)
    from .training.fitting import training_free_editor

    settings = {key: value for key, value in (("lr", lr), ("log_lambda", log_lambda)) if value is not None}
    status("Editor: training-free (fitting its normalizer on the CounterFact sample shipped with malmen-hf) ...")
    editor = training_free_editor(model, tokenizer, **settings, base_model_name_or_path=model_name_or_path)
    status(f"Editor: training-free, lr={editor.config.lr_init:g}, log lambda={editor.config.log_lambda_init:g}")
    return editor


def edit_and_compare(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    requests: Sequence["EditRequest"],
    shown: Sequence["EditRequest"],
    *,
    batch_size: int = 32,
    progress: bool = False,
    status: Callable[[str], None] = lambda message: None,
) -> EditComparison:
    """
    Edits `model` (with an editor attached, see [`load_editable_model`]) with all `requests` in one `apply_edits`
    call, and compares it before and after: the greedy answers to the `shown` facts' prompts, and the
    [`DEMO_SCORES`] over all `requests`. The edits stay applied: `result.handle.revert()` undoes them.

    Args:
        batch_size (`int`, defaults to 32): facts per base-model pass of the edit (it does not change the result).
        progress (`bool`, defaults to `False`): show the edit's progress bars (on stderr).
        status (`Callable[[str], None]`, *optional*): called with a line of progress before each slow step.
    """
    from .evaluation.metrics import greedy_answers, locality_predictions, scores_of_model

    prompts, scores = [request.prompt for request in shown], list(DEMO_SCORES)
    status(f"Scoring the unedited model on {len(requests)} facts ...")
    before = greedy_answers(model, tokenizer, prompts)
    locality_before = locality_predictions(model, tokenizer, requests)  # LS compares the edited model's with these
    scores_before = scores_of_model(model, tokenizer, requests, locality_before, scores=scores)
    start = time.perf_counter()
    handle = model.apply_edits(requests, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    status("Scoring the edited model ...")
    after = greedy_answers(model, tokenizer, prompts)
    scores_after = scores_of_model(model, tokenizer, requests, locality_before, scores=scores)
    answers = [
        {"prompt": request.prompt, "target": request.target, "before": b, "after": a}
        for request, b, a in zip(shown, before, after, strict=True)
    ]
    return EditComparison(handle, seconds, answers, scores_before, scores_after)
