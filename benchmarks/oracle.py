"""What any editor can reach with a choice of edited layers and token positions (the keys), before any training.

For each fact, the ideal change of every edited layer's output at the selected positions is found by gradient descent
on the target's cross-entropy (until it is below --target-loss). All facts' changes are then aggregated at once by the
library's least squares, `S = (K^T K + a N C0 + e^lambda I)^-1 K^T D`, with `C0` the mean `k k^T` of the layer's
inputs over other CounterFact prompts (MEMIT's preserved keys; `a` = --preserve, per edited fact), applied to all
layers together and scored. A trained MALMEN editor predicts these value changes from gradients, so with the same keys
it cannot do better than this oracle: it bounds the choice of layers and positions in minutes.

    python benchmarks/oracle.py --configs 24-29:target 12-17:subject_last --n 256 1000 --preserve 0 1 10
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from malmen_hf import MalmenEditorModel, fit_key_covariance
from malmen_hf.caching import frozen, token_position_mask
from malmen_hf.evaluation.metrics import locality_predictions, scores_of_model
from malmen_hf.facts import (
    IGNORE_INDEX,
    batches_by_length,
    collate,
    pad_id_of,
    tokenize_edit_prompts,
)
from malmen_hf.functional import least_squares_shift
from malmen_hf.layers import shifted_weight
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.scoring import scored_logits
from malmen_hf.training.fitting import covariance_texts

from common import REPO_ROOT, command_line, load_counterfact_requests, machine_info, markdown_table, sweep_splits

SCORES = ("ES", "GS", "LS", "CF_efficacy", "CF_paraphrase", "CF_neighborhood")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/train.json")
    parser.add_argument("--n", type=int, nargs="+", default=[256], help="facts edited at once")
    parser.add_argument(
        "--configs", nargs="+", default=["24-29:target"], help="FIRST-LAST:POSITIONS (down_proj of those layers)"
    )
    parser.add_argument("--preserve", type=float, nargs="+", default=[0.0], help="a: weight of C0 per edited fact")
    parser.add_argument("--log-lambda", type=float, nargs="+", default=[-2.0], help="log of the ridge e^lambda I")
    parser.add_argument("--covariance-facts", type=int, default=1000, help="training facts whose prompts give C0")
    parser.add_argument("--steps", type=int, default=40, help="most gradient steps per batch of facts")
    parser.add_argument("--step-size", type=float, default=0.1, help="Adam's lr on the value changes")
    parser.add_argument("--target-loss", type=float, default=0.2, help="a fact stops once its target CE is below")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/oracle.json")
    return parser.parse_args(argv)


def parse_config(text: str) -> tuple[list[int], str]:
    layers, positions = text.split(":")
    first, last = (int(part) for part in layers.split("-"))
    return list(range(first, last + 1)), positions


def ideal_value_changes(model, tokenizer, requests, modules, positions, args) -> tuple[dict, dict, list[float]]:
    """Per module, the keys `(n, d_in)` and the ideal output changes `(n, d_out)` of every fact at its positions."""
    examples = tokenize_edit_prompts(tokenizer, requests, "causal")
    keys = {name: [] for name in modules}
    changes = {name: [] for name in modules}
    final_losses = []
    for indices in batches_by_length(examples, args.batch_size):
        batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), "causal")
        batch_keys, batch_changes, losses = _optimize_batch(model, batch, modules, positions, args)
        for name in modules:
            keys[name].append(batch_keys[name])
            changes[name].append(batch_changes[name])
        final_losses += losses
    return {n: torch.cat(k) for n, k in keys.items()}, {n: torch.cat(c) for n, c in changes.items()}, final_losses


def _optimize_batch(model, batch, modules, positions, args):
    mask = token_position_mask(batch, "causal", positions)
    changes = {
        name: torch.zeros(int(mask.sum()), module.weight.shape[0], requires_grad=True)
        for name, module in modules.items()
    }
    keys = {}

    def hook_for(name):
        def hook(module, inputs, output):
            keys.setdefault(name, inputs[0][mask].detach())  # the first pass adds nothing: the unedited keys
            added = torch.zeros_like(output)
            added[mask] = changes[name]
            return output + added

        return hook

    label_mask = batch["labels"] != IGNORE_INDEX
    labels = batch["labels"][label_mask]
    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[label_mask]
    tokens_per_row = torch.bincount(rows, minlength=mask.shape[0]).clamp_min(1)
    optimizer = torch.optim.Adam(changes.values(), lr=args.step_size)
    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with frozen(model):
            for step in range(args.steps + 1):
                steps_used = step
                token_losses = torch.nn.functional.cross_entropy(
                    scored_logits(model, batch, "causal").float(), labels, reduction="none"
                )
                fact_losses = torch.zeros(mask.shape[0]).index_add(0, rows, token_losses) / tokens_per_row
                active = fact_losses.detach() > args.target_loss
                if not active.any():
                    break
                optimizer.zero_grad()
                (fact_losses * active).sum().backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    print(f"  {mask.shape[0]} facts: {steps_used} steps", flush=True)
    return keys, {name: change.detach() for name, change in changes.items()}, fact_losses.tolist()


def preserved_key_covariance(model, tokenizer, requests, modules, batch_size) -> dict[str, torch.Tensor]:
    """The mean `k k^T` of each module's input over every token of the requests' prompts, rephrasings and locality
    prompts (text the edit should leave alone), fitted by the library (at full rank)."""
    editor = MalmenEditorModel.for_model(
        model, edit_modules=list(modules), covariance_weight=1.0, covariance_rank=10**6
    )
    fit_key_covariance(editor, model, covariance_texts(requests, len(requests)), tokenizer, batch_size=batch_size)
    return {name: editor.key_covariance(name).matrix() for name in modules}


def oracle_shifts(keys, changes, covariance, strength, num_facts, log_lambda) -> dict[str, torch.Tensor]:
    """The library's ridge least squares of each module, with `strength * num_facts * C0` added to `K^T K`."""
    shifts = {}
    for name in keys:
        gram = keys[name].T @ keys[name] + strength * num_facts * covariance[name]
        shifts[name] = least_squares_shift(gram, keys[name].T @ changes[name], torch.tensor(log_lambda))
    return shifts


def scores_with_shifts(model, tokenizer, modules, shifts, requests, before, batch_size) -> dict[str, float]:
    originals = {name: module.weight.detach().clone() for name, module in modules.items()}
    try:
        with torch.no_grad():
            for name, module in modules.items():
                module.weight.copy_(shifted_weight(module, shifts[name]))
        return scores_of_model(model, tokenizer, requests, before, batch_size, SCORES)
    finally:
        with torch.no_grad():
            for name, module in modules.items():
                module.weight.copy_(originals[name])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.float()
    records = load_counterfact_requests(args.data)
    train_facts, _, scored = sweep_splits(records)
    requests = scored[: max(args.n)]
    before = {n: locality_predictions(model, tokenizer, requests[:n], args.batch_size) for n in args.n}
    rows, covariances = [], {}
    for config in args.configs:
        layers, positions = parse_config(config)
        modules = {
            f"model.layers.{i}.mlp.down_proj": model.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in layers
        }
        start = time.perf_counter()
        missing = {name: module for name, module in modules.items() if name not in covariances}
        if missing:
            print(f"{config}: preserved-key covariance", flush=True)
            facts = train_facts[: args.covariance_facts]
            covariances.update(preserved_key_covariance(model, tokenizer, facts, missing, args.batch_size))
        print(f"{config}: ideal value changes ({time.perf_counter() - start:.0f} s)", flush=True)
        keys, changes, losses = ideal_value_changes(model, tokenizer, requests, modules, positions, args)
        seconds = time.perf_counter() - start
        tokens_per_fact = keys[next(iter(keys))].shape[0] / len(requests)
        for n in args.n:
            # The keys are per token, in the order of the facts' batches: take the tokens of the first n facts.
            subset = _first_facts(tokenizer, requests, positions, n)
            for strength, log_lambda in itertools.product(args.preserve, args.log_lambda):
                shifts = oracle_shifts(
                    {k: v[subset] for k, v in keys.items()}, {k: v[subset] for k, v in changes.items()},
                    covariances, strength, n, log_lambda,
                )  # fmt: skip
                scores = scores_with_shifts(
                    model, tokenizer, modules, shifts, requests[:n], before[n], args.batch_size
                )
                row = {
                    "layers": f"{layers[0]}-{layers[-1]}", "positions": positions, "N": n, "preserve": strength,
                    "log_lambda": log_lambda,
                    **scores, "keys_per_fact": tokens_per_fact,
                    "facts_at_target_loss": sum(loss <= args.target_loss for loss in losses[:n]) / n,
                    "optimize_s": seconds,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(args, rows)
    print(report(rows))


def _first_facts(tokenizer, requests, positions, n) -> torch.Tensor:
    """Indices of the tokens of the first n requests among all requests' tokens, in `ideal_value_changes` order."""
    examples = tokenize_edit_prompts(tokenizer, requests, "causal")
    owners = []
    for indices in batches_by_length(examples, 10**9):  # one batch: the same order as any batch size
        batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), "causal")
        mask = token_position_mask(batch, "causal", positions)
        rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]
        owners = torch.tensor(indices)[rows]
    return torch.nonzero(owners < n).squeeze(1)


def write(args, rows) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"command": command_line(__file__), "settings": settings, "machine": machine_info(torch.device("cpu"))}
    args.output.write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")


def report(rows) -> str:
    columns = [
        ("layers", "layers", "{}"),
        ("positions", "positions", "{}"),
        ("N", "N", "{}"),
        ("a", "preserve", "{:g}"),
        ("log lambda", "log_lambda", "{:g}"),
    ]
    columns += [(name, name, "{:.3f}") for name in SCORES]
    return markdown_table(rows, columns)


if __name__ == "__main__":
    main()
