"""run_squad_pruning.py, bertarize.py and count_parameters.py end to end: the CLI (one subprocess run with
soft movement pruning, L1 regularization and distillation), masked == bertarized evaluation, exact remaining
fractions, SQuAD v2.0 with global magnitude pruning, exact resume, 2-process torchrun evaluation equal to the
single-process one, the built-in default, and bad input."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bertarize
import count_parameters
import run_squad_pruning as script
from common.builtin import squad as builtin_squad
from common.data import squad
from common.errors import UserError, run_cli
from common.models import masked
from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "run_squad_pruning.py")
FAST = ["--max_seq_length", "48", "--doc_stride", "16", "--max_query_length", "12", "--per_gpu_train_batch_size",
        "8", "--per_gpu_eval_batch_size", "16", "--learning_rate", "1e-3", "--logging_steps", "2", "--save_steps",
        "0", "--seed", "7", "--warmup_steps", "1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def squad_args(model: str, data: str, out: Path, *extra: str, version: str = "v1.1") -> list[str]:
    return ["--model_name_or_path", model, "--data_dir", data, "--train_file", f"train-{version}.json",
            "--predict_file", f"dev-{version}.json", "--output_dir", str(out), *FAST, *extra]


def eval_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--data_dir", data, "--predict_file", "dev-v1.1.json",
            "--output_dir", str(out), "--max_seq_length", "48", "--doc_stride", "16", "--max_query_length", "12",
            "--do_eval", *extra]


@pytest.fixture(scope="module")
def pruned_run(squad_bert_dir, squad_v1_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Movement pruning (topK) to 50% in 6 steps, evaluated; shared by the evaluation and tool tests."""
    out = tmp_path_factory.mktemp("pruned")
    results = script.main(squad_args(squad_bert_dir, squad_v1_dir, out, "--do_train", "--do_eval", "--max_steps",
                                     "6", "--final_threshold", "0.5", "--save_steps", "3", "--overwrite_output_dir"))
    return out, results


@pytest.fixture(scope="module")
def dense_run(squad_bert_dir, squad_v1_dir, tmp_path_factory) -> Path:
    """Dense fine-tuning (--model_type bert, as the original's teacher runs), 4 steps."""
    out = tmp_path_factory.mktemp("dense")
    script.main(squad_args(squad_bert_dir, squad_v1_dir, out, "--model_type", "bert", "--do_train", "--max_steps",
                           "4", "--overwrite_output_dir"))
    return out


def read_json(path: Path):
    return json.loads(path.read_text())


def assert_same_nbest(a: Path, b: Path) -> None:
    """Same answers and n-best texts; logits equal up to float32 summation order (batch shapes differ)."""
    first, second = read_json(a / "nbest_predictions_.json"), read_json(b / "nbest_predictions_.json")
    assert first.keys() == second.keys()
    for qid in first:
        assert [n["text"] for n in first[qid]] == [n["text"] for n in second[qid]], qid
        for x, y in zip(first[qid], second[qid]):
            assert x["start_logit"] == pytest.approx(y["start_logit"], rel=1e-4, abs=1e-5)
            assert x["probability"] == pytest.approx(y["probability"], rel=1e-4, abs=1e-6)


def test_cli_end_to_end_soft_movement_with_distillation(squad_bert_dir, squad_v1_dir, dense_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, SCRIPT, *squad_args(squad_bert_dir, squad_v1_dir, out, "--do_train", "--do_eval",
                                             "--max_steps", "4", "--save_steps", "2",
                                             "--pruning_method", "sigmoied_threshold", "--initial_threshold", "0",
                                             "--final_threshold", "0.5", "--regularization", "l1",
                                             "--final_lambda", "10", "--mask_init", "uniform", "--mask_scale", "1",
                                             "--teacher_type", "bert", "--teacher_name_or_path", str(dense_run),
                                             "--alpha_ce", "0.3", "--alpha_distil", "0.7", "--temperature", "2")],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "predictions_.json", "nbest_predictions_.json",
                 "eval_results.json", "eval_results.txt", "remaining_weights.json", "remaining_weights.png",
                 "threshold_schedule.png", "log_history.jsonl", "run_args.json"):
        assert (out / name).is_file(), name
    assert not (out / "null_odds_.json").exists()  # v1.1
    assert (out / "checkpoint-000002" / "optimizer.pt").is_file()
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]
    for key in ("loss", "threshold", "regu_lambda", "regularization", "loss_ce", "loss_distil", "remaining/encoder",
                "remaining/layer_00", "remaining/layer_01"):
        assert all(key in r for r in logged), key
    assert logged[-1]["threshold"] == 0.5 and logged[-1]["regu_lambda"] == 10.0  # the schedule's end
    config = read_json(out / "config.json")
    assert config["pruning"]["method"] == "sigmoied_threshold" and config["pruning"]["threshold"] == 0.5
    results = read_json(out / "eval_results.json")
    assert set(results["eval"]["metrics"]) == {"exact", "f1", "total"}
    assert results["train"]["teacher"] == str(dense_run)
    predictions = read_json(out / "predictions_.json")
    dev = squad.read_squad(f"{squad_v1_dir}/dev-v1.1.json", False)
    assert set(predictions) == {e.qas_id for e in dev} and results["eval"]["metrics"]["total"] == len(dev)
    assert "exact = " in (out / "eval_results.txt").read_text()


def test_pruned_run_reaches_the_final_threshold(pruned_run):
    out, results = pruned_run
    assert results["train"]["train"]["global_step"] == 6
    remaining = read_json(out / "remaining_weights.json")
    # topK keeps int(0.5 * n) of every 32x32, 64x32 and 32x64 matrix: exactly half.
    assert remaining["encoder"]["fraction"] == 0.5
    assert all(m["fraction"] == 0.5 for m in remaining["matrices"].values())
    assert set(remaining["layers"]) == {"0", "1"}
    assert results["eval"]["remaining_encoder_fraction"] == 0.5
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    # warmup 1 step, cubic until step 6 - 2: threshold(2) = 0.5 + 0.5 * (1 - 1/3)^3
    assert logged[0]["threshold"] == pytest.approx(0.5 + 0.5 * (2 / 3) ** 3)
    assert logged[0]["remaining/encoder"] == pytest.approx(logged[0]["threshold"], abs=2e-3)
    assert (out / "checkpoint-000003" / "trainer_state.json").is_file()
    assert read_json(out / "checkpoint-000003" / "config.json")["pruning"]["method"] == "topK"


def test_stock_transformers_loads_the_pruned_folder_as_pruned(pruned_run):
    """Issue #11: stock from_pretrained on the output folder (and a checkpoint) gives the pruned model, with the
    pruned weights as zeros, not the unpruned weights beside unused mask scores."""
    out, _ = pruned_run
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = dict(tokenizer(["where does bob live ?", "what does alice own ?"],
                            ["bob lives in paris .", "alice owns a red car ."], padding=True, return_tensors="pt"))
    for folder in (out / "checkpoint-000003", out):
        stock = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
        pruned = masked.load_masked_model(str(folder))
        with torch.no_grad():
            got, expected = stock(**inputs), pruned(**inputs)
        for name in ("start_logits", "end_logits"):
            assert torch.allclose(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-5), (folder, name)
        remaining = masked.remaining_weights(pruned)
        zeros = sum(int((stock.get_submodule(n).weight == 0).sum()) for n in remaining)
        assert zeros == sum(t - k for k, t in remaining.values()) > 0, folder
    assert zeros == sum(t for _, t in remaining.values()) // 2  # the final folder: pruned to 50%


def test_eval_does_not_depend_on_batching(pruned_run, squad_v1_dir, tmp_path):
    out, results = pruned_run
    a = script.main(eval_args(str(out), squad_v1_dir, tmp_path / "a", "--per_gpu_eval_batch_size", "3"))
    b = script.main(eval_args(str(out), squad_v1_dir, tmp_path / "b", "--per_gpu_eval_batch_size", "64",
                              "--no_dynamic_padding"))
    assert a["eval"]["metrics"] == b["eval"]["metrics"] == results["eval"]["metrics"]
    assert read_json(tmp_path / "a" / "predictions_.json") == read_json(out / "predictions_.json")
    assert_same_nbest(tmp_path / "a", tmp_path / "b")


def test_bertarize_and_count_parameters(pruned_run, dense_run, squad_v1_dir, tmp_path, capsys):
    out, results = pruned_run
    target, compact = tmp_path / "bertarized", tmp_path / "compact"
    report = bertarize.main(["--model_name_or_path", str(out), "--target_model_path", str(target),
                             "--compact_path", str(compact), "--pruning_method", "topK"])
    assert report["remaining"]["fraction"] == 0.5
    assert 0 < report["compact_bytes"] < report["dense_bytes"]
    from transformers import AutoModelForQuestionAnswering, BertForQuestionAnswering

    stock = AutoModelForQuestionAnswering.from_pretrained(target)
    assert type(stock) is BertForQuestionAnswering and "pruning" not in read_json(target / "config.json")
    # Stock transformers on the bertarized folder answers exactly as the masked model did.
    again = script.main(eval_args(str(target), squad_v1_dir, tmp_path / "eval", "--model_type", "bert",
                                  "--per_gpu_eval_batch_size", "16"))  # the batches of the masked run's evaluation
    assert again["eval"]["metrics"] == results["eval"]["metrics"]
    assert read_json(tmp_path / "eval" / "nbest_predictions_.json") == read_json(out / "nbest_predictions_.json")

    counted_masked = count_parameters.main(["--serialization_dir", str(out), "--json", str(tmp_path / "c.json")])
    counted_stock = count_parameters.main(["--serialization_dir", str(target)])
    assert counted_masked["encoder"] == counted_stock["encoder"] == report["remaining"]
    assert counted_masked["layers"] == counted_stock["layers"]
    assert read_json(tmp_path / "c.json")["encoder"]["fraction"] == 0.5
    assert "Remaining Weights (global) %" in capsys.readouterr().out
    lower = count_parameters.main(["--serialization_dir", str(out), "--threshold", "0.25"])
    assert lower["encoder"]["fraction"] == 0.25

    expanded = tmp_path / "expanded"
    bertarize.main(["--model_name_or_path", str(compact), "--target_model_path", str(expanded)])
    dense_state, expanded_state = load_file(target / "model.safetensors"), load_file(expanded / "model.safetensors")
    assert dense_state.keys() == expanded_state.keys()
    assert all(torch.equal(dense_state[k], expanded_state[k]) for k in dense_state)

    with pytest.raises(UserError, match="holds no masked model"):
        bertarize.main(["--model_name_or_path", str(dense_run), "--target_model_path", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(UserError, match="does not match"):
        bertarize.main(["--model_name_or_path", str(out), "--pruning_method", "magnitude",
                        "--target_model_path", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="already holds files"):
        bertarize.main(["--model_name_or_path", str(out), "--target_model_path", str(target)])
    with pytest.raises(UserError, match="out of range for topK"):
        count_parameters.main(["--serialization_dir", str(out), "--threshold", "2"])


def test_run_shorter_than_the_schedule_warns_and_records_the_threshold_reached(squad_bert_dir, squad_v1_dir,
                                                                               tmp_path, caplog):
    """Issue #11: 2 steps with the threshold held for --warmup_steps 5: one warning before training, naming the
    steps and the flags; the results record that the final threshold was not reached."""
    out = tmp_path / "short"
    with caplog.at_level(logging.INFO):
        results = script.main(squad_args(squad_bert_dir, squad_v1_dir, out, "--do_train", "--do_eval",
                                         "--max_steps", "2", "--warmup_steps", "5", "--final_threshold", "0.5"))
    messages = [r.getMessage() for r in caplog.records]
    warned = [i for i, m in enumerate(messages) if "Pruning schedule cut short" in m]
    assert len(warned) == 1
    started = next(i for i, m in enumerate(messages) if m.startswith("***** Training"))
    assert warned[0] < started
    warning = messages[warned[0]]
    assert "2 optimizer steps" in warning and "--initial_warmup 1 x --warmup_steps 5 = 5" in warning
    assert "--max_steps" in warning and "--final_threshold 0.5" in warning
    for pruning in (results["train"]["pruning"], read_json(out / "eval_results.json")["train"]["pruning"]):
        assert pruning["threshold_reached"] == 1.0 and pruning["final_threshold"] == 0.5
        assert pruning["schedule_shortfall"] in warning
    assert results["eval"]["remaining_encoder_fraction"] == 1.0


def test_v2_with_global_magnitude_pruning(squad_bert_dir, squad_v2_dir, tmp_path):
    out = tmp_path / "v2"
    results = script.main(squad_args(squad_bert_dir, squad_v2_dir, out, "--version_2_with_negative", "--do_train",
                                     "--do_eval", "--max_steps", "4", "--pruning_method", "magnitude",
                                     "--global_topk", "--final_threshold", "0.3", "--null_score_diff_threshold",
                                     "0.5", version="v2.0"))
    metrics = results["eval"]["metrics"]
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_total", "best_f1",
                "best_f1_thresh"):
        assert key in metrics, key
    null_odds = read_json(out / "null_odds_.json")
    predictions = read_json(out / "predictions_.json")
    assert null_odds.keys() == predictions.keys()
    assert all((predictions[q] == "") == (null_odds[q] > 0.5) for q in predictions)
    remaining = read_json(out / "remaining_weights.json")
    assert remaining["encoder"]["fraction"] == pytest.approx(0.3, abs=1e-3)  # one cut for the whole encoder
    assert len({round(m["fraction"], 3) for m in remaining["matrices"].values()}) > 1


def test_roberta_end_to_end(tiny_roberta_dir, squad_v1_dir, tmp_path):
    """Another encoder family: byte-level BPE, no token types, <s> q </s></s> c </s> windows."""
    out = tmp_path / "roberta"
    results = script.main(squad_args(tiny_roberta_dir, squad_v1_dir, out, "--model_type", "masked_roberta",
                                     "--do_train", "--do_eval", "--max_steps", "2", "--max_seq_length", "64",
                                     "--final_threshold", "0.5"))
    assert results["eval"]["remaining_encoder_fraction"] == 0.5
    config = read_json(out / "config.json")
    assert config["model_type"] == "roberta" and config["pruning"]["method"] == "topK"
    report = bertarize.main(["--model_name_or_path", str(out), "--target_model_path", str(tmp_path / "stock")])
    assert report["remaining"]["fraction"] == 0.5


def test_resume_gives_the_same_model(squad_bert_dir, squad_v1_dir, tmp_path):
    flags = ["--do_train", "--max_steps", "6", "--save_steps", "3", "--global_topk",
             "--global_topk_frequency_compute", "2", "--final_threshold", "0.4", "--mask_init", "uniform",
             "--mask_scale", "0.1"]
    full = tmp_path / "full"
    script.main(squad_args(squad_bert_dir, squad_v1_dir, full, *flags))
    resumed = tmp_path / "resumed"
    script.main(squad_args(squad_bert_dir, squad_v1_dir, resumed, *flags, "--resume_from_checkpoint",
                           str(full / "checkpoint-000003")))
    reference, state = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert any(k.endswith("mask_scores") for k in reference)
    assert reference.keys() == state.keys()
    assert not [k for k in reference if not torch.equal(reference[k], state[k])]
    assert read_json(full / "config.json")["pruning"] == read_json(resumed / "config.json")["pruning"]


def test_structured_resume_shrink_and_counts(squad_bert_dir, squad_v1_dir, tmp_path):
    """Heads and neurons pruned with global top-k: resume is exact; bertarize --shrink gives a smaller model that
    answers exactly as the masked one; count_parameters reports the heads and neurons kept per layer."""
    flags = ["--do_train", "--max_steps", "6", "--save_steps", "3", "--global_topk", "--global_topk_frequency_compute",
             "2", "--final_threshold", "0.5", "--pruning_structure", "heads_neurons", "--mask_init", "uniform",
             "--mask_scale", "0.1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    script.main(squad_args(squad_bert_dir, squad_v1_dir, full, *flags, "--do_eval"))
    script.main(squad_args(squad_bert_dir, squad_v1_dir, resumed, *flags, "--resume_from_checkpoint",
                           str(full / "checkpoint-000003")))
    reference, state = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert reference["bert.encoder.layer.0.attention.self.query.mask_scores"].shape == (2,)  # one per head
    assert reference.keys() == state.keys()
    assert not [k for k in reference if not torch.equal(reference[k], state[k])]
    assert read_json(full / "config.json")["pruning"]["structure"] == "heads_neurons"
    remaining = read_json(full / "remaining_weights.json")
    assert [u["heads_total"] for u in remaining["units"]] == [2, 2]
    assert (full / "remaining_weights.png").is_file()

    shrunk = tmp_path / "shrunk"
    report = bertarize.main(["--model_name_or_path", str(full), "--target_model_path", str(shrunk), "--shrink"])
    assert report["shrink"]["max_output_difference"] <= 1e-5
    stock_keys = [k for k in reference if not k.endswith(("mask_scores", "unpruned_weight"))]
    assert sum(t.numel() for t in load_file(shrunk / "model.safetensors").values()) < sum(
        reference[k].numel() for k in stock_keys)
    counted = count_parameters.main(["--serialization_dir", str(shrunk)])
    assert counted["units"] == report["shrink"]["kept"] == count_parameters.main(
        ["--serialization_dir", str(full)])["units"] == remaining["units"]
    assert counted["encoder"]["fraction"] == remaining["encoder"]["fraction"]
    again = script.main(eval_args(str(shrunk), squad_v1_dir, tmp_path / "eval", "--per_gpu_eval_batch_size", "16"))
    assert again["eval"]["metrics"] == read_json(full / "eval_results.json")["eval"]["metrics"]
    with pytest.raises(UserError, match="pruned with --pruning_structure heads_neurons; pass the same"):
        script.main(squad_args(squad_bert_dir, squad_v1_dir, tmp_path / "other", *flags[:-6],
                               "--resume_from_checkpoint", str(full / "checkpoint-000003")))


def test_torchrun_two_processes_match_one(squad_bert_dir, squad_v1_dir, tmp_path):
    """Gloo, 2 processes: masked training under DDP, then its evaluation equals a single-process one."""
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    proc = subprocess.run(torchrun + squad_args(squad_bert_dir, squad_v1_dir, out, "--do_train", "--do_eval",
                                                "--max_steps", "3", "--per_gpu_eval_batch_size", "5",
                                                "--final_threshold", "0.5"),
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_json(out / "eval_results.json")["eval"]
    single = script.main(eval_args(str(out), squad_v1_dir, tmp_path / "single"))["eval"]
    assert ddp["num_examples"] == single["num_examples"] and ddp["num_features"] == single["num_features"]
    assert ddp["metrics"] == single["metrics"]
    assert read_json(out / "predictions_.json") == read_json(tmp_path / "single" / "predictions_.json")
    assert_same_nbest(out, tmp_path / "single")
    assert read_json(out / "remaining_weights.json")["encoder"]["fraction"] == 0.5


def test_builtin_default_runs_without_model_or_data(tmp_path, monkeypatch):
    """No --model_name_or_path/--data_dir: the built-in model and generated data (shortened here)."""
    monkeypatch.setitem(script.BUILTIN_DEFAULTS, "num_train_epochs", 0.05)
    monkeypatch.setattr(builtin_squad, "write_builtin_squad",
                        functools.partial(builtin_squad.write_builtin_squad, n_train=60, n_dev=10))
    results = script.main(["--do_train", "--do_eval", "--output_dir", str(tmp_path / "demo")])
    base = tmp_path / "demo" / "builtin"
    assert (base / "data" / "train-v1.1.json").is_file() and (base / "model" / "config.json").is_file()
    assert results["masked"] and results["train"]["pruning"]["method"] == "topK"
    assert results["eval"]["metrics"]["total"] == len(squad.read_squad(str(base / "data" / "dev-v1.1.json"), False))


# ----------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem and the fix, nothing half-written


def test_cli_error_is_one_line(squad_bert_dir, squad_v1_dir, tmp_path, capsys):
    code = run_cli(script.main, squad_args(squad_bert_dir, squad_v1_dir, tmp_path / "o", "--do_train",
                                           "--pruning_method", "movement"))
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown --pruning_method 'movement'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--final_threshold", "1.5"], r"--final_threshold 1\.5 is out of range for topK"),
    (["--pruning_method", "sigmoied_threshold"], r"--initial_threshold 1 is out of range for sigmoied_threshold"),
    (["--pruning_method", "magnitude", "--regularization", "l1", "--final_lambda", "1"], "magnitude pruning"),
    (["--pruning_method", "l0", "--global_topk"], "--global_topk works with"),
    (["--regularization", "l2"], "unknown --regularization 'l2'"),
    (["--teacher_type", "bert"], "needs both --teacher_type and --teacher_name_or_path"),
    (["--model_type", "bert", "--regularization", "l1"], "need a masked model"),
    (["--model_type", "masked_roberta"], "does not match"),
    (["--version_2_with_negative"], r"is SQuAD v1\.1 but --version_2_with_negative was given"),
    (["--doc_stride", "0"], "--doc_stride must be at least 1"),
    (["--max_query_length", "46"], "leaves no room for the context"),
])
def test_flag_problems(extra, pattern, squad_bert_dir, squad_v1_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(UserError, match=pattern):
        script.main(squad_args(squad_bert_dir, squad_v1_dir, out, "--do_train", *extra))
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("damage, pattern", [
    (lambda d: d["data"][1]["paragraphs"][0].pop("context"),
     r"train-v1\.1\.json: data\[1\]\.paragraphs\[0\]: missing key 'context'"),
    (lambda d: d["data"][0]["paragraphs"][2]["qas"][0]["answers"][0].update(text="zanzibar"),
     r"data\[0\]\.paragraphs\[2\]\.qas\[0\]\.answers\[0\]\.text: answer 'zanzibar' does not occur in the context"),
    (lambda d: d.update(version="v2.0"), "is SQuAD v2.0"),
    (lambda d: d.pop("data"), "not a SQuAD file"),
])
def test_bad_squad_files_write_nothing(damage, pattern, squad_bert_dir, squad_v1_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    doc = read_json(Path(squad_v1_dir) / "train-v1.1.json")
    damage(doc)
    (data / "train-v1.1.json").write_text(json.dumps(doc))
    (data / "dev-v1.1.json").write_text((Path(squad_v1_dir) / "dev-v1.1.json").read_text())
    out = tmp_path / "out"
    with pytest.raises(UserError, match=pattern):
        script.main(squad_args(squad_bert_dir, str(data), out, "--do_train", "--do_eval"))
    assert not (out / "model.safetensors").exists() and not (out / "runs").exists()
    assert not out.exists()  # nothing of value was made: the corrected command can run into the same folder
    assert not list(data.glob("cached_*"))


def test_missing_files_and_folders(squad_bert_dir, squad_v1_dir, tmp_path):
    with pytest.raises(UserError, match="--train_file is required with --do_train"):
        script.main(["--model_name_or_path", squad_bert_dir, "--data_dir", squad_v1_dir, "--do_train",
                     "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--predict_file dev.json: no such file"):
        script.main(["--model_name_or_path", squad_bert_dir, "--data_dir", squad_v1_dir, "--predict_file", "dev.json",
                     "--do_eval", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="not a complete model folder"):
        script.main(squad_args(str(tmp_path), squad_v1_dir, tmp_path / "o", "--do_train"))
