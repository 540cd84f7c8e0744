#!/usr/bin/env python
"""Fold a fine-pruned model's masks into its weights ("bertarize"): the result is a standard transformers
checkpoint (`AutoModelForQuestionAnswering.from_pretrained` loads it) whose outputs equal the masked model's in
evaluation mode, with the pruned weights stored as zeros.

    python scripts/bertarize.py --model_name_or_path runs/squad                   # -> runs/bertarized_squad
    python scripts/bertarize.py --model_name_or_path runs/squad --target_model_path runs/squad-pruned \\
        --compact_path runs/squad-compact                                          # also a CSR copy
    python scripts/bertarize.py --model_name_or_path runs/squad-compact --target_model_path runs/squad-dense

The pruning method and threshold are read from the masked folder (config.json, as run_squad_pruning.py writes
it); --pruning_method is checked against it and --threshold replaces it. Folders of the original masked_bert
code (config model_type "masked_bert", pytorch_model.bin) need --threshold, as there.

--compact_path also stores the pruned matrices sparsely (CSR: non-zero values, int16 column indices, row
pointers; lossless) in <compact_path>/model.sparse.safetensors with the config and tokenizer, and reports the
size on disk against the dense checkpoint. Giving such a compact folder as --model_name_or_path expands it back
into a standard checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Any, Sequence

from common.args import answering_help, script_parser
from common.errors import UserError, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    from common.models import masked
    from common.io import save_folder_atomic, write_json_atomic

logger = logging.getLogger("bertarize")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "sentencepiece.bpe.model", "spiece.model")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--model_name_or_path", required=True,
                        help="Folder of the fine-pruned (masked) model, or a compact folder to expand.")
    parser.add_argument("--target_model_path", default=None,
                        help="Where the standard checkpoint goes (default: bertarized_<name> beside the input).")
    parser.add_argument("--pruning_method", default=None,
                        help="Checked against the method the folder records (needed by the original's flags only).")
    parser.add_argument("--threshold", default=None, type=float,
                        help="Replace the recorded threshold (topK/magnitude: fraction of weights kept; "
                             "sigmoied_threshold/threshold: score threshold; unused by l0).")
    parser.add_argument("--compact_path", default=None,
                        help="Also write a compact (CSR, lossless) copy of the pruned model into this folder.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Write into a target folder that already holds files.")
    return parser.parse_args(argv)


def folder_bytes(path: str, names: Sequence[str] | None = None) -> int:
    """Bytes on disk of the files in a folder (or of the named ones)."""
    files = names if names is not None else [f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))]
    return sum(os.path.getsize(os.path.join(path, f)) for f in files if os.path.isfile(os.path.join(path, f)))


def copy_tokenizer(source: str, dest: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(dest, name))


def check_target(path: str, overwrite: bool, flag: str) -> None:
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"{flag} {path} already holds files; add --overwrite_output_dir or choose another folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")


def check_threshold(method: str, threshold: float | None) -> None:
    problem = None if threshold is None else masked.threshold_problem(method, threshold)
    if problem:
        raise UserError(problem)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    source = args.model_name_or_path.rstrip("/") or "/"
    if not os.path.isdir(source):
        raise UserError(f"--model_name_or_path {source} is not a folder; give the output folder of "
                        "run_squad_pruning.py")
    target = args.target_model_path or os.path.join(os.path.dirname(os.path.abspath(source)),
                                                    f"bertarized_{os.path.basename(os.path.abspath(source))}")
    check_target(target, args.overwrite_output_dir, "--target_model_path")
    if args.compact_path:
        check_target(args.compact_path, args.overwrite_output_dir, "--compact_path")
    config_dict = masked.read_config_json(source)
    report: dict[str, Any] = {"source": source, "target": target}

    if os.path.isfile(os.path.join(source, masked.COMPACT_FILE)):
        # A compact folder: expand it back into a standard checkpoint.
        if args.compact_path:
            raise UserError(f"{source} is already a compact folder; drop --compact_path to expand it")
        model = masked.build_model(masked.stock_config(config_dict))
        state = masked.load_compact_state_dict(os.path.join(source, masked.COMPACT_FILE))
        masked.load_state_into(model, state, source)
        report["expanded_from_compact"] = True
    else:
        state = masked.masked_state_of(config_dict)
        if state is None:
            raise UserError(f"{source} holds no masked model (its config.json records no pruning): give the "
                            "output folder of run_squad_pruning.py (a --model_type masked_* run)")
        if args.pruning_method is not None and args.pruning_method != state.method:
            raise UserError(f"--pruning_method {args.pruning_method} does not match {source}, which was pruned "
                            f"with {state.method}")
        check_threshold(state.method, args.threshold)
        model = masked.load_masked_model(source, threshold=args.threshold)
        prefix = masked.encoder_layers_prefix(model)
        summary = masked.summarize_remaining(masked.remaining_weights(model), prefix)
        sparse_names = [f"{name}.weight" for name in masked.masked_modules(model)]
        report.update(pruning=masked.pruning_state(model).to_json(), remaining=summary["encoder"],
                      remaining_layers=summary["layers"])
        masked.fold_masks(model)
        print(f"Pruning method {state.method}, threshold {report['pruning']['threshold']:g}: "
              f"{100 * summary['encoder']['fraction']:.2f}% of the encoder's weights remain "
              f"({summary['encoder']['kept']:,} of {summary['encoder']['total']:,})")

    def save(folder: str) -> None:
        model.save_pretrained(folder)
        copy_tokenizer(source, folder)

    save_folder_atomic(save, target)
    report["dense_bytes"] = masked.weights_bytes(target)
    print(f"Saved a standard checkpoint to {target} ({report['dense_bytes'] / 1e6:.2f} MB of weights)")

    if args.compact_path and not report.get("expanded_from_compact"):
        compact = args.compact_path

        def save_compact(folder: str) -> None:
            stats = masked.save_compact(model.state_dict(), os.path.join(folder, masked.COMPACT_FILE), sparse_names)
            report["compact_tensor_bytes"] = stats
            model.config.save_pretrained(folder)
            copy_tokenizer(source, folder)

        save_folder_atomic(save_compact, compact)
        report["compact_bytes"] = os.path.getsize(os.path.join(compact, masked.COMPACT_FILE))
        report["compact_ratio"] = report["dense_bytes"] / report["compact_bytes"]
        print(f"Saved a compact copy to {compact}: {report['compact_bytes'] / 1e6:.2f} MB of weights, "
              f"{report['compact_ratio']:.2f}x smaller than the dense checkpoint")
        write_json_atomic(os.path.join(compact, "compact_report.json"), report)
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
