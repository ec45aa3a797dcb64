import pytest

from malmen_hf import EditRequest
from malmen_hf.facts import IGNORE_INDEX, as_edit_requests, collate, pad_id_of, tokenize_examples
from tests import tiny


def target_tokens(tokenizer, example):
    return tokenizer.convert_ids_to_tokens([label for label in example.labels if label != IGNORE_INDEX])


def test_gpt2_bpe_keeps_the_leading_space_in_the_target():
    tokenizer = tiny.gpt2_tokenizer()
    (example,) = tokenize_examples(tokenizer, ["The Colosseum is located in "], ["Rome"], "causal")
    assert target_tokens(tokenizer, example) == ["ĠRome"]
    assert tokenizer.decode(example.input_ids) == "The Colosseum is located in Rome"
    # labels are shifted: the target is scored at the position of the last prompt token
    assert example.labels[-1] == IGNORE_INDEX and example.labels[-2] == example.input_ids[-1]


def test_sentencepiece_style_tokenizer_with_bos():
    tokenizer = tiny.llama_tokenizer()
    (example,) = tokenize_examples(tokenizer, ["The capital of Italy is"], ["Rome"], "causal")
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert target_tokens(tokenizer, example) == ["▁Rome"]


def test_tokenizer_that_appends_eos_to_every_text():
    tokenizer = tiny.t5_tokenizer()  # appends </s>: a causal continuation must not follow it
    (example,) = tokenize_examples(tokenizer, ["The capital of France is"], ["Paris"], "causal")
    assert tokenizer.eos_token_id not in example.input_ids
    assert target_tokens(tokenizer, example) == ["▁Paris"]


def test_t5_targets_are_decoder_labels_with_eos():
    tokenizer = tiny.t5_tokenizer()
    (example,) = tokenize_examples(tokenizer, ["The capital of France is"], ["Paris"], "seq2seq")
    assert tokenizer.convert_ids_to_tokens(example.labels) == ["▁Paris", "</s>"]
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_missing_pad_token_and_right_padding():
    tokenizer = tiny.gpt2_tokenizer()
    assert tokenizer.pad_token is None
    pad_id = pad_id_of(tokenizer)
    assert pad_id == tokenizer.eos_token_id
    examples = tokenize_examples(tokenizer, ["The capital of France is", "Apple"], ["Paris", "Google"], "causal")
    batch = collate(examples, pad_id, "causal")
    assert batch["attention_mask"][1].tolist() == [1] * len(examples[1].input_ids) + [0] * (
        len(examples[0].input_ids) - len(examples[1].input_ids)
    )
    assert (batch["labels"][1, len(examples[1].input_ids) :] == IGNORE_INDEX).all()


def test_fact_forms():
    requests = as_edit_requests(
        [
            ("p", "t"),
            {"prompt": "p", "target": "t", "rephrases": ["q"], "locality_prompt": "l", "locality_answer": "a"},
            EditRequest("p", "t", rephrases="q"),
        ]
    )
    assert requests[0] == EditRequest("p", "t")
    assert requests[1].rephrases == ("q",) == requests[2].rephrases
    assert requests[1].locality_answer == "a"


def test_edit_request_validates_itself():
    with pytest.raises(ValueError, match="'prompt' must be a non-empty string"):
        EditRequest("  ", "t")
    with pytest.raises(ValueError, match="'rephrases' must be non-empty strings"):
        EditRequest("p", "t", rephrases=["ok", ""])


def test_a_target_the_tokenizer_erases_is_refused():
    from tokenizers import normalizers

    from malmen_hf.facts import tokenize_examples
    from tests import tiny

    tokenizer = tiny.gpt2_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("!", "")
    with pytest.raises(ValueError, match="fact 1: the target '!!' is erased by the tokenizer"):
        tokenize_examples(tokenizer, ["The capital of France is", "Apple was founded by"], ["Rome", "!!"], "causal")
