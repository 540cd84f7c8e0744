"""The built-in default: a small model built from a config, a word-level tokenizer, and generated data in the
real file formats, so every script runs (and `make demo` works) with no download.

The generated GLUE task is SST-2-shaped sentiment: a sentence mixes positive, negative (some negated by
"not") and neutral words, and its label is 1 when the positive ones outweigh the negative ones. A small encoder
learns it, and its difficulty varies (one-sided sentences are easy, negations and near-ties are hard), which is
what early exit feeds on.
"""

from __future__ import annotations

import logging
import os
import random

from transformers import BertConfig, BertModel, BertTokenizerFast

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ("good great fine lovely superb brilliant charming delightful moving witty warm clever vivid "
            "gripping tender joyful").split()
NEGATIVE = ("bad awful dull boring clumsy tedious bland weak messy poor lifeless shallow stale tiresome "
            "painful hollow").split()
NEUTRAL = ("the a film movie story plot actor scene cast script director it is was and but with this that its "
           "of very quite rather somewhat an ending music camera").split()
NEGATION = "not"


def builtin_words() -> list[str]:
    return POSITIVE + NEGATIVE + NEUTRAL + [NEGATION]


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


def write_builtin_bert(folder: str, seed: int = 0, **config_overrides) -> str:
    """A randomly initialised tiny BERT encoder and its tokenizer, saved as a normal pretrained folder (the
    scripts then load it through the same from_pretrained path as a real checkpoint)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tokenizer = write_word_tokenizer(folder, builtin_words())
    import torch

    torch.manual_seed(seed)
    BertModel(tiny_bert_config(len(tokenizer), **config_overrides)).save_pretrained(folder)
    return folder


def _sentence(rng: random.Random) -> tuple[str, int]:
    """Sentiment words, some negated by a preceding "not" (which flips them), among neutral filler; the label
    says whether positive outweighs negative. Negation makes some rows need more than one layer."""
    while True:
        phrases, score = [], 0
        for _ in range(rng.randint(1, 5)):
            positive = rng.random() < 0.5
            negated = rng.random() < 0.2
            word = rng.choice(POSITIVE if positive else NEGATIVE)
            phrases.append([NEGATION, word] if negated else [word])
            score += (1 if positive else -1) * (-1 if negated else 1)
        if score != 0:
            break
    phrases += [[rng.choice(NEUTRAL)] for _ in range(rng.randint(3, 12))]
    rng.shuffle(phrases)
    return " ".join(w for phrase in phrases for w in phrase), int(score > 0)


def write_builtin_sst2(data_dir: str, n_train: int = 5000, n_dev: int = 800, seed: int = 0) -> str:
    """Generated SST-2-format `train.tsv` and `dev.tsv` (header `sentence<TAB>label`) in data_dir/SST-2,
    which is returned (the folder to pass as --data_dir)."""
    folder = os.path.join(data_dir, "SST-2")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for name, count in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            continue
        rows = [_sentence(rng) for _ in range(count)]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{text}\t{label}\n" for text, label in rows)
        os.replace(tmp, path)
    return folder
