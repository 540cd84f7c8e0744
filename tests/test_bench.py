"""common/bench.py: a script run as its own process hands back what its main() returned; tables; ABBA order."""

from __future__ import annotations

import pytest

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
