"""Tiny models and data the tests build themselves (no download, nothing written inside the repo)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from common import builtin
from common.builtin import distill as builtin_distill
from common.builtin import glue as builtin_glue
from common.builtin import squad as builtin_squad

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the tests import the scripts themselves

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


@pytest.fixture(autouse=True)
def _no_process_group():
    """Every test starts and ends without a torch.distributed process group."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A randomly initialised 3-layer BERT (hidden 32) with a word-level vocabulary, as a pretrained folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    return builtin_glue.write_builtin_bert(str(folder), seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> str:
    """A randomly initialised 3-layer RoBERTa with a byte-level BPE tokenizer trained on generated sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-roberta")
    rng = random.Random(0)
    sentences = [builtin_glue._sentence(rng)[0] for _ in range(300)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = RobertaTokenizerFast(vocab=vocab, merges=merges, model_max_length=60)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           **{**TINY, "max_position_embeddings": 66})
    RobertaModel(config).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory) -> str:
    """Generated SST-2-format train (160 rows) and dev (48 rows) files."""
    return builtin_glue.write_builtin_sst2(str(tmp_path_factory.mktemp("glue")), n_train=160, n_dev=48, seed=1)


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def stsb_dir(tmp_path_factory) -> str:
    """Generated STS-B-format pairs (regression): the score grows with the number of shared words."""
    folder = tmp_path_factory.mktemp("stsb") / "STS-B"
    rng = random.Random(2)
    header = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
    for name, n in (("train.tsv", 80), ("dev.tsv", 24)):
        rows = []
        for i in range(n):
            a = builtin_glue._sentence(rng)[0].split()
            b = a[: rng.randint(0, len(a))] + builtin_glue._sentence(rng)[0].split()[:3]
            score = 5.0 * len(set(a) & set(b)) / max(len(set(a) | set(b)), 1)
            rows.append([str(i), "main", "f", "2012", str(i), "none", "none", " ".join(a), " ".join(b),
                         f"{score:.3f}"])
        write_tsv(folder / name, header, rows)
    return str(folder)


@pytest.fixture(scope="session")
def mnli_dir(tmp_path_factory) -> str:
    """Generated MNLI-format train, dev_matched and dev_mismatched files (three labels)."""
    folder = tmp_path_factory.mktemp("mnli") / "MNLI"
    rng = random.Random(3)
    labels = ["contradiction", "entailment", "neutral"]
    base = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    for name, n, extra in (("train.tsv", 60, ["label1"]), ("dev_matched.tsv", 18, ["label1"] * 5),
                           ("dev_mismatched.tsv", 15, ["label1"] * 5)):
        header = base + [f"label{i + 1}" for i in range(len(extra))] + ["gold_label"]
        rows = []
        for i in range(n):
            label = labels[i % 3]
            s1, s2 = builtin_glue._sentence(rng)[0], builtin_glue._sentence(rng)[0]
            rows.append([str(i), str(i), f"{i}e", "fiction", "()", "()", "()", "()", s1, s2]
                        + [label] * len(extra) + [label])
        write_tsv(folder / name, header, rows)
    return str(folder)


def model_state(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor a trained early-exit folder holds (stock weights and off-ramps)."""
    from safetensors.torch import load_file

    state = {f"backbone.{k}": v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    state.update({f"ramps.{k}": v for k, v in load_file(os.path.join(folder, "off_ramps.safetensors")).items()})
    return state


# ----------------------------------------------------------------------------------------------------------
# distillation (#4): tiny language models with their LM heads, and a small corpus


@pytest.fixture(scope="session")
def lm_corpus_dir(tmp_path_factory) -> Path:
    """train.txt (240 lines) and eval.txt (40 lines) of the built-in corpus, plus a few lines too short to keep."""
    folder = tmp_path_factory.mktemp("lm-corpus")
    rng = random.Random(5)
    lines = [builtin_distill.builtin_line(rng) for _ in range(240)]
    lines[3] = "the dog runs ."  # 6 tokens with [CLS]/[SEP]: dropped as too short
    lines[7] = ""  # blank: skipped by the binarizer
    (folder / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    eval_lines = [builtin_distill.builtin_line(rng) for _ in range(40)]
    (folder / "eval.txt").write_text("\n".join(eval_lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_mlm_teacher_dir(tmp_path_factory) -> str:
    """A random 4-layer BertForMaskedLM (hidden 32) with a word-level tokenizer over the built-in corpus words."""
    from transformers import BertForMaskedLM

    folder = str(tmp_path_factory.mktemp("tiny-mlm-teacher"))
    tokenizer = builtin.write_word_tokenizer(folder, builtin_distill.builtin_words(), model_max_length=48)
    torch.manual_seed(0)
    overrides = {**TINY, "num_hidden_layers": 4, "max_position_embeddings": 48}
    config = builtin.tiny_bert_config(len(tokenizer), **overrides)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A random 4-layer GPT2LMHeadModel (hidden 32) with a byte-level BPE tokenizer trained on the corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    rng = random.Random(6)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([builtin_distill.builtin_line(rng) for _ in range(300)], vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=64, unk_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=4, n_head=2, n_positions=64,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    return str(folder)


# ----------------------------------------------------------------------------------------------------------
# SQuAD / movement pruning (tests/test_squad_data.py, test_masked.py, test_squad_pruning.py)

SQUAD_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)


@pytest.fixture(scope="session")
def squad_bert_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) whose word-level vocabulary covers the generated SQuAD
    questions, as a pretrained folder (a bare encoder: no question-answering head)."""
    return builtin_squad.write_builtin_squad_model(str(tmp_path_factory.mktemp("squad-bert") / "model"), seed=0,
                                                   **SQUAD_TINY)


@pytest.fixture(scope="session")
def squad_v1_dir(tmp_path_factory) -> str:
    """Generated SQuAD v1.1 train-v1.1.json (40 paragraphs) and dev-v1.1.json (12 paragraphs)."""
    return builtin_squad.write_builtin_squad(str(tmp_path_factory.mktemp("squad-v1")), n_train=40, n_dev=12, seed=1)


@pytest.fixture(scope="session")
def squad_v2_dir(tmp_path_factory) -> str:
    """Generated SQuAD v2.0 train-v2.0.json and dev-v2.0.json, with unanswerable questions."""
    return builtin_squad.write_builtin_squad(str(tmp_path_factory.mktemp("squad-v2")), n_train=40, n_dev=12,
                                             seed=2, version_2=True)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine's cores are not spun on by idle workers;
    the setting is restored for the tests of other files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
