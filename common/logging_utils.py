"""One rank-aware logger setup: INFO on rank 0, warnings only on the other ranks."""

from __future__ import annotations

import logging
import warnings

import transformers

from common.distributed import DistContext


def setup_logging(ctx: DistContext, verbose: bool = False) -> None:
    level = logging.INFO if ctx.is_main else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if ctx.is_distributed:
        fmt = f"[rank {ctx.rank}] " + fmt
    # basicConfig leaves existing handlers alone (a caller's, pytest's); the level is ours to set either way.
    logging.basicConfig(format=fmt, datefmt="%H:%M:%S", level=level)
    logging.getLogger().setLevel(level)
    transformers.utils.logging.set_verbosity_info() if verbose and ctx.is_main else \
        transformers.utils.logging.set_verbosity_error()
    # tensorboardX and torch.distributed are chatty about things a user cannot act on.
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
