#!/usr/bin/env python
"""Benchmark movement pruning on real SQuAD (`make bench`): featurization speed, training throughput, F1 of a
model pruned to 10% of its encoder weights against the dense one, size on disk, and CPU inference latency of
the bertarized model against the dense one.

Only the SQuAD v1.1 dev file is at hand (no train file), so its articles are split: a fixed-seed set of
articles is held out for evaluation and the questions of the others are used for training. Both sides are
subsets (--train_questions / --eval_questions, whole paragraphs) so that the whole benchmark fits in about
20 minutes on 2 CPU cores; the F1 figures are therefore far below the paper's (which trains 10 epochs on
88k questions) and only compare the runs with each other.

1. featurizes the whole dev file (10,570 questions) with the model's tokenizer, as evaluation and as training
   features, and times it;
2. fine-tunes the dense model (--model_type bert) and, from the same pretrained weights, fine-prunes it with
   movement pruning (topK, cubic schedule to --final_threshold of the encoder's weights), same data and steps;
3. evaluates both on the held-out questions (EM/F1), bertarizes the pruned model (plus a compact CSR copy) and
   checks that stock transformers reproduces its predictions;
4. measures sizes on disk and the CPU latency of the dense and the bertarized model (batch 1 and a batch of
   --latency_batch_size windows, --latency_examples windows, after a warm-up).

    python scripts/bench_squad_pruning.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --squad_file ../shared/data/squad/dev-v1.1.json --output_dir runs/bench-squad

Prints a table and writes everything, with the environment, to <output_dir>/bench_results.json. Timings are
single measurements on whatever else the machine is doing (no repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Sequence

from common.args import answering_help
from common.bench import bench_parser, format_table, new_record, run_script, write_record
from common.errors import UserError, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from common.data import squad
    from common.models import masked
    from common.io import write_text_atomic

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(SCRIPTS, "run_squad_pruning.py")
BERTARIZE = os.path.join(SCRIPTS, "bertarize.py")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "Folder of the pretrained BERT-family encoder (e.g. all-MiniLM-L6-v2).")
    parser.add_argument("--squad_file", required=True, help="SQuAD v1.1 file to split (dev-v1.1.json).")
    parser.add_argument("--output_dir", default=os.path.join("runs", "bench-squad"),
                        help="Where the data split, the runs, the models and bench_results.json go.")
    parser.add_argument("--eval_articles", default=8, type=int, help="Articles held out for evaluation.")
    for split, default in (("train", 1600), ("eval", 400)):
        parser.add_argument(f"--{split}_questions", default=default, type=int,
                            help=f"Questions of the {split} part to keep (whole paragraphs, fixed seed); 0: all.")
    parser.add_argument("--max_seq_length", default=192, type=int, help="Window length (tokens).")
    parser.add_argument("--doc_stride", default=64, type=int, help="Step between windows (tokens).")
    parser.add_argument("--num_train_epochs", default=1.0, type=float, help="Epochs of each training run.")
    parser.add_argument("--learning_rate", default=1e-4, type=float, help="Peak AdamW learning rate.")
    parser.add_argument("--mask_scores_learning_rate", default=1e-2, type=float,
                        help="Learning rate of the mask scores (pruned run).")
    parser.add_argument("--final_threshold", default=0.1, type=float,
                        help="Fraction of the encoder's weights the pruned model keeps.")
    parser.add_argument("--train_batch_size", default=16, type=int, help="Training batch size.")
    parser.add_argument("--latency_examples", default=100, type=int, help="Windows timed at batch size 1.")
    parser.add_argument("--latency_batch_size", default=32, type=int, help="Batch size of the throughput timing.")
    parser.add_argument("--featurize_full_file", action=argparse.BooleanOptionalAction, default=True,
                        help="Time the featurization of the whole --squad_file.")
    parser.add_argument("--seed", default=42, type=int, help="Seed of the split, the subsets and training.")
    args = parser.parse_args(argv)
    problems = []
    if not os.path.isfile(args.squad_file):
        problems.append(f"--squad_file {args.squad_file} not found")
    if not os.path.isdir(args.model_name_or_path):
        problems.append(f"--model_name_or_path {args.model_name_or_path} is not a folder")
    for name in ("eval_articles", "train_batch_size", "latency_examples", "latency_batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    for name in ("train_questions", "eval_questions"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} cannot be negative (0 means all)")
    if not 0 < args.final_threshold <= 1:
        problems.append("--final_threshold is the fraction of weights kept, in (0, 1]")
    if problems:
        raise UserError("; ".join(problems))
    return args


# ----------------------------------------------------------------------------------------------------------
# data


def _subset(paragraphs: list[tuple[int, dict]], limit: int, rng: random.Random) -> list[tuple[int, dict]]:
    """Whole paragraphs, in random order, until `limit` questions (0: all), then back in file order."""
    if limit <= 0:
        return paragraphs
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    keep, count = [], 0
    for i in order:
        if count >= limit:
            break
        keep.append(i)
        count += len(paragraphs[i][1]["qas"])
    return [paragraphs[i] for i in sorted(keep)]


def write_split(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """train-v1.1.json / dev-v1.1.json in dest: held-out articles for evaluation, the others for training."""
    squad.read_squad(args.squad_file, False)  # the whole file is checked first
    with open(args.squad_file, encoding="utf-8") as f:
        raw = json.load(f)
    rng = random.Random(args.seed)
    articles = list(range(len(raw["data"])))
    if args.eval_articles >= len(articles):
        raise UserError(f"--eval_articles {args.eval_articles}: the file has only {len(articles)} articles")
    held_out = set(rng.sample(articles, args.eval_articles))
    info: dict[str, Any] = {"source": os.path.abspath(args.squad_file), "articles": len(articles),
                            "eval_articles": sorted(held_out)}
    os.makedirs(dest, exist_ok=True)
    for split, chosen, limit in (("train", [a for a in articles if a not in held_out], args.train_questions),
                                 ("dev", sorted(held_out), args.eval_questions)):
        paragraphs = [(a, p) for a in chosen for p in raw["data"][a]["paragraphs"]]
        info[f"{split}_questions_available"] = sum(len(p["qas"]) for _, p in paragraphs)
        paragraphs = _subset(paragraphs, limit, rng)
        by_article: dict[int, list[dict]] = {}
        for a, p in paragraphs:
            by_article.setdefault(a, []).append(p)
        doc = {"version": "1.1", "data": [{"title": raw["data"][a].get("title", str(a)), "paragraphs": ps}
                                          for a, ps in by_article.items()]}
        path = os.path.join(dest, f"{split}-v1.1.json")
        write_text_atomic(path, json.dumps(doc))
        info[f"{split}_questions"] = sum(len(p["qas"]) for _, p in paragraphs)
        info[f"{split}_paragraphs"] = len(paragraphs)
    return info


def time_featurization(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Seconds to read and featurize the whole file at the script's default settings (384 / 128 / 64)."""
    start = time.perf_counter()
    examples = squad.read_squad(args.squad_file, False)
    read_seconds = time.perf_counter() - start
    out: dict[str, Any] = {"questions": len(examples), "read_seconds": read_seconds, "max_seq_length": 384,
                           "doc_stride": 128, "max_query_length": 64}
    for mode, training in (("eval", False), ("train", True)):
        start = time.perf_counter()
        features = squad.featurize(examples, tokenizer, 384, 128, 64, is_training=training)
        out[f"{mode}_seconds"] = time.perf_counter() - start
        out[f"{mode}_features"] = int(len(features["input_ids"]))
    return out


# ----------------------------------------------------------------------------------------------------------
# runs


def common_flags(args: argparse.Namespace, data_dir: str) -> list[str]:
    return ["--data_dir", data_dir, "--train_file", "train-v1.1.json", "--predict_file", "dev-v1.1.json",
            "--max_seq_length", str(args.max_seq_length), "--doc_stride", str(args.doc_stride),
            "--max_query_length", "64", "--seed", str(args.seed), "--per_gpu_eval_batch_size", "32"]


def timed_main(argv: list[str]) -> tuple[dict[str, Any], float]:
    """run_squad_pruning.py in its own process: its results and seconds."""
    return run_script(SCRIPT, argv)


def train_run(args: argparse.Namespace, data_dir: str, out: str, pruned: bool, train_features: int) -> dict:
    steps = max(1, int(train_features / args.train_batch_size * args.num_train_epochs))
    argv = ["--model_name_or_path", args.model_name_or_path, "--output_dir", out, "--overwrite_output_dir",
            "--do_train", "--do_eval", *common_flags(args, data_dir),
            "--per_gpu_train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
            "--num_train_epochs", str(args.num_train_epochs), "--warmup_steps", str(max(1, steps // 10)),
            "--logging_steps", str(max(1, steps // 20)), "--save_steps", "0"]
    if pruned:
        # Hold the dense model for one warm-up, reach the final fraction two warm-ups before the end.
        argv += ["--model_type", "masked_bert", "--pruning_method", "topK", "--initial_threshold", "1",
                 "--final_threshold", str(args.final_threshold), "--initial_warmup", "1", "--final_warmup", "2",
                 "--mask_init", "constant", "--mask_scale", "0", "--mask_scores_learning_rate",
                 str(args.mask_scores_learning_rate)]
    else:
        argv += ["--model_type", "bert"]
    results, seconds = timed_main(argv)
    return {"results": results, "run_seconds": seconds, "output_dir": out}


def window_batches(features: dict[str, torch.Tensor], count: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` windows as batches, each trimmed to its longest row (as the evaluation runs them)."""
    n = min(count, len(features["input_ids"]))
    batches = []
    for start in range(0, n, batch_size):
        rows = {k: features[k][start:start + batch_size] for k in ("input_ids", "attention_mask", "token_type_ids")
                if k in features}
        longest = int(rows["attention_mask"].sum(1).max())
        batches.append({k: v[:, :longest] for k, v in rows.items()})
    return batches


def latency(model: Any, batches: list[dict[str, torch.Tensor]], warmup: int = 5) -> dict[str, float]:
    """Milliseconds per forward pass: median and mean over the batches (after `warmup` untimed ones)."""
    model.eval()
    times = []
    with torch.no_grad():
        for batch in batches[:warmup]:
            model(**batch)
        for batch in batches:
            start = time.perf_counter()
            model(**batch)
            times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "passes": len(times)}


# ----------------------------------------------------------------------------------------------------------
# report


def report(bench: dict[str, Any]) -> str:
    cfg, data, env = bench["config"], bench["data"], bench["environment"]
    out = [f"Movement pruning benchmark: model {cfg['model_name_or_path']}",
           f"SQuAD v1.1 dev split by article: train {data['train_questions']} questions "
           f"({data['train_paragraphs']} paragraphs) of {data['train_questions_available']}, eval "
           f"{data['dev_questions']} questions ({data['dev_paragraphs']} paragraphs, {cfg['eval_articles']} "
           f"held-out articles) of {data['dev_questions_available']}; subsets to fit ~20 min on 2 CPU cores",
           f"max_seq_length {cfg['max_seq_length']}, doc_stride {cfg['doc_stride']}, {cfg['num_train_epochs']:g} "
           f"epoch(s), lr {cfg['learning_rate']:g}, batch {cfg['train_batch_size']}",
           f"torch {env['torch']}, transformers {env['transformers']}, {env['cpus_usable']} CPU(s), "
           f"{env['torch_threads']} torch thread(s), load average at the end "
           f"{env['load_average_1_5_15min_after'][0]:.1f}",
           "Timings are single measurements on a shared machine."]
    feat = bench.get("featurization")
    if feat:
        out += ["", f"Featurization of the whole file ({feat['questions']} questions; 384 / 128 / 64)",
                format_table(["mode", "windows", "seconds", "questions/s"],
                             [[m, feat[f"{m}_features"], f"{feat[f'{m}_seconds']:.1f}",
                               f"{feat['questions'] / feat[f'{m}_seconds']:.0f}"] for m in ("eval", "train")])
                + f"\n(reading and checking the JSON: {feat['read_seconds']:.2f}s)"]
    rows = []
    for name in ("dense", "pruned", "bertarized"):
        run = bench["runs"].get(name)
        if run is None:
            continue
        metrics, train = run["metrics"], run.get("train")
        rows.append([name, f"{100 * run['remaining']:.1f}%", f"{metrics['exact']:.2f}", f"{metrics['f1']:.2f}",
                     f"{train['examples_per_second']:.1f}" if train else "-",
                     f"{train['seconds']:.0f}" if train else "-", f"{run['weights_mb']:.1f}"])
    out += ["", "Runs (EM/F1 on the held-out questions; weights = size on disk of the weight files)",
            format_table(["model", "encoder weights kept", "EM", "F1", "train examples/s", "train s", "weights MB"],
                         rows)]
    sizes = bench["sizes"]
    out += ["", f"Pruned model stored compactly (CSR, lossless): {sizes['compact_mb']:.1f} MB vs "
            f"{sizes['dense_mb']:.1f} MB dense ({sizes['compact_ratio']:.2f}x smaller; the encoder matrices alone "
            f"{sizes['encoder_dense_mb']:.1f} MB -> {sizes['encoder_compact_mb']:.1f} MB)"]
    lat = bench["latency"]
    out += ["", f"CPU inference latency ({lat['examples']} held-out windows, no_grad, after a warm-up)",
            format_table(["model", "batch 1 median ms", "batch 1 mean ms",
                          f"batch {lat['batch_size']} ms / batch", f"batch {lat['batch_size']} windows/s"],
                         [[name, f"{r['b1']['median_ms']:.1f}", f"{r['b1']['mean_ms']:.1f}",
                           f"{r['batched']['mean_ms']:.0f}",
                           f"{1000 * lat['batch_size'] / r['batched']['mean_ms']:.1f}"] for name, r in
                          lat["models"].items()])]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    wall: dict[str, float] = {}
    bench = new_record("bench_squad_pruning.py", args, argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.featurize_full_file:
        t0 = time.perf_counter()
        bench["featurization"] = time_featurization(args, tokenizer)
        wall["featurization"] = time.perf_counter() - t0
        print(f"Featurized {bench['featurization']['questions']} questions in "
              f"{bench['featurization']['eval_seconds']:.1f}s (eval) / {bench['featurization']['train_seconds']:.1f}s "
              "(train)", flush=True)
    data_dir = os.path.join(out, "data")
    bench["data"] = write_split(args, data_dir)
    train_examples = squad.read_squad(os.path.join(data_dir, "train-v1.1.json"), False)
    train_features = len(squad.featurize(train_examples, tokenizer, args.max_seq_length, args.doc_stride, 64,
                                         is_training=True)["input_ids"])
    bench["data"]["train_windows"] = train_features

    runs: dict[str, Any] = {}
    for name, pruned in (("dense", False), ("pruned", True)):
        t0 = time.perf_counter()
        run = train_run(args, data_dir, os.path.join(out, name), pruned, train_features)
        wall[name] = time.perf_counter() - t0
        res = run["results"]
        runs[name] = {"metrics": res["eval"]["metrics"], "train": res["train"]["train"],
                      "remaining": res["eval"].get("remaining_encoder_fraction", 1.0),
                      "eval_seconds": res["eval"]["seconds"], "output_dir": run["output_dir"],
                      "weights_mb": masked.weights_bytes(run["output_dir"]) / 1e6}

    t0 = time.perf_counter()
    target, compact = os.path.join(out, "bertarized"), os.path.join(out, "compact")
    tool, _ = run_script(BERTARIZE, ["--model_name_or_path", runs["pruned"]["output_dir"], "--target_model_path",
                                     target, "--compact_path", compact, "--overwrite_output_dir"])
    check, _ = timed_main(["--model_name_or_path", target, "--output_dir", os.path.join(out, "bertarized-eval"),
                           "--do_eval", "--model_type", "bert", *common_flags(args, data_dir)])
    runs["bertarized"] = {"metrics": check["eval"]["metrics"], "remaining": tool["remaining"]["fraction"],
                          "weights_mb": masked.weights_bytes(target) / 1e6, "output_dir": target}
    if check["eval"]["metrics"] != runs["pruned"]["metrics"]:
        print("WARNING: the bertarized model's metrics differ from the masked model's", flush=True)
    bench["runs"] = runs
    encoder_dense = tool["compact_tensor_bytes"]
    bench["sizes"] = {
        "dense_mb": tool["dense_bytes"] / 1e6, "compact_mb": tool["compact_bytes"] / 1e6,
        "compact_ratio": tool["compact_ratio"], "masked_folder_mb": runs["pruned"]["weights_mb"],
        "encoder_dense_mb": encoder_dense["sparse_matrices_dense_bytes"] / 1e6,
        "encoder_compact_mb": encoder_dense["sparse_matrices_stored_bytes"] / 1e6,
    }
    wall["bertarize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dev = squad.featurize(squad.read_squad(os.path.join(data_dir, "dev-v1.1.json"), False), tokenizer,
                          args.max_seq_length, args.doc_stride, 64, is_training=False)
    singles = window_batches(dev, args.latency_examples, 1)
    batched = window_batches(dev, max(args.latency_examples, 2 * args.latency_batch_size), args.latency_batch_size)
    models = {"dense": runs["dense"]["output_dir"], "bertarized": target}
    bench["latency"] = {"examples": len(singles), "batch_size": args.latency_batch_size, "models": {}}
    for name, path in models.items():
        model = AutoModelForQuestionAnswering.from_pretrained(path)
        bench["latency"]["models"][name] = {"b1": latency(model, singles), "batched": latency(model, batched, 1)}
        print(f"Latency {name}: {bench['latency']['models'][name]}", flush=True)
    wall["latency"] = time.perf_counter() - t0
    return write_record(out, bench, wall, start, report)


if __name__ == "__main__":
    sys.exit(run_cli(main))
