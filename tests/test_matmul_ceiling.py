"""common/matmul_ceiling.py: the matrix products of a piece of work, recorded with their FLOPs and replayed alone;
and the distillation bench's bare loop, whose two loss formulations must do the same matrix work."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import binarize_data
import extract_student
import token_counts
from bench_distill import compared_argv, limit
from common.matmul_ceiling import MatmulRecorder, replay_seconds

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recorder_counts_flops_and_distinct_calls_by_hand():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    acc = torch.zeros(4, 4)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 4)
    with MatmulRecorder() as recorder:
        torch.mm(a, b.t())  # 2*3*4*5 = 120
        torch.mm(a, b.t())  # the same call again: counted, not a new entry
        F.linear(torch.randn(2, 7, 4), b, torch.zeros(5))  # 2*14*4*5 = 560
        acc.addmm_(a.t(), a)  # in place, 2*4*3*4 = 96
        F.scaled_dot_product_attention(q, k, v)  # 2 * (2*2) * 3 * 6 * (8 + 4) = 1728
        torch.relu(a)  # not a product
    assert recorder.flops == 2 * 120 + 560 + 96 + 1728
    assert sorted(recorder.calls.values())[-2:] == [1, 2]  # (how many entries: as torch decomposes the ops)
    (mm_key,) = [key for key, n in recorder.calls.items() if n == 2]
    assert mm_key[1][1].stride == (1, 4)  # the transposed operand's layout is kept


def test_replay_times_each_distinct_call_and_weights_it_by_its_count():
    with MatmulRecorder() as recorder:
        for _ in range(3):
            torch.mm(torch.randn(2, 3), torch.randn(3, 2))
        torch.bmm(torch.randn(2, 2, 3), torch.randn(2, 3, 2))
    ticks = itertools.count()
    # A clock that advances one second per reading: every timed call takes one second.
    assert replay_seconds(recorder.calls, repeats=2, clock=lambda: float(next(ticks))) == 3 + 1
    assert replay_seconds(recorder.calls) > 0


def test_bare_loop_losses_do_the_same_matrix_work(tiny_mlm_teacher_dir, lm_corpus_dir, tmp_path):
    data = binarize_data.main(["--file_path", str(lm_corpus_dir / "train.txt"), "--tokenizer_name",
                               tiny_mlm_teacher_dir, "--dump_file", str(tmp_path / "train")])["output"]
    counts = token_counts.main(["--data_file", data])["output"]
    extract_student.main(["--model_name", tiny_mlm_teacher_dir, "--num_layers", "2", "--vocab_transform",
                          "--dump_checkpoint", str(tmp_path / "student")])
    argv = compared_argv(tiny_mlm_teacher_dir, str(tmp_path / "student"), data, counts, seed=3, steps=2)
    result = limit(argv, str(tmp_path / "out"), threads=1, repeats=1)
    assert [r["loss"] for r in result["runs"]] == ["chunked", "whole logits"]
    assert result["micro_batches"] == 2 * 5 and all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in result["runs"])
    chunked, whole = result["ceiling"]["chunked"], result["ceiling"]["whole logits"]
    assert chunked["tokens"] == whole["tokens"] > 0
    # The chunked losses reorder the output projection's products, they do not add or drop any.
    assert chunked["flops_per_token"] == pytest.approx(whole["flops_per_token"], rel=1e-12)
