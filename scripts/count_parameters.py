#!/usr/bin/env python
"""Count the remaining (non-pruned) weights of the encoder, per matrix, per layer and in total, for a
fine-pruned (masked) model, whatever its pruning method, or for a bertarized checkpoint (non-zero weights).
Sparsity and remaining weights are two views of one number: sparsity % = 100 - remaining %.

    python scripts/count_parameters.py --serialization_dir runs/squad          # a masked run
    python scripts/count_parameters.py --serialization_dir runs/bertarized_squad
    python scripts/count_parameters.py --serialization_dir runs/squad --threshold 0.1 --json counts.json

For a masked folder the masks are rebuilt from the recorded method and threshold (--threshold replaces the
threshold; the original's masked_bert folders need it). Two totals are printed: the prunable matrices alone,
and the whole encoder with its biases and LayerNorm weights counted as remaining (the original's "global"
figure).

Structured runs (--pruning_structure heads_neurons or blocks) and shrunk folders (bertarize.py --shrink) also
get the attention heads and FFN neurons kept per layer; a shrunk folder's remaining weights are counted against
the dense model of its config.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any, Sequence

from common.args import answering_help, script_parser
from common.errors import UserError, exit_with, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch

    from common.models import masked, shrink
    from common.io import write_json_atomic


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--serialization_dir", "--model_name_or_path", dest="serialization_dir", required=True,
                        help="Folder of a fine-pruned (masked) model or of a bertarized checkpoint.")
    parser.add_argument("--pruning_method", default=None,
                        help="Checked against the method a masked folder records.")
    parser.add_argument("--threshold", default=None, type=float,
                        help="Replace the recorded threshold of a masked folder.")
    parser.add_argument("--json", default=None, help="Also write the counts to this JSON file.")
    return parser.parse_args(argv)


def count_masked(folder: str, args: argparse.Namespace) -> tuple[dict[str, tuple[int, int]], Any, str, dict]:
    """(kept, total) of each masked matrix, the encoder's other parameters, the layer prefix and the state."""
    state = masked.masked_state_of(masked.read_config_json(folder))
    if args.pruning_method is not None and args.pruning_method != state.method:
        raise UserError(f"--pruning_method {args.pruning_method} does not match {folder}, which was pruned with "
                        f"{state.method}")
    problem = None if args.threshold is None else masked.threshold_problem(state.method, args.threshold)
    if problem:
        raise UserError(problem)
    model = masked.load_masked_model(folder, threshold=args.threshold)
    prefix = masked.encoder_layers_prefix(model)
    counts = masked.remaining_weights(model)
    matrices = {f"{n}.weight" for n in counts}
    others = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith(prefix + ".") and n not in matrices and not n.endswith("mask_scores"))
    state = masked.pruning_state(model)
    units = shrink.kept_units(model) if state.structure != "weights" else None
    return counts, others, prefix, state.to_json(), units


def count_shrunk(folder: str) -> tuple[dict[str, tuple[int, int]], int, str, list[dict[str, int]]]:
    """(non-zero, dense total) of each encoder matrix of a shrunk folder, and the heads and neurons it keeps."""
    model = shrink.load_shrunk_model(folder)
    dense_config = copy.deepcopy(model.config)  # a stock-loadable shrunk config states the shrunk FFN width
    dense_config.intermediate_size = shrink.read_layout(folder)["intermediate_size"]
    with torch.device("meta"):  # the dense model's shapes
        full = masked.build_model(dense_config)
    prefix = masked.encoder_layers_prefix(model)
    full_modules = dict(full.named_modules())
    counts, others = {}, 0
    for name, module in model.named_modules():
        if name.startswith(prefix + ".") and isinstance(module, torch.nn.Linear):
            counts[name] = (int((module.weight != 0).sum()), full_modules[name].weight.numel())
    for name, full_module in full_modules.items():  # the matrices of removed self-attentions
        if name.startswith(prefix + ".") and isinstance(full_module, torch.nn.Linear) and name not in counts:
            counts[name] = (0, full_module.weight.numel())
    counts = dict(sorted(counts.items(), key=lambda item: list(full_modules).index(item[0])))
    matrices = {f"{n}.weight" for n in counts}
    others = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + ".") and n not in matrices)
    return counts, others, prefix, shrink.layout_summary(shrink.read_layout(folder))


def count_dense(folder: str) -> tuple[dict[str, tuple[int, int]], int, str]:
    """(non-zero, total) of each encoder matrix of a standard checkpoint, read from its weight files."""
    config_dict = masked.read_config_json(folder)
    with torch.device("meta"):  # only the module names and shapes are needed
        model = masked.build_model(masked.stock_config(config_dict))
    prefix = masked.encoder_layers_prefix(model)
    base = getattr(model, "base_model_prefix", "")
    linear = {f"{n}.weight" for n, m in model.named_modules()
              if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)}
    state = masked.read_state_dict(folder)
    by_name = {}
    for key, tensor in state.items():
        # A QA checkpoint names `bert.encoder...`, a bare encoder `encoder...`: match either.
        full = key if key in linear or key.startswith(base + ".") else f"{base}.{key}"
        by_name[full] = tensor
    missing = sorted(linear - set(by_name))
    if missing:
        raise UserError(f"{folder} does not hold the encoder weights of its config (missing {missing[0]})")
    counts = {n[: -len(".weight")]: (int((by_name[n] != 0).sum()), by_name[n].numel()) for n in sorted(linear)}
    others = sum(t.numel() for n, t in by_name.items()
                 if n.startswith(prefix + ".") and n not in linear and t.is_floating_point())
    return counts, others, prefix


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    folder = args.serialization_dir
    if not os.path.isdir(folder):
        raise UserError(f"--serialization_dir {folder} is not a folder; give a fine-pruned or bertarized model")
    units = None
    if masked.is_masked_folder(folder):
        counts, others, prefix, pruning, units = count_masked(folder, args)
    elif shrink.is_shrunk_folder(folder):
        counts, others, prefix, units = count_shrunk(folder)
        pruning = None
    else:
        if args.threshold is not None or args.pruning_method is not None:
            raise UserError(f"{folder} holds a standard (bertarized) checkpoint: it has no masks, so "
                            "--threshold/--pruning_method do not apply; its zero weights are counted")
        counts, others, prefix = count_dense(folder)
        pruning = None
    summary = masked.summarize_remaining(counts, prefix)
    kept, total = summary["encoder"]["kept"], summary["encoder"]["total"]
    result = {"folder": folder, "pruning": pruning, **summary, "units": units,
              "encoder_all_parameters": {"kept": kept + others, "total": total + others,
                                         "fraction": (kept + others) / (total + others)}}
    width = max(len(n) for n in counts) + 2
    print("name".ljust(width), "remaining %".rjust(12), "remaining".rjust(12), "total".rjust(12))
    for name, (k, t) in counts.items():
        print(name.ljust(width), f"{100 * k / t:12.3f}", f"{k:12,d}", f"{t:12,d}")
    print()
    for layer, info in summary["layers"].items():
        print(f"layer {layer}".ljust(width), f"{100 * info['fraction']:12.3f}", f"{info['kept']:12,d}",
              f"{info['total']:12,d}")
    if units:
        print()
        for i, u in enumerate(units):
            print(f"layer {i}".ljust(width), f"{u['heads']:4d} of {u['heads_total']} heads, "
                  f"{u['neurons']:6d} of {u['neurons_total']} neurons")
    print()
    print(f"Remaining weights of the encoder's matrices: {100 * summary['encoder']['fraction']:.3f}% "
          f"({kept:,} of {total:,})")
    print(f"Remaining Weights (global) %: {100 * result['encoder_all_parameters']['fraction']:.3f} "
          f"(biases and LayerNorm of the encoder counted as remaining)")
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    exit_with(run_cli(main))
