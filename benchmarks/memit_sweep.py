"""MEMIT (`malmen_hf.apply_memit`) on the fixed scored facts of train.json, for several preserved-key weights.

The value step (the slow part) runs once per fact and is cached like the distillation's teacher values
(`malmen_hf.training.teacher`, resumable); each weight `a` of the preserved keys' covariance then only re-runs the
spreading. The facts are the last N of `common.sweep_splits`' scored ones (never edit.json, never training facts); the
covariance is fitted on the prompts of the first `--covariance-facts` training facts, at full rank.

    python benchmarks/memit_sweep.py --n 256 --preserve 1 3 10 --threads 2
"""

import argparse
import json
import time
from pathlib import Path

import torch

from malmen_hf import apply_memit
from malmen_hf.evaluation.metrics import locality_predictions, scores_of_model
from malmen_hf.memit import MemitSettings, generate_context_templates, residual_module_name
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.training.teacher import teacher_values

from common import (
    REPO_ROOT,
    band_modules,
    command_line,
    load_counterfact_requests,
    machine_info,
    markdown_table,
    memit_editor,
    sweep_splits,
)

SCORES = ("ES", "GS", "LS", "CF_efficacy", "CF_paraphrase", "CF_neighborhood")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/train.json")
    parser.add_argument("--layers", default="12-17", help="FIRST-LAST: the band of down_proj layers")
    parser.add_argument("--n", type=int, default=256, help="scored facts edited at once")
    parser.add_argument("--preserve", type=float, nargs="+", default=[1.0, 3.0], help="a: weight of C0 per fact")
    parser.add_argument("--log-lambda", type=float, default=-2.0)
    parser.add_argument("--covariance-facts", type=int, default=1000)
    parser.add_argument("--num-steps", type=int, default=MemitSettings.num_steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/malmen-hf/memit-scored")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/memit_sweep.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    train, _, scored = sweep_splits(load_counterfact_requests(args.data))
    facts = scored[: args.n]
    modules = band_modules(args.layers)
    residual_module = residual_module_name(modules)
    templates = generate_context_templates(model, tokenizer)
    settings = MemitSettings(num_steps=args.num_steps)
    start = time.perf_counter()
    residuals, deltas = teacher_values(
        model, tokenizer, facts, args.cache_dir / f"{args.model}-{residual_module}-steps{args.num_steps}",
        residual_module=residual_module, context_templates=templates, settings=settings, batch_size=args.batch_size,
        progress=True,
    )  # fmt: skip
    values_seconds = time.perf_counter() - start
    editor = memit_editor(
        model, tokenizer, modules, train, preserve=1.0, log_lambda=args.log_lambda,  # each a is set below
        covariance_facts=args.covariance_facts,
    )  # fmt: skip
    before = locality_predictions(model, tokenizer, facts, 32)
    rows = []
    for strength in args.preserve:
        editor.config.covariance_weight = strength
        start = time.perf_counter()
        handle = apply_memit(
            editor, model, facts, tokenizer=tokenizer, settings=settings, context_templates=templates,
            residual_targets=residuals + deltas,
        )  # fmt: skip
        spread_seconds = time.perf_counter() - start
        try:
            scores = scores_of_model(model, tokenizer, facts, before, 32, list(SCORES))
        finally:
            handle.revert()
        row = {"layers": args.layers, "N": args.n, "preserve": strength, "log_lambda": args.log_lambda, **scores,
               "values_s": values_seconds, "spread_s": spread_seconds,
               "mean_delta_over_h": float((deltas.norm(dim=1) / residuals.norm(dim=1)).mean())}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings_json = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.output.write_text(json.dumps({
        "command": command_line(__file__, argv), "machine": machine_info(torch.device("cpu")),
        "settings": settings_json, "templates": templates, "rows": rows,
    }, indent=1) + "\n")  # fmt: skip
    columns = [("a", "preserve", "{:g}")] + [(name, name, "{:.3f}") for name in SCORES]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
