"""common/bench.py: a script run as its own process hands back what its main() returned; tables; ABBA order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench_distill import batch_shapes, largest_batches
from common.bench import abba_order, format_table, run_script
from common.errors import UserError

SCRIPT = '''
import sys

from common.errors import UserError, run_cli


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--fail":
        raise UserError("told to fail")
    return {"argv": argv, "loss": 0.1 + 0.2, "nested": {"ok": True}}


sys.exit(run_cli(main))
'''


def test_run_script_returns_what_main_returned(tmp_path):
    path = tmp_path / "tool.py"
    path.write_text(SCRIPT, encoding="utf-8")
    results, seconds = run_script(str(path), ["--x", "1"])
    assert results == {"argv": ["--x", "1"], "loss": 0.1 + 0.2, "nested": {"ok": True}}  # floats exactly
    assert seconds > 0
    with pytest.raises(UserError, match="tool.py failed with exit code 2: error: told to fail"):
        run_script(str(path), ["--fail"], quiet=True)


def test_abba_order_and_table():
    assert abba_order(3) == [False, True, True, False, False, True]
    assert format_table(["name", "n"], [["a", 10], ["bb", 2]]).splitlines() == [
        "name   n", "----  --", "a     10", "bb     2"]


def test_largest_batches_by_padded_tokens():
    lengths = np.array([10, 30, 12, 12, 29, 5, 31, 6])
    batches = [np.array(b) for b in ([0, 1], [2, 3], [4, 5], [6], [7])]  # padded 60, 24, 58, 31, 6
    assert [b.tolist() for b in largest_batches(batches, lengths, 2)] == [[0, 1], [4, 5]]  # in epoch order
    assert [b.tolist() for b in largest_batches(batches, lengths, 3)] == [[0, 1], [4, 5], [6]]
    assert batch_shapes(batches, lengths) == {"longest": 31, "largest_padded": 60}
    # Equal padded size: the batch with more real tokens first.
    assert [b.tolist() for b in largest_batches([np.array([2, 7]), np.array([2, 3])], lengths, 1)] == [[2, 3]]


def test_glue_bench_overhead_only_times_each_pooling_on_fresh_off_ramps(tiny_bert_dir, sst2_dir, tmp_path, capsys):
    from bench_glue_early_exit import main

    out = tmp_path / "bench"
    record = main(["--model_name_or_path", tiny_bert_dir, "--data_dir", sst2_dir, "--output_dir", str(out),
                   "--overhead_only", "--timing_examples", "6", "--overhead_repeats", "1",
                   "--eval_batch_sizes", "1", "4"])
    assert set(record["overhead"]) == {"first_token", "mean"}
    for per_batch in record["overhead"].values():
        assert [per_batch[bs]["rows"] for bs in ("1", "4")] == [6, 6]
        for r in per_batch.values():
            assert r["plain_seconds"] > 0 and r["early_exit_seconds"] > 0
            assert r["overhead"] == pytest.approx(r["early_exit_seconds"] / r["plain_seconds"] - 1)
            assert r["cpu_overhead"] == pytest.approx(r["early_exit_cpu_seconds"] / r["plain_cpu_seconds"] - 1)
    assert "fine_tune" not in record and not list(out.glob("model-*"))  # nothing trained
    assert json.loads((out / "bench_results.json").read_text())["overhead"] == record["overhead"]
    printed = capsys.readouterr().out
    assert "nothing trained" in printed and "fresh off-ramps' pooling" in printed


def test_distill_bench_refuses_comparison_flags_without_a_comparison(tmp_path):
    from bench_distill import parse_args

    with pytest.raises(UserError, match="--compare_limit only mean something with --compare_with"):
        parse_args(["--model_name_or_path", "m", "--data_dir", str(tmp_path), "--compare_limit"])
