"""The GLUE task table: for each task its files, columns, labels and metrics, and name lookup (aliases).

Plain data, no torch import: argument parsers list the tasks, and `--help` answers without loading torch.
common/data/glue.py reads, scores and featurizes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError

CLASSIFICATION = "classification"
REGRESSION = "regression"
SPLITS = ("train", "dev", "test")
TEST_ID_HEADERS = ("index", "id")  # the first header cell of a GLUE test file (QQP says "id")


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored on disk, what its labels are and how it is scored.

    Column indices are 0-based into a tab-split row; ``label_column`` may be negative (counted from the end,
    as the old processors did with ``line[-1]``). ``id_column`` None means the guid uses the row's index in the
    file (the header, where there is one, being row 0) instead of an id column. The unlabelled test file has a
    layout of its own: a header, the ``index`` column first, the texts in ``test_columns`` (a, b), no label.
    """

    name: str
    data_subdir: str
    output_mode: str
    labels: tuple[str, ...]
    train_file: str
    dev_file: str
    primary_metric: str
    metrics: tuple[str, ...]
    has_header: bool
    text_a_column: int
    text_b_column: int | None
    label_column: int
    id_column: int | None
    test_columns: tuple[int, int | None]
    test_file: str = "test.tsv"
    skip_short_rows: bool = False

    @property
    def is_regression(self) -> bool:
        """True for STS-B, whose label is a similarity score in [0, 5]."""
        return self.output_mode == REGRESSION

    @property
    def is_pair(self) -> bool:
        """True when each example is a pair of texts (text_b set)."""
        return self.text_b_column is not None

    @property
    def min_columns(self) -> int:
        """Fewest columns a data row must have; a label counted from the end must not overlap a text column."""
        used = [self.text_a_column, self.text_b_column, self.id_column]
        highest = max(c for c in used if c is not None)
        if self.label_column >= 0:
            return max(highest, self.label_column) + 1
        return highest + 1 - self.label_column

    def file_for(self, split: str) -> str:
        """The file name GLUE uses for a split ("train", "dev" or the unlabelled "test")."""
        if split == "train":
            return self.train_file
        if split == "dev":
            return self.dev_file
        if split == "test":
            return self.test_file
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


_BINARY = ("0", "1")
_NLI3 = ("contradiction", "entailment", "neutral")
_NLI2 = ("entailment", "not_entailment")
_ACC = ("acc",)
_ACC_F1 = ("acc", "f1", "acc_and_f1")
_CORR = ("pearson", "spearmanr", "corr")


def _classification(name: str, subdir: str, labels: tuple[str, ...], metrics: tuple[str, ...], primary: str,
                    a: int, b: int | None, label: int, id_column: int | None, test: tuple[int, int | None], *,
                    header: bool = True, dev_file: str = "dev.tsv", test_file: str = "test.tsv",
                    skip_short_rows: bool = False) -> GlueTask:
    """A classification GlueTask whose train file is train.tsv (keeps the TASKS table one line per task)."""
    return GlueTask(name=name, data_subdir=subdir, output_mode=CLASSIFICATION, labels=labels,
                    train_file="train.tsv", dev_file=dev_file, primary_metric=primary, metrics=metrics,
                    has_header=header, text_a_column=a, text_b_column=b, label_column=label,
                    id_column=id_column, test_columns=test, test_file=test_file, skip_short_rows=skip_short_rows)


# The last column pair is the test file's (a, b) text columns (its column 0 is the index, it has no label).
TASKS: dict[str, GlueTask] = {
    "cola": _classification("cola", "CoLA", _BINARY, ("mcc",), "mcc", 3, None, 1, None, (1, None), header=False),
    "mnli": _classification("mnli", "MNLI", _NLI3, _ACC, "acc", 8, 9, -1, 0, (8, 9), dev_file="dev_matched.tsv",
                            test_file="test_matched.tsv"),
    "mnli-mm": _classification("mnli-mm", "MNLI", _NLI3, _ACC, "acc", 8, 9, -1, 0, (8, 9),
                               dev_file="dev_mismatched.tsv", test_file="test_mismatched.tsv"),
    "mrpc": _classification("mrpc", "MRPC", _BINARY, _ACC_F1, "f1", 3, 4, 0, None, (3, 4)),
    "sst-2": _classification("sst-2", "SST-2", _BINARY, _ACC, "acc", 0, None, 1, None, (1, None)),
    "sts-b": GlueTask(name="sts-b", data_subdir="STS-B", output_mode=REGRESSION, labels=(),
                      train_file="train.tsv", dev_file="dev.tsv", primary_metric="spearmanr", metrics=_CORR,
                      has_header=True, text_a_column=7, text_b_column=8, label_column=-1, id_column=0,
                      test_columns=(7, 8)),
    "qqp": _classification("qqp", "QQP", _BINARY, _ACC_F1, "f1", 3, 4, 5, 0, (1, 2), skip_short_rows=True),
    "qnli": _classification("qnli", "QNLI", _NLI2, _ACC, "acc", 1, 2, -1, 0, (1, 2)),
    "rte": _classification("rte", "RTE", _NLI2, _ACC, "acc", 1, 2, -1, 0, (1, 2)),
    "wnli": _classification("wnli", "WNLI", _BINARY, _ACC, "acc", 1, 2, -1, 0, (1, 2)),
}

_ALIASES = {"sst2": "sst-2", "stsb": "sts-b", "mnli_mm": "mnli-mm"}


def canonical_task_name(name: str) -> str:
    """The canonical lowercase task name for ``name`` (case-insensitive; sst2, stsb, mnli_mm accepted)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        choices = ", ".join(TASKS)
        aliases = ", ".join(f"{a} = {c}" for a, c in _ALIASES.items())
        raise UserError(f"unknown GLUE task {name!r}: choose one of {choices} (aliases: {aliases})")
    return key


def get_task(name: str | GlueTask) -> GlueTask:
    """The GlueTask for a task name or alias; a GlueTask is returned unchanged."""
    if isinstance(name, GlueTask):
        return name
    return TASKS[canonical_task_name(name)]


def num_labels(task: str | GlueTask) -> int:
    """Size of the model's output layer: the number of classes, or 1 for the regression task STS-B."""
    t = get_task(task)
    return 1 if t.is_regression else len(t.labels)


def primary_metric(task_name: str | GlueTask) -> str:
    """The metric key a single summary number uses (DeeBERT order: spearmanr, f1, mcc, then acc)."""
    return get_task(task_name).primary_metric


def eval_tasks(task: str) -> list[str]:
    """The dev sets a task is evaluated on: MNLI's matched and mismatched ones, every other task's own."""
    return ["mnli", "mnli-mm"] if task == "mnli" else [task]
