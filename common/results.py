"""train_results.json and all_results.json, as the Hugging Face example scripts write them: flat keys
(train_loss, train_runtime, train_samples_per_second, ..., eval_<metric>), all_results being the train and eval
metrics merged. The scripts' own detailed files (eval_results.json, ...) are unchanged beside them."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from common.io import write_json_atomic

TRAIN_FILE = "train_results.json"
ALL_FILE = "all_results.json"


def train_metrics(stages: Sequence[Mapping[str, Any]], num_samples: int | None = None) -> dict[str, Any]:
    """Flat train_* metrics from the stage results of one run (each a TrainResult as a dict: global_step,
    average_loss, seconds, examples_per_second, stage). With several stages, the loss is averaged over every
    step of them all and each stage also gets its own train_<stage>_loss / _runtime."""
    stages = [s for s in stages if s]
    steps = sum(int(s["global_step"]) for s in stages)
    seconds = sum(float(s["seconds"]) for s in stages)
    seen = sum(float(s["examples_per_second"]) * float(s["seconds"]) for s in stages)
    out: dict[str, Any] = {
        "train_loss": sum(float(s["average_loss"]) * int(s["global_step"]) for s in stages) / max(steps, 1),
        "train_runtime": round(seconds, 4),
        "train_samples_per_second": round(seen / seconds, 3) if seconds > 0 else None,
        "train_steps_per_second": round(steps / seconds, 3) if seconds > 0 else None,
        "train_steps": steps,
    }
    if num_samples is not None:
        out["train_samples"] = int(num_samples)
    if len(stages) > 1:
        for s in stages:
            name = str(s.get("stage", "stage")).removeprefix("checkpoint-")
            out[f"train_{name}_loss"] = float(s["average_loss"])
            out[f"train_{name}_runtime"] = round(float(s["seconds"]), 4)
    return out


def flat_metrics(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """`{prefix}{name}` for every finite number of `metrics` (nested dicts joined with `_`)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(flat_metrics(f"{prefix}{name}_", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{name}"] = value
    return out


def write_run_results(output_dir: str, train: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None,
                      base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """train_results.json (when this run trained) and all_results.json (call on rank 0 only). all_results is
    `base` (a script's own summary, if it has one) with the flat train and eval metrics merged in; a run that
    only evaluates updates the all_results.json a training run left in the folder instead of dropping its
    train metrics."""
    path = os.path.join(output_dir, ALL_FILE)
    merged: dict[str, Any] = {}
    if train is None and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                merged = json.load(f)
        except (OSError, ValueError):
            merged = {}
    merged.update(base or {})
    if train is not None:
        write_json_atomic(os.path.join(output_dir, TRAIN_FILE), dict(train))
        merged.update(train)
    merged.update(evaluation or {})
    write_json_atomic(path, merged)
    return merged
