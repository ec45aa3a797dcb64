"""`train_editor`: MALMEN meta-training on accelerate, on one process or several, resumable."""

import dataclasses
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from .cards import editor_card
from .checkpoints import checkpoint_folder, complete_checkpoints, load_checkpoint, save_checkpoint
from .facts import EditRequest
from .metrics import edit_scores
from .training import covariance_texts, fit_key_covariance, meta_gradient
from .training_args import MalmenTrainingArguments

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .modeling_malmen import MalmenEditorModel


class _Progress:
    """The trainer's position and best validation score, saved with each checkpoint."""

    def __init__(self):
        self.step = 0
        self.best_score = -math.inf
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "best_score": self.best_score, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_score, self.history = state["step"], state["best_score"], state["history"]


def train_editor(
    editor: "MalmenEditorModel",
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    train_requests: Sequence[EditRequest],
    args: MalmenTrainingArguments,
    eval_requests: Sequence[EditRequest] | None = None,
) -> "MalmenEditorModel":
    """
    Meta-trains `editor` to edit `model` (MALMEN's decoupled meta-gradient, clipping, Adam).

    Each step edits `args.facts_per_step` training facts at once; with several processes (`accelerate launch`), each
    process caches its share of them and the sums of the normal equation and of the gradients are all-reduced, so N
    processes train the same editor as one process on the same data. Every `eval_every` steps the editor edits
    `eval_facts` held-out facts at once and ES/GS/LS are logged; the editor with the best mean of the three is kept.
    Checkpoints (safetensors and JSON, see `malmen_hf.checkpoints`) allow an exact resume.

    Returns:
        The trained editor (the best one by validation when `eval_requests` is given), also saved to
        `args.output_dir` with its training settings in `config.training` (and every step's losses and scores in
        `training_history.json`).
    """
    log_with = args.log_with
    if log_with == "auto":
        log_with = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
        cpu=not torch.cuda.is_available(),
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    world_size, rank = accelerator.num_processes, accelerator.process_index
    if args.facts_per_step < world_size:
        raise ValueError(f"`facts_per_step` ({args.facts_per_step}) must be at least the number of processes")
    steps_per_epoch = len(train_requests) // args.facts_per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_requests)} training facts are fewer than `facts_per_step` ({args.facts_per_step})"
        )
    max_steps = args.max_steps or args.num_epochs * steps_per_epoch

    if getattr(model, "hf_device_map", None) is None:
        model.to(accelerator.device)
    editor.to(accelerator.device).train()
    optimizer = torch.optim.Adam(editor.parameters(), lr=args.meta_lr)
    progress = _Progress()
    if args.resume_from_checkpoint:
        folder = _checkpoint_to_resume(output_dir, args.resume_from_checkpoint)
        progress.load_state_dict(load_checkpoint(folder, editor, optimizer))
    if editor.config.covariance_weight > 0 and any(cov.count == 0 for cov in editor.key_covariances):
        # Every process reads the same texts, so all fit the same covariance.
        fit_key_covariance(editor, model, covariance_texts(train_requests), tokenizer, batch_size=args.batch_size)
    settings = {
        **dataclasses.asdict(args),
        "num_train_facts": len(train_requests),
        "num_eval_facts": len(eval_requests or ()),
        "num_processes": world_size,
    }
    if log_with:
        accelerator.init_trackers("malmen", config={k: v for k, v in settings.items() if v is not None})
    all_reduce = (lambda tensor: accelerator.reduce(tensor, reduction="sum")) if world_size > 1 else None

    bar = tqdm(total=max_steps, initial=progress.step, disable=not (args.progress and accelerator.is_main_process))
    start = time.monotonic()
    while progress.step < max_steps:
        step_facts = _facts_of_step(train_requests, progress.step, steps_per_epoch, args)
        optimizer.zero_grad(set_to_none=True)
        with accelerator.autocast():
            losses = meta_gradient(
                editor, model, step_facts[rank::world_size], tokenizer, batch_size=args.batch_size,
                editor_batch_size=args.editor_batch_size, c_loc=args.c_loc, all_reduce=all_reduce,
                generalization_on_edit_prompt=args.generalization_on_edit_prompt,
            )  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(editor.parameters(), args.max_grad_norm)
        optimizer.step()
        progress.step += 1
        record = {
            "step": progress.step, "loss": losses.total, "loss_gen": losses.generalization,
            "loss_loc": losses.locality, "grad_norm": float(grad_norm),
        }  # fmt: skip
        out_of_time = _out_of_time(accelerator, start, args.max_time_s)
        last = progress.step == max_steps or out_of_time
        if eval_requests and (progress.step % args.eval_every == 0 or last):
            record.update(_validate(accelerator, editor, model, tokenizer, eval_requests, args, progress, output_dir))
        progress.history.append(record)
        accelerator.log(record, step=progress.step)
        bar.update(1)
        bar.set_postfix(
            loss=f"{losses.total:.3f}", **{k: f"{record[k]:.2f}" for k in ("ES", "GS", "LS") if k in record}
        )
        if progress.step % args.checkpoint_every == 0 or last:
            _save_checkpoint(accelerator, editor, optimizer, progress, output_dir, args.checkpoints_to_keep)
        if out_of_time:
            break
    bar.close()
    editor = _finish(accelerator, editor, output_dir, settings, progress, eval_requests is not None)
    accelerator.print(
        f"Saved the editor to {output_dir}; last validation: {editor.config.training['last_validation']}"
    )
    accelerator.end_training()  # last: it also ends the process group
    return editor


def _out_of_time(accelerator: Accelerator, start: float, budget: float | None) -> bool:
    """Whether this run's wall-clock budget is used up, as decided by the first process (all must stop together)."""
    if budget is None:
        return False
    decision = torch.tensor([float(time.monotonic() - start >= budget)], device=accelerator.device)
    return bool(broadcast(decision, from_process=0).item()) if accelerator.num_processes > 1 else bool(decision.item())


def _facts_of_step(requests, step, steps_per_epoch, args) -> list[EditRequest]:
    """The facts of global step `step`: a fixed order per epoch, so that a resumed run sees the same facts."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(args.seed + epoch))
    chosen = order[index * args.facts_per_step : (index + 1) * args.facts_per_step]
    return [requests[i] for i in chosen.tolist()]


def _validate(accelerator, editor, model, tokenizer, eval_requests, args, progress, output_dir) -> dict:
    """ES/GS/LS of editing `eval_facts` held-out facts at once (main process); keeps the best editor on disk."""
    scores = {}
    if accelerator.is_main_process:
        with accelerator.autocast():
            scores = edit_scores(editor, model, tokenizer, list(eval_requests[: args.eval_facts]), args.batch_size)
        score = sum(v for v in scores.values() if not math.isnan(v)) / len(scores)
        if score > progress.best_score:
            progress.best_score = score
            editor.save_pretrained(output_dir / "best")
    # Every process keeps the main process's scores, so that all histories and checkpoints are the same.
    payload = [scores, progress.best_score]
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    scores, progress.best_score = payload
    return scores


def _checkpoint_to_resume(output_dir: Path, resume: str | bool) -> Path:
    """The folder to resume from: the newest complete checkpoint for `True` / `"latest"`, else the one named."""
    if resume is True or resume == "latest":
        checkpoints = complete_checkpoints(output_dir / "checkpoints")
        if not checkpoints:
            raise FileNotFoundError(f"No checkpoint to resume from in {output_dir / 'checkpoints'} (none is complete)")
        return checkpoints[-1]
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint folder at {path}")
    return path


def _save_checkpoint(accelerator, editor, optimizer, progress, output_dir: Path, keep: int) -> None:
    """The main process writes the checkpoint (every process holds the same state) and drops the older ones."""
    if accelerator.is_main_process:
        checkpoints_dir = output_dir / "checkpoints"
        save_checkpoint(checkpoint_folder(checkpoints_dir, progress.step), editor, optimizer, progress.state_dict())
        for old in complete_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _finish(accelerator, editor, output_dir, settings, progress, validated) -> "MalmenEditorModel":
    """Loads the best editor (when validated), records the training settings in its config and saves it."""
    if validated and (output_dir / "best").is_dir():
        best = type(editor).from_pretrained(output_dir / "best")
        editor.load_state_dict(best.state_dict())
    evaluations = [record for record in progress.history if "ES" in record]
    editor.config.training = {**settings, "steps": progress.step, "best_score": progress.best_score,
                              "last_validation": evaluations[-1] if evaluations else None}  # fmt: skip
    editor.save_pretrained(output_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        (output_dir / "training_history.json").write_text(json.dumps(progress.history, indent=1))
        # The card records this run: its settings and the last validation (held-out facts edited at once).
        last = editor.config.training["last_validation"]
        results = [{"n": min(settings["eval_facts"], settings["num_eval_facts"]), **last}] if last else []
        editor_card(editor, results, editor_id=str(output_dir), dataset="held-out training facts").save(
            output_dir / "README.md"
        )
    accelerator.wait_for_everyone()
    return editor
