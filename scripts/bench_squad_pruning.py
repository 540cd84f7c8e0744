#!/usr/bin/env python
"""Benchmark movement pruning on real SQuAD (`make bench-squad`): what a user gets for each kind of pruning at
one training budget -- encoder parameters, size on disk, EM/F1 and CPU latency -- side by side with the dense
model.

Only the SQuAD v1.1 dev file is at hand (no train file), so its articles are split: a fixed-seed set of
articles is held out for evaluation and the questions of the others are used for training. Both sides are
subsets (--train_questions / --eval_questions, whole paragraphs) so that the whole benchmark fits in about
45 minutes on 2 CPU cores; the F1 figures are therefore far below the paper's (which trains 10 epochs on
88k questions) and only compare the rows with each other.

1. featurizes the whole dev file (10,570 questions) with the model's tokenizer, as evaluation and as training
   features, and times it;
2. trains every row from the same pretrained weights, on the same data for the same steps: the dense model
   (--model_type bert); unstructured movement pruning (topK) to --unstructured_fraction of the encoder's
   weights; structured movement pruning of heads and neurons (topK per layer) to each of
   --structured_fractions. With --distil the pruned rows distil from the dense row (the teacher saw the same
   data);
3. evaluates each on the held-out questions (EM/F1); bertarizes the unstructured row (zeros in dense matrices)
   and shrinks the structured ones (bertarize.py --shrink: emptied heads and neurons removed), and evaluates
   the shrunk folders again (their answers must equal the masked models'; the bertarized model's equality is
   tested in tests/test_masked.py);
4. times CPU inference of every deployable model (dense, bertarized, shrunk) in one process, in ABBA order
   (A B C D D C B A, --latency_rounds times), on held-out windows padded to --latency_length tokens, at batch 1
   and at --latency_batch_size, after a warm-up; with --timing_lock the timing holds an exclusive lock on it
   (flock), so that other benchmarks sharing the machine do not run at the same time.

    python scripts/bench_squad_pruning.py --model_name_or_path <all-MiniLM-L6-v2 folder> \\
        --squad_file ../shared/data/squad/dev-v1.1.json --output_dir runs/bench-squad

Prints a table and writes everything, with the environment and the load average, to
<output_dir>/bench_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from typing import Any, Sequence

from common.args import answering_help
from common.bench import (
    add_timing_lock_arg, bench_parser, format_table, load_average, mirrored_order, new_record, run_script, timing_lock,
    write_record,
)
from common.errors import UserError, exit_with, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from common.data import squad
    from common.models import masked, shrink
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
    for split, default in (("train", 300), ("eval", 150)):
        parser.add_argument(f"--{split}_questions", default=default, type=int,
                            help=f"Questions of the {split} part to keep (whole paragraphs, fixed seed); 0: all.")
    parser.add_argument("--max_seq_length", default=192, type=int, help="Window length (tokens).")
    parser.add_argument("--doc_stride", default=64, type=int, help="Step between windows (tokens).")
    parser.add_argument("--num_train_epochs", default=1.0, type=float, help="Epochs of each training run.")
    parser.add_argument("--learning_rate", default=1e-4, type=float, help="Peak AdamW learning rate.")
    parser.add_argument("--mask_scores_learning_rate", default=1e-2, type=float,
                        help="Learning rate of the mask scores (pruned run).")
    parser.add_argument("--unstructured_fraction", "--final_threshold", default=0.1, type=float,
                        help="Fraction of the encoder's weights the unstructured (topK) row keeps.")
    parser.add_argument("--structured_fractions", default=[0.5, 0.3], type=float, nargs="*",
                        help="Fractions of heads and neurons (so of the encoder's weights) the structured rows keep.")
    parser.add_argument("--distil", action=argparse.BooleanOptionalAction, default=False,
                        help="The pruned rows distil from the dense row (alpha_ce 0.5, alpha_distil 0.5, T 2); off by "
                             "default: the teacher's forward passes cost a third more training time.")
    parser.add_argument("--train_batch_size", default=16, type=int, help="Training batch size.")
    parser.add_argument("--latency_examples", default=16, type=int, help="Windows timed at batch size 1, per round.")
    parser.add_argument("--latency_batch_size", default=32, type=int, help="Batch size of the throughput timing.")
    parser.add_argument("--latency_length", default=384, type=int, help="Tokens per timed window (padded).")
    parser.add_argument("--latency_rounds", default=2, type=int,
                        help="ABBA rounds: each model is timed 2 x rounds times, in order A B C D D C B A.")
    add_timing_lock_arg(parser)
    parser.add_argument("--featurize_full_file", action=argparse.BooleanOptionalAction, default=True,
                        help="Time the featurization of the whole --squad_file.")
    parser.add_argument("--seed", default=42, type=int, help="Seed of the split, the subsets and training.")
    args = parser.parse_args(argv)
    problems = []
    if not os.path.isfile(args.squad_file):
        problems.append(f"--squad_file {args.squad_file} not found")
    if not os.path.isdir(args.model_name_or_path):
        problems.append(f"--model_name_or_path {args.model_name_or_path} is not a folder")
    for name in ("eval_articles", "train_batch_size", "latency_examples", "latency_batch_size", "latency_rounds"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    for name in ("train_questions", "eval_questions"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} cannot be negative (0 means all)")
    for fraction in (args.unstructured_fraction, *args.structured_fractions):
        if not 0 < fraction <= 1:
            problems.append(f"--unstructured_fraction / --structured_fractions {fraction:g}: a fraction of weights "
                            "kept, in (0, 1]")
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


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of the table: name, pruning structure (None: dense) and fraction of encoder weights kept."""
    out = [{"name": "dense", "structure": None, "fraction": 1.0},
           {"name": f"topK {100 * args.unstructured_fraction:g}%", "structure": "weights",
            "fraction": args.unstructured_fraction}]
    out += [{"name": f"heads+neurons {100 * f:g}%", "structure": "heads_neurons", "fraction": f}
            for f in args.structured_fractions]
    return out


def train_run(args: argparse.Namespace, data_dir: str, out: str, row: dict[str, Any], train_features: int,
              teacher: str | None) -> dict:
    steps = max(1, int(train_features / args.train_batch_size * args.num_train_epochs))
    argv = ["--model_name_or_path", args.model_name_or_path, "--output_dir", out, "--overwrite_output_dir",
            "--do_train", "--do_eval", *common_flags(args, data_dir),
            "--per_gpu_train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
            "--num_train_epochs", str(args.num_train_epochs), "--warmup_steps", str(max(1, steps // 10)),
            "--logging_steps", str(max(1, steps // 20)), "--save_steps", "0"]
    if row["structure"] is None:
        argv += ["--model_type", "bert"]
    else:
        # Hold the dense model for one warm-up, reach the final fraction two warm-ups before the end.
        argv += ["--model_type", "masked_bert", "--pruning_method", "topK", "--pruning_structure", row["structure"],
                 "--initial_threshold", "1", "--final_threshold", str(row["fraction"]), "--initial_warmup", "1",
                 "--final_warmup", "2", "--mask_init", "constant", "--mask_scale", "0",
                 "--mask_scores_learning_rate", str(args.mask_scores_learning_rate)]
        if teacher is not None:
            argv += ["--teacher_type", "bert", "--teacher_name_or_path", teacher, "--alpha_ce", "0.5",
                     "--alpha_distil", "0.5", "--temperature", "2"]
    results, seconds = timed_main(argv)
    return {"results": results, "run_seconds": seconds, "output_dir": out}


def encoder_parameters(folder: str) -> dict[str, int]:
    """Encoder matrix parameters a deployable folder stores, and how many are non-zero."""
    state = masked.read_state_dict(folder)
    matrices = [t for k, t in state.items() if ".encoder.layer." in k and k.endswith(".weight") and t.dim() == 2]
    return {"stored": sum(t.numel() for t in matrices), "nonzero": sum(int((t != 0).sum()) for t in matrices)}


def load_deployable(path: str) -> Any:
    """A deployable folder: shrunk (per-layer widths) or stock."""
    if shrink.is_shrunk_folder(path):
        return shrink.load_shrunk_model(path)
    return AutoModelForQuestionAnswering.from_pretrained(path).eval()


def timing_windows(features: dict[str, torch.Tensor], count: int, batch_size: int,
                   length: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` windows as batches of `batch_size`, padded to `length` tokens."""
    n = min(count, len(features["input_ids"]))
    batches = []
    for start in range(0, n, batch_size):
        rows_ = {}
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            v = features[k][start:start + batch_size][:, :length]
            rows_[k] = torch.nn.functional.pad(v, (0, length - v.shape[1]))
        batches.append(rows_)
    return batches


def forward_ms(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Milliseconds of each forward pass (no_grad)."""
    times = []
    with torch.no_grad():
        for batch in batches:
            start = time.perf_counter()
            model(**batch)
            times.append(1000 * (time.perf_counter() - start))
    return times


def time_models(args: argparse.Namespace, models: dict[str, str], dev: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Latency of every model in one process, in ABBA order (A B C D D C B A per round), after a warm-up."""
    singles = timing_windows(dev, args.latency_examples, 1, args.latency_length)
    batched = timing_windows(dev, args.latency_batch_size, args.latency_batch_size, args.latency_length)
    loaded = {name: load_deployable(path) for name, path in models.items()}
    for model in loaded.values():  # warm-up
        forward_ms(model, singles[:3] + batched[:1])
    times: dict[str, dict[str, list[float]]] = {name: {"b1": [], "batched": []} for name in loaded}
    order = mirrored_order(list(loaded))
    for _ in range(args.latency_rounds):
        for name in order:
            times[name]["b1"] += forward_ms(loaded[name], singles)
            times[name]["batched"] += forward_ms(loaded[name], batched)
    return {"windows": len(singles), "batch_size": args.latency_batch_size, "length": args.latency_length,
            "rounds": args.latency_rounds, "order": order,
            "models": {name: {"b1_median_ms": statistics.median(t["b1"]), "b1_mean_ms": statistics.fmean(t["b1"]),
                              "batched_median_ms": statistics.median(t["batched"]),
                              "batched_passes": len(t["batched"]), "b1_passes": len(t["b1"])}
                       for name, t in times.items()}}


# ----------------------------------------------------------------------------------------------------------
# report


def report(bench: dict[str, Any]) -> str:
    cfg, data, env = bench["config"], bench["data"], bench["environment"]
    out = [f"Movement pruning benchmark: model {cfg['model_name_or_path']}",
           f"SQuAD v1.1 dev split by article: train {data['train_questions']} questions "
           f"({data['train_paragraphs']} paragraphs, {data['train_windows']} windows) of "
           f"{data['train_questions_available']}, eval {data['dev_questions']} questions ({data['dev_paragraphs']} "
           f"paragraphs, {cfg['eval_articles']} held-out articles) of {data['dev_questions_available']}",
           f"every row: max_seq_length {cfg['max_seq_length']}, doc_stride {cfg['doc_stride']}, "
           f"{cfg['num_train_epochs']:g} epoch(s), lr {cfg['learning_rate']:g}, batch {cfg['train_batch_size']}; "
           f"pruned rows distil from the dense row: {cfg['distil']}",
           f"torch {env['torch']}, transformers {env['transformers']}, {env['cpus_usable']} CPU(s), "
           f"{env['torch_threads']} torch thread(s), load average before timing {bench['load_before_timing']}, "
           f"at the end {env['load_average_1_5_15min_after']}"]
    feat = bench.get("featurization")
    if feat:
        out += ["", f"Featurization of the whole file ({feat['questions']} questions; 384 / 128 / 64)",
                format_table(["mode", "windows", "seconds", "questions/s"],
                             [[m, feat[f"{m}_features"], f"{feat[f'{m}_seconds']:.1f}",
                               f"{feat['questions'] / feat[f'{m}_seconds']:.0f}"] for m in ("eval", "train")])]
    lat = bench["latency"]
    dense = lat["models"]["dense"]
    table = []
    for row in bench["rows"]:
        t = lat["models"][row["name"]]
        table.append([row["name"], row["deployed_as"], f"{100 * row['remaining']:.1f}%",
                      f"{row['encoder_parameters']['stored'] / 1e6:.2f}M",
                      f"{row['encoder_parameters']['nonzero'] / 1e6:.2f}M", f"{row['weights_mb']:.1f}",
                      f"{row['metrics']['exact']:.2f}", f"{row['metrics']['f1']:.2f}",
                      f"{t['b1_median_ms']:.1f}", f"{dense['b1_median_ms'] / t['b1_median_ms']:.2f}x",
                      f"{t['batched_median_ms']:.0f}", f"{dense['batched_median_ms'] / t['batched_median_ms']:.2f}x",
                      f"{row['train_seconds']:.0f}"])
    out += ["", f"Rows (EM/F1 on the held-out questions; latency at {lat['length']} tokens, median of "
            f"{dense['b1_passes']} passes at batch 1 and {dense['batched_passes']} at batch {lat['batch_size']}, "
            f"ABBA order {' '.join(lat['order'])} x {lat['rounds']})",
            format_table(["row", "deployed as", "weights kept", "encoder params", "non-zero", "MB on disk", "EM",
                          "F1", "b1 ms", "b1 speed-up", f"b{lat['batch_size']} ms", f"b{lat['batch_size']} speed-up",
                          "train s"], table)]
    for row in bench["rows"]:
        if row.get("units"):
            out.append(f"{row['name']}: heads kept per layer "
                       f"{[u['heads'] for u in row['units']]}, neurons {[u['neurons'] for u in row['units']]}")
        if row.get("masked_metrics") is not None and row["masked_metrics"] != row["metrics"]:
            out.append(f"WARNING: {row['name']}: the deployed model's EM/F1 differ from the masked model's "
                       f"{row['masked_metrics']}")
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

    results, teacher, deployables = [], None, {}
    for row in rows(args):
        t0 = time.perf_counter()
        folder = os.path.join(out, row["name"].replace(" ", "_").replace("%", "").replace("+", "_"))
        run = train_run(args, data_dir, folder, row, train_features, teacher if args.distil else None)
        res = run["results"]
        record = {**row, "masked_metrics": None, "metrics": res["eval"]["metrics"],
                  "train_seconds": res["train"]["train"]["seconds"], "train": res["train"]["train"],
                  "remaining": res["eval"].get("remaining_encoder_fraction", 1.0), "masked_folder": folder,
                  "masked_folder_mb": masked.weights_bytes(folder) / 1e6}
        deployed = folder
        if row["structure"] is None:
            teacher = folder
            record["deployed_as"] = "stock"
        else:
            deployed = folder + ("-shrunk" if row["structure"] != "weights" else "-bertarized")
            tool, _ = run_script(BERTARIZE, ["--model_name_or_path", folder, "--target_model_path", deployed,
                                             "--overwrite_output_dir"]
                                 + (["--shrink"] if row["structure"] != "weights" else []))
            record["deployed_as"] = "bertarized (zeros)"
            if "shrink" in tool:  # the shrunk folder is evaluated again: its answers must be the masked model's
                check, _ = timed_main(["--model_name_or_path", deployed, "--output_dir", deployed + "-eval",
                                       "--do_eval", "--model_type", "bert", *common_flags(args, data_dir)])
                record.update(masked_metrics=record["metrics"], metrics=check["eval"]["metrics"], deployed_as="shrunk",
                              units=tool["shrink"]["kept"])
                record["max_output_difference"] = tool["shrink"]["max_output_difference"]
        record.update(deployed_folder=deployed, weights_mb=masked.weights_bytes(deployed) / 1e6,
                      encoder_parameters=encoder_parameters(deployed))
        deployables[row["name"]] = deployed
        results.append(record)
        wall[row["name"]] = time.perf_counter() - t0
    bench["rows"] = results

    dev = squad.featurize(squad.read_squad(os.path.join(data_dir, "dev-v1.1.json"), False), tokenizer,
                          384, 128, 64, is_training=False)
    with timing_lock(args.timing_lock):
        t0 = time.perf_counter()
        bench["load_before_timing"] = load_average()
        bench["latency"] = time_models(args, deployables, dev)
        wall["latency"] = time.perf_counter() - t0
    for name, t in bench["latency"]["models"].items():
        print(f"Latency {name}: {t}", flush=True)
    return write_record(out, bench, wall, start, report)


if __name__ == "__main__":
    exit_with(run_cli(main))
