#!/usr/bin/env python
"""Initialize a distillation student from chosen layers of its teacher (DistilBERT's "initialize from the
teacher by taking one layer out of two"), written as a checkpoint that `from_pretrained` loads.

    python scripts/extract_student.py --model_name bert-base-uncased --dump_checkpoint students/distilbert-init
        # BERT -> DistilBERT, teacher layers 0 2 4 7 9 11 (the original's choice)
    python scripts/extract_student.py --model_name bert-base-uncased --student_type bert --num_layers 4 \\
        --dump_checkpoint students/bert-4l
    python scripts/extract_student.py --model_type roberta --model_name roberta-base --dump_checkpoint students/dr
    python scripts/extract_student.py --model_type gpt2 --model_name gpt2 --layers 0 2 4 7 9 11 \\
        --dump_checkpoint students/distilgpt2-init

Then: scripts/distill.py --student_pretrained_weights students/distilbert-init ...

Copied: the embeddings, the chosen layers (in the order given), and the LM head's output projection and bias.
The head's transform (dense + LayerNorm before the projection) is copied only with --vocab_transform, as in
the original; otherwise it starts fresh. BERT -> DistilBERT also folds BERT's token-type-0 embedding into the
position embeddings (DistilBERT has no token types), so the student embeds a single-segment input exactly as
the teacher does. The folder also holds the teacher's tokenizer and extraction.json (what was copied).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Sequence

from common.args import answering_help, script_parser
from common.errors import UserError, exit_with, run_cli
from common.models.families import STUDENT_TYPES, STUDENTS_OF, TEACHER_TYPES

if not answering_help(__name__):  # -h/--help answers at once: argparse needs none of what follows
    from transformers import AutoTokenizer

    from common.models.student import choose_layers, extract, load_teacher, num_layers, save_student

logger = logging.getLogger("extract_student")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--model_type", default=None, choices=sorted(TEACHER_TYPES),
                        help="Teacher family (checked against its config; inferred when left out).")
    parser.add_argument("--model_name", required=True, help="Teacher folder (or hub name), with its LM head.")
    parser.add_argument("--student_type", default=None, choices=STUDENT_TYPES,
                        help="Student architecture: distilbert or bert for a BERT teacher (default distilbert); "
                             "the teacher's own for RoBERTa and GPT-2.")
    parser.add_argument("--layers", nargs="+", type=int, default=None,
                        help="Teacher layers to copy, in student order (default: --num_layers evenly spread, "
                             "first and last included; 0 2 4 7 9 11 for 12 -> 6).")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="Student layers when --layers is not given (default: half the teacher's).")
    parser.add_argument("--dump_checkpoint", "--output_dir", dest="dump_checkpoint", required=True,
                        help="Folder to write the student into (config, weights, tokenizer).")
    parser.add_argument("--vocab_transform", action="store_true",
                        help="Also copy the LM head's transform (dense + LayerNorm before the projection).")
    parser.add_argument("--cache_dir", default=None, help="Where downloaded models are stored.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if os.path.exists(args.dump_checkpoint) and not os.path.isdir(args.dump_checkpoint):
        raise UserError(f"--dump_checkpoint {args.dump_checkpoint} is a file: the student is a folder (config, "
                        "weights, tokenizer); name a folder")
    teacher = load_teacher(args.model_name, args.model_type, args.cache_dir)
    teacher_type = teacher.config.model_type
    student_type = args.student_type or STUDENTS_OF[teacher_type][0]
    layers = choose_layers(num_layers(teacher.config), args.layers, args.num_layers)
    student, report = extract(teacher, student_type, layers, args.vocab_transform)
    report["teacher"] = args.model_name
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name, cache_dir=args.cache_dir)
    except (OSError, ValueError):
        logger.warning("%s has no tokenizer; the student folder will hold none", args.model_name)
    save_student(args.dump_checkpoint, student, tokenizer, report)
    logger.info("Student %s with teacher layers %s (%d tensors copied, %d fresh; %.1fM of the teacher's %.1fM "
                "parameters) written to %s", student_type, layers, report["tensors_copied"],
                len(report["fresh_tensors"]), report["student_parameters"] / 1e6,
                report["teacher_parameters"] / 1e6, args.dump_checkpoint)
    return report


if __name__ == "__main__":
    exit_with(run_cli(main))
