"""Edit requests, and their teacher-forced tokenization for causal and encoder-decoder models."""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EditRequest:
    """
    One fact to write into a model: `prompt` should be continued by `target`.

    Args:
        prompt (`str`): The edit prompt, e.g. `"The Eiffel Tower is located in"`.
        target (`str`): The new answer, e.g. `"Rome"`. A space is put between prompt and target.
        rephrases (`tuple[str, ...]`, *optional*): Other phrasings of the prompt (to measure generalization).
        locality_prompt (`str`, *optional*): An unrelated prompt whose answer should not change.
        locality_answer (`str`, *optional*): The answer to `locality_prompt`.
        ground_truth (`str`, *optional*): The answer the model is expected to give before the edit (CounterFact's
            `ground_truth`), for the probability comparisons of [`~metrics.counterfact_scores`].
        subject (`str`, *optional*): The entity the fact is about, as it is written in `prompt` (e.g.
            `"The Eiffel Tower"`). Needed by editors that read their keys at the subject's last token
            (`token_positions="subject_last"`).
    """

    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    locality_prompt: str | None = None
    locality_answer: str | None = None
    ground_truth: str | None = None
    subject: str | None = None

    def __post_init__(self):
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"'{name}' must be a non-empty string, got {value!r}")
        rephrases = (self.rephrases,) if isinstance(self.rephrases, str) else tuple(self.rephrases)
        if not all(isinstance(text, str) and text.strip() for text in rephrases):
            raise ValueError(f"'rephrases' must be non-empty strings, got {self.rephrases!r}")
        object.__setattr__(self, "rephrases", rephrases)
        for name in ("locality_prompt", "locality_answer", "ground_truth", "subject"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"'{name}' must be a string or None, got {value!r}")
        if (self.locality_prompt is None) != (self.locality_answer is None):
            raise ValueError("'locality_prompt' and 'locality_answer' must be given together")
        if self.subject is not None and (not self.subject.strip() or self.subject not in self.prompt):
            raise ValueError(f"'subject' must be a non-empty part of the prompt {self.prompt!r}, got {self.subject!r}")


FactLike = EditRequest | Mapping[str, Any] | Sequence[str]
_FIELDS = [field.name for field in fields(EditRequest)]


def as_edit_requests(facts: Iterable[FactLike]) -> list[EditRequest]:
    """
    Turns `EditRequest`s, dicts with its field names, or `(prompt, target)` pairs into a list of `EditRequest`.

    Raises:
        `ValueError` naming the index of the first bad fact and what is wrong with it.
    """
    is_single_pair = isinstance(facts, tuple) and len(facts) == 2 and all(isinstance(text, str) for text in facts)
    if is_single_pair or isinstance(facts, (str, Mapping, EditRequest)):
        raise ValueError("`facts` must be a list of facts; wrap a single fact in a list: `[fact]`")
    if not isinstance(facts, Iterable):
        raise ValueError(f"`facts` must be a list of facts, got {type(facts).__name__}")
    requests = [_as_edit_request(index, fact) for index, fact in enumerate(facts)]
    if not requests:
        raise ValueError("`facts` is empty: give at least one fact to edit")
    return requests


def _as_edit_request(index: int, fact: FactLike) -> EditRequest:
    try:
        if isinstance(fact, EditRequest):
            return fact
        if isinstance(fact, Mapping):
            unknown = sorted(set(fact) - set(_FIELDS))
            if unknown:
                raise ValueError(f"unknown keys {unknown}; the keys of a fact are {_FIELDS}")
            return EditRequest(**fact)
        if isinstance(fact, Sequence) and not isinstance(fact, str) and len(fact) == 2:
            return EditRequest(*fact)
        raise ValueError(f"expected an EditRequest, a dict or a (prompt, target) pair, got {type(fact).__name__}")
    except (TypeError, ValueError) as error:
        raise ValueError(f"fact {index}: {error}") from None


ModelKind = Literal["causal", "seq2seq", "classifier"]
"""How a model takes an edit's target: after the prompt (GPT-2, Llama), on a decoder side (T5), or as the label of a
one-logit classifier head (BERT fact checking, targets `"SUPPORTS"` / `"REFUTES"`)."""

CLASSIFIER_LABELS = {"REFUTES": 0, "SUPPORTS": 1}
"""The targets of a one-logit classifier and their class ids (the logit is that of `SUPPORTS`)."""


def model_kind(model: "PreTrainedModel") -> ModelKind:
    """Whether `model` is a causal LM, an encoder-decoder, or a one-logit sequence classifier (see [`ModelKind`])."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if type(model).__name__.endswith("ForSequenceClassification"):
        if model.config.num_labels != 1:
            raise ValueError(
                f"Sequence classifiers are edited through a one-logit head (num_labels=1, as in the paper's FEVER "
                f"setting); this {type(model).__name__} has num_labels={model.config.num_labels}"
            )
        return "classifier"
    return "causal"


@dataclass
class TokenizedExample:
    """
    A teacher-forced example. For a causal model `labels[t]` is the token scored at position `t` (already shifted,
    `-100` where nothing is scored); for an encoder-decoder model `labels` are the decoder's target tokens.
    """

    input_ids: list[int]
    labels: list[int]
    subject_end: int | None = None
    """The position of the subject's last token in `input_ids` (the encoder's for an encoder-decoder), if known."""


def tokenize_edit_prompts(
    tokenizer: "PreTrainedTokenizerBase", requests: Sequence[EditRequest], kind: ModelKind
) -> list[TokenizedExample]:
    """Teacher-forced `prompt -> target` examples of edit requests, with the position of their subject if given."""
    examples = tokenize_examples(tokenizer, [r.prompt for r in requests], [r.target for r in requests], kind)
    for example, request in zip(examples, requests, strict=True):
        if request.subject is not None and kind != "classifier":
            example.subject_end = subject_last_position(tokenizer, request.prompt, request.subject, kind)
    return examples


def subject_last_position(
    tokenizer: "PreTrainedTokenizerBase", prompt: str, subject: str, kind: ModelKind = "causal"
) -> int:
    """The position of the token that holds the last character of the last occurrence of `subject` in `prompt`."""
    prompt, subject = (prompt.rstrip() if kind == "causal" else prompt.strip()), subject.strip()
    last_char = prompt.rindex(subject) + len(subject) - 1
    if tokenizer.is_fast:
        # Character offsets are exact even when a token runs past the subject ("Darrieux's"). A character that the
        # tokenizer's normalizer drops belongs to no token: the subject then ends at the last token before it.
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        before = [i for i, (start, end) in enumerate(offsets) if end > start and start <= last_char]
        if before:
            return before[-1]
    else:
        # No offsets: the first prefix of the prompt's tokens whose text holds the whole subject. (Counting the
        # tokens of the text up to the subject's end can land elsewhere when the tokenizer splits that text apart.)
        ids = encode_texts(tokenizer, [prompt])[0]
        ending = prompt[: last_char + 1]
        for position in range(len(ids)):
            decoded = tokenizer.decode(ids[: position + 1], skip_special_tokens=True)
            if " ".join(ending.split()) in " ".join(decoded.split()):
                return position
    raise ValueError(
        f"the subject {subject!r} is in no token of the prompt {prompt!r} as this tokenizer reads it (its "
        "normalizer removes it?): give a subject the tokenizer keeps."
    )


def tokenize_examples(
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    targets: Sequence[str],
    kind: ModelKind,
) -> list[TokenizedExample]:
    """Teacher-forced tokenization of `prompt -> target` pairs (see [`TokenizedExample`])."""
    if kind == "causal":
        return _tokenize_causal(tokenizer, prompts, targets)
    tokenize = {"seq2seq": _tokenize_seq2seq, "classifier": _tokenize_classification}[kind]
    examples = []
    for index, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        try:
            examples.append(tokenize(tokenizer, prompt, target))
        except ValueError as error:
            raise ValueError(f"fact {index}: {error}") from None
    return examples


def _tokenize_causal(
    tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[str], targets: Sequence[str]
) -> list[TokenizedExample]:
    if not prompts:
        return []
    prompts = [prompt.rstrip() for prompt in prompts]
    # Tokenize the whole text, not the target alone: BPE and SentencePiece both fold the separating space into the
    # first target token (GPT-2's " Rome"), which tokenizing "Rome" on its own would get wrong. One call per list:
    # a fast tokenizer encodes a list in one go, several times faster than text by text for thousands of facts.
    texts = [f"{prompt} {target.lstrip()}" for prompt, target in zip(prompts, targets, strict=True)]
    examples = []
    pairs = zip(encode_texts(tokenizer, prompts), encode_texts(tokenizer, texts), targets, strict=True)
    for index, (prompt_ids, full_ids, target) in enumerate(pairs):
        try:
            examples.append(_causal_example(tokenizer, prompt_ids, full_ids, target))
        except ValueError as error:
            raise ValueError(f"fact {index}: {error}") from None
    return examples


def _causal_example(
    tokenizer: "PreTrainedTokenizerBase", prompt_ids: list[int], full_ids: list[int], target: str
) -> TokenizedExample:
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        # The tokenizer merged across the boundary: tokenize the target apart, with its space.
        full_ids = prompt_ids + tokenizer(" " + target.lstrip(), add_special_tokens=False)["input_ids"]
    if not tokenizer.decode(full_ids[len(prompt_ids) :], skip_special_tokens=True).strip():
        raise ValueError(
            f"the target {target!r} is erased by the tokenizer (its tokens decode to nothing but space): give a "
            "target the tokenizer keeps."
        )
    labels = [IGNORE_INDEX] * len(full_ids)
    # Position t predicts token t + 1: the target tokens are scored at the positions just before them.
    labels[len(prompt_ids) - 1 : len(full_ids) - 1] = full_ids[len(prompt_ids) :]
    return TokenizedExample(input_ids=full_ids, labels=labels)


def encode_texts(tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> list[list[int]]:
    """The token ids of each text as a prompt: with the tokenizer's special tokens, but never a trailing EOS."""
    # Some tokenizers append EOS to every text: a continuation must not sit after it.
    eos = tokenizer.eos_token_id
    return [
        ids[:-1] if len(ids) > 1 and eos is not None and ids[-1] == eos else ids
        for ids in tokenizer(texts)["input_ids"]
    ]


def _tokenize_seq2seq(tokenizer: "PreTrainedTokenizerBase", prompt: str, target: str) -> TokenizedExample:
    return TokenizedExample(
        input_ids=tokenizer(prompt.strip())["input_ids"],
        labels=tokenizer(text_target=target.strip())["input_ids"],
    )


def _tokenize_classification(tokenizer: "PreTrainedTokenizerBase", prompt: str, target: str) -> TokenizedExample:
    if target not in CLASSIFIER_LABELS:
        raise ValueError(f"a classifier's target must be one of {list(CLASSIFIER_LABELS)}, got {target!r}")
    input_ids = tokenizer(prompt.strip())["input_ids"]
    # The one scored position is the first ([CLS]), where the label sits; see `scored_logits`.
    return TokenizedExample(
        input_ids=input_ids, labels=[CLASSIFIER_LABELS[target]] + [IGNORE_INDEX] * (len(input_ids) - 1)
    )


def pad_id_of(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The padding id: the pad token, else EOS, else 0. Padded positions are masked out, so any id is correct."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def batches_by_length(examples: Sequence[TokenizedExample], batch_size: int) -> list[list[int]]:
    """Indices of `examples` grouped into batches of similar length, so each batch is padded to its own longest."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids) + len(examples[i].labels))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def collate(examples: Sequence[TokenizedExample], pad_id: int, kind: ModelKind) -> dict[str, "torch.Tensor"]:
    """Right-pads a batch: positions never move, so per-token results do not depend on the batch."""
    import torch  # here, not at the top: reading and checking facts (the CLI's first step) needs no torch

    batch = {
        "input_ids": _pad([example.input_ids for example in examples], pad_id),
        "attention_mask": _pad([[1] * len(example.input_ids) for example in examples], 0),
        "labels": _pad([example.labels for example in examples], IGNORE_INDEX),
    }
    if kind == "seq2seq":
        batch["decoder_attention_mask"] = _pad([[1] * len(example.labels) for example in examples], 0)
    if any(example.subject_end is not None for example in examples):
        # -1 where a fact has no subject; caching at the subject's token refuses such facts before it collates.
        batch["subject_positions"] = torch.tensor([-1 if e.subject_end is None else e.subject_end for e in examples])
    return batch


def _pad(rows: list[list[int]], value: int) -> "torch.Tensor":
    import torch

    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)
