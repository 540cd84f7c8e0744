"""common/data/squad.py: the reader's checks, windows and max-context, features <-> answers round trip (BERT
and RoBERTa tokenizers), post-processing rules, and the official EM/F1 on hand-worked cases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from common import builtin
from common.builtin.squad import builtin_squad_words
from common.data import squad
from common.errors import UserError


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    return builtin.write_word_tokenizer(str(tmp_path_factory.mktemp("squad-tok")), builtin_squad_words())


def write_json(path: Path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def tiny_file(**qa_changes) -> dict:
    qa = {"id": "q1", "question": "where does bob live ?", "answers": [{"text": "new york", "answer_start": 13}]}
    qa.update(qa_changes)
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "bob lives in new york . alice owns a red car .", "qas": [qa]}]}]}


def example(qas_id: str, answers: list[str], impossible: bool = False) -> squad.SquadExample:
    return squad.SquadExample(qas_id, "q ?", "context", 0, tuple((a, 0) for a in answers), impossible, "data[0]")


# ----------------------------------------------------------------------------------------------------------
# reading


def test_reads_generated_file(squad_v1_dir):
    examples = squad.read_squad(f"{squad_v1_dir}/dev-v1.1.json", False)
    assert len(examples) == len({e.qas_id for e in examples}) > 12
    for ex in examples:
        text, start = ex.answers[0]
        assert ex.context[start:start + len(text)] == text and not ex.is_impossible


@pytest.mark.parametrize("change, pattern", [
    ({"question": None}, r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.question: expected str"),
    ({"answers": [{"text": "paris", "answer_start": 0}]}, r"qas\[0\]\.answers\[0\]\.text: answer 'paris' does not "
                                                          r"occur in the context"),
    ({"answers": [{"text": "new york"}]}, r"qas\[0\]\.answers\[0\]: missing key 'answer_start'"),
    ({"answers": [{"text": "new york", "answer_start": "13"}]}, r"answer_start: expected int"),
    ({"answers": []}, r"qas\[0\]\.answers: an answerable question needs at least one answer"),
    ({"is_impossible": True, "answers": []}, r"SQuAD v2\.0 .* --version_2_with_negative was not given"),
    ({"is_impossible": True}, r"qas\[0\]: an unanswerable question \(is_impossible: true\) with answers"),
])
def test_malformed_questions_name_file_and_json_path(change, pattern, tmp_path):
    path = write_json(tmp_path / "bad.json", tiny_file(**change))
    with pytest.raises(UserError, match=pattern) as err:
        squad.read_squad(path, False)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_structural_problems(tmp_path):
    (tmp_path / "broken.json").write_text('{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(UserError, match=r"broken\.json:2: not valid JSON"):
        squad.read_squad(str(tmp_path / "broken.json"), False)
    with pytest.raises(UserError, match="no top-level 'data' list"):
        squad.read_squad(write_json(tmp_path / "a.json", {"version": "1.1", "rows": []}), False)
    doc = tiny_file()
    del doc["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(UserError, match=r"data\[0\]\.paragraphs\[0\]: missing key 'context'"):
        squad.read_squad(write_json(tmp_path / "b.json", doc), False)
    doc = tiny_file()
    doc["data"][0]["paragraphs"].append(tiny_file()["data"][0]["paragraphs"][0])
    with pytest.raises(UserError, match=r"paragraphs\[1\]\.qas\[0\]\.id: duplicate question id 'q1'"):
        squad.read_squad(write_json(tmp_path / "c.json", doc), False)
    with pytest.raises(UserError, match="not found"):
        squad.read_squad(str(tmp_path / "missing.json"), False)


def test_version_must_match_the_flag(squad_v1_dir, squad_v2_dir):
    with pytest.raises(UserError, match=r"is SQuAD v1\.1 but --version_2_with_negative was given"):
        squad.read_squad(f"{squad_v1_dir}/dev-v1.1.json", True)
    with pytest.raises(UserError, match=r"is SQuAD v2\.0 .*add --version_2_with_negative"):
        squad.read_squad(f"{squad_v2_dir}/dev-v2.0.json", False)
    examples = squad.read_squad(f"{squad_v2_dir}/dev-v2.0.json", True)
    assert any(e.is_impossible and not e.answers for e in examples) and any(e.answers for e in examples)


def test_misplaced_answer_start_is_skipped_in_training(tmp_path, word_tokenizer, caplog):
    path = write_json(tmp_path / "f.json", tiny_file(answers=[{"text": "new york", "answer_start": 2}]))
    with caplog.at_level(logging.WARNING):
        examples = squad.read_squad(path, False)
    assert "do not sit at their answer_start" in caplog.text
    with pytest.raises(UserError, match="every answer was misplaced"):
        squad.featurize(examples, word_tokenizer, 32, 8, 8, is_training=True)
    assert len(squad.featurize(examples, word_tokenizer, 32, 8, 8, is_training=False)["input_ids"]) == 1


# ----------------------------------------------------------------------------------------------------------
# windows


def test_doc_spans_step_by_doc_stride():
    assert squad.doc_spans(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert squad.doc_spans(10, 4, 6) == [(0, 4), (4, 4), (8, 2)]  # a step never skips tokens
    assert squad.doc_spans(3, 4, 2) == [(0, 3)]
    assert squad.doc_spans(0, 4, 2) == [(0, 0)]


def test_max_context_window_is_the_most_centred():
    spans = [(0, 4), (3, 4), (6, 4)]  # tokens 3 and 6, 7 ... appear twice
    # token 3: window 0 -> min(3, 0) = 0, window 1 -> min(0, 3) = 0: tie, first wins.
    # token 5: only window 1. token 6: window 1 -> min(3, 0) = 0, window 2 -> min(0, 3) = 0 -> window 1.
    assert squad.max_context_windows(10, spans).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # token 3: window 0 -> min(3, 1) + 0.05 = 1.05 beats window 1 -> min(1, 2) + 0.04 = 1.04;
    # token 4: window 0 -> min(4, 0) + 0.05 loses to window 1 -> min(2, 1) + 0.04.
    assert squad.max_context_windows(6, [(0, 5), (2, 4)]).tolist() == [0, 0, 0, 0, 1, 1]


def test_window_layout_and_question_truncation(word_tokenizer):
    ex = squad.SquadExample("q", "where does bob live ? " * 5, "bob lives in new york . alice owns a red car .", 0,
                            (("new york", 13),), False, "data[0]")
    f = squad.featurize([ex], word_tokenizer, max_seq_length=16, doc_stride=3, max_query_length=4,
                        is_training=True, return_offsets=True)
    ids = f["input_ids"][0].tolist()
    cls, sep = word_tokenizer.cls_token_id, word_tokenizer.sep_token_id
    assert ids[0] == cls and ids[5] == sep and ids[-1] == sep  # [CLS] 4 question tokens [SEP] ... [SEP]
    assert f["token_type_ids"][0].tolist() == [0] * 6 + [1] * 10
    # 12 context tokens, 9 per window, windows start every 3 tokens: 0, 3 (which reaches the end).
    assert len(f["input_ids"]) == 2 and f["example_index"].tolist() == [0, 0]
    # "new york" are context tokens 3-4: positions 6 + 3 = 9, 10 in window 0 and 6 + 0 = 6, 7 in window 1.
    assert f["start_positions"].tolist() == [9, 6] and f["end_positions"].tolist() == [10, 7]
    assert (f["offsets"][0, :6] == -1).all() and f["offsets"][0, 6].tolist() == [0, 3]


# ----------------------------------------------------------------------------------------------------------
# round trip: features -> positions -> answers


def one_hot_logits(train: dict, n_rows: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.full((n_rows, seq), -10.0)
    end = start.copy()
    for row in range(n_rows):
        start[row, int(train["start_positions"][row])] = 10.0
        end[row, int(train["end_positions"][row])] = 10.0
    return start, end


@pytest.mark.parametrize("tokenizer_kind", ["bert", "roberta"])
def test_features_round_trip_recovers_every_gold_answer(tokenizer_kind, squad_v1_dir, word_tokenizer,
                                                        tiny_roberta_dir):
    from transformers import AutoTokenizer

    tokenizer = word_tokenizer if tokenizer_kind == "bert" else AutoTokenizer.from_pretrained(tiny_roberta_dir)
    examples = squad.read_squad(f"{squad_v1_dir}/train-v1.1.json", False)
    seq = 40 if tokenizer_kind == "bert" else 64
    train = squad.featurize(examples, tokenizer, seq, doc_stride=5, max_query_length=12, is_training=True,
                            return_offsets=True)
    evals = squad.featurize(examples, tokenizer, seq, doc_stride=5, max_query_length=12, is_training=False)
    assert (train["input_ids"] == evals["input_ids"]).all()  # same windows in both modes
    assert ("token_type_ids" in train) == (tokenizer_kind == "bert")
    assert len(train["input_ids"]) > len(examples)  # several windows per context
    found = set()
    for row in range(len(train["input_ids"])):
        ex = examples[int(train["example_index"][row])]
        s, e = int(train["start_positions"][row]), int(train["end_positions"][row])
        if s == 0:
            assert e == 0
            continue
        text = ex.context[int(train["offsets"][row, s, 0]):int(train["offsets"][row, e, 1])]
        assert text == ex.answers[0][0]
        found.add(ex.qas_id)
    assert found == {e.qas_id for e in examples}  # every answer lies wholly in some window
    start, end = one_hot_logits(train, len(train["input_ids"]), seq)
    preds = squad.postprocess(examples, {k: v.numpy() for k, v in evals.items()}, start, end)
    assert squad.evaluate_v1(examples, preds.answers) == {"exact": 100.0, "f1": 100.0, "total": len(examples)}


# ----------------------------------------------------------------------------------------------------------
# post-processing rules


@pytest.fixture()
def one_window(word_tokenizer):
    ex = squad.SquadExample("q", "where does bob live ?", "bob lives in new york . alice owns a red car .", 0,
                            (("new york", 13),), False, "data[0]")
    features = {k: v.numpy() for k, v in squad.featurize([ex], word_tokenizer, 32, 8, 8, False).items()}
    context_start = 7  # [CLS] + 5 question tokens + [SEP]
    return ex, features, context_start


def test_best_span_respects_max_answer_length(one_window):
    ex, features, c0 = one_window
    start, end = np.zeros((1, 32)), np.zeros((1, 32))
    start[0, c0 + 3], start[0, c0 + 4] = 10.0, 5.0  # "new", "york"
    end[0, c0 + 4] = 10.0
    preds = squad.postprocess([ex], features, start, end, n_best_size=5, max_answer_length=30)
    assert preds.answers == {"q": "new york"}
    nbest = preds.nbest["q"]
    assert nbest[0]["text"] == "new york" and nbest[0]["start_logit"] == 10.0
    assert sum(n["probability"] for n in nbest) == pytest.approx(1.0)
    assert len({n["text"] for n in nbest}) == len(nbest) <= 5
    short = squad.postprocess([ex], features, start, end, n_best_size=5, max_answer_length=1)
    assert short.answers == {"q": "york"}  # "new york" is two tokens long


def test_spans_outside_the_context_or_backwards_are_never_answers(one_window):
    ex, features, c0 = one_window
    start, end = np.full((1, 32), -100.0), np.full((1, 32), -100.0)
    start[0, 2], end[0, 3] = 50.0, 50.0  # inside the question
    start[0, 0], end[0, 0] = 45.0, 45.0  # [CLS]
    start[0, c0 + 10], end[0, c0 + 6] = 40.0, 40.0  # "car" ... "alice": end before start
    start[0, c0], end[0, c0] = 1.0, 1.0  # "bob"
    preds = squad.postprocess([ex], features, start, end, max_answer_length=2)
    assert preds.answers == {"q": "bob"}
    assert not any(w in n["text"] for n in preds.nbest["q"] for w in ("where", "does", "live ", "?", "CLS"))


def test_answer_comes_from_the_max_context_window(word_tokenizer):
    ex = squad.SquadExample("q", "who ?", "bob lives in new york . alice owns a red car . it was a quiet day .", 0,
                            (("alice", 24),), False, "data[0]")
    f = {k: v.numpy() for k, v in squad.featurize([ex], word_tokenizer, 14, 4, 4, False).items()}
    n = len(f["input_ids"])
    assert n >= 3
    offsets = f["offsets"]
    # "alice" (character 24) appears in several windows; only one is its max-context window.
    rows = [(r, int(np.where(offsets[r, :, 0] == 24)[0][0])) for r in range(n) if (offsets[r, :, 0] == 24).any()]
    assert len(rows) >= 2
    start, end = np.zeros((n, 14)), np.zeros((n, 14))
    for r, pos in rows:
        start[r, pos] = end[r, pos] = 20.0 if not f["max_context"][r, pos] else 1.0
    preds = squad.postprocess([ex], f, start, end)
    assert preds.answers == {"q": "alice"}
    assert sum(bool(f["max_context"][r, pos]) for r, pos in rows) == 1
    assert preds.nbest["q"][0]["start_logit"] == 1.0  # from the max-context window, not the 20.0 ones


def test_v2_null_answer_and_threshold(word_tokenizer):
    answerable = squad.SquadExample("a", "where does bob live ?", "bob lives in paris .", 0, (("paris", 13),), False,
                                    "d")
    impossible = squad.SquadExample("b", "where does zoe live ?", "bob lives in paris .", 0, (), True, "d")
    f = {k: v.numpy() for k, v in squad.featurize([answerable, impossible], word_tokenizer, 24, 8, 8,
                                                  False).items()}
    start, end = np.zeros((2, 24)), np.zeros((2, 24))
    c0 = 7
    start[:, c0 + 3] = end[:, c0 + 3] = 3.0  # "paris" in both
    start[0, 0] = end[0, 0] = 1.0  # null score 2 < 6: answer
    start[1, 0] = end[1, 0] = 4.0  # null score 8 > 6: no answer
    preds = squad.postprocess([answerable, impossible], f, start, end, version_2_with_negative=True)
    assert preds.answers == {"a": "paris", "b": ""}
    assert preds.null_odds == {"a": pytest.approx(-4.0), "b": pytest.approx(2.0)}
    assert preds.best_non_null == {"a": "paris", "b": "paris"}
    assert [n["text"] for n in preds.nbest["b"]][:2] == ["", "paris"]
    lenient = squad.postprocess([answerable, impossible], f, start, end, version_2_with_negative=True,
                                null_score_diff_threshold=2.5)
    assert lenient.answers == {"a": "paris", "b": "paris"}
    metrics = squad.squad_evaluate([answerable, impossible], preds, True)
    assert metrics["exact"] == 100.0 and metrics["HasAns_total"] == 1 and metrics["NoAns_total"] == 1
    assert metrics["best_f1"] == 100.0 and -4.0 <= metrics["best_f1_thresh"] < 2.0


def test_write_predictions(tmp_path):
    preds = squad.Predictions({"a": "x"}, {"a": [{"text": "x", "probability": 1.0, "start_logit": 1.0,
                                                  "end_logit": 1.0}]}, {"a": -1.0}, {"a": "x"})
    paths = squad.write_predictions(str(tmp_path), "", preds, version_2=True)
    assert [Path(p).name for p in paths] == ["predictions_.json", "nbest_predictions_.json", "null_odds_.json"]
    assert json.loads((tmp_path / "predictions_.json").read_text()) == {"a": "x"}
    assert not list(tmp_path.glob("*.tmp*"))


# ----------------------------------------------------------------------------------------------------------
# official metrics, hand-worked


def test_normalization():
    assert squad.normalize_answer("The  Cat's, hat!") == "cats hat"
    assert squad.normalize_answer("An apple a day") == "apple day"
    assert squad.normalize_answer("  THE  ") == ""


def test_exact_and_f1():
    assert squad.exact_match("Paris!", "paris") == 1
    assert squad.exact_match("the Paris", "paris france") == 0
    # gold [cat, sat], prediction [cat, sat, on, mat]: P = 2/4, R = 2/2, F1 = 2/3
    assert squad.f1_v1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # "a" is an article: gold [b, b], prediction [b, b, b]: overlap 2, P = 2/3, R = 1, F1 = 0.8
    assert squad.f1_v1("a b b", "b b b") == pytest.approx(0.8)
    assert squad.f1_v1("", "") == 0.0 and squad.f1_v2("", "") == 1.0  # the one place v1.1 and v2.0 differ
    assert squad.f1_v2("cat", "") == 0.0 and squad.f1_v2("", "cat") == 0.0


def test_evaluate_v1_max_over_golds_and_missing_predictions():
    examples = [example("q1", ["new york", "york"]), example("q2", ["1990"]), example("q3", ["bob"])]
    result = squad.evaluate_v1(examples, {"q1": "york city", "q2": "1990"})
    # q1: EM 0; F1 max(0.5 vs "new york", 2/3 vs "york") = 2/3. q2: 1, 1. q3: no prediction, 0 (counted).
    assert result["total"] == 3
    assert result["exact"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)


def test_evaluate_v2_breakdown_and_best_threshold():
    examples = [example("a", ["paris"]), example("b", ["red car"]), example("c", [], True), example("d", [], True)]
    predictions = {"a": "paris", "b": "", "c": "", "d": "bob"}
    result = squad.evaluate_v2(examples, predictions, na_probs={"a": -3.0, "b": 1.0, "c": 2.0, "d": -1.0},
                               best_non_null={"a": "paris", "b": "red car", "c": "oslo", "d": "bob"})
    assert result["exact"] == result["f1"] == 50.0 and result["total"] == 4
    assert result["HasAns_exact"] == 50.0 and result["HasAns_total"] == 2
    assert result["NoAns_exact"] == 50.0 and result["NoAns_total"] == 2
    # All null: 2 right. Answer in na_prob order: a (+1 -> 3), d (-1), b (+1 -> 3, not better), c (-1).
    assert result["best_exact"] == 75.0 and result["best_exact_thresh"] == -3.0
    assert result["best_f1"] == 75.0 and result["best_f1_thresh"] == -3.0
    # Questions without a prediction are left out of v2.0's totals.
    assert squad.evaluate_v2(examples, {"a": "paris"})["total"] == 1
