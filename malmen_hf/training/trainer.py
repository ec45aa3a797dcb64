"""`train_editor`: MALMEN meta-training on accelerate, on one process or several, resumable."""

import dataclasses
import importlib.util
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ..evaluation.cards import editor_card
from ..evaluation.metrics import edit_scores
from ..evaluation.scores import DEFAULT_SCORES
from ..facts import EditRequest
from .arguments import MalmenTrainingArguments
from .checkpoints import checkpoint_folder, complete_checkpoints, load_checkpoint, save_checkpoint
from .fitting import covariance_texts, fit_key_covariance
from .meta_gradient import meta_gradient

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..modeling_malmen import MalmenEditorModel


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
    Checkpoints (safetensors and JSON, see `malmen_hf.training.checkpoints`) allow an exact resume.

    Returns:
        The trained editor (the best one by validation when `eval_requests` is given), also saved to
        `args.output_dir` with its training settings in `config.training` (and every step's losses and scores in
        `training_history.json`).
    """
    run = _TrainingRun(editor, model, tokenizer, args, train_requests, eval_requests)
    bar = tqdm(total=run.max_steps, initial=run.progress.step, disable=not (args.progress and run.is_main_process))
    start = time.monotonic()
    while run.progress.step < run.max_steps:
        record = run.step()
        out_of_time = _out_of_time(run.accelerator, start, args.max_time_s)
        last = run.progress.step == run.max_steps or out_of_time
        if eval_requests and (run.progress.step % args.eval_every == 0 or last):
            record.update(run.validate())
        run.progress.history.append(record)
        run.accelerator.log(record, step=run.progress.step)
        bar.update(1)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", **{k: f"{record[k]:.2f}" for k in ("ES", "GS", "LS") if k in record}
        )
        if run.progress.step % args.checkpoint_every == 0 or last:
            run.save_checkpoint()
        if out_of_time:
            break
    bar.close()
    editor = run.finish()
    kept = editor.config.training["best_step"]
    run.accelerator.print(
        f"Saved the editor{f' of step {kept} (the best validation)' if kept else ''} to {run.output_dir}; "
        f"last validation: {editor.config.training['last_validation']}"
    )
    run.accelerator.end_training()  # last: it also ends the process group
    return editor


class _TrainingRun:
    """One call of [`train_editor`]: its accelerator, optimizer and progress, and what each step does with them."""

    def __init__(
        self,
        editor: "MalmenEditorModel",
        model: "PreTrainedModel",
        tokenizer: "PreTrainedTokenizerBase",
        args: MalmenTrainingArguments,
        train_requests: Sequence[EditRequest],
        eval_requests: Sequence[EditRequest] | None,
    ):
        self.editor, self.model, self.tokenizer, self.args = editor, model, tokenizer, args
        self.train_requests, self.eval_requests = train_requests, eval_requests
        log_with = args.log_with
        if log_with == "auto":
            log_with = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
            cpu=not torch.cuda.is_available(),
        )
        self.is_main_process = self.accelerator.is_main_process
        set_seed(args.seed)
        self.steps_per_epoch, self.max_steps = _schedule(len(train_requests), args, self.accelerator.num_processes)
        if getattr(model, "hf_device_map", None) is None:
            model.to(self.accelerator.device)
        editor.to(self.accelerator.device).train()
        self.optimizer = torch.optim.Adam(editor.parameters(), lr=args.meta_lr)
        self.progress = _Progress()
        if args.resume_from_checkpoint:
            folder = _checkpoint_to_resume(self.output_dir, args.resume_from_checkpoint)
            self.progress.load_state_dict(load_checkpoint(folder, editor, self.optimizer))
            # The restored Adam state carries the old run's learning rate; a resumed run trains with the one given now.
            for group in self.optimizer.param_groups:
                group["lr"] = args.meta_lr
        if editor.config.covariance_weight > 0 and any(cov.count == 0 for cov in editor.key_covariances):
            # Every process reads the same texts, so all fit the same covariance.
            fit_key_covariance(editor, model, covariance_texts(train_requests), tokenizer, batch_size=args.batch_size)
        self.settings = {
            **dataclasses.asdict(args),
            "num_train_facts": len(train_requests),
            "num_eval_facts": len(eval_requests or ()),
            "num_processes": self.accelerator.num_processes,
        }
        if log_with:
            self.accelerator.init_trackers("malmen", config={k: v for k, v in self.settings.items() if v is not None})

    def step(self) -> dict:
        """One meta-training step on this step's facts (this process's share of them); returns its record."""
        accelerator, args = self.accelerator, self.args
        world_size, rank = accelerator.num_processes, accelerator.process_index
        all_reduce = (lambda tensor: accelerator.reduce(tensor, reduction="sum")) if world_size > 1 else None
        step_facts = _facts_of_step(self.train_requests, self.progress.step, self.steps_per_epoch, args)
        self.optimizer.zero_grad(set_to_none=True)
        with accelerator.autocast():
            losses = meta_gradient(
                self.editor, self.model, step_facts[rank::world_size], self.tokenizer, batch_size=args.batch_size,
                editor_batch_size=args.editor_batch_size, c_loc=args.c_loc, all_reduce=all_reduce,
                generalization_on_edit_prompt=args.generalization_on_edit_prompt,
            )  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.editor.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.progress.step += 1
        return {
            "step": self.progress.step,
            "loss": losses.total,
            "loss_gen": losses.generalization,
            "loss_loc": losses.locality,
            "grad_norm": float(grad_norm),
        }

    def validate(self) -> dict:
        """ES/GS/LS of editing `eval_facts` held-out facts at once (main process); keeps the best editor on disk."""
        scores, progress = {}, self.progress
        if self.is_main_process:
            with self.accelerator.autocast():
                facts = list(self.eval_requests[: self.args.eval_facts])
                scores = edit_scores(self.editor, self.model, self.tokenizer, facts, self.args.batch_size)
            score = _validation_score(scores)
            if score > progress.best_score:
                progress.best_score = score
                self.editor.save_pretrained(self.output_dir / "best")
        # Every process keeps the main process's scores, so that all histories and checkpoints are the same.
        payload = [scores, progress.best_score]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        scores, progress.best_score = payload
        return scores

    def save_checkpoint(self) -> None:
        """The main process writes the checkpoint (every process holds the same state) and drops the older ones."""
        if self.is_main_process:
            checkpoints_dir = self.output_dir / "checkpoints"
            folder = checkpoint_folder(checkpoints_dir, self.progress.step)
            save_checkpoint(folder, self.editor, self.optimizer, self.progress.state_dict())
            for old in complete_checkpoints(checkpoints_dir)[: -self.args.checkpoints_to_keep]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def finish(self) -> "MalmenEditorModel":
        """Loads the best editor (when validated), records the training settings in its config and saves it."""
        editor, output_dir, progress = self.editor, self.output_dir, self.progress
        if self.eval_requests is not None and (output_dir / "best").is_dir():
            best = type(editor).from_pretrained(output_dir / "best")
            editor.load_state_dict(best.state_dict())
        evaluations = [record for record in progress.history if "ES" in record]
        last = evaluations[-1] if evaluations else None
        # The editor kept is the first validated one with the best score (a later tie does not replace it).
        kept = [record["step"] for record in evaluations if _validation_score(record) == progress.best_score]
        editor.config.training = {
            **self.settings,
            "steps": progress.step,
            "best_score": progress.best_score,
            "best_step": kept[0] if kept else None,
            "last_validation": last,
        }
        editor.save_pretrained(output_dir, is_main_process=self.is_main_process)
        if self.is_main_process:
            (output_dir / "training_history.json").write_text(json.dumps(progress.history, indent=1))
            # The card records this run: its settings and the last validation (held-out facts edited at once).
            results = [{"n": min(self.args.eval_facts, self.settings["num_eval_facts"]), **last}] if last else []
            card = editor_card(editor, results, editor_id=str(output_dir), dataset="held-out training facts")
            card.save(output_dir / "README.md")
        self.accelerator.wait_for_everyone()
        return editor


def _validation_score(scores: Mapping[str, float]) -> float:
    """What the best editor is chosen by: the mean of a validation's ES, GS and LS, leaving out any that is NaN."""
    values = [scores[name] for name in DEFAULT_SCORES]
    return sum(value for value in values if not math.isnan(value)) / len(values)


def _schedule(num_facts: int, args: MalmenTrainingArguments, world_size: int) -> tuple[int, int]:
    """Steps per epoch and the number of steps of the run."""
    if args.facts_per_step < world_size:
        raise ValueError(f"`facts_per_step` ({args.facts_per_step}) must be at least the number of processes")
    steps_per_epoch = num_facts // args.facts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{num_facts} training facts are fewer than `facts_per_step` ({args.facts_per_step})")
    return steps_per_epoch, args.max_steps or args.num_epochs * steps_per_epoch


def _out_of_time(accelerator: Accelerator, start: float, budget: float | None) -> bool:
    """Whether this run's wall-clock budget is used up, as decided by the first process (all must stop together)."""
    if budget is None:
        return False
    decision = torch.tensor([float(time.monotonic() - start >= budget)], device=accelerator.device)
    return bool(broadcast(decision, from_process=0).item()) if accelerator.num_processes > 1 else bool(decision.item())


def _facts_of_step(
    requests: Sequence[EditRequest], step: int, steps_per_epoch: int, args: MalmenTrainingArguments
) -> list[EditRequest]:
    """The facts of global step `step`: a fixed order per epoch, so that a resumed run sees the same facts."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(args.seed + epoch))
    chosen = order[index * args.facts_per_step : (index + 1) * args.facts_per_step]
    return [requests[i] for i in chosen.tolist()]


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
