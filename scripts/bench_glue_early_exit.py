#!/usr/bin/env python
"""Benchmark early exit on a real GLUE task (`make bench-glue`): accuracy against measured speed, per scheme.

1. Samples a fixed-seed subset of the train file (written as a GLUE-format train.tsv, with a copy of the dev
   file, into <output_dir>/data/).
2. Fine-tunes one model per --variants with scripts/run_glue_early_exit.py, each in a fresh process (no bench
   lock needed: nothing is timed there): `two_stage` (DeeBERT, off-ramps at the fine-tuning rate),
   `two_stage_ramp_lr` (stage two at --off_ramp_learning_rate), `joint` (PABEE's joint training),
   `joint_distill` (joint + FastBERT self-distillation), all with DeeBERT's first-token off-ramps; and
   `two_stage_mean` (as two_stage_ramp_lr) and `joint_mean` (as joint) with mean-pooled off-ramps
   (--off_ramp_pooling mean). Every run holds --calibration_examples rows out of its training and chooses the
   entropy threshold for --max_metric_drop on them (early_exit.json).
3. Per model, one pass over the whole dev set gives every exit's logits: the metric of each exit layer and,
   replayed with each rule's own decisions (common.early_exit.replay_exits, the same per-row decisions as the
   batched early exit at any batch size), the metric, average exit layer and layers saved of every entropy and
   patience threshold and of the chosen one.
4. Timing, under --timing_lock when given (one benchmark at a time on a shared machine): per timed model and
   --eval_batch_sizes, wall time of the plain model (every layer, the stock forward) and of early exit under
   --timed_entropy / --timed_patience / the chosen threshold, on the first --timing_examples dev rows, each
   batch run in one mirrored order (plain, r1 .. rk, rk .. r1, plain: ABBA for every rule at once, batch by
   batch, so a drifting load hits all alike); speed-up = plain seconds / rule seconds. And the early-exit
   machinery's own cost, for the last variant of each off-ramp pooling: the plain model against early exit with
   a rule that checks every off-ramp and never fires, batch by batch in alternating order (A B, B A, ...),
   --overhead_repeats passes each.
5. Optionally (--throughput_steps > 0) stage-one training throughput with fixed and dynamic padding, ABBA.

With --overhead_only it measures only the machinery's cost (the last part of 4), on --model_name_or_path itself
with fresh off-ramps of each pooling: no training, a few minutes. The cost does not depend on what the off-ramps
learned (their rule never fires, every off-ramp runs), so this is the figure of any model of that shape.

Prints a table and writes everything, with the environment and the load, to <output_dir>/bench_results.json.

    python scripts/bench_glue_early_exit.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --data_dir ../shared/data/glue/SST-2 --task_name sst-2 --output_dir runs/bench-glue \\
        --timing_lock /work/bench.lock

torch runs one thread unless --torch_threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Sequence

from common.args import answering_help
from common.bench import (
    abba_order, add_timing_lock_arg, bench_parser, format_table, load_average, mirrored_order, new_record, run_script,
    timing_lock, write_record,
)
from common.data.glue_tasks import TASKS
from common.errors import UserError, exit_with, run_cli
from common.models.pooling import POOLINGS

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch

    from common.batches import TensorBatches, epoch_batches
    from common.data import glue
    from common.data.glue import eval_tasks
    from common.distributed import DistContext
    from common.early_exit import load_choice, replay_exits, rule_from_choice
    from common.io import write_json_atomic, write_text_atomic
    from common.loaders import load_tokenizer
    from common.models.highway import EarlyExitModel, EntropyExit, ExitRule, NeverFires, PatienceExit
    from common.training import TrainConfig, plan_for_examples

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_glue_early_exit.py")
DEFAULT_ENTROPIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65)
DEFAULT_PATIENCES = (1, 2, 3, 4)
VARIANTS = ("two_stage", "two_stage_ramp_lr", "joint", "joint_distill", "two_stage_mean", "joint_mean")
# Variants whose stage one is two_stage's (same seed, rows and flags: the same weights): they resume from it.
SHARES_STAGE_ONE = ("two_stage_ramp_lr",)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "Folder of the pretrained BERT/RoBERTa model to fine-tune (e.g. all-MiniLM-L6-v2).")
    parser.add_argument("--data_dir", required=True, help="Folder with the task's GLUE train/dev .tsv files.")
    parser.add_argument("--task_name", default="sst-2", help="GLUE task: " + ", ".join(TASKS))
    parser.add_argument("--output_dir", default=os.path.join("runs", "bench-glue"),
                        help="Where the data subset, the models, the runs' outputs and bench_results.json go.")
    parser.add_argument("--train_examples", default=2500, type=int,
                        help="Train rows to sample (fixed seed) from the train file, the calibration rows included; "
                             "0 or more than it has: all.")
    parser.add_argument("--calibration_examples", default=500, type=int,
                        help="Rows of that sample held out of training to choose the threshold on.")
    parser.add_argument("--max_metric_drop", default=0.01, type=float,
                        help="The accuracy budget the threshold is chosen for (0.01: one point).")
    parser.add_argument("--max_seq_length", default=128, type=int, help="Longest tokenized input; longer is cut.")
    parser.add_argument("--num_train_epochs", default=1.0, type=float, help="Epochs of each training stage.")
    parser.add_argument("--learning_rate", default=1e-4, type=float, help="Peak AdamW learning rate.")
    parser.add_argument("--off_ramp_learning_rate", "--stage2_learning_rate", default=2e-3, type=float,
                        help="The off-ramps' learning rate in the two_stage_ramp_lr variant (fresh heads on a frozen "
                             "backbone: one short epoch at the fine-tuning rate leaves them near chance).")
    parser.add_argument("--self_distillation_weight", default=0.5, type=float,
                        help="run_glue_early_exit.py's --self_distillation_weight in the *_distill variants.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="Which training schemes to fine-tune and evaluate.")
    parser.add_argument("--timed_variants", nargs="*", choices=VARIANTS,
                        default=["two_stage", "two_stage_ramp_lr", "joint", "two_stage_mean", "joint_mean"],
                        help="Which of them get the wall-clock sweep (the others: the chosen threshold only).")
    parser.add_argument("--warmup_proportion", default=0.1, type=float,
                        help="Fraction of each stage's steps spent warming the learning rate up.")
    parser.add_argument("--train_batch_size", default=16, type=int,
                        help="Training batch size (fine-tuning and the throughput runs).")
    parser.add_argument("--eval_batch_sizes", nargs="+", type=int, default=[1, 32],
                        help="Evaluation batch sizes the timings run at.")
    parser.add_argument("--early_exit_entropy", nargs="+", type=float, default=list(DEFAULT_ENTROPIES),
                        help="Entropy thresholds whose metric and exit layers are reported.")
    parser.add_argument("--patience", nargs="+", type=int, default=list(DEFAULT_PATIENCES),
                        help="Patience values whose metric and exit layers are reported.")
    parser.add_argument("--timed_entropy", nargs="*", type=float, default=[0.1, 0.3, 0.5, 0.6],
                        help="Entropy thresholds that are also timed.")
    parser.add_argument("--timed_patience", nargs="*", type=int, default=[1, 2],
                        help="Patience values that are also timed.")
    parser.add_argument("--timing_examples", default=192, type=int,
                        help="Dev rows (the first ones) each timed pass runs over; 0: all.")
    parser.add_argument("--overhead_repeats", default=3, type=int,
                        help="Passes of the plain model and of early exit that never fires, alternating batch "
                             "by batch.")
    parser.add_argument("--reuse_models", action="store_true",
                        help="Evaluate and time the models a previous run of this bench left in --output_dir (each "
                             "model folder's fine_tune.json) instead of training them again; variants it has no "
                             "model of are trained.")
    parser.add_argument("--overhead_only", action="store_true",
                        help="Only measure the early-exit machinery's cost when no row exits, on "
                             "--model_name_or_path with fresh off-ramps of each pooling (no training).")
    add_timing_lock_arg(parser)
    parser.add_argument("--throughput_steps", default=0, type=int,
                        help="Optimizer steps of each training-throughput run (0: skip those runs).")
    parser.add_argument("--throughput_repeats", default=2, type=int,
                        help="Throughput runs per padding mode, in ABBA order.")
    parser.add_argument("--do_lower_case", action="store_true",
                        help="Lower-case the input (not needed for a tokenizer that is uncased already).")
    parser.add_argument("--seed", default=42, type=int, help="Seed of the train subset and of training.")
    parser.add_argument("--torch_threads", default=1, type=int,
                        help="torch intra-op threads (0: torch's default, one per core). 1 by default: on a small "
                             "machine shared with other jobs, two threads spend most of their time waiting for a "
                             "descheduled peer (measured here: 7-14 s instead of ~1.5 s per training step).")
    args = parser.parse_args(argv)
    minimums = {"train_examples": (0, "0 means the whole train file"), "throughput_repeats": (1, ""),
                "throughput_steps": (0, "0 skips the throughput runs"), "torch_threads": (0, "0: torch's default"),
                "off_ramp_learning_rate": (0, ""), "train_batch_size": (1, ""), "calibration_examples": (1, ""),
                "timing_examples": (0, "0: the whole dev set"), "overhead_repeats": (1, "")}
    problems = [f"--{name} must be at least {low}" + (f" ({hint})" if hint else "")
                for name, (low, hint) in minimums.items() if getattr(args, name) < low]
    if any(b < 1 for b in args.eval_batch_sizes):
        problems.append("--eval_batch_sizes must all be at least 1")
    if not set(args.timed_variants) <= set(args.variants):
        problems.append("--timed_variants must be among --variants")
    try:
        args.task_name = glue.canonical_task_name(args.task_name)
        if glue.get_task(args.task_name).is_regression:
            problems.append(f"{args.task_name} is a regression task: the entropy sweep needs class probabilities "
                            "(run scripts/run_glue_early_exit.py with --patience instead)")
    except UserError as err:
        problems.append(str(err))
    if problems:
        raise UserError("; ".join(problems))
    args.eval_batch_sizes = list(dict.fromkeys(args.eval_batch_sizes))
    return args


# ----------------------------------------------------------------------------------------------------------
# data


def _source_file(data_dir: str, task: glue.GlueTask, file_name: str) -> str:
    """The file in data_dir itself or in data_dir/<GLUE subfolder>, as the GLUE reader looks for it."""
    candidates = [os.path.join(data_dir, file_name), os.path.join(data_dir, task.data_subdir, file_name)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UserError(f"{candidates[0]} not found: --data_dir should hold the {task.name} GLUE files")


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:  # universal newlines, as the GLUE reader splits lines
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]


def write_subset(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """A fixed-seed sample of the train rows (in file order, header kept) and copies of the dev file(s)."""
    task = glue.get_task(args.task_name)
    os.makedirs(dest, exist_ok=True)
    source = _source_file(args.data_dir, task, task.train_file)
    lines = _read_lines(source)
    header, rows = (lines[:1], lines[1:]) if task.has_header else ([], lines)
    total = len(rows)
    if 0 < args.train_examples < total:
        keep = sorted(random.Random(args.seed).sample(range(total), args.train_examples))
        rows = [rows[i] for i in keep]
    write_text_atomic(os.path.join(dest, task.train_file), "\n".join(header + rows) + "\n")
    dev_rows = {}
    for eval_task in eval_tasks(task.name):
        dev_file = glue.get_task(eval_task).dev_file
        dev_source = _source_file(args.data_dir, task, dev_file)
        shutil.copyfile(dev_source, os.path.join(dest, dev_file))
        dev_rows[eval_task] = len(_read_lines(dev_source)) - (1 if task.has_header else 0)
    return {"train_source": os.path.abspath(source), "train_rows_in_source": total, "train_rows": len(rows),
            "dev_rows": dev_rows, "data_dir": os.path.abspath(dest), "sample_seed": args.seed}


# ----------------------------------------------------------------------------------------------------------
# runs


# ----------------------------------------------------------------------------------------------------------
# training runs


def common_flags(args: argparse.Namespace, data_dir: str) -> list[str]:
    flags = ["--task_name", args.task_name, "--data_dir", data_dir, "--max_seq_length", str(args.max_seq_length),
             "--seed", str(args.seed)]
    return flags + (["--do_lower_case"] if args.do_lower_case else [])


def timed_main(args: argparse.Namespace, argv: list[str]) -> tuple[dict[str, Any], float]:
    """run_glue_early_exit.py in its own process, on --torch_threads threads: its results and seconds."""
    threads = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads > 0 else None
    return run_script(SCRIPT, argv, env=threads)


def stage_steps(args: argparse.Namespace, train_rows: int) -> int:
    """Optimizer steps of one training stage: the shared loop's own step plan (one process)."""
    cfg = TrainConfig(output_dir="", per_device_batch_size=args.train_batch_size,
                      num_train_epochs=args.num_train_epochs)
    return plan_for_examples(train_rows, cfg).total_steps


def variant_flags(args: argparse.Namespace, variant: str) -> list[str]:
    """What sets a variant apart on run_glue_early_exit.py's command line."""
    return {
        "two_stage": [],
        "two_stage_ramp_lr": ["--off_ramp_learning_rate", f"{args.off_ramp_learning_rate:g}"],
        "joint": ["--training_scheme", "joint"],
        "joint_distill": ["--training_scheme", "joint", "--self_distillation", "--self_distillation_weight",
                          f"{args.self_distillation_weight:g}"],
        "two_stage_mean": ["--off_ramp_learning_rate", f"{args.off_ramp_learning_rate:g}",
                           "--off_ramp_pooling", "mean"],
        "joint_mean": ["--training_scheme", "joint", "--off_ramp_pooling", "mean"],
    }[variant]


def fine_tune(args: argparse.Namespace, data_dir: str, out: str, train_rows: int, variant: str,
              shared_stage_one: str | None = None) -> dict[str, Any]:
    """One variant's training run, the calibration rows held out and the threshold chosen on them; its record
    is kept as fine_tune.json in the model folder (for --reuse_models). A two-stage run saves its last stage-one
    checkpoint; `shared_stage_one` (such a run's folder) makes another two-stage run resume from it instead of
    training the same stage one again (same seed, rows and flags: the same weights) and only train stage two."""
    record_file = os.path.join(out, "fine_tune.json")
    if args.reuse_models and os.path.isfile(record_file):
        with open(record_file, encoding="utf-8") as f:
            return {**json.load(f), "reused": True}
    steps = stage_steps(args, train_rows - args.calibration_examples)
    resume = ["--resume_from_checkpoint", os.path.join(shared_stage_one, f"checkpoint-stage1-{steps:06d}")
              ] if shared_stage_one else []
    flags = [*common_flags(args, data_dir), "--num_train_epochs", str(args.num_train_epochs),
             "--warmup_steps", str(int(args.warmup_proportion * steps)),
             "--per_gpu_train_batch_size", str(args.train_batch_size), "--per_gpu_eval_batch_size", "32",
             "--output_dir", out, "--overwrite_output_dir", "--learning_rate", str(args.learning_rate),
             "--save_steps", str(steps if variant.startswith("two_stage") else 0),
             "--max_metric_drop", str(args.max_metric_drop), "--calibration_examples", str(args.calibration_examples),
             *variant_flags(args, variant), *resume]
    results, seconds = timed_main(args, ["--do_train", "--model_name_or_path", args.model_name_or_path, *flags])
    record = {"variant": variant, "output_dir": out, "flags": variant_flags(args, variant) + resume,
              "train": dict(results["train"]), "chosen_threshold": results["chosen_threshold"],
              "run_seconds": seconds}
    write_json_atomic(record_file, record)
    return record


def throughput_run(args: argparse.Namespace, data_dir: str, out: str, dynamic: bool) -> dict[str, Any]:
    """A short two-stage run (the script always trains both); stage one is the number that matters."""
    argv = ["--do_train", "--model_name_or_path", args.model_name_or_path, "--output_dir", out,
            "--overwrite_output_dir", *common_flags(args, data_dir),
            "--max_steps", str(args.throughput_steps), "--learning_rate", str(args.learning_rate),
            "--per_gpu_train_batch_size", str(args.train_batch_size), "--save_steps", "0",
            "--dynamic_padding" if dynamic else "--no_dynamic_padding"]
    results, seconds = timed_main(args, argv)
    return {"stage1": results["train"]["stage1"], "stage2": results["train"]["stage2"], "run_seconds": seconds}


def throughput(args: argparse.Namespace, data_dir: str, out: str) -> list[dict[str, Any]]:
    """Both padding modes, --throughput_repeats runs each in ABBA order, pooled per mode."""
    order = abba_order(args.throughput_repeats)  # F D D F F D D F ...
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for dynamic in order:
        name = "dynamic" if dynamic else "fixed"
        runs[dynamic].append(throughput_run(args, data_dir, os.path.join(out, f"throughput-{name}"), dynamic))

    def pooled(stage: list[dict[str, Any]]) -> dict[str, float]:
        seconds = sum(s["seconds"] for s in stage)
        examples = sum(s["examples_per_second"] * s["seconds"] for s in stage)
        return {"seconds": seconds, "examples_per_second": examples / seconds if seconds > 0 else float("nan"),
                "global_step": sum(s["global_step"] for s in stage)}

    return [{"padding": "dynamic" if dynamic else f"fixed ({args.max_seq_length})",
             "stage1": pooled([r["stage1"] for r in runs[dynamic]]),
             "stage2": pooled([r["stage2"] for r in runs[dynamic]]), "runs": runs[dynamic]}
            for dynamic in (False, True)]


def padding_stats(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    """Tokens per row in the batches the throughput runs draw (common.batches.epoch_batches, same seed): real,
    and padded under each scheme. Their ratio is what dynamic padding can save, whatever the machine's load."""
    tokenizer = load_tokenizer(args.model_name_or_path, do_lower_case=args.do_lower_case)
    task = args.task_name
    mask = glue.featurize(glue.read_examples(task, data_dir, "train"), tokenizer, task,
                          args.max_seq_length)["attention_mask"]
    lengths = mask.sum(dim=1)
    ctx = DistContext(device=torch.device("cpu"))
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < args.throughput_steps:
        batches += epoch_batches(len(lengths), args.train_batch_size, args.seed, epoch, ctx)
        epoch += 1
    batches = batches[:args.throughput_steps]
    rows = sum(len(b) for b in batches)
    real = sum(int(lengths[b].sum()) for b in batches) / rows
    dynamic = sum(int(lengths[b].max()) * len(b) for b in batches) / rows
    return {"steps": len(batches), "real_tokens_per_row": real, "dynamic_padded_tokens_per_row": dynamic,
            "fixed_padded_tokens_per_row": float(args.max_seq_length),
            "dynamic_over_fixed": dynamic / args.max_seq_length}


# ----------------------------------------------------------------------------------------------------------
# accuracy (replayed from every exit's logits) and timing


def dev_features(args: argparse.Namespace, data_dir: str, tokenizer: Any, task: str) -> dict[str, torch.Tensor]:
    return glue.featurize(glue.read_examples(task, data_dir, "dev"), tokenizer, task, args.max_seq_length)


def batches(features: dict[str, torch.Tensor], batch_size: int, rows: int) -> list[dict[str, torch.Tensor]]:
    """The first `rows` dev rows (all when 0) in order, each batch trimmed to its longest row (as evaluation)."""
    source = TensorBatches(features, batch_size)
    count = min(rows, source.num_examples) if rows > 0 else source.num_examples
    cpu = torch.device("cpu")
    return [{k: v for k, v in source.collate(list(range(i, min(i + batch_size, count))), cpu).items()
             if k != "labels"} for i in range(0, count, batch_size)]


def rule_point(task: str, rule: ExitRule, every: torch.Tensor, labels: Any) -> dict[str, Any]:
    logits, exits = replay_exits(rule, every)
    metrics = glue.compute_metrics(task, logits.argmax(-1).numpy(), labels)
    num_layers = every.shape[0]
    return {"rule": rule.label, "metric": metrics[glue.primary_metric(task)],
            "avg_exit_layer": float(exits.float().mean()),
            "layers_saved_fraction": 1.0 - float(exits.float().mean()) / num_layers}


def accuracy(args: argparse.Namespace, model: EarlyExitModel, features: dict[str, torch.Tensor], task: str,
             chosen: ExitRule) -> dict[str, Any]:
    """Per-layer metrics and every rule's metric and exits on the whole dev set, from one all-exit pass."""
    with torch.no_grad():
        every = torch.cat([model.all_exit_logits(**b) for b in batches(features, 32, 0)], dim=1)
    labels = features["labels"].numpy()
    primary = glue.primary_metric(task)
    per_layer = [glue.compute_metrics(task, every[i].argmax(-1).numpy(), labels)[primary]
                 for i in range(every.shape[0])]
    rules = ([EntropyExit(e) for e in args.early_exit_entropy] + [PatienceExit(p) for p in args.patience])
    return {"primary_metric": primary, "num_examples": len(labels), "num_layers": every.shape[0],
            "full_model": per_layer[-1], "per_layer": per_layer,
            "sweep": [rule_point(task, r, every, labels) for r in rules],
            "chosen": rule_point(task, chosen, every, labels)}


def run_pass(model: EarlyExitModel, data: list[dict[str, torch.Tensor]], rule: ExitRule | None
             ) -> tuple[float, float]:
    """Wall and CPU seconds (this process's) of `data` under `rule` (None: the plain model)."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in data:
            if rule is None:
                model.backbone(**b)  # the plain model: the stock forward, every layer
            else:
                model.early_exit(rule, **b)
    return time.perf_counter() - start, time.process_time() - cpu


def time_rules(model: EarlyExitModel, data: list[dict[str, torch.Tensor]], rules: list[ExitRule]
               ) -> dict[str, Any]:
    """Seconds of the plain model and of each rule over `data`, after one untimed warm-up of each: every batch
    runs twice under each, in mirrored order (plain, r1 .. rk, rk .. r1, plain), batch after batch, so drift in
    the machine's speed hits all alike."""
    for rule in [None, *rules]:
        run_pass(model, data[:2], rule)
    order: list[ExitRule | None] = mirrored_order([None, *rules])
    seconds: dict[str, float] = {}
    for batch in data:
        for rule in order:
            name = "plain" if rule is None else rule.label
            seconds[name] = seconds.get(name, 0.0) + run_pass(model, [batch], rule)[0]
    plain = seconds.pop("plain")
    return {"plain_seconds": plain, "rules": [{"rule": r.label, "seconds": seconds[r.label],
                                               "speedup": plain / seconds[r.label]} for r in rules]}


def time_overhead(model: EarlyExitModel, data: list[dict[str, torch.Tensor]], repeats: int) -> dict[str, Any]:
    """The plain model (A) against early exit whose rule never fires (B), after a warm-up: each batch twice in a
    row, A B on even batches and B A on odd ones (the order flipped again every repeat), so drift in the
    machine's speed, which over a whole pass is as large as the few percent measured, hits both alike. Also in
    CPU seconds of this process (with one torch thread, not counting the time other processes held the core)."""
    rule = NeverFires()
    run_pass(model, data[:2], None)
    run_pass(model, data[:2], rule)
    wall, cpu = {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}
    for repeat in range(repeats):
        for i, batch in enumerate(data):
            for machinery in ((False, True) if (i + repeat) % 2 == 0 else (True, False)):
                w, c = run_pass(model, [batch], rule if machinery else None)
                wall[machinery] += w
                cpu[machinery] += c
    return {"plain_seconds": wall[False], "early_exit_seconds": wall[True],
            "overhead": wall[True] / wall[False] - 1.0, "plain_cpu_seconds": cpu[False],
            "early_exit_cpu_seconds": cpu[True], "cpu_overhead": cpu[True] / cpu[False] - 1.0,
            "passes_each": repeats}


@dataclass
class Loaded:
    """A trained variant ready to measure: its model, its chosen rule, and the dev features of each task."""

    model: EarlyExitModel
    chosen: ExitRule
    features: dict[str, dict[str, torch.Tensor]]


def load_variant(args: argparse.Namespace, data_dir: str, run: dict[str, Any]) -> Loaded:
    model = EarlyExitModel.from_pretrained(run["output_dir"]).eval()
    tokenizer = load_tokenizer(run["output_dir"], do_lower_case=args.do_lower_case)
    chosen = rule_from_choice(load_choice(run["output_dir"]), False, 0.1)
    return Loaded(model, chosen, {t: dev_features(args, data_dir, tokenizer, t) for t in eval_tasks(args.task_name)})


def fresh_variant(args: argparse.Namespace, pooling: str, features: dict[str, dict[str, torch.Tensor]]) -> Loaded:
    """--model_name_or_path with fresh off-ramps of `pooling` (for --overhead_only: a rule that never fires), timed
    on `features` (the task's dev features, made once for every pooling)."""
    model = EarlyExitModel.from_pretrained(args.model_name_or_path, pooling=pooling,
                                           num_labels=glue.num_labels(args.task_name)).eval()
    return Loaded(model, NeverFires(), features)


def time_variant(args: argparse.Namespace, loaded: Loaded, timed: bool) -> dict[str, Any]:
    """Per task and eval batch size: the plain model against the timed rules (all, or the chosen one alone)."""
    timed_rules = [EntropyExit(e) for e in args.timed_entropy] + [PatienceExit(p) for p in args.timed_patience]
    rules = list(dict.fromkeys([*(timed_rules if timed else []), loaded.chosen]))
    out: dict[str, Any] = {}
    for task, features in loaded.features.items():
        out[task] = {}
        for bs in args.eval_batch_sizes:
            data = batches(features, bs, args.timing_examples)
            out[task][str(bs)] = {"rows": sum(len(b["input_ids"]) for b in data), "load_before": load_average(),
                                  **time_rules(loaded.model, data, rules), "load_after": load_average()}
    return out


def overhead(args: argparse.Namespace, loaded: Loaded) -> dict[str, Any]:
    features = next(iter(loaded.features.values()))
    out = {}
    for bs in args.eval_batch_sizes:
        data = batches(features, bs, args.timing_examples)
        out[str(bs)] = {"rows": sum(len(b["input_ids"]) for b in data), "load_before": load_average(),
                        **time_overhead(loaded.model, data, args.overhead_repeats), "load_after": load_average()}
    return out


# ----------------------------------------------------------------------------------------------------------
# report


def overhead_of(cfg: dict[str, Any]) -> str:
    """The overhead table's first column: trained variants, or (--overhead_only) fresh off-ramps' pooling."""
    return "fresh off-ramps' pooling" if cfg.get("overhead_only") else "variant"


def _speedups(timing: dict[str, Any], rule: str) -> list[str]:
    cells = []
    for res in timing.values():
        match = [r for r in res["rules"] if r["rule"] == rule]
        cells.append(f"{match[0]['speedup']:.2f}x" if match else "-")
    return cells


def report(bench: dict[str, Any]) -> str:
    cfg, data, env = bench["config"], bench["data"], bench["environment"]
    out = [f"Early-exit benchmark: {cfg['task_name']}, model {cfg['model_name_or_path']}",
           f"train rows {data['train_rows']} of {data['train_rows_in_source']} (seed {cfg['seed']}; "
           f"{cfg['calibration_examples']} held out to choose the threshold), dev rows "
           + ", ".join(f"{t} {n}" for t, n in data["dev_rows"].items())
           + f", max_seq_length {cfg['max_seq_length']}, {cfg['num_train_epochs']:g} epoch(s) per stage, "
           f"lr {cfg['learning_rate']:g}, train batch {cfg['train_batch_size']}",
           f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_count']} CPU(s) ({env['cpu_model']}, "
           f"{env['cpu_capability']}), "
           f"{env['torch_threads']} torch thread(s), device {env['device']}",
           f"load average (1/5/15 min) before {env['load_average_1_5_15min_before']}, after "
           f"{env['load_average_1_5_15min_after']}"]
    if cfg.get("overhead_only"):
        out.append("--overhead_only: nothing trained; the model with fresh off-ramps, a rule that never fires")
    rows = []
    for name, run in bench.get("fine_tune", {}).items():
        for stage, res in run["train"].items():
            if isinstance(res, dict) and "global_step" in res:
                rows.append([name, stage, res["global_step"], f"{res['seconds']:.0f}",
                             f"{res['examples_per_second']:.1f}", f"{res['average_loss']:.4f}"])
    if rows:
        out += ["", "Fine-tuning", format_table(["variant", "stage", "steps", "seconds", "examples/s", "avg loss"],
                                                rows)]
    first = next(iter(bench["eval"].values())) if bench.get("eval") else {}
    for task in first:
        acc0 = first[task]["accuracy"]
        primary, layers = acc0["primary_metric"], acc0["num_layers"]
        out += ["", f"{task}: {primary} of each exit layer (whole dev set, {acc0['num_examples']} rows)",
                format_table(["variant"] + [str(i + 1) for i in range(layers)],
                             [[v] + [f"{100 * a:.2f}" for a in r[task]["accuracy"]["per_layer"]]
                              for v, r in bench["eval"].items()])]
        bss = list(first[task]["timing"])
        rows = []
        for variant, res in bench["eval"].items():
            acc, timing = res[task]["accuracy"], res[task]["timing"]
            rows.append([variant, "all layers", f"{100 * acc['full_model']:.2f}", f"{layers:.2f}", "0.0%",
                         *["1.00x"] * len(bss)])
            for p in acc["sweep"]:
                rows.append([variant, p["rule"], f"{100 * p['metric']:.2f}", f"{p['avg_exit_layer']:.2f}",
                             f"{100 * p['layers_saved_fraction']:.1f}%", *_speedups(timing, p["rule"])])
        out += ["", f"{task}: early exit on the dev set; speed-up = wall time of the plain model / early exit on the "
                "first timed rows, mirrored ABBA order, at eval batch " + " / ".join(bss),
                format_table(["variant", "rule", primary, "avg exit layer", "layers saved",
                              *[f"speed-up bs{b}" for b in bss]], rows)]
        rows = []
        for variant, res in bench["eval"].items():
            p, choice = res[task]["accuracy"]["chosen"], bench["fine_tune"][variant]["chosen_threshold"]
            rows.append([variant, p["rule"], f"{100 * choice['calibration_metric']:.2f} / "
                         f"{100 * choice['full_model_metric']:.2f}", f"{100 * p['metric']:.2f}",
                         f"{100 * (res[task]['accuracy']['full_model'] - p['metric']):+.2f}",
                         f"{p['avg_exit_layer']:.2f}", *_speedups(res[task]["timing"], p["rule"])])
        out += ["", f"{task}: the threshold chosen for --max_metric_drop {cfg['max_metric_drop']:g} on the held-out "
                "training rows, then on dev",
                format_table(["variant", "chosen", "calibration (rule / full)", f"dev {primary}",
                              "below full model", "avg exit layer", *[f"speed-up bs{b}" for b in bss]], rows)]
    if bench.get("overhead"):
        out += ["", "No-exit overhead: plain model vs early exit whose rule checks every off-ramp and never fires, "
                f"batch by batch in alternating order, {cfg['overhead_repeats']} passes each",
                format_table([overhead_of(cfg), "batch", "rows", "plain s", "early exit s", "overhead",
                              "overhead in CPU s", "load before/after"],
                             [[v, bs, r["rows"], f"{r['plain_seconds']:.2f}", f"{r['early_exit_seconds']:.2f}",
                               f"{100 * r['overhead']:+.1f}%", f"{100 * r['cpu_overhead']:+.1f}%",
                               f"{r['load_before']} / {r['load_after']}"]
                              for v, per_bs in bench["overhead"].items() for bs, r in per_bs.items()])]
    if bench.get("throughput"):
        base = bench["throughput"][0]["stage1"]["examples_per_second"]
        out += ["", f"Training throughput, {cfg['throughput_repeats']} run(s) of {cfg['throughput_steps']} steps per "
                f"padding mode in ABBA order, batch {cfg['train_batch_size']}",
                format_table(["padding", "stage1 steps", "stage1 s", "stage1 examples/s", "vs fixed"],
                             [[t["padding"], t["stage1"]["global_step"], f"{t['stage1']['seconds']:.1f}",
                               f"{t['stage1']['examples_per_second']:.1f}",
                               f"{t['stage1']['examples_per_second'] / base:.2f}x"] for t in bench["throughput"]])]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    load_before = load_average()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "data")
    wall: dict[str, float] = {}
    bench = new_record("bench_glue_early_exit.py", args, argv)
    bench["data"] = write_subset(args, data_dir)  # the same rows again with --reuse_models (fixed seed)
    print(f"Wrote {bench['data']['train_rows']} train rows and the dev file(s) to {data_dir}", flush=True)

    if args.overhead_only:
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(args.model_name_or_path, do_lower_case=args.do_lower_case)
        features = {args.task_name: dev_features(args, data_dir, tokenizer, args.task_name)}
        fresh = [fresh_variant(args, pooling, features) for pooling in POOLINGS]
        with timing_lock(args.timing_lock):
            bench["overhead"] = {one.model.pooling: overhead(args, one) for one in fresh}
        wall["overhead"] = time.perf_counter() - t0
        return write_record(out, bench, wall, start, report, load_before)

    t0 = time.perf_counter()
    bench["fine_tune"] = {}
    for v in args.variants:
        shared = bench["fine_tune"].get("two_stage") if v in SHARES_STAGE_ONE else None
        bench["fine_tune"][v] = fine_tune(args, data_dir, os.path.join(out, f"model-{v}"), bench["data"]["train_rows"],
                                          v, shared["output_dir"] if shared else None)
    wall["fine_tune"] = time.perf_counter() - t0

    bench["throughput"] = []
    t0 = time.perf_counter()
    if args.throughput_steps > 0:
        bench["throughput"] = throughput(args, data_dir, out)
        bench["throughput_padding"] = padding_stats(args, data_dir)
    wall["throughput"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Accuracy first (nothing timed), then every timing in one hold of the lock.
    loaded = {v: load_variant(args, data_dir, bench["fine_tune"][v]) for v in args.variants}
    bench["eval"] = {v: {task: {"accuracy": accuracy(args, one.model, features, task, one.chosen)}
                         for task, features in one.features.items()} for v, one in loaded.items()}
    with timing_lock(args.timing_lock):
        for v, one in loaded.items():
            for task, timing in time_variant(args, one, v in args.timed_variants).items():
                bench["eval"][v][task]["timing"] = timing
        # The last variant of each off-ramp pooling.
        last = {one.model.pooling: v for v, one in loaded.items()}
        bench["overhead"] = {v: overhead(args, loaded[v]) for v in last.values()}
    wall["eval"] = time.perf_counter() - t0
    return write_record(out, bench, wall, start, report, load_before)


if __name__ == "__main__":
    exit_with(run_cli(main))
