"""common/progress.py: a tqdm bar on a terminal, rate-limited log lines in a file, nothing when disabled (on other
ranks, TQDM_DISABLE, --disable_tqdm); and the GLUE script's log, redirected to a file, stays short."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
import tqdm.std
import transformers

from common import progress
from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "run_glue_early_exit.py")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    """Each test starts unconfigured, as rank 0, without TQDM_DISABLE, and leaves the settings as it found them."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    monkeypatch.setattr(progress, "_settings", {"disable": False, "main": None})
    yield
    (transformers.utils.logging.enable_progress_bar if hf_bars else transformers.utils.logging.disable_progress_bar)()


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress, "clock", fake)
    return fake


@pytest.fixture
def terminal(monkeypatch):
    """Call it in the test body (pytest's capture puts its own sys.stderr back after the fixtures ran)."""

    def make() -> FakeTTY:
        stream = FakeTTY()
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    return make


def test_terminal_gets_a_tqdm_bar_whose_postfix_waits_for_the_next_refresh(terminal):
    stream = terminal()
    bar = progress.progress_bar(total=500, desc="train")
    assert isinstance(bar, tqdm.std.tqdm)
    for step in range(500):
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}")
    bar.close()
    out = stream.getvalue()
    assert "train" in out and "500/500" in out and "loss=" in out
    # tqdm redraws at most every mininterval (0.1 s): a few refreshes, not one or two per step
    assert out.count("\r") < 50


def test_a_file_gets_log_lines_at_most_every_interval_and_one_at_the_end(clock, caplog):
    caplog.set_level(logging.INFO, logger="common.progress")
    bar = progress.progress_bar(total=100, desc="train stage1")
    assert isinstance(bar, progress.LogProgress) and not isinstance(bar, tqdm.std.tqdm)
    for step in range(100):
        clock.now += 1.0  # 1 s a step: a line every 30 steps
        bar.update(1)
        bar.set_postfix(loss=f"{0.5:.4f}")
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = [r.getMessage() for r in caplog.records if r.name == "common.progress"]
    assert lines == [
        "train stage1: 30/100 (30%), 00:30 elapsed, 1 it/s, loss=0.5000",
        "train stage1: 60/100 (60%), 01:00 elapsed, 1 it/s, loss=0.5000",
        "train stage1: 90/100 (90%), 01:30 elapsed, 1 it/s, loss=0.5000",
        "train stage1: 100/100 (100%), 01:40 elapsed, 1 it/s, loss=0.5000",
    ]


def test_log_lines_of_iterables_bytes_and_transient_bars(clock, caplog):
    caplog.set_level(logging.INFO, logger="common.progress")
    for _ in progress.progress_bar(range(5), desc="quick", unit="batch", leave=False):
        clock.now += 1.0  # a transient bar that never reached a line leaves nothing
    for _ in progress.progress_bar(range(4), desc="slow", unit="batch", leave=False):
        clock.now += 20.0
    with progress.progress_bar(total=4e7, desc="binarize a.txt", unit="B", unit_scale=True) as bar:
        clock.now += 40.0
        bar.update(1.2e7)
    lines = [r.getMessage() for r in caplog.records if r.name == "common.progress"]
    assert lines == [
        "slow: 2/4 (50%), 00:40 elapsed, 0.05 batch/s",
        "slow: 4/4 (100%), 01:20 elapsed, 0.05 batch/s",
        "binarize a.txt: 12.0M/40.0MB (30%), 00:40 elapsed, 300kB/s",
    ]


@pytest.mark.parametrize("value, shows", [("1", False), ("true", False), ("0", True), ("", True)])
def test_tqdm_disable_environment_variable(monkeypatch, terminal, clock, caplog, value, shows):
    caplog.set_level(logging.INFO, logger="common.progress")
    monkeypatch.setenv("TQDM_DISABLE", value)
    stream = terminal()
    items = list(progress.progress_bar(range(3), desc="loop"))
    assert items == [0, 1, 2]
    assert ("loop" in stream.getvalue()) == shows
    assert not caplog.records


def test_disabled_on_other_ranks_by_configure_and_by_the_caller(monkeypatch, terminal, clock, caplog):
    caplog.set_level(logging.INFO, logger="common.progress")
    stream = terminal()

    def shows(**kwargs) -> bool:
        stream.seek(0)
        stream.truncate()
        with progress.progress_bar(total=2, desc="loop", **kwargs) as bar:
            bar.update(2)
            bar.set_postfix(loss="1")
        return "loop" in stream.getvalue()

    assert shows()
    assert not shows(disable=True)
    monkeypatch.setenv("RANK", "1")  # not configured: torchrun's RANK decides
    assert not shows()
    restore = progress.configure(main=True)
    assert shows()
    restore()
    restore = progress.configure(main=False)
    assert not shows()
    restore()
    monkeypatch.setenv("RANK", "0")
    restore = progress.configure(disable=True, main=True)  # --disable_tqdm
    assert not shows()
    restore()
    assert shows()
    assert not caplog.records


def test_configure_turns_transformers_bars_off_outside_a_terminal_and_back_on():
    transformers.utils.logging.enable_progress_bar()
    restore = progress.configure(main=True)  # pytest's stderr is no terminal
    assert not transformers.utils.logging.is_progress_bar_enabled()
    restore()
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_configure_keeps_transformers_bars_on_a_terminal(terminal):
    terminal()
    transformers.utils.logging.enable_progress_bar()
    restore = progress.configure(main=True)
    assert transformers.utils.logging.is_progress_bar_enabled()
    restore()
    restore = progress.configure(disable=True, main=True)
    assert not transformers.utils.logging.is_progress_bar_enabled()
    restore()


# ----------------------------------------------------------------------------------------------------------
# the GLUE script with its output redirected to a file, as under CI or nohup


def run_to_file(tmp_path, name: str, args: list[str], **env: str) -> str:
    log = tmp_path / f"{name}.log"
    environ = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "RANK")}
    environ.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, SCRIPT, *args], stdout=out, stderr=subprocess.STDOUT, env=environ,
                              timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def tiny_args(model: str, data: str, out) -> list[str]:
    return ["--model_name_or_path", model, "--data_dir", data, "--task_name", "sst-2", "--output_dir", str(out),
            "--max_seq_length", "32", "--per_gpu_eval_batch_size", "16", "--save_steps", "0", "--seed", "7"]


def test_glue_log_in_a_file_stays_short(tiny_bert_dir, sst2_dir, tmp_path):
    # batch 1: 160 optimization steps per stage, which tqdm would draw as hundreds of refreshes
    text = run_to_file(tmp_path, "train", [*tiny_args(tiny_bert_dir, sst2_dir, tmp_path / "run"), "--do_train",
                                           "--do_eval", "--per_gpu_train_batch_size", "1", "--num_train_epochs", "1"])
    assert "\r" not in text and "%|" not in text  # no bar at all, transformers' "Loading weights" included
    assert len(text.splitlines()) < 200
    assert "common.progress: train checkpoint-stage1: 160/160 (100%)" in text
    assert "loss=" in text


def test_glue_disable_tqdm(tiny_bert_dir, sst2_dir, tmp_path):
    # The flag through the whole command line (TQDM_DISABLE takes the same path: see the configure tests).
    args = [*tiny_args(tiny_bert_dir, sst2_dir, tmp_path / "run"), "--do_train", "--max_steps", "2"]
    text = run_to_file(tmp_path, "flag", args + ["--disable_tqdm"])
    assert "Finished checkpoint-stage1" in text
    assert "common.progress" not in text and "\r" not in text
