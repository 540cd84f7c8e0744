"""Argparse groups shared by the scripts (flag names as in the original research scripts) and validation
that gathers every problem into one error."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Mapping, Sequence

from common.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where the help text already says it, where there is none to show
    (None), and on on/off switches (a store_false twin would show the other flag's default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", argparse.SUPPRESS) or \
                isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def answering_help(module_name: str, argv: Sequence[str] | None = None) -> bool:
    """True when a script runs as a program only to print its --help: it then skips its heavy imports (torch and
    transformers take seconds), since argparse answers -h / --help and exits before anything uses them. Always
    False on import (tests import the scripts as modules)."""
    if module_name != "__main__":
        return False
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:  # after "--" every word is a value, so "-h" there is no request for help
        args = args[:args.index("--")]
    return "-h" in args or "--help" in args


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser: its description is the first paragraph of the module docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], formatter_class=HelpFormatter)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model_type", default=None, type=str.lower,
                   help="Model family (checked against the checkpoint's config; inferred when left out).")
    g.add_argument("--model_name_or_path", default=None,
                   help="Folder (or hub name) of the pretrained model. Left out together with --data_dir: "
                        "the built-in demo model and data.")
    g.add_argument("--config_name", default="", help="Config name or path, if not the model's.")
    g.add_argument("--tokenizer_name", default="", help="Tokenizer name or path, if not the model's.")
    g.add_argument("--cache_dir", default="", help="Where downloaded models are stored.")
    g.add_argument("--do_lower_case", action="store_true", help="Lower-case the input (uncased models).")


def add_disable_tqdm_arg(group: Any) -> None:
    """--disable_tqdm (transformers' name), which script_context applies through common.progress.configure."""
    group.add_argument("--disable_tqdm", action="store_true",
                       help="No progress bars and no progress log lines (TQDM_DISABLE=1 does the same). Outside a "
                            "terminal, progress is a log line every 30 s instead of a bar.")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", default=None, help="Where checkpoints, the final model and results go.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Train into an output folder that already holds files.")
    g.add_argument("--overwrite_cache", action="store_true", help="Rebuild the cached features.")
    g.add_argument("--per_gpu_train_batch_size", "--per_device_train_batch_size", default=8, type=int,
                   help="Batch size per device (GPU or CPU process) for training.")
    g.add_argument("--per_gpu_eval_batch_size", "--per_device_eval_batch_size", default=8, type=int,
                   help="Batch size per device for evaluation.")
    g.add_argument("--gradient_accumulation_steps", default=1, type=int,
                   help="Micro-batches to accumulate before each optimizer step.")
    g.add_argument("--learning_rate", default=5e-5, type=float, help="Peak learning rate for AdamW.")
    g.add_argument("--weight_decay", default=0.0, type=float,
                   help="AdamW weight decay (0.0 as in the original; biases and LayerNorm never decay).")
    g.add_argument("--adam_epsilon", default=1e-8, type=float, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", default=1.0, type=float, help="Gradient clipping norm (0: no clipping).")
    g.add_argument("--num_train_epochs", default=3.0, type=float, help="Training epochs (may be fractional).")
    g.add_argument("--max_steps", default=-1, type=int, help="If > 0: optimizer steps to take (overrides epochs).")
    g.add_argument("--warmup_steps", default=0, type=int, help="Linear warmup steps.")
    g.add_argument("--logging_steps", default=50, type=int, help="Log loss and learning rate every N steps.")
    add_disable_tqdm_arg(g)
    g.add_argument("--save_steps", default=500, type=int, help="Save a checkpoint every N steps (0: never).")
    add_convention_args(g)
    g.add_argument("--max_train_samples", default=None, type=int,
                   help="Train on the first N examples only (after caching: the cache stays the full file's).")
    g.add_argument("--max_eval_samples", default=None, type=int,
                   help="Evaluate on the first N examples only (after caching).")
    g.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|latest",
                   help="Continue a run from a checkpoint folder, or from the newest one in --output_dir.")
    g.add_argument("--seed", default=42, type=int, help="Random seed.")
    g.add_argument("--dynamic_padding", dest="dynamic_padding", action="store_true", default=True,
                   help="Trim each batch to its longest sequence (the default).")
    g.add_argument("--no_dynamic_padding", dest="dynamic_padding", action="store_false",
                   help="Pad every batch to --max_seq_length, as the original scripts did.")
    g.add_argument("--fp16", action="store_true", help="Mixed precision (float16 + grad scaler, CUDA) via torch.amp.")
    g.add_argument("--fp16_opt_level", default=None,
                   help="Accepted for old command lines; apex opt levels do not exist in torch.amp (warned).")
    g.add_argument("--bf16", action="store_true", help="Mixed precision with bfloat16 via torch.amp.")


def add_convention_args(g: Any) -> None:
    """--save_total_limit and --report_to, the Hugging Face examples' spellings (every script has them)."""
    g.add_argument("--save_total_limit", default=0, type=int,
                   help="Keep only the newest N checkpoints in the output folder, deleting older ones (0: all).")
    g.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "none"),
                   help="Where training is logged besides log_history.jsonl: TensorBoard events under runs/, "
                        "or none.")


def add_run_args(parser: argparse.ArgumentParser, title: str, train_help: str, eval_help: str,
                 during_help: str, predict_help: str | None = None) -> argparse._ArgumentGroup:
    """--do_train, --do_eval, --evaluate_during_training and --eval_all_checkpoints (and --do_predict, given its
    help), in a group of their own that the script may add to."""
    g = parser.add_argument_group(title)
    g.add_argument("--do_train", action="store_true", help=train_help)
    g.add_argument("--do_eval", action="store_true", help=eval_help)
    if predict_help is not None:
        g.add_argument("--do_predict", action="store_true", help=predict_help)
    g.add_argument("--evaluate_during_training", action="store_true", help=during_help)
    g.add_argument("--eval_all_checkpoints", action="store_true",
                   help="Also evaluate every checkpoint-* folder in --output_dir.")
    return g


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--no_cuda", action="store_true", help="Run on CPU even where CUDA is available.")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="Set by the old torch.distributed.launch; torchrun uses LOCAL_RANK instead.")


def check_training_args(args: argparse.Namespace) -> list[str]:
    """Problems with the shared training flags, as messages naming the flag and the fix."""
    problems = []
    for name in ("per_gpu_train_batch_size", "per_gpu_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        problems.append(f"--learning_rate must be a positive number (got {args.learning_rate})")
    if args.num_train_epochs <= 0 and args.max_steps <= 0:
        problems.append("--num_train_epochs must be positive (or give --max_steps)")
    for name in ("weight_decay", "max_grad_norm", "warmup_steps", "logging_steps", "save_steps", "save_total_limit"):
        if getattr(args, name, 0) < 0:
            problems.append(f"--{name} cannot be negative (got {getattr(args, name)})")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(args, name)})")
    return problems


def check_precision_flags(fp16: bool, bf16: bool, device: Any) -> list[str]:
    """Problems with --fp16/--bf16 on this device (a torch.device)."""
    problems = []
    if fp16 and bf16:
        problems.append("--fp16 and --bf16 exclude each other: pick one")
    if fp16 and device.type != "cuda":
        problems.append("--fp16 needs a CUDA GPU (the grad scaler is CUDA-only here); use --bf16 on CPU")
    return problems


def check_run_args(args: argparse.Namespace, device: Any) -> list[str]:
    """Problems with the flags the fine-tuning scripts share: training values, precision, something to do,
    and a model and its data given together (or neither, for the built-in demo)."""
    problems = check_training_args(args) + check_precision_flags(args.fp16, args.bf16, device)
    if not args.do_train and not args.do_eval and not getattr(args, "do_predict", False):
        problems.append("nothing to do: add --do_train, --do_eval and/or --do_predict")
    if (args.model_name_or_path is None) != (args.data_dir is None):
        problems.append("give both --model_name_or_path and --data_dir (or neither, for the built-in demo)")
    return problems


def check_output_dir(output_dir: str, will_train: bool, overwrite: bool, resume: str | None) -> list[str]:
    """Problems with the output folder of a run (as messages naming the fix)."""
    if will_train and os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite and not resume:
        return [f"output folder {output_dir} already holds files; add --overwrite_output_dir to train into it, "
                "--resume_from_checkpoint latest to continue, or choose another --output_dir"]
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir {output_dir} is a file, not a folder"]
    return []


def flags_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags on the command line, even those given their default value (parsing into a
    namespace prefilled with a marker: argparse fills in defaults only where an attribute is missing)."""
    unset = object()
    names = vars(parser.parse_args([]))
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in names}))
    return {name for name, value in vars(probe).items() if value is not unset}


def parse_with_builtin_defaults(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                                builtin_defaults: Mapping[str, Any],
                                inputs: Sequence[str] = ("model_name_or_path", "data_dir")) -> argparse.Namespace:
    """Parse; when none of the `inputs` flags is given (the built-in demo), the flags the user did not type take
    values suited to the demo's tiny model trained from scratch (a typed flag keeps its value, even one equal
    to the stock default)."""
    args = parser.parse_args(argv)
    if all(getattr(args, name) is None for name in inputs):
        given = flags_given(parser, argv)
        for name, value in builtin_defaults.items():
            if name not in given:
                setattr(args, name, value)
    return args


def raise_if_problems(problems: Sequence[str]) -> None:
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError("; ".join(problems))
