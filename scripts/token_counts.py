#!/usr/bin/env python
"""Count how often each token occurs in a binarized corpus, for the masking smoothing of the MLM objective
(tokens are drawn for prediction with probability proportional to count ** -mlm_smoothing, as in XLM).

    python scripts/token_counts.py --data_file data/binarized_text.bert-base-uncased.bin \\
        --token_counts_dump data/token_counts.bert-base-uncased.safetensors

Writes a safetensors file holding `counts` (int64, one per vocabulary id) and, in its metadata, the vocabulary
fingerprint of the data, so scripts/distill.py refuses counts from another vocabulary. The corpus is read in
chunks from its memory map: memory stays flat.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Sequence

from common.args import answering_help, script_parser
from common.errors import UserError, exit_with, run_cli

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    from common.data import lm

logger = logging.getLogger("token_counts")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--data_file", default="data/dump.bert-base-uncased.bin",
                        help="The binarized corpus (scripts/binarize_data.py).")
    parser.add_argument("--token_counts_dump", default=None,
                        help="Output file (default: the data file with .counts.safetensors instead of .bin).")
    parser.add_argument("--vocab_size", default=None, type=int,
                        help="Length of the counts array (default: the vocabulary the data was binarized with).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    data_file = lm.binarized_path(args.data_file)  # the original's .pickle name -> the .bin beside it
    token_file = lm.TokenFile(data_file, verify=True)
    vocab_size = int(token_file.vocab["vocab_size"])
    if args.vocab_size is not None:
        if args.vocab_size < vocab_size:
            raise UserError(f"--vocab_size {args.vocab_size} is smaller than the {vocab_size} tokens the data was "
                            "binarized with; leave it out")
        vocab_size = args.vocab_size
    out = args.token_counts_dump or os.path.splitext(data_file)[0] + ".counts.safetensors"
    counts = lm.count_tokens(token_file, vocab_size)
    lm.save_token_counts(out, counts, token_file)
    summary = {"output": out, "tokens": int(counts.sum()), "vocab_size": vocab_size,
               "distinct_tokens": int((counts > 0).sum())}
    logger.info("Counted %d tokens (%d distinct of %d) in %s; wrote %s", summary["tokens"],
                summary["distinct_tokens"], vocab_size, data_file, out)
    return summary


if __name__ == "__main__":
    exit_with(run_cli(main))
