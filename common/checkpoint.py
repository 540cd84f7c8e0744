"""Checkpoints as complete folders (`<stage>-NNNNNN/`): model files, optimizer, scheduler, grad scaler, every
rank's RNG state and the training progress (`trainer_state.json`, with the step plan it was made under).

Found by their stored progress (stage position, then step), never by parsing folder names; written under a
temporary name and renamed into place when whole, so a crash leaves no half checkpoint that `latest` could pick.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from common.distributed import DistContext, barrier, broadcast_object
from common.errors import UserError
from common.io import remove_path, temp_name, write_json_atomic, writing
from common.pretrained import check_weights_file

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
REQUIRED_FILES = ("optimizer.pt", "scheduler.pt")


@dataclass
class TrainState:
    """Progress of one training stage; saved in every checkpoint as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    total_steps: int = 0
    num_epochs: int = 0
    stage: str = "checkpoint"
    stage_index: int = 0  # the stage's position in the run (checkpoints of later stages sort after)
    loss_sum: float = 0.0  # sum of per-step losses, for the average reported at the end
    plan: dict[str, int] = field(default_factory=dict)  # the StepPlan this stage runs under (checked on resume)
    extra: dict[str, Any] = field(default_factory=dict)  # the loss step's own state (e.g. a global top-k cut)

    @property
    def order(self) -> tuple[int, int]:
        # Checkpoints written before stage_index became a field kept it in `extra`.
        return (self.stage_index or int(self.extra.get("stage_index", 0)), self.global_step)


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-{step:06d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint_state(path: str) -> TrainState:
    """The progress stored in a checkpoint folder; a clear error if the folder is not a complete checkpoint."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise UserError(
            f"{path} is not a complete checkpoint (no {STATE_FILE}); point --resume_from_checkpoint at a "
            "checkpoint-* folder written by --save_steps, or 'latest'"
        )
    for needed in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(path, needed)):
            raise UserError(f"{path} is an incomplete checkpoint: {needed} is missing; resume from another one")
    try:
        with open(state_file, encoding="utf-8") as f:
            return TrainState(**json.load(f))
    except (ValueError, TypeError) as err:
        raise UserError(f"{state_file} is damaged or was not written by these scripts ({err}); resume from "
                        "another checkpoint") from None


def _state_folders(output_dir: str) -> list[str]:
    """The folders under output_dir that hold a trainer_state.json (temporaries, hidden, left out)."""
    if not os.path.isdir(output_dir):
        return []
    return [os.path.join(output_dir, name) for name in os.listdir(output_dir)
            if not name.startswith(".") and os.path.isfile(os.path.join(output_dir, name, STATE_FILE))]


def find_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders under output_dir, oldest first (ordered by their stored progress, stage order included,
    never by parsing folder names). One whose progress cannot be read is left out, with a warning."""
    found = []
    for path in _state_folders(output_dir):
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                order = TrainState(**json.load(f)).order
        except (OSError, ValueError, TypeError, AttributeError) as err:
            logger.warning("%s is damaged (%s: %s); left out", path, STATE_FILE, err)
            continue
        found.append((order, path))
    return [p for _, p in sorted(found)]


def rotate_checkpoints(output_dir: str, limit: int, keep: tuple[str | None, ...] = (),
                       protect: str | None = None) -> list[str]:
    """--save_total_limit: delete the checkpoints of output_dir older than its newest `limit` complete ones (by
    stored progress); `keep` (the one just saved) is never deleted, nor `protect` (the one this run resumed
    from) while no newer checkpoint exists. Each goes by a rename to a temporary name first, so `latest` never
    sees half a folder. Returns the folders deleted (rank 0 calls this)."""
    if limit <= 0:
        return []
    found = find_checkpoints(output_dir)
    complete = []
    for path in found:
        try:
            verify_checkpoint(path)
        except UserError:
            continue  # a damaged one neither counts toward the limit nor is deleted here (`latest` passes it over)
        complete.append(path)
    same = {os.path.realpath(p) for p in keep if p}
    kept = set(map(os.path.realpath, complete[-limit:])) | same
    if protect and os.path.realpath(protect) in map(os.path.realpath, found[-1:]):
        kept.add(os.path.realpath(protect))
    removed = []
    for path in complete:
        if os.path.realpath(path) in kept:
            continue
        doomed = temp_name(path)
        os.replace(path, doomed)
        remove_path(doomed)
        removed.append(path)
        logger.info("Deleted %s (--save_total_limit %d)", path, limit)
    return removed


def verify_checkpoint(path: str) -> TrainState:
    """The checkpoint's progress, once its files have been checked to be whole (every saved tensor file a
    complete archive, every safetensors file with a complete header): a clear error naming the damaged file."""
    state = read_checkpoint_state(path)
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(".pt") and not zipfile.is_zipfile(file):
            raise UserError(f"{file} is damaged (not a complete torch.save archive); resume from another checkpoint")
        check_weights_file(file, "resume from another checkpoint")
    return state


def resolve_resume_path(resume: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint PATH|latest -> a checkpoint folder (or None when not resuming). `latest` is the
    newest checkpoint whose files are whole: a damaged newer one is named in a warning and passed over."""
    if not resume:
        return None
    if resume == "latest":
        found = find_checkpoints(output_dir)
        passed_over = len(_state_folders(output_dir)) - len(found)  # damaged progress: left out, with a warning
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except UserError as err:
                logger.warning("Passing over a damaged checkpoint: %s", err)
                passed_over += 1
                continue
            if passed_over:
                logger.warning("Resuming from %s, the newest complete checkpoint", path)
            return path
        damaged = " (the ones there are damaged, see the warnings)" if found else ""
        raise UserError(f"--resume_from_checkpoint latest: no checkpoint under {output_dir} that is complete"
                        f"{damaged}; run without it to start afresh")
    if not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume}: no such folder")
    verify_checkpoint(resume)
    return resume


def save_checkpoint(ctx: DistContext, output_dir: str, state: TrainState, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler | None, save_model: Callable[[str], None]) -> str:
    """A complete checkpoint folder, written under a temporary name and renamed into place when whole."""
    final = os.path.join(output_dir, checkpoint_name(state.stage, state.global_step))
    tmp = broadcast_object(temp_name(final) if ctx.is_main else None, ctx)  # one folder all ranks write into
    try:
        with writing(final):
            if ctx.is_main:
                os.makedirs(tmp)
            barrier()
            torch.save(rng_state(), os.path.join(tmp, f"rng_state_{ctx.rank}.pt"))  # every rank its own
            barrier()
            if ctx.is_main:
                save_model(tmp)
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                if scaler is not None:
                    torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
                write_json_atomic(os.path.join(tmp, STATE_FILE), asdict(state))
                remove_path(final)
                os.replace(tmp, final)
    finally:
        if ctx.is_main:
            remove_path(tmp)
    if ctx.is_main:
        logger.info("Saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(ctx: DistContext, path: str, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler | None) -> TrainState:
    """Restore optimizer, scheduler, scaler and this rank's RNG from `path`; return its progress."""
    state = read_checkpoint_state(path)
    optimizer.load_state_dict(_load(path, "optimizer.pt"))
    scheduler.load_state_dict(_load(path, "scheduler.pt"))
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        scaler.load_state_dict(_load(path, "scaler.pt"))
    rng_file = f"rng_state_{ctx.rank}.pt"
    if os.path.isfile(os.path.join(path, rng_file)):
        set_rng_state(_load(path, rng_file))
    else:
        logger.warning("%s has no RNG state for rank %d (different world size?); dropout will differ", path, ctx.rank)
    return state


def _load(folder: str, name: str) -> Any:
    """A tensor file of a checkpoint, loaded with weights_only (no code runs); a damaged or foreign one (a
    pickle that would run code) is a clear error."""
    file = os.path.join(folder, name)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = "not a tensor file these scripts wrote" if isinstance(err, pickle.UnpicklingError) else "damaged"
        raise UserError(f"{file} is {reason}: resume from another checkpoint") from None
