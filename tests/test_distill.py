"""scripts/distill.py, binarize_data.py, token_counts.py and extract_student.py end to end: the loss mix against
hand-computed values, student extraction, the CLI (a subprocess), resume equal to an uninterrupted run, a GPT-2
causal run, the 2-process torchrun run, the built-in default, and every bad input named in the issue."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForMaskedLM, DistilBertForMaskedLM, GPT2LMHeadModel

import binarize_data
import distill
import extract_student
import token_counts
from common import glibc_malloc, cpu_matmul
from common.builtin import distill as builtin_distill
from common.errors import UserError, run_cli
from common.models.student import DISTILBERT_LAYER, extract, load_teacher
from conftest import ROOT
from test_fused_loss import reference_step

SCRIPT = str(ROOT / "scripts" / "distill.py")
FAST = ["--batch_size", "16", "--gradient_accumulation_steps", "1", "--log_interval", "2",
        "--checkpoint_interval", "0", "--learning_rate", "1e-3", "--seed", "3", "--max_model_input_size", "32",
        "--per_gpu_eval_batch_size", "8"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlm_setup(tiny_mlm_teacher_dir, lm_corpus_dir, tmp_path_factory) -> dict[str, str]:
    """The corpus binarized and counted, and a 2-layer DistilBERT made from teacher layers 0 and 3, through the
    tools' own command lines (in-process)."""
    base = tmp_path_factory.mktemp("mlm-setup")
    data = binarize_data.main(["--file_path", str(lm_corpus_dir / "train.txt"), "--tokenizer_name",
                               tiny_mlm_teacher_dir, "--dump_file", str(base / "train")])["output"]
    counts = token_counts.main(["--data_file", data])["output"]
    extract_student.main(["--model_name", tiny_mlm_teacher_dir, "--num_layers", "2", "--dump_checkpoint",
                          str(base / "student")])
    return {"teacher": tiny_mlm_teacher_dir, "data": data, "counts": counts, "student": str(base / "student"),
            "eval": str(lm_corpus_dir / "eval.txt")}


def mlm_args(setup: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["--student_pretrained_weights", setup["student"], "--teacher_name", setup["teacher"], "--data_file",
            setup["data"], "--token_counts", setup["counts"], "--output_dir", str(out), "--mlm", *FAST, *extra]


# ----------------------------------------------------------------------------------------------------------
# the loss mix, by hand


def test_loss_terms_hand_computed():
    ln3 = math.log(3.0)
    student = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    teacher = torch.tensor([[[0.0, ln3], [2.0, 0.0]]])
    hidden_s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    hidden_t = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    attention = torch.tensor([[1, 1]])
    labels = torch.tensor([[1, -100]])  # position 0 is masked, its original token is 1
    # Identity output projections: the states entering them are the logits.
    eye = torch.nn.Linear(2, 2)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(2))
        eye.bias.zero_()

    def loss(hs, ht, labels, losses, causal=False):
        return distill.distillation_loss(student, eye, teacher, eye, hs, ht, attention, labels, losses, causal)

    kl_row0 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # KL((1/4, 3/4) || (1/2, 1/2)); row 1 matches: 0
    losses = distill.Losses(alpha_ce=0.5, alpha_mlm=2.0, alpha_clm=0.0, alpha_mse=0.1, alpha_cos=1.0,
                            temperature=1.0, restrict_ce_to_mask=False)
    total, terms = loss(hidden_s, hidden_t, labels, losses)
    expected = {"loss_ce": kl_row0 / 2, "loss_mlm": math.log(2.0), "loss_mse": ln3 ** 2 / 2,
                "loss_cos": (1 - 1 / math.sqrt(2)) / 2}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expected, abs=1e-6)
    weighted = 0.5 * expected["loss_ce"] + 2 * expected["loss_mlm"] + 0.1 * expected["loss_mse"] + \
        expected["loss_cos"]
    assert total.item() == pytest.approx(weighted, abs=1e-6)
    # Only on the masked position: the row that differs counts alone.
    restricted = distill.Losses(0.5, 0.0, 0.0, 0.1, 0.0, 1.0, restrict_ce_to_mask=True)
    _, terms = loss(None, None, labels, restricted)
    assert terms["loss_ce"].item() == pytest.approx(kl_row0, abs=1e-6)
    assert terms["loss_mse"].item() == pytest.approx(ln3 ** 2, abs=1e-6)
    # Temperature 2: the softened teacher (1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)), KL scaled by T^2 = 4.
    p = 1 / (1 + math.sqrt(3))
    kl_t2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    hot = distill.Losses(1.0, 0.0, 0.0, 0.0, 0.0, 2.0, restrict_ce_to_mask=True)
    _, terms = loss(None, None, labels, hot)
    assert terms["loss_ce"].item() == pytest.approx(4 * kl_t2, abs=1e-6)
    # Causal: position t predicts the token at t + 1; labels (1, 0) leave one prediction, of token 0 from row 0.
    causal = distill.Losses(0.0, 0.0, 1.0, 0.0, 0.0, 1.0, False)
    total, terms = loss(None, None, torch.tensor([[1, 0]]), causal, causal=True)
    assert terms == {"loss_clm": pytest.approx(math.log(2.0), abs=1e-6)} and total.item() == pytest.approx(
        math.log(2.0), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# student extraction


def test_extraction_bert_to_distilbert_copies_the_chosen_layers(mlm_setup):
    teacher = BertForMaskedLM.from_pretrained(mlm_setup["teacher"])
    student = DistilBertForMaskedLM.from_pretrained(mlm_setup["student"])
    report = json.loads((Path(mlm_setup["student"]) / "extraction.json").read_text())
    assert report["layers"] == [0, 3] and student.config.n_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 3]):
        for bert, distil in DISTILBERT_LAYER.items():
            for w in ("weight", "bias"):
                assert torch.equal(s[f"distilbert.transformer.layer.{j}.{distil}.{w}"],
                                   t[f"bert.encoder.layer.{i}.{bert}.{w}"])
    assert torch.equal(s["vocab_projector.bias"], t["cls.predictions.bias"])
    assert torch.equal(s["distilbert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    # Token type 0 folded into the positions: the student embeds a single-segment input as the teacher does.
    teacher.eval(), student.eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert torch.allclose(student.distilbert.embeddings(ids), teacher.bert.embeddings(input_ids=ids), atol=1e-6)
    # Without --vocab_transform the head's transform starts fresh, as in the original.
    assert "vocab_transform.weight" in report["fresh_tensors"]
    assert not torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2"])
def test_extraction_same_family(family, tiny_mlm_teacher_dir, tiny_roberta_dir, tiny_gpt2_dir, tmp_path):
    from transformers import RobertaForMaskedLM, RobertaModel

    if family == "roberta":  # the shared fixture is a bare encoder: give it an LM head first
        path = str(tmp_path / "roberta-mlm")
        torch.manual_seed(1)
        model = RobertaForMaskedLM(RobertaModel.from_pretrained(tiny_roberta_dir).config)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny_roberta_dir).save_pretrained(path)
        layer = "roberta.encoder.layer.{}."
    else:
        path = tiny_mlm_teacher_dir if family == "bert" else tiny_gpt2_dir
        layer = "bert.encoder.layer.{}." if family == "bert" else "transformer.h.{}."
    out = tmp_path / "student"
    report = extract_student.main(["--model_name", path, "--student_type", family, "--layers", "2", "0",
                                   "--vocab_transform", "--dump_checkpoint", str(out)])
    teacher = load_teacher(path)
    student = type(teacher).from_pretrained(str(out))
    t, s = teacher.state_dict(), student.state_dict()
    assert report["fresh_tensors"] == [] or all("attn.bias" in k for k in report["fresh_tensors"])
    for j, i in enumerate([2, 0]):  # student layer 0 is teacher layer 2, in the order given
        names = [k for k in t if k.startswith(layer.format(i))]
        assert names
        for k in names:
            assert torch.equal(s[layer.format(j) + k[len(layer.format(i)):]], t[k]), k
    assert not any(k.startswith(layer.format(2)) for k in s)  # only two layers
    assert (out / "tokenizer_config.json").is_file()


def test_extraction_refuses_bad_requests(tiny_bert_dir, tiny_mlm_teacher_dir, tmp_path):
    with pytest.raises(UserError, match="has no language-modelling head"):
        extract_student.main(["--model_name", tiny_bert_dir, "--dump_checkpoint", str(tmp_path / "s")])
    teacher = load_teacher(tiny_mlm_teacher_dir)
    with pytest.raises(UserError, match="cannot seed a gpt2 student"):
        extract(teacher, "gpt2", [0])
    with pytest.raises(UserError, match="the teacher has layers 0..3"):
        extract(teacher, "distilbert", [0, 4])


# ----------------------------------------------------------------------------------------------------------
# end to end


def test_cli_end_to_end_writes_every_output(mlm_setup, tmp_path):
    """The real command line: 2 epochs of 15 batches (accumulation 2: 7 steps each), checkpoints every 5 steps
    and at an epoch's end, every loss term, frozen position embeddings, evaluation on held-out text."""
    out = tmp_path / "run"
    args = mlm_args(mlm_setup, out, "--n_epoch", "2", "--gradient_accumulation_steps", "2",
                    "--checkpoint_interval", "5", "--alpha_ce", "5", "--alpha_mlm", "2", "--alpha_cos", "1",
                    "--alpha_mse", "0.01", "--freeze_pos_embs", "--eval_file", mlm_setup["eval"])
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "all_results.json", "eval_results.json",
                 "loss_terms.png", "log_history.jsonl", "run_args.json"):
        assert (out / name).is_file(), name
    # Every 5 steps and at the end of epoch one; the end of the last epoch is the final student itself.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == \
        ["checkpoint-000005", "checkpoint-000007", "checkpoint-000010"]
    assert (out / "checkpoint-000007" / "optimizer.pt").is_file()
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".") or "tmp" in p.name], "temporary files"
    results = json.loads((out / "all_results.json").read_text())
    assert results["train"]["global_step"] == 14 and results["max_model_input_size"] == 32
    assert results["data"]["split_too_long"] > 0 and results["data"]["removed_too_short"] >= 1
    assert results["frozen"] == ["distilbert.embeddings.position_embeddings.weight"]
    glibc = glibc_malloc._glibc() is not None and os.path.exists("/proc/self/statm")
    held = glibc and not glibc_malloc.malloc_set_in_environment()
    if held:  # freed memory held for reuse (the default), its baseline taken once the first step settled it
        assert results["malloc_held"]["limit_mb"] == distill.HOLD_MB and results["malloc_held"]["baseline_mb"] > 0
        assert results["malloc_mmap_threshold"] is None
    else:
        assert results["malloc_held"] is None
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["objective"] == "mlm" and ev["sequences"] == 40
    assert ev["teacher"]["predicted_tokens"] == ev["student"]["predicted_tokens"] > 0
    assert ev["student"]["parameters"] < ev["teacher"]["parameters"]
    assert ev["student_vs_teacher"]["parameters"] == pytest.approx(
        ev["student"]["parameters"] / ev["teacher"]["parameters"])
    assert math.isfinite(ev["student"]["perplexity"]) and ev["student_vs_teacher"]["speedup"] > 0
    logged = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(2, 15, 2))
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse", "lr", "tokens_per_second",
                "memory_rss_mb", "padding_share"):
        assert key in logged[-1], key
    # A stock checkpoint whose frozen position embeddings are the initialization's.
    student = DistilBertForMaskedLM.from_pretrained(str(out))
    init = load_file(os.path.join(mlm_setup["student"], "model.safetensors"))
    name = "distilbert.embeddings.position_embeddings.weight"
    assert torch.equal(student.state_dict()[name], init[name])
    assert not torch.equal(student.state_dict()["distilbert.transformer.layer.0.ffn.lin1.weight"],
                           init["distilbert.transformer.layer.0.ffn.lin1.weight"])


def test_twenty_steps_end_at_the_weights_of_the_whole_logits_loss(mlm_setup, tmp_path, monkeypatch):
    """The chunked losses train as the straightforward computation on whole logits (stock nn.Linear and
    nn.Embedding) does, the products of both models' linears and of the losses through BLAS and through oneDNN,
    the tied embedding's gradient added into the projection's (test_fused_loss.py compares one step term by term
    and gradient by gradient)."""
    common = ["--max_steps", "20", "--batch_size", "4", "--alpha_ce", "5", "--alpha_mlm", "2", "--alpha_mse", "0.1",
              "--alpha_cos", "1", "--loss_chunk_size", "7"]
    backends = ["blas"] + (["onednn"] if cpu_matmul.onednn_available() else [])
    for backend in backends:
        distill.main(mlm_args(mlm_setup, tmp_path / backend, *common, "--matmul", backend))

    def whole_logits_step(run, teacher, *rest):
        return reference_step(run.losses, run.causal, teacher)

    monkeypatch.setattr(distill, "DistillStep", whole_logits_step)
    distill.main(mlm_args(mlm_setup, tmp_path / "whole", *common, "--matmul", "blas"))  # stock nn.Linear
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    init = load_file(os.path.join(mlm_setup["student"], "model.safetensors"))
    for backend in backends:
        chunked = load_file(str(tmp_path / backend / "model.safetensors"))
        assert chunked.keys() == whole.keys()
        for name, w in whole.items():  # (a tensor that stays near 0, e.g. the key bias with no gradient: 1e-3)
            assert float((chunked[name] - w).abs().max()) <= 1e-5 * max(float(w.abs().max()), 1e-3), (backend, name)
    lin = "distilbert.transformer.layer.1.ffn.lin1.weight"
    assert float((whole[lin] - init[lin]).abs().max()) > 1e-3  # twenty steps that moved the weights


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(mlm_setup, tmp_path):
    common = ["--max_steps", "6", "--checkpoint_interval", "3", "--gradient_accumulation_steps", "2",
              "--alpha_ce", "1", "--alpha_mlm", "1", "--alpha_cos", "1"]
    full = tmp_path / "full"
    full_results = distill.main(mlm_args(mlm_setup, full, *common))
    resumed = tmp_path / "resumed"
    resumed_results = distill.main(mlm_args(mlm_setup, resumed, *common, "--resume_from_checkpoint",
                                            str(full / "checkpoint-000003")))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    steps = [json.loads(line)["step"] for line in (resumed / "log_history.jsonl").read_text().splitlines()]
    assert steps == [4, 6]
    saved = torch.load(full / "checkpoint-000003" / "optimizer.pt", weights_only=True)
    assert all(group["fused"] for group in saved["param_groups"])  # AdamW's fused kernel, kept by the resume
    # all_results counts the whole run's tokens, replayed from the batch plan: what the uninterrupted run counted
    # as it went, also after a resume (whose own share is reported apart).
    whole, part = full_results["train"], resumed_results["train"]
    assert whole["tokens"] == whole["tokens_this_run"] == part["tokens"]
    assert 0 < part["tokens_this_run"] < part["tokens"]
    assert part["padding_share"] == whole["padding_share"]
    assert json.loads((resumed / "all_results.json").read_text())["train"]["tokens"] == whole["tokens"]


def test_gpt2_student_learns_causally(tiny_gpt2_dir, lm_corpus_dir, tmp_path):
    data = binarize_data.main(["--file_path", str(lm_corpus_dir / "train.txt"), "--tokenizer_name", tiny_gpt2_dir,
                               "--dump_file", str(tmp_path / "train.bin")])["output"]
    extract_student.main(["--model_name", tiny_gpt2_dir, "--num_layers", "2", "--dump_checkpoint",
                          str(tmp_path / "student")])
    results = distill.main(["--student_pretrained_weights", str(tmp_path / "student"), "--teacher_name",
                            tiny_gpt2_dir, "--data_file", data, "--output_dir", str(tmp_path / "out"),
                            "--clm", "--no_group_by_size", "--max_steps", "3", "--alpha_ce", "1", "--alpha_cos", "1",
                            "--eval_file", str(lm_corpus_dir / "eval.txt"), *FAST])
    assert results["objective"] == "clm" and results["losses"]["alpha_clm"] == 0.5
    assert results["train"]["group_by_size"] is False and results["train"]["global_step"] == 3
    ev = results["eval"]
    assert ev["objective"] == "clm"
    # Every next token of every sequence is predicted.
    assert ev["teacher"]["predicted_tokens"] == ev["teacher"]["tokens"] - ev["sequences"]
    assert math.isfinite(ev["student"]["perplexity"]) and math.isfinite(ev["teacher"]["perplexity"])
    logged = json.loads((tmp_path / "out" / "log_history.jsonl").read_text().splitlines()[-1])
    assert {"loss_ce", "loss_clm", "loss_cos"} <= set(logged)
    assert GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).config.n_layer == 2


def test_torchrun_two_processes_match_one(mlm_setup, tmp_path):
    """Gloo, 2 processes: training runs under DDP with length-grouped shards, checkpoints keep both ranks' RNG,
    and the evaluation (gathered over ranks) scores the teacher exactly as one process does."""
    args = ["--max_steps", "2", "--checkpoint_interval", "2", "--eval_file", mlm_setup["eval"], "--alpha_ce", "1",
            "--alpha_mlm", "1"]
    single = distill.main(mlm_args(mlm_setup, tmp_path / "single", *args))["eval"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    out = tmp_path / "ddp"
    proc = subprocess.run(torchrun + mlm_args(mlm_setup, out, *args), capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "eval_results.json").read_text())
    assert ddp["sequences"] == single["sequences"] == 40
    assert ddp["teacher"]["predicted_tokens"] == single["teacher"]["predicted_tokens"]
    assert ddp["teacher"]["perplexity"] == pytest.approx(single["teacher"]["perplexity"], rel=1e-5)
    assert (out / "checkpoint-000002" / "rng_state_1.pt").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert results["train"]["global_step"] == 2
    assert DistilBertForMaskedLM.from_pretrained(str(out)).config.n_layers == 2


def test_builtin_default_runs_and_the_loss_falls(tmp_path, monkeypatch):
    """No --data_file/--teacher_name: the built-in corpus, teacher and student (shortened here)."""
    monkeypatch.setattr(builtin_distill, "BUILTIN_TEACHER_STEPS", 30)
    monkeypatch.setattr(builtin_distill, "write_builtin_corpus",
                        functools.partial(builtin_distill.write_builtin_corpus, n_train=1000, n_eval=100))
    out = tmp_path / "demo"
    results = distill.main(["--output_dir", str(out), "--max_steps", "30", "--log_interval", "10",
                            "--learning_rate", "3e-3"])
    assert results["objective"] == "mlm" and results["student_type"] == "distilbert"
    assert (out / "builtin" / "data" / "train.txt").is_file() and (out / "builtin" / "teacher" / "config.json")
    assert results["eval"]["sequences"] == 100
    assert results["losses"] == {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_clm": 0.0, "alpha_mse": 0.0,
                                 "alpha_cos": 1.0, "temperature": 2.0, "restrict_ce_to_mask": False}
    losses = [json.loads(line)["loss"] for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.95 * losses[0]


# ----------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, nothing trained


@pytest.fixture(scope="module")
def gpt2_student(tiny_gpt2_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("gpt2-student") / "s"
    extract_student.main(["--model_name", tiny_gpt2_dir, "--num_layers", "1", "--dump_checkpoint", str(out)])
    return str(out)


@pytest.mark.parametrize("case, pattern", [
    ("vocab_mismatch", "student's vocabulary .* differs from the teacher's"),
    ("mlm_with_causal_student", "--mlm needs a masked-LM student"),
    ("clm_with_masked_student", "--clm needs a causal student"),
    ("all_alphas_zero", "every loss weight is zero"),
    ("alpha_clm_with_mlm", "--alpha_clm needs a causal"),
    ("damaged_data", "is damaged"),
    ("other_tokenizer", "binarized with another tokenizer"),
    ("only_data", "give both --data_file and --teacher_name"),
    ("bad_word_shares", "must be >= 0 and sum to 1"),
    ("zero_chunk", "--loss_chunk_size must be at least 1"),
    ("negative_mmap_threshold", "--malloc_mmap_threshold must lie in \\[0, 33554432\\] bytes"),
    ("negative_hold", "--malloc_hold_mb cannot be negative"),
    ("threshold_while_holding", "--malloc_mmap_threshold only applies with --malloc_hold_mb 0"),
    ("onednn_missing", "--matmul onednn: this PyTorch build has no oneDNN linear"),
    ("cos_with_other_width", "--alpha_cos compares hidden states"),
])
def test_bad_inputs(case, pattern, mlm_setup, gpt2_student, tiny_gpt2_dir, lm_corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    base = mlm_args(mlm_setup, out)
    if case == "vocab_mismatch":
        config = json.loads((Path(mlm_setup["student"]) / "config.json").read_text())
        config["vocab_size"] += 7
        (tmp_path / "cfg.json").write_text(json.dumps(config))
        argv = base + ["--student_config", str(tmp_path / "cfg.json")]
    elif case == "mlm_with_causal_student":
        argv = base + ["--student_pretrained_weights", gpt2_student]
    elif case == "clm_with_masked_student":
        argv = [a for a in base if a != "--mlm"] + ["--clm"]
    elif case == "all_alphas_zero":
        argv = base + ["--alpha_ce", "0"]
    elif case == "alpha_clm_with_mlm":
        argv = base + ["--alpha_clm", "0.5"]
    elif case == "damaged_data":
        data = Path(mlm_setup["data"]).read_bytes()
        (tmp_path / "bad.bin").write_bytes(data[:-40])
        argv = base + ["--data_file", str(tmp_path / "bad.bin")]
    elif case == "other_tokenizer":
        other = binarize_data.main(["--file_path", str(lm_corpus_dir / "eval.txt"), "--tokenizer_name", tiny_gpt2_dir,
                                    "--dump_file", str(tmp_path / "gpt2.bin")])["output"]
        argv = base + ["--data_file", other]
    elif case == "only_data":
        argv = ["--data_file", mlm_setup["data"], "--output_dir", str(out)]
    elif case == "bad_word_shares":
        argv = base + ["--word_mask", "0.5"]
    elif case == "zero_chunk":
        argv = base + ["--loss_chunk_size", "0"]
    elif case == "negative_mmap_threshold":
        argv = base + ["--malloc_hold_mb", "0", "--malloc_mmap_threshold", "-1"]
    elif case == "negative_hold":
        argv = base + ["--malloc_hold_mb", "-1"]
    elif case == "threshold_while_holding":
        argv = base + ["--malloc_mmap_threshold", str(2**20)]
    elif case == "onednn_missing":  # a build without oneDNN
        monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: False)
        argv = base + ["--matmul", "onednn"]
    else:
        config = json.loads((Path(mlm_setup["student"]) / "config.json").read_text())
        config.update(dim=16, hidden_dim=32)
        (tmp_path / "narrow.json").write_text(json.dumps(config))
        argv = [a for a in base if a != mlm_setup["student"]]
        argv.remove("--student_pretrained_weights")
        argv += ["--student_config", str(tmp_path / "narrow.json"), "--alpha_cos", "1"]
    with pytest.raises(UserError, match=pattern) as err:
        distill.main(argv)
    assert "\n" not in str(err.value)
    assert not (out / "model.safetensors").exists()


def test_user_error_is_one_line_and_exit_code_2(mlm_setup, tmp_path, capsys):
    code = run_cli(distill.main, mlm_args(mlm_setup, tmp_path / "o", "--alpha_ce", "0"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: every loss weight is zero")


def test_demo_keeps_flags_given_explicitly_and_checks_them_before_building(tmp_path):
    args = distill.parse_args(["--alpha_mlm", "0", "--batch_size", "5"])
    assert args.alpha_mlm == 0.0 and args.per_gpu_train_batch_size == 5  # both equal the plain defaults
    assert args.alpha_ce == 5.0 and args.logging_steps == 10  # the demo's values for the flags left out
    assert distill.parse_args(["--loss_matmul", "blas"]).matmul == "blas"  # --matmul's earlier name still works
    with pytest.raises(UserError, match="every loss weight is zero"):
        distill.main(["--alpha_ce", "0", "--alpha_mlm", "0", "--alpha_cos", "0", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # refused before the demo's teacher was trained


def test_student_config_that_does_not_fit_its_weights_is_one_line(mlm_setup, tmp_path):
    config = json.loads((Path(mlm_setup["student"]) / "config.json").read_text())
    config["hidden_dim"] = config["hidden_dim"] * 2  # the FFN width the weights were not made with
    (tmp_path / "student.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"do not fit the student config .*student\.json: .* is \[\d+, \d+\] in the "
                                        r"weights but \[\d+, \d+\] in the config; give the config"):
        distill.main(mlm_args(mlm_setup, tmp_path / "out", "--student_config", str(tmp_path / "student.json"),
                              "--max_steps", "1"))
