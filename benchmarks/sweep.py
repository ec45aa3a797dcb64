"""Train an editor with given settings and score it on fixed validation facts of train.json; one JSON for all runs.

The splits of `--data` (CounterFact's train.json, without the records that give an earlier prompt another target)
never change, so runs compare (`common.sweep_splits`): the last 1,000 records score the result with N = 256 and
N = 1,000 facts edited at once, the 256 before them are the trainer's own validation (it keeps the best editor by
it), and the rest train. `edit.json` is never read here: it is for the final report.
A run is resumable (its folder under `--runs-dir` keeps checkpoints; run the same command again), and its row in
`--results` is replaced when it is scored again.

    python benchmarks/sweep.py --name s6-11-f256 --layers 6-11 --token-positions subject_last --facts-per-step 256 \\
        --max-steps 100
"""

import argparse
import json
import time
from pathlib import Path

import torch

from malmen_hf import (
    MalmenEditorModel,
    MalmenTrainingArguments,
    train_editor,
    training_free_editor,
)
from malmen_hf.evaluation.metrics import edit_scores
from malmen_hf.memit import MemitSettings
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.training.distillation import DistillationArguments, distill_editor, distillation_data
from malmen_hf.training.fitting import covariance_texts, fit_key_covariance
from malmen_hf.training.teacher import cached_teacher_settings, teacher_values

from common import REPO_ROOT, band_modules, command_line, load_counterfact_requests, machine_info, sweep_splits

SCORES = ("ES", "GS", "LS", "CF_efficacy", "CF_paraphrase", "CF_neighborhood")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the run's name: its folder and its row in --results")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/train.json")
    parser.add_argument("--layers", default="24-29", help="FIRST-LAST: the down_proj of those blocks are edited")
    parser.add_argument("--token-positions", default="target", choices=["target", "all", "subject_last"])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--lr-init", type=float, default=1e-4)
    parser.add_argument("--log-lambda-init", type=float, default=0.0)
    parser.add_argument("--covariance-weight", type=float, default=0.0, help="a: preserved keys' C0 per fact")
    parser.add_argument("--covariance-rank", type=int, default=128)
    parser.add_argument("--meta-lr", type=float, default=2e-4)
    parser.add_argument("--c-loc", type=float, default=1.0)
    parser.add_argument("--generalization-on-edit-prompt", action="store_true", help="L_gen on the edit prompt too")
    parser.add_argument("--facts-per-step", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--max-steps", type=int, default=100, help="0: the training-free editor (lr-init, lambda-init)"
    )
    parser.add_argument("--max-time-s", type=float, default=None, help="wall-clock budget of this run's training")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-facts", type=int, default=256)
    parser.add_argument("--n", type=int, nargs="+", default=[256, 1000], help="facts edited at once when scoring")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--teacher", type=Path, default=None,
        help="a teacher-values folder (benchmarks/teacher.py): distill from it first (then meta-train if --max-steps)",
    )  # fmt: skip
    parser.add_argument("--distill-steps", type=int, default=2000, help="regression steps on the teacher's values")
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--skip-training", action="store_true", help="only score the run's saved editor")
    parser.add_argument(
        "--lr-scale", type=float, default=1.0,
        help="multiply each layer's learned lr before scoring (row NAME-lrSCALE): does the step carry to larger N?",
    )  # fmt: skip
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs/sweep")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks/results/sweep.json")
    return parser.parse_args(argv)


def edited_modules(args: argparse.Namespace) -> list[str]:
    return band_modules(args.layers)


def build_editor(model, args: argparse.Namespace) -> MalmenEditorModel:
    return MalmenEditorModel.for_model(
        model, edit_modules=edited_modules(args), rank=args.rank, lr_init=args.lr_init,
        log_lambda_init=args.log_lambda_init,
        token_positions=args.token_positions, covariance_weight=args.covariance_weight,
        covariance_rank=args.covariance_rank,
    )  # fmt: skip


def train(model, tokenizer, train_facts, validation, args: argparse.Namespace) -> tuple[MalmenEditorModel, float]:
    output_dir = args.runs_dir / args.name
    resume = (output_dir / "checkpoints").is_dir() and any((output_dir / "checkpoints").iterdir())
    training_args = MalmenTrainingArguments(
        output_dir=str(output_dir), facts_per_step=args.facts_per_step, batch_size=args.batch_size,
        meta_lr=args.meta_lr, c_loc=args.c_loc, generalization_on_edit_prompt=args.generalization_on_edit_prompt,
        max_steps=args.max_steps, max_time_s=args.max_time_s,
        eval_every=args.eval_every, eval_facts=args.eval_facts, checkpoint_every=args.eval_every,
        resume_from_checkpoint=True if resume else None, mixed_precision=args.mixed_precision, log_with=None,
    )  # fmt: skip
    start = time.perf_counter()
    # With --teacher, meta-training fine-tunes the distilled editor (its regression is resumable too).
    initial = distilled(model, tokenizer, train_facts, args) if args.teacher is not None else build_editor(model, args)
    editor = train_editor(
        initial, model, tokenizer, train_facts, training_args,
        eval_requests=validation[: args.eval_facts],
    )  # fmt: skip
    return editor, time.perf_counter() - start


def distilled(model, tokenizer, train_facts, args: argparse.Namespace) -> MalmenEditorModel:
    """An editor fitted to the teacher's value changes of every training fact the teacher folder holds."""
    identity, count = cached_teacher_settings(args.teacher)
    facts = train_facts[:count]
    _, deltas = teacher_values(
        model, tokenizer, facts, args.teacher, residual_module=identity["residual_module"],
        context_templates=identity["context_templates"], settings=MemitSettings(**identity["settings"]),
        chunk_size=identity["chunk_size"],
    )  # fmt: skip
    editor = build_editor(model, args)
    if args.covariance_weight > 0:
        fit_key_covariance(editor, model, covariance_texts(train_facts), tokenizer, batch_size=args.batch_size)
    data = distillation_data(editor, model, tokenizer, facts, deltas, batch_size=args.batch_size)
    output_dir = args.runs_dir / args.name / "distill"
    distill_args = DistillationArguments(str(output_dir), max_steps=args.distill_steps, learning_rate=args.distill_lr)
    losses = distill_editor(editor, data, distill_args)
    print(f"distilled on {count} facts: loss {losses[0] if losses else float('nan'):.3f} -> "
          f"{losses[-1] if losses else float('nan'):.3f}", flush=True)  # fmt: skip
    return editor


def training_free(model, tokenizer, train_facts, args: argparse.Namespace) -> MalmenEditorModel:
    """The untrained editor with the run's layers, positions and covariance, fitted on 512 training facts."""
    return training_free_editor(
        model, tokenizer, train_facts[:512], edit_modules=edited_modules(args),
        lr=args.lr_init, log_lambda=args.log_lambda_init, batch_size=args.batch_size,
        token_positions=args.token_positions, covariance_weight=args.covariance_weight,
        covariance_rank=args.covariance_rank,
    )  # fmt: skip


def score(editor, model, tokenizer, scored, sizes: list[int], batch_size: int) -> dict[str, dict[str, float]]:
    return {str(n): edit_scores(editor, model, tokenizer, scored[:n], batch_size, SCORES) for n in sizes}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(device)
    records = load_counterfact_requests(args.data)
    train_facts, validation, scored = sweep_splits(records)
    seconds = 0.0
    if args.skip_training:
        editor = MalmenEditorModel.from_pretrained(args.runs_dir / args.name).to(device)
    elif args.teacher is not None and args.max_steps == 0:
        editor = distilled(model, tokenizer, train_facts, args)
    elif args.max_steps == 0:
        editor = training_free(model, tokenizer, train_facts, args)
    else:
        editor, seconds = train(model, tokenizer, train_facts, validation, args)
    editor.eval()
    if args.lr_scale != 1.0:
        with torch.no_grad():
            for net in editor.nets.values():
                net.lr.mul_(args.lr_scale)
    row = {
        "name": args.name if args.lr_scale == 1.0 else f"{args.name}-lr{args.lr_scale:g}",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps": editor.config.training["steps"] if editor.config.training else None,
        "train_seconds_this_run": round(seconds, 1),
        "trainer_validation": (editor.config.training or {}).get("last_validation"),
        "scores": score(editor, model, tokenizer, scored, args.n, args.batch_size),
        "command": command_line(__file__),
        "machine": machine_info(device),
    }
    print(json.dumps({k: row[k] for k in ("name", "steps", "scores")}, indent=1))
    write(args.results, row)


def write(path: Path, row: dict) -> None:
    """Replaces the row of the same name in the results file (others are kept), atomically."""
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [run for run in runs if run["name"] != row["name"]] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    temporary.replace(path)


if __name__ == "__main__":
    main()
