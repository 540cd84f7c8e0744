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

Prints a table and writes everything, with the environment, to <output_dir>/bench_results.json.

    python scripts/bench_distill.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --data_dir ../shared/data/lm/wikitext-2-raw --output_dir runs/bench-distill

Timings are single measurements on whatever else the machine is doing (no repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from common.args import answering_help
from common.bench import bench_parser, format_table, new_record, run_script, write_record
from common.errors import UserError, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from common.builtin.distill import train_masked_lm
    from common.distributed import DistContext
    from common.pretrained import check_model_folder
    from common.io import write_bytes_atomic, write_text_atomic

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
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
    args = parser.parse_args(argv)
    problems = [f"--{name} must be at least 1" for name in ("repeat", "distill_steps", "batch_size", "eval_lines",
                                                            "head_batch_size") if getattr(args, name) < 1]
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
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
