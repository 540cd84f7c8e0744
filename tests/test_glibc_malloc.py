"""common.glibc_malloc: a fixed mmap threshold hands freed blocks back to the system; the flag's checks; the
environment variable wins."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import glibc_malloc

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(glibc_malloc._glibc() is None or not os.path.exists("/proc/self/statm"),
                                reason="glibc on Linux only")

# In a fresh process (the threshold is process-wide): fix the threshold, then free one large tensor of a size that
# glibc's dynamic threshold has learned to take from the heap, with a small block allocated after it that keeps
# the heap from shrinking. Prints what fix_mmap_threshold returned and how much resident memory the free gave back.
FREE_AFTER_LEARNING = """
import json, os, sys
import torch
from common.glibc_malloc import fix_mmap_threshold

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

result = fix_mmap_threshold(int(sys.argv[1]))
mib = 2**20 // 4
first = torch.ones(24 * mib)        # mmapped under any threshold up to 24 MiB; its free teaches glibc 24 MiB
del first
big = torch.ones(16 * mib)          # under the dynamic threshold now: from the heap
pin = torch.ones(64 * 1024 // 4)    # above it in the heap
before = rss()
del big
print(json.dumps({"set": result, "freed_mb": (before - rss()) / 2**20}))
"""


def free_after_learning(threshold: int, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", FREE_AFTER_LEARNING, str(threshold)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if k != glibc_malloc.ENV_VAR},
                               "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_fixed_threshold_hands_a_freed_tensor_back_and_the_default_keeps_it():
    fixed = free_after_learning(2**20)
    assert fixed["set"] == 2**20
    assert fixed["freed_mb"] > 14  # 16 MiB mapped on its own, unmapped at the free
    dynamic = free_after_learning(0)  # glibc's default: the 16 MiB block stays in the heap, resident
    assert dynamic["set"] is None
    assert dynamic["freed_mb"] < 2


@glibc_only
def test_the_environment_variable_wins():
    result = free_after_learning(2**20, env={glibc_malloc.ENV_VAR: str(64 * 2**20)})
    assert result["set"] is None
    assert result["freed_mb"] < 2  # the user's 64 MiB threshold: the block came from the heap and stays


def test_environment_variable_and_zero_leave_glibc_alone(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=glibc_malloc.__name__)
    monkeypatch.setattr(glibc_malloc, "_glibc", lambda: pytest.fail("mallopt must not be reached"))
    monkeypatch.setenv(glibc_malloc.ENV_VAR, "4194304")
    assert glibc_malloc.fix_mmap_threshold(2**20) is None
    assert f"{glibc_malloc.ENV_VAR}=4194304 from the environment wins" in caplog.text
    monkeypatch.delenv(glibc_malloc.ENV_VAR)
    assert glibc_malloc.fix_mmap_threshold(0) is None
    assert "dynamic mmap threshold" in caplog.text


def test_off_glibc_is_a_logged_no_op(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=glibc_malloc.__name__)
    monkeypatch.delenv(glibc_malloc.ENV_VAR, raising=False)
    monkeypatch.setattr(glibc_malloc, "_glibc", lambda: None)
    assert glibc_malloc.fix_mmap_threshold(2**20) is None
    assert "not glibc" in caplog.text


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (2**20, True), (32 * 2**20, True), (-1, False),
                                       (32 * 2**20 + 1, False)])
def test_threshold_range(value, ok):
    problems = glibc_malloc.threshold_problems(value, "--malloc_mmap_threshold")
    assert problems == ([] if ok else [f"--malloc_mmap_threshold must lie in [0, {32 * 2**20}] bytes (0: glibc's "
                                       f"dynamic default; got {value})"])
