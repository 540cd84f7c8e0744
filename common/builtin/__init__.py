"""The built-in demos: with no model or data given, each script runs on a small model built from a config, a
word-level tokenizer and generated data in the real file formats, so every script runs (and `make demo` works)
with no download. One module per script (glue, squad, distill); the shared pieces are here.
"""

from __future__ import annotations

import os

from transformers import BertConfig, BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_word_tokenizer(folder: str, words: list[str], model_max_length: int = 128) -> BertTokenizerFast:
    """A fast WordPiece tokenizer whose vocabulary is exactly `words` (plus BERT's special tokens), saved
    into `folder` so that AutoTokenizer.from_pretrained(folder) loads it."""
    os.makedirs(folder, exist_ok=True)
    # transformers 5 ignores `vocab_file=` here (the tokenizer would hold only the special tokens): pass the
    # vocabulary itself.
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(words)))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_bert_config(vocab_size: int, **overrides) -> BertConfig:
    """A small BERT (6 layers, hidden 64) that trains on a CPU in about a minute."""
    values = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    values.update(overrides)
    return BertConfig(**values)
