#!/usr/bin/env python
"""Tokenize a text corpus once, before distillation: one sequence per line -> token ids in a binarized file.

    python scripts/binarize_data.py --file_path data/dump.txt --tokenizer_type bert \\
        --tokenizer_name bert-base-uncased --dump_file data/binarized_text
        # -> data/binarized_text.bert-base-uncased.bin

Each line (blank lines are skipped) becomes [CLS] ... [SEP] for BERT/RoBERTa tokenizers and
<|endoftext|> ... <|endoftext|> for GPT-2, tokenized by the fast (Rust) tokenizer in batches of --batch_lines.
The file is streamed: memory stays flat however large the corpus, and the output appears (renamed into place)
only when complete. It stores a flat array of ids in the smallest safe integer type (uint16 up to 65,535
vocabulary entries, int32 above) plus offsets, with the tokenizer's vocabulary fingerprint; see
common/data/lm.py for the format. Unlike the original, the sequences keep the text's order (training shuffles
every epoch anyway) and nothing is pickled.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from typing import Any, Sequence

from common.args import answering_help, script_parser
from common.errors import UserError, exit_with, run_cli
from common.models.families import TOKENIZER_TYPES

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    from common.data import lm
    from common.loaders import load_tokenizer

logger = logging.getLogger("binarize_data")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--file_path", default="data/dump.txt", help="The text: one sequence per line, UTF-8.")
    parser.add_argument("--tokenizer_type", default=None, choices=sorted(TOKENIZER_TYPES),
                        help="Picks the tokens around each line: [CLS]/[SEP] (bert, distilbert, roberta) or "
                             "BOS/EOS (gpt2). Default: [CLS]/[SEP] when the tokenizer has them.")
    parser.add_argument("--tokenizer_name", default="bert-base-uncased", help="Tokenizer folder or hub name.")
    parser.add_argument("--dump_file", default="data/dump",
                        help="Output prefix: writes <dump_file>.<tokenizer name>.bin (a path ending in .bin is "
                             "used as it is).")
    parser.add_argument("--batch_lines", default=2000, type=int, help="Lines tokenized per batch.")
    parser.add_argument("--do_lower_case", action="store_true",
                        help="Lower-case the text (for an uncased vocabulary whose tokenizer does not already).")
    return parser.parse_args(argv)


def output_path(dump_file: str, tokenizer_name: str) -> str:
    if dump_file.endswith(".bin"):
        return dump_file
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(os.path.normpath(tokenizer_name))).strip("-")
    return f"{dump_file}.{tag or 'tokenizer'}.bin"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not os.path.isfile(args.file_path):
        raise UserError(f"--file_path {args.file_path}: no such file")
    tokenizer = load_tokenizer(args.tokenizer_name, do_lower_case=args.do_lower_case, needs="binarizing needs one")
    out = output_path(args.dump_file, args.tokenizer_name)
    logger.info("Binarizing %s with %s into %s", args.file_path, args.tokenizer_name, out)
    start = time.perf_counter()
    footer = lm.binarize_file(args.file_path, tokenizer, out, tokenizer_type=args.tokenizer_type,
                              batch_lines=args.batch_lines)
    seconds = time.perf_counter() - start
    source = footer["source"]
    memory = lm.approx_rss_mb()
    summary = {"output": out, "lines": source["lines"], "blank_lines_skipped": source["blank_lines_skipped"],
               "sequences": footer["num_sequences"], "tokens": footer["num_tokens"], "dtype": footer["dtype"],
               "bytes": os.path.getsize(out), "seconds": seconds,
               "lines_per_second": source["lines"] / max(seconds, 1e-9), "peak_rss_mb": memory.get("peak_rss_mb")}
    logger.info("%d lines (%d blank, skipped) -> %d sequences, %d tokens as %s in %.1fs (%.0f lines/s); peak "
                "memory %.0f MB; wrote %s", summary["lines"], summary["blank_lines_skipped"], summary["sequences"],
                summary["tokens"], summary["dtype"], seconds, summary["lines_per_second"],
                summary["peak_rss_mb"] or float("nan"), out)
    return summary


if __name__ == "__main__":
    exit_with(run_cli(main))
