#!/usr/bin/env python
"""Benchmark the distillation tools on WikiText-2 (`make bench`): binarization throughput and memory, and
distillation throughput with and without length-grouped batches.

1. Binarization: scripts/binarize_data.py in a fresh process on wiki.test.raw, and on the same text repeated
   --repeat times, each reporting lines/s and its peak resident memory (flat memory shows as the same peak
   for both sizes: the file is streamed).
2. Teacher: the model (all-MiniLM-L6-v2 by default, a BERT encoder saved without its masked-LM head) gets a fresh
   LM head, trained for --head_steps masked-LM steps on wiki.test with the encoder frozen (so the teacher's
   predictions mean something; the encoder is untouched), then saved as a BertForMaskedLM.
3. Student: scripts/extract_student.py makes a DistilBERT from teacher layers (half of them, first and last
   included), the trained head transform copied (--vocab_transform).
4. Distillation: scripts/distill.py for --distill_steps steps on wiki.test, once with length-grouped batches
   (the default) and once with --no_group_by_size: tokens/s (real tokens, padding excluded) and the share of
   each batch that is padding. The grouped run then evaluates student and teacher on the first --eval_lines
   lines of wiki.valid (masked-LM perplexity, size, speed).

With --compare_with <another checkout of this project> it measures instead, side by side in ABBA order, that
checkout's scripts/distill.py (A) and this one's (B) at the settings of the original distillation/train.py run:
the first --compare_lines lines of wiki.valid.raw, the teacher with a fresh masked-LM head seeded with --seed
(untrained), a 3-layer DistilBERT student from its layers 0, 2 and 4, batch 5, accumulation 5, lr 5e-4, alpha_ce
5, alpha_mlm 2, alpha_cos 1, temperature 2, --freeze_pos_embs, --compare_threads threads, for --compare_steps
optimizer steps: training tokens/s (real tokens; both sides see the same batches) and each process's peak
resident memory (its own, from wait4).

Prints a table and writes everything, with the environment, to <output_dir>/bench_results.json.

    python scripts/bench_distill.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --data_dir ../shared/data/lm/wikitext-2-raw --output_dir runs/bench-distill
    python scripts/bench_distill.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --data_dir ../shared/data/lm/wikitext-2-raw --output_dir runs/bench-distill-compare \\
        --compare_with <checkout of the commit before> --seed 56

Timings are single measurements on whatever else the machine is doing (no repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from common.args import answering_help
from common.bench import abba_order, bench_parser, format_table, load_average, new_record, run_script, write_record
from common.errors import RESULTS_ENV, UserError, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from common.builtin.distill import train_masked_lm
    from common.distributed import DistContext
    from common.data import lm
    from common.pretrained import check_model_folder
    from common.io import write_bytes_atomic, write_text_atomic

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
BINARIZE = os.path.join(SCRIPTS, "binarize_data.py")
TOKEN_COUNTS = os.path.join(SCRIPTS, "token_counts.py")
EXTRACT_STUDENT = os.path.join(SCRIPTS, "extract_student.py")
DISTILL = os.path.join(SCRIPTS, "distill.py")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "Teacher folder: a BERT encoder (its masked-LM head, if any, is replaced).")
    parser.add_argument("--data_dir", required=True,
                        help="Folder with WikiText-2 raw: wiki.test.raw and wiki.valid.raw.")
    parser.add_argument("--output_dir", default=os.path.join("runs", "bench-distill"),
                        help="Where the binarized data, models, runs and bench_results.json go.")
    parser.add_argument("--repeat", default=8, type=int,
                        help="The larger binarization input: wiki.test.raw repeated this many times.")
    parser.add_argument("--max_seq_length", default=128, type=int, help="Longest sequence (longer ones are split).")
    parser.add_argument("--head_steps", default=100, type=int,
                        help="Masked-LM steps training the teacher's new head (0: a random head).")
    parser.add_argument("--head_batch_size", default=16, type=int, help="Sequences per head-training batch.")
    parser.add_argument("--head_learning_rate", default=5e-3, type=float, help="Peak learning rate of the head.")
    parser.add_argument("--distill_steps", default=16, type=int, help="Optimizer steps of each distillation run.")
    parser.add_argument("--batch_size", default=8, type=int, help="Sequences per batch.")
    parser.add_argument("--eval_lines", default=200, type=int,
                        help="Lines of wiki.valid.raw (blank ones included) for the perplexity evaluation.")
    parser.add_argument("--seed", default=42, type=int, help="Seed of the head training and distillation.")
    parser.add_argument("--compare_with", default=None,
                        help="Another checkout of this project (e.g. the commit before): measure its distill.py "
                             "against this one's at the original train.py settings, instead of the default bench.")
    parser.add_argument("--compare_steps", default=10, type=int, help="Optimizer steps of each compared run.")
    parser.add_argument("--compare_lines", default=3000, type=int, help="Lines of wiki.valid.raw to train on.")
    parser.add_argument("--compare_repeats", default=2, type=int,
                        help="Runs of each side, in ABBA order (2: A B B A).")
    parser.add_argument("--compare_threads", default=2, type=int, help="Torch threads of each compared run.")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be at least 1" for name in ("repeat", "distill_steps", "batch_size", "eval_lines",
                                                            "head_batch_size", "compare_steps", "compare_lines",
                                                            "compare_repeats", "compare_threads")
                if getattr(args, name) < 1]
    if args.compare_with is not None and not os.path.isfile(os.path.join(args.compare_with, "scripts", "distill.py")):
        problems.append(f"--compare_with {args.compare_with}: no scripts/distill.py there (give a checkout of this "
                        "project)")
    if not args.head_learning_rate > 0:
        problems.append("--head_learning_rate must be positive")
    if args.head_steps < 0:
        problems.append("--head_steps cannot be negative")
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        if not os.path.isfile(os.path.join(args.data_dir, name)):
            problems.append(f"{os.path.join(args.data_dir, name)} not found: --data_dir should hold WikiText-2 raw")
    if problems:
        raise UserError("; ".join(problems))
    check_model_folder(args.model_name_or_path)
    return args


def binarize_in_subprocess(text: str, tokenizer: str, dump: str) -> dict[str, Any]:
    """scripts/binarize_data.py in a fresh process, so its peak memory is its own."""
    argv = ["--file_path", text, "--tokenizer_name", tokenizer, "--dump_file", dump]
    result, seconds = run_script(BINARIZE, argv, env={"TRANSFORMERS_VERBOSITY": "error"}, quiet=True)
    return {**result, "process_seconds": seconds, "text_bytes": os.path.getsize(text)}


def repeat_file(source: str, dest: str, times: int) -> str:
    with open(source, "rb") as f:
        data = f.read()
    write_bytes_atomic(dest, [data] * times)
    return dest


def head_lines(source: str, dest: str, n: int) -> str:
    with open(source, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(n), f)]
    write_text_atomic(dest, "".join(lines))
    return dest


def prepare_teacher(args: argparse.Namespace, data_file: str, dest: str) -> dict[str, Any]:
    """The encoder with a fresh masked-LM head, the head trained (encoder frozen), saved as a BertForMaskedLM."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    torch.manual_seed(args.seed)
    model = BertForMaskedLM.from_pretrained(args.model_name_or_path)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("cls.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info: dict[str, Any] = {"head_steps": args.head_steps, "trainable_parameters": trainable}
    if args.head_steps > 0:
        ctx = DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        result = train_masked_lm(ctx, model.to(ctx.device), data_file, tokenizer, args.head_steps,
                                 args.head_learning_rate, args.head_batch_size, args.max_seq_length, dest,
                                 seed=args.seed)
        info.update(seconds=result.seconds, average_loss=result.average_loss)
        model = model.cpu()
    model.requires_grad_(True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return info


def distill_run(args: argparse.Namespace, files: dict[str, str], out: str, grouped: bool,
                eval_file: str | None) -> dict[str, Any]:
    argv = ["--teacher_name", files["teacher"], "--student_pretrained_weights", files["student"], "--data_file",
            files["data"], "--token_counts", files["counts"], "--output_dir", out, "--overwrite_output_dir", "--mlm",
            "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_cos", "1.0", "--freeze_pos_embs",
            "--max_steps", str(args.distill_steps), "--batch_size", str(args.batch_size),
            "--gradient_accumulation_steps", "1", "--max_model_input_size", str(args.max_seq_length),
            "--log_interval", "2", "--checkpoint_interval", "0", "--seed", str(args.seed),
            "--per_gpu_eval_batch_size", "32", "--group_by_size" if grouped else "--no_group_by_size"]
    results, seconds = run_script(DISTILL, argv + (["--eval_file", eval_file] if eval_file else []))
    results["run_seconds"] = seconds
    log = os.path.join(out, "log_history.jsonl")
    results["memory_rss_mb_logged"] = []
    if os.path.isfile(log):
        with open(log, encoding="utf-8") as f:
            results["memory_rss_mb_logged"] = [json.loads(line).get("memory_rss_mb") for line in f]
    return results


def report(bench: dict[str, Any]) -> str:
    cfg, env = bench["config"], bench["environment"]
    out = [f"Distillation benchmark: teacher {cfg['model_name_or_path']}, WikiText-2 raw in {cfg['data_dir']}",
           f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_count']} CPU(s), "
           f"{env['torch_threads']} torch thread(s), device {env['device']}. Timings are single measurements.",
           "", "Binarization (scripts/binarize_data.py in a fresh process; peak = its peak resident memory)"]
    rows = [[b["name"], b["lines"], b["tokens"], f"{b['text_bytes'] / 1e6:.1f} MB", f"{b['seconds']:.1f}",
             f"{b['lines_per_second']:.0f}", f"{b['peak_rss_mb']:.0f} MB"] for b in bench["binarize"]]
    out.append(format_table(["input", "lines", "tokens", "text", "seconds", "lines/s", "peak memory"], rows))
    teacher = bench["teacher"]
    out += ["", f"Teacher: new masked-LM head trained {teacher['head_steps']} steps on wiki.test (encoder frozen, "
            f"{teacher['trainable_parameters'] / 1e6:.2f}M trainable parameters"
            + (f", {teacher['seconds']:.0f}s, average loss {teacher['average_loss']:.3f})" if "seconds" in teacher
               else ")")]
    rows = []
    for run in bench["distill"]:
        t = run["train"]
        memory = [m for m in run["memory_rss_mb_logged"] if m]
        rows.append(["on" if t["group_by_size"] else "off", t["global_step"], f"{t['seconds']:.1f}",
                     f"{t['tokens_per_second']:.0f}", f"{100 * t['padding_share']:.1f}%",
                     f"{min(memory):.0f}-{max(memory):.0f} MB" if memory else "-"])
    out += ["", f"Distillation, {cfg['distill_steps']} steps of {cfg['batch_size']} sequences (max "
            f"{cfg['max_seq_length']} tokens), DistilBERT student from the teacher's layers",
            format_table(["group_by_size", "steps", "seconds", "tokens/s", "padding", "resident memory"], rows)]
    base = bench["distill"][1]["train"]["tokens_per_second"]
    out.append(f"length grouping: {bench['distill'][0]['train']['tokens_per_second'] / base:.2f}x the tokens/s")
    ev = bench["distill"][0].get("eval")
    if ev:
        rows = [[name, f"{ev[name]['perplexity']:.2f}", f"{ev[name]['parameters'] / 1e6:.1f}M",
                 f"{ev[name]['seconds']:.1f}", f"{ev[name]['tokens_per_second']:.0f}"]
                for name in ("teacher", "student")]
        s = ev["student_vs_teacher"]
        out += ["", f"Held-out masked-LM perplexity ({ev['sequences']} sequences of wiki.valid, 15% masked) after "
                f"{cfg['distill_steps']} distillation steps",
                format_table(["model", "perplexity", "parameters", "seconds", "tokens/s"], rows),
                f"student: {100 * s['parameters']:.0f}% of the teacher's parameters, {s['speedup']:.2f}x its speed"]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# --compare_with: this checkout against another at the original train.py settings


def run_measured(checkout: str, argv: Sequence[str], threads: int) -> dict[str, Any]:
    """`checkout`'s scripts/distill.py in a fresh process (its own `common` first on the path): what its main()
    returned, the process's wall seconds, CPU seconds and peak resident memory (wait4: this child alone)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results_file = os.path.join(tmp, "results.json")
        env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY":
               "error", RESULTS_ENV: results_file}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(checkout, "scripts", "distill.py"), *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise UserError(f"{checkout}/scripts/distill.py failed with exit code {proc.returncode}: {stderr[-2000:]}")
        with open(results_file, encoding="utf-8") as f:
            results = json.load(f)
    peak_kb = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"train": results["train"], "process_seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": peak_kb / 1024}


def measured_batches(data_file: str, tokenizer: Any, max_positions: int, steps: int, batch_size: int,
                     accumulation: int, seed: int) -> dict[str, int]:
    """The longest sequence in the micro-batches the compared runs take, and in the whole epoch (peak memory
    follows the longest batch: a short run measures the steady state only if it meets one as long)."""
    max_len = min(tokenizer.model_max_length, max_positions)  # what distill.py takes when not told
    data = lm.LmDataset(lm.TokenFile(data_file), max_len, tokenizer.unk_token_id)
    batches = lm.LmBatches(data, batch_size, seed, tokenizer.pad_token_id, lambda i, m: (i, m), True, max_len)
    epoch = batches.epoch(0, DistContext(device=torch.device("cpu")))
    longest = [max(int(data.lengths[i]) for i in b) for b in epoch]
    return {"sequences": len(data), "micro_batches_measured": steps * accumulation,
            "longest_measured": max(longest[:steps * accumulation]), "longest_in_epoch": max(longest)}


def compare(args: argparse.Namespace, start: float) -> dict[str, Any]:
    out = args.output_dir
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    bench = new_record("bench_distill.py", args, None)
    load_before = load_average()
    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    text = head_lines(os.path.join(args.data_dir, "wiki.valid.raw"), os.path.join(data_dir, "valid.head.raw"),
                      args.compare_lines)
    data = binarize_in_subprocess(text, args.model_name_or_path, os.path.join(data_dir, "valid"))["output"]
    counts = os.path.join(data_dir, "valid.counts.safetensors")
    run_script(TOKEN_COUNTS, ["--data_file", data, "--token_counts_dump", counts], quiet=True)
    teacher, student = os.path.join(out, "teacher"), os.path.join(out, "student")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    torch.manual_seed(args.seed)  # the head's initialization
    model = BertForMaskedLM.from_pretrained(args.model_name_or_path)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    run_script(EXTRACT_STUDENT, ["--model_name", teacher, "--layers", "0", "2", "4", "--vocab_transform",
                                 "--dump_checkpoint", student], quiet=True)
    wall["prepare"] = time.perf_counter() - t0
    bench["batches"] = measured_batches(data, tokenizer, model.config.max_position_embeddings, args.compare_steps, 5,
                                        5, args.seed)
    argv = ["--teacher_name", teacher, "--student_pretrained_weights", student, "--data_file", data,
            "--token_counts", counts, "--overwrite_output_dir", "--mlm", "--alpha_ce", "5", "--alpha_mlm", "2",
            "--alpha_cos", "1", "--temperature", "2", "--freeze_pos_embs", "--seed", str(args.seed),
            "--batch_size", "5", "--gradient_accumulation_steps", "5", "--learning_rate", "5e-4",
            "--max_steps", str(args.compare_steps), "--checkpoint_interval", "0", "--log_interval",
            str(args.compare_steps), "--disable_tqdm"]
    sides = {"before": os.path.abspath(args.compare_with), "this": ROOT}
    t0 = time.perf_counter()
    bench["compare"] = []
    for i, this in enumerate(abba_order(args.compare_repeats)):
        name = "this" if this else "before"
        result = run_measured(sides[name], argv + ["--output_dir", os.path.join(out, f"run-{i}-{name}")],
                              args.compare_threads)
        bench["compare"].append({"side": name, "checkout": sides[name], **result})
        t = result["train"]
        print(f"{name}: {t['tokens_this_run']} tokens, {t['tokens_per_second']:.0f} tokens/s, "
              f"{result['cpu_seconds']:.0f} CPU seconds, peak {result['peak_rss_mb']:.0f} MB (load "
              f"{load_average()})", flush=True)
    wall["compare"] = time.perf_counter() - t0
    tokens = {r["train"]["tokens_this_run"] for r in bench["compare"]}
    if len(tokens) != 1:
        raise UserError(f"the compared runs trained on different token counts ({sorted(tokens)})")
    return write_record(out, bench, wall, start, compare_report, load_before)


def compare_report(bench: dict[str, Any]) -> str:
    cfg, b = bench["config"], bench["batches"]
    runs = bench["compare"]
    mean = {side: {k: sum(f(r) for r in runs if r["side"] == side) / sum(r["side"] == side for r in runs)
                   for k, f in (("tps", lambda r: r["train"]["tokens_per_second"]),
                                ("cpu", lambda r: r["cpu_seconds"]), ("peak", lambda r: r["peak_rss_mb"]))}
            for side in ("before", "this")}
    rows = [[r["side"], r["train"]["tokens_this_run"], f"{r['train']['seconds']:.1f}",
             f"{r['train']['tokens_per_second']:.0f}", f"{r['cpu_seconds']:.0f}", f"{r['peak_rss_mb'] / 1024:.2f} GB"]
            for r in runs]
    env = bench["environment"]
    return "\n".join([
        f"Distillation side by side (ABBA), {cfg['compare_steps']} steps of 5 x 5 sequences of the first "
        f"{cfg['compare_lines']} lines of wiki.valid.raw ({b['sequences']} sequences); {cfg['compare_threads']} "
        f"threads; load {env['load_average_1_5_15min_before']} before, {env['load_average_1_5_15min_after']} after",
        f"before: {cfg['compare_with']}; this: {ROOT}. Longest sequence in the measured micro-batches "
        f"{b['longest_measured']} tokens (the epoch's: {b['longest_in_epoch']}).",
        format_table(["side", "tokens", "train seconds", "tokens/s", "process CPU seconds", "peak resident"], rows),
        f"this / before: {mean['this']['tps'] / mean['before']['tps']:.2f}x the tokens/s, "
        f"{mean['before']['cpu'] / mean['this']['cpu']:.2f}x fewer CPU seconds (whole process), "
        f"{mean['this']['peak'] / mean['before']['peak']:.2f}x the peak memory "
        f"({mean['before']['peak'] / 1024:.2f} -> {mean['this']['peak'] / 1024:.2f} GB)"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.compare_with is not None:
        return compare(args, start)
    out = args.output_dir
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    wall: dict[str, float] = {}
    bench = new_record("bench_distill.py", args, argv)
    test_raw = os.path.join(args.data_dir, "wiki.test.raw")

    t0 = time.perf_counter()
    big = repeat_file(test_raw, os.path.join(data_dir, f"wiki.test.x{args.repeat}.raw"), args.repeat)
    bench["binarize"] = [
        {"name": "wiki.test.raw", **binarize_in_subprocess(test_raw, args.model_name_or_path,
                                                           os.path.join(data_dir, "wiki.test"))},
        {"name": f"wiki.test.raw x{args.repeat}", **binarize_in_subprocess(big, args.model_name_or_path,
                                                                           os.path.join(data_dir, "big"))},
    ]
    os.remove(bench["binarize"][1]["output"])  # only measured
    wall["binarize"] = time.perf_counter() - t0
    for b in bench["binarize"]:
        print(f"binarized {b['name']}: {b['lines']} lines in {b['seconds']:.1f}s ({b['lines_per_second']:.0f} "
              f"lines/s), peak {b['peak_rss_mb']:.0f} MB", flush=True)

    files = {"data": bench["binarize"][0]["output"], "teacher": os.path.join(out, "teacher"),
             "student": os.path.join(out, "student"), "counts": os.path.join(data_dir, "wiki.test.counts.safetensors")}
    t0 = time.perf_counter()
    bench["teacher"] = prepare_teacher(args, files["data"], files["teacher"])
    wall["teacher_head"] = time.perf_counter() - t0
    run_script(TOKEN_COUNTS, ["--data_file", files["data"], "--token_counts_dump", files["counts"]])
    bench["student"], _ = run_script(EXTRACT_STUDENT, ["--model_name", files["teacher"], "--vocab_transform",
                                                       "--dump_checkpoint", files["student"]])
    eval_file = head_lines(os.path.join(args.data_dir, "wiki.valid.raw"), os.path.join(data_dir, "valid.head.raw"),
                           args.eval_lines)

    t0 = time.perf_counter()
    bench["distill"] = [distill_run(args, files, os.path.join(out, "distill-grouped"), True, eval_file),
                        distill_run(args, files, os.path.join(out, "distill-ungrouped"), False, None)]
    wall["distill"] = time.perf_counter() - t0
    return write_record(out, bench, wall, start, report)


if __name__ == "__main__":
    sys.exit(run_cli(main))
