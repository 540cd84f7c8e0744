"""--help of every script: each flag's default shown once, never a default that is not the flag's own."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.args import answering_help

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = ["run_glue_early_exit", "run_squad_pruning", "distill", "bertarize", "count_parameters", "binarize_data",
           "token_counts", "extract_student", "bench_glue_early_exit", "bench_squad_pruning", "bench_distill"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_each_default_once(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    flags = re.split(r"\n  (?=-)", text)
    assert len(flags) > 3
    for entry in flags:
        flat = " ".join(entry.split())
        assert flat.count("(default:") <= 1, flat
        assert "(default: None)" not in flat and "(default: )" not in flat, flat
        if flat.startswith("--no_"):
            assert "(default: True)" not in flat, flat  # a store_false twin would show the other flag's default


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_as_a_program_loads_no_torch(name, monkeypatch, capsys):
    """`python scripts/X.py --help` prints the same text as parse_args, without importing torch, transformers or
    numpy (which take seconds): the program's import log names none of them."""
    script = str(ROOT / "scripts" / f"{name}.py")
    monkeypatch.setenv("COLUMNS", "120")
    proc = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy")}
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit):
        importlib.import_module(name).parse_args(["--help"])
    assert proc.stdout == capsys.readouterr().out


def test_answering_help_only_for_a_program_asked_for_help():
    assert answering_help("__main__", ["--do_train", "-h"])
    assert answering_help("__main__", ["--help"])
    assert not answering_help("__main__", ["--do_train"])
    assert not answering_help("run_glue_early_exit", ["--help"])  # imported (tests): every import happens
    assert not answering_help("__main__", ["--", "-h"])  # after "--", "-h" is a value
