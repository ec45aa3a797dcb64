"""
Distilling a MALMEN editor from a teacher's value changes (MEMIT's, see `teacher.py`): the hyper-network's value
difference of each training fact, `d = -lr <k, k~> g~` at each edited layer, is regressed onto the teacher's. The
keys and value gradients are cached once (one forward and backward of the base model per batch of facts), so a step
costs no pass of the base model: thousands of steps take minutes. Meta-training ([`train_editor`]) can fine-tune
the result with the MALMEN loss afterwards.

The teacher's change at layer `m` of a fact is MEMIT's equal share of its residual change, `delta / layers`: what
MEMIT's spreading writes into each layer when the layers' effects on each other are left aside.
"""

import dataclasses
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..caching import cached_batches
from ..facts import FactLike, as_edit_requests, batches_by_length, model_kind, pad_id_of, tokenize_edit_prompts
from ..functional import value_differences
from ..layers import edited_modules
from .checkpoints import checkpoint_folder, complete_checkpoints, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..modeling_malmen import MalmenEditorModel


@dataclasses.dataclass
class DistillationData:
    """Per edited module, one row per fact: its key, its value gradient and the teacher's value change."""

    keys: dict[str, torch.Tensor]
    value_grads: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]

    @property
    def num_facts(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    def of(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The keys, value gradients and teacher's changes of module `name`."""
        return self.keys[name], self.value_grads[name], self.targets[name]


def distillation_data(
    editor: "MalmenEditorModel",
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    facts: Iterable[FactLike],
    residual_deltas: torch.Tensor,
    *,
    batch_size: int = 32,
) -> DistillationData:
    """
    The keys and value gradients of `model` at each fact's subject (the editor's `token_positions="subject_last"`:
    one row per fact and layer), in the order of `facts`, with the teacher's change `residual_deltas[i] / layers`.
    """
    requests = as_edit_requests(facts)
    if editor.config.token_positions != "subject_last":
        raise ValueError(
            "Distillation from MEMIT's values needs an editor that reads its keys at the subject's last token "
            f"(token_positions='subject_last'), as MEMIT does, not at {editor.config.token_positions!r}."
        )
    if residual_deltas.shape[0] != len(requests):
        raise ValueError(f"{residual_deltas.shape[0]} teacher values for {len(requests)} facts: give one per fact.")
    modules = edited_modules(editor, model)
    kind = model_kind(model)
    examples = tokenize_edit_prompts(tokenizer, requests, kind)
    batches = batches_by_length(examples, batch_size)
    keys = {name: [None] * len(requests) for name in modules}
    grads = {name: [None] * len(requests) for name in modules}
    stream = cached_batches(
        model, modules, examples, batches, pad_id=pad_id_of(tokenizer), kind=kind, token_positions="subject_last"
    )
    for indices, cached in zip(batches, stream, strict=True):
        for name, (batch_keys, batch_grads) in cached.items():
            for row, index in enumerate(indices):  # subject_last: row `row` of the batch is its fact `index`
                keys[name][index], grads[name][index] = batch_keys[row], batch_grads[row]
    share = residual_deltas.float() / len(modules)
    return DistillationData(
        keys={name: torch.stack(rows).float() for name, rows in keys.items()},
        value_grads={name: torch.stack(rows).float() for name, rows in grads.items()},
        targets={name: share for name in modules},
    )


def distillation_loss(editor: "MalmenEditorModel", data: DistillationData, rows: torch.Tensor) -> torch.Tensor:
    """
    The mean over edited modules of `sum_i |d_i - t_i|^2 / sum_i |t_i|^2` over the facts `rows`: the squared error of
    the editor's value differences `d` against the teacher's `t`, relative to the teacher's (0 is a perfect copy, 1
    what predicting zero gives).
    """
    losses = []
    for name in data.keys:
        net, layer_index = editor.net_for(name)
        keys, grads, targets = (part[rows].to(editor.device) for part in data.of(name))
        pseudo_keys, pseudo_grads = net(keys, grads, layer_index)
        diffs = value_differences(keys, pseudo_keys, pseudo_grads, net.lr[layer_index])
        losses.append((diffs - targets).square().sum() / targets.square().sum().clamp_min(1e-30))
    return torch.stack(losses).mean()


@dataclasses.dataclass
class DistillationArguments:
    """
    Settings of [`distill_editor`].

    Args:
        output_dir (`str`): Where the checkpoints go (`output_dir/checkpoints`, resumable).
        max_steps (`int`, defaults to 2000): Regression steps.
        learning_rate (`float`, defaults to 1e-3): Adam's.
        batch_size (`int`, defaults to 256): Facts per step.
        max_grad_norm (`float`, defaults to 1.0): Gradient-norm clipping.
        checkpoint_every (`int`, defaults to 500): Save a resumable checkpoint every this many steps and at the end.
        seed (`int`, defaults to 0): Seed of the facts drawn at each step.
        progress (`bool`, defaults to `True`): Show a progress bar.
    """

    output_dir: str
    max_steps: int = 2000
    learning_rate: float = 1e-3
    batch_size: int = 256
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a positive number, got {value!r}")


def distill_editor(editor: "MalmenEditorModel", data: DistillationData, args: DistillationArguments) -> list[float]:
    """
    Fits `editor`'s hyper-networks to the teacher's value changes in `data` (see [`distillation_loss`]): Adam on
    random batches of facts, resumable from the newest checkpoint in `args.output_dir`. A fresh editor first gets its
    normalizer fitted on the data and each layer's `lr` set to the least-squares scale of its untrained value
    differences, so that the regression starts from the best scaled gradient rather than from zero.

    Returns:
        The loss of every step of this call.
    """
    checkpoints_dir = Path(args.output_dir) / "checkpoints"
    optimizer = torch.optim.Adam(editor.parameters(), lr=args.learning_rate)
    saved = complete_checkpoints(checkpoints_dir)
    step = load_checkpoint(saved[-1], editor, optimizer)["step"] if saved else 0
    if step == 0:
        _start_from_scaled_gradients(editor, data)
    editor.train()
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    for current in tqdm(range(step, args.max_steps), desc="Distilling", disable=not args.progress):
        # The batch of step `current` depends on the step alone: a resumed run draws the same facts.
        generator.manual_seed(args.seed * 1_000_003 + current)
        rows = torch.randperm(data.num_facts, generator=generator)[: args.batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = distillation_loss(editor, data, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), args.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if (current + 1) % args.checkpoint_every == 0 or current + 1 == args.max_steps:
            # The trainer's checkpoint format: its score is the negated loss, its history is kept by the caller.
            state = {"step": current + 1, "best_score": -loss.item(), "history": []}
            save_checkpoint(checkpoint_folder(checkpoints_dir, current + 1), editor, optimizer, state)
            for old in complete_checkpoints(checkpoints_dir)[:-2]:  # two: the newest may be cut short by a kill
                shutil.rmtree(old)
    editor.eval()
    return losses


@torch.no_grad()
def _start_from_scaled_gradients(editor: "MalmenEditorModel", data: DistillationData) -> None:
    fresh = {id(net) for net, _ in map(editor.net_for, data.keys) if net.normalizer.count == 0}
    for name in data.keys:
        net, _ = editor.net_for(name)
        if id(net) in fresh:  # a net serves every layer of its shape: its statistics are those of all of them
            keys, grads, _ = data.of(name)
            net.normalizer.update(torch.cat((keys, grads), dim=-1).to(editor.device))
    for name in data.keys:
        net, layer_index = editor.net_for(name)
        keys, grads, targets = (part.to(editor.device) for part in data.of(name))
        pseudo_keys, pseudo_grads = net(keys, grads, layer_index)
        unit = value_differences(keys, pseudo_keys, pseudo_grads, torch.ones((), device=editor.device))
        net.lr[layer_index] = (unit * targets).sum() / unit.square().sum().clamp_min(1e-30)


__all__ = ["DistillationArguments", "DistillationData", "distill_editor", "distillation_data", "distillation_loss"]
