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

--shrink also removes the attention heads and FFN neurons that pruning emptied (structured pruning,
--pruning_structure heads_neurons, empties whole ones; see common/models/shrink.py): the target folder holds a
physically smaller model, with its per-layer widths in shrink_layout.json, that loads with
`common.models.shrink.load_shrunk_model(folder)`. Its outputs are checked against the masked model's on a random
batch (largest difference reported; above 1e-4 is an error). A stock (bertarized) folder can be shrunk too.

    python scripts/bertarize.py --model_name_or_path runs/squad-heads --target_model_path runs/squad-shrunk --shrink
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from typing import Any, Sequence

from common.args import answering_help, script_parser
from common.errors import UserError, exit_with, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    import torch

    from common.models import masked
    from common.models import shrink as shrink_lib
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
    parser.add_argument("--shrink", action="store_true",
                        help="Remove the emptied heads and neurons: a smaller model (+ shrink_layout.json).")
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


def reference_batch(model: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (two rows, the second one padded) to compare a model before and after shrinking."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    length = min(16, getattr(config, "max_position_embeddings", 16) - 2)
    ids = torch.randint(5, config.vocab_size, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def model_outputs(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def shrink(model: Any, reference: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Remove the emptied heads and neurons (in place) and check the outputs did not move."""
    layout = shrink_lib.shrink_model(model)
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, model_outputs(model, batch)))
    if diff > 1e-4:
        raise UserError(f"the shrunk model's outputs differ from the pruned model's by {diff:.3g}; not saved")
    kept = shrink_lib.layout_summary(layout)
    for i, layer in enumerate(kept):
        print(f"layer {i}: {layer['heads']}/{layer['heads_total']} heads, {layer['neurons']}/{layer['neurons_total']} "
              "neurons")
    stock = ("loads it too" if layout["stock_loadable"] else
             "cannot load it (heads removed, or FFN widths that differ by layer): use load_shrunk_model")
    print(f"Shrunk: largest output difference to the pruned model {diff:.2e}; stock from_pretrained {stock}")
    return {"layout": layout, "kept": kept, "max_output_difference": diff}


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
        if args.shrink:
            raise UserError("--compact_path stores the zeros of an unshrunk model sparsely; with --shrink the "
                            "emptied heads and neurons are removed instead: give one of the two")
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
    elif args.shrink and not masked.is_masked_folder(source):
        if shrink_lib.is_shrunk_folder(source):
            raise UserError(f"{source} is already shrunk")
        model = masked.build_model(masked.stock_config(config_dict))
        masked.load_state_into(model, masked.read_state_dict(source), source)
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
        if args.shrink:
            batch = reference_batch(model)
            reference = model_outputs(model, batch)
        masked.fold_masks(model)
        print(f"Pruning method {state.method}, threshold {report['pruning']['threshold']:g}: "
              f"{100 * summary['encoder']['fraction']:.2f}% of the encoder's weights remain "
              f"({summary['encoder']['kept']:,} of {summary['encoder']['total']:,})")

    if args.shrink:
        if "pruning" not in report:
            batch = reference_batch(model)
            reference = model_outputs(model, batch)
        report["shrink"] = shrink(model, reference, batch)

    def save(folder: str) -> None:
        if args.shrink:
            shrink_lib.save_shrunk_model(model, report["shrink"]["layout"], folder)
        else:
            model.save_pretrained(folder)
        copy_tokenizer(source, folder)

    # A plain save over a folder once shrunk must not keep its layout (it would describe the old widths).
    save_folder_atomic(save, target, obsolete=(shrink_lib.LAYOUT_FILE,))
    report["dense_bytes"] = masked.weights_bytes(target)
    print(f"Saved a {'shrunk' if args.shrink else 'standard'} checkpoint to {target} "
          f"({report['dense_bytes'] / 1e6:.2f} MB of weights)")

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
    exit_with(run_cli(main))
