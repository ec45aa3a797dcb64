"""`MalmenTrainingArguments`: the settings of `train_editor`, in a module that imports neither torch nor transformers
(the command line builds its `train` options from these fields, and `malmen-hf train --help` should be instant)."""

import dataclasses
import math
from typing import Literal


@dataclasses.dataclass
class MalmenTrainingArguments:
    """
    Settings of [`train_editor`].

    Args:
        output_dir (`str`): Where the editor, its best version and the checkpoints go.
        facts_per_step (`int`, defaults to 128): Facts edited at once in each meta-training step (split between
            processes).
        batch_size (`int`, defaults to 32): Facts per forward/backward pass of the base model.
        editor_batch_size (`int`, defaults to 1024): Token positions per pass of the hyper-network.
        meta_lr (`float`, defaults to 1e-5): Adam learning rate of the editor.
        c_loc (`float`, defaults to 1.0): Weight of the locality loss.
        generalization_on_edit_prompt (`bool`, defaults to `False`): Score the generalization loss on each edit
            prompt too, besides its rephrasings.
        max_grad_norm (`float`, defaults to 1.0): Gradient-norm clipping.
        num_epochs (`int`, defaults to 1): Passes over the training facts (ignored when `max_steps` is set).
        max_steps (`int`, *optional*): Number of meta-training steps.
        max_time_s (`float`, *optional*): A wall-clock budget in seconds for this run (a resumed run counts its own
            time): training stops after the step that uses it up, and validates, checkpoints and saves as at the end.
        eval_every (`int`, defaults to 50): Validate (ES/GS/LS on held-out facts) every this many steps and at the
            end.
        eval_facts (`int`, defaults to 128): Held-out facts edited at once for validation.
        checkpoint_every (`int`, defaults to 50): Save a resumable checkpoint every this many steps.
        checkpoints_to_keep (`int`, defaults to 2): The older checkpoints are deleted.
        resume_from_checkpoint (`str` or `bool`, *optional*): A checkpoint folder, or `True` for the latest one in
            `output_dir/checkpoints`. The editor, Adam's moments, the step and the random generators are restored;
            these arguments (`meta_lr`, `c_loc`, ...) apply from there on.
        mixed_precision (`str`, defaults to `"no"`): `"no"` or `"bf16"` (autocast of the base model's passes).
        log_with (`str`, *optional*, defaults to `"auto"`): An accelerate tracker (`"tensorboard"`, `"wandb"`,
            `"all"`, ...); `"auto"` logs to TensorBoard (in `output_dir/logs`) when it is installed; `None` logs
            nothing.
        seed (`int`, defaults to 0): Seed of the fact order and of torch.
        progress (`bool`, defaults to `True`): Show a progress bar.
    """

    output_dir: str
    facts_per_step: int = 128
    batch_size: int = 32
    editor_batch_size: int = 1024
    meta_lr: float = 1e-5
    c_loc: float = 1.0
    generalization_on_edit_prompt: bool = False
    max_grad_norm: float = 1.0
    num_epochs: int = 1
    max_steps: int | None = None
    max_time_s: float | None = None
    eval_every: int = 50
    eval_facts: int = 128
    checkpoint_every: int = 50
    checkpoints_to_keep: int = 2
    resume_from_checkpoint: str | bool | None = None
    mixed_precision: Literal["no", "bf16"] = "no"
    log_with: str | None = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("facts_per_step", "batch_size", "editor_batch_size", "num_epochs", "eval_every", "eval_facts",
                     "checkpoint_every", "checkpoints_to_keep"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"`max_steps` must be a positive integer or None, got {self.max_steps!r}")
        if self.max_time_s is not None and not (math.isfinite(self.max_time_s) and self.max_time_s > 0):
            raise ValueError(f"`max_time_s` must be a positive number of seconds or None, got {self.max_time_s!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"`mixed_precision` must be 'no' or 'bf16', got {self.mixed_precision!r} (fp16 would need loss "
                "scaling of the closed-form meta-gradient)"
            )
        for name in ("meta_lr", "c_loc", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {getattr(self, name)!r}")
