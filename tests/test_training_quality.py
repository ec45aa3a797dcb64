"""Meta-training on a tiny model that memorized synthetic facts makes a better editor on held-out facts."""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from malmen_hf import EditRequest, MalmenEditorModel
from malmen_hf.evaluation.metrics import edit_scores
from malmen_hf.training.meta_gradient import meta_gradient
from malmen_hf.training.trainer import MalmenTrainingArguments, train_editor
from tests.test_trainer import reset_accelerate

CITIES = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Lima", "Oslo", "Cairo"]
FOODS = ["rice", "bread", "fish", "cheese", "apples", "soup"]


@pytest.fixture(scope="module")
def world():
    """
    64 made-up people, where each lives and what each eats, memorized by a tiny GPT-2 in two phrasings; edits of 32 of
    them to train on, 16 to validate on (to pick the best editor) and 16 to score on.
    """
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ru", "ze", "po", "ta", "ni", "vo", "se", "du", "fa"]
    names = sorted({"".join(rng.choice(syllables) for _ in range(3)).capitalize() for _ in range(150)})[:64]
    home = {name: rng.choice(CITIES) for name in names}
    food = {name: rng.choice(FOODS) for name in names}
    corpus = [
        text
        for name in names
        for text in (f"{name} lives in {home[name]}", f"The home town of {name} is {home[name]}",
                     f"{name} likes to eat {food[name]}")
    ]  # fmt: skip
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"],
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                        eos_token_id=0, loss_type="ForCausalLM")  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids = [tokenizer(text)["input_ids"] for text in corpus]
    width = max(map(len, ids))
    inputs = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss = model(input_ids=inputs, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    def request(name):
        other = rng.choice([n for n in names if n != name])
        return EditRequest(
            f"{name} lives in", rng.choice([c for c in CITIES if c != home[name]]), (f"The home town of {name} is",),
            f"{other} likes to eat", food[other],
        )  # fmt: skip

    train_requests = [request(name) for _ in range(6) for name in names[:32]]
    validation = [request(name) for name in names[32:48]]
    held_out = [request(name) for name in names[48:]]
    return model, tokenizer, train_requests, validation, held_out


def held_out_meta_loss(editor, model, tokenizer, requests):
    loss = meta_gradient(editor, model, requests, tokenizer, update_normalizer=False).total
    editor.zero_grad()
    return loss


def test_short_training_beats_the_untrained_editor_on_held_out_facts(world, tmp_path):
    model, tokenizer, train_requests, validation, held_out = world
    untrained = MalmenEditorModel.for_model(model, rank=16, lr_init=0.2)
    before = edit_scores(untrained, model, tokenizer, held_out)
    loss_before = held_out_meta_loss(untrained, model, tokenizer, held_out)

    reset_accelerate()
    args = MalmenTrainingArguments(
        output_dir=str(tmp_path), facts_per_step=8, max_steps=100, meta_lr=1e-2, eval_every=20, eval_facts=16,
        checkpoint_every=100, progress=False,
    )  # fmt: skip
    trained = train_editor(MalmenEditorModel.for_model(model, rank=16, lr_init=0.2), model, tokenizer,
                           train_requests, args, eval_requests=validation)  # fmt: skip
    reset_accelerate()
    after = edit_scores(trained, model, tokenizer, held_out)
    loss_after = held_out_meta_loss(trained, model, tokenizer, held_out)

    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert after["GS"] > before["GS"] + 0.15, (before, after)
    # Scored on facts that played no part in picking the editor, LS gains less than GS (0.75 -> 0.875 here).
    assert after["LS"] > before["LS"], (before, after)
    assert after["ES"] >= before["ES"], (before, after)
