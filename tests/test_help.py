"""--help of every script: each flag's default shown once, never a default that is not the flag's own."""

from __future__ import annotations

import importlib
import re

import pytest

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
