"""Lifelong editing: rounds of CounterFact edits on one model, each round keeping (or not) the earlier ones.

For each method, the facts of `--data` are edited in `--rounds` rounds of `--round-size`, one after the other on the
same model. After each round: ES / GS / LS over every fact edited so far and over the first round's facts (retention),
and the round's time; before the first round and after the last: the fluency of greedy generations on unrelated
prompts (the n-gram entropy MEMIT and AlphaEdit report) and the perplexity of held-out sentences. Methods:

- `malmen`: the editor `--editor` (the released one by default), each round with `apply_edits`, no history;
- `malmen_history`: the same editor with `history_weight` `--history-weight`: each round keeps the earlier keys;
- `malmen_lifelong_norm`: `malmen_history` with `lifelong_normalization`: each round's keys and value gradients are
  merged into the editor's input statistics before they are normalized (UltraEdit's lifelong normalization);
- `ultraedit`: UltraEdit (`ultraedit.py`): no hyper-network, lifelong normalization, `-lr |k^|^2 g^`, ridge 1, on the
  MLP output projections of blocks `--ultraedit-layers` with lr `--ultraedit-lr`, 10 facts per batch as theirs;
- `memit`: MEMIT round after round (`apply_memit`, values cached in `--memit-cache`);
- `alphaedit`: MEMIT's values with AlphaEdit's null-space projection and the history of earlier rounds.

JSON at `--output`, the scores against the edits made in a PNG beside it.
Resumable: each round's edits are saved under `--runs-dir` (with the edit history), and a rerun loads the rounds done
and goes on; rows already in `--output` are kept.

    python benchmarks/lifelong.py --methods malmen malmen_history malmen_lifelong_norm ultraedit --rounds 10
"""

import argparse
import copy
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

from malmen_hf import MalmenEditorModel, apply_memit, load_edits
from malmen_hf.evaluation.metrics import greedy_answers, locality_predictions, scores_of_model
from malmen_hf.facts import IGNORE_INDEX, TokenizedExample, batches_by_length, collate, encode_texts, pad_id_of
from malmen_hf.memit import MemitSettings, generate_context_templates, residual_module_name
from malmen_hf.offline_models import load_model_and_tokenizer
from malmen_hf.scoring import per_fact_loss, rows_of_scored_tokens, scored_logits
from malmen_hf.shipped import DEFAULT_EDITOR
from malmen_hf.training.teacher import teacher_values

from common import (
    REPO_ROOT,
    band_modules,
    command_line,
    load_counterfact_requests,
    machine_info,
    markdown_table,
    memit_editor,
)
from ultraedit import ULTRAEDIT_BATCH_SIZE, ULTRAEDIT_LR, ultraedit_editor

SCORES = ("ES", "GS", "LS")
METHODS = ("malmen", "malmen_history", "malmen_lifelong_norm", "ultraedit", "memit", "alphaedit")
APPLY_EDITS_METHODS = ("malmen", "malmen_history", "malmen_lifelong_norm", "ultraedit")  # the rest are MEMIT's
FLUENCY_PROMPTS = [
    "The weather today", "My favourite book", "In the morning I", "The history of the city", "Scientists found that",
    "The best way to cook", "When I was young", "The new phone", "During the war", "The river flows",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/counterfact/edit.json")
    parser.add_argument("--train-data", default="../shared/data/counterfact/train.json", help="for C0 and settings")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["malmen", "malmen_history"])
    parser.add_argument("--editor", default=DEFAULT_EDITOR, help="the MALMEN editor (short name, folder or Hub id)")
    parser.add_argument("--round-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--history-weight", type=float, default=1.0, help="b of malmen_history, malmen_lifelong_norm and alphaedit"
    )
    parser.add_argument("--ultraedit-layers", default="24-29", help="the blocks UltraEdit edits (the editor's)")
    parser.add_argument("--ultraedit-lr", type=float, default=ULTRAEDIT_LR)
    parser.add_argument("--memit-layers", default="12-17")
    parser.add_argument("--memit-preserve", type=float, default=0.3)
    parser.add_argument("--null-space-fraction", type=float, default=0.01)
    parser.add_argument("--memit-cache", type=Path, default=Path.home() / ".cache/malmen-hf/memit-edit")
    parser.add_argument("--score-sample", type=int, default=500, help="facts scored at most per measure")
    parser.add_argument("--fluency-prompts", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs/lifelong")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/lifelong.json")
    return parser.parse_args(argv)


def ngram_entropy(text: str, sizes=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's `compute_n_gram_entropy`: the weighted mean of the entropies of a text's word 2- and 3-gram counts."""
    words = text.split()
    entropies = []
    for size in sizes:
        counts = Counter(tuple(words[i : i + size]) for i in range(len(words) - size + 1))
        total = sum(counts.values())
        entropies.append(-sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0)
    return sum(w * e for w, e in zip(weights, entropies, strict=True)) / sum(weights)


def fluency(model, tokenizer, prompts) -> float:
    texts = greedy_answers(model, tokenizer, prompts, max_new_tokens=40)
    return sum(ngram_entropy(f"{prompt} {text}") for prompt, text in zip(prompts, texts, strict=True)) / len(texts)


@torch.no_grad()
def perplexity(model, tokenizer, requests, batch_size: int) -> float:
    """exp of the mean per-text NLL of every token (after the first) of held-out sentences: each never-edited fact's
    neighbour prompt with its answer."""
    texts = [f"{r.locality_prompt} {r.locality_answer}" for r in requests if r.locality_prompt]
    examples = [
        TokenizedExample(input_ids=ids, labels=[*ids[1:], IGNORE_INDEX]) for ids in encode_texts(tokenizer, texts)
    ]
    total = 0.0
    for indices in batches_by_length(examples, batch_size):
        batch = collate([examples[i] for i in indices], pad_id_of(tokenizer), "causal")
        labels = batch["labels"]
        total += float(per_fact_loss(scored_logits(model, batch, "causal"), labels[labels != IGNORE_INDEX],
                                     rows_of_scored_tokens(labels)))  # fmt: skip
    return math.exp(total / len(examples))


def sample(facts, size: int):
    step = max(1, len(facts) // size)
    return facts[::step][:size]


class Editor:
    """One method: how it edits a round of facts on the model (and its settings)."""

    def __init__(self, method, model, tokenizer, args):
        self.method, self.args = method, args
        self.batch_size = ULTRAEDIT_BATCH_SIZE if method == "ultraedit" else args.batch_size
        if method == "ultraedit":
            self.editor = ultraedit_editor(model, band_modules(args.ultraedit_layers), lr=args.ultraedit_lr)
            return
        if method.startswith("malmen"):
            self.editor = MalmenEditorModel.from_pretrained(args.editor)
            if method in ("malmen_history", "malmen_lifelong_norm"):
                self.editor.config.history_weight = args.history_weight
            self.editor.config.lifelong_normalization = method == "malmen_lifelong_norm"
            return
        modules = band_modules(args.memit_layers)
        self.editor = memit_editor(
            model, tokenizer, modules, load_counterfact_requests(args.train_data), preserve=args.memit_preserve,
            history_weight=args.history_weight if method == "alphaedit" else 0.0,
        )  # fmt: skip
        self.templates = generate_context_templates(model, tokenizer)
        self.residual_module = residual_module_name(modules)

    def edit(self, model, tokenizer, facts, all_facts):
        if self.method in APPLY_EDITS_METHODS:
            return self.editor.apply_edits(model, facts, tokenizer=tokenizer, batch_size=self.batch_size)
        # The values of these facts on the model as it is now (after the earlier rounds), cached by the facts.
        start = all_facts.index(facts[0])
        settings = f"a{self.args.memit_preserve:g}-f{self.args.null_space_fraction:g}-b{self.args.history_weight:g}"
        cache = self.args.memit_cache / f"lifelong-{self.method}-{settings}-from-{start}"
        residuals, deltas = teacher_values(
            model, tokenizer, facts, cache, residual_module=self.residual_module, context_templates=self.templates,
            settings=MemitSettings(), chunk_size=len(facts),
        )  # fmt: skip
        fraction = self.args.null_space_fraction if self.method == "alphaedit" else None
        return apply_memit(
            self.editor, model, facts, tokenizer=tokenizer, context_templates=self.templates,
            residual_targets=residuals + deltas, null_space_fraction=fraction,
        )  # fmt: skip


def run_method(method, base, tokenizer, requests, held_out, args, rows) -> None:
    model = copy.deepcopy(base)
    editor = Editor(method, model, tokenizer, args)
    folder = args.runs_dir / method
    done = [row for row in rows if row["method"] == method and "round" in row]
    for row in done:  # resume: the rounds measured before, from their saved edits
        load_edits(model, folder / f"round{row['round']:04d}")
    first_round = requests[: args.round_size]
    first_before = locality_predictions(base, tokenizer, sample(first_round, args.score_sample), args.batch_size)
    for index in range(len(done), args.rounds):
        facts = requests[index * args.round_size : (index + 1) * args.round_size]
        start = time.perf_counter()
        handle = editor.edit(model, tokenizer, facts, requests)
        seconds = time.perf_counter() - start
        handle.save(folder / f"round{index:04d}")
        edited = sample(requests[: (index + 1) * args.round_size], args.score_sample)
        before = locality_predictions(base, tokenizer, edited, args.batch_size)
        row = {"method": method, "round": index, "edited": (index + 1) * args.round_size, "round_s": seconds}
        row.update(scores_of_model(model, tokenizer, edited, before, args.batch_size, list(SCORES)))
        first = scores_of_model(model, tokenizer, sample(first_round, args.score_sample), first_before,
                                args.batch_size, list(SCORES))  # fmt: skip
        row.update({f"first_{name}": value for name, value in first.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args, rows)
    prompts = FLUENCY_PROMPTS[: args.fluency_prompts]
    final = {"method": method, "fluency": fluency(model, tokenizer, prompts),
             "perplexity": perplexity(model, tokenizer, held_out, args.batch_size)}  # fmt: skip
    rows[:] = [row for row in rows if not (row["method"] == method and "fluency" in row)] + [final]
    print(json.dumps(final), flush=True)
    write(args, rows)


def write(args, rows) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"command": command_line(__file__), "settings": settings, "machine": machine_info(torch.device("cpu"))}
    args.output.write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    requests = load_counterfact_requests(args.data)
    needed = args.rounds * args.round_size
    if needed > len(requests):
        raise SystemExit(f"{args.data} has {len(requests)} facts, fewer than --rounds x --round-size ({needed})")
    held_out = requests[needed:][:200]  # never edited: the perplexity's text
    rows = json.loads(args.output.read_text())["rows"] if args.output.is_file() else []
    prompts = FLUENCY_PROMPTS[: args.fluency_prompts]
    if not any(row["method"] == "unedited" for row in rows):
        rows.append({"method": "unedited", "fluency": fluency(model, tokenizer, prompts),
                     "perplexity": perplexity(model, tokenizer, held_out, args.batch_size)})  # fmt: skip
    for method in args.methods:
        run_method(method, model, tokenizer, requests[:needed], held_out, args, rows)
    columns = [("method", "method", "{}"), ("round", "round", "{}"), ("edited", "edited", "{}")]
    columns += [(name, name, "{:.3f}") for name in (*SCORES, "first_ES", "first_LS")] + [("s", "round_s", "{:.1f}")]
    print(markdown_table([row for row in rows if "round" in row], columns))
    plot(rows, args.output.with_suffix(".png"))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """ES, GS and LS over the facts edited so far, and the first round's ES, against the edits made, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row for row in rows if "round" in row]
    panels = [("ES", "ES, all facts so far"), ("GS", "GS, all facts so far"), ("LS", "LS, all facts so far"),
              ("first_ES", "ES of the first round's facts")]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4), sharex=True)
    for axis, (name, title) in zip(axes, panels, strict=True):
        for method in dict.fromkeys(row["method"] for row in rounds):
            points = sorted((row["edited"], row[name]) for row in rounds if row["method"] == method)
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
        axis.set(title=title, xlabel="facts edited so far", ylim=(-0.02, 1.02))
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("Rounds of CounterFact edits on SmolLM2-135M (edit.json)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
