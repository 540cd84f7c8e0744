#!/usr/bin/env python
"""Benchmark DeeBERT early exit on a real GLUE task (`make bench`): accuracy against speed, and training speed.

Runs scripts/run_glue_early_exit.py, each time in a fresh process, several times:

1. fine-tunes the model with DeeBERT's two stages on a fixed-seed subset of the train file (written as a
   GLUE-format train.tsv, with a copy of the dev file, into <output_dir>/data/); stage two (the off-ramps)
   at its own, larger --stage2_learning_rate (the script's --off_ramp_learning_rate);
2. evaluates it on the whole dev set at each --eval_batch_sizes with an entropy sweep: metric, average exit
   layer, fraction of layer computations saved, wall time and speed-up over running all layers (plus the
   metric of every exit layer, once);
3. measures stage-one training throughput (examples/s) with every batch padded to --max_seq_length and with
   per-batch dynamic padding: short --throughput_steps runs on the same subset, --throughput_repeats of each
   in ABBA order (fixed, dynamic, dynamic, fixed, ...) so that a load that drifts during the runs hits both
   alike; each mode's figure is its examples over its seconds, summed over its runs.

Prints a table and writes everything, with the environment, to <output_dir>/bench_results.json.

    python scripts/bench_glue_early_exit.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --data_dir ../shared/data/glue/SST-2 --task_name sst-2 --output_dir runs/bench-glue

Timings are single measurements on whatever else the machine is doing (no repeats, no confidence interval;
the load average before and after is recorded); the evaluation warms the model up on one batch before its
timed passes, the training runs do not. torch runs one thread unless --torch_threads says otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from typing import Any, Sequence

from common.args import answering_help
from common.bench import abba_order, bench_parser, format_table, load_average, new_record, run_script, write_record
from common.data.glue_tasks import TASKS
from common.errors import UserError, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch

    from common.batches import epoch_batches
    from common.data import glue
    from common.data.glue import eval_tasks
    from common.distributed import DistContext
    from common.loaders import load_tokenizer
    from common.io import write_text_atomic
    from common.training import TrainConfig, plan_for_examples

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_glue_early_exit.py")
DEFAULT_ENTROPIES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "Folder of the pretrained BERT/RoBERTa model to fine-tune (e.g. all-MiniLM-L6-v2).")
    parser.add_argument("--data_dir", required=True, help="Folder with the task's GLUE train/dev .tsv files.")
    parser.add_argument("--task_name", default="sst-2", help="GLUE task: " + ", ".join(TASKS))
    parser.add_argument("--output_dir", default=os.path.join("runs", "bench-glue"),
                        help="Where the data subset, the models, the runs' outputs and bench_results.json go.")
    parser.add_argument("--train_examples", default=8000, type=int,
                        help="Train rows to sample (fixed seed) from the train file; 0 or more than it has: all.")
    parser.add_argument("--max_seq_length", default=64, type=int, help="Longest tokenized input; longer is cut.")
    parser.add_argument("--num_train_epochs", default=1.0, type=float, help="Epochs of each training stage.")
    parser.add_argument("--learning_rate", default=5e-5, type=float, help="Peak AdamW learning rate.")
    parser.add_argument("--stage2_learning_rate", default=2e-3, type=float,
                        help="Peak learning rate of stage two (the off-ramps, trained from scratch on the frozen "
                             "backbone: one short epoch at the fine-tuning rate leaves them near chance). 0: the "
                             "same as --learning_rate, in one run.")
    parser.add_argument("--warmup_proportion", default=0.1, type=float,
                        help="Fraction of each fine-tuning stage's steps spent warming the learning rate up.")
    parser.add_argument("--train_batch_size", default=32, type=int,
                        help="Training batch size (fine-tuning and the throughput runs).")
    parser.add_argument("--eval_batch_sizes", nargs="+", type=int, default=[1, 32],
                        help="Evaluation batch sizes; the early-exit sweep runs at each.")
    parser.add_argument("--early_exit_entropy", nargs="+", type=float, default=list(DEFAULT_ENTROPIES),
                        help="Entropy thresholds to sweep (0 never exits, but still pays for the off-ramps).")
    parser.add_argument("--throughput_steps", default=20, type=int,
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
                "stage2_learning_rate": (0, "0: the same as --learning_rate"), "train_batch_size": (1, "")}
    problems = [f"--{name} must be at least {low}" + (f" ({hint})" if hint else "")
                for name, (low, hint) in minimums.items() if getattr(args, name) < low]
    if any(b < 1 for b in args.eval_batch_sizes):
        problems.append("--eval_batch_sizes must all be at least 1")
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


def fine_tune(args: argparse.Namespace, data_dir: str, out: str, train_rows: int) -> dict[str, Any]:
    """DeeBERT's two stages, stage two (the off-ramps) at --stage2_learning_rate (run_glue_early_exit.py's
    --off_ramp_learning_rate) when that is not 0."""
    steps = stage_steps(args, train_rows)
    stage2_lr = args.stage2_learning_rate or args.learning_rate
    flags = [*common_flags(args, data_dir), "--num_train_epochs", str(args.num_train_epochs),
             "--warmup_steps", str(int(args.warmup_proportion * steps)),
             "--per_gpu_train_batch_size", str(args.train_batch_size), "--output_dir", out, "--overwrite_output_dir"]
    results, seconds = timed_main(args, ["--do_train", "--model_name_or_path", args.model_name_or_path, *flags,
                                         "--learning_rate", str(args.learning_rate),
                                         "--off_ramp_learning_rate", str(stage2_lr), "--save_steps", "0"])
    return {"output_dir": out, "stage1_learning_rate": args.learning_rate, "stage2_learning_rate": stage2_lr,
            "train": dict(results["train"]), "run_seconds": [seconds]}


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


def evaluate(args: argparse.Namespace, data_dir: str, model_dir: str, out: str, batch_size: int,
             each_highway: bool) -> tuple[dict[str, Any], float]:
    argv = ["--do_eval", "--model_name_or_path", model_dir, "--output_dir", out, *common_flags(args, data_dir),
            "--per_gpu_eval_batch_size", str(batch_size),
            "--early_exit_entropy", *(f"{e:g}" for e in args.early_exit_entropy)]
    return timed_main(args, argv + (["--eval_each_highway"] if each_highway else []))


# ----------------------------------------------------------------------------------------------------------
# report


def report(bench: dict[str, Any]) -> str:
    cfg, data, env = bench["config"], bench["data"], bench["environment"]
    out = [f"DeeBERT early-exit benchmark: {cfg['task_name']}, model {cfg['model_name_or_path']}",
           f"train rows {data['train_rows']} of {data['train_rows_in_source']} (seed {cfg['seed']}), dev rows "
           + ", ".join(f"{t} {n}" for t, n in data["dev_rows"].items())
           + f", max_seq_length {cfg['max_seq_length']}, {cfg['num_train_epochs']:g} epoch(s), "
           f"lr {cfg['learning_rate']:g}, train batch {cfg['train_batch_size']}",
           f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_count']} CPU(s), "
           f"{env['torch_threads']} torch thread(s), device {env['device']}",
           f"load average (1/5/15 min) before {env['load_average_1_5_15min_before']}, after "
           f"{env['load_average_1_5_15min_after']}: other jobs on the machine slow every timing",
           "Timings are single measurements."]
    ft = bench["fine_tune"]
    stages = [("stage1", ft["train"]["stage1"], ft["stage1_learning_rate"]),
              ("stage2", ft["train"]["stage2"], ft["stage2_learning_rate"])]
    if "discarded_stage2" in ft:
        stages.append(("stage2 (discarded)", ft["discarded_stage2"], ft["stage1_learning_rate"]))
    out += ["", "Fine-tuning (dynamic padding; stage one = backbone + head, stage two = off-ramps, backbone frozen)",
            format_table(["stage", "lr", "steps", "seconds", "examples/s", "avg loss"],
                         [[name, f"{lr:g}", s["global_step"], f"{s['seconds']:.1f}", f"{s['examples_per_second']:.1f}",
                           f"{s['average_loss']:.4f}"] for name, s, lr in stages])]
    for task_name, by_bs in bench["eval"].items():
        first = next(iter(by_bs.values()))
        primary = first["primary_metric"]
        per_layer = next((r["per_layer"] for r in by_bs.values() if "per_layer" in r), None)
        if per_layer:
            out += ["", f"{task_name}: {primary} of each exit layer (full dev set)",
                    format_table(["layer"] + [str(p["layer"]) for p in per_layer],
                                 [[primary] + [f"{100 * p[primary]:.2f}" for p in per_layer]])]
        rows = []
        for bs, res in by_bs.items():
            rows.append([bs, "all layers", f"{100 * res['metrics'][primary]:.2f}", f"{res['num_layers']:.2f}",
                         "0.0%", f"{res['seconds_all_layers']:.2f}", "1.00x"])
            for p in res.get("early_exit", []):
                rows.append([bs, f"{p['threshold']:g}", f"{100 * p['metric']:.2f}", f"{p['avg_exit_layer']:.2f}",
                             f"{100 * p['layers_saved_fraction']:.1f}%", f"{p['seconds']:.2f}",
                             f"{p['speedup']:.2f}x"])
        out += ["", f"{task_name}: early exit on the dev set ({first['num_examples']} examples, "
                f"{first['num_layers']} layers), speed-up over all layers at the same batch size",
                format_table(["batch", "entropy", primary, "avg exit layer", "layers saved", "seconds", "speed-up"],
                             rows)]
    if bench["throughput"]:
        base = bench["throughput"][0]["stage1"]["examples_per_second"]
        out += ["", f"Training throughput, {cfg['throughput_repeats']} run(s) of {cfg['throughput_steps']} steps per "
                f"padding mode in ABBA order, batch {cfg['train_batch_size']} (no warm-up; stage two = frozen "
                "backbone, off-ramps only)",
                format_table(["padding", "stage1 steps", "stage1 s", "stage1 examples/s", "per run", "vs fixed",
                              "stage2 examples/s"],
                             [[t["padding"], t["stage1"]["global_step"], f"{t['stage1']['seconds']:.1f}",
                               f"{t['stage1']['examples_per_second']:.1f}",
                               " / ".join(f"{r['stage1']['examples_per_second']:.1f}" for r in t["runs"]),
                               f"{t['stage1']['examples_per_second'] / base:.2f}x",
                               f"{t['stage2']['examples_per_second']:.1f}"] for t in bench["throughput"]])]
        pad = bench["throughput_padding"]
        out += [f"tokens per row in those batches: real {pad['real_tokens_per_row']:.1f}, dynamic padding "
                f"{pad['dynamic_padded_tokens_per_row']:.1f}, fixed {pad['fixed_padded_tokens_per_row']:g} "
                f"(dynamic = {100 * pad['dynamic_over_fixed']:.0f}% of fixed)"]
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
    bench["data"] = write_subset(args, data_dir)
    print(f"Wrote {bench['data']['train_rows']} train rows and the dev file(s) to {data_dir}", flush=True)

    model_dir = os.path.join(out, "model")
    t0 = time.perf_counter()
    bench["fine_tune"] = fine_tune(args, data_dir, model_dir, bench["data"]["train_rows"])
    wall["fine_tune"] = time.perf_counter() - t0

    bench["throughput"] = []
    t0 = time.perf_counter()
    if args.throughput_steps > 0:
        bench["throughput"] = throughput(args, data_dir, out)
        bench["throughput_padding"] = padding_stats(args, data_dir)
    wall["throughput"] = time.perf_counter() - t0

    bench["eval"] = {}
    t0 = time.perf_counter()
    for bs in args.eval_batch_sizes:
        # Per-layer metrics do not depend on the batch size: computed once, with the largest one (fastest).
        each = bs == max(args.eval_batch_sizes)
        results, seconds = evaluate(args, data_dir, model_dir, os.path.join(out, f"eval-bs{bs}"), bs, each)
        for task_name, res in results["eval"].items():
            bench["eval"].setdefault(task_name, {})[str(bs)] = {**res, "run_seconds": seconds}
    wall["eval"] = time.perf_counter() - t0
    return write_record(out, bench, wall, start, report, load_before)


if __name__ == "__main__":
    sys.exit(run_cli(main))
