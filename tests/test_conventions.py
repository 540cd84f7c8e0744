"""Conventions users of the Hugging Face examples expect (#11): --save_total_limit (with resume), --max_train_samples
/ --max_eval_samples, --report_to none, train_results.json / all_results.json, the model card, for the three
scripts; the original pipeline's .pickle corpus name; one threshold per run into one plot folder keeps every one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import binarize_data
import distill
import extract_student
import run_glue_early_exit as glue_script
import run_squad_pruning as squad_script
import token_counts
from common.checkpoint import TrainState, find_checkpoints, rotate_checkpoints
from common.errors import UserError
from common.io import write_json_atomic
from conftest import model_state

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_KEYS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps", "train_samples")
GLUE_FAST = ["--max_seq_length", "32", "--per_gpu_train_batch_size", "8", "--per_gpu_eval_batch_size", "16",
             "--learning_rate", "1e-3", "--logging_steps", "2", "--seed", "7"]


def read_json(path: Path):
    return json.loads(path.read_text())


def checkpoints(folder: Path) -> list[str]:
    return [os.path.basename(p) for p in find_checkpoints(str(folder))]


# ----------------------------------------------------------------------------------------------------------
# --save_total_limit, in the checkpoint module


def fake_checkpoint(folder: Path, stage_index: int, step: int) -> str:
    path = folder / f"checkpoint-{stage_index}-{step:06d}"
    path.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, path / name)
    write_json_atomic(str(path / "trainer_state.json"), TrainState(global_step=step, stage_index=stage_index).__dict__)
    return str(path)


def test_rotate_keeps_the_newest_by_progress_and_the_resumed_one(tmp_path):
    paths = [fake_checkpoint(tmp_path, 1, 5), fake_checkpoint(tmp_path, 0, 20), fake_checkpoint(tmp_path, 0, 10)]
    removed = rotate_checkpoints(str(tmp_path), 2)
    assert [os.path.basename(p) for p in removed] == ["checkpoint-0-000010"]  # stage order first, then step
    assert checkpoints(tmp_path) == ["checkpoint-0-000020", "checkpoint-1-000005"]
    # The checkpoint a run resumed from stays while it is the newest; the one just saved always stays.
    assert rotate_checkpoints(str(tmp_path), 1, keep=(paths[1],), protect=paths[0]) == []
    newer = fake_checkpoint(tmp_path, 1, 8)
    rotate_checkpoints(str(tmp_path), 1, keep=(newer,), protect=paths[0])
    assert checkpoints(tmp_path) == ["checkpoint-1-000008"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# ----------------------------------------------------------------------------------------------------------
# DeeBERT


@pytest.fixture(scope="module")
def glue_run(tiny_bert_dir, sst2_dir, tmp_path_factory) -> Path:
    """Both stages, 6 steps each, a checkpoint every 3, at most 2 kept; 64 training rows, 20 dev rows; no
    TensorBoard."""
    out = tmp_path_factory.mktemp("glue-conventions")
    glue_script.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", sst2_dir, "--task_name", "sst-2",
                      "--output_dir", str(out), *GLUE_FAST, "--do_train", "--do_eval", "--max_steps", "6",
                      "--save_steps", "3", "--save_total_limit", "2", "--report_to", "none", "--max_train_samples",
                      "64", "--max_eval_samples", "20", "--eval_highway", "--early_exit_entropy", "0.2",
                      "--overwrite_output_dir"])
    return out


def test_glue_conventions(glue_run):
    assert checkpoints(glue_run) == ["checkpoint-stage2-000003", "checkpoint-stage2-000006"]
    assert not (glue_run / "runs").exists() and (glue_run / "log_history.jsonl").stat().st_size > 0
    results = read_json(glue_run / "eval_results.json")["eval"]["sst-2"]
    assert results["num_examples"] == 20
    train = read_json(glue_run / "train_results.json")
    assert all(k in train for k in TRAIN_KEYS) and train["train_samples"] == 64 and train["train_steps"] == 12
    assert "train_checkpoint-stage1_loss" not in train and "train_stage1_loss" in train
    everything = read_json(glue_run / "all_results.json")
    assert {**train, "eval_acc": everything["eval_acc"]}.items() <= everything.items()
    assert everything["eval_samples"] == 20 and "eval_entropy_0.2_avg_exit_layer" in everything
    card = (glue_run / "README.md").read_text()
    assert "DeeBERT" in card and "entropy=0.2" in card and "from_pretrained" in card and "off_ramps" in card


def test_glue_resume_under_save_total_limit(glue_run, tiny_bert_dir, sst2_dir, tmp_path):
    """Resuming 'latest' from the older kept checkpoint: it survives until the run saves a newer one, then goes;
    the final weights equal the uninterrupted run's."""
    out = tmp_path / "resumed"
    shutil.copytree(glue_run / "checkpoint-stage2-000003", out / "checkpoint-stage2-000003")
    glue_script.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", sst2_dir, "--task_name", "sst-2",
                      "--output_dir", str(out), *GLUE_FAST, "--do_train", "--max_steps", "6", "--save_steps", "3",
                      "--save_total_limit", "1", "--report_to", "none", "--max_train_samples", "64",
                      "--resume_from_checkpoint", "latest"])
    assert checkpoints(out) == ["checkpoint-stage2-000006"]
    reference, resumed = model_state(str(glue_run)), model_state(str(out))
    assert not [k for k in reference if not torch.equal(reference[k], resumed[k])]


def test_glue_single_threshold_runs_into_one_plot_dir_keep_every_threshold(glue_run, sst2_dir, tmp_path):
    plots = tmp_path / "plots"
    for threshold in ("0.3", "0.1", "0.3"):  # entropy_eval.sh: one run per threshold (0.3 measured twice)
        glue_script.main(["--model_name_or_path", str(glue_run), "--data_dir", sst2_dir, "--task_name", "sst-2",
                          "--output_dir", str(tmp_path / "eval"), "--max_seq_length", "32", "--do_eval",
                          "--max_eval_samples", "20", "--eval_highway", "--early_exit_entropy", threshold,
                          "--plot_data_dir", str(plots)])
    sweep = read_json(plots / "early_exit_sweep.json")
    assert [p["threshold"] for p in sweep] == [0.1, 0.3]
    assert (plots / "early_exit_sweep.png").is_file()
    # eval-only runs leave the train metrics out and still write all_results.json
    assert not (tmp_path / "eval" / "train_results.json").exists()
    assert "eval_entropy_0.3_acc" in read_json(tmp_path / "eval" / "all_results.json")


# ----------------------------------------------------------------------------------------------------------
# movement pruning


def test_squad_conventions(squad_bert_dir, squad_v1_dir, tmp_path):
    out = tmp_path / "squad"
    squad_script.main(["--model_name_or_path", squad_bert_dir, "--data_dir", squad_v1_dir, "--train_file",
                       "train-v1.1.json", "--predict_file", "dev-v1.1.json", "--output_dir", str(out),
                       "--max_seq_length", "48", "--doc_stride", "16", "--max_query_length", "12",
                       "--per_gpu_train_batch_size", "8", "--per_gpu_eval_batch_size", "16", "--learning_rate", "1e-3",
                       "--logging_steps", "1", "--warmup_steps", "1", "--final_threshold", "0.5", "--do_train",
                       "--do_eval", "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "2",
                       "--report_to", "none", "--max_train_samples", "12", "--max_eval_samples", "5"])
    assert checkpoints(out) == ["checkpoint-000002", "checkpoint-000003"]
    assert not (out / "runs").exists()
    ev = read_json(out / "eval_results.json")["eval"]
    assert ev["num_examples"] == 5 and len(read_json(out / "predictions_.json")) == 5
    train = read_json(out / "train_results.json")
    assert all(k in train for k in TRAIN_KEYS) and train["train_steps"] == 3
    everything = read_json(out / "all_results.json")
    assert "eval_f1" in everything and "eval_exact" in everything and everything["eval_samples"] == 5
    card = (out / "README.md").read_text()
    assert "movement pruning (topK)" in card and "bertarize.py" in card and "final sparsity" in card


# ----------------------------------------------------------------------------------------------------------
# distillation and its data tools


@pytest.fixture(scope="module")
def lm_setup(tiny_mlm_teacher_dir, lm_corpus_dir, tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("lm-conventions")
    data = binarize_data.main(["--file_path", str(lm_corpus_dir / "train.txt"), "--tokenizer_name",
                               tiny_mlm_teacher_dir, "--dump_file", str(base / "train")])["output"]
    extract_student.main(["--model_name", tiny_mlm_teacher_dir, "--num_layers", "2", "--dump_checkpoint",
                          str(base / "student")])
    return {"teacher": tiny_mlm_teacher_dir, "data": data, "student": str(base / "student"),
            "eval": str(lm_corpus_dir / "eval.txt")}


def test_pickle_name_resolves_to_the_bin_or_names_it(lm_setup, tmp_path, caplog):
    pickle_name = lm_setup["data"][: -len(".bin")] + ".pickle"
    with caplog.at_level("INFO"):
        summary = token_counts.main(["--data_file", pickle_name, "--token_counts_dump", str(tmp_path / "c.st")])
    assert summary["tokens"] > 0 and lm_setup["data"] in caplog.text
    missing = str(tmp_path / "binarized_text.bert-base-uncased.pickle")
    with pytest.raises(UserError, match=r"binarized_text\.bert-base-uncased\.bin") as err:
        token_counts.main(["--data_file", missing])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"binarized_text\.bert-base-uncased\.bin"):
        distill.main(["--student_pretrained_weights", lm_setup["student"], "--teacher_name", lm_setup["teacher"],
                      "--data_file", missing, "--output_dir", str(tmp_path / "never"), "--mlm"])


def test_distill_conventions(lm_setup, tmp_path):
    out = tmp_path / "distill"
    pickle_name = lm_setup["data"][: -len(".bin")] + ".pickle"  # the original's name: the .bin is used
    results = distill.main(["--student_pretrained_weights", lm_setup["student"], "--teacher_name",
                            lm_setup["teacher"], "--data_file", pickle_name, "--output_dir", str(out), "--mlm",
                            "--batch_size", "8", "--gradient_accumulation_steps", "1", "--log_interval", "1",
                            "--max_model_input_size", "32", "--per_gpu_eval_batch_size", "8", "--max_steps", "3",
                            "--checkpoint_interval", "1", "--save_total_limit", "1", "--report_to", "none",
                            "--max_train_samples", "40", "--alpha_ce", "1", "--alpha_mlm", "1",
                            "--eval_file", lm_setup["eval"]])
    assert results["data"]["sequences"] == 40
    assert checkpoints(out) == ["checkpoint-000003"]
    assert not (out / "runs").exists()
    train = read_json(out / "train_results.json")
    assert all(k in train for k in TRAIN_KEYS) and train["train_samples"] == 40
    everything = read_json(out / "all_results.json")
    assert everything["train"]["global_step"] == 3 and everything["train_loss"] == train["train_loss"]
    assert "eval_student_perplexity" in everything and "eval_teacher_perplexity" in everything
    card = (out / "README.md").read_text()
    assert "distillation" in card and "distilbert" in card and "alpha_ce 1" in card and lm_setup["teacher"] in card
