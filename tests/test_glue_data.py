"""Tests for common/data/glue.py: GLUE file reading, bad-input errors, metrics and featurization."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from common.data import glue
from common.errors import UserError

# --------------------------------------------------------------------------------------------- fixtures

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
                   "label5\tgold_label")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"


def write_tsv(path: Path, lines: list[str], *, bom: bool = False, newline: str = "\n") -> Path:
    """Write lines as GLUE does (UTF-8, tab-separated), optionally with a BOM or CRLF line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + newline for line in lines).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def mnli_row(idx: int, s1: str, s2: str, gold: str, dev: bool = False) -> str:
    annotator_labels = [gold] * (5 if dev else 1)
    return "\t".join([str(idx), "31193", f"{idx}n", "government", "( ( x ) )", "( ( y ) )", "(ROOT x)",
                      "(ROOT y)", s1, s2, *annotator_labels, gold])


def stsb_row(idx: int, s1: str, s2: str, score: str) -> str:
    return "\t".join([str(idx), "main-captions", "MSRvid", "2012test", f"{idx:04d}", "none", "none", s1, s2,
                      score])


def make_glue(root: Path) -> Path:
    """A tiny GLUE tree: every task folder with a train and dev file in its real layout."""
    write_tsv(root / "CoLA" / "train.tsv", [  # no header
        "gj04\t1\t\tOur friends won't buy this analysis.",
        'gj04\t0\t*\tHe said "what.',
    ])
    write_tsv(root / "CoLA" / "dev.tsv", ["gj04\t1\t\tThe sailors rode the breeze."])
    write_tsv(root / "SST-2" / "train.tsv", [
        "sentence\tlabel",
        '"quoted start without end \t1',  # csv quoting would swallow the next row into this field
        "hide new secretions \t0",
    ])
    write_tsv(root / "SST-2" / "dev.tsv", ["sentence\tlabel", "it 's a charming journey . \t1"])
    write_tsv(root / "MRPC" / "train.tsv", [
        MRPC_HEADER,
        '1\t702876\t702977\tAmrozi called him the "witness" .\tReferring to him as "the witness" .',
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .",
    ], bom=True)
    write_tsv(root / "MRPC" / "dev.tsv", [MRPC_HEADER, "1\t1\t2\tHe left .\tHe went away ."], bom=True)
    write_tsv(root / "STS-B" / "train.tsv", [
        STSB_HEADER,
        stsb_row(0, "A plane is taking off.", "An air plane is taking off.", "5.000"),
        stsb_row(1, "A man plays a flute.", "A man plays a bamboo flute.", "3.800"),
    ])
    write_tsv(root / "STS-B" / "dev.tsv", [STSB_HEADER, stsb_row(7, "A man.", "A woman.", "0.500")])
    write_tsv(root / "QQP" / "train.tsv", [
        QQP_HEADER,
        "133273\t213221\t213222\tHow is life?\tWhat is life?\t0",
        "402555\t536040\t536041\tHow do I learn?\tHow can I learn?\t1",
    ])
    write_tsv(root / "QQP" / "dev.tsv", [QQP_HEADER, "9\t1\t2\tWhy?\tWhy not?\t0"])
    write_tsv(root / "MNLI" / "train.tsv", [
        MNLI_TRAIN_HEADER,
        mnli_row(0, "Conceptually cream skimming works.", "Product and geography work.", "neutral"),
        mnli_row(1, "You know during the season.", "You lose the things.", "entailment"),
    ])
    write_tsv(root / "MNLI" / "dev_matched.tsv", [
        MNLI_DEV_HEADER, mnli_row(5, "The new rights are nice.", "Everyone hates them.", "contradiction", True),
    ])
    write_tsv(root / "MNLI" / "dev_mismatched.tsv", [
        MNLI_DEV_HEADER, mnli_row(8, "Your gift is appreciated.", "Hundreds of students.", "neutral", True),
    ])
    write_tsv(root / "QNLI" / "train.tsv", [
        "index\tquestion\tsentence\tlabel",
        "0\tWhat came into force?\tThe law came into force.\tentailment",
        "1\tWho?\tNobody knows.\tnot_entailment",
    ])
    write_tsv(root / "QNLI" / "dev.tsv", ["index\tquestion\tsentence\tlabel", "3\tWhen?\tToday.\tentailment"])
    write_tsv(root / "RTE" / "train.tsv", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tNo weapons were found.\tWeapons were found.\tnot_entailment",
        "1\tA cat sat.\tAn animal sat.\tentailment",
    ], newline="\r\n")  # CRLF must work
    write_tsv(root / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "2\tA.\tB.\tentailment"])
    write_tsv(root / "WNLI" / "train.tsv", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tI stuck a pin.\tI stuck the pin.\t1",
        "1\tJohn could not see.\tJohn could see.\t0",
    ])
    write_tsv(root / "WNLI" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "4\tX.\tY.\t0"])
    return root


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    return make_glue(tmp_path / "glue_data")


# --------------------------------------------------------------------------------------------- task table


def test_task_table_and_aliases() -> None:
    assert set(glue.TASKS) == {"cola", "mnli", "mnli-mm", "mrpc", "sst-2", "sts-b", "qqp", "qnli", "rte", "wnli"}
    assert glue.canonical_task_name("sst2") == "sst-2"
    assert glue.canonical_task_name("STSB") == "sts-b"
    assert glue.canonical_task_name("mnli_mm") == "mnli-mm"
    assert glue.canonical_task_name("CoLA") == "cola"
    assert glue.get_task("mnli").labels == ("contradiction", "entailment", "neutral")
    assert glue.get_task("mnli").dev_file == "dev_matched.tsv"
    assert glue.get_task("mnli-mm").dev_file == "dev_mismatched.tsv"
    assert glue.get_task("sts-b").output_mode == "regression"
    assert glue.get_task("sts-b").labels == ()
    assert glue.get_task("sst2").data_subdir == "SST-2"
    assert [glue.num_labels(t) for t in ("cola", "mnli", "sts-b", "qnli")] == [2, 3, 1, 2]
    assert glue.num_labels(glue.get_task("rte")) == 2
    primaries = {name: glue.primary_metric(name) for name in glue.TASKS}
    assert primaries == {"cola": "mcc", "mnli": "acc", "mnli-mm": "acc", "mrpc": "f1", "sst-2": "acc",
                         "sts-b": "spearmanr", "qqp": "f1", "qnli": "acc", "rte": "acc", "wnli": "acc"}


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(UserError) as err:
        glue.get_task("glue-xyz")
    message = str(err.value)
    assert "glue-xyz" in message
    for name in ("cola", "mnli-mm", "sst-2", "sts-b", "wnli"):
        assert name in message


# --------------------------------------------------------------------------------------------- reading

EXPECTED_FIRST = {
    # task: (number of train examples, first train example)
    "cola": (2, glue.InputExample("train-0", "Our friends won't buy this analysis.", None, "1")),
    "sst-2": (2, glue.InputExample("train-1", '"quoted start without end ', None, "1")),
    "mrpc": (2, glue.InputExample("train-1", 'Amrozi called him the "witness" .',
                                  'Referring to him as "the witness" .', "1")),
    "sts-b": (2, glue.InputExample("train-0", "A plane is taking off.", "An air plane is taking off.", 5.0)),
    "qqp": (2, glue.InputExample("train-133273", "How is life?", "What is life?", "0")),
    "mnli": (2, glue.InputExample("train-0", "Conceptually cream skimming works.",
                                  "Product and geography work.", "neutral")),
    "mnli-mm": (2, glue.InputExample("train-0", "Conceptually cream skimming works.",
                                     "Product and geography work.", "neutral")),
    "qnli": (2, glue.InputExample("train-0", "What came into force?", "The law came into force.", "entailment")),
    "rte": (2, glue.InputExample("train-0", "No weapons were found.", "Weapons were found.", "not_entailment")),
    "wnli": (2, glue.InputExample("train-0", "I stuck a pin.", "I stuck the pin.", "1")),
}

EXPECTED_DEV_GUID = {"cola": "dev-0", "sst-2": "dev-1", "mrpc": "dev-1", "sts-b": "dev-7", "qqp": "dev-9",
                     "mnli": "dev_matched-5", "mnli-mm": "dev_mismatched-8", "qnli": "dev-3", "rte": "dev-2",
                     "wnli": "dev-4"}


@pytest.mark.parametrize("task_name", sorted(EXPECTED_FIRST))
def test_read_every_task(glue_root: Path, task_name: str) -> None:
    count, first = EXPECTED_FIRST[task_name]
    task = glue.get_task(task_name)
    train = glue.read_examples(task_name, glue_root / task.data_subdir, "train")
    assert len(train) == count
    assert train[0] == first
    dev = glue.read_examples(task_name, glue_root / task.data_subdir, "dev")
    assert len(dev) == 1
    assert dev[0].guid == EXPECTED_DEV_GUID[task_name]
    for ex in train + dev:
        if task.is_regression:
            assert isinstance(ex.label, float)
        else:
            assert ex.label in task.labels
        assert (ex.text_b is not None) == task.is_pair


def test_read_second_rows_and_quotes(glue_root: Path) -> None:
    cola = glue.read_examples("cola", glue_root / "CoLA", "train")
    assert cola[1] == glue.InputExample("train-1", 'He said "what.', None, "0")  # no header: 2 rows, 0 and 1
    sst = glue.read_examples("sst2", glue_root / "SST-2", "train")
    assert [ex.text_a for ex in sst] == ['"quoted start without end ', "hide new secretions "]
    assert [ex.guid for ex in sst] == ["train-1", "train-2"]
    stsb = glue.read_examples("stsb", glue_root / "STS-B", "train")
    assert stsb[1].label == pytest.approx(3.8)
    mnli_mm = glue.read_examples("mnli_mm", glue_root / "MNLI", "dev")
    assert mnli_mm[0].text_a == "Your gift is appreciated." and mnli_mm[0].label == "neutral"


def test_read_accepts_glue_root_and_crlf(glue_root: Path) -> None:
    # The GLUE root works too: the task's subdirectory is looked up inside it.
    rte = glue.read_examples("rte", glue_root, "train")  # RTE/train.tsv is CRLF
    assert rte[1] == glue.InputExample("train-1", "A cat sat.", "An animal sat.", "entailment")
    assert not any("\r" in (ex.text_a + (ex.text_b or "") + str(ex.label)) for ex in rte)


def test_bom_does_not_hide_header(tmp_path: Path) -> None:
    # With a BOM the header must still be recognised as line 1 and skipped, and line numbers stay right.
    path = write_tsv(tmp_path / "MRPC" / "train.tsv", [MRPC_HEADER, "1\t1\t2\ta\tb", "1\t1\t2\ta"], bom=True)
    with pytest.raises(UserError, match=r"train\.tsv:3: 4 tab-separated column"):
        glue.read_examples("mrpc", path.parent, "train")


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    write_tsv(tmp_path / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1", "", "1\tc\td\t0", ""])
    examples = glue.read_examples("wnli", tmp_path, "train")
    assert [ex.guid for ex in examples] == ["train-0", "train-1"]


def test_qqp_short_rows_are_skipped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_tsv(tmp_path / "train.tsv", [
        QQP_HEADER,
        "1\t2\t3\tq one\tq two\t1",
        "2\t4\t5\tbroken question",  # 4 columns: the original processor skipped such rows
        "3\t6\t7\tq three\tq four\t0",
    ])
    with caplog.at_level(logging.WARNING, logger="common.data.glue"):
        examples = glue.read_examples("qqp", tmp_path, "train")
    assert [ex.guid for ex in examples] == ["train-1", "train-3"]
    assert "skipped 1 row" in caplog.text and "lines 3" in caplog.text


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("task_name", "lines", "line_no", "reason"), [
    ("mrpc", [MRPC_HEADER, "1\t1\t2\ta\tb", "0\t1\t2\tonly a"], 3, "tab-separated column"),
    ("cola", ["src\t1\t\tok", "src\t1\tshort"], 2, "tab-separated column"),
    ("sst-2", ["sentence\tlabel", "fine\t1", "bad\t2"], 3, "unknown label '2'"),
    ("sst-2", ["sentence\tlabel", "no label\t"], 2, "empty label"),
    ("rte", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentails"], 2, "unknown label 'entails'"),
    ("mnli", [MNLI_TRAIN_HEADER, mnli_row(0, "a", "b", "neutral"), mnli_row(1, "a", "b", "maybe")], 3,
     "unknown label 'maybe'"),
    ("sts-b", [STSB_HEADER, stsb_row(0, "a", "b", "abc")], 2, "not a number"),
    ("sts-b", [STSB_HEADER, stsb_row(0, "a", "b", "4.0"), stsb_row(1, "a", "b", "5.5")], 3, "outside [0, 5]"),
    ("sts-b", [STSB_HEADER, stsb_row(0, "a", "b", "nan")], 2, "outside [0, 5]"),
    ("sts-b", [STSB_HEADER, "0\tx\tx\tx\tx\tx\tx\ta\t4.0"], 2, "tab-separated column"),  # score overlaps text
    ("qqp", [QQP_HEADER, "1\t2\t3\ta\tb\t"], 2, "empty label"),
])
def test_malformed_rows_name_file_and_line(tmp_path: Path, task_name: str, lines: list[str], line_no: int,
                                           reason: str) -> None:
    write_tsv(tmp_path / "train.tsv", lines, newline="\r\n")
    with pytest.raises(UserError) as err:
        glue.read_examples(task_name, tmp_path, "train")
    message = str(err.value)
    assert f"train.tsv:{line_no}:" in message
    assert reason in message
    assert str(tmp_path) in message


def test_unknown_label_message_lists_expected(tmp_path: Path) -> None:
    write_tsv(tmp_path / "train.tsv", ["index\tquestion\tsentence\tlabel", "0\tq\ts\tyes"])
    with pytest.raises(UserError, match="expected one of entailment, not_entailment"):
        glue.read_examples("qnli", tmp_path, "train")


def test_not_utf8_names_line(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n")
    with pytest.raises(UserError, match=r"train\.tsv:3: not valid UTF-8"):
        glue.read_examples("sst-2", tmp_path, "train")


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        glue.read_examples("rte", tmp_path / "nowhere", "train")
    assert "nowhere" in str(err.value) and "train.tsv" in str(err.value)
    with pytest.raises(UserError) as err:
        glue.read_examples("mnli", tmp_path, "dev")
    assert "dev_matched.tsv" in str(err.value) and str(tmp_path) in str(err.value)


def test_empty_files_and_bad_split(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_bytes(b"")
    with pytest.raises(UserError, match="no examples"):
        glue.read_examples("cola", tmp_path, "train")
    write_tsv(tmp_path / "dev.tsv", ["sentence\tlabel"])  # header only
    with pytest.raises(UserError, match="no examples"):
        glue.read_examples("sst-2", tmp_path, "dev")
    with pytest.raises(UserError, match="choose one of train, dev, test"):
        glue.read_examples("sst-2", tmp_path, "validation")


# --------------------------------------------------------------------------------------------- metrics


def test_accuracy_tasks() -> None:
    result = glue.compute_metrics("sst-2", [1, 0, 1, 1], [1, 0, 0, 1])
    assert result == {"acc": 0.75}
    assert type(result["acc"]) is float
    assert glue.compute_metrics("mnli-mm", [0, 2, 1], [0, 2, 2]) == {"acc": pytest.approx(2 / 3)}


def test_mcc_cola() -> None:
    # labels 1 1 0 0, preds 1 0 0 0: TP=1 FN=1 TN=2 FP=0.
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(1*2*2*3) = 2/sqrt(12) = 0.5773503
    result = glue.compute_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0])
    assert list(result) == ["mcc"]
    assert result["mcc"] == pytest.approx(0.5773503, abs=1e-6)
    assert type(result["mcc"]) is float


def test_f1_mrpc_and_qqp() -> None:
    # labels 1 1 0 0 1, preds 1 0 1 0 1: TP=2 FP=1 FN=1, precision = recall = 2/3, F1 = 2/3;
    # accuracy 3/5 = 0.6; acc_and_f1 = (0.6 + 0.6667) / 2 = 0.6333.
    for task in ("mrpc", "qqp"):
        result = glue.compute_metrics(task, [1, 0, 1, 0, 1], [1, 1, 0, 0, 1])
        assert result == pytest.approx({"acc": 0.6, "f1": 2 / 3, "acc_and_f1": (0.6 + 2 / 3) / 2})
        assert all(type(v) is float for v in result.values())


def test_pearson_spearman_stsb() -> None:
    # preds 1 2 3 4 (mean 2.5, deviations -1.5 -.5 .5 1.5, sum of squares 5);
    # labels 1 3 2 5 (mean 2.75, deviations -1.75 .25 -.75 2.25, sum of squares 8.75).
    # Cross sum = 2.625 - .125 - .375 + 3.375 = 5.5; Pearson = 5.5 / sqrt(5 * 8.75) = 0.8315218.
    # Label ranks 1 3 2 4: d = 0 -1 1 0, sum d^2 = 2; Spearman = 1 - 6*2 / (4*(16-1)) = 0.8.
    result = glue.compute_metrics("sts-b", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0])
    assert result["pearson"] == pytest.approx(0.8315218, abs=1e-6)
    assert result["spearmanr"] == pytest.approx(0.8)
    assert result["corr"] == pytest.approx((0.8315218 + 0.8) / 2, abs=1e-6)
    assert all(type(v) is float for v in result.values())
    # Regression logits of shape (n, 1) are accepted as well.
    column = glue.compute_metrics("stsb", torch.tensor([[1.0], [2.0], [3.0], [4.0]]), [1.0, 3.0, 2.0, 5.0])
    assert column["spearmanr"] == pytest.approx(0.8)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        glue.compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="argmax"):
        glue.compute_metrics("rte", [[0.1, 0.9], [0.8, 0.2]], [1, 0])


def test_summary_score_matches_deebert_order() -> None:
    assert glue.summary_score({"pearson": 0.1, "spearmanr": 0.2, "corr": 0.15}) == 0.2
    assert glue.summary_score({"acc": 0.5, "f1": 0.7, "acc_and_f1": 0.6}) == 0.7
    assert glue.summary_score({"mcc": 0.3}) == 0.3
    for name in glue.TASKS:
        keys = glue.get_task(name).metrics
        assert glue.summary_score(dict.fromkeys(keys, 0.0) | {glue.primary_metric(name): 1.0}) == 1.0


# --------------------------------------------------------------------------------------------- featurize

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "sat", "on", "the", "mat", "dog", "ran", "."]


@pytest.fixture
def tokenizer(tmp_path: Path):
    from transformers import BertTokenizerFast

    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # transformers 5.x: the vocabulary path goes in `vocab=`; `vocab_file=` is silently ignored there.
    tok = BertTokenizerFast(vocab=str(vocab_file))
    assert tok.is_fast and len(tok.get_vocab()) == len(VOCAB)
    return tok


def ids(*words: str) -> list[int]:
    return [VOCAB.index(w) for w in words]


def test_featurize_pairs(tokenizer) -> None:
    examples = [
        glue.InputExample("train-0", "the cat sat", "a dog", "entailment"),
        glue.InputExample("train-1", "a dog ran", "the cat sat on the mat .", "not_entailment"),
        glue.InputExample("train-2", "cat", "dog", "entailment"),
    ]
    feats = glue.featurize(examples, tokenizer, "rte", max_seq_length=12, batch_size=2)
    assert set(feats) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert feats[key].shape == (3, 12) and feats[key].dtype == torch.int64
    assert feats["labels"].dtype == torch.int64
    assert feats["labels"].tolist() == [0, 1, 0]  # label-list order: entailment, not_entailment
    # [CLS] the cat sat [SEP] a dog [SEP] then padding.
    assert feats["input_ids"][0].tolist() == ids("[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "[SEP]") + [0] * 4
    assert feats["token_type_ids"][0].tolist() == [0] * 5 + [1] * 3 + [0] * 4
    assert feats["attention_mask"][0].tolist() == [1] * 8 + [0] * 4
    # The long pair is truncated to exactly max_seq_length, ending in [SEP].
    assert feats["attention_mask"][1].sum().item() == 12
    assert feats["input_ids"][1, -1].item() == VOCAB.index("[SEP]")
    # Same tensors as the tokenizer's own padding="max_length" on the whole set.
    ref = tokenizer([ex.text_a for ex in examples], [ex.text_b for ex in examples], truncation=True,
                    max_length=12, padding="max_length", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(feats[key], ref[key])


def test_featurize_pad_to_longest_and_regression(tokenizer) -> None:
    examples = [
        glue.InputExample("train-0", "the cat", "a cat", 4.5),
        glue.InputExample("train-1", "the cat sat on the mat", "a dog", 0.25),
    ]
    feats = glue.featurize(examples, tokenizer, "sts-b", max_seq_length=64, pad_to_max_length=False,
                           batch_size=1)
    # Longest: [CLS] + 6 + [SEP] + 2 + [SEP] = 11 tokens; the shorter row is padded to it.
    assert feats["input_ids"].shape == (2, 11)
    assert feats["attention_mask"].tolist() == [[1] * 7 + [0] * 4, [1] * 11]
    assert feats["token_type_ids"][0].tolist() == [0] * 4 + [1] * 3 + [0] * 4
    assert feats["input_ids"][0, 7:].tolist() == [0] * 4
    assert feats["labels"].dtype == torch.float32
    assert feats["labels"].tolist() == [4.5, 0.25]
    padded = glue.featurize(examples, tokenizer, "sts-b", max_seq_length=64)
    assert padded["input_ids"].shape == (2, 64)
    assert torch.equal(padded["input_ids"][:, :11], feats["input_ids"])


def test_featurize_single_sentence_and_unlabelled(tokenizer) -> None:
    examples = [glue.InputExample("dev-0", "the cat", None, "1"), glue.InputExample("dev-1", "a dog", None, "0")]
    feats = glue.featurize(examples, tokenizer, "sst2", max_seq_length=6)
    assert feats["input_ids"][0].tolist() == ids("[CLS]", "the", "cat", "[SEP]") + [0, 0]
    assert feats["token_type_ids"].sum().item() == 0
    assert feats["labels"].tolist() == [1, 0]
    unlabelled = [glue.InputExample("test-0", "the cat")]
    assert "labels" not in glue.featurize(unlabelled, tokenizer, "sst-2", max_seq_length=6)


def test_featurize_rejects_slow_tokenizer_and_bad_labels(tokenizer) -> None:
    class SlowTokenizer:
        is_fast = False

    examples = [glue.InputExample("train-0", "the cat", None, "1")]
    with pytest.raises(UserError, match="not a fast tokenizer"):
        glue.featurize(examples, SlowTokenizer(), "sst-2", max_seq_length=8)
    with pytest.raises(ValueError, match="not a mnli label"):
        glue.featurize(examples, tokenizer, "mnli", max_seq_length=8)
    with pytest.raises(ValueError, match="no examples"):
        glue.featurize([], tokenizer, "sst-2", max_seq_length=8)


def test_read_then_featurize_end_to_end(glue_root: Path, tokenizer) -> None:
    examples = glue.read_examples("mnli", glue_root, "train")
    feats = glue.featurize(examples, tokenizer, "mnli", max_seq_length=16)
    assert feats["labels"].tolist() == [2, 1]  # neutral, entailment
    assert feats["input_ids"].shape == (2, 16)
    assert feats["token_type_ids"][0].max().item() == 1  # a premise/hypothesis pair
