"""Choosing an early-exit threshold for a metric budget (`--max_metric_drop`), and keeping it with the model.

The choice is made on a calibration slice held out from the training data, never on the dev set: every exit's
logits on the slice come from one full forward (EarlyExitModel.all_exit_logits), each candidate rule is replayed
over them with the rule's own `decide` (the decisions EarlyExitModel.early_exit takes, row by row), and the
most aggressive rule (fewest layers run on average) whose metric stays within the budget of the full model's
wins. It is saved as `early_exit.json` beside the model; an evaluation-only run uses it when no threshold is
given.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import torch

from common.errors import UserError
from common.io import write_json_atomic
from common.models.highway import EntropyExit, ExitRule, PatienceExit, entropy

CHOSEN_THRESHOLD = "early_exit.json"
# At most this many entropy thresholds are tried (evenly spread over the slice's sorted off-ramp entropies).
MAX_ENTROPY_CANDIDATES = 400


def replay_exits(rule: ExitRule, every_exit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and 1-based exit layer [N] of each row under `rule`, from the logits of every exit
    [L, N, C] (the last being the head): the rule's decisions, off-ramp by off-ramp, as in early exit."""
    num_layers, rows = every_exit.shape[0], every_exit.shape[1]
    every = every_exit.float().cpu()
    logits = every[-1].clone()
    exit_layer = torch.full((rows,), num_layers, dtype=torch.long)
    if rule.can_exit(num_layers - 1):
        running = torch.ones(rows, dtype=torch.bool)
        state = rule.init_state(rows)
        for j in range(num_layers - 1):
            # The rules decide on the host from lists of rows, as in early exit.
            leave = torch.tensor(rule.decide(every[j].tolist(), state)) & running
            logits[leave] = every[j][leave]
            exit_layer[leave] = j + 1
            running &= ~leave
    return logits, exit_layer


def candidate_rules(kind: str, every_exit: torch.Tensor, regression: bool = False,
                    regression_threshold: float = 0.1) -> list[ExitRule]:
    """The rules worth trying, from never exiting to the most eager: entropy thresholds just above the
    off-ramp entropies seen on the slice (each changes some row's exit), or every patience that can fire."""
    num_off_ramps = every_exit.shape[0] - 1
    if kind == "patience":
        return [PatienceExit(p, regression, regression_threshold) for p in range(num_off_ramps - 1, 0, -1)]
    if kind != "entropy" or regression:
        raise UserError(f"no {kind} threshold for {'a regression' if regression else 'this'} task "
                        "(entropy needs classes; patience works on both)")
    values = np.unique(entropy(every_exit[:-1].float().cpu()))
    if len(values) > MAX_ENTROPY_CANDIDATES:
        values = values[np.linspace(0, len(values) - 1, MAX_ENTROPY_CANDIDATES).round().astype(int)]
    # entropy(x) < t exits: the next double above a value lets the rows at exactly that value leave.
    return [EntropyExit(float(np.nextafter(v, np.inf))) for v in values if v >= 0]


def choose_rule(kind: str, every_exit: torch.Tensor, metric: Callable[[torch.Tensor], float], max_drop: float,
                regression: bool = False, regression_threshold: float = 0.1) -> dict[str, Any]:
    """The most aggressive `kind` rule whose metric (`metric(logits)` on the calibration rows) is at least the
    full model's minus `max_drop`, with what it measured; the rule that never exits when none is."""
    every_exit = every_exit.float().cpu()
    num_layers = every_exit.shape[0]
    full = float(metric(every_exit[-1]))
    never = EntropyExit(0.0) if kind == "entropy" else PatienceExit(0, regression, regression_threshold)
    best = {"rule": never, "metric": full, "avg_exit_layer": float(num_layers)}
    tried = 0
    for rule in candidate_rules(kind, every_exit, regression, regression_threshold):
        logits, exits = replay_exits(rule, every_exit)
        tried += 1
        avg = float(exits.float().mean())
        if avg >= best["avg_exit_layer"]:
            continue
        value = float(metric(logits))
        if value >= full - max_drop - 1e-12:
            best = {"rule": rule, "metric": value, "avg_exit_layer": avg}
    rule = best["rule"]
    return {"criterion": kind, "threshold": threshold_of(rule), "rule": rule.label,
            "max_metric_drop": max_drop, "calibration_metric": best["metric"], "full_model_metric": full,
            "avg_exit_layer": best["avg_exit_layer"], "num_layers": num_layers,
            "layers_saved_fraction": 1.0 - best["avg_exit_layer"] / num_layers, "candidates_tried": tried,
            "calibration_examples": int(every_exit.shape[1])}


def threshold_of(rule: ExitRule) -> float:
    return rule.threshold if isinstance(rule, EntropyExit) else rule.patience


def save_choice(folder: str, choice: dict[str, Any]) -> str:
    path = os.path.join(folder, CHOSEN_THRESHOLD)
    write_json_atomic(path, choice)
    return path


def load_choice(folder: str) -> dict[str, Any] | None:
    """The threshold chosen for the model in `folder`, or None when it has none."""
    path = os.path.join(folder, CHOSEN_THRESHOLD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            choice = json.load(f)
        if choice["criterion"] not in ("entropy", "patience"):
            raise ValueError(f"criterion {choice['criterion']!r}")
        float(choice["threshold"])
        return choice
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is damaged ({err}); delete it or give a threshold "
                        "(--early_exit_entropy / --patience)") from None


def rule_from_choice(choice: dict[str, Any], regression: bool, regression_threshold: float) -> ExitRule:
    if choice["criterion"] == "entropy":
        return EntropyExit(float(choice["threshold"]))
    return PatienceExit(int(choice["threshold"]), regression, regression_threshold)
