"""Tiny models (hidden 32, 2 layers) and tokenizers of each family, built in-process: no Hub, no files."""

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

CORPUS = [
    "The Eiffel Tower is located in Paris",
    "The Colosseum is located in Rome",
    "The capital of France is Paris",
    "The capital of Italy is Rome",
    "Danielle Darrieux's mother tongue is French",
    "The official religion of Edwin of Northumbria is Christianity",
    "Toko Yasuda plays the guitar and the piano",
    "Apple was founded by Steve Jobs in California",
    "The Louvre is a museum in Paris, France.",
    "Berlin, London, Madrid, Tokyo, Islam, English, Japan, Microsoft, Google, Nintendo.",
]
VOCAB_SIZE = 320


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE that folds the leading space into the word (GPT-2's " Rome"), with no pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE ("▁" word marks, prepended to the first word) that adds BOS, like Llama's."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """Unigram with "▁" word marks that appends EOS, like T5's."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Strip()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny(model_class, config):
    torch.manual_seed(0)
    return model_class(config).eval()


def gpt2_model(vocab_size: int, num_layers: int = 2) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return _tiny(GPT2LMHeadModel, config)


def gptj_model(vocab_size: int) -> GPTJForCausalLM:
    config = GPTJConfig(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return _tiny(GPTJForCausalLM, config)


def gpt_neox_model(vocab_size: int) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return _tiny(GPTNeoXForCausalLM, config)


def llama_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    return _tiny(LlamaForCausalLM, config)


def t5_model(vocab_size: int) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    return _tiny(T5ForConditionalGeneration, config)


def bert_model(vocab_size: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=1,
    )  # fmt: skip
    return _tiny(BertForSequenceClassification, config)
