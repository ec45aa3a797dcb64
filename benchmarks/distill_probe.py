"""What limits an editor distilled from MEMIT's values: its target, or how well it copies it? On train.json only.

Both parts read the teacher's values of training facts cached by `benchmarks/teacher.py` (`--teacher`), so nothing
here runs MEMIT's value optimization.

- `ceiling`: the first `--n` cached facts edited at once with the teacher's own values, in three ways: MEMIT (its
  spread, layer by layer with template-mean keys read again after each layer); the *perfect student*, i.e. what a
  distilled editor would do with zero regression error (each layer's key at the subject's last token of the plain
  prompt mapped to the teacher's `delta / layers`, one least-squares solve per layer, as `apply_edits` solves); and
  the same with the whole `delta` written into the band's top layer. ES, GS, LS and the CounterFact scores.
- `curve`: how well a student copies the teacher on facts it was not fitted on, against the number of teacher facts:
  the relative squared error of `malmen_hf.training.distillation.distillation_loss` (0: a perfect copy, 1: predicting
  zero) on the first `--held-out` cached facts, for students fitted on the next `--sizes` facts: the best scaled
  gradient (one distillation step), the hyper-network every `--eval-every` of `--steps` distillation steps (on the
  facts it is fitted on too), and a ridge-regression linear map from the unit key and unit value gradient (closed
  form, each of `--ridge` strengths).

    python benchmarks/distill_probe.py ceiling --n 256
    python benchmarks/distill_probe.py curve --sizes 112 224 448 --steps 2000
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from malmen_hf import MalmenEditorModel, apply_memit
from malmen_hf.edits import apply_shifts
from malmen_hf.evaluation.metrics import locality_predictions, scores_of_model
from malmen_hf.layers import edited_modules
from malmen_hf.memit import MemitSettings, _least_squares
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.training.distillation import (
    DistillationArguments,
    DistillationData,
    distill_editor,
    distillation_data,
    distillation_loss,
)
from malmen_hf.training.teacher import cached_teacher_settings, teacher_values

from common import (
    REPO_ROOT,
    band_modules,
    command_line,
    load_counterfact_requests,
    machine_info,
    memit_editor,
    sweep_splits,
)

SCORES = ("ES", "GS", "LS", "CF_efficacy", "CF_paraphrase", "CF_neighborhood")
TEACHER = Path.home() / ".cache/malmen-hf/teacher/smollm2-135m-model.layers.17-steps25"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["ceiling", "curve"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/train.json")
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="a folder of benchmarks/teacher.py")
    parser.add_argument("--layers", default="12-17", help="FIRST-LAST: the band (its top block is the teacher's)")
    parser.add_argument("--preserve", type=float, default=0.3, help="a: the preserved keys' weight per fact")
    parser.add_argument("--n", type=int, default=256, help="ceiling: facts edited at once")
    parser.add_argument("--held-out", type=int, default=64, help="curve: the first facts, never fitted on")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224, 448], help="curve: facts fitted on")
    parser.add_argument("--steps", type=int, default=2000, help="curve: distillation steps of the hyper-network")
    parser.add_argument("--eval-every", type=int, default=100, help="curve: steps between the errors measured")
    parser.add_argument("--ridge", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/distill_probe.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    train, _, _ = sweep_splits(load_counterfact_requests(args.data))
    needed = args.n if args.part == "ceiling" else args.held_out + max(args.sizes)
    facts, residuals, deltas, templates = cached_teacher(model, tokenizer, train, args.teacher, needed)
    if args.part == "ceiling":
        rows = ceiling(model, tokenizer, train, facts, residuals, deltas, templates, args)
    else:
        rows = curve(model, tokenizer, facts, deltas, args)
    write(args.output, args.part, {"rows": rows, "command": command_line(__file__), "machine": machine_info(
        torch.device("cpu"))})  # fmt: skip


def cached_teacher(model, tokenizer, train: list, folder: Path, count: int):
    """The first `count` training facts with their cached teacher residuals and changes; refuses to compute any."""
    identity, cached = cached_teacher_settings(folder)
    if cached < count:
        raise SystemExit(f"{folder} holds the teacher's values of {cached} facts, {count} needed: run teacher.py.")
    facts = train[:count]
    residuals, deltas = teacher_values(
        model, tokenizer, facts, folder, residual_module=identity["residual_module"],
        context_templates=identity["context_templates"], settings=MemitSettings(**identity["settings"]),
        chunk_size=identity["chunk_size"],
    )  # fmt: skip
    return facts, residuals, deltas, identity["context_templates"]


def ceiling(model, tokenizer, train, facts, residuals, deltas, templates, args) -> list[dict]:
    editor = memit_editor(model, tokenizer, band_modules(args.layers), train, preserve=args.preserve)
    before = locality_predictions(model, tokenizer, facts)
    rows = []

    def measured(name: str, handle) -> None:
        try:
            rows.append({"values": name, "n": len(facts)} | scores_of_model(model, tokenizer, facts, before,
                                                                               scores=SCORES))  # fmt: skip
        finally:
            handle.revert()
        print(rows[-1], flush=True)

    handle = apply_memit(editor, model, facts, tokenizer=tokenizer, residual_targets=residuals + deltas,
                         context_templates=templates)  # fmt: skip
    measured("memit_spread", handle)
    data = distillation_data(editor, model, tokenizer, facts, deltas)
    top = band_modules(args.layers)[-1]
    measured("perfect_student", one_solve(editor, model, facts, data, lambda name: data.targets[name]))
    whole = {name: deltas if name == top else torch.zeros_like(deltas) for name in data.targets}
    measured("whole_delta_in_top_layer", one_solve(editor, model, facts, data, whole.__getitem__))
    return rows


def one_solve(editor, model, facts, data: DistillationData, targets_of):
    """Each layer's shift from its keys and given value changes, by the editor's least squares (with its C0)."""
    modules = edited_modules(editor, model)
    shifts = {}
    for name in modules:  # MEMIT's solve (the editor's a, C0 and lambda), on the student's keys and changes
        keys, targets = data.keys[name].double(), targets_of(name).double()
        shifts[name] = _least_squares(editor, name, keys, targets, len(facts), None).float()
    return apply_shifts(
        model, modules, shifts, facts=facts, num_tokens=len(facts), aggregation="least_squares", timings={},
        editor_name_or_path=None, base_model_name_or_path=None,
    )  # fmt: skip


def curve(model, tokenizer, facts, deltas, args) -> list[dict]:
    data = distillation_data(student(model, args), model, tokenizer, facts, deltas)
    held_out = subset(data, torch.arange(args.held_out))
    rows = []
    for size in args.sizes:
        fitted = subset(data, torch.arange(args.held_out, args.held_out + size))
        start = time.perf_counter()
        row = {"fitted_facts": size, "held_out_facts": args.held_out}
        row["scaled_gradient"] = held_out_loss(distilled(model, fitted, 1, args), held_out)
        row["hypernetwork"] = trajectory(model, fitted, held_out, args)
        best = min(row["hypernetwork"], key=lambda point: point["held_out"])
        row["hypernetwork_best"], row["hypernetwork_last"] = best, row["hypernetwork"][-1]
        row["ridge"] = {str(strength): ridge_loss(fitted, held_out, strength) for strength in args.ridge}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(row, flush=True)
        rows.append(row)
    return rows


def student(model, args) -> MalmenEditorModel:
    """The distilled editors' settings of `benchmarks/sweep.py`'s distillation rows."""
    return MalmenEditorModel.for_model(
        model, edit_modules=band_modules(args.layers), rank=256, lr_init=1e-4, log_lambda_init=-2.0,
        token_positions="subject_last", covariance_weight=args.preserve, covariance_rank=128,
    )  # fmt: skip


def distilled(model, data: DistillationData, steps: int, args) -> MalmenEditorModel:
    editor = student(model, args)
    with tempfile.TemporaryDirectory() as folder:
        distill_editor(editor, data, DistillationArguments(folder, max_steps=steps, progress=False))
    return editor


def trajectory(model, fitted: DistillationData, held_out: DistillationData, args) -> list[dict]:
    """The errors of one distillation every `--eval-every` steps (each call resumes the last one's checkpoint)."""
    editor, points = student(model, args), []
    some_fitted = subset(fitted, torch.arange(min(fitted.num_facts, 256)))
    with tempfile.TemporaryDirectory() as folder:
        for steps in range(args.eval_every, args.steps + 1, args.eval_every):
            settings = DistillationArguments(folder, max_steps=steps, checkpoint_every=args.eval_every, progress=False)
            distill_editor(editor, fitted, settings)
            points.append({"step": steps, "held_out": held_out_loss(editor, held_out),
                           "fitted": held_out_loss(editor, some_fitted)})  # fmt: skip
    return points


@torch.no_grad()
def held_out_loss(editor: MalmenEditorModel, data: DistillationData) -> float:
    return distillation_loss(editor, data, torch.arange(data.num_facts)).item()


def subset(data: DistillationData, rows: torch.Tensor) -> DistillationData:
    def part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor[rows] for name, tensor in tensors.items()}

    return DistillationData(part(data.keys), part(data.value_grads), part(data.targets))


def ridge_loss(fitted: DistillationData, held_out: DistillationData, strength: float) -> float:
    """`distillation_loss` of a linear map from `[k / |k|, g / |g|]` to the teacher's change, fitted per layer."""

    def features(data: DistillationData, name: str) -> torch.Tensor:
        keys, grads = data.keys[name], data.value_grads[name]
        return torch.cat((keys / keys.norm(dim=1, keepdim=True), grads / grads.norm(dim=1, keepdim=True)), 1).double()

    losses = []
    for name in fitted.keys:
        inputs, targets = features(fitted, name), fitted.targets[name].double()
        system = inputs.T @ inputs + strength * torch.eye(inputs.shape[1], dtype=inputs.dtype)
        weights = torch.linalg.solve(system, inputs.T @ targets)
        predicted, truth = features(held_out, name) @ weights, held_out.targets[name].double()
        losses.append(((predicted - truth).square().sum() / truth.square().sum()).item())
    return sum(losses) / len(losses)


def write(path: Path, part: str, result: dict) -> None:
    """Replaces this part's result in the JSON at `path` (the other part's is kept)."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[part] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
