"""The prologue every script shares, as one context:

    with script_context(args, argv, resolve_run) as (session, run):   # resolve_run: the script's validation
        ... load -> train(stages, batches, tb_writer=session.writer()) -> evaluate -> write results

It sets up distributed (torchrun env) and rank-aware logging, and always tears both down (and closes the
TensorBoard writer) however the block ends. `start` writes run_args.json (rank 0), starts a fresh
log_history.jsonl for a fresh run, and seeds every rank with seed + rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

from common import progress
from common.checkpoint import find_checkpoints
from common.distributed import DistContext, barrier, cleanup_distributed, main_process_first, setup_distributed
from common.io import remove_path, remove_stale_temporaries, save_folder_atomic, write_json_atomic, writing
from common.logging_utils import setup_logging
from common.training import set_seed

logger = logging.getLogger(__name__)

LOG_FILE = "log_history.jsonl"
TB_FOLDER = "runs"
BOOKKEEPING = {"run_args.json", LOG_FILE, TB_FOLDER}  # what a run writes before it has made anything of value


class Session:
    """What the prologue set up for one run of a script: the process's place (ctx) and its output folder."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.output_dir: str | None = None
        self._before: set[str] | None = None  # what the output folder held before this run wrote into it
        self._writer: Any = None
        self.report_to = "tensorboard"  # --report_to: "none" makes writer() None (log_history.jsonl stays)

    def start(self, output_dir: str, argv: Sequence[str] | None, args: Any, resolved: Any, seed: int,
              fresh: bool) -> None:
        """The run really starts: rank 0 removes temporaries that killed runs left in the output folder, creates
        it, removes a previous run's log and TensorBoard events when this one is fresh (a resumed run appends)
        and writes run_args.json; then every rank is seeded with seed + rank."""
        self.output_dir = output_dir
        self.report_to = getattr(args, "report_to", "tensorboard")
        if self.ctx.is_main:
            for name in remove_stale_temporaries(output_dir):
                logger.warning("Removed %s, left in %s by a run that was stopped while saving", name, output_dir)
            self._before = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else None
            with writing(output_dir):
                os.makedirs(output_dir, exist_ok=True)
                if fresh:  # a fresh run's log and TensorBoard curves start empty, not appended to an old run's
                    remove_path(os.path.join(output_dir, LOG_FILE))
                    remove_path(os.path.join(output_dir, TB_FOLDER))
            write_json_atomic(os.path.join(output_dir, "run_args.json"), {
                "argv": list(sys.argv if argv is None else argv), "args": vars(args),
                "resolved": _plain(resolved), "world_size": self.ctx.world_size, "device": str(self.ctx.device)})
        barrier()
        set_seed(seed + self.ctx.rank)

    def discard_bookkeeping(self) -> None:
        """After a failure: if this run wrote only its bookkeeping into the output folder (run_args.json, an
        empty log, TensorBoard's folder) and nothing of value (no checkpoint, model, result or logged step),
        remove it, so that the corrected command runs into the same folder without --overwrite_output_dir."""
        if not self.ctx.is_main or self.output_dir is None or not os.path.isdir(self.output_dir):
            return
        self.close()
        new = set(os.listdir(self.output_dir)) - (self._before or set())
        log = os.path.join(self.output_dir, LOG_FILE)
        logged = os.path.isfile(log) and os.path.getsize(log) > 0
        if logged or not new <= BOOKKEEPING:
            return
        for name in new:
            remove_path(os.path.join(self.output_dir, name))
        if self._before is None and not os.listdir(self.output_dir):
            os.rmdir(self.output_dir)

    def writer(self) -> Any:
        """The run's TensorBoard writer (under <output_dir>/runs) on rank 0, None on the others and with
        --report_to none; closed when the context ends."""
        if self._writer is None and self.ctx.is_main and self.output_dir is not None and self.report_to != "none":
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=os.path.join(self.output_dir, TB_FOLDER))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(resolved: Any) -> Any:
    if dataclasses.is_dataclass(resolved):
        return {f.name: _plain(getattr(resolved, f.name)) for f in dataclasses.fields(resolved)}
    if isinstance(resolved, Mapping):
        return {k: _plain(v) for k, v in resolved.items()}
    if isinstance(resolved, (list, tuple)):
        return [_plain(v) for v in resolved]
    return resolved if isinstance(resolved, (str, int, float, bool, type(None))) else str(resolved)


@contextlib.contextmanager
def script_context(args: Any, argv: Sequence[str] | None, resolve: Callable[[Any, DistContext], Any]
                   ) -> Iterator[tuple[Session, Any]]:
    """The prologue: distributed + logging set up, the run resolved by the script's `resolve(args, ctx)` (its
    validation: one error naming every problem, before anything is written), then `Session.start` (output
    folder, run_args.json, a fresh log unless resuming, seeds). Yields (session, run); tears everything down
    (writer closed, process group destroyed, progress settings put back) however the block ends. `args` needs
    no_cuda, local_rank and seed (and may have disable_tqdm); the resolved run needs output_dir and resume."""
    session = Session(setup_distributed(args.no_cuda, args.local_rank))
    restore_progress = progress.configure(disable=getattr(args, "disable_tqdm", False), main=session.ctx.is_main)
    try:
        setup_logging(session.ctx)
        run = resolve(args, session.ctx)
        session.start(run.output_dir, argv, args, resolved=run, seed=args.seed, fresh=not run.resume)
        yield session, run
    except Exception:
        session.discard_bookkeeping()
        raise
    finally:
        session.close()
        cleanup_distributed()
        restore_progress()


def build_on_main(ctx: DistContext, build: Callable[[], Any]) -> None:
    """Rank 0 runs `build` (e.g. writes the built-in demo's model and data) while the others wait; they then
    use what it wrote."""
    with main_process_first(ctx):
        if ctx.is_main:
            build()


def evaluate_checkpoints(output_dir: str, evaluate_one: Callable[[str], Any]) -> dict[str, Any]:
    """--eval_all_checkpoints: `evaluate_one(folder)` for every complete checkpoint, oldest first, by name."""
    return {os.path.basename(path): evaluate_one(path) for path in find_checkpoints(output_dir)}


def save_final_model(ctx: DistContext, save: Callable[[str], None], output_dir: str, what: str = "model") -> None:
    """Rank 0 writes the trained model into the output folder (atomically); every rank waits for it, since
    they reload that folder for evaluation."""
    if ctx.is_main:
        save_folder_atomic(save, output_dir)
        logger.info("Saved the trained %s to %s", what, output_dir)
    barrier()
