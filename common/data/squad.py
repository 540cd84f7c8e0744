"""SQuAD v1.1 / v2.0: reader with validation, windowed features from a fast tokenizer's offsets, answer
post-processing, and the official exact-match / F1 scores.

* Reading checks the structure and names the JSON path of every problem (``data[3].paragraphs[0].qas[2]``).
  An answer whose text is nowhere in its context is an error; one whose text is in the context but not at
  its ``answer_start`` is skipped in training with a warning, as the original processor skipped answers it
  "could not find".
* Features are windows over the context: ``[CLS] question [SEP] context-window [SEP]`` (or whatever the
  tokenizer's pair template is), the question truncated to ``max_query_length`` tokens, windows of the
  longest length that fits ``max_seq_length``, starting every ``doc_stride`` context tokens (the original's
  meaning of the flag: the step between windows). In training, a window that does not hold the whole answer,
  and every window of an unanswerable (v2.0) question, points start and end at the first token ([CLS]), as
  the original did. Evaluation features keep each token's character span in the context and whether the
  window is the token's "max context" window (the one where it has most context on both sides).
* Post-processing follows the original ``compute_predictions_logits``: the ``n_best_size`` best start and
  end logits of every window, spans inside the context, starting in their max-context window, at most
  ``max_answer_length`` tokens long; for v2.0 the null answer competes through the score difference and
  ``null_score_diff_threshold``. The answer text is the exact context slice under the tokens' offsets (the
  original projected whitespace tokens back with a heuristic instead).
* Scores are the official evaluation scripts': answers normalised (lower case, no punctuation, no articles,
  single spaces), the maximum over the gold answers; v1.1 counts a question without prediction as 0 and
  gives F1 0 when nothing overlaps; v2.0 scores unanswerable questions against the empty answer and reports
  HasAns/NoAns breakdowns and the best null thresholds.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from common.errors import UserError, file_error
from common.io import write_json_atomic
from common.progress import progress_bar

logger = logging.getLogger(__name__)

FEATURIZER_VERSION = 1
SQUAD_FIX = "give a SQuAD-format JSON file (data -> paragraphs -> context, qas -> id, question, answers)"


# ----------------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class SquadExample:
    """One question. `answers` are (text, answer_start) pairs; `context_id` numbers distinct paragraphs."""

    qas_id: str
    question: str
    context: str
    context_id: int
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool
    json_path: str

    @property
    def answer_texts(self) -> list[str]:
        return [text for text, _ in self.answers]


def _is_v2(version: Any) -> bool | None:
    """True for a v2.x version string, False for v1.x, None when absent or unknown."""
    if not isinstance(version, str):
        return None
    digits = version.lower().lstrip("v").strip()
    if digits.startswith("2"):
        return True
    if digits.startswith("1"):
        return False
    return None


NEED_ANSWERS = "training and --do_eval need the gold answers; --do_predict alone accepts questions without them"


def read_squad(path: str, version_2_with_negative: bool, need_answers: bool = True) -> list[SquadExample]:
    """Every question of a SQuAD file, checked; raises a UserError naming the file and JSON path.

    With `need_answers` False (prediction), a question may have no `answers` key or an empty list: its example
    has no answers; answers that are there are still checked."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; give an existing SQuAD .json file (--data_dir with "
                        "--train_file/--predict_file)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise file_error(path, err.lineno, f"not valid JSON ({err.msg}, column {err.colno})", SQUAD_FIX) from None
    except UnicodeDecodeError as err:
        raise file_error(path, None, f"not UTF-8 text ({err.reason})", SQUAD_FIX) from None

    def fail(where: str, reason: str) -> UserError:
        return file_error(path, None, f"{where}: {reason}" if where else reason, SQUAD_FIX)

    def need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict):
            raise fail(where, f"expected a JSON object, found {type(obj).__name__}")
        if key not in obj:
            raise fail(where, f"missing key '{key}'")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise fail(f"{where}.{key}", f"expected {names}, found {type(value).__name__}")
        return value

    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise fail("", "not a SQuAD file: no top-level 'data' list")
    file_v2 = _is_v2(raw.get("version"))
    examples: list[SquadExample] = []
    seen_ids: dict[str, str] = {}
    misplaced = 0
    any_impossible = False
    context_id = 0
    for a, article in enumerate(raw["data"]):
        where_a = f"data[{a}]"
        for p, paragraph in enumerate(need(article, "paragraphs", list, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = need(paragraph, "context", str, where_p)
            for q, qa in enumerate(need(paragraph, "qas", list, where_p)):
                where = f"{where_p}.qas[{q}]"
                qas_id = str(need(qa, "id", (str, int), where))
                question = need(qa, "question", str, where)
                if not question.strip():
                    raise fail(f"{where}.question", "empty question")
                if qa.get("answers") is None and not need_answers:
                    answers_raw = []  # prediction: a question without gold answers
                elif "answers" not in qa:
                    raise fail(where, f"missing key 'answers' ({NEED_ANSWERS})")
                else:
                    answers_raw = need(qa, "answers", list, where)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise fail(f"{where}.is_impossible", f"expected true/false, found {impossible!r}")
                any_impossible |= impossible
                if qas_id in seen_ids:
                    raise fail(f"{where}.id", f"duplicate question id {qas_id!r} (also at {seen_ids[qas_id]})")
                seen_ids[qas_id] = where
                answers = []
                for i, answer in enumerate(answers_raw):
                    where_ans = f"{where}.answers[{i}]"
                    text = need(answer, "text", str, where_ans)
                    start = need(answer, "answer_start", int, where_ans)
                    if not text.strip():
                        raise fail(f"{where_ans}.text", "empty answer text")
                    if text not in context:
                        raise fail(f"{where_ans}.text", f"answer {text[:60]!r} does not occur in the context")
                    if start < 0 or context[start:start + len(text)] != text:
                        misplaced += 1
                    answers.append((text, start))
                if impossible and answers:
                    raise fail(where, "an unanswerable question (is_impossible: true) with answers")
                if not impossible and not answers and need_answers:
                    raise fail(f"{where}.answers", "an answerable question needs at least one answer"
                               + ("" if version_2_with_negative else " (unanswerable questions are SQuAD v2.0)")
                               + f"; {NEED_ANSWERS}")
                examples.append(SquadExample(qas_id, question, context, context_id, tuple(answers), impossible, where))
            context_id += 1
    if not examples:
        raise fail("", "no questions in the file")
    if version_2_with_negative and file_v2 is False:
        raise file_error(path, None, f"is SQuAD v{raw.get('version')} but --version_2_with_negative was given",
                         "drop --version_2_with_negative, or give a SQuAD v2.0 file")
    if not version_2_with_negative and (file_v2 or any_impossible):
        raise file_error(path, None, "is SQuAD v2.0 (it has unanswerable questions) but --version_2_with_negative "
                         "was not given", "add --version_2_with_negative, or give a SQuAD v1.1 file")
    if misplaced:
        logger.warning("%s: %d answer(s) do not sit at their answer_start (the text is elsewhere in the "
                       "context); training skips those questions", path, misplaced)
    return examples


# ----------------------------------------------------------------------------------------------------------
# features


@dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a (question, context) pair, and their token types."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    # token type of each part: prefix, question, middle, context, suffix
    types: tuple[int, int, int, int, int] | None

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def pair_template(tokenizer: Any) -> PairTemplate:
    """Read the tokenizer's pair template off one encoded pair (works for BERT, RoBERTa, ... alike)."""
    enc = tokenizer("who", "it", add_special_tokens=True, return_token_type_ids=True)
    seq = enc.sequence_ids(0)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    q = [i for i, s in enumerate(seq) if s == 0]
    c = [i for i, s in enumerate(seq) if s == 1]
    if not q or not c:
        raise UserError(f"tokenizer {type(tokenizer).__name__} does not encode question/context pairs")
    part_types = None
    if types is not None and "token_type_ids" in tokenizer.model_input_names:
        pick = lambda rng, default: types[rng[0]] if rng else default  # noqa: E731
        part_types = (pick(range(0, q[0]), types[q[0]]), types[q[0]], pick(range(q[-1] + 1, c[0]), types[q[0]]),
                      types[c[0]], pick(range(c[-1] + 1, len(ids)), types[c[0]]))
    return PairTemplate(tuple(ids[: q[0]]), tuple(ids[q[-1] + 1 : c[0]]), tuple(ids[c[-1] + 1 :]), part_types)


def doc_spans(num_tokens: int, capacity: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of each window over `num_tokens` context tokens: the original's sliding windows, each
    `capacity` tokens at most, starting `doc_stride` tokens apart, until the end is covered (one window, maybe
    empty, for an empty context)."""
    spans = []
    start = 0
    while True:
        length = min(num_tokens - start, capacity)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, doc_stride)


def max_context_windows(num_tokens: int, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """For each context token, the window in which it has the most context: score min(left, right) +
    0.01 * window length, the first window winning ties (as the original's _new_check_is_max_context)."""
    best = np.zeros(num_tokens, dtype=np.int64)
    if num_tokens == 0:
        return best
    positions = np.arange(num_tokens)
    best_score = np.full(num_tokens, -np.inf)
    for w, (start, length) in enumerate(spans):
        inside = (positions >= start) & (positions < start + length)
        score = np.minimum(positions - start, start + length - 1 - positions) + 0.01 * length
        better = inside & (score > best_score)
        best[better] = w
        best_score[better] = score[better]
    return best


def answer_token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int] | None:
    """First and last context token covering the characters [char_start, char_end), or None."""
    first = next((i for i, (s, e) in enumerate(offsets) if e > char_start and e > s), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < char_end
                 and offsets[i][1] > offsets[i][0]), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def featurize(
    examples: Sequence[SquadExample],
    tokenizer: Any,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    is_training: bool,
    return_offsets: bool | None = None,
    verbose: bool = False,
) -> dict[str, torch.Tensor]:
    """Windowed features of `examples` as tensors (one row per window).

    Always: input_ids, attention_mask, token_type_ids (if the tokenizer uses them), example_index. Training
    adds start_positions/end_positions (0, the first token, when the answer is not wholly in the window or
    there is none). With `return_offsets` (the default outside training): offsets [N, S, 2], the character
    span of each context token in the context (-1 elsewhere), and max_context [N, S]. Training skips
    questions whose answer is not at its answer_start (or covers no token), as the original did.
    """
    return_offsets = (not is_training) if return_offsets is None else return_offsets
    template = pair_template(tokenizer)
    if max_seq_length - max_query_length - template.num_special < 1:
        raise UserError(f"--max_seq_length {max_seq_length} leaves no room for the context after a question of "
                        f"--max_query_length {max_query_length} tokens and {template.num_special} special tokens; "
                        "raise --max_seq_length or lower --max_query_length")

    # Each distinct context is tokenized once (SQuAD has several questions per paragraph), all in one batch.
    contexts: dict[int, str] = {}
    for ex in examples:
        contexts.setdefault(ex.context_id, ex.context)
    context_keys = list(contexts)
    # Whole contexts are tokenized (verbose=False: their length above the model maximum is expected; the
    # windows below cut them).
    context_enc = tokenizer([contexts[k] for k in context_keys], add_special_tokens=False, verbose=False,
                            return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False)
    context_tokens = {k: (context_enc["input_ids"][i], context_enc["offset_mapping"][i])
                      for i, k in enumerate(context_keys)}
    question_ids = tokenizer([ex.question for ex in examples], add_special_tokens=False, truncation=True,
                             max_length=max_query_length, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: dict[str, list] = collections.defaultdict(list)
    skipped = 0
    questions = progress_bar(examples, desc="featurize squad", unit="question", leave=False)
    for index, ex in enumerate(questions):
        doc_ids, doc_offsets = context_tokens[ex.context_id]
        q_ids = question_ids[index]
        doc_capacity = max_seq_length - len(q_ids) - template.num_special
        spans = doc_spans(len(doc_ids), doc_capacity, doc_stride)
        answer = None
        if is_training and not ex.is_impossible:
            text, start = ex.answers[0]
            if ex.context[start:start + len(text)] == text:
                answer = answer_token_span(doc_offsets, start, start + len(text))
            if answer is None:
                skipped += 1
                if verbose:
                    logger.warning("%s: could not find answer %r at character %d; skipped", ex.json_path, text, start)
                continue
        best_window = max_context_windows(len(doc_ids), spans) if return_offsets else None
        doc_offset = len(template.prefix) + len(q_ids) + len(template.middle)
        for w, (start, length) in enumerate(spans):
            ids = [*template.prefix, *q_ids, *template.middle, *doc_ids[start:start + length], *template.suffix]
            pad = max_seq_length - len(ids)
            rows["input_ids"].append(ids + [pad_id] * pad)
            rows["attention_mask"].append([1] * len(ids) + [0] * pad)
            if template.types is not None:
                t_pre, t_q, t_mid, t_doc, t_suf = template.types
                rows["token_type_ids"].append([t_pre] * len(template.prefix) + [t_q] * len(q_ids)
                                              + [t_mid] * len(template.middle) + [t_doc] * length
                                              + [t_suf] * len(template.suffix) + [0] * pad)
            rows["example_index"].append(index)
            if is_training:
                s_pos = e_pos = 0
                if answer is not None and answer[0] >= start and answer[1] < start + length:
                    s_pos, e_pos = doc_offset + answer[0] - start, doc_offset + answer[1] - start
                rows["start_positions"].append(s_pos)
                rows["end_positions"].append(e_pos)
            if return_offsets:
                offsets = np.full((max_seq_length, 2), -1, dtype=np.int32)
                offsets[doc_offset:doc_offset + length] = np.asarray(doc_offsets[start:start + length],
                                                                     dtype=np.int32).reshape(-1, 2)
                is_max = np.zeros(max_seq_length, dtype=bool)
                is_max[doc_offset:doc_offset + length] = best_window[start:start + length] == w
                rows["offsets"].append(offsets)
                rows["max_context"].append(is_max)
    if skipped:
        logger.warning("Skipped %d of %d training question(s) whose answer is not at its answer_start%s", skipped,
                       len(examples), "" if verbose else " (--verbose_logging names them)")
    if not rows["input_ids"]:
        raise UserError("no usable question: every answer was misplaced (answer_start does not match its text)")
    out = {}
    for key, values in rows.items():
        if key in ("offsets", "max_context"):
            out[key] = torch.from_numpy(np.stack(values))
        else:
            out[key] = torch.tensor(values, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------------------
# post-processing


@dataclass
class Predictions:
    """The answer of every question, its n-best list, and (v2.0) the null score difference."""

    answers: dict[str, str]
    nbest: dict[str, list[dict[str, Any]]]
    null_odds: dict[str, float]
    best_non_null: dict[str, str]


def _softmax(scores: Sequence[float]) -> list[float]:
    if not scores:
        return []
    top = max(scores)
    exp = [math.exp(s - top) for s in scores]
    total = sum(exp)
    return [e / total for e in exp]


def postprocess(
    examples: Sequence[SquadExample],
    features: Mapping[str, np.ndarray],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> Predictions:
    """Answers from the start/end logits of every feature (rows of `features`: example_index, offsets,
    max_context), as the original compute_predictions_logits, with text taken from the context offsets."""
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for row, index in enumerate(np.asarray(features["example_index"]).tolist()):
        by_example[index].append(row)
    offsets_all = np.asarray(features["offsets"])
    max_context_all = np.asarray(features["max_context"])
    out = Predictions({}, {}, {}, {})
    for index, ex in enumerate(examples):
        candidates: list[tuple[float, int, int, int, float, float]] = []  # (score, row, start, end, s, e)
        score_null, null_start, null_end = math.inf, 0.0, 0.0
        for row in by_example.get(index, []):
            s_logits, e_logits = start_logits[row], end_logits[row]
            if version_2_with_negative:
                feature_null = float(s_logits[0] + e_logits[0])
                if feature_null < score_null:
                    score_null, null_start, null_end = feature_null, float(s_logits[0]), float(e_logits[0])
            starts = np.argsort(-s_logits, kind="stable")[:n_best_size]
            ends = np.argsort(-e_logits, kind="stable")[:n_best_size]
            offsets, max_context = offsets_all[row], max_context_all[row]
            grid_s, grid_e = np.meshgrid(starts, ends, indexing="ij")
            grid_s, grid_e = grid_s.ravel(), grid_e.ravel()
            ok = ((offsets[grid_s, 0] >= 0) & (offsets[grid_e, 0] >= 0) & max_context[grid_s]
                  & (grid_e >= grid_s) & (grid_e - grid_s + 1 <= max_answer_length))
            for s, e in zip(grid_s[ok].tolist(), grid_e[ok].tolist()):
                candidates.append((float(s_logits[s] + e_logits[e]), row, s, e, float(s_logits[s]),
                                   float(e_logits[e])))
        # Python's sort is stable: equal scores keep the original's (window, start, end) order.
        candidates.sort(key=lambda c: c[0], reverse=True)
        nbest: list[tuple[str, float, float]] = []
        seen: set[str] = set()
        null_added = False
        prelim = [(c[1], c[2], c[3], c[4], c[5]) for c in candidates]
        if version_2_with_negative:
            # The null answer competes with the spans by its own score (its slot sorted in among them).
            null_score = null_start + null_end
            position = next((i for i, c in enumerate(candidates) if c[0] < null_score), len(candidates))
            prelim.insert(position, (-1, 0, 0, null_start, null_end))
        for row, s, e, s_logit, e_logit in prelim:
            if len(nbest) >= n_best_size:
                break
            if row < 0:
                text = ""
                null_added = True
            else:
                text = ex.context[int(offsets_all[row, s, 0]):int(offsets_all[row, e, 1])]
                if text in seen:
                    continue
            seen.add(text)
            nbest.append((text, s_logit, e_logit))
        if version_2_with_negative:
            if not null_added:
                nbest.append(("", null_start, null_end))
            if len(nbest) == 1:
                nbest.insert(0, ("empty", 0.0, 0.0))  # the original's nonce answer when only null is left
        if not nbest:
            nbest.append(("empty", 0.0, 0.0))
        probs = _softmax([s + e for _, s, e in nbest])
        out.nbest[ex.qas_id] = [{"text": t, "probability": p, "start_logit": s, "end_logit": e}
                                for (t, s, e), p in zip(nbest, probs)]
        best_non_null = next(((t, s, e) for t, s, e in nbest if t), None)
        if not version_2_with_negative:
            out.answers[ex.qas_id] = nbest[0][0]
            out.best_non_null[ex.qas_id] = nbest[0][0]
            continue
        assert best_non_null is not None
        diff = score_null - best_non_null[1] - best_non_null[2]
        out.null_odds[ex.qas_id] = diff
        out.best_non_null[ex.qas_id] = best_non_null[0]
        out.answers[ex.qas_id] = "" if diff > null_score_diff_threshold else best_non_null[0]
    return out


def write_predictions(output_dir: str, prefix: str | None, predictions: Predictions, version_2: bool) -> list[str]:
    """predictions_<prefix>.json, nbest_predictions_<prefix>.json and (v2.0) null_odds_<prefix>.json (prefix
    None: predictions.json, ..., SQuAD's submission names), each written atomically; returns the paths."""
    tail = ".json" if prefix is None else f"_{prefix}.json"
    files = [(f"predictions{tail}", predictions.answers), (f"nbest_predictions{tail}", predictions.nbest)]
    if version_2:
        files.append((f"null_odds{tail}", predictions.null_odds))
    paths = []
    for name, obj in files:
        path = os.path.join(output_dir, name)
        write_json_atomic(path, obj, indent=4, sort_keys=False, ensure_ascii=False)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# official metrics


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1_v1(gold: str, prediction: str) -> float:
    """SQuAD v1.1 F1: token overlap; 0 when nothing overlaps (even if both are empty)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_v2(gold: str, prediction: str) -> float:
    """SQuAD v2.0 F1: as v1.1, but an empty answer against an empty answer scores 1."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    return f1_v1(gold, prediction)


def evaluate_v1(examples: Iterable[SquadExample], predictions: Mapping[str, str]) -> dict[str, float]:
    """The official v1.1 script: mean of the best EM and F1 over each question's gold answers (x100); a
    question without prediction scores 0."""
    em = f1 = 0.0
    total = 0
    for ex in examples:
        total += 1
        if ex.qas_id not in predictions:
            continue
        pred = predictions[ex.qas_id]
        em += max(exact_match(g, pred) for g in ex.answer_texts)
        f1 += max(f1_v1(g, pred) for g in ex.answer_texts)
    return {"exact": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total}


def _best_threshold(preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float],
                    has_ans: Mapping[str, bool]) -> tuple[float, float]:
    """The official find_best_thresh: predict null wherever na_prob > t; the best score and its t."""
    score = best = float(sum(1 for k in has_ans if not has_ans[k]))
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        score += scores[qid] if has_ans[qid] else (-1 if preds[qid] else 0)
        if score > best:
            best, best_thresh = score, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate_v2(examples: Iterable[SquadExample], predictions: Mapping[str, str],
                na_probs: Mapping[str, float] | None = None,
                best_non_null: Mapping[str, str] | None = None) -> dict[str, float]:
    """The official v2.0 script on `predictions` (questions without prediction are left out, as there).

    Gold answers that normalise to nothing are dropped; a question left with none is scored against "".
    With `na_probs` (the null score differences) the best thresholds are searched as the official script does,
    over `best_non_null` answers (the best non-empty span of each question): best_f1_thresh is then the
    --null_score_diff_threshold that maximises F1."""
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_ans: dict[str, bool] = {}
    for ex in examples:
        has_ans[ex.qas_id] = bool(ex.answers)
        gold = [g for g in ex.answer_texts if normalize_answer(g)] or [""]
        if ex.qas_id not in predictions:
            continue
        pred = predictions[ex.qas_id]
        exact[ex.qas_id] = max(exact_match(g, pred) for g in gold)
        f1[ex.qas_id] = max(f1_v2(g, pred) for g in gold)
    if not exact:
        raise UserError("no prediction matches a question of the evaluation file")

    def block(qids: list[str]) -> dict[str, float]:
        return {"exact": 100.0 * sum(exact[k] for k in qids) / len(qids),
                "f1": 100.0 * sum(f1[k] for k in qids) / len(qids), "total": len(qids)}

    result = block(list(exact))
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [k for k in exact if has_ans[k] == wanted]
        if qids:
            result.update({f"{name}_{k}": v for k, v in block(qids).items()})
    if na_probs is not None:
        preds = best_non_null if best_non_null is not None else predictions
        raw_exact = {k: float(max(exact_match(g, preds[k]) for g in _gold(ex))) for ex in examples
                     if (k := ex.qas_id) in preds}
        raw_f1 = {k: max(f1_v2(g, preds[k]) for g in _gold(ex)) for ex in examples if (k := ex.qas_id) in preds}
        probs = {k: v for k, v in na_probs.items() if k in raw_exact}
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(preds, raw_exact, probs, has_ans)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(preds, raw_f1, probs, has_ans)
    return result


def _gold(ex: SquadExample) -> list[str]:
    return [g for g in ex.answer_texts if normalize_answer(g)] or [""]


def squad_evaluate(examples: Sequence[SquadExample], predictions: Predictions,
                   version_2_with_negative: bool) -> dict[str, float]:
    """The official metrics of the version in use."""
    if version_2_with_negative:
        return evaluate_v2(examples, predictions.answers, predictions.null_odds, predictions.best_non_null)
    return evaluate_v1(examples, predictions.answers)
