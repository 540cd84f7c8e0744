"""One train loop and one prediction loop for every script.

The scripts differ in their loss and their parameter groups, not in how they step, accumulate, clip, log,
checkpoint or resume: `train()` takes the script's `loss_step(model, batch, state)` and parameter groups,
and does the rest (AdamW + linear warmup/decay, accumulation, clipping, torch.amp, DDP, tqdm, tensorboardX,
a JSON-lines log, atomic checkpoints and exact resume). `predict()` runs a model function over a dataset
sharded across ranks and gathers the outputs so that every example is counted exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from common.distributed import DistContext, all_gather_objects, barrier, shard_indices
from common.errors import UserError

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")
STATE_FILE = "trainer_state.json"


class TrainingDiverged(UserError):
    """The loss stopped being finite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """The resolved training settings (derived once from the flags, never written back into them)."""

    output_dir: str
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_steps: int = 0
    warmup_proportion: float = 0.0
    logging_steps: int = 50
    save_steps: int = 0
    save_each_epoch: bool = False
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    dynamic_padding: bool = True
    checkpoint_prefix: str = "checkpoint"
    tb_prefix: str = ""

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "TrainConfig":
        """Pick the fields this dataclass knows from an argparse namespace."""
        names = {f for f in cls.__dataclass_fields__}
        values = {
            "per_device_batch_size": getattr(args, "per_gpu_train_batch_size", 8),
            **{n: getattr(args, n) for n in names if hasattr(args, n)},
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class TrainState:
    """Progress of one training run; saved in every checkpoint as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    total_steps: int = 0
    num_epochs: int = 0
    stage: str = "checkpoint"
    loss_sum: float = 0.0  # sum of per-step losses, for the average reported at the end
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    global_step: int
    average_loss: float
    seconds: float
    examples_per_second: float
    last_checkpoint: str | None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    learning_rate: float,
    weight_decay: float,
    overrides: Sequence[tuple[Callable[[str], bool], dict[str, Any]]] = (),
) -> list[dict[str, Any]]:
    """AdamW groups: biases and LayerNorm weights get no decay; `overrides` give some parameters their own
    settings (e.g. mask scores with their own learning rate). Frozen parameters are left out."""
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        settings = {"lr": learning_rate, "weight_decay": weight_decay}
        tag = "default"
        for i, (matches, extra) in enumerate(overrides):
            if matches(name):
                settings.update(extra)
                tag = f"override{i}"
                break
        if any(nd in name for nd in NO_DECAY):
            settings["weight_decay"] = 0.0
            tag += "-nodecay"
        group = groups.setdefault((tag,), {"params": [], "names": [], **settings})
        group["params"].append(param)
        group["names"].append(name)
    return [g for g in groups.values() if g["params"]]


# ----------------------------------------------------------------------------------------------------------
# batching


def dataset_size(dataset: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(dataset.values())))


def make_batch(
    dataset: Mapping[str, torch.Tensor], indices: Sequence[int], device: torch.device, dynamic_padding: bool
) -> Batch:
    """Gather rows into a batch on `device`; with dynamic padding, trim [B, S] tensors to the longest row."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    batch = {k: v.index_select(0, idx) for k, v in dataset.items()}
    if dynamic_padding and "attention_mask" in batch and len(idx):
        mask = batch["attention_mask"]
        seq_len = mask.shape[1]
        used = mask.bool().any(dim=0).nonzero().flatten()
        first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, seq_len)
        if last - first < seq_len:
            # The span of columns holding any real token: right- and left-padded features alike.
            batch = {k: (v[:, first:last] if v.dim() == 2 and v.shape[1] == seq_len else v) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, ctx: DistContext) -> list[list[int]]:
    """This rank's batches for one epoch: a permutation seeded by (seed, epoch), padded by wrapping so every
    rank takes the same number of steps (as torch's DistributedSampler), then split by rank."""
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    if ctx.world_size > 1:
        total = math.ceil(n / ctx.world_size) * ctx.world_size
        perm = (perm * math.ceil(total / max(n, 1)))[:total]
        perm = perm[ctx.rank :: ctx.world_size]
    return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]


# ----------------------------------------------------------------------------------------------------------
# precision


def autocast_context(device: torch.device, fp16: bool, bf16: bool) -> contextlib.AbstractContextManager:
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision_flags(fp16: bool, bf16: bool, device: torch.device) -> list[str]:
    """Problems with --fp16/--bf16 on this device, for the script's argument validation."""
    problems = []
    if fp16 and bf16:
        problems.append("--fp16 and --bf16 exclude each other: pick one")
    if fp16 and device.type != "cuda":
        problems.append("--fp16 needs a CUDA GPU (the grad scaler is CUDA-only here); use --bf16 on CPU")
    return problems


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_text_atomic(path: str, text: str) -> None:
    """Write text through a temporary file renamed into place: a crash leaves the old file or none, never
    half a file, and no temporary file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """JSON (indented, sorted keys) written atomically, as write_text_atomic."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_folder_atomic(save: Callable[[str], None], dest: str) -> None:
    """Run `save(folder)` into a temporary folder inside `dest`, then move each file into `dest`: a crash
    while saving leaves the previous files (or none), never a half-written model beside good ones."""
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(dest, f".saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save(tmp)
        for name in os.listdir(tmp):
            target = os.path.join(dest, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_name(prefix: str, step: int) -> str:
    return f"{prefix}-{step:06d}"


def read_checkpoint_state(path: str) -> TrainState:
    """The progress stored in a checkpoint folder; a clear error if the folder is not a complete checkpoint."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise UserError(
            f"{path} is not a complete checkpoint (no {STATE_FILE}); point --resume_from_checkpoint at a "
            "checkpoint-* folder written by --save_steps, or 'latest'"
        )
    for needed in ("optimizer.pt", "scheduler.pt"):
        if not os.path.isfile(os.path.join(path, needed)):
            raise UserError(f"{path} is an incomplete checkpoint: {needed} is missing; resume from another one")
    try:
        with open(state_file, encoding="utf-8") as f:
            return TrainState(**json.load(f))
    except (ValueError, TypeError) as err:
        raise UserError(f"{state_file} is damaged or was not written by these scripts ({err}); resume from "
                        "another checkpoint") from None


def find_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders under output_dir, oldest first (ordered by their stored progress,
    stage order included, never by parsing folder names)."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(path, STATE_FILE)):
            continue
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        found.append((state.get("extra", {}).get("stage_index", 0), state["global_step"], path))
    return [p for _, _, p in sorted(found)]


def resolve_resume_path(resume: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint PATH|latest → a checkpoint folder (or None when not resuming)."""
    if not resume:
        return None
    if resume == "latest":
        found = find_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"--resume_from_checkpoint latest: no checkpoint under {output_dir}; run without it to start afresh"
            )
        return found[-1]
    if not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume}: no such folder")
    read_checkpoint_state(resume)
    return resume


def _save_checkpoint(
    ctx: DistContext,
    cfg: TrainConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    save_model: Callable[[str], None],
) -> str:
    """A complete checkpoint folder, written under a temporary name and renamed into place when whole."""
    final = os.path.join(cfg.output_dir, checkpoint_name(state.stage, state.global_step))
    tmp = os.path.join(cfg.output_dir, "." + os.path.basename(final) + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{ctx.rank}.pt"))
    barrier()
    if ctx.is_main:
        save_model(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if scaler is not None:
            torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        write_json_atomic(os.path.join(tmp, STATE_FILE), asdict(state))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("Saved checkpoint %s", final)
    barrier()
    return final


def _load_checkpoint(
    ctx: DistContext,
    path: str,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> TrainState:
    state = read_checkpoint_state(path)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True))
    scaler_file = os.path.join(path, "scaler.pt")
    if scaler is not None and os.path.isfile(scaler_file):
        scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    rng_file = os.path.join(path, f"rng_state_{ctx.rank}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s has no RNG state for rank %d (different world size?); dropout will differ", path, ctx.rank)
    return state


# ----------------------------------------------------------------------------------------------------------
# the loop

LossStep = Callable[[nn.Module, Batch, TrainState], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


def _log_line(cfg: TrainConfig, record: Mapping[str, Any]) -> None:
    with open(os.path.join(cfg.output_dir, "log_history.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def train(
    ctx: DistContext,
    cfg: TrainConfig,
    model: nn.Module,
    dataset: Mapping[str, torch.Tensor],
    loss_step: LossStep,
    groups: list[dict[str, Any]],
    save_model: Callable[[str], None],
    tb_writer: Any = None,
    resume_from: str | None = None,
    stage_index: int = 0,
    on_log: Callable[[TrainState], dict[str, float]] | None = None,
    batch_order: Callable[[int, DistContext], list[list[int]]] | None = None,
) -> TrainResult:
    """Train `model` on `dataset` with the script's `loss_step`, returning the step count and average loss.

    `model` holds the trainable parameters (frozen ones have requires_grad=False before the call); it is
    wrapped in DDP when running under torchrun. `save_model(folder)` writes whatever the script needs to
    reload the model (weights, config, tokenizer) into a checkpoint folder. `on_log(state)`, if given, runs
    on every rank at each logging step (e.g. an evaluation) and its values are logged with the loss.
    `batch_order(epoch, ctx)`, if given, replaces the seeded shuffle (`epoch_batches`) with the script's own
    batches for this rank (e.g. length-grouped); it must be a pure function of the epoch (and the script's
    seed) for exact resume, and give every rank the same number of batches as `epoch_batches` would.
    """
    os.makedirs(cfg.output_dir, exist_ok=True)
    n = dataset_size(dataset)
    steps_per_epoch = math.ceil(math.ceil(n / ctx.world_size) / cfg.per_device_batch_size)
    if steps_per_epoch < cfg.gradient_accumulation_steps:
        raise UserError(
            f"{n} training examples make {steps_per_epoch} batches per device and epoch, fewer than "
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}; lower it or the batch size"
        )
    updates_per_epoch = max(1, steps_per_epoch // cfg.gradient_accumulation_steps)
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
        num_epochs = math.ceil(cfg.max_steps / updates_per_epoch)
    else:
        total_steps = math.ceil(updates_per_epoch * cfg.num_train_epochs)
        num_epochs = math.ceil(cfg.num_train_epochs)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_proportion * total_steps)

    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=cfg.learning_rate,
        eps=cfg.adam_epsilon,
        betas=cfg.adam_betas,
        weight_decay=cfg.weight_decay,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.fp16 else None
    trainable = [p for g in groups for p in g["params"]]

    set_seed(cfg.seed)
    state = TrainState(total_steps=total_steps, num_epochs=num_epochs, stage=cfg.checkpoint_prefix)
    state.extra["stage_index"] = stage_index
    if resume_from:
        state = _load_checkpoint(ctx, resume_from, optimizer, scheduler, scaler)
        logger.info("Resumed from %s at step %d (epoch %d)", resume_from, state.global_step, state.epoch)

    if ctx.is_distributed:
        ddp_kwargs = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    else:
        wrapped = model

    total_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * ctx.world_size
    logger.info(
        "***** Training (%s) *****  examples=%d epochs=%d batch/device=%d accumulation=%d total batch=%d "
        "optimization steps=%d warmup=%d",
        cfg.checkpoint_prefix, n, num_epochs, cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
        total_batch, total_steps, warmup,
    )
    last_checkpoint = resume_from
    examples_seen = 0
    start = time.perf_counter()
    window_loss, window_steps = 0.0, 0
    bar = tqdm(total=total_steps, initial=state.global_step, desc=f"train {cfg.checkpoint_prefix}",
               disable=not ctx.is_main, dynamic_ncols=True)
    model.train()
    try:
        while state.global_step < total_steps:
            step_loss: torch.Tensor | None = None  # this optimization step's loss, summed over micro-batches
            if batch_order is None:
                batches = epoch_batches(n, cfg.per_device_batch_size, cfg.seed, state.epoch, ctx)
            else:
                batches = batch_order(state.epoch, ctx)
                if len(batches) != steps_per_epoch:
                    raise ValueError(f"batch_order gave {len(batches)} batches for epoch {state.epoch}, expected "
                                     f"{steps_per_epoch} per device")
            usable = updates_per_epoch * cfg.gradient_accumulation_steps
            batches = batches[state.step_in_epoch * cfg.gradient_accumulation_steps : usable]
            for micro, indices in enumerate(batches):
                batch = make_batch(dataset, indices, ctx.device, cfg.dynamic_padding)
                last_micro = (micro + 1) % cfg.gradient_accumulation_steps == 0
                sync = contextlib.nullcontext() if (last_micro or not ctx.is_distributed) else wrapped.no_sync()
                with sync:
                    with autocast_context(ctx.device, cfg.fp16, cfg.bf16):
                        out = loss_step(wrapped, batch, state)
                    loss, scalars = (out if isinstance(out, tuple) else (out, {}))
                    scaled = loss / cfg.gradient_accumulation_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss = scaled.detach() if step_loss is None else step_loss + scaled.detach()
                examples_seen += len(indices)
                if not last_micro:
                    continue
                if scaler is not None:
                    scaler.unscale_(optimizer)
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
                step_loss = step_loss.float()
                if ctx.is_distributed:
                    torch.distributed.all_reduce(step_loss)
                    step_loss /= ctx.world_size
                step_loss_value = step_loss.item()
                step_loss = None
                if not math.isfinite(step_loss_value):
                    raise TrainingDiverged(
                        f"loss became {step_loss_value} at optimization step {state.global_step + 1} "
                        f"(epoch {state.epoch}); "
                        + (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint")
                        + "; lower --learning_rate, keep --max_grad_norm on, or check the data"
                    )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                state.step_in_epoch += 1
                state.loss_sum += step_loss_value
                window_loss += step_loss_value
                window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss_value:.4f}")
                is_log_step = cfg.logging_steps > 0 and state.global_step % cfg.logging_steps == 0
                if is_log_step and on_log is not None:
                    scalars = {**scalars, **on_log(state)}
                if is_log_step and ctx.is_main:
                    record = {
                        "stage": cfg.checkpoint_prefix,
                        "step": state.global_step,
                        "epoch": state.epoch,
                        "loss": window_loss / window_steps,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        **scalars,
                    }
                    _log_line(cfg, record)
                    if tb_writer is not None:
                        for key, value in record.items():
                            if key not in ("stage", "step", "epoch"):
                                tb_writer.add_scalar(f"{cfg.tb_prefix}{key}", value, state.global_step)
                    window_loss, window_steps = 0.0, 0
                if cfg.save_steps > 0 and state.global_step % cfg.save_steps == 0:
                    last_checkpoint = _save_checkpoint(ctx, cfg, state, optimizer, scheduler, scaler, save_model)
                if state.global_step >= total_steps:
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
                already_saved = cfg.save_steps > 0 and state.global_step % cfg.save_steps == 0
                if cfg.save_each_epoch and not already_saved:
                    last_checkpoint = _save_checkpoint(ctx, cfg, state, optimizer, scheduler, scaler, save_model)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if tb_writer is not None and ctx.is_main:
        tb_writer.flush()
    avg = state.loss_sum / max(state.global_step, 1)
    throughput = examples_seen * ctx.world_size / max(seconds, 1e-9)
    logger.info("Finished %s: %d steps, average loss %.4f, %.1f examples/s", cfg.checkpoint_prefix,
                state.global_step, avg, throughput)
    return TrainResult(state.global_step, avg, seconds, throughput, last_checkpoint)


# ----------------------------------------------------------------------------------------------------------
# prediction


def predict(
    ctx: DistContext,
    dataset: Mapping[str, torch.Tensor],
    batch_size: int,
    step: Callable[[Batch], Mapping[str, torch.Tensor]],
    dynamic_padding: bool = True,
    desc: str = "eval",
    fp16: bool = False,
    bf16: bool = False,
) -> tuple[dict[str, np.ndarray], float]:
    """Run `step(batch) -> {name: per-example tensor}` over the dataset, sharded over ranks without padding,
    and gather every rank's outputs back into dataset order. Returns (outputs, wall seconds of the slowest
    rank). `step` runs under torch.no_grad() in eval mode handling (the caller sets model.eval())."""
    n = dataset_size(dataset)
    mine = shard_indices(n, ctx)
    chunks: dict[str, list[np.ndarray]] = {}
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not ctx.is_main, dynamic_ncols=True,
                      leave=False):
            indices = mine[i : i + batch_size]
            batch = make_batch(dataset, indices, ctx.device, dynamic_padding)
            with autocast_context(ctx.device, fp16, bf16):
                out = step(batch)
            for key, value in out.items():
                chunks.setdefault(key, []).append(value.detach().float().cpu().numpy()
                                                  if value.is_floating_point() else value.detach().cpu().numpy())
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    local = {k: np.concatenate(v) for k, v in chunks.items()}
    gathered = all_gather_objects((mine, local, seconds), ctx)
    order = np.concatenate([np.asarray(idx, dtype=np.int64) for idx, _, _ in gathered])
    keys = next((out.keys() for _, out, _ in gathered if out), local.keys())
    merged = {}
    for key in keys:
        merged[key] = np.empty_like(np.concatenate([out[key] for _, out, _ in gathered if key in out]))
        merged[key][order] = np.concatenate([out[key] for _, out, _ in gathered if key in out])
    slowest = max(s for _, _, s in gathered)
    return merged, slowest
