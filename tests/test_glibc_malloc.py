"""common.glibc_malloc: a fixed mmap threshold hands freed blocks back to the system; held freed memory stays
resident until it passes its limit, and glibc's defaults come back after; the flags' checks; the environment
wins."""

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
import json, sys
import torch
from common.glibc_malloc import fix_mmap_threshold, resident_bytes as rss

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


def in_fresh_process(script: str, value: int, env: dict[str, str] | None = None) -> dict:
    """`script` run with `value` in a fresh Python (malloc settings are process-wide), none of glibc's malloc
    variables of this environment but `env`'s; what it printed last, as JSON."""
    clean = {k: v for k, v in os.environ.items() if k not in (*glibc_malloc.HOLD_ENV_VARS, "GLIBC_TUNABLES")}
    proc = subprocess.run([sys.executable, "-c", script, str(value)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_after_learning(threshold: int, env: dict[str, str] | None = None) -> dict:
    return in_fresh_process(FREE_AFTER_LEARNING, threshold, env)


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


# In a fresh process: hold freed memory with the given limit, settle, then free a 16 MiB tensor below a small live
# block. Prints how much resident memory the free gave back, how much the micro-batch check after it gave back, and
# how much freeing a 40 MiB tensor gave back after the block (glibc maps blocks on their own again).
HOLD_THEN_FREE = """
import json, sys
import torch
from common.glibc_malloc import held_freed_memory, resident_bytes

mib = 2**20 // 4
out = {}
with held_freed_memory(int(sys.argv[1])) as held:
    out["held"] = held is not None
    if held is not None:
        held.check(settled=False)
        out["baseline_before_settled"] = held.baseline
        held.check()
    big = torch.ones(16 * mib)
    pin = torch.ones(64 * 1024 // 4)
    before = resident_bytes()
    del big
    after_free = resident_bytes()
    if held is not None:
        held.check()
        out["handed_back"] = held.handed_back
    out.update(free_mb=(before - after_free) / 2**20, check_mb=(after_free - resident_bytes()) / 2**20)
big = torch.ones(40 * mib)  # over any mmap threshold glibc may have learned: mapped on its own unless mmap is off
before = resident_bytes()
del big
out["free_after_mb"] = (before - resident_bytes()) / 2**20
print(json.dumps(out))
"""


def hold_then_free(limit: int, env: dict[str, str] | None = None) -> dict:
    return in_fresh_process(HOLD_THEN_FREE, limit, env)


@glibc_only
def test_held_memory_stays_resident_until_past_its_limit_and_glibc_defaults_come_back():
    roomy = hold_then_free(2**30)
    assert roomy["held"] and roomy["baseline_before_settled"] is None
    assert roomy["free_mb"] < 2 and roomy["check_mb"] < 2 and roomy["handed_back"] == 0  # kept for reuse
    tight = hold_then_free(1)  # any growth over the baseline passes the limit: the check hands the block back
    assert tight["free_mb"] < 2 and tight["check_mb"] > 14 and tight["handed_back"] == 1
    for run in (roomy, tight):
        assert run["free_after_mb"] > 38  # after the block: mapped on its own again, unmapped at the free


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"}])
def test_glibc_malloc_set_in_the_environment_wins_over_holding(env):
    result = hold_then_free(2**30, env)
    assert not result["held"]


def test_zero_holds_nothing_and_off_glibc_is_a_logged_no_op(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=glibc_malloc.__name__)
    for name in (*glibc_malloc.HOLD_ENV_VARS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    with glibc_malloc.held_freed_memory(0) as held:
        assert held is None
    monkeypatch.setattr(glibc_malloc, "_glibc", lambda: None)
    with glibc_malloc.held_freed_memory(2**30) as held:
        assert held is None
    assert "not glibc on Linux" in caplog.text
