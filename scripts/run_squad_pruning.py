#!/usr/bin/env python
"""Movement pruning: fine-prune a question-answering encoder on SQuAD v1.1 / v2.0 (Sanh, Wolf & Rush 2020).

Every nn.Linear of the encoder's layers becomes a masked layer whose mask follows importance scores learned
during fine-tuning (--pruning_method topK: movement pruning; sigmoied_threshold: soft movement pruning;
magnitude, threshold, l0), while the cubic schedule takes the threshold from --initial_threshold to
--final_threshold. Optional distillation from a fine-tuned teacher (--teacher_name_or_path). --model_type bert
(no "masked_" prefix) fine-tunes the dense model instead, as the original did. --pruning_structure
heads_neurons scores whole attention heads and FFN neurons instead of single weights (blocks: square blocks), so
that scripts/bertarize.py --shrink can remove them: a smaller, faster model.

    python scripts/run_squad_pruning.py --do_train --do_eval           # built-in demo, no download
    python scripts/run_squad_pruning.py --model_type masked_bert --model_name_or_path bert-base-uncased \\
        --data_dir squad --train_file train-v1.1.json --predict_file dev-v1.1.json --output_dir runs/squad \\
        --do_train --do_eval --do_lower_case --per_gpu_train_batch_size 16 --warmup_steps 5400 \\
        --num_train_epochs 10 --learning_rate 3e-5 --mask_scores_learning_rate 1e-2 \\
        --initial_threshold 1 --final_threshold 0.15 --initial_warmup 1 --final_warmup 2 \\
        --pruning_method topK --mask_init constant --mask_scale 0.
    torchrun --nproc_per_node=4 scripts/run_squad_pruning.py ...same flags...

Writes into --output_dir: the masked model (a transformers checkpoint whose stock weights are the pruned ones,
plus the unpruned weights, the mask scores and the pruning state in config.json; scripts/bertarize.py makes a
plain stock one), README.md (a model card), train_results.json / all_results.json, predictions_.json,
nbest_predictions_.json, null_odds_.json (v2.0), eval_results.json / eval_results.txt, remaining_weights.json / .png,
threshold_schedule.png, log_history.jsonl, TensorBoard events under runs/, checkpoint-NNNNNN/ folders and
run_args.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from common.args import (
    add_distributed_args, add_model_args, add_run_args, add_training_args, answering_help, check_output_dir,
    check_run_args, parse_with_builtin_defaults, raise_if_problems, script_parser,
)
from common.errors import UserError, exit_with, run_cli
from common.models.structured import STRUCTURES

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForQuestionAnswering

    from common import visualize
    from common.builtin import squad as builtin
    from common.caching import file_identity, first_examples, load_and_cache_examples, tokenizer_identity
    from common.checkpoint import read_checkpoint_state, resolve_resume_path
    from common.cli import build_on_main, evaluate_checkpoints, save_final_model, script_context
    from common.data import squad
    from common.distillation import soft_cross_entropy
    from common.distributed import DistContext, barrier, broadcast_object
    from common.io import write_json_atomic, write_text_atomic
    from common.model_card import write_model_card
    from common.results import flat_metrics, train_metrics, write_run_results
    from common.loaders import load_tokenizer as load_fast_tokenizer
    from common.loaders import model_saver
    from common.models import masked, shrink
    from common.pretrained import check_model_folder
    from common.training import Stage, TrainConfig, param_groups, plan_for_examples, predict, train

logger = logging.getLogger("run_squad_pruning")

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LABELS = ("start_positions", "end_positions")
PAD_LOGIT = -1e4  # logits of padding positions: never among the n best
PRUNING_FLAGS = ("pruning_method", "mask_init", "mask_scale", "mask_scores_learning_rate", "initial_threshold",
                 "final_threshold", "initial_warmup", "final_warmup", "final_lambda",
                 "global_topk_frequency_compute", "pruning_structure", "block_size")

# The built-in demo trains a small BERT from scratch on generated questions; these replace the defaults only
# for flags the user did not give.
BUILTIN_DEFAULTS = {
    "learning_rate": 1e-3, "num_train_epochs": 4.0, "warmup_steps": 60, "per_gpu_train_batch_size": 32,
    "per_gpu_eval_batch_size": 64, "max_seq_length": 64, "doc_stride": 32, "max_query_length": 16,
    "initial_threshold": 1.0, "final_threshold": 0.1, "initial_warmup": 1, "final_warmup": 2,
    "mask_scores_learning_rate": 1e-2, "logging_steps": 50, "save_steps": 0,
}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_args(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help="Folder holding the SQuAD .json files.")
    g.add_argument("--train_file", default=None, help="Training file (in --data_dir), e.g. train-v1.1.json.")
    g.add_argument("--predict_file", default=None, help="Evaluation file (in --data_dir), e.g. dev-v1.1.json.")
    g.add_argument("--version_2_with_negative", action="store_true",
                   help="SQuAD v2.0: some questions have no answer in their context.")
    g.add_argument("--null_score_diff_threshold", default=0.0, type=float,
                   help="v2.0: predict no answer when null score - best span score is above this.")
    g.add_argument("--max_seq_length", default=384, type=int,
                   help="Tokens per window (question + context part + special tokens).")
    g.add_argument("--doc_stride", default=128, type=int,
                   help="Context tokens between the starts of two windows over a long context.")
    g.add_argument("--max_query_length", default=64, type=int, help="Questions are cut to this many tokens.")
    g.add_argument("--n_best_size", default=20, type=int,
                   help="Start/end candidates per window, and answers kept in nbest_predictions.")
    g.add_argument("--max_answer_length", default=30, type=int, help="Longest answer, in tokens.")
    g.add_argument("--verbose_logging", action="store_true",
                   help="Name every training question skipped because its answer is not at its answer_start.")
    add_training_args(parser)
    add_distributed_args(parser)
    add_run_args(parser, "run", "Fine-prune (or fine-tune) on --train_file.", "Evaluate on --predict_file.",
                 "Evaluate at every logging step (EM/F1 in the log and TensorBoard).",
                 predict_help="Answer the questions of --predict_file (answers not needed) into predictions.json "
                              "and nbest_predictions.json (null_odds.json for v2.0), without scores.")
    g = parser.add_argument_group("pruning")
    g.add_argument("--pruning_method", default="topK",
                   help="topK (movement pruning), sigmoied_threshold (soft movement pruning), magnitude, "
                        "threshold, l0 (L0 regularization).")
    g.add_argument("--pruning_structure", default="weights", choices=STRUCTURES,
                   help="What one score decides: weights (each weight, movement pruning as published), "
                        "heads_neurons (each attention head and FFN neuron: whole ones are emptied, and "
                        "bertarize.py --shrink removes them for a faster model), blocks (square blocks).")
    g.add_argument("--block_size", default=32, type=int, help="Side of the blocks of --pruning_structure blocks.")
    g.add_argument("--mask_init", default="constant", help="Initialization of the mask scores: constant, "
                   "uniform, kaiming.")
    g.add_argument("--mask_scale", default=0.0, type=float,
                   help="Value (constant) or half-width (uniform) of the initial scores.")
    g.add_argument("--mask_scores_learning_rate", default=1e-2, type=float,
                   help="AdamW learning rate of the mask scores (their own parameter group, no weight decay).")
    g.add_argument("--initial_threshold", default=1.0, type=float,
                   help="Threshold at the start of the schedule (topK/magnitude: fraction of weights kept).")
    g.add_argument("--final_threshold", default=0.7, type=float, help="Threshold at the end of the schedule.")
    g.add_argument("--initial_warmup", default=1, type=int,
                   help="The threshold stays at its initial value for initial_warmup * warmup_steps steps.")
    g.add_argument("--final_warmup", default=2, type=int,
                   help="... and at its final value for the last final_warmup * warmup_steps steps.")
    g.add_argument("--regularization", default=None,
                   help="Penalty on the scores: l1 (soft movement), l0, or null (none).")
    g.add_argument("--final_lambda", default=0.0, type=float,
                   help="Regularization weight at the end (it follows the threshold schedule).")
    g.add_argument("--global_topk", action="store_true",
                   help="One threshold over the whole encoder's scores instead of one per matrix.")
    g.add_argument("--global_topk_frequency_compute", default=25, type=int,
                   help="Recompute the global threshold every N steps.")
    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher_type", default=None, type=str.lower,
                   help="Model family of the teacher (its tokenization must equal the student's).")
    g.add_argument("--teacher_name_or_path", default=None, help="A model already fine-tuned on SQuAD.")
    g.add_argument("--alpha_ce", default=0.5, type=float, help="Weight of the task (cross-entropy) loss.")
    g.add_argument("--alpha_distil", default=0.5, type=float, help="Weight of the distillation loss.")
    g.add_argument("--temperature", default=2.0, type=float, help="Distillation temperature.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return parse_with_builtin_defaults(parser, argv, BUILTIN_DEFAULTS)


@dataclass(frozen=True)
class Run:
    """Resolved inputs of this run (what the flags point at once the built-in default is filled in)."""

    train_file: str | None
    predict_file: str | None
    model_path: str
    tokenizer_path: str
    output_dir: str
    builtin: bool
    resume: str | None
    masked: bool  # prune (model_type masked_* or none given) or fine-tune densely (model_type bert, ...)
    model_type: str | None  # the family without the "masked_" prefix, if given
    schedule: masked.Schedule
    regularization: str | None
    teacher_path: str | None


def resolve_run(args: argparse.Namespace, ctx: DistContext) -> Run:
    """Validate the flags (every problem in one error) and fill in the built-in default."""
    problems = check_run_args(args, ctx.device)
    use_builtin = args.model_name_or_path is None and args.data_dir is None
    model_type = args.model_type
    is_masked_run = model_type is None or model_type.startswith("masked_")
    if model_type is not None and model_type.startswith("masked_"):
        model_type = model_type[len("masked_"):]
    regularization = None if args.regularization in (None, "null", "none") else args.regularization
    if is_masked_run and args.do_train:
        problems += masked.check_pruning_flags(args.pruning_method, args.initial_threshold, args.final_threshold,
                                               regularization, args.final_lambda, args.global_topk, args.mask_init,
                                               args.initial_warmup, args.final_warmup, args.pruning_structure,
                                               args.block_size)
        if args.mask_scores_learning_rate <= 0 and args.pruning_method in masked.SCORE_METHODS:
            problems.append("--mask_scores_learning_rate must be positive")
        if args.global_topk_frequency_compute < 1:
            problems.append("--global_topk_frequency_compute must be at least 1")
    elif args.do_train and (regularization is not None or args.global_topk):
        problems.append(f"--regularization/--global_topk need a masked model; --model_type {args.model_type} "
                        f"fine-tunes densely (use --model_type masked_{model_type})")
    elif args.do_train:
        defaults = vars(build_parser().parse_args([]))
        ignored = [f"--{n}" for n in PRUNING_FLAGS if getattr(args, n) != defaults[n]]
        if ignored:
            logger.warning("%s ignored: --model_type %s fine-tunes the dense model (masked_%s prunes it)",
                           ", ".join(ignored), args.model_type, model_type)
    for flag in ("max_query_length", "doc_stride", "n_best_size", "max_answer_length"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if args.max_seq_length < 8:
        problems.append(f"--max_seq_length {args.max_seq_length} is too short (at least 8)")
    if not math.isfinite(args.null_score_diff_threshold):
        problems.append("--null_score_diff_threshold must be a finite number")
    if (args.teacher_type is None) != (args.teacher_name_or_path is None):
        problems.append("distillation needs both --teacher_type and --teacher_name_or_path")
    if args.teacher_name_or_path is not None:
        if args.alpha_distil <= 0:
            problems.append("--alpha_distil must be positive when distilling from a teacher")
        if args.alpha_ce < 0:
            problems.append("--alpha_ce cannot be negative")
        if not args.temperature > 0:
            problems.append("--temperature must be positive")
    output_dir = args.output_dir or os.path.join("runs", "squad_pruning")
    problems += check_output_dir(output_dir, args.do_train, args.overwrite_output_dir, args.resume_from_checkpoint)
    train_file = predict_file = None
    if not use_builtin and args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            problems.append(f"--data_dir {args.data_dir} does not exist; point it at the folder holding the SQuAD "
                            ".json files")
        else:
            for flag, needed in (("train_file", args.do_train), ("predict_file", args.do_eval or args.do_predict)):
                name = getattr(args, flag)
                if needed and not name:
                    problems.append(f"--{flag} is required with "
                                    f"{'--do_train' if flag == 'train_file' else '--do_eval/--do_predict'} "
                                    "(e.g. train-v1.1.json / dev-v1.1.json)")
                elif needed and not os.path.isfile(os.path.join(args.data_dir, name)):
                    problems.append(f"--{flag} {name}: no such file in {args.data_dir}")
            train_file = os.path.join(args.data_dir, args.train_file) if args.train_file else None
            predict_file = os.path.join(args.data_dir, args.predict_file) if args.predict_file else None
    raise_if_problems(problems)
    # Every rank checks the output folder before any rank writes into it (run_args.json, the built-in data).
    barrier()
    if args.doc_stride >= args.max_seq_length - args.max_query_length:
        logger.warning("WARNING - You've set a doc stride which may be superior to the document length in some "
                       "examples. This could result in errors when building features from the examples. Please "
                       "reduce the doc stride or increase the maximum length to ensure the features are correctly "
                       "built.")
    if args.fp16_opt_level:
        logger.warning("--fp16_opt_level %s ignored: torch.amp has no apex opt levels", args.fp16_opt_level)

    resume = resolve_resume_path(args.resume_from_checkpoint, output_dir) if args.do_train else None
    if use_builtin:
        base = os.path.join(output_dir, "builtin")
        data_dir, model_path = os.path.join(base, "data"), os.path.join(base, "model")
        build_on_main(ctx, lambda: (builtin.write_builtin_squad(data_dir, version_2=args.version_2_with_negative),
                                    builtin.write_builtin_squad_model(model_path)))
        version = "v2.0" if args.version_2_with_negative else "v1.1"
        train_file = os.path.join(data_dir, f"train-{version}.json")
        predict_file = os.path.join(data_dir, f"dev-{version}.json")
        logger.warning("No --model_name_or_path/--data_dir: running the built-in demo (a small BERT built from a "
                       "config, generated SQuAD %s-format questions about short biographies) in %s", version, base)
    else:
        model_path = args.model_name_or_path
    if not args.do_train and args.output_dir is None and not use_builtin:
        # Evaluation only: results go into the model folder when no --output_dir is given.
        output_dir = model_path if os.path.isdir(model_path) else output_dir
    schedule = masked.Schedule(args.initial_threshold, args.final_threshold, args.warmup_steps, args.initial_warmup,
                               args.final_warmup, args.final_lambda if regularization else 0.0)
    return Run(train_file=train_file, predict_file=predict_file, model_path=model_path,
               tokenizer_path=args.tokenizer_name or model_path, output_dir=output_dir, builtin=use_builtin,
               resume=resume, masked=is_masked_run, model_type=model_type, schedule=schedule,
               regularization=regularization, teacher_path=args.teacher_name_or_path)


# ----------------------------------------------------------------------------------------------------------
# model and data


def load_tokenizer(path: str, args: argparse.Namespace) -> Any:
    return load_fast_tokenizer(path, args.cache_dir, args.do_lower_case, "SQuAD features need its offsets")


def load_model(path: str, args: argparse.Namespace, expected_type: str | None, flag: str = "--model_type") -> Any:
    """A question-answering model from a folder: a masked one (this project's or the original's masked_bert)
    rebuilt with its masks, a shrunk one (bertarize.py --shrink) with its per-layer widths, otherwise the stock
    AutoModelForQuestionAnswering (a fresh QA head if it had none).
    """
    check_model_folder(path)
    if os.path.isdir(path) and masked.is_masked_folder(path):
        config_dict = masked.read_config_json(path)
        family = "bert" if config_dict.get("model_type") == "masked_bert" else config_dict.get("model_type")
        state = masked.masked_state_of(config_dict)
        # The original's masked_bert folders record no threshold: its evaluation used --final_threshold.
        unrecorded = state.threshold is None and state.method != "l0"
        model = masked.load_masked_model(path, threshold=args.final_threshold if unrecorded else None)
    elif os.path.isdir(path) and shrink.is_shrunk_folder(path):  # bertarize.py --shrink: per-layer widths
        model = shrink.load_shrunk_model(path)
        family = model.config.model_type
    else:
        try:
            model = AutoModelForQuestionAnswering.from_pretrained(path, cache_dir=args.cache_dir or None)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot load a question-answering model from {path}: "
                            f"{str(err).splitlines()[0]}") from None
        family = model.config.model_type
    if expected_type is not None and family != expected_type:
        raise UserError(f"{flag} {expected_type} does not match {path}, which holds a {family} model; "
                        f"drop {flag} or pass {flag} {family}")
    return model


def has_qa_head(path: str) -> bool:
    try:
        return any("qa_outputs" in k for k in masked.read_state_dict(path))
    except UserError:
        return True  # a hub name: from_pretrained decides


def load_student(path: str, args: argparse.Namespace, run: Run) -> Any:
    """The model to train: a stock checkpoint gets its encoder's linear layers masked (a masked folder, e.g. a
    checkpoint to resume, keeps its own masks)."""
    if os.path.isdir(path) and shrink.is_shrunk_folder(path):
        # Neither the masked saver nor save_pretrained records per-layer widths: what training wrote would not load.
        raise UserError(f"{path} is a shrunk model (bertarize.py --shrink): it can be evaluated or used for "
                        "predictions, not trained further; train from the masked or the bertarized folder instead")
    model = load_model(path, args, run.model_type)
    if masked.is_masked(model):
        if not run.masked:
            raise UserError(f"{path} holds a masked model; continue pruning it with --model_type "
                            f"masked_{run.model_type}, or bertarize it first to fine-tune it densely")
        state = masked.pruning_state(model)
        if state.method != args.pruning_method:
            raise UserError(f"{path} was pruned with --pruning_method {state.method}; pass --pruning_method "
                            f"{state.method} to continue it")
        if state.structure != args.pruning_structure or (state.structure == "blocks"
                                                         and state.block_size != args.block_size):
            raise UserError(f"{path} was pruned with --pruning_structure {state.structure}"
                            + (f" --block_size {state.block_size}" if state.structure == "blocks" else "")
                            + "; pass the same to continue it")
    elif run.masked:
        names = masked.mask_model(model, args.pruning_method, args.mask_init, args.mask_scale,
                                  args.pruning_structure, args.block_size)
        logger.info("Masked %d linear layers of the encoder (%s, %s init, %s)", len(names), args.pruning_method,
                    args.mask_init, args.pruning_structure)
    return model.train()


def load_teacher(args: argparse.Namespace, run: Run, student: Any, device: torch.device) -> Any:
    if run.teacher_path is None:
        return None
    teacher = load_model(run.teacher_path, args, args.teacher_type.removeprefix("masked_"), "--teacher_type")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"the teacher {run.teacher_path} has a vocabulary of {teacher.config.vocab_size} tokens, "
                        f"the student {student.config.vocab_size}: distillation needs the same tokenization")
    if not has_qa_head(run.teacher_path):
        raise UserError(f"the teacher {run.teacher_path} has no question-answering head; fine-tune it on SQuAD "
                        "first (--model_type bert)")
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def load_features(ctx: DistContext, args: argparse.Namespace, run: Run, tokenizer: Any,
                  split: str) -> tuple[dict[str, torch.Tensor], list[squad.SquadExample]]:
    """Featurized split (from the cache when nothing that shapes it has changed) and its questions. Split
    "train" or "dev" (--predict_file with its answers), or "predict" (the same file, answers not needed)."""
    source = run.train_file if split == "train" else run.predict_file
    examples = squad.read_squad(source, args.version_2_with_negative, need_answers=split != "predict")
    is_training = split == "train"
    cache_split = "train" if is_training else "dev"  # prediction windows are the evaluation ones (one cache)
    key = {
        "split": cache_split, "version_2_with_negative": args.version_2_with_negative,
        "max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride,
        "max_query_length": args.max_query_length, "tokenizer": tokenizer_identity(tokenizer),
        "source": file_identity(source), "featurizer": squad.FEATURIZER_VERSION,
    }

    def build() -> dict[str, torch.Tensor]:
        logger.info("Featurizing %d %s questions of %s", len(examples), cache_split, source)
        return squad.featurize(examples, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
                               is_training=is_training, verbose=args.verbose_logging)

    model_tag = os.path.basename(os.path.normpath(run.tokenizer_path))
    prefix = f"{cache_split}_{model_tag}_{args.max_seq_length}_{os.path.basename(source)}"
    features = load_and_cache_examples(ctx, os.path.dirname(os.path.abspath(source)), prefix, key, build,
                                       overwrite_cache=args.overwrite_cache)
    limit = {"train": args.max_train_samples, "dev": args.max_eval_samples}.get(split)  # the first N questions
    return first_examples(features, limit, "example_index"), examples[:limit]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


# ----------------------------------------------------------------------------------------------------------
# training


def encoder_remaining(model: Any) -> dict[str, Any]:
    """Remaining-weight fractions of the masked model: per matrix, per layer and for the whole encoder."""
    return masked.summarize_remaining(masked.remaining_weights(model), masked.encoder_layers_prefix(model))


class PruningStep:
    """The loss step of fine-pruning: sets the scheduled threshold (the global top-k cut, if any, recomputed every
    --global_topk_frequency_compute steps), then adds distillation from the teacher and the regularization of
    the scores. Its scalars are tensors, averaged over the logging window by the loop (no host sync here); the
    scheduled values themselves are logged by `on_log`, as they stand at the logging step."""

    def __init__(self, args: argparse.Namespace, run: Run, model: Any, teacher: Any) -> None:
        self.args, self.run, self.model, self.teacher = args, run, model, teacher
        self.global_topk = run.masked and args.global_topk

    def set_threshold(self, state: Any) -> tuple[float, float]:
        """The threshold and regularization weight of this step, applied to the model."""
        # The original counts steps from 1: step s uses the threshold of schedule(s).
        step = state.global_step + 1
        threshold, regu_lambda = self.run.schedule(step, state.total_steps)
        cut = None
        if self.global_topk:
            # Recomputed once per due step (not per micro-batch); kept in the train state so that a resumed run
            # uses the same cut as an uninterrupted one.
            due = step % self.args.global_topk_frequency_compute == 0 and state.extra.get("global_cut_step") != step
            if "global_cut" not in state.extra or due:
                state.extra["global_cut"] = masked.global_score_cut(self.model, threshold)
                state.extra["global_cut_step"] = step
            cut = state.extra["global_cut"]
        masked.set_threshold(self.model, threshold, cut)
        return threshold, regu_lambda

    def __call__(self, m: Any, batch: dict[str, torch.Tensor], state: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        args, run, scalars = self.args, self.run, {}
        regu_lambda = self.set_threshold(state)[1] if run.masked else 0.0
        inputs = model_inputs(batch)
        outputs = m(**inputs, start_positions=batch["start_positions"], end_positions=batch["end_positions"])
        loss = task_loss = outputs.loss
        if self.teacher is not None:
            with torch.no_grad():
                teacher_out = self.teacher(**inputs)
            distil = (soft_cross_entropy(outputs.start_logits, teacher_out.start_logits, args.temperature)
                      + soft_cross_entropy(outputs.end_logits, teacher_out.end_logits, args.temperature)) / 2
            loss = args.alpha_distil * distil + args.alpha_ce * task_loss
            scalars["loss_distil"] = distil.detach()
        if run.regularization is not None:
            regu = masked.regularization_term(self.model, run.regularization)
            loss = loss + regu_lambda * regu
            scalars["regularization"] = regu.detach()
        if self.teacher is not None or run.regularization is not None:
            scalars["loss_ce"] = task_loss.detach()
        return loss, scalars


def train_model(ctx: DistContext, args: argparse.Namespace, run: Run, model: Any, tokenizer: Any, teacher: Any,
                open_writer: Callable[[], Any]) -> dict[str, Any]:
    """Fine-prune (or fine-tune) in one stage; the mask scores get their own learning rate, no weight decay."""
    train_set, _ = load_features(ctx, args, run, tokenizer, "train")
    train_set = {k: v for k, v in train_set.items() if k in MODEL_INPUTS + LABELS}
    measured: dict[int, float] = {}

    def on_log(state: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        if run.masked:
            # The step just taken used the schedule's values at this step number (counted from 1).
            values["threshold"], regu_lambda = run.schedule(state.global_step, state.total_steps)
            if run.regularization is not None:
                values["regu_lambda"] = regu_lambda
            summary = encoder_remaining(model)
            values["remaining/encoder"] = summary["encoder"]["fraction"]
            values.update({f"remaining/layer_{int(k):02d}": v["fraction"] for k, v in summary["layers"].items()})
            measured[state.global_step] = summary["encoder"]["fraction"]
        if args.evaluate_during_training:
            metrics = evaluate(ctx, args, run, model, tokenizer, prefix=str(state.global_step))["metrics"]
            model.train()
            values.update({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        return values

    # A masked folder holds the pruned weights under the stock keys: stock from_pretrained gives the pruned model.
    save = model_saver(model, tokenizer, save_model=masked.save_masked_model if run.masked else None)
    overrides = [(lambda name: name.endswith("mask_scores"),
                  {"lr": args.mask_scores_learning_rate, "weight_decay": 0.0})]
    stage = Stage("checkpoint", PruningStep(args, run, model, teacher),
                  lambda: param_groups(model.named_parameters(), args.learning_rate, args.weight_decay, overrides),
                  on_log=on_log if (run.masked or args.evaluate_during_training) else None)
    cfg = TrainConfig.from_args(args, output_dir=run.output_dir)
    shortfall = None
    if run.masked:  # a run shorter than the schedule's holds would end short of --final_threshold, silently
        shortfall = run.schedule.shortfall(plan_for_examples(len(train_set["input_ids"]), cfg,
                                                             ctx.world_size).total_steps)
        if shortfall and ctx.is_main:
            logger.warning("Pruning schedule cut short: %s", shortfall)
    (result,) = train(ctx, cfg, model, [stage], train_set, save, tb_writer=open_writer(), resume_from=run.resume)
    summary: dict[str, Any] = {"train": result.__dict__, "teacher": run.teacher_path,
                               "num_examples": int(len(train_set["input_ids"]))}
    if run.masked:
        # The final model holds the end of the schedule (global top-k recomputed at the final threshold, as the
        # original's evaluation did).
        final, _ = run.schedule(result.global_step, result.global_step)
        cut = masked.global_score_cut(model, final) if args.global_topk else None
        masked.set_threshold(model, final, cut)
        summary["pruning"] = {**masked.pruning_state(model).to_json(), "regularization": run.regularization,
                              "global_topk": args.global_topk, "threshold_reached": final,
                              "final_threshold": args.final_threshold, "schedule_shortfall": shortfall}
        summary["remaining_encoder_fraction"] = encoder_remaining(model)["encoder"]["fraction"]
    save_final_model(ctx, save, run.output_dir)
    if ctx.is_main and run.masked:
        write_pruning_plots(run, model, result.global_step, measured)
    return summary


def write_pruning_plots(run: Run, model: Any, total_steps: int, measured: dict[int, float]) -> None:
    """remaining_weights.json/.png (per layer and matrix) and threshold_schedule.png (rank 0)."""
    summary = encoder_remaining(model)
    prefix = masked.encoder_layers_prefix(model)
    state = masked.pruning_state(model)
    method = state.method
    units = None
    if state.structure != "weights":  # heads and neurons kept per layer
        summary["units"] = shrink.kept_units(model)
        units = {i: f"{u['heads']}/{u['heads_total']} heads, {u['neurons']}/{u['neurons_total']} neurons"
                 for i, u in enumerate(summary["units"])}
    write_json_atomic(os.path.join(run.output_dir, "remaining_weights.json"), summary)
    grid: dict[int, dict[str, float]] = {}
    for name, info in summary["matrices"].items():
        layer = masked.layer_index(name, prefix)
        grid.setdefault(-1 if layer is None else layer, {})[masked.matrix_label(name, prefix)] = info["fraction"]
    for layer, info in summary["layers"].items():
        grid.setdefault(int(layer), {})["_layer"] = info["fraction"]
    how = method if units is None else f"{method}, {state.structure}"
    fig = visualize.plot_remaining_weights(grid, title=f"Remaining weights ({how}): "
                                           f"{100 * summary['encoder']['fraction']:.1f}% of the encoder's matrices",
                                           units=units)
    visualize.save(fig, os.path.join(run.output_dir, "remaining_weights.png"))
    steps = list(range(1, max(total_steps, 1) + 1))
    values = [run.schedule(s, max(total_steps, 1)) for s in steps]
    label = "fraction of weights kept" if method in masked.FRACTION_METHODS else "threshold"
    fig = visualize.plot_threshold_schedule(steps, [t for t, _ in values], label, [lam for _, lam in values],
                                            measured, title=f"Pruning schedule ({method})")
    visualize.save(fig, os.path.join(run.output_dir, "threshold_schedule.png"))


# ----------------------------------------------------------------------------------------------------------
# evaluation


def answer_questions(ctx: DistContext, args: argparse.Namespace, run: Run, model: Any, tokenizer: Any, split: str
                     ) -> tuple[list[squad.SquadExample], squad.Predictions | None, dict[str, Any]]:
    """The questions of --predict_file ("dev": with their answers, "predict": answers not needed), the logits of
    every window (gathered over ranks), and on rank 0 the answers (None on the others); sizes and wall time."""
    features, examples = load_features(ctx, args, run, tokenizer, split)
    inputs = {k: v for k, v in features.items() if k in MODEL_INPUTS}
    seq_len = args.max_seq_length
    model.eval()

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(**batch)
        pad = seq_len - batch["input_ids"].shape[1]
        keep = batch["attention_mask"].bool()
        # Padding positions (trimmed or not) get one fixed low logit, so that the answers do not depend on how
        # the windows were batched.
        return {name: F.pad(getattr(out, name).float().masked_fill(~keep, PAD_LOGIT), (0, pad), value=PAD_LOGIT)
                for name in ("start_logits", "end_logits")}

    desc = f"{'eval' if split == 'dev' else split} {os.path.basename(run.predict_file)}"
    logits, seconds = predict(ctx, inputs, args.per_gpu_eval_batch_size, step, args.dynamic_padding, desc=desc,
                              fp16=args.fp16, bf16=args.bf16)
    info: dict[str, Any] = {"num_examples": len(examples), "num_features": int(len(inputs["input_ids"])),
                            "seconds": seconds}
    preds = None
    if ctx.is_main:
        meta = {k: features[k].numpy() for k in ("example_index", "offsets", "max_context")}
        preds = squad.postprocess(examples, meta, logits["start_logits"], logits["end_logits"], args.n_best_size,
                                  args.max_answer_length, args.version_2_with_negative,
                                  args.null_score_diff_threshold)
    return examples, preds, info


def evaluate(ctx: DistContext, args: argparse.Namespace, run: Run, model: Any, tokenizer: Any,
             prefix: str = "") -> dict[str, Any]:
    """Answers of the --predict_file questions, prediction files and the official scores."""
    examples, preds, info = answer_questions(ctx, args, run, model, tokenizer, "dev")
    result: dict[str, Any] = {**info, "prefix": prefix}
    metrics = None
    if ctx.is_main:
        result["files"] = squad.write_predictions(run.output_dir, prefix, preds, args.version_2_with_negative)
        metrics = squad.squad_evaluate(examples, preds, args.version_2_with_negative)
    result["metrics"] = broadcast_object(metrics, ctx)
    if masked.is_masked(model):
        result["remaining_encoder_fraction"] = encoder_remaining(model)["encoder"]["fraction"]
    logger.info("Evaluation %s: %s (%d questions, %d windows, %.1fs)", prefix or "final",
                {k: round(v, 3) if isinstance(v, float) else v for k, v in result["metrics"].items()},
                len(examples), result["num_features"], result["seconds"])
    return result


def predict_answers(ctx: DistContext, args: argparse.Namespace, run: Run, model: Any, tokenizer: Any
                    ) -> dict[str, Any]:
    """--do_predict: the answer of every --predict_file question (gold answers not needed) into SQuAD's
    submission file predictions.json, with nbest_predictions.json (and null_odds.json for v2.0); no scores."""
    _, preds, info = answer_questions(ctx, args, run, model, tokenizer, "predict")
    if ctx.is_main:
        info["files"] = squad.write_predictions(run.output_dir, None, preds, args.version_2_with_negative)
        logger.info("Wrote the answers of %d questions to %s", info["num_examples"], info["files"][0])
    return info


def write_run_outputs(args: argparse.Namespace, run: Run, results: dict[str, Any], ctx: DistContext) -> None:
    """train_results.json / all_results.json (flat Hugging Face keys) and, after training, the model card
    (rank 0 only)."""
    if not ctx.is_main:
        return
    train = results.get("train")
    train_flat = None if train is None else train_metrics([train["train"]], train["num_examples"])
    eval_flat: dict[str, Any] = {}
    if "eval" in results:
        ev = results["eval"]
        eval_flat = {**flat_metrics("eval_", ev["metrics"]), "eval_samples": ev["num_examples"],
                     "eval_runtime": ev["seconds"]}
        if "remaining_encoder_fraction" in ev:
            eval_flat["eval_remaining_encoder_fraction"] = ev["remaining_encoder_fraction"]
    write_run_results(run.output_dir, train_flat, eval_flat)
    if train is None:
        return
    key_metrics = ("eval_exact", "eval_f1", "eval_remaining_encoder_fraction")
    metrics = {k: v for k, v in eval_flat.items() if k in key_metrics}
    version = "v2.0" if args.version_2_with_negative else "v1.1"
    if run.masked:
        pruning = train["pruning"]
        kept = encoder_remaining_of(results)
        method = {"method": f"movement pruning ({pruning['method']})", "base model": run.model_path,
                  "data": f"SQuAD {version}",
                  "threshold schedule": f"{args.initial_threshold} -> {pruning['threshold']}",
                  "final sparsity (encoder weights removed)": None if kept is None else f"{100 * (1 - kept):.1f}%",
                  "regularization": pruning["regularization"] or "none", "global top-k": pruning["global_topk"]}
        summary = (f"A question-answering model movement-pruned from `{run.model_path}` on SQuAD {version}. Its "
                   "stock weights are the pruned ones (masks multiplied in); the unpruned weights and the mask "
                   "scores are stored beside them for this project's tools.")
        load = f"""from transformers import AutoModelForQuestionAnswering, AutoTokenizer

# The pruned model (stock transformers reports the extra unpruned_weight / mask_scores keys and ignores them).
model = AutoModelForQuestionAnswering.from_pretrained("{run.output_dir}")
tokenizer = AutoTokenizer.from_pretrained("{run.output_dir}")"""
        notes = [f"`python scripts/bertarize.py --model_name_or_path {run.output_dir} --target_model_path <dir>` "
                 "writes a plain stock checkpoint without the extra tensors (and `--compact_path` a sparse copy).",
                 f"`python scripts/count_parameters.py --serialization_dir {run.output_dir}` counts the weights left "
                 "per matrix and layer."]
        if pruning.get("structure", "weights") != "weights":
            method["pruning structure"] = pruning["structure"]
            notes.append(f"`python scripts/bertarize.py --model_name_or_path {run.output_dir} --target_model_path "
                         "<dir> --shrink` removes the emptied heads and neurons (a smaller, faster model; load it with "
                         "`common.models.shrink.load_shrunk_model(<dir>)`).")
    else:
        method = {"method": "dense fine-tuning (no pruning)", "base model": run.model_path, "data": f"SQuAD {version}"}
        summary = f"A question-answering model fine-tuned densely from `{run.model_path}` on SQuAD {version}."
        load = f"""from transformers import AutoModelForQuestionAnswering, AutoTokenizer

model = AutoModelForQuestionAnswering.from_pretrained("{run.output_dir}")
tokenizer = AutoTokenizer.from_pretrained("{run.output_dir}")"""
        notes = []
    method.update({"teacher (distillation)": run.teacher_path or "none", "learning rate": args.learning_rate,
                   "steps": train["train"]["global_step"], "training windows": train["num_examples"]})
    if run.teacher_path:
        method["loss weights"] = f"alpha_ce {args.alpha_ce}, alpha_distil {args.alpha_distil}, T {args.temperature}"
    write_model_card(run.output_dir, f"{'Movement-pruned' if run.masked else 'Fine-tuned'} SQuAD {version} model",
                     summary, method, metrics or None, load, notes)


def encoder_remaining_of(results: dict[str, Any]) -> float | None:
    """The remaining fraction of the encoder's weights, as evaluated (or as trained, without evaluation)."""
    if "remaining_encoder_fraction" in results.get("eval", {}):
        return results["eval"]["remaining_encoder_fraction"]
    return results["train"].get("remaining_encoder_fraction")


def write_results(run: Run, results: dict[str, Any], ctx: DistContext) -> None:
    """eval_results.json and the original's eval_results.txt (`key = value` lines) (rank 0 only)."""
    if not ctx.is_main:
        return
    write_json_atomic(os.path.join(run.output_dir, "eval_results.json"), results)
    lines = [f"{k} = {v}" for k, v in sorted(results["eval"]["metrics"].items())]
    for name, res in results.get("checkpoints", {}).items():
        lines += [f"{k}_{res['prefix']} = {v}" for k, v in sorted(res["metrics"].items())]
    write_text_atomic(os.path.join(run.output_dir, "eval_results.txt"), "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with script_context(args, argv, resolve_run) as (session, run):
        ctx = session.ctx
        logger.info("Model %s, data %s / %s, output %s, %s, %d process(es) on %s", run.model_path, run.train_file,
                    run.predict_file, run.output_dir,
                    f"pruning {args.pruning_method}" if run.masked else "dense fine-tuning", ctx.world_size,
                    ctx.device)
        results: dict[str, Any] = {"model": run.model_path, "masked": run.masked,
                                   "version_2_with_negative": args.version_2_with_negative}
        eval_path = run.model_path
        if args.do_train:
            source = run.resume or run.model_path
            model = load_student(source, args, run).to(ctx.device)
            tokenizer = load_tokenizer(run.resume or run.tokenizer_path, args)
            teacher = load_teacher(args, run, model, ctx.device)
            results["train"] = train_model(ctx, args, run, model, tokenizer, teacher, session.writer)
            eval_path = run.output_dir
        if args.do_eval or args.do_predict:
            model = load_model(eval_path, args, run.model_type).to(ctx.device)
            if not args.do_train and not has_qa_head(eval_path):
                logger.warning("%s has no question-answering head: its qa_outputs layer is random, expect scores "
                               "near zero", eval_path)
            tokenizer = load_tokenizer(eval_path if args.do_train else run.tokenizer_path, args)
        if args.do_eval:
            results["eval"] = evaluate(ctx, args, run, model, tokenizer)
            if args.eval_all_checkpoints:
                results["checkpoints"] = evaluate_checkpoints(run.output_dir, lambda ckpt: evaluate(
                    ctx, args, run, load_model(ckpt, args, run.model_type).to(ctx.device), tokenizer,
                    prefix=str(read_checkpoint_state(ckpt).global_step)))
            write_results(run, results, ctx)
            logger.info("***** %s *****", results["eval"]["metrics"])
        if args.do_predict:
            results["predict"] = predict_answers(ctx, args, run, model, tokenizer)
        write_run_outputs(args, run, results, ctx)
        return results


if __name__ == "__main__":
    exit_with(run_cli(main))
