"""common.errors.exit_with: a worker of a multi-process torchrun run leaves without the interpreter's
finalization (gloo threads may still need the GIL then), its output flushed and its exit code kept; any other
process exits normally."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = """
import atexit, logging, sys
from common.errors import exit_with
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
atexit.register(lambda: print("finalized", flush=True))
print("written", end="")  # no newline: still in the buffer of a pipe at exit
logging.getLogger("x").info("logged")
exit_with(3)
"""


@pytest.mark.parametrize("world_size, finalized", [(None, True), ("1", True), ("2", False)])
def test_exit_code_output_and_finalization(world_size, finalized):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = str(ROOT)
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout.startswith("written") and "logged" in proc.stderr
    assert ("finalized" in proc.stdout) == finalized
