#!/usr/bin/env python
"""DistilBERT-style distillation: a small student language model learns from a large teacher's output
distribution (soft cross-entropy at a temperature), its own LM objective, and the teacher's hidden states.

Sanh et al. 2019, "DistilBERT, a distilled version of BERT". Students: DistilBERT, BERT or RoBERTa with a
masked-LM objective (--mlm), GPT-2 with a causal one (--clm).

    python scripts/distill.py                                   # built-in demo, no download
    python scripts/binarize_data.py --file_path data/dump.txt --tokenizer_name bert-base-uncased \\
        --dump_file data/binarized_text
    python scripts/token_counts.py --data_file data/binarized_text.bert-base-uncased.bin \\
        --token_counts_dump data/token_counts.bert-base-uncased.safetensors
    python scripts/extract_student.py --model_name bert-base-uncased --dump_checkpoint students/distilbert-init
    python scripts/distill.py --student_type distilbert --student_pretrained_weights students/distilbert-init \\
        --teacher_type bert --teacher_name bert-base-uncased --mlm --alpha_ce 5.0 --alpha_mlm 2.0 \\
        --alpha_cos 1.0 --alpha_clm 0.0 --freeze_pos_embs --data_file data/binarized_text.bert-base-uncased.bin \\
        --token_counts data/token_counts.bert-base-uncased.safetensors --eval_file data/heldout.txt \\
        --dump_path serialization_dir/my_first_training
    torchrun --nproc_per_node=4 scripts/distill.py ...same flags...

Writes into --dump_path (alias --output_dir): the student as a stock checkpoint (config, model.safetensors,
tokenizer: from_pretrained loads it), all_results.json (data, training, evaluation), eval_results.json
(perplexity of student and teacher on --eval_file, size and speed), loss_terms.png, log_history.jsonl,
TensorBoard events under runs/, checkpoint-NNNNNN/ folders (at the end of each epoch but the last, whose end is
the final student, and every --checkpoint_interval steps) and run_args.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from common.args import (
    add_convention_args, add_disable_tqdm_arg, add_distributed_args, answering_help, check_output_dir,
    check_precision_flags, check_training_args, parse_with_builtin_defaults, raise_if_problems, script_parser,
)
from common.errors import UserError, exit_with, run_cli
from common.glibc_malloc import (ENV_VAR as MMAP_ENV_VAR, HeldMemory, fix_mmap_threshold, held_freed_memory,
                                 threshold_problems)
from common.models.families import CAUSAL_TYPES, FAMILY, STUDENT_TYPES, TEACHER_TYPES
from common.cpu_matmul import BACKENDS as MATMUL_BACKENDS, backend_problem

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import numpy as np
    import torch
    from safetensors import safe_open
    from torch import nn
    from transformers import AutoConfig

    from common import visualize
    from common.builtin.distill import prepare_builtin
    from common.checkpoint import resolve_resume_path
    from common.routed_linear import route_linears
    from common.tied_embedding import Slot, tied_gradient
    from common.cli import save_final_model, script_context
    from common.data import lm
    from common.distillation import (
        clm_labels, fixed_mlm_mask, hidden_cosine, masking_probabilities, mlm_mask,
    )
    from common.fused_loss import LossWeights, fused_distillation_losses, lm_targets, projection_removed, token_nll
    from common.distributed import DistContext, all_gather_objects, barrier, main_process_first
    from common.io import write_json_atomic
    from common.model_card import write_model_card
    from common.loaders import load_tokenizer, model_saver
    from common.models.student import MODEL_CLASSES, POSITION_EMBEDDINGS, TOKEN_TYPE_EMBEDDINGS, load_teacher
    from common.models import masked
    from common.pretrained import check_model_folder
    from common.results import flat_metrics, train_metrics, write_run_results
    from common.training import Stage, TrainConfig, param_groups, plan_steps, predict, train

logger = logging.getLogger("distill")

ADAM_BETAS = (0.9, 0.98)  # the original distiller's AdamW betas
EVAL_MASK_PROP = 0.15
EVAL_SEED = 1234  # evaluation masks depend only on this and each example, so every run scores the same positions
STAGE = "checkpoint"
# --malloc_hold_mb: freed memory held for reuse up to this much over the settled start of training. Whole epochs at
# issue #10's settings (2 threads, Xeon; baseline 850 MiB): 512 peaked at 1.67 GiB but handed memory back 96 times
# (13.5 M page faults), 768 at 1.75 GiB with 29 (6.0 M), 1024 at 1.96 GiB with 17 (4.9 M), all within 3% of one
# another's speed; holding everything, 2.38-2.49 GiB. README.md, distillation bench.
HOLD_MB = 768
# --malloc_mmap_threshold, when nothing is held: whole epochs at the settings end at 2.08-2.09 GiB with
# 4 MiB, under the 2.25 goal that glibc's dynamic default misses (2.21-2.38), for fewer page faults than 1 MiB.
MMAP_THRESHOLD = 4 * 2**20

# The built-in demo: a 6-layer BERT teacher, first trained briefly on the built-in corpus (masked LM), distilled
# into a 3-layer DistilBERT initialized from teacher layers 0, 2 and 5. These replace the defaults only for flags
# the user did not give.
BUILTIN_DEFAULTS = {
    "per_gpu_train_batch_size": 32, "per_gpu_eval_batch_size": 64, "gradient_accumulation_steps": 1,
    "num_train_epochs": 3.0, "logging_steps": 10, "save_steps": 0, "alpha_ce": 5.0, "alpha_mlm": 2.0,
    "alpha_cos": 1.0, "learning_rate": 5e-4,
}


# ----------------------------------------------------------------------------------------------------------
# flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    g = parser.add_argument_group("data")
    g.add_argument("--data_file", default=None,
                   help="Binarized training corpus (scripts/binarize_data.py). Left out together with "
                        "--teacher_name: the built-in demo.")
    g.add_argument("--token_counts", default=None,
                   help="Token counts for the MLM masking smoothing (scripts/token_counts.py); counted from "
                        "--data_file when left out.")
    g.add_argument("--eval_file", default=None,
                   help="Held-out text (one sequence per line) or binarized file: perplexity of student and "
                        "teacher, with their size and speed, after training.")
    g.add_argument("--max_model_input_size", default=None, type=int,
                   help="Longest sequence; longer ones are split (default: what the models accept).")

    g = parser.add_argument_group("models")
    g.add_argument("--student_type", default=None, choices=STUDENT_TYPES,
                   help="Student family (checked against its config; inferred when left out).")
    g.add_argument("--student_config", default=None,
                   help="Student config: a JSON file (training_configs/*.json) or a model folder.")
    g.add_argument("--student_pretrained_weights", default=None,
                   help="Student initialization: a folder (scripts/extract_student.py) or a weights file.")
    g.add_argument("--teacher_type", default=None, choices=TEACHER_TYPES,
                   help="Teacher family (checked against its config; inferred when left out).")
    g.add_argument("--teacher_name", default=None, help="Teacher folder (or hub name), with its LM head.")
    g.add_argument("--tokenizer_name", default=None, help="Tokenizer, if not the teacher's.")
    g.add_argument("--cache_dir", default=None, help="Where downloaded models are stored.")
    g.add_argument("--initializer_range", default=0.02, type=float,
                   help="Std of the random initialization of a student built from --student_config alone.")

    g = parser.add_argument_group("losses")
    g.add_argument("--temperature", default=2.0, type=float, help="Softmax temperature of the distillation loss.")
    g.add_argument("--alpha_ce", default=0.5, type=float,
                   help="Weight of the distillation loss (soft cross-entropy, scaled by T^2).")
    g.add_argument("--alpha_mlm", default=0.0, type=float, help="Weight of the masked-LM loss (with --mlm).")
    g.add_argument("--alpha_clm", default=None, type=float,
                   help="Weight of the causal-LM loss (default 0.5 with --clm, 0 with --mlm).")
    g.add_argument("--alpha_mse", default=0.0, type=float,
                   help="Weight of the MSE between student and teacher logits.")
    g.add_argument("--alpha_cos", default=0.0, type=float,
                   help="Weight of the cosine loss between the last hidden states (equal hidden sizes).")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--mlm", action="store_true", help="Masked-LM objective (students: distilbert, bert, roberta).")
    mode.add_argument("--clm", action="store_true", help="Causal-LM objective (student: gpt2).")
    g.add_argument("--loss_chunk_size", default=None, type=int,
                   help="Tokens per chunk of the output projection and the vocabulary-sized losses, in training "
                        "and evaluation (default: from a memory target of about 64 MB of temporaries, in whole "
                        "blocks of 64 tokens).")
    g.add_argument("--matmul", "--loss_matmul", default="auto", choices=MATMUL_BACKENDS,
                   help="How the CPU runs the float32 matrix products of both models' linears and of the loss chunks "
                        "(the logits and the gradient to the hidden states): BLAS (torch.mm: MKL), oneDNN's linear, "
                        "or auto: the faster of the two on this CPU, timed once per weight shape on its first call "
                        "(oneDNN ran them about twice as fast as MKL on an AMD EPYC). Results differ only in float32 "
                        "rounding. A GPU always uses cuBLAS.")
    g.add_argument("--malloc_hold_mb", default=HOLD_MB, type=int, metavar="MIB",
                   help="glibc: keep the memory the run frees for reuse instead of handing it back to the system "
                        "(which costs page faults on every micro-batch), until resident memory has grown this many "
                        "MiB over what it was once training settled (after its first optimizer step); then, at the "
                        "next micro-batch, hand the free memory back. 0: glibc hands memory back itself "
                        "(--malloc_mmap_threshold). No effect off glibc, or when glibc's malloc is set through the "
                        "environment.")
    g.add_argument("--malloc_mmap_threshold", default=None, type=int, metavar="BYTES",
                   help=f"With --malloc_hold_mb 0: fix glibc's mmap threshold at this many bytes (default "
                        f"{MMAP_THRESHOLD}; 0: glibc's dynamic default, which keeps freed blocks of many batch shapes "
                        f"resident and grows memory all epoch). The environment variable {MMAP_ENV_VAR}, when set, "
                        "wins over this flag.")
    g.add_argument("--restrict_ce_to_mask", action="store_true",
                   help="Distillation loss only on the masked positions (MLM), not every token.")
    g.add_argument("--freeze_pos_embs", action="store_true", help="Freeze the student's position embeddings.")
    g.add_argument("--freeze_token_type_embds", action="store_true",
                   help="Freeze the student's token type embeddings (bert, roberta students).")

    g = parser.add_argument_group("masking (MLM)")
    g.add_argument("--mlm_mask_prop", default=0.15, type=float, help="Share of the tokens to predict.")
    g.add_argument("--word_mask", default=0.8, type=float, help="Share of the predicted tokens replaced by [MASK].")
    g.add_argument("--word_keep", default=0.1, type=float, help="Share of the predicted tokens kept.")
    g.add_argument("--word_rand", default=0.1, type=float, help="Share of the predicted tokens made random.")
    g.add_argument("--mlm_smoothing", default=0.7, type=float,
                   help="Tokens are drawn with probability count^-smoothing (favours rare tokens; 0: uniform).")

    g = parser.add_argument_group("training")
    g.add_argument("--dump_path", "--output_dir", dest="output_dir", default=None,
                   help="Where the student, checkpoints, logs and results go (default runs/distill).")
    g.add_argument("--force", "--overwrite_output_dir", dest="overwrite_output_dir", action="store_true",
                   help="Train into an output folder that already holds files (its old log is replaced; nothing "
                        "else is deleted).")
    g.add_argument("--n_epoch", "--num_train_epochs", dest="num_train_epochs", default=3.0, type=float,
                   help="Passes over the data.")
    g.add_argument("--max_steps", default=-1, type=int, help="If > 0: optimizer steps to take (overrides epochs).")
    g.add_argument("--batch_size", "--per_gpu_train_batch_size", "--per_device_train_batch_size",
                   dest="per_gpu_train_batch_size", default=5, type=int, help="Sequences per batch and process.")
    g.add_argument("--per_gpu_eval_batch_size", "--per_device_eval_batch_size", default=16, type=int,
                   help="Sequences per evaluation batch and process.")
    g.add_argument("--group_by_size", dest="group_by_size", action="store_true", default=True,
                   help="Batch sequences of similar length together (the default).")
    g.add_argument("--no_group_by_size", dest="group_by_size", action="store_false",
                   help="Plain shuffled batches (the original's --group_by_size flag turned grouping off).")
    g.add_argument("--gradient_accumulation_steps", default=50, type=int,
                   help="Batches accumulated per optimizer step.")
    g.add_argument("--warmup_prop", default=0.05, type=float, help="Share of the steps with a linear warmup.")
    g.add_argument("--warmup_steps", default=0, type=int, help="If > 0: warmup steps (overrides --warmup_prop).")
    g.add_argument("--weight_decay", default=0.0, type=float, help="AdamW weight decay (none on biases/LayerNorm).")
    g.add_argument("--learning_rate", default=5e-4, type=float, help="Peak learning rate.")
    g.add_argument("--adam_epsilon", default=1e-6, type=float, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", default=5.0, type=float, help="Gradient clipping norm (0: none).")
    g.add_argument("--fp16", action="store_true", help="Mixed precision (float16 + grad scaler, CUDA) via torch.amp.")
    g.add_argument("--fp16_opt_level", default=None,
                   help="Accepted for old command lines; apex opt levels do not exist in torch.amp (warned).")
    g.add_argument("--bf16", action="store_true", help="Mixed precision with bfloat16 via torch.amp.")
    g.add_argument("--n_gpu", default=None, type=int,
                   help="Accepted for old command lines (warned): torchrun sets the process count.")
    g.add_argument("--seed", default=56, type=int, help="Random seed.")
    g.add_argument("--log_interval", "--logging_steps", dest="logging_steps", default=500, type=int,
                   help="Log every loss term, the learning rate, speed and memory every N optimizer steps.")
    add_disable_tqdm_arg(g)
    g.add_argument("--checkpoint_interval", "--save_steps", dest="save_steps", default=4000, type=int,
                   help="Also checkpoint every N optimizer steps (0: only at the end of each epoch).")
    add_convention_args(g)
    g.add_argument("--max_train_samples", default=None, type=int,
                   help="Train on the first N sequences only (after splitting and dropping, as the log counts them).")
    g.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|latest",
                   help="Continue from a checkpoint folder, or from the newest one in the output folder.")
    add_distributed_args(parser)
    # Only flags the user left out take the demo's values: an explicit "--alpha_mlm 0" stays 0.
    args = parse_with_builtin_defaults(parser, argv, BUILTIN_DEFAULTS, ("data_file", "teacher_name"))
    if args.data_file is None and args.teacher_name is None and not args.clm:
        args.mlm = True
    return args


@dataclass(frozen=True)
class Losses:
    """The loss mix, resolved from the flags."""

    alpha_ce: float
    alpha_mlm: float
    alpha_clm: float
    alpha_mse: float
    alpha_cos: float
    temperature: float
    restrict_ce_to_mask: bool


@dataclass(frozen=True)
class Run:
    """Resolved inputs of this run (what the flags point at once the built-in default is filled in)."""

    output_dir: str
    data_file: str
    token_counts: str | None
    eval_file: str | None
    teacher_path: str
    teacher_type: str
    tokenizer_path: str
    student_type: str
    student_config: str | None
    student_weights: str | None
    causal: bool
    losses: Losses
    builtin: bool
    resume: str | None


def flag_problems(args: argparse.Namespace, ctx: DistContext) -> list[str]:
    """Problems visible from the flags alone (every one gathered into one error)."""
    problems = check_training_args(args) + check_precision_flags(args.fp16, args.bf16, ctx.device)
    alphas = {n: getattr(args, n) for n in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos")}
    for name, value in alphas.items():
        if value is not None and (value < 0 or not math.isfinite(value)):
            problems.append(f"--{name} must be >= 0 (got {value})")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        problems.append(f"--loss_chunk_size must be at least 1 (got {args.loss_chunk_size})")
    matmul_problem = backend_problem(args.matmul)
    if matmul_problem is not None:
        problems.append(f"--matmul {args.matmul}: {matmul_problem}")
    if args.malloc_hold_mb < 0:
        problems.append(f"--malloc_hold_mb cannot be negative (got {args.malloc_hold_mb}; 0: hold nothing)")
    if args.malloc_mmap_threshold is not None:
        problems += threshold_problems(args.malloc_mmap_threshold, "--malloc_mmap_threshold")
        if args.malloc_hold_mb > 0:
            problems.append("--malloc_mmap_threshold only applies with --malloc_hold_mb 0 (memory held for reuse "
                            "never goes through glibc's mmap)")
    if not args.temperature > 0:
        problems.append(f"--temperature must be positive (got {args.temperature})")
    if not 0 < args.mlm_mask_prop <= 1:
        problems.append(f"--mlm_mask_prop must lie in (0, 1] (got {args.mlm_mask_prop})")
    shares = (args.word_mask, args.word_keep, args.word_rand)
    if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
        problems.append(f"--word_mask, --word_keep and --word_rand must be >= 0 and sum to 1 (got "
                        f"{' + '.join(f'{s:g}' for s in shares)})")
    if args.mlm_smoothing < 0:
        problems.append(f"--mlm_smoothing cannot be negative (got {args.mlm_smoothing})")
    if not 0 <= args.warmup_prop <= 1:
        problems.append(f"--warmup_prop must lie in [0, 1] (got {args.warmup_prop})")
    if args.max_model_input_size is not None and args.max_model_input_size < 3:
        problems.append(f"--max_model_input_size must be at least 3 (got {args.max_model_input_size})")
    if (args.data_file is None) != (args.teacher_name is None):
        problems.append("give both --data_file and --teacher_name (or neither, for the built-in demo)")
    if args.teacher_name is not None and not (args.student_config or args.student_pretrained_weights):
        problems.append("give --student_config and/or --student_pretrained_weights (make an initialization from "
                        "the teacher's layers with scripts/extract_student.py)")
    for flag in ("data_file", "eval_file"):
        try:  # the original's .pickle names -> the .bin that binarize_data.py writes beside them
            setattr(args, flag, getattr(args, flag) and lm.binarized_path(getattr(args, flag)))
        except UserError as err:
            problems.append(str(err))
    for flag in ("data_file", "token_counts", "eval_file", "student_config"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path) and not path.endswith(".pickle"):
            problems.append(f"--{flag} {path}: no such file")
    if args.clm and args.restrict_ce_to_mask:
        problems.append("--restrict_ce_to_mask needs --mlm: a causal LM has no masked positions")
    # What the objective flags already decide (an inferred objective is checked again once the student is known).
    if args.mlm or args.clm:
        problems += loss_problems(resolve_losses(args, causal=args.clm), causal=args.clm)
    return problems


def resolve_losses(args: argparse.Namespace, causal: bool) -> Losses:
    alpha_clm = args.alpha_clm if args.alpha_clm is not None else (0.5 if causal else 0.0)
    return Losses(args.alpha_ce, args.alpha_mlm, alpha_clm, args.alpha_mse, args.alpha_cos, args.temperature,
                  args.restrict_ce_to_mask)


def loss_problems(losses: Losses, causal: bool) -> list[str]:
    """Weights that cannot work: all zero, or the LM loss of the other objective."""
    problems = []
    if causal and losses.alpha_mlm > 0:
        problems.append("--alpha_mlm needs a masked-LM student; a causal student learns with --alpha_clm")
    if not causal and losses.alpha_clm > 0:
        problems.append("--alpha_clm needs a causal (gpt2) student; with --mlm pass --alpha_clm 0 and use "
                        "--alpha_mlm")
    if losses.alpha_ce + losses.alpha_mlm + losses.alpha_clm + losses.alpha_mse + losses.alpha_cos <= 0:
        problems.append("every loss weight is zero (--alpha_ce, --alpha_mlm, --alpha_clm, --alpha_mse, "
                        "--alpha_cos): give at least one a positive weight")
    return problems


def load_checked_config(path: str, model_type: str | None, what: str, cache_dir: str | None,
                        allowed: Sequence[str]) -> Any:
    """load_config, then the family checked against --<what>_type and the families a <what> can be."""
    config = load_config(path, model_type, what, cache_dir)
    if model_type and config.model_type != model_type:
        raise UserError(f"--{what}_type {model_type} does not match {path}, which configures a "
                        f"{config.model_type} model")
    if config.model_type not in allowed:
        raise UserError(f"{path} configures a {config.model_type} model; {what}s can be {', '.join(allowed)}")
    return config


def load_config(path: str, model_type: str | None, what: str, cache_dir: str | None) -> Any:
    """A model config from a folder (or hub name) or a JSON file; a JSON file without "model_type" (as the
    original training_configs/) needs the type flag."""
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            kind = model_type or raw.get("model_type")
            if kind not in MODEL_CLASSES:
                raise UserError(f"{path} does not say which model it configures; add --{what}_type")
            return MODEL_CLASSES[kind][0].from_json_file(path)
        return AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from {path}: {str(err).splitlines()[0]}") from None


def position_limit(config: Any) -> int:
    """The longest input a model's position embeddings allow."""
    if config.model_type == "gpt2":
        return int(config.n_positions)
    if config.model_type == "roberta":
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1
    return int(config.max_position_embeddings)


def hidden_size(config: Any) -> int:
    return int(config.dim if config.model_type == "distilbert" else config.n_embd if config.model_type == "gpt2"
               else config.hidden_size)


def resolve_run(args: argparse.Namespace, ctx: DistContext) -> Run:
    """Validate the flags (every problem in one error), fill in the built-in default, and check that teacher,
    student and objective fit together."""
    raise_if_problems(flag_problems(args, ctx))
    output_dir = args.output_dir or os.path.join("runs", "distill")
    problems = check_output_dir(output_dir, True, args.overwrite_output_dir, args.resume_from_checkpoint)
    barrier()  # every rank looks at the output folder before rank 0 writes into it
    raise_if_problems(problems)
    if args.fp16_opt_level is not None:
        logger.warning("--fp16_opt_level %s ignored: torch.amp has no apex opt levels", args.fp16_opt_level)
    if args.n_gpu is not None:
        logger.warning("--n_gpu %s ignored: torchrun sets the number of processes, and each uses its GPU when "
                       "there is one (unless --no_cuda)", args.n_gpu)
    resume = resolve_resume_path(args.resume_from_checkpoint, output_dir)
    use_builtin = args.data_file is None
    if use_builtin:
        assets = prepare_builtin(ctx, os.path.join(output_dir, "builtin"))
        data_file, teacher_path, eval_file = assets["data_file"], assets["teacher"], args.eval_file or assets["eval"]
        student_weights, student_config = assets["student"], args.student_config
    else:
        data_file, teacher_path, eval_file = args.data_file, args.teacher_name, args.eval_file
        student_weights, student_config = args.student_pretrained_weights, args.student_config

    check_model_folder(teacher_path)
    teacher_config = load_checked_config(teacher_path, args.teacher_type, "teacher", args.cache_dir, TEACHER_TYPES)
    teacher_type = teacher_config.model_type
    if student_weights is not None and os.path.isdir(student_weights):
        check_model_folder(student_weights)
    elif student_weights is not None and not os.path.isfile(student_weights):
        raise UserError(f"--student_pretrained_weights {student_weights}: no such folder or file")
    config_source = student_config or student_weights
    if config_source is None or (os.path.isfile(config_source) and student_config is None):
        raise UserError("a student weights file needs --student_config (only a folder carries its own config)")
    s_config = load_checked_config(config_source, args.student_type, "student", args.cache_dir, STUDENT_TYPES)
    student_type = s_config.model_type

    causal = student_type in CAUSAL_TYPES
    if args.mlm and causal:
        raise UserError(f"--mlm needs a masked-LM student, but the student is a causal {student_type} model; use "
                        "--clm (or a distilbert/bert/roberta student)")
    if args.clm and not causal:
        raise UserError(f"--clm needs a causal student (gpt2), but the student is a masked-LM {student_type} "
                        "model; use --mlm")
    if FAMILY[student_type] != FAMILY[teacher_type]:
        raise UserError(f"a {student_type} student cannot learn from a {teacher_type} teacher: their tokenizers "
                        f"and objectives differ (pairs: bert -> distilbert/bert, roberta -> roberta, gpt2 -> gpt2)")
    if s_config.vocab_size != teacher_config.vocab_size:
        raise UserError(f"the student's vocabulary ({s_config.vocab_size} tokens, {config_source}) differs from "
                        f"the teacher's ({teacher_config.vocab_size} tokens, {teacher_path}); the distillation loss "
                        "compares them token by token: give the student the teacher's vocab_size")
    losses = resolve_losses(args, causal)
    raise_if_problems(loss_problems(losses, causal))
    if losses.alpha_cos > 0 and hidden_size(s_config) != hidden_size(teacher_config):
        raise UserError(f"--alpha_cos compares hidden states, but the student's size {hidden_size(s_config)} "
                        f"differs from the teacher's {hidden_size(teacher_config)}; set --alpha_cos 0")
    if args.freeze_token_type_embds and student_type not in TOKEN_TYPE_EMBEDDINGS:
        raise UserError(f"--freeze_token_type_embds: a {student_type} student has no token type embeddings")
    return Run(output_dir=output_dir, data_file=data_file, token_counts=args.token_counts, eval_file=eval_file,
               teacher_path=teacher_path, teacher_type=teacher_type, tokenizer_path=args.tokenizer_name or teacher_path,
               student_type=student_type, student_config=student_config, student_weights=student_weights,
               causal=causal, losses=losses, builtin=use_builtin, resume=resume)


# ----------------------------------------------------------------------------------------------------------
# models and data


def load_student(args: argparse.Namespace, run: Run) -> nn.Module:
    """The student: from a checkpoint when resuming, else from --student_pretrained_weights (a folder, or a
    weights file matched by name against --student_config), else freshly initialized from --student_config."""
    config_class, model_class = MODEL_CLASSES[run.student_type]
    if run.resume:
        return model_class.from_pretrained(run.resume)
    config = load_config(run.student_config or run.student_weights, run.student_type, "student", args.cache_dir)
    if run.student_weights is None:
        config.initializer_range = args.initializer_range
        logger.info("Student %s initialized at random (std %g)", run.student_type, args.initializer_range)
        return model_class(config)
    if os.path.isdir(run.student_weights):
        try:
            return model_class.from_pretrained(run.student_weights, config=config)
        except (RuntimeError, ValueError) as err:  # e.g. a --student_config whose sizes do not fit the weights
            stored = {}
            for file in masked.weight_files(run.student_weights):
                if file.endswith(".safetensors"):
                    with safe_open(file, framework="pt") as f:
                        stored.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
            raise UserError(f"the student weights in {run.student_weights} do not fit the student config "
                            f"{run.student_config}: {shape_problem(model_class(config), stored, err)}") from None
    try:
        if run.student_weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(run.student_weights)
        else:
            state = torch.load(run.student_weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"cannot read student weights {run.student_weights}: {str(err).splitlines()[0]}") from None
    model = model_class(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"{run.student_weights} does not fit the student config {run.student_config}: "
                        f"{shape_problem(model, {k: list(v.shape) for k, v in state.items()}, err)}") from None
    if result.unexpected_keys or len(result.missing_keys) == len(model.state_dict()):
        raise UserError(f"{run.student_weights} does not hold {run.student_type} weights for this config "
                        f"(unexpected: {', '.join(result.unexpected_keys[:3]) or 'none'})")
    logger.info("Student weights from %s; %d tensor(s) start fresh: %s", run.student_weights,
                len(result.missing_keys), ", ".join(result.missing_keys[:6]))
    return model


def shape_problem(model: nn.Module, stored: dict[str, list[int]], err: Exception) -> str:
    """The first tensor whose stored shape differs from the one the config gives (torch and transformers
    report every mismatch over many lines, or only in a separate report)."""
    for name, tensor in model.state_dict().items():
        if name in stored and stored[name] != list(tensor.shape):
            return (f"{name} is {stored[name]} in the weights but {list(tensor.shape)} in the config; give the "
                    "config the weights were made with")
    return str(err).splitlines()[0]


def freeze_embeddings(student: nn.Module, args: argparse.Namespace, student_type: str) -> list[str]:
    frozen = []
    names = dict(student.named_parameters())
    if args.freeze_pos_embs:
        frozen.append(POSITION_EMBEDDINGS[student_type])
    if args.freeze_token_type_embds:
        frozen.append(TOKEN_TYPE_EMBEDDINGS[student_type])
    for name in frozen:
        names[name].requires_grad = False
    return frozen


def max_input_length(args: argparse.Namespace, tokenizer: Any, teacher: nn.Module, student: nn.Module) -> int:
    limits = [position_limit(teacher.config), position_limit(student.config)]
    if tokenizer.model_max_length < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    limit = min(limits)
    if args.max_model_input_size is not None:
        if args.max_model_input_size > limit:
            raise UserError(f"--max_model_input_size {args.max_model_input_size} exceeds what the models accept "
                            f"({limit} tokens)")
        return args.max_model_input_size
    return limit


def open_corpus(ctx: DistContext, path: str, tokenizer: Any, causal: bool, what: str) -> lm.TokenFile:
    """A binarized file, checked whole by rank 0 (framing, checksums, ids), made with this tokenizer, and
    wrapped for this objective."""
    with main_process_first(ctx):
        token_file = lm.TokenFile(path, verify=ctx.is_main)
    token_file.check_tokenizer(tokenizer)
    wanted = "bos_eos" if causal else "cls_sep"
    if token_file.wrap.style != wanted:
        raise UserError(f"{path} was binarized for a {'causal' if wanted == 'cls_sep' else 'masked'} LM "
                        f"({token_file.wrap.style.replace('_', '/')} around each line) but the {what} objective is "
                        f"{'causal' if causal else 'masked'}; binarize it again with the matching --tokenizer_type")
    return token_file


def eval_corpus(ctx: DistContext, run: Run, tokenizer: Any, max_len: int) -> lm.LmDataset:
    """The --eval_file as an LM dataset: a binarized file as it is, a text file binarized into the output
    folder first (by rank 0)."""
    path = run.eval_file
    with open(path, "rb") as f:
        binarized = f.read(len(lm.MAGIC_HEAD)) == lm.MAGIC_HEAD
    if not binarized:
        target = os.path.join(run.output_dir, "eval_data.bin")
        with main_process_first(ctx):
            if ctx.is_main:
                lm.binarize_file(path, tokenizer, target, tokenizer_type="gpt2" if run.causal else None)
        path = target
    return lm.LmDataset(open_corpus(ctx, path, tokenizer, run.causal, "evaluation"), max_len,
                        tokenizer.unk_token_id)


def token_probabilities(ctx: DistContext, run: Run, token_file: lm.TokenFile, tokenizer: Any, vocab_size: int,
                        smoothing: float) -> torch.Tensor:
    """Masking weights per token id: count^-smoothing over the training data, zero for special tokens."""
    if run.token_counts:
        counts = lm.load_token_counts(run.token_counts, token_file.vocab)
    else:
        logger.info("No --token_counts: counting the tokens of %s", token_file.path)
        counts = lm.count_tokens(token_file, show_progress=ctx.is_main)
    padded = np.zeros(max(vocab_size, len(counts)), dtype=np.int64)
    padded[:len(counts)] = counts
    return masking_probabilities(padded[:vocab_size], smoothing, tokenizer.all_special_ids)


# ----------------------------------------------------------------------------------------------------------
# the distillation loss


def distillation_loss(student_features: torch.Tensor, projection: nn.Linear, teacher_features: torch.Tensor | None,
                      teacher_projection: nn.Linear | None, student_hidden: torch.Tensor | None,
                      teacher_hidden: torch.Tensor | None, attention_mask: torch.Tensor, labels: torch.Tensor,
                      losses: Losses, causal: bool, chunk_size: int | None = None, matmul: str = "auto",
                      slot: Slot | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilBERT's loss mix: alpha_ce * soft cross-entropy(student, teacher; T) * T^2 over every real token
    (or only the masked ones), + alpha_mlm * masked-LM or alpha_clm * causal-LM cross-entropy, + alpha_mse *
    MSE of the logits (summed over the vocabulary, averaged over positions), + alpha_cos * (1 - cosine) of the
    last hidden states. The logits are never made whole: `*_features` are the states entering each model's
    output projection, and the vocabulary-sized terms go through it in chunks of `chunk_size` tokens
    (common.fused_loss; automatic when None), their products through `matmul` (common.cpu_matmul), the
    projection's weight gradient left in `slot` for a tied input embedding (common.tied_embedding).
    Returns (weighted sum, each active term unweighted)."""
    rows = (labels != -100) if losses.restrict_ce_to_mask else attention_mask.bool()
    lm_name, alpha_lm = ("loss_clm", losses.alpha_clm) if causal else ("loss_mlm", losses.alpha_mlm)
    weights = LossWeights(ce=losses.alpha_ce, lm=alpha_lm, mse=losses.alpha_mse, temperature=losses.temperature)
    total = student_features.sum() * 0.0
    terms: dict[str, torch.Tensor] = {}
    if weights.ce > 0 or weights.lm > 0 or weights.mse > 0:
        total, fused = fused_distillation_losses(student_features, projection, teacher_features, teacher_projection,
                                                 rows, lm_targets(labels, causal), weights, chunk_size, matmul,
                                                 slot)
        terms.update({{"ce": "loss_ce", "lm": lm_name, "mse": "loss_mse"}[k]: v for k, v in fused.items()})
    if losses.alpha_cos > 0:
        terms["loss_cos"] = hidden_cosine(student_hidden, teacher_hidden, attention_mask)
        total = total + losses.alpha_cos * terms["loss_cos"]
    return total, terms


class DistillStep:
    """The loss step for common.training.train: runs student and teacher on the batch its batch source made
    (masked for MLM, labelled for CLM), both with their output projection taken out, the teacher under
    torch.inference_mode, and returns the loss mix with each term (tensors: the loop averages them over the
    logging window, with no host sync per micro-batch)."""

    def __init__(self, run: Run, teacher: nn.Module, chunk_size: int | None = None,
                 memory: HeldMemory | None = None, matmul: str = "auto") -> None:
        self.run, self.teacher, self.chunk_size, self.memory, self.matmul = run, teacher, chunk_size, memory, matmul
        self.hidden = run.losses.alpha_cos > 0
        self.needs_teacher = run.losses.alpha_ce > 0 or run.losses.alpha_mse > 0 or self.hidden

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], state: Any
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.memory is not None:  # a micro-batch boundary: the last one's memory is all free
            self.memory.check(settled=state.global_step > 0)
        inputs, attention_mask = batch["input_ids"], batch["attention_mask"]
        with tied_gradient(model) as slot, projection_removed(model) as projection:
            student = model(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=self.hidden)
        teacher_features = teacher_hidden = teacher_projection = None
        if self.needs_teacher:
            with torch.inference_mode(), projection_removed(self.teacher) as teacher_projection:
                teacher = self.teacher(input_ids=inputs, attention_mask=attention_mask,
                                       output_hidden_states=self.hidden)
            teacher_features = teacher.logits
            # The cosine loss keeps the teacher's states for its backward: a normal tensor, not an inference one.
            teacher_hidden = teacher.hidden_states[-1].clone() if self.hidden else None
        return distillation_loss(
            student.logits, projection, teacher_features, teacher_projection,
            student.hidden_states[-1] if self.hidden else None, teacher_hidden, attention_mask, batch["labels"],
            self.run.losses, self.run.causal, self.chunk_size, self.matmul, slot)


def batch_source(args: argparse.Namespace, run: Run, data: lm.LmDataset, tokenizer: Any, vocab_size: int,
                 token_probs: torch.Tensor | None, max_len: int, device: torch.device) -> lm.LmBatches:
    """Length-grouped batches (unless --no_group_by_size), masked as DistilBERT does (MLM) or labelled (CLM)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if run.causal:
        label = clm_labels_pair
    else:
        probs = token_probs.to(device)
        pred_probs = torch.tensor([args.word_mask, args.word_keep, args.word_rand], device=device)

        def label(ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return mlm_mask(ids, attention_mask, probs, args.mlm_mask_prop, pred_probs, tokenizer.mask_token_id,
                            vocab_size)
    return lm.LmBatches(data, args.per_gpu_train_batch_size, args.seed, pad_id, label, args.group_by_size, max_len)


def clm_labels_pair(ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ids, clm_labels(ids, attention_mask)


class Throughput:
    """on_log: tokens/s of all ranks, padding share and memory since the last log (the batch source counts
    tokens on the host; one gather per log)."""

    def __init__(self, ctx: DistContext, batches: lm.LmBatches) -> None:
        self.ctx, self.batches, self.since = ctx, batches, time.perf_counter()

    def __call__(self, state: Any) -> dict[str, float]:
        seconds = time.perf_counter() - self.since
        everyone = all_gather_objects((*self.batches.take_counts(), seconds), self.ctx)
        tokens, padded = sum(t for t, _, _ in everyone), sum(p for _, p, _ in everyone)
        out = {"tokens_per_second": tokens / max(max(s for *_, s in everyone), 1e-9),
               "padding_share": 1.0 - tokens / max(padded, 1)}
        out.update({f"memory_{k}": v for k, v in lm.approx_rss_mb().items()})
        if self.ctx.device.type == "cuda":
            out["memory_cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**20
        self.since = time.perf_counter()
        return out


def distill(ctx: DistContext, args: argparse.Namespace, run: Run, student: nn.Module, teacher: nn.Module,
            tokenizer: Any, data: lm.LmDataset, token_probs: torch.Tensor | None, max_len: int,
            writer: Any, memory: HeldMemory | None = None) -> dict[str, Any]:
    """Train the student on the shared loop, with length-grouped batches unless --no_group_by_size."""
    batches = batch_source(args, run, data, tokenizer, teacher.config.vocab_size, token_probs, max_len, ctx.device)

    save = model_saver(student, tokenizer)
    cfg = TrainConfig.from_args(args, output_dir=run.output_dir, warmup_proportion=args.warmup_prop,
                                save_each_epoch=True, adam_betas=ADAM_BETAS, dynamic_padding=False,
                                fused_adamw=True)
    if writer is not None:
        writer.add_text("config/training", json.dumps(vars(args), indent=1, default=str), 0)
        writer.add_text("config/student", student.config.to_json_string(), 0)
    logger.info("Student: %s, %.2fM parameters (%.2fM trainable); teacher: %s, %.2fM parameters",
                run.student_type, count_parameters(student) / 1e6,
                sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6, run.teacher_type,
                count_parameters(teacher) / 1e6)
    stage = Stage(STAGE, DistillStep(run, teacher, args.loss_chunk_size, memory, args.matmul),
                  lambda: param_groups(student.named_parameters(), args.learning_rate, args.weight_decay),
                  on_log=Throughput(ctx, batches))
    (result,) = train(ctx, cfg, student, [stage], batches, save, tb_writer=writer, resume_from=run.resume)
    this_run = int(sum(all_gather_objects(batches.total_tokens, ctx)))
    plan = plan_steps(batches.batches_per_epoch(ctx), cfg, ctx.world_size)
    tokens, padded = batches.planned_tokens(ctx.world_size, result.global_step, plan.updates_per_epoch,
                                            cfg.gradient_accumulation_steps)  # the whole run, a resumed one too
    summary = {**asdict(result), "tokens": tokens, "tokens_this_run": this_run,
               "tokens_per_second": this_run / result.seconds if this_run else None,
               "padding_share": 1.0 - tokens / padded if padded else None, "group_by_size": args.group_by_size}
    save_final_model(ctx, save, run.output_dir, what="student")
    if this_run:
        logger.info("%.0f tokens/s, %.1f%% of each batch padding", summary["tokens_per_second"],
                    100 * summary["padding_share"])
    return summary


def count_parameters(model: nn.Module) -> int:
    """Parameters, tied ones (input and output embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# evaluation


class HeldOutBatches:
    """Evaluation batches of the sequences `order[i]`: masked LM at fixed positions that depend only on each
    sequence (the same for both models and any number of processes), causal LM at every next token."""

    def __init__(self, data: lm.LmDataset, order: np.ndarray, tokenizer: Any, causal: bool) -> None:
        self.data, self.order, self.tokenizer, self.causal = data, order, tokenizer, causal
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.num_examples = len(order)

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        idx = self.order[list(indices)].tolist()
        ids, lengths = self.data.collate(idx, self.pad_id)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        if self.causal:
            inputs, labels = ids, clm_labels(ids, mask)
        else:
            inputs, labels = fixed_mlm_mask(ids, mask, idx, self.tokenizer.all_special_ids, EVAL_MASK_PROP,
                                            self.tokenizer.mask_token_id, EVAL_SEED)
        return {"input_ids": inputs.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
                "tokens": lengths.to(device)}


def evaluate(ctx: DistContext, args: argparse.Namespace, run: Run, student: nn.Module, teacher: nn.Module,
             tokenizer: Any, max_len: int) -> dict[str, Any]:
    """Perplexity of teacher and student on the held-out file (masked LM: the same fixed 15% of each sequence's
    tokens masked for both models; causal LM: every next token), each model timed over the same batches; the
    output projection in chunks of tokens, as in training."""
    data = eval_corpus(ctx, run, tokenizer, max_len)
    logger.info("Evaluation data: %s", data.describe())
    order = np.argsort(data.lengths, kind="stable")  # similar lengths together: less padding, fairer timing
    held_out = HeldOutBatches(data, order, tokenizer, run.causal)
    bs = args.per_gpu_eval_batch_size

    def step_for(model: nn.Module):
        def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with projection_removed(model) as projection:
                features = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = lm_targets(batch["labels"], run.causal).view_as(batch["labels"])
            nll = token_nll(features, projection, targets, args.loss_chunk_size, args.matmul)
            return {"nll": nll.sum(-1), "count": (targets != -100).sum(-1), "tokens": batch["tokens"]}
        return step

    results: dict[str, Any] = {"eval_file": run.eval_file, "objective": "clm" if run.causal else "mlm",
                               "sequences": len(data), "data": data.stats}
    for name, model in (("teacher", teacher), ("student", student)):
        model.eval()
        warm = HeldOutBatches(data, order[-min(bs, len(data)):], tokenizer, run.causal)  # the longest batch
        predict(ctx, warm, bs, step_for(model), dynamic_padding=False, desc="warm-up", fp16=args.fp16,
                bf16=args.bf16)
        out, seconds = predict(ctx, held_out, bs, step_for(model), dynamic_padding=False, desc=f"eval {name}",
                               fp16=args.fp16, bf16=args.bf16)
        nll, count, tokens = float(out["nll"].sum()), int(out["count"].sum()), int(out["tokens"].sum())
        results[name] = {"perplexity": math.exp(nll / max(count, 1)), "loss": nll / max(count, 1),
                         "predicted_tokens": count, "tokens": tokens, "parameters": count_parameters(model),
                         "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}
        logger.info("%s: perplexity %.3f over %d predicted tokens, %.1fM parameters, %.0f tokens/s", name,
                    results[name]["perplexity"], count, results[name]["parameters"] / 1e6,
                    results[name]["tokens_per_second"])
    s, t = results["student"], results["teacher"]
    results["student_vs_teacher"] = {"parameters": s["parameters"] / t["parameters"],
                                     "speedup": t["seconds"] / max(s["seconds"], 1e-9),
                                     "perplexity_ratio": s["perplexity"] / t["perplexity"]}
    return results


def loss_curves(log_path: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every loss term logged during training, by step (a resumed run's repeated steps: the last value)."""
    by_step: dict[int, dict[str, Any]] = {}
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record.get("stage") == STAGE:
                    by_step[int(record["step"])] = record
    steps = sorted(by_step)
    names = ["loss"] + sorted({k for r in by_step.values() for k in r if k.startswith("loss_")}) + ["lr"]
    return {("loss (weighted sum)" if n == "loss" else n): ([s for s in steps if n in by_step[s]],
                                                            [by_step[s][n] for s in steps if n in by_step[s]])
            for n in names}


def write_results(ctx: DistContext, run: Run, results: dict[str, Any]) -> None:
    if not ctx.is_main:
        return
    evaluation = results.get("eval", {})
    eval_flat = flat_metrics("eval_", {k: evaluation[k] for k in ("student", "teacher", "student_vs_teacher")
                                       if k in evaluation})
    if evaluation:
        eval_flat["eval_samples"] = evaluation["sequences"]
    # all_results.json keeps the nested summary it always had, with the flat Hugging Face keys beside it.
    write_run_results(run.output_dir, train_metrics([results["train"]], results["data"]["sequences"]), eval_flat,
                      base=results)
    write_card(run, results)
    if "eval" in results:
        write_json_atomic(os.path.join(run.output_dir, "eval_results.json"), results["eval"])
    curves = loss_curves(os.path.join(run.output_dir, "log_history.jsonl"))
    if any(steps for steps, _ in curves.values()):
        fig = visualize.plot_training_curves(curves, title=f"Distillation of a {run.student_type} student from a "
                                                           f"{run.teacher_type} teacher: loss terms")
        visualize.save(fig, os.path.join(run.output_dir, "loss_terms.png"))


def write_card(run: Run, results: dict[str, Any]) -> None:
    """The model card of the distilled student (README.md beside it)."""
    losses = {k: v for k, v in asdict(run.losses).items() if k.startswith("alpha_") and v}
    method = {"method": "knowledge distillation (DistilBERT recipe)", "student": run.student_type,
              "student initialization": run.student_weights or f"random, from {run.student_config}",
              "teacher": f"{run.teacher_path} ({run.teacher_type})", "objective": results["objective"],
              "loss weights": ", ".join(f"{k} {v:g}" for k, v in losses.items()),
              "temperature": run.losses.temperature, "training sequences": results["data"]["sequences"],
              "steps": results["train"]["global_step"], "frozen": results["frozen"] or "nothing"}
    metrics = None
    if "eval" in results:
        e = results["eval"]
        metrics = {"student perplexity": e["student"]["perplexity"], "teacher perplexity": e["teacher"]["perplexity"],
                   "student parameters / teacher's": e["student_vs_teacher"]["parameters"],
                   "speed-up over the teacher": e["student_vs_teacher"]["speedup"]}
    lm_class = "AutoModelForCausalLM" if run.causal else "AutoModelForMaskedLM"
    write_model_card(
        run.output_dir, f"Distilled {run.student_type} student",
        f"A {run.student_type} language model distilled from the {run.teacher_type} teacher `{run.teacher_path}`: "
        "it learned the teacher's softened output distribution along with its own LM objective.",
        method, metrics, f"""from transformers import {lm_class}, AutoTokenizer

model = {lm_class}.from_pretrained("{run.output_dir}")
tokenizer = AutoTokenizer.from_pretrained("{run.output_dir}")""")


# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with (script_context(args, argv, resolve_run) as (session, run),
          held_freed_memory(args.malloc_hold_mb * 2**20) as memory):  # before the models and data are made
        ctx = session.ctx
        mmap_threshold = None if memory is not None else fix_mmap_threshold(
            MMAP_THRESHOLD if args.malloc_mmap_threshold is None else args.malloc_mmap_threshold)
        tokenizer = load_tokenizer(run.tokenizer_path, args.cache_dir)
        teacher = load_teacher(run.teacher_path, run.teacher_type, args.cache_dir).to(ctx.device)
        teacher.eval().requires_grad_(False)
        student = load_student(args, run).to(ctx.device)
        frozen = freeze_embeddings(student, args, run.student_type)
        routed = {"student": route_linears(student, args.matmul), "teacher": route_linears(teacher, args.matmul)}
        if any(routed.values()):
            logger.info("Linears routed through --matmul %s: %d of the student's, %d of the teacher's", args.matmul,
                        routed["student"], routed["teacher"])
        if len(tokenizer) > teacher.config.vocab_size:
            raise UserError(f"the tokenizer {run.tokenizer_path} has {len(tokenizer)} tokens, more than the "
                            f"teacher's vocabulary of {teacher.config.vocab_size}")
        max_len = max_input_length(args, tokenizer, teacher, student)
        token_file = open_corpus(ctx, run.data_file, tokenizer, run.causal, "training")
        data = lm.LmDataset(token_file, max_len, tokenizer.unk_token_id)
        data.truncate(args.max_train_samples)
        logger.info("Training data: %s", data.describe())
        token_probs = None if run.causal else token_probabilities(ctx, run, token_file, tokenizer,
                                                                  teacher.config.vocab_size, args.mlm_smoothing)
        results: dict[str, Any] = {"student_type": run.student_type, "teacher": run.teacher_path,
                                   "objective": "clm" if run.causal else "mlm", "losses": asdict(run.losses),
                                   "max_model_input_size": max_len, "frozen": frozen, "data": data.stats,
                                   "malloc_mmap_threshold": mmap_threshold}
        results["train"] = distill(ctx, args, run, student, teacher, tokenizer, data, token_probs, max_len,
                                   session.writer(), memory)
        results["malloc_held"] = memory.summary() if memory is not None else None
        if run.eval_file:
            results["eval"] = evaluate(ctx, args, run, student, teacher, tokenizer, max_len)
            e = results["eval"]
            logger.info("***** student perplexity %.3f vs teacher %.3f; %.0f%% of its parameters, %.2fx its speed "
                        "*****", e["student"]["perplexity"], e["teacher"]["perplexity"],
                        100 * e["student_vs_teacher"]["parameters"], e["student_vs_teacher"]["speedup"])
        write_results(ctx, run, results)
        return results


if __name__ == "__main__":
    exit_with(run_cli(main))
