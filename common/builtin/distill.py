"""The built-in demo of scripts/distill.py: a generated corpus (a tiny language with learnable regularities), a
word-level tokenizer, a 6-layer BERT teacher trained briefly on it as a masked LM, and a 3-layer DistilBERT
student initialized from teacher layers 0, 2 and 5. Also the plain masked-LM training that teaches the demo's
teacher its corpus (and the distillation benchmark's teacher its new LM head).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertForMaskedLM

from common.builtin import tiny_bert_config, write_word_tokenizer
from common.data import lm
from common.io import write_text_atomic
from common.distillation import lm_cross_entropy, masking_probabilities, mlm_mask
from common.distributed import DistContext, main_process_first
from common.models.student import default_layers, extract, save_student
from common.training import Stage, TrainConfig, param_groups, train

logger = logging.getLogger(__name__)

BUILTIN_TEACHER = {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 128,
                   "max_position_embeddings": 64}
BUILTIN_TEACHER_STEPS = 600
BUILTIN_STUDENT_LAYERS = 3


# ----------------------------------------------------------------------------------------------------------
# the corpus


_SINGULAR = "dog cat bird child teacher farmer doctor singer".split()
_PLURAL = "dogs cats birds children teachers farmers doctors singers".split()
_VERB_SG = "runs sings sleeps reads jumps eats waits laughs".split()
_VERB_PL = "run sing sleep read jump eat wait laugh".split()
_ADJECTIVES = "small big old young happy quiet".split()
_PLACES = [["in", "the", "park"], ["at", "home"], ["near", "the", "river"], ["in", "the", "garden"],
           ["on", "the", "hill"], ["by", "the", "lake"]]
_NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()
_FACTS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "coal": "black", "blood": "red",
          "sea": "blue", "milk": "white", "night": "dark", "fire": "hot", "ice": "cold"}
_NAMES = "anna ben carl dora emil fay".split()


def builtin_words() -> list[str]:
    words = set(_SINGULAR + _PLURAL + _VERB_SG + _VERB_PL + _ADJECTIVES + _NUMBERS + _NAMES)
    words |= {w for place in _PLACES for w in place} | set(_FACTS) | set(_FACTS.values())
    words |= {"the", "is", "we", "counted", "said", "that", "and", ".", ","}
    return sorted(words)


def _builtin_sentence(rng: random.Random) -> list[str]:
    kind = rng.random()
    if kind < 0.4:  # agreement: the verb's number follows the subject's
        plural = rng.random() < 0.5
        i = rng.randrange(len(_SINGULAR))
        noun = _PLURAL[i] if plural else _SINGULAR[i]
        verb = (_VERB_PL if plural else _VERB_SG)[rng.randrange(len(_VERB_SG))]
        words = ["the"] + ([rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []) + [noun, verb]
        return words + rng.choice(_PLACES) + ["."]
    if kind < 0.65:  # counting: consecutive numbers
        start = rng.randrange(len(_NUMBERS) - 3)
        count = rng.randint(3, min(6, len(_NUMBERS) - start))
        return ["we", "counted"] + _NUMBERS[start:start + count] + ["."]
    if kind < 0.85:  # facts: every thing always has the same colour
        thing = rng.choice(sorted(_FACTS))
        return ["the", thing, "is", _FACTS[thing], "."]
    plural = rng.random() < 0.5
    i = rng.randrange(len(_SINGULAR))
    noun = _PLURAL[i] if plural else _SINGULAR[i]
    verb = (_VERB_PL if plural else _VERB_SG)[rng.randrange(len(_VERB_SG))]
    return [rng.choice(_NAMES), "said", "that", "the", noun, verb, "."]


def builtin_line(rng: random.Random) -> str:
    """One line of the built-in corpus: two to four sentences of a tiny language with learnable regularities
    (subject-verb agreement, counting, fixed facts), so a small masked LM gets far below the uniform guess."""
    return " ".join(w for _ in range(rng.randint(2, 4)) for w in _builtin_sentence(rng))


def write_builtin_corpus(folder: str, n_train: int = 6000, n_eval: int = 400, seed: int = 0) -> tuple[str, str]:
    """train.txt and eval.txt (one sequence per line) in `folder`; existing files are kept."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for name, count in (("train.txt", n_train), ("eval.txt", n_eval)):
        path = os.path.join(folder, name)
        paths.append(path)
        lines = [builtin_line(rng) for _ in range(count)]
        if os.path.isfile(path):
            continue
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------------------
# teacher and student


def prepare_builtin(ctx: DistContext, base: str) -> dict[str, str]:
    """The demo's inputs in `base` (made once, reused by later runs): the built-in corpus, a word-level
    tokenizer, a 6-layer BERT teacher trained briefly as a masked LM on the corpus, the corpus binarized, and a
    3-layer DistilBERT student initialized from teacher layers 0, 2 and 5."""
    paths = {"data_file": os.path.join(base, "data", "train.bin"), "eval": os.path.join(base, "data", "eval.txt"),
             "teacher": os.path.join(base, "teacher"), "student": os.path.join(base, "student")}
    logger.warning("No --data_file/--teacher_name: running the built-in demo in %s (a generated corpus, a small "
                   "BERT teacher trained on it first, a DistilBERT student made from its layers)", base)
    with main_process_first(ctx):
        if ctx.is_main and not os.path.isfile(os.path.join(paths["student"], "model.safetensors")):
            logger.info("Building the demo's corpus, teacher and student (once; later runs reuse them)")
            train_txt, _ = write_builtin_corpus(os.path.join(base, "data"))
            tokenizer = write_word_tokenizer(paths["teacher"], builtin_words(),
                                             model_max_length=BUILTIN_TEACHER["max_position_embeddings"])
            lm.binarize_file(train_txt, tokenizer, paths["data_file"], show_progress=False)
            teacher = pretrain_builtin_teacher(ctx, paths["teacher"], paths["data_file"], tokenizer)
            layers = default_layers(BUILTIN_TEACHER["num_hidden_layers"], BUILTIN_STUDENT_LAYERS)
            student, report = extract(teacher, "distilbert", layers)
            save_student(paths["student"], student, tokenizer, report)
    return paths


def pretrain_builtin_teacher(ctx: DistContext, folder: str, data_file: str, tokenizer: Any) -> nn.Module:
    """Train the demo's teacher as a plain masked LM on the built-in corpus, in this process alone, and save it
    into `folder`."""
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config(len(tokenizer), **BUILTIN_TEACHER)).to(ctx.device)
    result = train_masked_lm(ctx, teacher, data_file, tokenizer, steps=BUILTIN_TEACHER_STEPS, learning_rate=3e-3,
                             batch_size=32, max_len=BUILTIN_TEACHER["max_position_embeddings"],
                             output_dir=os.path.dirname(folder))
    logger.info("Built-in teacher: %d masked-LM steps, average loss %.3f", result.global_step, result.average_loss)
    teacher.save_pretrained(folder)
    return teacher.cpu()


def train_masked_lm(ctx: DistContext, model: BertForMaskedLM, data_file: str, tokenizer: Any, steps: int,
                    learning_rate: float, batch_size: int, max_len: int, output_dir: str, seed: int = 0) -> Any:
    """Plain masked-LM training (BERT's 15% uniform masking, 80/10/10) of the parameters of a BertForMaskedLM
    that require grad, in this process alone: how the demo's teacher learns its corpus (and the benchmark's
    teacher its new LM head). Returns the shared loop's TrainResult."""
    local = DistContext(device=ctx.device)
    data = lm.LmDataset(lm.TokenFile(data_file), max_len, tokenizer.unk_token_id)
    probs = masking_probabilities(np.ones(len(tokenizer)), 0.0, tokenizer.all_special_ids).to(ctx.device)
    pred_probs = torch.tensor([0.8, 0.1, 0.1], device=ctx.device)

    def mask(ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mlm_mask(ids, attention_mask, probs, 0.15, pred_probs, tokenizer.mask_token_id, len(tokenizer))

    def mlm_step(model: nn.Module, batch: dict[str, torch.Tensor], state: Any) -> torch.Tensor:
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        # The head only where there is something to predict: over a large vocabulary the projection dominates.
        chosen = batch["labels"] != -100
        return lm_cross_entropy(model.cls(hidden[chosen]), batch["labels"][chosen], causal=False)

    cfg = TrainConfig(output_dir=output_dir, per_device_batch_size=batch_size, learning_rate=learning_rate,
                      max_steps=steps, warmup_proportion=0.05, logging_steps=0, save_steps=0, seed=seed)
    batches = lm.LmBatches(data, batch_size, seed, tokenizer.pad_token_id, mask, group_by_size=False)
    stage = Stage("masked-lm", mlm_step, lambda: param_groups(model.named_parameters(), learning_rate, 0.0))
    (result,) = train(local, cfg, model, [stage], batches, lambda _: None)
    return result
