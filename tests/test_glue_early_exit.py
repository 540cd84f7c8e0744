"""run_glue_early_exit.py end to end: the CLI, both model types, MNLI's two dev sets, regression with PABEE,
resume, the 2-process torchrun run, and every bad input named in the issue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import run_glue_early_exit as script
from common.errors import UserError
from conftest import ROOT, model_state

SCRIPT = str(ROOT / "scripts" / "run_glue_early_exit.py")
FAST = ["--max_seq_length", "32", "--per_gpu_train_batch_size", "16", "--per_gpu_eval_batch_size", "16",
        "--learning_rate", "1e-3", "--logging_steps", "2", "--save_steps", "0", "--seed", "7"]


def glue_args(model: str, data: str, out: Path, task: str = "sst-2", *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--data_dir", data, "--task_name", task, "--output_dir", str(out),
            *FAST, *extra]


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300,
                          **kwargs)


@pytest.fixture(scope="module")
def trained_bert(tiny_bert_dir, sst2_dir, tmp_path_factory) -> Path:
    """One BERT run trained through both stages, shared by the evaluation tests."""
    out = tmp_path_factory.mktemp("trained-bert")
    script.main(glue_args(tiny_bert_dir, sst2_dir, out, "sst-2", "--do_train", "--num_train_epochs", "2",
                          "--overwrite_output_dir"))
    return out


def test_cli_end_to_end_writes_every_output(tiny_bert_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(glue_args(tiny_bert_dir, sst2_dir, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "4",
                             "--save_steps", "2", "--eval_each_highway", "--early_exit_entropy", "0", "0.5",
                             "--patience", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("eval_results.json", "eval_results.txt", "early_exit_sweep.json", "early_exit_sweep.png",
                 "metric_per_layer.png", "model.safetensors", "config.json", "off_ramps.safetensors",
                 "tokenizer.json", "log_history.jsonl", "run_args.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-stage1-000002" / "optimizer.pt").is_file()
    assert (out / "checkpoint-stage2-000004" / "trainer_state.json").is_file()
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    results = json.loads((out / "eval_results.json").read_text())["eval"]["sst-2"]
    assert results["num_examples"] == 48 and results["num_layers"] == 3
    assert [row["layer"] for row in results["per_layer"]] == [1, 2, 3]
    # The last exit is the stock head: its accuracy is the full model's.
    assert results["per_layer"][-1]["acc"] == results["metrics"]["acc"]
    rules = [p["rule"] for p in results["early_exit"]]
    assert rules == ["entropy=0", "entropy=0.5", "patience=1"]
    for point in results["early_exit"]:
        assert sum(point["exit_histogram"].values()) == 48
        assert point["seconds"] > 0 and point["speedup"] > 0
        mean = sum(int(k) * v for k, v in point["exit_histogram"].items()) / 48
        assert point["avg_exit_layer"] == pytest.approx(mean)
        assert point["layers_saved_fraction"] == pytest.approx(1 - mean / 3)
    assert results["early_exit"][0]["metric"] == results["metrics"]["acc"]  # entropy 0: nobody leaves early
    assert results["early_exit"][0]["avg_exit_layer"] == 3
    assert "acc = " in (out / "eval_results.txt").read_text()
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in logged] == [("checkpoint-stage1", 2), ("checkpoint-stage1", 4),
                                                         ("checkpoint-stage2", 2), ("checkpoint-stage2", 4)]
    # The folder is a stock checkpoint: plain transformers loads it.
    from transformers import AutoModelForSequenceClassification

    stock = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert stock.config.num_labels == 2 and stock.config.finetuning_task == "sst-2"


def test_eval_only_reload_reproduces_the_metrics(trained_bert, sst2_dir, tmp_path):
    args = ["--model_name_or_path", str(trained_bert), "--data_dir", sst2_dir, "--task_name", "sst-2",
            "--per_gpu_eval_batch_size", "5", "--max_seq_length", "32", "--do_eval", "--eval_each_highway",
            "--early_exit_entropy", "0.4", "0.6"]
    first = script.main(args + ["--output_dir", str(tmp_path / "a")])["eval"]["sst-2"]
    # Another eval batch size and fixed padding: the same predictions and exit layers.
    second = script.main(args + ["--output_dir", str(tmp_path / "b"), "--per_gpu_eval_batch_size", "48",
                                 "--no_dynamic_padding"])["eval"]["sst-2"]
    assert first["metrics"] == second["metrics"]
    assert [p["exit_histogram"] for p in first["early_exit"]] == [p["exit_histogram"] for p in second["early_exit"]]
    assert [p["acc"] for p in first["per_layer"]] == [p["acc"] for p in second["per_layer"]]


def test_roberta_trains_and_reloads(tiny_roberta_dir, sst2_dir, tmp_path):
    out = tmp_path / "roberta"
    trained = script.main(glue_args(tiny_roberta_dir, sst2_dir, out, "sst-2", "--model_type", "roberta",
                                    "--do_train", "--do_eval", "--max_steps", "3", "--eval_each_highway",
                                    "--early_exit_entropy", "0.6"))
    again = script.main(["--model_name_or_path", str(out), "--data_dir", sst2_dir, "--task_name", "sst-2",
                         "--output_dir", str(tmp_path / "eval"), "--do_eval", "--max_seq_length", "32",
                         "--early_exit_entropy", "0.6"])
    assert again["eval"]["sst-2"]["metrics"] == trained["eval"]["sst-2"]["metrics"]
    assert again["eval"]["sst-2"]["early_exit"][0]["exit_histogram"] == \
        trained["eval"]["sst-2"]["early_exit"][0]["exit_histogram"]
    assert "token_type_ids" not in script.load_tokenizer(str(out), script.parse_args([]))("a b")


def test_mnli_evaluates_matched_and_mismatched(tiny_bert_dir, mnli_dir, tmp_path):
    results = script.main(glue_args(tiny_bert_dir, mnli_dir, tmp_path / "mnli", "mnli", "--do_train", "--do_eval",
                                    "--max_steps", "2", "--eval_after_first_stage"))
    assert set(results["eval"]) == {"mnli", "mnli-mm"}
    assert results["eval"]["mnli"]["num_examples"] == 18 and results["eval"]["mnli-mm"]["num_examples"] == 15
    assert {"acc", "mm_acc"} <= set(results["train"]["after_first_stage"])
    text = (tmp_path / "mnli" / "eval_results.txt").read_text()
    assert "mm_acc = " in text and "\nacc = " in "\n" + text


def test_regression_uses_patience_and_rejects_entropy(tiny_bert_dir, stsb_dir, tmp_path):
    results = script.main(glue_args(tiny_bert_dir, stsb_dir, tmp_path / "stsb", "sts-b", "--do_train", "--do_eval",
                                    "--max_steps", "3", "--patience", "1", "2", "--eval_each_highway"))
    task = results["eval"]["sts-b"]
    assert {"pearson", "spearmanr", "corr"} <= set(task["metrics"])
    assert [p["rule"] for p in task["early_exit"]] == ["patience=1", "patience=2"]
    with pytest.raises(UserError, match="no meaning on the regression task"):
        script.main(glue_args(tiny_bert_dir, stsb_dir, tmp_path / "x", "sts-b", "--do_eval",
                              "--early_exit_entropy", "0.3"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_bert_dir, sst2_dir, tmp_path):
    common = ["--do_train", "--num_train_epochs", "2", "--save_steps", "7"]  # 10 steps a stage, 2 checkpoints
    full = tmp_path / "full"
    script.main(glue_args(tiny_bert_dir, sst2_dir, full, "sst-2", *common))
    reference = model_state(str(full))
    for checkpoint in ("checkpoint-stage1-000007", "checkpoint-stage2-000007"):
        out = tmp_path / f"resumed-{checkpoint}"
        script.main(glue_args(tiny_bert_dir, sst2_dir, out, "sst-2", *common, "--resume_from_checkpoint",
                              str(full / checkpoint)))
        resumed = model_state(str(out))
        assert resumed.keys() == reference.keys()
        different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
        assert not different, f"resumed from {checkpoint}: {different[:5]}"
    # 'latest' picks the newest checkpoint by its stored progress (stage 2 after stage 1).
    latest = tmp_path / "latest"
    shutil.copytree(full / "checkpoint-stage1-000007", latest / "checkpoint-stage1-000007")
    shutil.copytree(full / "checkpoint-stage2-000007", latest / "checkpoint-stage2-000007")
    script.main(glue_args(tiny_bert_dir, sst2_dir, latest, "sst-2", *common, "--resume_from_checkpoint", "latest"))
    assert all(torch.equal(v, model_state(str(latest))[k]) for k, v in reference.items())


def test_torchrun_two_processes_match_one(trained_bert, tiny_bert_dir, sst2_dir, tmp_path):
    """Gloo, 2 processes: evaluation equals the single-process one (every example counted once), and
    training under DDP runs and saves a loadable model."""
    eval_args = ["--model_name_or_path", str(trained_bert), "--data_dir", sst2_dir, "--task_name", "sst-2",
                 "--max_seq_length", "32", "--per_gpu_eval_batch_size", "7", "--do_eval", "--eval_each_highway",
                 "--early_exit_entropy", "0.4", "0.6", "--patience", "1"]
    single = script.main(eval_args + ["--output_dir", str(tmp_path / "single")])["eval"]["sst-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    proc = subprocess.run(torchrun + eval_args + ["--output_dir", str(tmp_path / "ddp")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "eval_results.json").read_text())["eval"]["sst-2"]
    assert ddp["num_examples"] == single["num_examples"] == 48
    assert ddp["metrics"] == single["metrics"]
    assert ddp["per_layer"] == single["per_layer"]
    assert [p["exit_histogram"] for p in ddp["early_exit"]] == [p["exit_histogram"] for p in single["early_exit"]]
    assert [p["metrics"] for p in ddp["early_exit"]] == [p["metrics"] for p in single["early_exit"]]

    # Training under DDP (two-stage DDP equals one process: tests/test_ddp_training.py): PABEE's joint scheme
    # with self-distillation, and the threshold chosen on calibration rows gathered from both ranks equals the
    # one a single process chooses for the same model.
    out = tmp_path / "ddp-train"
    budget = ["--max_metric_drop", "0.1", "--calibration_examples", "31"]
    proc = subprocess.run(torchrun + glue_args(tiny_bert_dir, sst2_dir, out, "sst-2", "--do_train", "--do_eval",
                                               "--max_steps", "3", "--save_steps", "3", "--training_scheme", "joint",
                                               "--self_distillation", *budget),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-joint-000003" / "rng_state_1.pt").is_file()  # every rank's RNG is kept
    state = json.loads((out / "checkpoint-joint-000003" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((out / "eval_results.json").read_text())["eval"]["sst-2"]["num_examples"] == 48
    ddp_choice = json.loads((out / "early_exit.json").read_text())
    one = script.main(["--model_name_or_path", str(out), "--data_dir", sst2_dir, "--task_name", "sst-2",
                       "--output_dir", str(tmp_path / "one"), "--max_seq_length", "32", "--seed", "7",
                       "--per_gpu_eval_batch_size", "4", "--do_eval", *budget])["chosen_threshold"]
    assert ddp_choice["calibration_examples"] == one["calibration_examples"] == 31
    assert ddp_choice["threshold"] == one["threshold"]
    assert ddp_choice["calibration_metric"] == pytest.approx(one["calibration_metric"])


# ----------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem and the fix, exit code 2, nothing half-written


def test_cli_user_error_is_one_line_with_exit_code_2(tmp_path):
    proc = run_cli(["--do_train", "--model_name_or_path", str(tmp_path), "--data_dir", str(tmp_path / "nope"),
                    "--task_name", "sst-2", "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "does not exist" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, pattern", [
    ("missing_data_dir", "does not exist"),
    ("empty_data_dir", "is empty"),
    ("unknown_task", "sst-2"),
    ("nothing_to_do", "add --do_train"),
    ("only_model", "give both --model_name_or_path and --data_dir"),
    ("negative_entropy", "must be >= 0"),
    ("negative_patience", "patience must be >= 0"),
    ("bad_batch", "--per_gpu_train_batch_size must be at least 1"),
    ("fp16_on_cpu", "--fp16 needs a CUDA GPU"),
])
def test_flag_problems(case, pattern, tiny_bert_dir, sst2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--model_name_or_path", tiny_bert_dir, "--task_name", "sst-2", "--output_dir", str(tmp_path / "o"),
            "--do_train"]
    argv = {
        "missing_data_dir": base + ["--data_dir", str(tmp_path / "missing")],
        "empty_data_dir": base + ["--data_dir", str(empty)],
        "unknown_task": ["--model_name_or_path", tiny_bert_dir, "--data_dir", sst2_dir, "--task_name", "sst3",
                         "--do_eval"],
        "nothing_to_do": ["--model_name_or_path", tiny_bert_dir, "--data_dir", sst2_dir, "--task_name", "sst-2"],
        "only_model": ["--model_name_or_path", tiny_bert_dir, "--do_eval"],
        "negative_entropy": base + ["--data_dir", sst2_dir, "--early_exit_entropy", "-0.5"],
        "negative_patience": base + ["--data_dir", sst2_dir, "--patience", "-1"],
        "bad_batch": base + ["--data_dir", sst2_dir, "--per_gpu_train_batch_size", "0"],
        "fp16_on_cpu": base + ["--data_dir", sst2_dir, "--fp16", "--no_cuda"],
    }[case]
    with pytest.raises(UserError, match=pattern):
        script.main(argv)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_non_empty_output_dir_needs_overwrite(tiny_bert_dir, sst2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite_output_dir"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, out, "sst-2", "--do_train"))
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_model_type_must_match_checkpoint(tiny_bert_dir, sst2_dir, tmp_path):
    with pytest.raises(UserError, match="does not match the checkpoint .* bert model"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "o", "sst-2", "--model_type", "roberta",
                              "--do_train"))
    with pytest.raises(UserError, match="not supported"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "o", "sst-2", "--model_type", "gpt2", "--do_eval"))


def test_incomplete_model_folder(tiny_bert_dir, sst2_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not a complete model folder: weights"):
        script.main(glue_args(str(broken), sst2_dir, tmp_path / "o", "sst-2", "--do_train"))
    (broken / "config.json").unlink()
    with pytest.raises(UserError, match="config.json and weights"):
        script.main(glue_args(str(broken), sst2_dir, tmp_path / "o", "sst-2", "--do_eval"))


def test_incomplete_checkpoint_cannot_be_resumed(trained_bert, tiny_bert_dir, sst2_dir, tmp_path):
    ckpt = tmp_path / "checkpoint-stage1-000003"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(UserError, match="optimizer.pt is missing"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "o", "sst-2", "--do_train",
                              "--resume_from_checkpoint", str(ckpt)))
    with pytest.raises(UserError, match="no checkpoint under"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "fresh", "sst-2", "--do_train",
                              "--resume_from_checkpoint", "latest"))


def test_untrained_off_ramps_cannot_early_exit(tiny_bert_dir, sst2_dir, tmp_path):
    with pytest.raises(UserError, match="no trained off-ramps"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "o", "sst-2", "--do_eval",
                              "--early_exit_entropy", "0.3"))


def copy_sst2(sst2_dir: str, tmp_path: Path) -> Path:
    data = tmp_path / "SST-2"
    shutil.copytree(sst2_dir, data, ignore=shutil.ignore_patterns("cached_*"))
    return data


@pytest.mark.parametrize("bad_row, pattern", [
    ("only one column", r"train\.tsv:4: .*column"),
    ("a fine sentence\t7", r"train\.tsv:4: .*label"),
])
def test_malformed_rows_name_file_and_line_and_write_nothing(bad_row, pattern, tiny_bert_dir, sst2_dir, tmp_path):
    data = copy_sst2(sst2_dir, tmp_path)
    lines = (data / "train.tsv").read_text().splitlines()
    lines[3] = bad_row  # file line 4 (the header is line 1)
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=pattern):
        script.main(glue_args(tiny_bert_dir, str(data), out, "sst-2", "--do_train"))
    assert not (out / "model.safetensors").exists()
    assert not list(data.glob("cached_*"))  # no cache of a half-read file


def test_mismatched_label_count_on_eval(trained_bert, mnli_dir, tmp_path):
    with pytest.raises(UserError, match="classifier does not fit the 3 label"):
        script.main(["--model_name_or_path", str(trained_bert), "--data_dir", mnli_dir, "--task_name", "mnli",
                     "--output_dir", str(tmp_path / "o"), "--do_eval"])


def test_builtin_default_runs_without_model_or_data(tmp_path, monkeypatch):
    """No --model_name_or_path/--data_dir: the built-in tiny model and generated data (shortened here)."""
    monkeypatch.setitem(script.BUILTIN_DEFAULTS, "num_train_epochs", 0.05)
    results = script.main(["--do_train", "--do_eval", "--output_dir", str(tmp_path / "demo"),
                           "--early_exit_entropy", "0.5"])
    assert results["task"] == "sst-2"
    assert (tmp_path / "demo" / "builtin" / "data" / "SST-2" / "train.tsv").is_file()
    assert results["eval"]["sst-2"]["num_examples"] == 800
    assert results["eval"]["sst-2"]["per_layer"]  # the demo turns on per-layer evaluation


def test_damaged_feature_cache_is_rebuilt(trained_bert, sst2_dir, tmp_path, caplog):
    data = copy_sst2(sst2_dir, tmp_path)
    args = ["--model_name_or_path", str(trained_bert), "--data_dir", str(data), "--task_name", "sst-2",
            "--output_dir", str(tmp_path / "o"), "--do_eval", "--max_seq_length", "32"]
    first = script.main(args)["eval"]["sst-2"]["metrics"]
    (cache,) = data.glob("cached_dev_*")
    cache.write_bytes(cache.read_bytes()[:100])
    again = script.main(args)["eval"]["sst-2"]["metrics"]
    assert again == first
    assert "damaged" in caplog.text


def test_off_ramp_learning_rate_reaches_stage_two(tiny_bert_dir, sst2_dir, tmp_path):
    # 160 rows, batch 16: 10 steps a stage, no warmup, linear decay: after step s the lr is lr * (10 - s) / 10.
    out = tmp_path / "run"
    script.main(glue_args(tiny_bert_dir, sst2_dir, out, "sst-2", "--do_train", "--num_train_epochs", "1",
                          "--logging_steps", "1", "--off_ramp_learning_rate", "0.02"))
    lines = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    by_stage = {stage: [r["lr"] for r in lines if r["stage"] == stage]
                for stage in ("checkpoint-stage1", "checkpoint-stage2")}
    assert by_stage["checkpoint-stage1"] == pytest.approx([1e-3 * (10 - s) / 10 for s in range(1, 11)])
    assert by_stage["checkpoint-stage2"] == pytest.approx([0.02 * (10 - s) / 10 for s in range(1, 11)])
    with pytest.raises(UserError, match="--off_ramp_learning_rate must be a positive"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "bad", "sst-2", "--do_train",
                              "--off_ramp_learning_rate", "0"))


def test_builtin_demo_keeps_flags_typed_with_their_default_value():
    # The demo's own defaults fill in only flags the user did not type, even when a typed value equals the
    # stock default (5e-5, batch 8, --save_steps 500).
    typed = script.parse_args(["--do_train", "--learning_rate", "5e-5", "--per_gpu_train_batch_size", "8",
                               "--save_steps", "500"])
    assert (typed.learning_rate, typed.per_gpu_train_batch_size, typed.save_steps) == (5e-5, 8, 500)
    untyped = script.parse_args(["--do_train"])
    assert (untyped.learning_rate, untyped.per_gpu_train_batch_size) == (5e-4, 32)
    given = script.parse_args(["--do_train", "--model_name_or_path", "m", "--data_dir", "d"])
    assert given.learning_rate == 5e-5  # not the demo: stock defaults


# ----------------------------------------------------------------------------------------------------------
# PABEE joint training, self-distillation, a threshold chosen for a metric budget


def test_joint_scheme_trains_one_stage_with_the_off_ramp_rate_and_resumes(tiny_bert_dir, sst2_dir, tmp_path):
    # 160 rows, batch 16: 10 steps, no warmup, linear decay: after step s the lr is lr * (10 - s) / 10.
    common = ["--do_train", "--training_scheme", "joint", "--num_train_epochs", "1", "--logging_steps", "1",
              "--off_ramp_learning_rate", "0.02", "--save_steps", "6", "--self_distillation",
              "--off_ramp_pooling", "mean"]
    full = tmp_path / "full"
    results = script.main(glue_args(tiny_bert_dir, sst2_dir, full, "sst-2", *common))
    assert set(results["train"]) == {"num_examples", "scheme", "off_ramp_pooling", "joint"}
    assert results["train"]["off_ramp_pooling"] == "mean" and "(mean of the tokens" in (full / "README.md").read_text()
    assert results["train"]["joint"]["global_step"] == 10
    assert (full / "checkpoint-joint-000006" / "optimizer.pt").is_file()
    assert not list(full.glob("checkpoint-stage*"))
    lines = [json.loads(line) for line in (full / "log_history.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} == {"checkpoint-joint"}
    assert [r["lr"] for r in lines] == pytest.approx([1e-3 * (10 - s) / 10 for s in range(1, 11)])  # backbone
    optimizer = torch.load(full / "checkpoint-joint-000006" / "optimizer.pt", weights_only=True)
    rates = sorted({group["initial_lr"] for group in optimizer["param_groups"]})
    assert rates == pytest.approx([1e-3, 0.02])  # the off-ramps' groups learn at their own rate
    # Both the backbone and the off-ramps moved.
    name = "encoder.layer.0.attention.self.query.weight"
    before = next(v for k, v in load_file(os.path.join(tiny_bert_dir, "model.safetensors")).items() if k.endswith(name))
    after = model_state(str(full))
    assert not torch.equal(before, after[f"backbone.bert.{name}"])
    reloaded = script.EarlyExitModel.from_pretrained(str(full))
    assert reloaded.off_ramps_trained and reloaded.pooling == "mean"
    resumed = tmp_path / "resumed"
    script.main(glue_args(tiny_bert_dir, sst2_dir, resumed, "sst-2", *common, "--resume_from_checkpoint",
                          str(full / "checkpoint-joint-000006")))
    assert model_state(str(resumed)).keys() == after.keys()
    assert all(torch.equal(v, model_state(str(resumed))[k]) for k, v in after.items())
    with pytest.raises(UserError, match="checkpoint of stage 'checkpoint-joint'"):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "mixed", "sst-2", "--do_train",
                              "--resume_from_checkpoint", str(full / "checkpoint-joint-000006")))


def flipped_dev(sst2_dir: str, tmp_path: Path) -> Path:
    """The same data with every dev label flipped: a dev file that would change a threshold chosen on it."""
    data = copy_sst2(sst2_dir, tmp_path)
    lines = (data / "dev.tsv").read_text().splitlines()
    flipped = [lines[0]] + [f"{text}\t{1 - int(label)}" for text, label in (line.split("\t") for line in lines[1:])]
    (data / "dev.tsv").write_text("\n".join(flipped) + "\n")
    return data


def test_max_metric_drop_chooses_on_held_out_training_rows_and_is_reused(tiny_bert_dir, sst2_dir, tmp_path):
    out = tmp_path / "run"
    budget = ["--max_metric_drop", "0.05", "--calibration_examples", "40"]
    data = copy_sst2(sst2_dir, tmp_path / "no-dev")
    (data / "dev.tsv").unlink()  # training and choosing never need the dev set
    trained = script.main(glue_args(tiny_bert_dir, str(data), out, "sst-2", "--do_train", "--training_scheme",
                                    "joint", "--num_train_epochs", "3", "--save_steps", "5", *budget))
    choice = json.loads((out / "early_exit.json").read_text())
    assert trained["chosen_threshold"] == choice and trained["train"]["num_examples"] == 120  # 160 - 40 held out
    assert choice["criterion"] == "entropy" and choice["calibration_examples"] == 40
    assert choice["calibration_metric"] >= choice["full_model_metric"] - 0.05
    label = f"entropy={choice['threshold']:g}"
    # An evaluation-only run without a threshold uses the saved one; a given threshold wins over it.
    reused = script.main(["--model_name_or_path", str(out), "--data_dir", sst2_dir, "--task_name", "sst-2",
                          "--output_dir", str(tmp_path / "eval"), "--do_eval", "--max_seq_length", "32"])
    assert [p["rule"] for p in reused["eval"]["sst-2"]["early_exit"]] == [label]
    given = script.main(["--model_name_or_path", str(out), "--data_dir", sst2_dir, "--task_name", "sst-2",
                         "--output_dir", str(tmp_path / "eval2"), "--do_eval", "--max_seq_length", "32",
                         "--early_exit_entropy", "0.3"])
    assert [p["rule"] for p in given["eval"]["sst-2"]["early_exit"]] == ["entropy=0.3"]
    none = script.main(["--model_name_or_path", str(out), "--data_dir", sst2_dir, "--task_name", "sst-2",
                        "--output_dir", str(tmp_path / "eval3"), "--do_eval", "--max_seq_length", "32",
                        "--early_exit_entropy", "-1"])  # -1: no entropy exit, so not the saved one either
    assert not none["eval"]["sst-2"].get("early_exit")
    # A resume holding out other rows than its checkpoint did is refused (trained-on rows would calibrate).
    checkpoint = str(out / "checkpoint-joint-000005")
    assert json.loads((out / "checkpoint-joint-000005" / "held_out.json").read_text()) == {
        "calibration_examples": 40, "seed": 7}
    for flags in (["--max_metric_drop", "0.05", "--calibration_examples", "41"], []):
        with pytest.raises(UserError, match="holding out --calibration_examples 40 with --seed 7"):
            script.main(glue_args(tiny_bert_dir, str(data), tmp_path / "resume", "sst-2", "--do_train",
                                  "--training_scheme", "joint", "--num_train_epochs", "3", *flags,
                                  "--resume_from_checkpoint", checkpoint))
    # Choosing again at evaluation time: a dev file with every label flipped changes the dev metric, not the
    # threshold.
    chosen = []
    for name, folder in (("same", sst2_dir), ("flipped", str(flipped_dev(sst2_dir, tmp_path / "flip")))):
        result = script.main(["--model_name_or_path", str(out), "--data_dir", folder, "--task_name", "sst-2",
                              "--output_dir", str(tmp_path / name), "--do_eval", "--max_seq_length", "32",
                              "--seed", "7", "--per_gpu_eval_batch_size", "16", *budget])
        # The training run's seed and eval batch size: the same held-out rows in the same batches (other batch
        # shapes may round the logits differently, in the last bit, on some CPUs' matrix kernels).
        chosen.append((result["chosen_threshold"]["threshold"], result["eval"]["sst-2"]["metrics"]["acc"]))
    assert chosen[0][0] == chosen[1][0] == choice["threshold"]
    assert chosen[0][1] == pytest.approx(1 - chosen[1][1])
    # Retrained into the same folder without a budget: the old choice goes with the old weights.
    script.main(glue_args(tiny_bert_dir, str(data), out, "sst-2", "--do_train", "--training_scheme", "joint",
                          "--max_steps", "1", "--overwrite_output_dir"))
    assert not (out / "early_exit.json").exists()
    assert json.loads((out / "held_out.json").read_text()) == {"calibration_examples": 0}


def test_regression_joint_chooses_a_patience(tiny_bert_dir, stsb_dir, tmp_path):
    out = tmp_path / "stsb"
    results = script.main(glue_args(tiny_bert_dir, stsb_dir, out, "sts-b", "--do_train", "--do_eval",
                                    "--training_scheme", "joint", "--max_steps", "2", "--max_metric_drop", "0.5",
                                    "--calibration_examples", "8"))
    choice = results["chosen_threshold"]
    assert choice["criterion"] == "patience" and choice["metric"] == "spearmanr"  # STS-B's primary metric
    assert [p["rule"] for p in results["eval"]["sts-b"]["early_exit"]] == [f"patience={choice['threshold']}"]


@pytest.mark.parametrize("flags, pattern", [
    (["--self_distillation", "--self_distillation_weight", "1.5"], "between 0 and 1"),
    (["--self_distillation_temperature", "0"], "temperature must be positive"),
    (["--max_metric_drop", "-0.1"], "--max_metric_drop must be a number >= 0"),
    (["--max_metric_drop", "0.01", "--calibration_examples", "160"], "cannot be held out of 160 training rows"),
    (["--training_scheme", "joint", "--eval_after_first_stage"], "needs --training_scheme two_stage"),
])
def test_early_exit_training_flag_problems(flags, pattern, tiny_bert_dir, sst2_dir, tmp_path):
    with pytest.raises(UserError, match=pattern):
        script.main(glue_args(tiny_bert_dir, sst2_dir, tmp_path / "o", "sst-2", "--do_train", *flags))
