"""
Edit quality against the baselines: ES / GS / LS and CounterFact's scores when N facts are edited at once.

For each N (default 1, 10, 100, 1000, 10000) the first N facts of `../shared/data/counterfact/edit.json` are edited
at once on SmolLM2-135M by each method, scored, and reverted, all in one run:

- `malmen`: a trained MALMEN editor (least-squares aggregation), `--malmen-editor`;
- `mend`: an editor trained the same way with MEND's summed aggregation, `--mend-editor`;
- `training_free`: the untrained editor (identity blocks) on the same layers, its normalizer fitted and its lr and
  lambda chosen on `train.json` (never on `edit.json`): a grid search with `--tune`, or `--training-free-lr/-lambda`;
- `fine_tuning`: constrained fine-tuning of the same layers on the same facts (ROME's FT-L baseline): `--ft-steps`
  full-batch Adam steps on the per-fact edit loss, the change of each weight clamped to `--ft-max-change` after each;
- `memit`: MEMIT (`malmen_hf.apply_memit`) on the `--memit-layers` band, its preserved keys' weight `--memit-preserve`
  chosen on train.json (`benchmarks/memit_sweep.py`), its covariance fitted on `--memit-covariance-facts` train
  facts; the per-fact values are computed once for the first max(N) facts and cached in `--memit-cache` (resumable),
  so `edit s` is the spreading only and `values s` the value step's share of those facts;
- `no_edit`: the unedited model.

N = 1 is the mean of `--single-trials` separate one-fact edits. Above `--score-sample` facts the scores are measured
on a fixed uniform sample of that many of the N edited facts (they are means over facts; every fact is edited).
Scores: see `malmen_hf.evaluation.metrics.SCORES`. LS compares with the unedited model's argmax, LS_acc with the
dataset answer.

Run from the repository root, on an otherwise idle machine (see `edit_speed.py` on threads):

    python benchmarks/quality.py --malmen-editor editors/malmen-smollm2-135m-counterfact \\
        --mend-editor runs/mend --tune
    python benchmarks/quality.py --n 1 10 100 --methods training_free no_edit --tune

It prints a markdown table, writes JSON (default `benchmarks/results/quality.json`, rewritten after every row so that
an interrupted run keeps what it measured; `--resume` measures only the rows it lacks) and draws a PNG (metric vs N,
one line per method).
"""

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from malmen_hf import (
    MalmenEditorModel,
    apply_memit,
    default_edit_modules,
    load_edit_requests,
    training_free_editor,
)
from malmen_hf.caching import frozen
from malmen_hf.evaluation.metrics import SCORES, locality_predictions, scores_of_model
from malmen_hf.facts import IGNORE_INDEX, batches_by_length, collate, pad_id_of, tokenize_edit_prompts
from malmen_hf.memit import MemitSettings, generate_context_templates, residual_module_name
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.scoring import per_fact_loss, rows_of_scored_tokens, scored_logits
from malmen_hf.training.fitting import TRAINING_FREE_LOG_LAMBDA, TRAINING_FREE_LR
from malmen_hf.training.teacher import teacher_seconds, teacher_values

from common import (
    band_modules,
    command_line,
    load_counterfact_requests,
    machine_info,
    markdown_table,
    memit_editor,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data" / "counterfact"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "quality.json"
METHODS = ("malmen", "mend", "training_free", "fine_tuning", "memit", "no_edit")
PLOTTED = ("ES", "GS", "LS", "LS_acc", "ES_greedy", "CF_efficacy", "CF_paraphrase", "CF_neighborhood")
TUNE_LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
TUNE_LAMBDAS = (0.0, 2.0, 4.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="short name, local folder or Hub id of a causal LM")
    parser.add_argument("--data", type=Path, default=DATA / "edit.json", help="facts to edit (CounterFact form)")
    parser.add_argument("--train-data", type=Path, default=DATA / "train.json", help="where settings are chosen")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10, 100, 1000, 10000], help="facts edited at once")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--malmen-editor", help="folder or Hub id of the trained MALMEN editor")
    parser.add_argument("--mend-editor", help="folder or Hub id of the editor trained with aggregation='sum'")
    parser.add_argument("--tune", action="store_true", help="grid-search the training-free lr and lambda")
    parser.add_argument("--training-free-lr", type=float, default=TRAINING_FREE_LR, help="without --tune")
    parser.add_argument(
        "--training-free-lambda", type=float, default=TRAINING_FREE_LOG_LAMBDA, help="log ridge, without --tune"
    )
    parser.add_argument("--fit-facts", type=int, default=512, help="train facts the training-free normalizer sees")
    parser.add_argument("--tune-facts", type=int, default=128, help="held-out train facts edited at once to tune")
    parser.add_argument("--ft-steps", type=int, default=10, help="Adam steps of constrained fine-tuning")
    parser.add_argument("--ft-lr", type=float, default=5e-4, help="Adam lr of constrained fine-tuning")
    parser.add_argument("--ft-max-change", type=float, default=5e-4, help="bound on each weight's change (L-inf)")
    parser.add_argument("--ft-max-n", type=int, default=1000, help="largest N fine-tuned (it costs steps x a pass)")
    parser.add_argument("--memit-layers", default="12-17", help="FIRST-LAST: MEMIT's band of down_proj layers")
    parser.add_argument("--memit-preserve", type=float, default=1.0, help="MEMIT's a (C0 weight per fact)")
    parser.add_argument("--memit-log-lambda", type=float, default=-2.0)
    parser.add_argument("--memit-covariance-facts", type=int, default=1000)
    parser.add_argument("--memit-cache", type=Path, default=Path.home() / ".cache/malmen-hf/memit-edit")
    parser.add_argument("--single-trials", type=int, default=20, help="one-fact edits averaged at N = 1")
    parser.add_argument("--score-sample", type=int, default=1000, help="edited facts scored at most, per N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results; the PNG goes beside it")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows --output already has from a run with the same settings and measure only the others",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    requests = load_counterfact_requests(args.data, "counterfact")
    editors, settings = load_editors(args, model, tokenizer)
    results = {
        "command": command_line(__file__, argv),
        "machine": machine_info(model.device),
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **settings},
        "rows": [],
    }
    if args.resume:
        results = resumed(results, args.output)
    measured = {(row["method"], row["n"]) for row in results["rows"]}
    for n in args.n:
        if n > len(requests):
            print(f"N={n}: skipped, {args.data} has only {len(requests)} facts", flush=True)
            continue
        methods = [method for method in args.methods if (method, n) not in measured]
        if not methods:
            continue
        edited = [requests[i : i + 1] for i in range(args.single_trials)] if n == 1 else [requests[:n]]
        groups = [prepare_group(group, model, tokenizer, args) for group in edited]  # shared by every method
        if "memit" in methods:
            # The values of the facts this N edits (cached on disk, in whole shards of 64 facts so that every N reads
            # the same shards): a fact's value does not depend on N.
            count = -(-max(n, args.single_trials) // 64) * 64
            editors["memit"].compute_values(model, tokenizer, requests[:count], args.memit_cache)
        for method in methods:
            if method == "fine_tuning" and n > args.ft_max_n:
                row = {"method": method, "n": n, "skipped": f"N > --ft-max-n ({args.ft_max_n}): too slow here"}
            else:
                row = {"method": method, "n": n, **run_method(method, editors, model, tokenizer, groups, args)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            write(results, args.output)
    print(report(results["rows"]))
    plot(results["rows"], args.output.with_suffix(".png"))


def load_editors(args, model, tokenizer) -> tuple[dict[str, MalmenEditorModel], dict]:
    editors, settings = {}, {}
    for method, source in (("malmen", args.malmen_editor), ("mend", args.mend_editor)):
        if method in args.methods:
            if not source:
                raise SystemExit(f"--methods {method} needs --{method}-editor")
            editors[method] = MalmenEditorModel.from_pretrained(source)
            settings[f"{method}_training"] = editors[method].config.training
    if "training_free" in args.methods:
        editor, settings["training_free"] = tuned_training_free_editor(args, model, tokenizer, editors)
        editors["training_free"] = editor
    if "fine_tuning" in args.methods:
        settings["fine_tuning_layers"] = edit_layers(editors, model)
    if "memit" in args.methods:
        editors["memit"], settings["memit"] = memit_method(args, model, tokenizer)
    return editors, settings


class MemitMethod:
    """MEMIT's editor (layers, covariance), templates and settings, and the cached values of the edited facts."""

    def __init__(self, editor, templates, settings, residual_module):
        self.editor, self.templates, self.settings, self.residual_module = editor, templates, settings, residual_module
        self.targets: dict[int, torch.Tensor] = {}  # id of a fact -> h + delta
        self.values_seconds_per_fact = 0.0

    def compute_values(self, model, tokenizer, facts, cache_dir: Path) -> None:
        residuals, deltas = teacher_values(
            model, tokenizer, facts, cache_dir, residual_module=self.residual_module,
            context_templates=self.templates, settings=self.settings, chunk_size=64, progress=True,
        )  # fmt: skip
        seconds = teacher_seconds(cache_dir, len(facts))  # what they cost when computed, cached or not now
        self.values_seconds_per_fact = seconds / len(facts) if seconds is not None else float("nan")
        self.targets = {id(fact): target for fact, target in zip(facts, residuals + deltas, strict=True)}

    def apply(self, model, tokenizer, group) -> Callable[[], None]:
        targets = torch.stack([self.targets[id(fact)] for fact in group])
        handle = apply_memit(
            self.editor, model, group, tokenizer=tokenizer, settings=self.settings, context_templates=self.templates,
            residual_targets=targets,
        )  # fmt: skip
        return handle.revert


def memit_method(args, model, tokenizer) -> tuple[MemitMethod, dict]:
    """MEMIT's band, its covariance (full rank) fitted on train.json prompts, and the model's context templates."""
    modules = band_modules(args.memit_layers)
    train = load_edit_requests(args.train_data, "counterfact")
    editor = memit_editor(
        model, tokenizer, modules, train, preserve=args.memit_preserve, log_lambda=args.memit_log_lambda,
        covariance_facts=args.memit_covariance_facts,
    )  # fmt: skip
    templates = generate_context_templates(model, tokenizer)
    method = MemitMethod(editor, templates, MemitSettings(), residual_module_name(modules))
    return method, {"layers": modules, "templates": templates, "preserve": args.memit_preserve}


def edit_layers(editors: dict[str, MalmenEditorModel], model) -> list[str]:
    """Every method edits the same layers: the trained editors' (or the family's default ones)."""
    trained = [editor for editor in editors.values() if isinstance(editor, MalmenEditorModel)]
    if trained:
        return trained[0].config.edit_modules
    return default_edit_modules(model)


def tuned_training_free_editor(args, model, tokenizer, editors) -> tuple[MalmenEditorModel, dict]:
    """
    The library's training-free editor (`malmen_hf.training_free_editor`) on the trained editors' layers, fitted on
    the first `--fit-facts` train facts and, with --tune, its lr and lambda chosen on the last `--tune-facts`.
    """
    train = load_edit_requests(args.train_data, "counterfact")
    fit, held_out = train[: args.fit_facts], train[-args.tune_facts :]
    chosen = {"lr": args.training_free_lr, "lambda": args.training_free_lambda, "grid": []}
    editor = training_free_editor(
        model, tokenizer, fit, edit_modules=edit_layers(editors, model), lr=chosen["lr"], log_lambda=chosen["lambda"],
        batch_size=args.batch_size, base_model_name_or_path=args.model,
    )  # fmt: skip
    if args.tune:
        before = locality_predictions(model, tokenizer, held_out, args.batch_size)
        best = -1.0
        for lr in TUNE_LRS:
            for log_lambda in TUNE_LAMBDAS:
                set_lr_and_lambda(editor, lr, log_lambda)
                handle = editor.apply_edits(model, held_out, tokenizer=tokenizer, batch_size=args.batch_size)
                scores = scores_of_model(model, tokenizer, held_out, before, args.batch_size)
                handle.revert()
                mean = sum(scores.values()) / len(scores)
                chosen["grid"].append({"lr": lr, "lambda": log_lambda, **scores})
                print(f"training-free tuning: lr={lr:g} lambda={log_lambda:g} {scores}", flush=True)
                if mean > best:
                    best, chosen["lr"], chosen["lambda"] = mean, lr, log_lambda
    set_lr_and_lambda(editor, chosen["lr"], chosen["lambda"])
    return editor, chosen


def set_lr_and_lambda(editor: MalmenEditorModel, lr: float, log_lambda: float) -> None:
    with torch.no_grad():
        for net in editor.nets.values():
            net.lr.fill_(lr)
            net.log_lambda.fill_(log_lambda)


def resumed(results: dict, path: Path) -> dict:
    """
    `results` with the rows of the earlier run saved at `path`, which must have had the same settings (tuning
    included) except the lists of N and methods, which only say which rows to measure; the earlier commands and
    machines are kept under "earlier_runs" so every row stays traceable.
    """
    if not path.exists():
        return results
    earlier = json.loads(path.read_text())
    ignored = {"resume", "n", "methods"}
    mine = {k: v for k, v in results["settings"].items() if k not in ignored}
    theirs = {k: v for k, v in earlier["settings"].items() if k not in ignored}
    if mine != theirs:
        differing = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise SystemExit(f"--resume: {path} was measured with other settings ({', '.join(differing)}); drop --resume")
    runs = earlier.get("earlier_runs", []) + [{"command": earlier["command"], "machine": earlier["machine"]}]
    return {**results, "earlier_runs": runs, "rows": earlier["rows"]}


def prepare_group(group: list, model, tokenizer, args) -> tuple[list, list, list]:
    """The facts edited at once, the ones scored, and the unedited model's locality predictions on those."""
    scored = score_sample(group, args.score_sample)
    return group, scored, locality_predictions(model, tokenizer, scored, args.batch_size)


def run_method(method, editors, model, tokenizer, groups, args) -> dict:
    """Edits each group at once with `method`, scores it, reverts; returns the scores averaged over groups."""
    totals, seconds = {}, 0.0
    for group, scored, before in groups:
        start = time.perf_counter()
        revert = apply_method(method, editors, model, tokenizer, group, args)
        seconds += time.perf_counter() - start
        try:
            scores = scores_of_model(model, tokenizer, scored, before, args.batch_size, list(SCORES))
        finally:
            revert()
        for name, value in scores.items():
            totals[name] = totals.get(name, 0.0) + value / len(groups)
    row = {**totals, "edit_seconds": seconds / len(groups), "groups": len(groups)}
    if method == "memit":  # the value step, computed beforehand for every fact: its share for this N
        row["values_seconds"] = editors["memit"].values_seconds_per_fact * len(groups[0][0])
    return row


def score_sample(group: list, size: int) -> list:
    """All of `group`, or a fixed uniform sample of `size` of its facts."""
    if len(group) <= size:
        return group
    return [group[i] for i in sorted(random.Random(0).sample(range(len(group)), size))]


def apply_method(method, editors, model, tokenizer, group, args) -> Callable[[], None]:
    if method == "no_edit":
        return lambda: None
    if method == "fine_tuning":
        return constrained_fine_tuning(model, tokenizer, group, edit_layers(editors, model), args)
    if method == "memit":
        return editors["memit"].apply(model, tokenizer, group)
    handle = editors[method].apply_edits(model, group, tokenizer=tokenizer, batch_size=args.batch_size)
    return handle.revert


def constrained_fine_tuning(model, tokenizer, requests, layers, args) -> Callable[[], None]:
    """
    Fine-tunes the weights of `layers` on the facts (full-batch Adam on the per-fact mean cross-entropy of the
    targets), clamping each weight's change to `args.ft_max_change` after every step; returns what restores them.
    """
    weights = [model.get_submodule(name).weight for name in layers]
    originals = [weight.detach().clone() for weight in weights]
    examples = tokenize_edit_prompts(tokenizer, requests, "causal")
    batches = batches_by_length(examples, args.batch_size)
    optimizer = torch.optim.Adam(weights, lr=args.ft_lr)
    with frozen(model):  # every parameter frozen and restored afterwards; only the edited weights are trained here
        for weight in weights:
            weight.requires_grad_(True)
        for _ in range(args.ft_steps):
            optimizer.zero_grad(set_to_none=True)
            for indices in batches:
                batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), "causal")
                with torch.enable_grad():
                    labels = batch["labels"]
                    logits = scored_logits(model, batch, "causal")
                    loss = per_fact_loss(logits, labels[labels != IGNORE_INDEX], rows_of_scored_tokens(labels))
                    (loss / len(requests)).backward()
            optimizer.step()
            with torch.no_grad():
                for weight, original in zip(weights, originals, strict=True):
                    weight.copy_(original + (weight - original).clamp(-args.ft_max_change, args.ft_max_change))
        for weight in weights:
            weight.grad = None

    def revert() -> None:
        with torch.no_grad():
            for weight, original in zip(weights, originals, strict=True):
                weight.copy_(original)

    return revert


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def report(rows: list[dict]) -> str:
    done = [row for row in rows if "skipped" not in row]
    columns = [("method", "method", "{}"), ("N", "n", "{}")]
    columns += [(name, name, "{:.3f}") for name in SCORES] + [("edit s", "edit_seconds", "{:.1f}")]
    return markdown_table(done, columns)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if "skipped" not in row]
    figure, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for axis, name in zip(axes.flat, PLOTTED, strict=True):
        for method in dict.fromkeys(row["method"] for row in done):
            points = sorted((row["n"], row[name]) for row in done if row["method"] == method)
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
        axis.set_xscale("log")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"{name}")
        axis.set_xlabel("facts edited at once (N)")
        axis.grid(alpha=0.3)
    axes.flat[0].legend()
    figure.suptitle("Editing SmolLM2-135M with CounterFact facts (edit.json)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
