"""DDP training equals single-process training (issue #7).

Two Gloo processes with per-device batch B train to the same weights as one process with batch 2B: rank r
takes perm[r::2] of the epoch's seeded permutation (common/training.py `epoch_batches`), so the union of the
two ranks' i-th batches is the single process's i-th batch, and DDP's gradient averaging over the two
per-rank batch means equals the gradient of the mean over the 2B examples. Dropout is off so that nothing
random depends on the batch shape; the row count is a multiple of 2B so that no batch is ragged and no rank
pads by wrapping. With --gradient_accumulation_steps the same holds when the first micro-batches run under
`no_sync` and only the last one all-reduces.

Only the command line of scripts/run_glue_early_exit.py is used (flags and output files), run as
subprocesses in a temporary folder, and the tiny model and data are built here with transformers alone: the
test does not depend on the code base's internal modules.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "run_glue_early_exit.py")
TRAIN_ROWS = 64
ATOL, RTOL = 1e-6, 1e-5

# AdamW's epsilon is raised from 1e-8 to 1e-4: with 1e-8 an element whose gradient is tiny takes a step of
# about lr * g / (|g| + eps), which turns the float rounding between one batch of 2B and two of B (~1e-7
# relative) into weight differences of ~1e-6 (measured: 1.3e-6 after 16 steps); with 1e-4 they stay ~1e-8,
# while a real bug (no gradient averaging, a gradient summed over ranks) moves weights by ~1e-3.

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with the Gloo backend is unavailable"),
]


POSITIVE = "good great fine lovely superb brilliant charming witty warm clever".split()
NEGATIVE = "bad awful dull boring clumsy tedious bland weak messy poor".split()
NEUTRAL = "the a film movie story plot actor scene cast script it is was and but with this of".split()


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    """A random 3-layer BERT (hidden 32) with a word-level tokenizer and every dropout off (the off-ramps take
    theirs from hidden_dropout_prob), built here with transformers alone."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert-no-dropout") / "model"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(POSITIVE + NEGATIVE + NEUTRAL))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=None)
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sst2_64(tmp_path_factory) -> Path:
    """SST-2-format data: TRAIN_ROWS training rows (a multiple of every global batch below) of sentiment
    words among filler, of varying length (so dynamic padding differs between a batch and its halves)."""
    folder = tmp_path_factory.mktemp("glue") / "SST-2"
    folder.mkdir()
    rng = random.Random(1)

    def row() -> str:
        polar = [rng.choice(POSITIVE + NEGATIVE) for _ in range(rng.randint(1, 4))]
        score = sum(1 if w in POSITIVE else -1 for w in polar)
        words = polar + [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 14))]
        rng.shuffle(words)
        return f"{' '.join(words)}\t{int(score > 0)}\n"

    for name, rows in (("train.tsv", TRAIN_ROWS), ("dev.tsv", 8)):
        (folder / name).write_text("sentence\tlabel\n" + "".join(row() for _ in range(rows)), encoding="utf-8")
    return folder


def train_run(model: Path, data: Path, out: Path, batch: int, accumulation: int, processes: int) -> Path:
    """Train both DeeBERT stages for 2 epochs through the CLI (torchrun when processes > 1); return `out`."""
    args = ["--model_name_or_path", str(model), "--data_dir", str(data), "--task_name", "sst-2",
            "--output_dir", str(out), "--do_train", "--no_cuda", "--max_seq_length", "32",
            "--per_gpu_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
            "--num_train_epochs", "2", "--learning_rate", "1e-3", "--adam_epsilon", "1e-4", "--logging_steps", "1",
            "--save_steps", "0", "--seed", "7"]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(launcher + [SCRIPT] + args, capture_output=True, text=True, env=env, timeout=300,
                          cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {f"backbone.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    state.update({f"ramps.{k}": v for k, v in load_file(str(folder / "off_ramps.safetensors")).items()})
    return state


def logged_steps(folder: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (folder / "log_history.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows]


def assert_same_training(single: Path, ddp: Path, updates_per_stage: int) -> None:
    # The same optimisation steps with the same (all-reduced) losses ...
    one, two = logged_steps(single), logged_steps(ddp)
    expected = [(stage, step) for stage in ("checkpoint-stage1", "checkpoint-stage2")
                for step in range(1, updates_per_stage + 1)]
    assert [(s, n) for s, n, _ in one] == expected
    assert [(s, n) for s, n, _ in two] == expected
    assert [loss for *_, loss in two] == pytest.approx([loss for *_, loss in one], rel=RTOL, abs=ATOL)

    # ... and the same final weights, stock model and off-ramps.
    reference, distributed = final_weights(single), final_weights(ddp)
    assert reference.keys() == distributed.keys()
    worst = max(reference, key=lambda k: (reference[k] - distributed[k]).abs().max().item())
    max_diff = (reference[worst] - distributed[worst]).abs().max().item()
    print(f"max |single - ddp| = {max_diff:.3g} ({worst})")
    far = [k for k in reference if not torch.allclose(distributed[k], reference[k], atol=ATOL, rtol=RTOL)]
    assert not far, f"{len(far)} tensors differ (largest difference {max_diff:.3g} in {worst}): {far[:5]}"


def assert_trained(initial: Path, trained: Path) -> None:
    """Training moved the weights far beyond the tolerance (the comparison above is not vacuous)."""
    from safetensors.torch import load_file

    before = load_file(str(initial / "model.safetensors"))
    after = {k.removeprefix("bert."): v for k, v in load_file(str(trained / "model.safetensors")).items()}
    moved = max((after[k] - v).abs().max().item() for k, v in before.items() if k in after)
    assert moved > 100 * ATOL, moved
    ramps = load_file(str(trained / "off_ramps.safetensors"))
    pooler = after["pooler.dense.weight"]  # stage 2 starts every off-ramp's pooler from the head's pooler
    ramp_poolers = [k for k in ramps if k.endswith(".pooler.weight")]
    assert ramp_poolers, sorted(ramps)
    assert all((ramps[k] - pooler).abs().max().item() > 100 * ATOL for k in ramp_poolers)


def test_ddp_training_equals_single_process_with_the_same_global_batch(no_dropout_bert, sst2_64, tmp_path):
    """2 processes x batch 8 == 1 process x batch 16: 64 rows, 4 steps an epoch, 2 epochs, both stages."""
    single = train_run(no_dropout_bert, sst2_64, tmp_path / "single", batch=16, accumulation=1, processes=1)
    ddp = train_run(no_dropout_bert, sst2_64, tmp_path / "ddp", batch=8, accumulation=1, processes=2)
    assert_trained(no_dropout_bert, single)
    assert_same_training(single, ddp, updates_per_stage=2 * TRAIN_ROWS // 16)


def test_ddp_training_with_gradient_accumulation_equals_single_process(no_dropout_bert, sst2_64, tmp_path):
    """2 processes x batch 8 x 2 micro-batches (the first under no_sync) == 1 process x batch 16 x 2."""
    single = train_run(no_dropout_bert, sst2_64, tmp_path / "single", batch=16, accumulation=2, processes=1)
    ddp = train_run(no_dropout_bert, sst2_64, tmp_path / "ddp", batch=8, accumulation=2, processes=2)
    assert_trained(no_dropout_bert, single)
    assert_same_training(single, ddp, updates_per_stage=2 * TRAIN_ROWS // 32)
