"""GLUE tasks: the nine benchmark tasks (plus MNLI mismatched) as GLUE distributes them.

Reads the tab-separated train/dev files with the same columns, headers and guids as the transformers 4.x GLUE
processors, computes the same metrics, and turns examples into padded int64 tensors with a fast tokenizer.
Every bad input (missing folder or file, malformed row) is a UserError that names the file and line.

Decisions worth knowing:

* ``GlueTask.labels`` is a tuple of label strings in class-index order; it is EMPTY for the regression task
  STS-B (the old processors used ``[None]``), and ``num_labels`` returns 1 for it (one regression output).
* QQP rows with fewer than six columns are skipped, as the old processor did (it caught the IndexError);
  the count and first line numbers are logged as a warning. Every other task rejects a short row.
* Completely empty lines (e.g. a trailing blank line) are ignored in every file.
* Line breaks follow Python's universal newlines (``\\n``, ``\\r\\n`` and a lone ``\\r``), as the old reader did.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.data.glue_tasks import (  # the task table; re-exported: callers say glue.get_task, glue.TASKS
    CLASSIFICATION, REGRESSION, SPLITS, TASKS, TEST_ID_HEADERS, GlueTask, canonical_task_name, eval_tasks,
    get_task, num_labels, primary_metric,
)
from common.errors import UserError, file_error
from common.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [  # with the task table of glue_tasks.py, so callers need one module
    "CLASSIFICATION", "REGRESSION", "SPLITS", "TASKS", "TEST_ID_HEADERS", "GlueTask", "canonical_task_name",
    "eval_tasks", "get_task", "num_labels", "primary_metric", "InputExample", "read_examples", "example_index",
    "compute_metrics", "summary_score", "featurize",
]


@dataclass(frozen=True)
class InputExample:
    """One labelled example: label is a class name (str) for classification, a float score for STS-B."""

    guid: str
    text_a: str
    text_b: str | None = None
    label: str | float | None = None


# The order DeeBERT's get_wanted_result picks a single summary number from a result dict.
_SUMMARY_ORDER = ("spearmanr", "f1", "mcc", "acc")


# ----------------------------------------------------------------------------------------------- reading


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for each line, without its line break.

    Decodes line by line so a non-UTF-8 byte is reported at its real line. Strips a UTF-8 BOM at the start
    and splits on \\n, \\r\\n and a lone \\r, as Python's universal-newline text mode does.
    """
    line_no = 0
    with open(path, "rb") as f:
        for raw in f:  # binary iteration splits on b"\n" only; a lone "\r" is split below
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = line_no + 1 + raw[: err.start].count(b"\r")
                raise file_error(path, where, f"not valid UTF-8 (byte {raw[err.start]:#04x})",
                                 "save the file as UTF-8, as GLUE distributes it") from None
            if line_no == 0 and text.startswith("\ufeff"):
                text = text[1:]
            if text.endswith("\n"):
                text = text[:-1].removesuffix("\r")
            for part in text.split("\r"):
                line_no += 1
                yield line_no, part


def _resolve_file(task: GlueTask, data_dir: str, split: str) -> str:
    """Path of the split's file: in data_dir itself, or in data_dir/<GLUE subdirectory>."""
    file_name = task.file_for(split)
    if not os.path.isdir(data_dir):
        raise UserError(f"{data_dir}: data folder not found (expected a folder holding {file_name} "
                        f"for {task.name}, i.e. the GLUE {task.data_subdir} folder or its parent)")
    candidates = [os.path.join(data_dir, file_name), os.path.join(data_dir, task.data_subdir, file_name)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise UserError(f"{candidates[0]}: file not found (task {task.name} {split} needs {file_name} in "
                    f"{data_dir} or in {candidates[1]}; download GLUE and point to its {task.data_subdir} folder)")


def _parse_label(task: GlueTask, value: str, path: str, line_no: int) -> str | float:
    """Check one label cell against the task's label set (or the STS-B score range)."""
    if value.strip() == "":
        expected = "a score in [0, 5]" if task.is_regression else f"one of {', '.join(task.labels)}"
        raise file_error(path, line_no, "empty label", f"expected {expected}")
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise file_error(path, line_no, f"STS-B score {value!r} is not a number",
                             "expected a similarity score in [0, 5] in the last column") from None
        if not (math.isfinite(score) and 0.0 <= score <= 5.0):
            raise file_error(path, line_no, f"STS-B score {value!r} is outside [0, 5]",
                             "expected a similarity score in [0, 5] in the last column")
        return score
    if value not in task.labels:
        raise file_error(path, line_no, f"unknown label {value!r} for {task.name}",
                         f"expected one of {', '.join(task.labels)}")
    return value


def _looks_like_data(task: GlueTask, row: list[str]) -> bool:
    """True when a header task's first row carries a valid label, i.e. the header seems to be missing."""
    if len(row) < task.min_columns:
        return False
    value = row[task.label_column]
    if task.is_regression:
        try:
            return 0.0 <= float(value) <= 5.0
        except ValueError:
            return False
    return value in task.labels


@dataclass(frozen=True)
class _Layout:
    """Where one split's rows keep their texts, label (None: unlabelled) and id, and how many columns they need."""

    has_header: bool
    text_a: int
    text_b: int | None
    label: int | None
    id_column: int | None
    need: int


def _layout(task: GlueTask, split: str) -> _Layout:
    if split == "test":
        a, b = task.test_columns
        return _Layout(True, a, b, None, 0, (a if b is None else max(a, b)) + 1)
    return _Layout(task.has_header, task.text_a_column, task.text_b_column, task.label_column, task.id_column,
                   task.min_columns)


def _test_header_width(task: GlueTask, row: list[str], path: str, line_no: int, need: int) -> int:
    """The column count of an unlabelled test file, from its header (which must start with GLUE's index)."""
    if row[0].strip().lower() not in TEST_ID_HEADERS or len(row) < need:
        raise file_error(path, line_no, f"not the header of a GLUE {task.name} test file (found {len(row)} "
                         f"column(s), first {row[0][:40]!r})", f"an unlabelled test file starts with a header "
                         f"of at least {need} tab-separated columns, 'index' first, and has no label column")
    return len(row)


def read_examples(task_name: str | GlueTask, data_dir: str | os.PathLike, split: str) -> list[InputExample]:
    """Read the train, dev or unlabelled test file of a GLUE task into examples, validating every row.

    ``data_dir`` is the task's folder (e.g. ``glue_data/MRPC``) or the GLUE root holding it. Guids match
    the old processors: ``<split>-<row index>`` for CoLA, SST-2 and MRPC, ``<file stem>-<id column>`` for
    the others (so MNLI dev guids start with ``dev_matched-`` / ``dev_mismatched-``). Test files (``test.tsv``,
    MNLI's ``test_matched.tsv`` / ``test_mismatched.tsv``) have GLUE's test layout: a header, the ``index``
    column first, no label; every row has the header's number of columns, the examples no label, and their
    guid is ``<file stem>-<index>`` (``example_index`` gives the index back).
    """
    task = get_task(task_name)
    data_dir = os.fspath(data_dir)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    path = _resolve_file(task, data_dir, split)
    layout = _layout(task, split)
    set_type = os.path.splitext(task.file_for(split))[0] if layout.id_column is not None else split
    need = layout.need
    width = None  # a test file's rows have exactly its header's columns

    examples: list[InputExample] = []
    skipped: list[int] = []
    row_index = -1
    for line_no, text in _iter_lines(path):
        if text == "":
            continue
        row_index += 1
        row = text.split("\t")  # no quoting: a '"' is an ordinary character, as in GLUE's own reader
        if layout.has_header and row_index == 0:
            if layout.label is None:
                width = _test_header_width(task, row, path, line_no, need)
            elif _looks_like_data(task, row):
                logger.warning("%s:%d looks like data, but %s files start with a header line that is skipped",
                               path, line_no, task.name)
            continue
        if len(row) < need:
            if task.skip_short_rows:
                skipped.append(line_no)
                continue
            raise file_error(path, line_no, f"{len(row)} tab-separated column(s), {task.name} rows need at "
                             f"least {need}", "check the file is the GLUE TSV and not damaged")
        if width is not None and len(row) != width:
            raise file_error(path, line_no, f"{len(row)} tab-separated column(s), the header has {width}",
                             "each row of a test file has the header's columns: the index, the texts, no label")
        label = _parse_label(task, row[layout.label], path, line_no) if layout.label is not None else None
        guid_part = row[layout.id_column] if layout.id_column is not None else str(row_index)
        text_b = row[layout.text_b] if layout.text_b is not None else None
        examples.append(InputExample(guid=f"{set_type}-{guid_part}", text_a=row[layout.text_a],
                                     text_b=text_b, label=label))

    if skipped:
        shown = ", ".join(str(n) for n in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d row(s) with fewer than %d columns (lines %s), as the original "
                       "%s reader did", path, len(skipped), need, shown, task.name)
    if not examples:
        raise file_error(path, None, f"no examples in the {split} file of {task.name}",
                         "the file is empty or holds only a header; re-download GLUE")
    logger.info("read %d %s examples from %s", len(examples), task.name, path)
    return examples


def example_index(example: InputExample) -> str:
    """The id a prediction file gives an example: its guid after the split (a test file's index column)."""
    return example.guid.split("-", 1)[1]


# ----------------------------------------------------------------------------------------------- metrics


def _as_1d(values: object, what: str) -> np.ndarray:
    """A 1-D numpy array; a trailing axis of size 1 (regression logits) is dropped."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one value per example, got shape {arr.shape} "
                         "(take the argmax of the logits for classification)")
    return arr


def compute_metrics(task_name: str | GlueTask, preds: Sequence | np.ndarray,
                    labels: Sequence | np.ndarray) -> dict[str, float]:
    """The standard GLUE metrics for a task as plain floats.

    CoLA: mcc; MRPC and QQP: acc, f1, acc_and_f1; STS-B: pearson, spearmanr, corr; others: acc.
    ``preds`` are class indices (or scores for STS-B), ``labels`` the gold indices (or scores).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    task = get_task(task_name)
    p = _as_1d(preds, "preds")
    y = _as_1d(labels, "labels")
    if len(p) != len(y):
        raise ValueError(f"preds and labels differ in length: {len(p)} predictions for {len(y)} labels")
    if len(p) == 0:
        raise ValueError("no predictions to score")

    if task.is_regression:
        p = p.astype(np.float64)
        y = y.astype(np.float64)
        pearson = float(pearsonr(p, y)[0])
        spearman = float(spearmanr(p, y)[0])
        return {"pearson": pearson, "spearmanr": spearman, "corr": (pearson + spearman) / 2.0}

    if task.metrics == ("mcc",):
        return {"mcc": float(matthews_corrcoef(y, p))}
    acc = float(np.mean(p == y))
    if "f1" in task.metrics:
        f1 = float(f1_score(y_true=y, y_pred=p))
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2.0}
    return {"acc": acc}


def summary_score(result: dict[str, float]) -> float:
    """The single number DeeBERT reports from a metrics dict: spearmanr, else f1, else mcc, else acc."""
    for key in _SUMMARY_ORDER:
        if key in result:
            return float(result[key])
    raise KeyError(f"no summary metric in {sorted(result)}: expected one of {', '.join(_SUMMARY_ORDER)}")


# ----------------------------------------------------------------------------------------------- features


def _label_tensor(task: GlueTask, examples: Sequence[InputExample]) -> torch.Tensor | None:
    """Labels as class indices (int64, label-list order) or scores (float32); None if no example has one."""
    values = [ex.label for ex in examples]
    missing = sum(v is None for v in values)
    if missing == len(values):
        return None
    if missing:
        raise ValueError(f"{missing} of {len(values)} examples have no label; label all of them or none")
    if task.is_regression:
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    index = {label: i for i, label in enumerate(task.labels)}
    try:
        return torch.tensor([index[v] for v in values], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"label {err.args[0]!r} is not a {task.name} label ({', '.join(task.labels)})") from None


def featurize(examples: Sequence[InputExample], tokenizer, task_name: str | GlueTask, max_seq_length: int,
              pad_to_max_length: bool = True, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """Tokenize examples in batches with a fast tokenizer into rectangular int64 tensors plus labels.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (only when the tokenizer produces them)
    and ``labels`` (int64 class indices, float32 for STS-B; omitted when no example is labelled).
    With ``pad_to_max_length=False`` rows are padded to the longest sequence of the whole set instead of
    ``max_seq_length``, so the training loop can trim each batch further.
    """
    task = get_task(task_name)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{type(tokenizer).__name__} is not a fast tokenizer: GLUE featurization needs one "
                        "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))")
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise UserError(f"max_seq_length must be an integer of at least 2, got {max_seq_length!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not examples:
        raise ValueError("no examples to featurize")
    has_b = [ex.text_b is not None for ex in examples]
    if any(has_b) and not all(has_b):
        raise ValueError("mixed examples: some have text_b and some do not")
    pairs = has_b[0]

    labels = _label_tensor(task, examples)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    rows: dict[str, list[list[int]]] = {k: [] for k in keys}
    starts = range(0, len(examples), batch_size)
    for start in progress_bar(starts, desc=f"featurize {task.name}", unit="batch", leave=False,
                              disable=len(starts) < 2):
        batch = examples[start:start + batch_size]
        # Unpadded lists, padded below in one numpy pass: much faster than return_tensors="pt" per batch.
        enc = tokenizer([ex.text_a for ex in batch], [ex.text_b for ex in batch] if pairs else None,
                        truncation=True, max_length=max_seq_length, padding=False)
        for k in keys:
            if k in enc:
                rows[k].extend(enc[k])

    width = max_seq_length if pad_to_max_length else max(len(ids) for ids in rows["input_ids"])
    features = _pad_rows(tokenizer, {k: v for k, v in rows.items() if v}, width)
    if labels is not None:
        features["labels"] = labels
    return features


def _pad_rows(tokenizer, rows_by_key: dict[str, list[list[int]]], width: int) -> dict[str, torch.Tensor]:
    """Pad ragged token lists to ``width`` columns as int64 tensors, on the tokenizer's padding side."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise UserError(f"{type(tokenizer).__name__} has no pad token: set tokenizer.pad_token first")
    pad_values = {"input_ids": pad_id, "attention_mask": 0,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    left = getattr(tokenizer, "padding_side", "right") == "left"
    out: dict[str, torch.Tensor] = {}
    for k, rows in rows_by_key.items():
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        if lengths.max(initial=0) > width:
            raise ValueError(f"the tokenizer returned {int(lengths.max())} tokens for a row, more than {width}")
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
        cols = np.arange(width)
        mask = cols >= (width - lengths)[:, None] if left else cols < lengths[:, None]
        arr = np.full((len(rows), width), int(pad_values[k]), dtype=np.int64)
        arr[mask] = flat  # boolean assignment fills row by row, left to right
        out[k] = torch.from_numpy(arr)
    return out


def split_calibration(features: dict[str, torch.Tensor], num_examples: int, seed: int
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the rest, a calibration slice): `num_examples` rows drawn with `seed` from a featurized training set and
    held out of it (both in file order), so that an early-exit threshold is chosen on rows the model was not
    trained on and never on the dev set. The same seed and size give the same slice in a later run."""
    total = len(next(iter(features.values())))
    if not 0 < num_examples < total:
        raise UserError(f"a calibration slice of {num_examples} rows cannot be held out of {total} training rows "
                        f"(--calibration_examples must be between 1 and {total - 1})")
    held = torch.zeros(total, dtype=torch.bool)
    held[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_examples]] = True
    return {k: v[~held] for k, v in features.items()}, {k: v[held] for k, v in features.items()}
