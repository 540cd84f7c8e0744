"""--do_predict (#11): GLUE's unlabelled test files into predict_results_<task>.txt, SQuAD questions without
answers into predictions.json, the bad inputs, and the README's "Using the outputs" snippet (run here as
written there, on a tiny bertarized model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import bertarize
import run_glue_early_exit as glue_script
import run_squad_pruning as squad_script
from common.builtin import glue as builtin_glue
from common.data import glue
from common.errors import UserError
from conftest import ROOT, write_tsv

GLUE_FAST = ["--max_seq_length", "32", "--per_gpu_train_batch_size", "16", "--per_gpu_eval_batch_size", "7",
             "--learning_rate", "1e-3", "--logging_steps", "2", "--save_steps", "0", "--seed", "7"]
SQUAD_SHAPE = ["--max_seq_length", "64", "--doc_stride", "32", "--max_query_length", "16",
               "--per_gpu_eval_batch_size", "5"]


def read_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def write_sst2_test(folder: Path, n: int = 30, first_index: int = 100) -> list[str]:
    """An SST-2 test.tsv (GLUE's layout: index, sentence) whose indices start at `first_index`."""
    import random

    rng = random.Random(11)
    sentences = [builtin_glue._sentence(rng)[0] for _ in range(n)]
    write_tsv(folder / "test.tsv", ["index", "sentence"], [[str(first_index + i), s] for i, s in enumerate(sentences)])
    return sentences


# ----------------------------------------------------------------------------------------------------------
# GLUE


@pytest.fixture(scope="module")
def trained_glue(tiny_bert_dir, sst2_dir, tmp_path_factory) -> Path:
    """An early-exit folder trained through both stages (a few steps)."""
    out = tmp_path_factory.mktemp("glue-trained")
    glue_script.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", sst2_dir, "--task_name", "sst-2",
                      "--output_dir", str(out), *GLUE_FAST, "--do_train", "--max_steps", "3",
                      "--overwrite_output_dir"])
    return out


def test_glue_predict_alone_equals_the_stock_models_argmax(trained_glue, tmp_path, one_thread):
    data = tmp_path / "SST-2"
    sentences = write_sst2_test(data)
    out = tmp_path / "pred"
    results = glue_script.main(["--model_name_or_path", str(trained_glue), "--data_dir", str(data), "--task_name",
                                "SST-2", "--output_dir", str(out), "--do_predict", "--max_seq_length", "32",
                                "--per_gpu_eval_batch_size", "7"])
    rows = read_rows(out / "predict_results_sst-2.txt")
    assert rows[0] == ["index", "prediction"]
    assert [r[0] for r in rows[1:]] == [str(100 + i) for i in range(len(sentences))]
    assert {r[1] for r in rows[1:]} <= {"0", "1"}
    assert results["predict"]["sst-2"]["num_examples"] == len(sentences)
    # The same rows through plain transformers: the stock checkpoint's argmax.
    model = AutoModelForSequenceClassification.from_pretrained(str(trained_glue)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(trained_glue))
    with torch.no_grad():
        logits = model(**tokenizer(sentences, truncation=True, max_length=32, padding=True,
                                   return_tensors="pt")).logits
    assert [r[1] for r in rows[1:]] == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]

    # One threshold: early exit, with the exit layer; entropy 0 lets nobody leave early (the same predictions).
    glue_script.main(["--model_name_or_path", str(trained_glue), "--data_dir", str(data), "--task_name", "sst-2",
                      "--output_dir", str(tmp_path / "ee0"), "--do_predict", "--max_seq_length", "32",
                      "--early_exit_entropy", "0"])
    ee0 = read_rows(tmp_path / "ee0" / "predict_results_sst-2.txt")
    assert ee0[0] == ["index", "prediction", "exit_layer"]
    assert [r[:2] for r in ee0[1:]] == [r[:2] for r in rows[1:]] and {r[2] for r in ee0[1:]} == {"3"}
    glue_script.main(["--model_name_or_path", str(trained_glue), "--data_dir", str(data), "--task_name", "sst-2",
                      "--output_dir", str(tmp_path / "ee"), "--do_predict", "--max_seq_length", "32",
                      "--early_exit_entropy", "10"])
    ee = read_rows(tmp_path / "ee" / "predict_results_sst-2.txt")
    assert len(ee) == len(rows) and {r[2] for r in ee[1:]} == {"1"}  # any entropy is below 10: all leave at 1


@pytest.mark.parametrize("task", ["mnli", "sts-b"])
def test_glue_predict_mnli_both_files_and_stsb_scores(task, tiny_bert_dir, tmp_path, one_thread):
    """MNLI predicts test_matched and test_mismatched; STS-B writes scores (a model with a fresh head)."""
    if task == "mnli":
        header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2"]
        files = {"test_matched.tsv": 7, "test_mismatched.tsv": 5}
    else:
        header = "index genre filename year old_index source1 source2 sentence1 sentence2".split()
        files = {"test.tsv": 6}
    for name, n in files.items():
        filler = ["x"] * (len(header) - 3)  # the columns between the index and the two sentences
        write_tsv(tmp_path / "data" / name, header, [[str(i), *filler, "good film", "bad plot"] for i in range(n)])
    out = tmp_path / "out"
    glue_script.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(tmp_path / "data"), "--task_name",
                      task, "--output_dir", str(out), "--do_predict", "--max_seq_length", "32"])
    names = {"mnli": ["mnli", "mnli-mm"], "sts-b": ["sts-b"]}[task]
    written = sorted(p.name for p in out.glob("predict_results_*.txt"))
    assert written == sorted(f"predict_results_{n}.txt" for n in names)
    for name, n in zip(names, files.values()):
        rows = read_rows(out / f"predict_results_{name}.txt")
        assert rows[0] == ["index", "prediction"] and len(rows) == n + 1
        for _, value in rows[1:]:
            if task == "mnli":
                assert value in glue.TASKS["mnli"].labels
            else:
                assert re.fullmatch(r"-?\d+\.\d{3}", value)


def test_builtin_demo_has_a_test_file_and_predicts(tmp_path, one_thread):
    folder = Path(builtin_glue.write_builtin_sst2(str(tmp_path / "data"), n_train=20, n_dev=10, n_test=12))
    examples = glue.read_examples("sst-2", folder, "test")
    assert [glue.example_index(ex) for ex in examples] == [str(i) for i in range(12)]
    assert all(ex.label is None for ex in examples)
    # The demo's train and dev files do not depend on whether test.tsv was generated with them.
    again = Path(builtin_glue.write_builtin_sst2(str(tmp_path / "again"), n_train=20, n_dev=10, n_test=3))
    assert (again / "train.tsv").read_text() == (folder / "train.tsv").read_text()
    assert (again / "dev.tsv").read_text() == (folder / "dev.tsv").read_text()
    out = tmp_path / "demo"
    glue_script.main(["--do_predict", "--output_dir", str(out)])
    rows = read_rows(out / "predict_results_sst-2.txt")
    assert len(rows) == 801 and {r[1] for r in rows[1:]} <= {"0", "1"}


def test_glue_predict_bad_inputs_are_one_line(tiny_bert_dir, tmp_path):
    empty = tmp_path / "empty" / "SST-2"
    write_tsv(empty / "dev.tsv", ["sentence", "label"], [["good", "1"]])
    with pytest.raises(UserError, match=r"test\.tsv not found.*--do_predict") as err:
        glue_script.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(empty), "--task_name", "sst-2",
                          "--output_dir", str(tmp_path / "o1"), "--do_predict"])
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad"
    write_tsv(bad / "test.tsv", ["index", "sentence"], [["0", "good film"], ["1", "dull", "plot"], ["2", "ok"]])
    with pytest.raises(UserError, match=re.escape(f"{bad / 'test.tsv'}:3: 3 tab-separated column(s), the header "
                                                  "has 2")):
        glue.read_examples("sst-2", bad, "test")
    short = tmp_path / "short"
    write_tsv(short / "test.tsv", ["index", "sentence1", "sentence2"], [["0", "a b"]])
    with pytest.raises(UserError, match=re.escape(f"{short / 'test.tsv'}:2: 2 tab-separated column(s)")):
        glue.read_examples("rte", short, "test")
    # A labelled file where the test file belongs: its header is not GLUE's test header.
    labelled = tmp_path / "labelled"
    write_tsv(labelled / "test.tsv", ["sentence", "label"], [["good film", "1"]])
    with pytest.raises(UserError, match=re.escape(f"{labelled / 'test.tsv'}:1: not the header of a GLUE sst-2 "
                                                  "test file")) as err:
        glue_script.main(["--model_name_or_path", tiny_bert_dir, "--data_dir", str(labelled), "--task_name",
                          "sst-2", "--output_dir", str(tmp_path / "o2"), "--do_predict", "--max_seq_length", "32"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o2").exists(), "a failed prediction left its bookkeeping behind"


# ----------------------------------------------------------------------------------------------------------
# SQuAD


def strip_answers(source: Path, target: Path) -> list[str]:
    """A copy of a SQuAD file whose questions have no answers: the key removed from half, emptied in the rest."""
    raw = json.loads(source.read_text())
    ids = []
    for article in raw["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                ids.append(qa["id"])
                if len(ids) % 2:
                    del qa["answers"]
                else:
                    qa["answers"] = []
                qa.pop("is_impossible", None)
    target.write_text(json.dumps(raw))
    return ids


@pytest.fixture(scope="module")
def pruned_and_folded(squad_bert_dir, squad_v1_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A masked output folder (movement pruning to 50%, 4 steps) and its bertarized (folded) stock checkpoint."""
    masked_dir = tmp_path_factory.mktemp("squad-masked")
    squad_script.main(["--model_name_or_path", squad_bert_dir, "--data_dir", squad_v1_dir, "--train_file",
                       "train-v1.1.json", "--output_dir", str(masked_dir), *SQUAD_SHAPE, "--do_train",
                       "--max_steps", "4", "--warmup_steps", "1", "--final_threshold", "0.5", "--learning_rate",
                       "1e-3", "--per_gpu_train_batch_size", "8", "--save_steps", "0", "--overwrite_output_dir"])
    folded = tmp_path_factory.mktemp("squad-folded") / "model"
    bertarize.main(["--model_name_or_path", str(masked_dir), "--target_model_path", str(folded)])
    return masked_dir, folded


def test_squad_predict_without_answers_equals_eval_predictions(pruned_and_folded, squad_v1_dir, tmp_path,
                                                               one_thread):
    masked_dir, folded = pruned_and_folded
    data = tmp_path / "data"
    data.mkdir()
    ids = strip_answers(Path(squad_v1_dir) / "dev-v1.1.json", data / "questions.json")
    (data / "dev-v1.1.json").write_text((Path(squad_v1_dir) / "dev-v1.1.json").read_text())
    common = ["--data_dir", str(data), *SQUAD_SHAPE]
    squad_script.main(["--model_name_or_path", str(masked_dir), *common, "--predict_file", "dev-v1.1.json",
                       "--output_dir", str(tmp_path / "eval"), "--do_eval"])
    evaluated = json.loads((tmp_path / "eval" / "predictions_.json").read_text())
    for model, name in ((masked_dir, "masked"), (folded, "folded")):
        out = tmp_path / name
        results = squad_script.main(["--model_name_or_path", str(model), *common, "--predict_file",
                                     "questions.json", "--output_dir", str(out), "--do_predict"])
        predicted = json.loads((out / "predictions.json").read_text())
        assert list(predicted) == ids and all(predicted.values())
        assert predicted == evaluated, name
        nbest = json.loads((out / "nbest_predictions.json").read_text())
        assert set(nbest) == set(ids) and all(nbest[q][0]["text"] == predicted[q] for q in ids)
        assert "eval" not in results and not list(out.glob("eval_results*"))
    # Scoring needs the gold answers, and says so.
    with pytest.raises(UserError, match=r"questions\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing key "
                                        r"'answers' \(.*--do_predict"):
        squad_script.main(["--model_name_or_path", str(folded), *common, "--predict_file", "questions.json",
                           "--output_dir", str(tmp_path / "bad"), "--do_eval"])


def test_squad_v2_predict_writes_null_odds(squad_bert_dir, squad_v2_dir, tmp_path, one_thread):
    ids = strip_answers(Path(squad_v2_dir) / "dev-v2.0.json", tmp_path / "q.json")
    out = tmp_path / "out"
    squad_script.main(["--model_name_or_path", squad_bert_dir, "--data_dir", str(tmp_path), "--predict_file",
                       "q.json", "--output_dir", str(out), "--do_predict", "--version_2_with_negative",
                       *SQUAD_SHAPE])
    for name in ("predictions.json", "nbest_predictions.json", "null_odds.json"):
        assert list(json.loads((out / name).read_text())) == ids, name


def readme_snippet() -> str:
    """The Python block of the README's "Using the outputs" section that answers a question."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using the outputs", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "AutoModelForQuestionAnswering" in b]
    return block


def test_readme_snippet_answers_as_do_predict_does(pruned_and_folded, tmp_path, one_thread, capsys):
    """The README's snippet (run as written there, on the folded tiny model) gives --do_predict's answer."""
    _, folded = pruned_and_folded
    code = readme_snippet()
    assert code.count('"runs/squad-pruned"') == 2
    namespace: dict = {}
    exec(compile(code.replace('"runs/squad-pruned"', repr(str(folded))), "README.md", "exec"), namespace)
    answer, context, question = namespace["answer"], namespace["context"], namespace["question"]
    assert capsys.readouterr().out.strip() == answer
    assert answer and answer in context
    squad_file = {"version": "1.1", "data": [{"title": "readme", "paragraphs": [
        {"context": context, "qas": [{"id": "q1", "question": question}]}]}]}
    (tmp_path / "one.json").write_text(json.dumps(squad_file))
    squad_script.main(["--model_name_or_path", str(folded), "--data_dir", str(tmp_path), "--predict_file",
                       "one.json", "--output_dir", str(tmp_path / "out"), "--do_predict", *SQUAD_SHAPE,
                       "--n_best_size", "64", "--max_answer_length", "64"])
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == {"q1": answer}
