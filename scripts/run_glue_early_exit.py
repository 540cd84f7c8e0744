#!/usr/bin/env python
"""DeeBERT / PABEE: dynamic early exiting for BERT-style encoders on every GLUE task.

An off-ramp classifier reads the hidden state after each encoder layer. Training (--training_scheme) has
DeeBERT's two stages, (1) the backbone and its final classifier as ordinary fine-tuning, (2) the backbone
frozen and the off-ramps trained; or PABEE's one joint stage, the backbone and every exit trained together on
sum_i i * loss_i / sum_i i. Off-ramps may also learn the final head's softened predictions
(--self_distillation, FastBERT). At inference a row leaves at the first off-ramp whose prediction is confident
enough: its entropy is below --early_exit_entropy (DeeBERT), or --patience off-ramps in a row agree (PABEE).
Rows leave the batch as they exit, so early exit saves compute at every batch size. --max_metric_drop D picks
the most aggressive threshold that costs at most D of the task's metric on rows held out of the training data,
saves it with the model, and later evaluation-only runs use it.

    python scripts/run_glue_early_exit.py --do_train --do_eval            # built-in demo, no download
    python scripts/run_glue_early_exit.py --model_type bert --model_name_or_path bert-base-uncased \\
        --task_name sst-2 --data_dir glue_data/SST-2 --output_dir runs/sst2 --do_train --do_eval \\
        --eval_each_highway --early_exit_entropy 0 0.1 0.2 0.3 0.4 0.5
    python scripts/run_glue_early_exit.py ...same flags... --training_scheme joint --max_metric_drop 0.01
    torchrun --nproc_per_node=4 scripts/run_glue_early_exit.py ...same flags...

Writes into --output_dir: the model (a stock transformers checkpoint plus off_ramps.safetensors; held_out.json
says which training rows it never saw),
eval_results.json / eval_results.txt, early_exit.json (with --max_metric_drop), early_exit_sweep.json,
metric_per_layer.png, early_exit_sweep.png, log_history.jsonl, TensorBoard events under runs/,
checkpoint-stage{1,2}-NNNNNN/ (two_stage) or checkpoint-joint-NNNNNN/ (joint) folders and run_args.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from common.args import (
    add_distributed_args, add_model_args, add_run_args, add_training_args, answering_help, check_output_dir,
    check_run_args, parse_with_builtin_defaults, raise_if_problems, script_parser,
)
from common.data.glue_tasks import TASKS
from common.models.pooling import MEAN, POOLINGS
from common.errors import UserError, exit_with, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import numpy as np
    import torch
    from transformers import AutoConfig

    from common import visualize
    from common.builtin import glue as builtin
    from common.caching import file_identity, first_examples, load_and_cache_examples, tokenizer_identity
    from common.checkpoint import resolve_resume_path
    from common.cli import build_on_main, evaluate_checkpoints, save_final_model, script_context
    from common.data import glue
    from common.data.glue import eval_tasks
    from common.distributed import DistContext, barrier
    from common.early_exit import CHOSEN_THRESHOLD, choose_rule, load_choice, rule_from_choice, save_choice
    from common.io import remove_path, write_json_atomic, write_text_atomic
    from common.model_card import write_model_card
    from common.results import flat_metrics, train_metrics, write_run_results
    from common.loaders import load_tokenizer as load_fast_tokenizer
    from common.loaders import model_saver
    from common.models.highway import (
        HEAD, JOINT, JOINT_STAGE, OFF_RAMPS, STAGE1, STAGE2, EarlyExitModel, EntropyExit, ExitRule, PatienceExit,
        SelfDistillation,
    )
    from common.pretrained import check_model_folder
    from common.training import Stage, TrainConfig, TrainResult, param_groups, predict, train

logger = logging.getLogger("run_glue_early_exit")

MODEL_TYPES = ("bert", "roberta")
DEFAULT_ENTROPY_SWEEP = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_PATIENCE_SWEEP = (1, 2, 3, 4)
HELD_OUT = "held_out.json"  # in every checkpoint and the final model: the training rows kept out of training


# The built-in demo trains a tiny BERT from scratch: it needs a larger learning rate and more epochs than
# fine-tuning a pretrained model. These replace the defaults only for flags the user did not give.
BUILTIN_DEFAULTS = {
    "learning_rate": 5e-4, "num_train_epochs": 5.0, "warmup_steps": 50, "per_gpu_train_batch_size": 32,
    "per_gpu_eval_batch_size": 64, "max_seq_length": 48, "eval_each_highway": True, "eval_highway": True,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add_model_args(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--task_name", default=None, help="GLUE task: " + ", ".join(TASKS))
    g.add_argument("--data_dir", default=None, help="Folder with the task's GLUE .tsv files.")
    g.add_argument("--max_seq_length", default=128, type=int, help="Longest tokenized input; longer is cut.")
    add_training_args(parser)
    add_distributed_args(parser)
    g = add_run_args(parser, "DeeBERT", "Train both stages.", "Evaluate on the dev set.",
                     "Evaluate the final classifier at every logging step of stage one.",
                     predict_help="Predict the unlabelled test set (test.tsv; MNLI: test_matched.tsv and "
                                  "test_mismatched.tsv) into predict_results_<task>.txt: with the final head, or "
                                  "with early exit when a single --early_exit_entropy or --patience is given.")
    g.add_argument("--eval_after_first_stage", action="store_true",
                   help="Evaluate the final classifier between the two training stages.")
    g.add_argument("--off_ramp_learning_rate", type=float, default=None,
                   help="Learning rate of the off-ramps: stage two's (on the frozen backbone), or theirs within "
                        "the joint stage; default: --learning_rate. Fresh heads often need a larger one than "
                        "fine-tuning.")
    g.add_argument("--off_ramp_pooling", choices=POOLINGS, default=None,
                   help="What a new off-ramp reads: first_token (DeeBERT's highway: the first token through a tanh "
                        "dense layer, then a classifier) or mean (the mean of the real tokens, then a classifier: "
                        "for sentence encoders such as all-MiniLM-L6-v2, and cheaper per layer). Default: "
                        "first_token, or what the model's saved off-ramps use.")
    g.add_argument("--training_scheme", choices=("two_stage", "joint"), default="two_stage",
                   help="two_stage (DeeBERT): backbone + head, then the off-ramps on the frozen backbone. joint "
                        "(PABEE): one stage, backbone and every exit trained together on sum_i i * loss_i / sum_i i.")
    g.add_argument("--self_distillation", action="store_true",
                   help="Off-ramps also learn the final head's softened predictions (FastBERT).")
    g.add_argument("--self_distillation_weight", type=float, default=0.5,
                   help="With --self_distillation: an off-ramp's loss is (1 - w) * its task loss + w * its KL "
                        "to the head's softened prediction (squared error on regression); 1 is FastBERT's.")
    g.add_argument("--self_distillation_temperature", type=float, default=1.0,
                   help="With --self_distillation: softmax temperature of both distributions.")
    g.add_argument("--max_metric_drop", type=float, default=None,
                   help="Choose the most aggressive early-exit threshold whose metric (the task's primary one) "
                        "is at most this far below the full model's (0.01: one point), on --calibration_examples "
                        "rows held out of the training data; saved as early_exit.json with the model and used "
                        "by later evaluation-only runs that give no threshold.")
    g.add_argument("--calibration_examples", type=int, default=500,
                   help="With --max_metric_drop: training rows held out (drawn with --seed) to choose on; a "
                        "training run does not train on them.")
    g.add_argument("--calibration_rule", choices=("entropy", "patience"), default=None,
                   help="With --max_metric_drop: which threshold to choose (default: entropy; patience on "
                        "regression tasks).")
    g.add_argument("--eval_each_highway", action="store_true",
                   help="Report the metric of every exit (off-ramp) layer.")
    g.add_argument("--eval_highway", action="store_true",
                   help="Evaluate with early exit (thresholds from --early_exit_entropy / --patience, or a "
                        "default entropy sweep when neither is given).")
    g.add_argument("--early_exit_entropy", nargs="+", type=float, default=None,
                   help="Entropy threshold(s); several values are swept in one run. -1 (the original's "
                        "default) means no entropy exit.")
    g.add_argument("--patience", nargs="+", type=int, default=None,
                   help="PABEE patience value(s): exit once this many consecutive off-ramps agree.")
    g.add_argument("--regression_threshold", type=float, default=0.1,
                   help="PABEE on regression tasks: predictions closer than this count as agreeing.")
    g.add_argument("--plot_data_dir", default=None,
                   help="Where the sweep JSON and plots go (default: --output_dir).")
    return parse_with_builtin_defaults(parser, argv, BUILTIN_DEFAULTS)


@dataclass(frozen=True)
class Run:
    """Resolved inputs of this run (what the flags point at once the built-in default is filled in)."""

    task: str
    data_dir: str
    model_path: str
    tokenizer_path: str
    output_dir: str
    plot_dir: str
    builtin: bool
    resume: str | None
    rules: tuple[ExitRule, ...]


def exit_rules(args: argparse.Namespace, regression: bool) -> tuple[tuple[ExitRule, ...], list[str]]:
    """The early-exit rules to evaluate, and problems with the threshold flags."""
    problems: list[str] = []
    entropies = [e for e in (args.early_exit_entropy or []) if e != -1]
    for e in entropies:
        if not np.isfinite(e) or e < 0:
            problems.append(f"--early_exit_entropy {e}: an entropy threshold must be >= 0 (or -1 for none)")
    for p in args.patience or []:
        if p < 0:
            problems.append(f"--patience {p}: patience must be >= 0 (0 means never exit)")
    if regression and entropies:
        problems.append(f"--early_exit_entropy has no meaning on the regression task {args.task_name}; "
                        "use --patience (PABEE) instead")
    if args.regression_threshold <= 0:
        problems.append("--regression_threshold must be positive")
    patiences = list(args.patience or [])
    if args.eval_highway and not entropies and not patiences:
        # --eval_highway alone: a default sweep (patience on regression tasks, where entropy has no meaning).
        if regression:
            patiences = list(DEFAULT_PATIENCE_SWEEP)
        else:
            entropies = list(DEFAULT_ENTROPY_SWEEP)
    rules: list[ExitRule] = [EntropyExit(float(e)) for e in dict.fromkeys(entropies)]
    rules += [PatienceExit(p, regression, args.regression_threshold) for p in dict.fromkeys(patiences)]
    return tuple(rules), problems


def training_problems(args: argparse.Namespace, regression: bool) -> list[str]:
    """Problems with the training-scheme, self-distillation and threshold-choice flags."""
    problems = []
    if not 0 <= args.self_distillation_weight <= 1:
        problems.append(f"--self_distillation_weight must be between 0 and 1 (got {args.self_distillation_weight})")
    if not args.self_distillation_temperature > 0:
        problems.append("--self_distillation_temperature must be positive (got "
                        f"{args.self_distillation_temperature})")
    if args.max_metric_drop is not None and not (np.isfinite(args.max_metric_drop) and args.max_metric_drop >= 0):
        problems.append(f"--max_metric_drop must be a number >= 0 (got {args.max_metric_drop}; 0.01 is one point)")
    if args.calibration_examples < 1:
        problems.append(f"--calibration_examples must be at least 1 (got {args.calibration_examples})")
    if regression and args.calibration_rule == "entropy":
        problems.append("--calibration_rule entropy has no meaning on a regression task; use patience")
    if args.eval_after_first_stage and args.training_scheme == "joint":
        problems.append("--eval_after_first_stage needs --training_scheme two_stage (joint training has one stage)")
    return problems


def resolve_run(args: argparse.Namespace, ctx: DistContext) -> Run:
    """Validate the flags (every problem in one error) and fill in the built-in default."""
    problems = check_run_args(args, ctx.device)
    use_builtin = args.model_name_or_path is None and args.data_dir is None
    task = "sst-2" if use_builtin and args.task_name is None else args.task_name
    if task is None:
        problems.append("--task_name is required with --data_dir (one of " + ", ".join(glue.TASKS) + ")")
    else:
        try:
            task = glue.canonical_task_name(task)
        except UserError as err:
            problems.append(str(err))
    if args.model_type is not None and args.model_type not in MODEL_TYPES:
        problems.append(f"--model_type {args.model_type} is not supported; choose one of {', '.join(MODEL_TYPES)}")
    if args.off_ramp_learning_rate is not None and not args.off_ramp_learning_rate > 0:
        problems.append(f"--off_ramp_learning_rate must be a positive number (got {args.off_ramp_learning_rate})")
    if args.max_seq_length < 8:
        problems.append(f"--max_seq_length {args.max_seq_length} is too short (at least 8)")
    regression = task in glue.TASKS and glue.get_task(task).output_mode == "regression"
    problems += training_problems(args, regression)
    rules, rule_problems = exit_rules(args, regression)
    problems += rule_problems
    output_dir = args.output_dir or os.path.join("runs", "glue_early_exit")
    problems += check_output_dir(output_dir, args.do_train, args.overwrite_output_dir, args.resume_from_checkpoint)
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        problems.append(f"--data_dir {args.data_dir} does not exist; point it at the folder holding the task's "
                        ".tsv files (e.g. glue_data/SST-2)")
    elif args.data_dir is not None and not os.listdir(args.data_dir):
        problems.append(f"--data_dir {args.data_dir} is empty; it should hold the task's train.tsv / dev.tsv")
    raise_if_problems(problems)
    # Every rank has checked the output folder before rank 0 writes anything into it.
    barrier()
    if args.fp16_opt_level:
        logger.warning("--fp16_opt_level %s ignored: torch.amp has no apex opt levels", args.fp16_opt_level)

    resume = resolve_resume_path(args.resume_from_checkpoint, output_dir) if args.do_train else None
    if use_builtin:
        base = os.path.join(output_dir, "builtin")
        build_on_main(ctx, lambda: (builtin.write_builtin_sst2(os.path.join(base, "data")),
                                    builtin.write_builtin_bert(os.path.join(base, "model"))))
        data_dir, model_path = os.path.join(base, "data", "SST-2"), os.path.join(base, "model")
        logger.warning("No --model_name_or_path/--data_dir: running the built-in demo (a tiny 6-layer BERT "
                       "built from a config, generated SST-2-format sentiment data) in %s", base)
    else:
        data_dir, model_path = args.data_dir, args.model_name_or_path
    if not args.do_train and args.output_dir is None and not use_builtin:
        # Evaluation only: the model folder is where results belong when no --output_dir is given.
        output_dir = model_path if os.path.isdir(model_path) else output_dir
    plot_dir = args.plot_data_dir or output_dir
    given = args.early_exit_entropy is not None or args.patience is not None  # -1 too: "no entropy exit"
    if not args.do_train and not given and args.max_metric_drop is None and os.path.isdir(model_path):
        choice = load_choice(model_path)
        if choice is not None:
            rules = (rule_from_choice(choice, regression, args.regression_threshold),)
            logger.info("Early exit with the threshold saved with the model: %s (chosen for a drop of at most %s "
                        "on %s held-out training rows; give --early_exit_entropy / --patience to override)",
                        rules[0].label, choice.get("max_metric_drop"), choice.get("calibration_examples"))
    return Run(task=task, data_dir=data_dir, model_path=model_path,
               tokenizer_path=args.tokenizer_name or model_path, output_dir=output_dir, plot_dir=plot_dir,
               builtin=use_builtin, resume=resume, rules=rules)


# ----------------------------------------------------------------------------------------------------------
# model and data


def load_model(path: str, args: argparse.Namespace, task: str, for_training: bool = False) -> EarlyExitModel:
    """The stock classifier (with off-ramps when the folder has them), checked against --model_type.

    For training, a classifier head of another size (a checkpoint fine-tuned on another task) is replaced by
    a fresh one, as fine-tuning expects; for evaluation that mismatch is an error."""
    check_model_folder(path)
    spec = glue.get_task(task)
    config_path = args.config_name or path
    try:
        config = AutoConfig.from_pretrained(config_path, cache_dir=args.cache_dir or None)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from {config_path}: {err}".splitlines()[0]) from None
    if args.model_type and config.model_type != args.model_type:
        raise UserError(f"--model_type {args.model_type} does not match the checkpoint {path}, which is a "
                        f"{config.model_type} model; drop --model_type or pass --model_type {config.model_type}")
    if config.model_type not in MODEL_TYPES:
        raise UserError(f"{path} holds a {config.model_type} model; early exit supports {', '.join(MODEL_TYPES)}")
    num_labels = glue.num_labels(task)
    labels = spec.labels if spec.output_mode == "classification" else ["score"]
    config.num_labels = num_labels
    config.id2label = {i: str(label) for i, label in enumerate(labels)}
    config.label2id = {str(label): i for i, label in enumerate(labels)}
    config.finetuning_task = task
    config.problem_type = "regression" if spec.output_mode == "regression" else "single_label_classification"
    try:
        return EarlyExitModel.from_pretrained(path, pooling=args.off_ramp_pooling, config=config,
                                              cache_dir=args.cache_dir or None, ignore_mismatched_sizes=for_training)
    except (OSError, RuntimeError) as err:
        first = str(err).splitlines()[0]
        if "mismatched" in first:
            first = (f"its classifier does not fit the {num_labels} label(s) of {task}; evaluate it on the task it "
                     "was trained for")
        raise UserError(f"cannot load the model from {path}: {first}") from None


def load_tokenizer(path: str, args: argparse.Namespace) -> Any:
    return load_fast_tokenizer(path, args.cache_dir, args.do_lower_case, "features need a fast tokenizer")


def load_features(ctx: DistContext, args: argparse.Namespace, run: Run, tokenizer: Any, eval_task: str,
                  split: str) -> dict[str, torch.Tensor]:
    """Featurized split, from the cache when nothing that shapes it has changed."""
    spec = glue.get_task(eval_task)
    source = os.path.join(run.data_dir, spec.file_for(split))
    if not os.path.isfile(source):
        needs = (f"{spec.test_file}, the unlabelled test set of {eval_task}, for --do_predict" if split == "test"
                 else f"{spec.train_file} and {spec.dev_file} for {eval_task}")
        raise UserError(f"{source} not found: --data_dir should hold {needs}")
    key = {
        "task": eval_task, "split": split, "max_seq_length": args.max_seq_length,
        "tokenizer": tokenizer_identity(tokenizer), "source": file_identity(source), "featurizer": 1,
    }

    def build() -> dict[str, torch.Tensor]:
        examples = glue.read_examples(eval_task, run.data_dir, split)
        logger.info("Featurizing %d %s examples of %s", len(examples), split, eval_task)
        return glue.featurize(examples, tokenizer, eval_task, args.max_seq_length)

    model_tag = os.path.basename(os.path.normpath(run.tokenizer_path))
    features = load_and_cache_examples(ctx, run.data_dir, f"{split}_{model_tag}_{args.max_seq_length}_{eval_task}",
                                       key, build, overwrite_cache=args.overwrite_cache)
    return first_examples(features, {"train": args.max_train_samples, "dev": args.max_eval_samples}.get(split))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


# ----------------------------------------------------------------------------------------------------------
# training


def training_rows(ctx: DistContext, args: argparse.Namespace, run: Run, tokenizer: Any
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The featurized training set, and with --max_metric_drop the calibration slice held out of it."""
    train_set = load_features(ctx, args, run, tokenizer, run.task, "train")
    if args.max_metric_drop is None:
        return train_set, None
    return glue.split_calibration(train_set, args.calibration_examples, args.seed)


def train_stages(ctx: DistContext, args: argparse.Namespace, run: Run, model: EarlyExitModel, tokenizer: Any,
                 train_set: dict[str, torch.Tensor], open_writer: Callable[[], Any]) -> dict[str, Any]:
    """--training_scheme two_stage (DeeBERT): (1) backbone and final classifier, (2) the off-ramps on the frozen
    backbone; joint (PABEE): one stage, everything on the weighted loss of every exit. The off-ramps learn at
    --off_ramp_learning_rate in both. A resumed run continues in the stage its checkpoint belongs to."""
    held_out = held_out_rows(args)
    check_held_out(run.resume, held_out)
    save_model = model_saver(model, tokenizer)

    def save(folder: str) -> None:
        save_model(folder)
        write_json_atomic(os.path.join(folder, HELD_OUT), held_out)

    summary: dict[str, Any] = {"num_examples": int(len(train_set["labels"])), "scheme": args.training_scheme,
                               "off_ramp_pooling": model.pooling}
    distill = SelfDistillation(args.self_distillation_weight if args.self_distillation else 0.0,
                               args.self_distillation_temperature)
    off_ramp_lr = args.off_ramp_learning_rate or args.learning_rate

    def evaluate_now(state: Any) -> dict[str, float]:
        metrics = evaluate_final_head(ctx, args, run, model, tokenizer)
        model.train()
        return {f"eval_{k}": v for k, v in metrics.items()}

    def stage_one_done(result: TrainResult) -> None:
        summary["stage1"] = result.__dict__
        if args.eval_after_first_stage:
            summary["after_first_stage"] = evaluate_final_head(ctx, args, run, model, tokenizer)
            logger.info("After stage one: %s", summary["after_first_stage"])

    def groups(learning_rate: float) -> Callable[[], list[dict[str, Any]]]:
        off_ramps = [(lambda name: name.startswith("off_ramps."), {"lr": off_ramp_lr})]
        return lambda: param_groups(model.named_parameters(), learning_rate, args.weight_decay, off_ramps)

    def loss_step(objective: str) -> Callable[[Any, dict, Any], torch.Tensor]:
        return lambda m, batch, state: m(**batch, objective=objective, distill=distill)["loss"]

    def done(key: str) -> Callable[[TrainResult], None]:
        return lambda result: summary.__setitem__(key, result.__dict__)

    during = evaluate_now if args.evaluate_during_training else None
    if args.training_scheme == "joint":
        stages = [Stage(JOINT_STAGE, loss_step(JOINT), groups(args.learning_rate), enter=lambda: model.set_stage(JOINT),
                        on_log=during, on_end=done("joint"), tb_prefix="joint/")]
    else:
        stages = [
            Stage(STAGE1, loss_step(HEAD), groups(args.learning_rate), enter=lambda: model.set_stage(HEAD),
                  on_log=during, on_end=stage_one_done, tb_prefix="stage1/"),
            Stage(STAGE2, loss_step(OFF_RAMPS), groups(off_ramp_lr), enter=lambda: model.set_stage(OFF_RAMPS),
                  on_end=done("stage2"), tb_prefix="stage2/"),
        ]
    train(ctx, TrainConfig.from_args(args, output_dir=run.output_dir), model, stages, train_set, save,
          tb_writer=open_writer(), resume_from=run.resume)
    model.set_stage(None)
    save_final_model(ctx, save, run.output_dir)
    if ctx.is_main and args.max_metric_drop is None:
        remove_path(os.path.join(run.output_dir, CHOSEN_THRESHOLD))  # chosen for weights this run replaced
    return summary


def held_out_rows(args: argparse.Namespace) -> dict[str, Any]:
    """Which training rows this run keeps out of training (--max_metric_drop's calibration slice), saved in
    every checkpoint and the final model."""
    if args.max_metric_drop is None:
        return {"calibration_examples": 0}
    return {"calibration_examples": args.calibration_examples, "seed": args.seed}


def check_held_out(resume: str | None, held_out: dict[str, Any]) -> None:
    """A resume must hold out the rows the checkpoint's training held out: other ones would put trained-on rows
    in the calibration slice (an optimistic threshold), or train on rows the choice then treats as unseen."""
    if resume is None:
        return
    path = os.path.join(resume, HELD_OUT)
    before = {"calibration_examples": 0}  # checkpoints from before this file trained on every row
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is damaged ({err}): resume from another checkpoint") from None
    if before != held_out:
        def describe(rows: dict[str, Any]) -> str:
            if not rows["calibration_examples"]:
                return "no rows (no --max_metric_drop)"
            return f"--calibration_examples {rows['calibration_examples']} with --seed {rows['seed']}"
        raise UserError(f"{resume} was trained holding out {describe(before)}; this run would hold out "
                        f"{describe(held_out)}. Resume with the same --max_metric_drop / --calibration_examples "
                        "/ --seed")


def every_exit_logits(ctx: DistContext, args: argparse.Namespace, model: EarlyExitModel,
                      data: dict[str, torch.Tensor], desc: str) -> np.ndarray:
    """Logits of every exit for every row, [rows, layers, labels], from one full forward per batch."""
    out, _ = predict(ctx, data, args.per_gpu_eval_batch_size,
                     lambda b: {"logits": model.all_exit_logits(**model_inputs(b)).transpose(0, 1)},
                     args.dynamic_padding, desc=desc, fp16=args.fp16, bf16=args.bf16)
    return out["logits"]


def choose_threshold(ctx: DistContext, args: argparse.Namespace, run: Run, model: EarlyExitModel,
                     calibration: dict[str, torch.Tensor]) -> tuple[dict[str, Any], ExitRule]:
    """--max_metric_drop: the most aggressive threshold within the budget on the calibration slice (rows held
    out of the training data; the dev set is never read), saved as early_exit.json in the output folder."""
    if not model.off_ramps_trained:
        raise UserError(f"{run.model_path} has no trained off-ramps; train them (--do_train) before "
                        "--max_metric_drop")
    model.eval()
    spec = glue.get_task(run.task)
    kind = args.calibration_rule or ("patience" if spec.is_regression else "entropy")
    every = torch.from_numpy(every_exit_logits(ctx, args, model, calibration, "calibration")).transpose(0, 1)
    labels = calibration["labels"].numpy()
    primary = glue.primary_metric(run.task)

    def metric(logits: torch.Tensor) -> float:
        return glue.compute_metrics(run.task, predictions(run.task, logits.numpy()), labels)[primary]

    choice = choose_rule(kind, every, metric, args.max_metric_drop, spec.is_regression, args.regression_threshold)
    choice.update({"metric": primary, "calibration_seed": args.seed, "source": "rows held out of the training data"})
    rule = rule_from_choice(choice, spec.is_regression, args.regression_threshold)
    logger.info("Chosen for a drop of at most %g in %s: %s (on %d held-out training rows: %s %.4f vs %.4f for the "
                "full model, average exit layer %.2f of %d)", args.max_metric_drop, primary, rule.label,
                choice["calibration_examples"], primary, choice["calibration_metric"], choice["full_model_metric"],
                choice["avg_exit_layer"], choice["num_layers"])
    if ctx.is_main:
        os.makedirs(run.output_dir, exist_ok=True)
        logger.info("Saved the choice to %s", save_choice(run.output_dir, choice))
    return choice, rule


# ----------------------------------------------------------------------------------------------------------
# evaluation


def predictions(task: str, logits: np.ndarray) -> np.ndarray:
    return logits[..., 0] if glue.get_task(task).output_mode == "regression" else logits.argmax(-1)


def evaluate_final_head(ctx: DistContext, args: argparse.Namespace, run: Run, model: EarlyExitModel,
                        tokenizer: Any) -> dict[str, float]:
    model.eval()
    out = {}
    for eval_task in eval_tasks(run.task):
        dev = load_features(ctx, args, run, tokenizer, eval_task, "dev")
        outputs, _ = predict(ctx, dev, args.per_gpu_eval_batch_size,
                             lambda b: {"logits": model.backbone(**model_inputs(b)).logits,
                                        "labels": b["labels"]},
                             args.dynamic_padding, desc=f"eval {eval_task}")
        metrics = glue.compute_metrics(eval_task, predictions(eval_task, outputs["logits"]), outputs["labels"])
        out.update({(k if eval_task != "mnli-mm" else f"mm_{k}"): v for k, v in metrics.items()})
    return out


def exit_outputs(ctx: DistContext, args: argparse.Namespace, model: EarlyExitModel, data: dict[str, torch.Tensor],
                 rule: ExitRule | None, desc: str) -> tuple[dict[str, np.ndarray], float]:
    """Logits and exit layer of every row under `rule` (None: all layers), its labels where `data` has them,
    gathered over ranks; and the wall time."""
    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, exit_layer = model.early_exit(rule, **model_inputs(batch))
        labels = {"labels": batch["labels"]} if "labels" in batch else {}
        return {"logits": logits, "exit_layer": exit_layer, **labels}

    return predict(ctx, data, args.per_gpu_eval_batch_size, step, args.dynamic_padding, desc=desc, fp16=args.fp16,
                   bf16=args.bf16)


def evaluate(ctx: DistContext, args: argparse.Namespace, run: Run, model: EarlyExitModel, tokenizer: Any,
             eval_task: str) -> dict[str, Any]:
    """Final-head metrics, per-exit metrics, and one early-exit pass per rule, with wall time and speed-up."""
    model.eval()
    dev = load_features(ctx, args, run, tokenizer, eval_task, "dev")
    bs = args.per_gpu_eval_batch_size
    primary = glue.primary_metric(eval_task)
    num_layers = model.num_layers
    result: dict[str, Any] = {"task": eval_task, "num_examples": int(len(dev["labels"])),
                              "num_layers": num_layers, "primary_metric": primary}

    # One untimed batch first, so one-off start-up costs (allocator, kernels) do not land in the timings.
    exit_outputs(ctx, args, model, {k: v[:bs] for k, v in dev.items()}, None, "warm-up")
    full, full_seconds = exit_outputs(ctx, args, model, dev, None, f"eval {eval_task}")
    labels = full["labels"]
    result["metrics"] = glue.compute_metrics(eval_task, predictions(eval_task, full["logits"]), labels)
    result["seconds_all_layers"] = full_seconds
    logger.info("%s dev (all %d layers): %s", eval_task, num_layers, result["metrics"])

    if args.eval_each_highway:
        if not model.off_ramps_trained:
            raise UserError(f"{run.model_path} has no trained off-ramps; train them (--do_train) before "
                            "--eval_each_highway")
        per_layer = every_exit_logits(ctx, args, model, dev, "eval each exit")
        layer_metrics = [glue.compute_metrics(eval_task, predictions(eval_task, per_layer[:, i]), labels)
                         for i in range(num_layers)]
        result["per_layer"] = [{"layer": i + 1, **m} for i, m in enumerate(layer_metrics)]
        logger.info("%s of each exit layer: %s", primary,
                    " ".join(f"{100 * m[primary]:.2f}" for m in layer_metrics))

    sweep = []
    for rule in run.rules:
        if not model.off_ramps_trained:
            raise UserError(f"{run.model_path} has no trained off-ramps; early exit needs a model trained by "
                            "this script (--do_train)")
        out, seconds = exit_outputs(ctx, args, model, dev, rule, f"early exit {rule.label}")
        exits = out["exit_layer"].astype(np.int64)
        metrics = glue.compute_metrics(eval_task, predictions(eval_task, out["logits"]), labels)
        point = {
            "rule": rule.label,
            "criterion": "entropy" if isinstance(rule, EntropyExit) else "patience",
            "threshold": rule.threshold if isinstance(rule, EntropyExit) else rule.patience,
            "metrics": metrics,
            "metric": metrics[primary],
            "avg_exit_layer": float(exits.mean()),
            "exit_histogram": {str(layer): int((exits == layer).sum()) for layer in range(1, num_layers + 1)},
            "layers_saved_fraction": float(1.0 - exits.sum() / (len(exits) * num_layers)),
            "seconds": seconds,
            "speedup": full_seconds / seconds if seconds > 0 else float("nan"),
            "num_layers": num_layers,
        }
        sweep.append(point)
        logger.info("%s: %s=%.4f avg exit layer %.2f, %.1f%% layer computations saved, speed-up %.2fx",
                    rule.label, primary, point["metric"], point["avg_exit_layer"],
                    100 * point["layers_saved_fraction"], point["speedup"])
    if sweep:
        result["early_exit"] = sweep
    return result


def merged_sweep(path: str, points: list[dict[str, Any]], model: str, merge: bool) -> list[dict[str, Any]]:
    """This run's sweep merged into the one already at `path`, so that one run per threshold into the same
    --plot_data_dir (the original's entropy_eval.sh) keeps every threshold: points of this run's rules replace
    those of the same rule, points of other rules measured on the same model are kept; sorted by criterion and
    threshold. A training run (merge False) starts a new sweep."""
    points = [{**p, "model": model} for p in points]
    old: Any = []
    if merge and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as err:
            logger.warning("%s is unreadable (%s); starting a new sweep", path, err)
    mine = {p["rule"] for p in points}
    kept = [p for p in (old if isinstance(old, list) else []) if isinstance(p, dict) and p.get("model") == model
            and p.get("rule") not in mine]
    if kept:
        logger.info("Merged %d earlier point(s) of %s into the sweep", len(kept), path)
    return sorted(kept + points, key=lambda p: (str(p.get("criterion")), float(p.get("threshold", 0))))


def write_results(run: Run, results: dict[str, Any], ctx: DistContext, merge_sweep: bool = False) -> None:
    """eval_results.json, the original's eval_results.txt, the sweep JSON and the plots (rank 0 only)."""
    if not ctx.is_main:
        return
    os.makedirs(run.output_dir, exist_ok=True)
    os.makedirs(run.plot_dir, exist_ok=True)
    write_json_atomic(os.path.join(run.output_dir, "eval_results.json"), results)
    lines = []
    for task_result in results["eval"].values():
        prefix = "mm_" if task_result["task"] == "mnli-mm" else ""
        lines += [f"{prefix}{k} = {v}" for k, v in sorted(task_result["metrics"].items())]
    write_text_atomic(os.path.join(run.output_dir, "eval_results.txt"), "\n".join(lines) + "\n")
    for name, task_result in results["eval"].items():
        suffix = "" if name == run.task else f"_{name}"
        primary = task_result["primary_metric"]
        if "per_layer" in task_result:
            fig = visualize.plot_metric_per_layer(
                [m[primary] for m in task_result["per_layer"]], primary, title=f"{name}: {primary} of each exit",
                full_model_score=task_result["metrics"][primary])
            visualize.save(fig, os.path.join(run.plot_dir, f"metric_per_layer{suffix}.png"))
        if "early_exit" in task_result:
            sweep_file = os.path.join(run.plot_dir, f"early_exit_sweep{suffix}.json")
            sweep = merged_sweep(sweep_file, task_result["early_exit"], results["eval_model"], merge_sweep)
            write_json_atomic(sweep_file, sweep)
            fig = visualize.plot_early_exit_sweep(sweep, primary, title=f"{name}: early exit trade-off")
            visualize.save(fig, os.path.join(run.plot_dir, f"early_exit_sweep{suffix}.png"))


def write_run_outputs(args: argparse.Namespace, run: Run, results: dict[str, Any], ctx: DistContext) -> None:
    """train_results.json / all_results.json (flat Hugging Face keys) and, after training, the model card
    (rank 0 only)."""
    if not ctx.is_main:
        return
    train = results.get("train")
    train_flat = None if train is None else train_metrics(
        [train[k] for k in ("stage1", "stage2", "joint") if k in train], train.get("num_examples"))
    eval_flat: dict[str, Any] = {}
    for name, task_result in results.get("eval", {}).items():
        prefix = "eval_mm_" if task_result["task"] == "mnli-mm" else "eval_"
        eval_flat.update(flat_metrics(prefix, task_result["metrics"]))
        eval_flat[f"{prefix}samples"] = task_result["num_examples"]
        eval_flat[f"{prefix}runtime"] = task_result["seconds_all_layers"]
        for point in task_result.get("early_exit", []):
            rule = point["rule"].replace("=", "_")  # eval_entropy_0.5_acc, eval_patience_2_avg_exit_layer
            eval_flat[f"{prefix}{rule}_{task_result['primary_metric']}"] = point["metric"]
            eval_flat[f"{prefix}{rule}_avg_exit_layer"] = point["avg_exit_layer"]
    write_run_results(run.output_dir, train_flat, eval_flat)
    if train is None:
        return
    rules = [r.label for r in run.rules]
    metrics = {k: v for k, v in eval_flat.items() if not k.endswith(("_samples", "_runtime"))}
    joint = args.training_scheme == "joint"
    method = ("PABEE joint training (backbone and every exit together, loss of exit i weighted by i)" if joint else
              "DeeBERT two-stage early exit (stage 1: backbone + classifier; stage 2: off-ramps on the frozen "
              "backbone)")
    if args.self_distillation:
        method += (f", off-ramps self-distilled from the final head (weight {args.self_distillation_weight:g}, "
                   f"temperature {args.self_distillation_temperature:g})")
    chosen = results.get("chosen_threshold")
    write_model_card(
        run.output_dir, f"{'PABEE' if joint else 'DeeBERT'} early exit: {run.task}",
        f"A {run.task} classifier fine-tuned from `{run.model_path}` with early exit: an "
        f"off-ramp ({'mean of the tokens' if train['off_ramp_pooling'] == MEAN else 'first-token pooler'} + "
        "classifier) after each encoder layer lets confident inputs leave before the last one.",
        {"method": method,
         "base model": run.model_path, "task": run.task, "training examples": train.get("num_examples"),
         "learning rate (backbone / off-ramps)": [args.learning_rate,
                                                  args.off_ramp_learning_rate or args.learning_rate],
         "epochs": args.num_train_epochs if args.max_steps <= 0 else f"{args.max_steps} steps per stage",
         "early-exit thresholds evaluated": rules or "none (evaluate with --eval_highway --early_exit_entropy X)",
         **({"chosen threshold (early_exit.json)": f"{chosen['rule']} for a drop of at most "
             f"{chosen['max_metric_drop']:g} on {chosen['calibration_examples']} held-out training rows"}
            if chosen else {})},
        metrics or None,
        f"""from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{run.output_dir}")  # the full model (all layers)
tokenizer = AutoTokenizer.from_pretrained("{run.output_dir}")""",
        ["The backbone and its classifier are a stock checkpoint; the off-ramps are in off_ramps.safetensors / "
         "off_ramps.json. For early exit load both with `common.models.highway.EarlyExitModel.from_pretrained`, or "
         "run `scripts/run_glue_early_exit.py --model_name_or_path <this folder> --do_eval --eval_highway "
         "--early_exit_entropy X`."])


def evaluate_all(ctx: DistContext, args: argparse.Namespace, run: Run, model: EarlyExitModel,
                 tokenizer: Any) -> dict[str, Any]:
    return {t: evaluate(ctx, args, run, model, tokenizer, t) for t in eval_tasks(run.task)}


def predict_test(ctx: DistContext, args: argparse.Namespace, run: Run, model: EarlyExitModel,
                 tokenizer: Any) -> dict[str, Any]:
    """--do_predict: every row of the unlabelled test file(s), predicted with the final head, or with early exit
    when exactly one rule was given; rank 0 writes predict_results_<task>.txt (as the Hugging Face run_glue
    example: `index<TAB>prediction`, the label name or the STS-B score, plus `exit_layer` under early exit)."""
    model.eval()
    rule = run.rules[0] if len(run.rules) == 1 else None
    if rule is None:
        logger.info("Predicting with the final head (all %d layers)%s", model.num_layers,
                    "; give a single --early_exit_entropy or --patience to predict with early exit" if run.rules
                    else "")
    elif not model.off_ramps_trained:
        raise UserError(f"{run.model_path} has no trained off-ramps; predicting with early exit ({rule.label}) "
                        "needs a model trained by this script (--do_train), or leave out the threshold")
    else:
        logger.info("Predicting with early exit: %s", rule.label)
    out: dict[str, Any] = {}
    for task in eval_tasks(run.task):
        spec = glue.get_task(task)
        test = load_features(ctx, args, run, tokenizer, task, "test")
        outputs, seconds = exit_outputs(ctx, args, model, test, rule, f"predict {task}")
        preds, exits = predictions(task, outputs["logits"]), outputs["exit_layer"].astype(np.int64)
        path = os.path.join(run.output_dir, f"predict_results_{task}.txt")
        if ctx.is_main:
            indices = [glue.example_index(ex) for ex in glue.read_examples(task, run.data_dir, "test")]
            lines = ["index\tprediction" + ("\texit_layer" if rule else "")]
            for i, (index, pred) in enumerate(zip(indices, preds.tolist())):
                value = f"{pred:.3f}" if spec.is_regression else spec.labels[int(pred)]
                lines.append(f"{index}\t{value}" + (f"\t{exits[i]}" if rule else ""))
            write_text_atomic(path, "\n".join(lines) + "\n")
            logger.info("Wrote %d %s predictions to %s", len(preds), task, path)
        out[task] = {"file": path, "num_examples": int(len(preds)), "rule": rule.label if rule else "final head",
                     "avg_exit_layer": float(exits.mean()), "seconds": seconds}
    return out


# ----------------------------------------------------------------------------------------------------------


def warn_unless_held_out(args: argparse.Namespace, model_path: str) -> None:
    """An evaluation-only --max_metric_drop draws its calibration rows from the training file again: fair only
    if the model's training held those same rows out."""
    saved = load_choice(model_path) if os.path.isdir(model_path) else None
    same = saved is not None and (saved.get("calibration_seed"), saved.get("calibration_examples")) == (
        args.seed, args.calibration_examples)
    if not same:
        logger.warning("Choosing a threshold on %d rows of the training file (seed %d): unless %s was trained with "
                       "--max_metric_drop and these --seed / --calibration_examples, it has seen them and the choice "
                       "is optimistic", args.calibration_examples, args.seed, model_path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with script_context(args, argv, resolve_run) as (session, run):
        ctx = session.ctx
        logger.info("Task %s, model %s, data %s, output %s, %d process(es) on %s", run.task, run.model_path,
                    run.data_dir, run.output_dir, ctx.world_size, ctx.device)
        results: dict[str, Any] = {"task": run.task, "model": run.model_path}
        eval_path = run.model_path
        results["eval_model"] = os.path.abspath(eval_path)
        calibration = None
        if args.do_train:
            source = run.resume or run.model_path
            model = load_model(source, args, run.task, for_training=True).to(ctx.device)
            tokenizer = load_tokenizer(run.resume or run.tokenizer_path, args)
            train_set, calibration = training_rows(ctx, args, run, tokenizer)
            results["train"] = train_stages(ctx, args, run, model, tokenizer, train_set, session.writer)
            eval_path = run.output_dir
            results["eval_model"] = os.path.abspath(eval_path)
        if args.do_eval or args.do_predict or (args.max_metric_drop is not None and not args.do_train):
            model = load_model(eval_path, args, run.task).to(ctx.device)
            tokenizer = load_tokenizer(eval_path if args.do_train else run.tokenizer_path, args)
        if args.max_metric_drop is not None:
            if calibration is None:
                warn_unless_held_out(args, run.model_path)
                calibration = training_rows(ctx, args, run, tokenizer)[1]
            results["chosen_threshold"], rule = choose_threshold(ctx, args, run, model, calibration)
            run = replace(run, rules=tuple(dict.fromkeys((*run.rules, rule))))
        if args.do_eval:
            results["eval"] = evaluate_all(ctx, args, run, model, tokenizer)
            if args.eval_all_checkpoints:
                results["checkpoints"] = evaluate_checkpoints(run.output_dir, lambda ckpt: evaluate_final_head(
                    ctx, args, run, load_model(ckpt, args, run.task).to(ctx.device), tokenizer))
            write_results(run, results, ctx, merge_sweep=not args.do_train)
            for name, task_result in results["eval"].items():
                logger.info("***** %s: %s *****", name, task_result["metrics"])
        if args.do_predict:
            results["predict"] = predict_test(ctx, args, run, model, tokenizer)
        write_run_outputs(args, run, results, ctx)
        return results


if __name__ == "__main__":
    exit_with(run_cli(main))
