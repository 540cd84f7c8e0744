"""Distillation students made from teacher layers (DistilBERT's "initialize from the teacher by taking one layer
out of two"), and the per-family tables of model classes and weight names (the family names: families.py).

Copied into a student: the embeddings, the chosen layers (in the order given), and the LM head's output
projection and bias. The head's transform (dense + LayerNorm before the projection) is copied only with
`vocab_transform`, as in the original; otherwise it starts fresh. BERT -> DistilBERT also folds BERT's
token-type-0 embedding into the position embeddings (DistilBERT has no token types), so the student embeds a
single-segment input exactly as the teacher does.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config, GPT2LMHeadModel,
    RobertaConfig, RobertaForMaskedLM,
)

from common.errors import UserError
from common.models.families import STUDENTS_OF, TEACHER_TYPES
from common.pretrained import check_model_folder
from common.io import save_folder_atomic, write_json_atomic

# Every family with its LM head: students can be any of them, teachers any but DistilBERT.
MODEL_CLASSES = {
    "distilbert": (DistilBertConfig, DistilBertForMaskedLM),
    "bert": (BertConfig, BertForMaskedLM),
    "roberta": (RobertaConfig, RobertaForMaskedLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}
POSITION_EMBEDDINGS = {"distilbert": "distilbert.embeddings.position_embeddings.weight",
                       "bert": "bert.embeddings.position_embeddings.weight",
                       "roberta": "roberta.embeddings.position_embeddings.weight", "gpt2": "transformer.wpe.weight"}
TOKEN_TYPE_EMBEDDINGS = {"bert": "bert.embeddings.token_type_embeddings.weight",
                         "roberta": "roberta.embeddings.token_type_embeddings.weight"}
LAYER_KEY = {"bert": r"^bert\.encoder\.layer\.(\d+)\.", "roberta": r"^roberta\.encoder\.layer\.(\d+)\.",
             "gpt2": r"^transformer\.h\.(\d+)\."}
# The LM head's transform before the output projection: copied only with vocab_transform (the original's).
HEAD_TRANSFORM = {"bert": ("cls.predictions.transform.",), "roberta": ("lm_head.dense.", "lm_head.layer_norm."),
                  "gpt2": ()}
HEAD_PREFIX = {"bert": "cls.", "roberta": "lm_head.", "gpt2": "lm_head."}
# BERT layer -> DistilBERT layer parameter names.
DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin", "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin", "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm", "intermediate.dense": "ffn.lin1", "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def num_layers(config: Any) -> int:
    return int(config.n_layer if config.model_type == "gpt2" else config.num_hidden_layers)


def default_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spread teacher layers, first and last included: for 12 -> 6 the original's 0 2 4 7 9 11."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def choose_layers(teacher_layers: int, layers: Sequence[int] | None, n_layers: int | None) -> list[int]:
    """The teacher layers to copy: `layers` as given, else `n_layers` (default half the teacher's) evenly
    spread; the two must agree when both are given (--layers / --num_layers)."""
    if layers is not None and n_layers is not None and n_layers != len(layers):
        raise UserError(f"--num_layers {n_layers} disagrees with the {len(layers)} --layers given")
    n = n_layers if n_layers is not None else max(1, teacher_layers // 2)
    if layers is None and not 1 <= n <= teacher_layers:
        raise UserError(f"--num_layers {n}: the teacher has {teacher_layers} layers")
    return list(layers) if layers is not None else default_layers(teacher_layers, n)


def load_teacher(path: str, model_type: str | None = None, cache_dir: str | None = None) -> nn.Module:
    """The teacher with its LM head, checked: a folder saved without the head (a bare encoder such as a
    sentence-embedding model) is refused, since a random head would teach noise."""
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from {path}: {str(err).splitlines()[0]}") from None
    if model_type is not None and config.model_type != model_type:
        raise UserError(f"--model_type {model_type} does not match {path}, which holds a {config.model_type} model")
    if config.model_type not in TEACHER_TYPES:
        raise UserError(f"{path} holds a {config.model_type} model; teachers can be "
                        f"{', '.join(TEACHER_TYPES)}")
    model_class = MODEL_CLASSES[config.model_type][1]
    model, info = model_class.from_pretrained(path, cache_dir=cache_dir, output_loading_info=True)
    head = HEAD_PREFIX[config.model_type]
    missing = sorted(k for k in info["missing_keys"] if k.startswith(head) and not k.endswith("decoder.bias"))
    if missing:
        raise UserError(f"{path} has no language-modelling head ({', '.join(missing[:3])} missing): it was saved as "
                        "a bare encoder; give a checkpoint with its LM head (e.g. one trained with "
                        f"{model_class.__name__})")
    return model


def student_config(teacher_config: Any, student_type: str, n_layers: int) -> Any:
    """The teacher's architecture with fewer layers (a DistilBERT config when asked for one)."""
    t = teacher_config
    if student_type == "distilbert":
        return DistilBertConfig(
            vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings, sinusoidal_pos_embds=False,
            n_layers=n_layers, n_heads=t.num_attention_heads, dim=t.hidden_size, hidden_dim=t.intermediate_size,
            dropout=t.hidden_dropout_prob, attention_dropout=t.attention_probs_dropout_prob,
            activation=t.hidden_act, initializer_range=t.initializer_range, pad_token_id=t.pad_token_id,
            tie_word_embeddings=True,
        )
    config = copy.deepcopy(t)
    setattr(config, "n_layer" if student_type == "gpt2" else "num_hidden_layers", n_layers)
    config.architectures = None
    return config


def _map_same_family(teacher_type: str, state: dict[str, torch.Tensor], layers: Sequence[int],
                     vocab_transform: bool) -> dict[str, torch.Tensor]:
    pattern = re.compile(LAYER_KEY[teacher_type])
    where = {t: s for s, t in enumerate(layers)}
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            teacher_index = int(match.group(1))
            if teacher_index in where:
                out[key[:match.start(1)] + str(where[teacher_index]) + key[match.end(1):]] = value
            continue
        if not vocab_transform and key.startswith(HEAD_TRANSFORM[teacher_type]):
            continue
        out[key] = value
    return out


def _map_bert_to_distilbert(state: dict[str, torch.Tensor], layers: Sequence[int],
                            vocab_transform: bool) -> dict[str, torch.Tensor]:
    out = {
        "distilbert.embeddings.word_embeddings.weight": state["bert.embeddings.word_embeddings.weight"],
        # DistilBERT has no token types; BERT adds the type-0 row to every single-segment input: fold it in.
        "distilbert.embeddings.position_embeddings.weight": state["bert.embeddings.position_embeddings.weight"]
        + state["bert.embeddings.token_type_embeddings.weight"][0],
        "vocab_projector.weight": state["cls.predictions.decoder.weight"],
        "vocab_projector.bias": state["cls.predictions.bias"],
    }
    for w in ("weight", "bias"):
        out[f"distilbert.embeddings.LayerNorm.{w}"] = state[f"bert.embeddings.LayerNorm.{w}"]
        for s, t in enumerate(layers):
            for bert_name, distil_name in DISTILBERT_LAYER.items():
                out[f"distilbert.transformer.layer.{s}.{distil_name}.{w}"] = \
                    state[f"bert.encoder.layer.{t}.{bert_name}.{w}"]
        if vocab_transform:
            out[f"vocab_transform.{w}"] = state[f"cls.predictions.transform.dense.{w}"]
            out[f"vocab_layer_norm.{w}"] = state[f"cls.predictions.transform.LayerNorm.{w}"]
    return out


def extract(teacher: nn.Module, student_type: str, layers: Sequence[int],
            vocab_transform: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A student built from `teacher`'s embeddings, its layers `layers` (student layer i = teacher layer
    layers[i]) and its LM head; returns (student, report of what was copied)."""
    teacher_type = teacher.config.model_type
    if student_type not in STUDENTS_OF.get(teacher_type, ()):
        raise UserError(f"a {teacher_type} teacher cannot seed a {student_type} student; choose "
                        f"{' or '.join(STUDENTS_OF.get(teacher_type, ('?',)))}")
    total = num_layers(teacher.config)
    bad = [i for i in layers if not 0 <= i < total]
    if bad or not layers:
        raise UserError(f"--layers {' '.join(map(str, layers))}: the teacher has layers 0..{total - 1}")
    if len(set(layers)) != len(layers):
        raise UserError(f"--layers {' '.join(map(str, layers))}: a teacher layer is listed twice")
    config = student_config(teacher.config, student_type, len(layers))
    student = MODEL_CLASSES[student_type][1](config)
    state = teacher.state_dict()
    if student_type == "distilbert":
        mapped = _map_bert_to_distilbert(state, layers, vocab_transform)
    else:
        mapped = _map_same_family(teacher_type, state, layers, vocab_transform)
    result = student.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"extraction produced names the student lacks: {result.unexpected_keys[:5]}")
    fresh = sorted(result.missing_keys)
    report = {"teacher_type": teacher_type, "student_type": student_type, "teacher_layers": total,
              "layers": list(layers), "tensors_copied": len(mapped), "fresh_tensors": fresh,
              "vocab_transform": vocab_transform,
              "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
              "student_parameters": sum(p.numel() for p in student.parameters())}
    return student, report


def save_student(folder: str, student: nn.Module, tokenizer: Any, report: dict[str, Any]) -> None:
    """The student as a checkpoint that `from_pretrained` loads: config and weights, the tokenizer (if any) and
    extraction.json (what was copied), the folder written whole under a temporary name."""

    def save(tmp: str) -> None:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(os.path.join(tmp, "extraction.json"), report)

    save_folder_atomic(save, folder)
