"""Model cards of editors: the Jinja template in `model_cards/`, rendered with `huggingface_hub.ModelCard`."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..offline_models import OFFLINE_MODELS
from ..shipped import package_data_dir
from .scores import SCORES

if TYPE_CHECKING:
    # Not `MalmenEditorModel`: `modeling_malmen` loads this module to write cards, and must not be imported back.
    from transformers import PreTrainedModel

TEMPLATE_NAME = "editor_card.md"
TAGS = ["model-editing", "knowledge-editing", "malmen", "malmen-hf"]
# The training settings worth a row in the card (the rest, such as output_dir, says nothing about the editor).
TRAINING_ROWS = (
    "facts_per_step", "batch_size", "meta_lr", "c_loc", "max_grad_norm", "steps", "num_train_facts",
    "num_processes", "mixed_precision", "seed", "best_score", "best_step",
)  # fmt: skip


def template_path() -> Path:
    """The editor card template: inside the installed package, or in the repository's `model_cards/`."""
    folder = package_data_dir("model_cards")
    if folder is None or not (folder / TEMPLATE_NAME).is_file():
        raise FileNotFoundError(f"The model card template {TEMPLATE_NAME} is missing from this malmen-hf installation")
    return folder / TEMPLATE_NAME


def editor_card(
    editor: "PreTrainedModel",
    results: Sequence[Mapping[str, Any]] = (),
    *,
    editor_id: str = "path/to/editor",
    dataset: str | None = None,
    results_command: str | Sequence[str] | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """
    The model card of `editor`: metadata (`library_name`, `base_model`, `datasets`, `license`, tags, and a
    `model-index` with one result per score and N), usage, the editor's settings, its results and training settings.

    Args:
        editor ([`MalmenEditorModel`]): The editor; its config (a [`MalmenConfig`]) gives the base model, layers and
            training settings.
        results (sequence of `dict`): Rows `{"n": N, "ES": ..., "GS": ..., ...}` with any of the names in
            [`~scores.SCORES`], e.g. what `malmen-hf eval --json` prints under `"after"`, plus `"n"`.
        editor_id (`str`): The Hub id or folder users load the editor from, for the usage snippet.
        dataset (`str`, *optional*): The Hub id or name of the data the results were measured on.
        results_command (`str` or `list[str]`, *optional*): The command(s) that measured the results.
        license (`str`, defaults to `"apache-2.0"`): The editor's license.
    """
    config = editor.config
    base_model = config.base_model_name_or_path or "unknown"
    offline = OFFLINE_MODELS.get(base_model)
    hub_base_model = offline.hub_id if offline is not None else base_model
    commands = [results_command] if isinstance(results_command, str) else list(results_command or [])
    score_names = [name for name in SCORES if any(row.get(name) is not None for row in results)]
    training = {key: config.training[key] for key in TRAINING_ROWS if key in (config.training or {})}
    card_data = ModelCardData(
        library_name="malmen-hf",
        base_model=hub_base_model if "/" in hub_base_model else None,
        datasets=[dataset] if dataset else None,
        license=license,
        tags=TAGS + [config.aggregation.replace("_", "-")],
        model_name=editor_id,
        eval_results=_eval_results(results, score_names, dataset or "unknown") or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=f"MALMEN editor for {hub_base_model}",
        base_model=hub_base_model,
        base_model_url=f"https://huggingface.co/{hub_base_model}" if "/" in hub_base_model else hub_base_model,
        base_model_load_name=base_model,
        editor_id=editor_id,
        config=config,
        results_table=_markdown_table(
            ["N", *score_names],
            [[str(row["n"]), *(_number(row.get(name)) for name in score_names)] for row in results],
        ),
        results_dataset=dataset or "the evaluation data",
        results_commands="; ".join(f"`{command}`" for command in commands),
        training_table=_markdown_table(["setting", "value"], [[key, f"`{value}`"] for key, value in training.items()]),
    )


def card_results(card: ModelCard, dataset: str | None = None) -> list[dict[str, Any]]:
    """
    The results in an editor's model card (its `model-index`), in the form [`editor_card`] takes them: one row per
    number of facts edited at once, `{"n": N, "ES": ..., "GS": ..., ...}`, in increasing N.

    Args:
        card (`huggingface_hub.ModelCard`): The card, e.g. `ModelCard.load(folder / "README.md")`.
        dataset (`str`, *optional*): The rows measured on this dataset; by default the card's own (the first of its
            `datasets`), else every row.
    """
    dataset = dataset or (card.data.datasets or [None])[0]
    rows: dict[int, dict[str, Any]] = {}
    for result in card.data.eval_results or []:
        if dataset in (None, result.dataset_name) and (result.dataset_config or "").startswith("N="):
            n = int(result.dataset_config[2:])
            rows.setdefault(n, {"n": n})[result.metric_type] = result.metric_value
    return [rows[n] for n in sorted(rows)]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _eval_results(results, score_names, dataset) -> list[EvalResult]:
    return [
        EvalResult(
            task_type="model-editing",
            task_name="Model editing",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_config=f"N={row['n']}",  # one model-index entry per number of facts edited at once
            metric_type=name,
            metric_name=f"{name} (N={row['n']})",
            metric_value=round(float(row[name]), 6),  # enough to render the 3 decimals of the table again
        )
        for row in results
        for name in score_names
        if row.get(name) is not None
    ]
