"""Compute MEMIT's teacher values for the training facts of train.json (the distillation's data), resumably.

The facts are the training part of `common.sweep_splits` (never the validation or scored facts, never edit.json).
Values are saved shard by shard under `--cache-dir` (out of git; `malmen_hf.training.teacher`): stop the run at any
time and run the same command again to go on. Each shard's facts and time are printed as it is done.

    python benchmarks/teacher.py --num-facts 2048 --threads 2
"""

import argparse
import time
from pathlib import Path

import torch

from malmen_hf.memit import MemitSettings, generate_context_templates, residual_module_name
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.training.teacher import teacher_values

from common import band_modules, load_counterfact_requests, sweep_splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/train.json")
    parser.add_argument("--layers", default="12-17", help="FIRST-LAST: the band; the residual is its last block")
    parser.add_argument("--num-facts", type=int, default=None, help="the first N training facts (default: all)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-steps", type=int, default=MemitSettings.num_steps)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/malmen-hf/teacher")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    residual_module = residual_module_name(band_modules(args.layers))
    train, _, _ = sweep_splits(load_counterfact_requests(args.data))
    facts = train[: args.num_facts]
    templates = generate_context_templates(model, tokenizer)
    settings = MemitSettings(num_steps=args.num_steps)
    folder = args.cache_dir / f"{args.model}-{residual_module}-steps{args.num_steps}"
    print(f"{len(facts)} facts -> {folder}; templates {templates}", flush=True)
    start = time.perf_counter()
    for chunk_start in range(0, len(facts), args.chunk_size):
        chunk_end = min(chunk_start + args.chunk_size, len(facts))
        shard_start = time.perf_counter()
        residuals, deltas = teacher_values(
            model, tokenizer, facts[:chunk_end], folder, residual_module=residual_module,
            context_templates=templates, settings=settings, chunk_size=args.chunk_size, batch_size=args.batch_size,
        )  # fmt: skip
        ratio = (deltas[chunk_start:].norm(dim=1) / residuals[chunk_start:].norm(dim=1)).mean()
        print(
            f"facts {chunk_start}-{chunk_end - 1}: {time.perf_counter() - shard_start:.1f} s, "
            f"mean |delta| / |h| {ratio:.3f} (total {time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
