"""The built-in demo of scripts/run_glue_early_exit.py: a tiny BERT built from a config and generated
SST-2-format sentiment data.

A sentence mixes positive, negative (some negated by "not") and neutral words, and its label is 1 when the
positive ones outweigh the negative ones. A small encoder learns it, and its difficulty varies (one-sided
sentences are easy, negations and near-ties are hard), which is what early exit feeds on.
"""

from __future__ import annotations

import os
import random

from transformers import BertModel

from common.builtin import tiny_bert_config, write_word_tokenizer
from common.io import write_text_atomic

POSITIVE = ("good great fine lovely superb brilliant charming delightful moving witty warm clever vivid "
            "gripping tender joyful").split()
NEGATIVE = ("bad awful dull boring clumsy tedious bland weak messy poor lifeless shallow stale tiresome "
            "painful hollow").split()
NEUTRAL = ("the a film movie story plot actor scene cast script director it is was and but with this that its "
           "of very quite rather somewhat an ending music camera").split()
NEGATION = "not"


def builtin_words() -> list[str]:
    return POSITIVE + NEGATIVE + NEUTRAL + [NEGATION]


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


def write_builtin_sst2(data_dir: str, n_train: int = 5000, n_dev: int = 800, seed: int = 0,
                       n_test: int = 800) -> str:
    """Generated SST-2-format `train.tsv` and `dev.tsv` (header `sentence<TAB>label`) and the unlabelled
    `test.tsv` (header `index<TAB>sentence`, as GLUE's) in data_dir/SST-2, which is returned (the folder to
    pass as --data_dir)."""
    folder = os.path.join(data_dir, "SST-2")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for name, count in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            continue
        rows = [_sentence(rng) for _ in range(count)]
        write_text_atomic(path, "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    path = os.path.join(folder, "test.tsv")
    if not os.path.isfile(path):
        # A generator of its own: train and dev stay what they were, whichever files already exist.
        test_rng = random.Random(f"test-{seed}")
        rows = [_sentence(test_rng)[0] for _ in range(n_test)]
        write_text_atomic(path, "index\tsentence\n" + "".join(f"{i}\t{text}\n" for i, text in enumerate(rows)))
    return folder
