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
resident memory (its own, from wait4). With --compare_largest N both sides train instead on the sequences of the
epoch's N micro-batches with the most padded tokens, written to a file of their own: the peak memory of the
epoch's largest batches, in a few steps (a lower bound of a whole epoch's: at the issue's settings the epoch ran
0.45 GB higher, the allocator keeping memory from its many batch shapes). The micro-batches at the epoch's end that fill
no accumulation are candidates too: the loop leaves them out, but with length-grouped batches the last one holds
the longest sequences, which the original distiller did train on.

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
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from common.args import answering_help
from common.bench import (
    abba_order, add_timing_lock_arg, bench_parser, format_table, load_average, new_record, run_script, timing_lock,
    write_record,
)
from common.errors import RESULTS_ENV, UserError, exit_with, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    import distill
    from common.builtin.distill import train_masked_lm
    from common.distillation import hidden_cosine, lm_cross_entropy, soft_cross_entropy
    from common.matmul_ceiling import MatmulRecorder, replay_seconds
    from common.models.student import load_teacher
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
    parser.add_argument("--compare_steps", default=10, type=int,
                        help="Optimizer steps of each compared run (60: the whole epoch of the default 3,000 lines).")
    parser.add_argument("--this_flags", default="",
                        help="More distill.py flags for this checkout's runs only, as one string (e.g. "
                             "\"--malloc_hold_mb 0\" with --compare_with this same checkout).")
    parser.add_argument("--compare_lines", default=3000, type=int, help="Lines of wiki.valid.raw to train on.")
    parser.add_argument("--compare_repeats", default=2, type=int,
                        help="Runs of each side, in ABBA order (2: A B B A).")
    parser.add_argument("--compare_threads", default=2, type=int, help="Torch threads of each compared run.")
    parser.add_argument("--compare_limit", action="store_true",
                        help="Also measure the compared work in the barest stock-PyTorch loop (chunked losses and "
                             "whole logits) and its matrix-multiply ceiling (its matrix products alone).")
    parser.add_argument("--compare_largest", default=0, type=int,
                        help="Train both compared sides only on the sequences of the N micro-batches of the epoch "
                             "with the most padded tokens (those at its end that fill no accumulation included): the "
                             "peak memory of the epoch's largest batches in a few steps (a whole epoch's is higher: "
                             "the allocator keeps memory from its many batch shapes; 0: the data from its start).")
    add_timing_lock_arg(parser)
    args = parser.parse_args(argv)
    problems = [f"--{name} must be at least 1" for name in ("repeat", "distill_steps", "batch_size", "eval_lines",
                                                            "head_batch_size", "compare_steps", "compare_lines",
                                                            "compare_repeats", "compare_threads")
                if getattr(args, name) < 1]
    if args.compare_largest < 0:
        problems.append("--compare_largest cannot be negative")
    compare_only = [f"--{name}" for name in ("compare_limit", "compare_largest", "this_flags") if getattr(args, name)]
    if compare_only and args.compare_with is None:
        problems.append(f"{', '.join(compare_only)} only mean something with --compare_with <checkout> (the side by "
                        "side run they change); without it the bench runs its default measurements")
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
    returned, the process's wall seconds, CPU seconds, peak resident memory and minor page faults (wait4: this
    child alone)."""
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
            "system_cpu_seconds": usage.ru_stime, "peak_rss_mb": peak_kb / 1024, "minor_page_faults": usage.ru_minflt}


def planned_micro_batches(data: Any, tokenizer: Any, max_len: int, steps: int | None, batch_size: int,
                          accumulation: int, seed: int) -> list[np.ndarray]:
    """The micro-batches (example indices) that distill.py takes from `data` in a single-process run of `steps`
    optimizer steps, length-grouped as by default; None: every micro-batch of the first epoch, also those that
    fill no accumulation at its end, which the loop leaves out (the original distiller ran them)."""
    source = lm.LmBatches(data, batch_size, seed, tokenizer.pad_token_id, lambda i, m: (i, m), True, max_len)
    ctx = DistContext(device=torch.device("cpu"))
    if steps is None:
        return [np.asarray(b, dtype=np.int64) for b in source.epoch(0, ctx)]
    per_epoch = source.batches_per_epoch(ctx) // accumulation
    return list(source.planned_batches(1, steps, per_epoch, accumulation))


def largest_batches(batches: Sequence[np.ndarray], lengths: np.ndarray, n: int) -> list[np.ndarray]:
    """The `n` batches with the most padded tokens (sequences x longest length; then the most real tokens), in
    their order: those that set the peak memory of a run through all of `batches`."""
    size = [(len(b) * int(lengths[b].max()), int(lengths[b].sum())) for b in batches]
    chosen = sorted(sorted(range(len(batches)), key=lambda i: size[i], reverse=True)[:n])
    return [batches[i] for i in chosen]


def batch_shapes(batches: Sequence[np.ndarray], lengths: np.ndarray) -> dict[str, int]:
    """The longest sequence and the largest padded micro-batch (sequences x longest length) of `batches`."""
    return {"longest": max(int(lengths[b].max()) for b in batches),
            "largest_padded": max(len(b) * int(lengths[b].max()) for b in batches)}


def compared_argv(teacher: str, student: str, data: str, counts: str, seed: int, steps: int) -> list[str]:
    """distill.py's flags at the settings of the original train.py run (no --output_dir)."""
    return ["--teacher_name", teacher, "--student_pretrained_weights", student, "--data_file", data,
            "--token_counts", counts, "--overwrite_output_dir", "--mlm", "--alpha_ce", "5", "--alpha_mlm", "2",
            "--alpha_cos", "1", "--temperature", "2", "--freeze_pos_embs", "--seed", str(seed), "--batch_size", "5",
            "--gradient_accumulation_steps", "5", "--learning_rate", "5e-4", "--max_steps", str(steps),
            "--checkpoint_interval", "0", "--log_interval", str(steps), "--disable_tqdm"]


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
    max_len = min(tokenizer.model_max_length, model.config.max_position_embeddings)  # what distill.py takes
    epoch_data = lm.LmDataset(lm.TokenFile(data), max_len, tokenizer.unk_token_id)
    epoch = planned_micro_batches(epoch_data, tokenizer, max_len, None, 5, 5, args.seed)
    trained = planned_micro_batches(epoch_data, tokenizer, max_len, len(epoch) // 5, 5, 5, args.seed)
    train_data = epoch_data
    if args.compare_largest:  # both sides train on the sequences of the epoch's largest micro-batches alone
        largest = largest_batches(epoch, epoch_data.lengths, args.compare_largest)
        data = os.path.join(data_dir, f"valid.largest{args.compare_largest}.bin")
        lm.write_items(epoch_data, np.concatenate(largest), data)
        train_data = lm.LmDataset(lm.TokenFile(data), max_len, tokenizer.unk_token_id)
    measured = planned_micro_batches(train_data, tokenizer, max_len, args.compare_steps, 5, 5, args.seed)
    bench["batches"] = {"sequences": len(epoch_data), "tokens": int(epoch_data.lengths.sum()),
                        "sequences_trained_on": len(train_data), "micro_batches_measured": len(measured),
                        "measured": batch_shapes(measured, train_data.lengths),
                        "epoch": batch_shapes(epoch, epoch_data.lengths),
                        "epoch_trained": batch_shapes(trained, epoch_data.lengths)}
    wall["prepare"] = time.perf_counter() - t0
    argv = compared_argv(teacher, student, data, counts, args.seed, args.compare_steps)
    sides = {"before": os.path.abspath(args.compare_with), "this": ROOT}
    t0 = time.perf_counter()
    bench["compare"] = []
    extra = {"before": [], "this": shlex.split(args.this_flags)}
    for i, this in enumerate(abba_order(args.compare_repeats)):
        name = "this" if this else "before"
        with timing_lock(args.timing_lock):  # one hold per run: other benchmarks may time between them
            load_start = load_average()
            result = run_measured(sides[name], [*argv, *extra[name], "--output_dir",
                                                os.path.join(out, f"run-{i}-{name}")], args.compare_threads)
        bench["compare"].append({"side": name, "checkout": sides[name], "flags": extra[name],
                                 "load_start": load_start, "load_end": load_average(), **result})
        t = result["train"]
        print(f"{name}: {t['tokens_this_run']} tokens, {t['tokens_per_second']:.0f} tokens/s, "
              f"{result['cpu_seconds']:.0f} CPU seconds, peak {result['peak_rss_mb']:.0f} MB, "
              f"{result['minor_page_faults']} minor page faults (load {load_start} at the start, "
              f"{load_average()} at the end)", flush=True)
    wall["compare"] = time.perf_counter() - t0
    if args.compare_limit:
        t0 = time.perf_counter()
        with timing_lock(args.timing_lock):
            bench["limit"] = limit(argv, out, args.compare_threads, args.compare_repeats)
        wall["limit"] = time.perf_counter() - t0
    tokens = {r["train"]["tokens_this_run"] for r in bench["compare"]}
    if len(tokens) != 1:
        raise UserError(f"the compared runs trained on different token counts ({sorted(tokens)})")
    return write_record(out, bench, wall, start, compare_report, load_before)


# ----------------------------------------------------------------------------------------------------------
# --compare_limit: what the work costs done as barely as stock PyTorch allows, and its matrix products alone


def whole_logits_step(losses: Any, teacher: Any) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The loss mix on whole logits (common.distillation's straightforward functions), the teacher under
    inference_mode: the stock-PyTorch formulation the chunked one replaced (MLM student)."""
    def step(model: Any, batch: dict[str, torch.Tensor], state: Any = None):
        ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hidden = losses.alpha_cos > 0
        s = model(input_ids=ids, attention_mask=attention, output_hidden_states=hidden)
        with torch.inference_mode():
            t = teacher(input_ids=ids, attention_mask=attention, output_hidden_states=hidden)
        rows = (labels != -100) if losses.restrict_ce_to_mask else attention.bool()
        terms = {"loss_ce": soft_cross_entropy(s.logits, t.logits, losses.temperature, rows),
                 "loss_mlm": lm_cross_entropy(s.logits, labels, causal=False)}
        total = losses.alpha_ce * terms["loss_ce"] + losses.alpha_mlm * terms["loss_mlm"]
        if hidden:
            terms["loss_cos"] = hidden_cosine(s.hidden_states[-1], t.hidden_states[-1].clone(), attention)
            total = total + losses.alpha_cos * terms["loss_cos"]
        return total, terms
    return step


def bare_loop(student: Any, step: Callable[..., Any], batches: Sequence[dict[str, torch.Tensor]],
              dargs: argparse.Namespace) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of the barest training loop over collated `batches`: the
    loss step, backward of the loss over the accumulation, gradient clipping and an AdamW step every
    --gradient_accumulation_steps batches."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=dargs.learning_rate, betas=distill.ADAM_BETAS, eps=dargs.adam_epsilon,
                                  weight_decay=dargs.weight_decay)
    accumulation = dargs.gradient_accumulation_steps
    student.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, batch in enumerate(batches):
        loss, _ = step(student, batch, None)
        (loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(params, dargs.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu_start


def limit(argv: Sequence[str], out: str, threads: int, repeats: int) -> dict[str, Any]:
    """The compared runs' work (their flags `argv`, the same micro-batches, masked the same way though not at the
    same positions) in `bare_loop`, with the project's chunked loss step and with whole logits, in ABBA order;
    then the matrix-multiply ceiling of each: one optimizer step's matrix products (common.matmul_ceiling)
    replayed alone. At `threads` torch threads, in this process."""
    dargs = distill.parse_args([*argv, "--output_dir", os.path.join(out, "limit")])
    ctx = DistContext(device=torch.device("cpu"))
    run = distill.resolve_run(dargs, ctx)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_path)
    teacher = load_teacher(run.teacher_path, run.teacher_type, None).eval().requires_grad_(False)
    token_file = lm.TokenFile(run.data_file)
    max_len = distill.max_input_length(dargs, tokenizer, teacher, distill.load_student(dargs, run))
    data = lm.LmDataset(token_file, max_len, tokenizer.unk_token_id)
    probs = distill.token_probabilities(ctx, run, token_file, tokenizer, teacher.config.vocab_size,
                                        dargs.mlm_smoothing)
    source = distill.batch_source(dargs, run, data, tokenizer, teacher.config.vocab_size, probs, max_len, ctx.device)
    per_epoch = source.batches_per_epoch(ctx) // dargs.gradient_accumulation_steps
    torch.manual_seed(dargs.seed)
    batches = [source.collate(b, ctx.device) for b in source.planned_batches(
        1, dargs.max_steps, per_epoch, dargs.gradient_accumulation_steps)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    steps = {"chunked": distill.DistillStep(run, teacher, dargs.loss_chunk_size),
             "whole logits": whole_logits_step(run.losses, teacher)}

    def fresh_student() -> Any:
        torch.manual_seed(dargs.seed)
        student = distill.load_student(dargs, run)
        distill.freeze_embeddings(student, dargs, run.student_type)
        return student

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result: dict[str, Any] = {"tokens": tokens, "micro_batches": len(batches), "runs": []}
        for whole in abba_order(repeats):
            name = "whole logits" if whole else "chunked"
            seconds, cpu = bare_loop(fresh_student(), steps[name], batches, dargs)
            result["runs"].append({"loss": name, "seconds": seconds, "cpu_seconds": cpu,
                                   "tokens_per_second": tokens / seconds})
            print(f"bare loop, {name}: {tokens / seconds:.0f} tokens/s, {cpu:.0f} CPU seconds (load "
                  f"{load_average()})", flush=True)
        one_step = batches[:dargs.gradient_accumulation_steps]
        step_tokens = sum(int(b["attention_mask"].sum()) for b in one_step)
        result["ceiling"] = {}
        for name, step in steps.items():
            student = fresh_student().train()
            with MatmulRecorder() as recorder:
                for batch in one_step:
                    step(student, batch, None)[0].backward()
            seconds = replay_seconds(recorder.calls)
            result["ceiling"][name] = {"tokens": step_tokens, "flops_per_token": recorder.flops / step_tokens,
                                       "matmul_seconds": seconds, "tokens_per_second": step_tokens / seconds,
                                       "gflops_per_second": recorder.flops / seconds / 1e9}
            print(f"matrix-multiply ceiling, {name}: {recorder.flops / step_tokens / 1e6:.0f} MFLOP per token, "
                  f"{recorder.flops / seconds / 1e9:.1f} GFLOP/s, {step_tokens / seconds:.0f} tokens/s", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    return result


def compare_report(bench: dict[str, Any]) -> str:
    cfg, b = bench["config"], bench["batches"]
    runs = bench["compare"]
    mean = {side: {k: sum(f(r) for r in runs if r["side"] == side) / sum(r["side"] == side for r in runs)
                   for k, f in (("tps", lambda r: r["train"]["tokens_per_second"]),
                                ("cpu", lambda r: r["cpu_seconds"]), ("peak", lambda r: r["peak_rss_mb"]))}
            for side in ("before", "this")}
    rows = [[r["side"], r["train"]["tokens_this_run"], f"{r['train']['seconds']:.1f}",
             f"{r['train']['tokens_per_second']:.0f}", f"{r['cpu_seconds']:.0f}", f"{r['peak_rss_mb'] / 1024:.2f} GB",
             r["minor_page_faults"], " ".join(str(x) for x in r["load_start"])]
            for r in runs]
    env = bench["environment"]
    trained_on = (f"the {b['sequences_trained_on']} sequences of the epoch's {cfg['compare_largest']} largest "
                  f"micro-batches out of" if cfg["compare_largest"] else "the start of")
    m, e, et = b["measured"], b["epoch"], b["epoch_trained"]
    lines = []
    if "limit" in bench:
        lim = bench["limit"]
        each = {name: [r for r in lim["runs"] if r["loss"] == name] for name in ("chunked", "whole logits")}
        bare = {name: sum(r["tokens_per_second"] for r in runs) / len(runs) for name, runs in each.items()}
        limit_rows = [[name, ", ".join(f"{r['tokens_per_second']:.0f}" for r in each[name]),
                       ", ".join(f"{r['cpu_seconds']:.0f}" for r in each[name]), f"{c['flops_per_token'] / 1e6:.0f}",
                       f"{c['gflops_per_second']:.1f}", f"{c['tokens_per_second']:.0f}",
                       f"{mean['this']['tps'] / bare[name]:.2f}", f"{mean['this']['tps'] / c['tokens_per_second']:.2f}"]
                      for name, c in lim["ceiling"].items()]
        lines = ["", f"The same work in the barest stock-PyTorch loop ({lim['micro_batches']} micro-batches, "
                 f"{lim['tokens']} tokens, ABBA) and its matrix products alone (one optimizer step's, each replayed "
                 "alone at its shape)",
                 format_table(["loss", "bare loop tokens/s", "bare loop CPU s", "matmul MFLOP/token", "matmul GFLOP/s",
                               "ceiling tokens/s", "this / bare", "this / ceiling"], limit_rows)]
    return "\n".join([
        f"Distillation side by side (ABBA), {cfg['compare_steps']} steps of 5 x 5 sequences: {trained_on} the first "
        f"{cfg['compare_lines']} lines of wiki.valid.raw ({b['sequences']} sequences, {b['tokens']} tokens); "
        f"{cfg['compare_threads']} threads; load {env['load_average_1_5_15min_before']} before, "
        f"{env['load_average_1_5_15min_after']} after",
        f"before: {cfg['compare_with']}; this: {ROOT}. Measured micro-batches: longest sequence {m['longest']} "
        f"tokens, largest {m['largest_padded']} padded tokens (the epoch's: {e['longest']}, {e['largest_padded']}; in "
        f"the micro-batches a one-epoch run trains: {et['longest']}, {et['largest_padded']}).",
        f"this side's extra flags: {cfg['this_flags']}" if cfg.get("this_flags") else "this side: no extra flags",
        format_table(["side", "tokens", "train seconds", "tokens/s", "process CPU seconds", "peak resident",
                      "minor page faults", "load at start"], rows),
        f"this / before: {mean['this']['tps'] / mean['before']['tps']:.2f}x the tokens/s, "
        f"{mean['before']['cpu'] / mean['this']['cpu']:.2f}x fewer CPU seconds (whole process), "
        f"{mean['this']['peak'] / mean['before']['peak']:.2f}x the peak memory "
        f"({mean['before']['peak'] / 1024:.2f} -> {mean['this']['peak'] / 1024:.2f} GB)", *lines])


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
    exit_with(run_cli(main))
