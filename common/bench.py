"""What the benchmark scripts (scripts/bench_*.py) share: running a script as its own program and reading what it
returned, the record of the environment, plain-text tables, and the ABBA order of side-by-side timed runs."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from common.args import script_parser
from common.errors import RESULTS_ENV, UserError
from common.io import write_json_atomic


def run_script(path: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
               quiet: bool = False) -> tuple[Any, float]:
    """Run the script at `path` in a fresh process, as `python <path> <argv>` (with `env` added to this
    process's environment), and return what its main() returned (common.errors.run_cli writes it as JSON to the
    file named in $COMPRESS_BERT_RESULTS_JSON) with the process's wall-clock seconds. Its output goes to the
    terminal, after a `+ script argv` line; `quiet` captures it instead (shown only if the script fails)."""
    name = os.path.basename(path)
    if not quiet:
        print(f"+ {name} {' '.join(argv)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        results_file = os.path.join(tmp, "results.json")
        child_env = {**os.environ, **(env or {}), RESULTS_ENV: results_file}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, path, *argv], env=child_env, capture_output=quiet, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            detail = f": {proc.stderr[-2000:]}" if quiet else " (its error is above)"
            raise UserError(f"{name} failed with exit code {proc.returncode}{detail}")
        with open(results_file, encoding="utf-8") as f:
            return json.load(f), seconds


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    """Versions, CPUs, torch threads and the device: what the timings depend on."""
    # Imported here, not at the top: a bench's --help answers without loading torch and transformers.
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo), else what platform knows: the same 2 cores may be an AVX2
    AMD EPYC one day and an AVX-512 Intel Xeon the next, and the timings differ between them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def abba_order(repeats: int) -> list[bool]:
    """Which of two modes each of 2 * `repeats` timed runs uses, in ABBA order (A B B A A B B A ...; False is A):
    a load that drifts during the runs hits both modes alike."""
    return [(i // 2 + i) % 2 == 1 for i in range(2 * repeats)]


def mirrored_order(items: Sequence[Any]) -> list[Any]:
    """The items, then the same items backwards (A B C C B A): several models or rules timed in one run, each
    hit alike by a load that drifts during it (abba_order is the two-mode, repeated case)."""
    return [*items, *reversed(items)]


def bench_parser(doc: str, model_help: str) -> argparse.ArgumentParser:
    """A bench's argument parser, with the model it measures (a local folder) as its first flag."""
    parser = script_parser(doc)
    parser.add_argument("--model_name_or_path", required=True, help=model_help)
    return parser


def add_timing_lock_arg(parser: argparse.ArgumentParser) -> None:
    """--timing_lock: a file to hold an exclusive lock on while timing (one benchmark at a time on a shared
    machine)."""
    parser.add_argument("--timing_lock", default=None,
                        help="A file to hold an exclusive lock on (flock) while timing, e.g. /work/bench.lock: "
                             "benchmarks sharing a machine then time one at a time.")


@contextlib.contextmanager
def timing_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (when given) while timing: one benchmark at a time on the machine."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        print(f"Waiting for the lock on {path}", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def new_record(script: str, args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The start of a bench's bench_results.json: its configuration and command line."""
    return {"config": vars(args), "command": [f"scripts/{script}", *(sys.argv[1:] if argv is None else argv)]}


def write_record(out: str, bench: dict[str, Any], wall: dict[str, float], start: float,
                 report: Callable[[dict[str, Any]], str], load_before: list[float] | None = None) -> dict[str, Any]:
    """Close a bench's record (wall time per phase and in total, environment, load average before and after),
    write it atomically to <out>/bench_results.json and print its report."""
    wall["total"] = time.perf_counter() - start
    bench["wall_seconds"] = wall
    bench["environment"] = {**environment(),
                            "load_average_1_5_15min_before": load_before,
                            "load_average_1_5_15min_after": load_average()}
    path = os.path.join(out, "bench_results.json")
    write_json_atomic(path, bench)
    print("\n" + report(bench), flush=True)
    print("\nWall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in wall.items()), flush=True)
    print(f"\nResults: {path}", flush=True)
    return bench
