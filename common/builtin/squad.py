"""The built-in demo of scripts/run_squad_pruning.py: generated SQuAD-format questions about short biographies
and a small BERT whose word-level tokenizer covers them exactly.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import torch

from common.builtin import tiny_bert_config, write_word_tokenizer
from common.io import atomic_path, write_text_atomic

NAMES = ("alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy rupert sybil trent victor "
         "walter yvonne zoe").split()
CITIES = ("paris london berlin rome madrid vienna prague oslo dublin lisbon new york san diego los angeles "
          "buenos aires").split()
CITY_NAMES = ("paris", "london", "berlin", "rome", "madrid", "vienna", "prague", "oslo", "dublin", "lisbon",
              "new york", "san diego", "los angeles", "buenos aires")
JOBS = ("baker", "doctor", "pilot", "teacher", "farmer", "lawyer", "nurse", "painter", "chef", "sailor",
        "software engineer", "bus driver", "police officer", "fire fighter")
COLORS = ("red", "blue", "green", "black", "white", "yellow")
THINGS = ("car", "bike", "boat", "house", "dog", "cat", "piano", "guitar")
YEARS = tuple(str(y) for y in range(1950, 2011))
FILLER = ("it was a quiet day .", "the weather was mild .", "many people came to visit .",
          "nobody knew why .", "the town had a small market .", "there was music in the square .")

# relation: (sentence template, question template, answer choices)
RELATIONS = {
    "city": ("{name} lives in {obj} .", "where does {name} live ?", CITY_NAMES),
    "job": ("{name} works as a {obj} .", "what does {name} work as ?", JOBS),
    "year": ("{name} was born in {obj} .", "when was {name} born ?", YEARS),
    "thing": ("{name} owns a {obj} .", "what does {name} own ?", tuple(f"{c} {t}" for c in COLORS for t in THINGS)),
}


def builtin_squad_words() -> list[str]:
    """The vocabulary of the generated SQuAD set (a word-level tokenizer covers it exactly)."""
    words = set(NAMES) | set(CITIES) | set(COLORS) | set(THINGS) | set(YEARS) | {".", "?"}
    for job in JOBS:
        words.update(job.split())
    for sentence, question, _ in RELATIONS.values():
        words.update(w for w in (sentence + " " + question).split() if not w.startswith("{"))
    for filler in FILLER:
        words.update(filler.split())
    return sorted(words)


def _builtin_paragraph(rng: random.Random, p: int, n_questions: int, version_2: bool) -> dict[str, Any]:
    """A context of sentences about different people (one relation each, some filler) and questions that name
    one of them; v2.0 adds questions about people who are not in the context."""
    people = rng.sample(NAMES, rng.randint(3, 6))
    facts = [(name, rng.choice(list(RELATIONS))) for name in people]
    sentences: list[tuple[str, str | None, str | None]] = []  # (text, name, answer)
    for name, relation in facts:
        template, _, choices = RELATIONS[relation]
        obj = rng.choice(choices)
        sentences.append((template.format(name=name, obj=obj), name, obj))
    for _ in range(rng.randint(0, 2)):
        sentences.insert(rng.randint(0, len(sentences)), (rng.choice(FILLER), None, None))
    context, starts = "", {}
    for text, name, obj in sentences:
        if context:
            context += " "
        if name is not None:
            starts[name] = len(context) + text.index(obj, len(name))
        context += text
    answers_by_name = {name: obj for _, name, obj in sentences if name is not None}
    qas = []
    for q, (name, relation) in enumerate(rng.sample(facts, min(n_questions, len(facts)))):
        obj = answers_by_name[name]
        qas.append({"id": f"q{p:05d}-{q}", "question": RELATIONS[relation][1].format(name=name),
                    "answers": [{"text": obj, "answer_start": starts[name]}],
                    **({"is_impossible": False} if version_2 else {})})
    if version_2:
        absent = [n for n in NAMES if n not in people]
        for q in range(rng.randint(0, 1)):
            name = rng.choice(absent)
            qas.append({"id": f"q{p:05d}-n{q}",
                        "question": RELATIONS[rng.choice(list(RELATIONS))][1].format(name=name),
                        "answers": [], "is_impossible": True})
    return {"context": context, "qas": qas}


def write_builtin_squad(data_dir: str, n_train: int = 3000, n_dev: int = 400, seed: int = 0,
                        version_2: bool = False) -> str:
    """Generated SQuAD-format train and dev files (train-v1.1.json / dev-v1.1.json, or the v2.0 names with
    unanswerable questions) in data_dir, which is returned. Contexts are short biographies; each question
    names a person and asks for their city, job, birth year or possession, a span of one to three words.
    `n_train`/`n_dev` count paragraphs (each with up to three questions)."""
    os.makedirs(data_dir, exist_ok=True)
    version = "v2.0" if version_2 else "1.1"
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("dev", n_dev)):
        path = os.path.join(data_dir, f"{split}-{'v2.0' if version_2 else 'v1.1'}.json")
        if os.path.isfile(path):
            continue
        paragraphs = [_builtin_paragraph(rng, p, rng.randint(1, 3), version_2) for p in range(count)]
        articles = [{"title": f"generated_{split}_{i // 20}", "paragraphs": paragraphs[i:i + 20]}
                    for i in range(0, len(paragraphs), 20)]
        write_text_atomic(path, json.dumps({"version": version, "data": articles}))
    return data_dir


def write_builtin_squad_model(folder: str, seed: int = 0, **config_overrides: Any) -> str:
    """A randomly initialised small BERT (4 layers, hidden 64) whose word-level tokenizer covers the generated
    SQuAD set, saved as a pretrained folder (written whole under a temporary name, then renamed)."""
    from transformers import BertModel

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    with atomic_path(folder, replace_folder=False) as tmp:
        tokenizer = write_word_tokenizer(tmp, builtin_squad_words())
        torch.manual_seed(seed)
        config = tiny_bert_config(len(tokenizer), **{"num_hidden_layers": 4, **config_overrides})
        BertModel(config).save_pretrained(tmp)
    return folder
