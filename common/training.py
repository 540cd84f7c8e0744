"""One train loop and one prediction loop for every script.

The scripts differ in their stages, losses, parameter groups and batch sources, not in how they step,
accumulate, clip, log, checkpoint or resume. `train()` runs the script's stages in order: a `Stage` is a value
(name, loss step, parameter groups with their own learning rate, hooks), and the loop does the rest (AdamW +
linear warmup/decay, accumulation, clipping, torch.amp, DDP, a progress bar (common.progress), tensorboardX, a
JSON-lines log, atomic checkpoints and exact resume, which finds its stage from the checkpoint). Scalars from
the loss step are summed as tensors over the logging window and reduced across ranks once per log, never synced
per micro-batch.
`predict()` runs a model function over a dataset sharded across ranks and gathers the outputs so that every
example is counted exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from common.batches import Batch, BatchSource, TensorBatches, per_rank_batches
from common.checkpoint import TrainState, load_checkpoint, read_checkpoint_state, rotate_checkpoints, save_checkpoint
from common.distributed import DistContext, all_gather_objects, shard_indices
from common.errors import UserError
from common.progress import progress_bar

logger = logging.getLogger(__name__)

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")
Scalars = Mapping[str, "torch.Tensor | float"]
LossStep = Callable[[nn.Module, Batch, TrainState], "torch.Tensor | tuple[torch.Tensor, Scalars]"]


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
    save_total_limit: int = 0  # > 0: keep only the newest N checkpoints of output_dir (rank 0 deletes the rest)
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    dynamic_padding: bool = True
    # AdamW's fused kernel (one pass over each tensor, CPU or CUDA) instead of the loop of whole-tensor ops; the
    # two differ in float32 rounding. On 2 cores of an AMD EPYC (Zen 4) a step over distill.py's student (17.5M
    # parameters) took 12 ms fused and 71 ms looped.
    fused_adamw: bool = False

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


@dataclass(frozen=True)
class Stage:
    """One training stage: its name (checkpoint folders are `<name>-NNNNNN`), the loss step, and a function
    giving its AdamW parameter groups (each with its own learning rate; called when the stage starts, after
    `enter`, so that what `enter` freezes is left out). `on_log(state)` runs on every rank at each logging step
    and its values are logged; `on_end(result)` runs when the stage is done."""

    name: str
    loss_step: LossStep
    param_groups: Callable[[], list[dict[str, Any]]]
    enter: Callable[[], None] | None = None
    on_log: Callable[[TrainState], Mapping[str, float]] | None = None
    on_end: Callable[["TrainResult"], None] | None = None
    tb_prefix: str = ""


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a stage takes, derived in one place from the data size and the flags (the
    benches use it too). Saved in every checkpoint: a resume whose flags give another plan is refused."""

    batches_per_epoch: int  # per rank
    updates_per_epoch: int
    total_steps: int
    num_epochs: int
    warmup_steps: int
    world_size: int


@dataclass(frozen=True)
class TrainResult:
    global_step: int
    average_loss: float
    seconds: float
    examples_per_second: float
    last_checkpoint: str | None
    stage: str = "checkpoint"


def plan_steps(batches_per_epoch: int, cfg: TrainConfig, world_size: int = 1) -> StepPlan:
    """The step plan of `cfg` for a source giving `batches_per_epoch` batches per rank; leftover micro-batches
    of an epoch that do not fill an accumulation are dropped."""
    if batches_per_epoch < cfg.gradient_accumulation_steps:
        raise UserError(
            f"the training data make {batches_per_epoch} batches per device and epoch, fewer than "
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}; lower it or the batch size"
        )
    updates_per_epoch = max(1, batches_per_epoch // cfg.gradient_accumulation_steps)
    if cfg.max_steps > 0:
        total_steps, num_epochs = cfg.max_steps, math.ceil(cfg.max_steps / updates_per_epoch)
    else:
        total_steps, num_epochs = math.ceil(updates_per_epoch * cfg.num_train_epochs), math.ceil(cfg.num_train_epochs)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_proportion * total_steps)
    return StepPlan(batches_per_epoch, updates_per_epoch, total_steps, num_epochs, warmup, world_size)


def plan_for_examples(num_examples: int, cfg: TrainConfig, world_size: int = 1) -> StepPlan:
    """`plan_steps` for the default batch source over `num_examples` rows."""
    return plan_steps(per_rank_batches(num_examples, cfg.per_device_batch_size, world_size), cfg, world_size)


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
# precision


def autocast_context(device: torch.device, fp16: bool, bf16: bool) -> contextlib.AbstractContextManager:
    if fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# the loop


class ScalarWindow:
    """Loss-step scalars summed as tensors over a logging window (no host sync per micro-batch), averaged over
    every rank's micro-batches with one all-reduce when the window is logged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, scalars: Scalars) -> None:
        for name, value in scalars.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        device = ctx.device if ctx.is_distributed else self.sums[names[0]].device
        packed = torch.stack([self.sums[n].to(device) for n in names]
                             + [torch.tensor(float(self.counts[n]), device=device) for n in names])
        if ctx.is_distributed:
            torch.distributed.all_reduce(packed)
        values = packed.tolist()
        self.sums, self.counts = {}, {}
        return {n: values[i] / max(values[len(names) + i], 1.0) for i, n in enumerate(names)}


def _log_line(output_dir: str, record: Mapping[str, Any]) -> None:
    with open(os.path.join(output_dir, "log_history.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


class _StageRun:
    """One stage's optimizer, schedule, progress and loop (split into short steps)."""

    def __init__(self, ctx: DistContext, cfg: TrainConfig, model: nn.Module, stage: Stage, index: int,
                 source: BatchSource, plan: StepPlan, save_model: Callable[[str], None], tb_writer: Any) -> None:
        self.ctx, self.cfg, self.model, self.stage, self.source, self.plan = ctx, cfg, model, stage, source, plan
        self.save_model, self.tb_writer = save_model, tb_writer
        groups = stage.param_groups()
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                           lr=cfg.learning_rate, eps=cfg.adam_epsilon, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay, fused=cfg.fused_adamw or None)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, num_warmup_steps=plan.warmup_steps,
                                                         num_training_steps=plan.total_steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if cfg.fp16 else None
        self.state = TrainState(total_steps=plan.total_steps, num_epochs=plan.num_epochs, stage=stage.name,
                                stage_index=index, plan=asdict(plan))
        self.window = ScalarWindow()
        self.window_loss, self.window_steps, self.examples_seen = 0.0, 0, 0
        self.last_checkpoint: str | None = None
        self.resumed_from: str | None = None  # the run's checkpoint: kept by --save_total_limit until a newer one

    def resume(self, path: str) -> None:
        state = load_checkpoint(self.ctx, path, self.optimizer, self.scheduler, self.scaler)
        check_plan(path, state, self.plan)
        state.plan, state.stage_index = asdict(self.plan), self.state.stage_index
        self.state, self.last_checkpoint, self.resumed_from = state, path, path
        logger.info("Resumed from %s at step %d (epoch %d)", path, state.global_step, state.epoch)

    def run(self) -> TrainResult:
        ctx, cfg, plan, state = self.ctx, self.cfg, self.plan, self.state
        wrapped = self._wrap()
        logger.info("***** Training (%s) *****  examples=%d epochs=%d batch/device=%d accumulation=%d total "
                    "batch=%d optimization steps=%d warmup=%d", self.stage.name, self.source.num_examples,
                    plan.num_epochs, cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
                    cfg.per_device_batch_size * cfg.gradient_accumulation_steps * ctx.world_size, plan.total_steps,
                    plan.warmup_steps)
        start = time.perf_counter()
        bar = progress_bar(total=plan.total_steps, initial=state.global_step, desc=f"train {self.stage.name}",
                           disable=not ctx.is_main)
        self.model.train()
        try:
            while state.global_step < plan.total_steps:
                if self._epoch(wrapped, bar):
                    break
                state.epoch += 1
                state.step_in_epoch = 0
                already_saved = cfg.save_steps > 0 and state.global_step % cfg.save_steps == 0
                if cfg.save_each_epoch and not already_saved:
                    self._checkpoint()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        if self.tb_writer is not None and ctx.is_main:
            self.tb_writer.flush()
        avg = state.loss_sum / max(state.global_step, 1)
        throughput = self.examples_seen * ctx.world_size / max(seconds, 1e-9)
        logger.info("Finished %s: %d steps, average loss %.4f, %.1f examples/s", self.stage.name, state.global_step,
                    avg, throughput)
        return TrainResult(state.global_step, avg, seconds, throughput, self.last_checkpoint, self.stage.name)

    def _wrap(self) -> nn.Module:
        if not self.ctx.is_distributed:
            return self.model
        kwargs = {"device_ids": [self.ctx.device.index]} if self.ctx.device.type == "cuda" else {}
        return nn.parallel.DistributedDataParallel(self.model, **kwargs)

    def _epoch(self, wrapped: nn.Module, bar: Any) -> bool:
        """The rest of the current epoch; True when the plan's last step was taken inside it."""
        state, accumulation = self.state, self.cfg.gradient_accumulation_steps
        batches = self.source.epoch(state.epoch, self.ctx)
        if len(batches) != self.plan.batches_per_epoch:
            raise ValueError(f"the batch source gave {len(batches)} batches for epoch {state.epoch}, expected "
                             f"{self.plan.batches_per_epoch} per device")
        usable = self.plan.updates_per_epoch * accumulation
        step_loss: torch.Tensor | None = None  # this optimization step's loss, summed over micro-batches
        for micro, indices in enumerate(batches[state.step_in_epoch * accumulation : usable]):
            last_micro = (micro + 1) % accumulation == 0
            loss = self._micro_step(wrapped, indices, sync=last_micro)
            step_loss = loss if step_loss is None else step_loss + loss
            if last_micro:
                self._optimizer_step(step_loss, bar)
                step_loss = None
                if state.global_step >= self.plan.total_steps:
                    return True
        return False

    def _micro_step(self, wrapped: nn.Module, indices: Sequence[int], sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients synced across ranks only on the last one)."""
        cfg = self.cfg
        batch = self.source.collate(indices, self.ctx.device)
        no_sync = sync or not self.ctx.is_distributed
        with contextlib.nullcontext() if no_sync else wrapped.no_sync():
            with autocast_context(self.ctx.device, cfg.fp16, cfg.bf16):
                out = self.stage.loss_step(wrapped, batch, self.state)
            loss, scalars = out if isinstance(out, tuple) else (out, {})
            scaled = loss / cfg.gradient_accumulation_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.window.add(scalars)
        self.examples_seen += len(indices)
        return scaled.detach()

    def _optimizer_step(self, step_loss: torch.Tensor, bar: Any) -> None:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        step_loss = step_loss.float()
        if ctx.is_distributed:
            torch.distributed.all_reduce(step_loss)
            step_loss /= ctx.world_size
        value = step_loss.item()  # one host sync per optimizer step: the divergence check needs it
        if not math.isfinite(value):
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint"
            raise TrainingDiverged(f"loss became {value} at optimization step {state.global_step + 1} (epoch "
                                   f"{state.epoch}); {where}; lower --learning_rate, keep --max_grad_norm on, or "
                                   "check the data")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch += 1
        state.loss_sum += value
        self.window_loss += value
        self.window_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if cfg.logging_steps > 0 and state.global_step % cfg.logging_steps == 0:
            self._log(grad_norm)
        if cfg.save_steps > 0 and state.global_step % cfg.save_steps == 0:
            self._checkpoint()

    def _log(self, grad_norm: torch.Tensor) -> None:
        state = self.state
        values = self.window.reduce(self.ctx)
        if self.stage.on_log is not None:
            values.update(self.stage.on_log(state))
        if self.ctx.is_main:
            record = {"stage": self.stage.name, "step": state.global_step, "epoch": state.epoch,
                      "loss": self.window_loss / self.window_steps, "lr": self.scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), **values}
            _log_line(self.cfg.output_dir, record)
            if self.tb_writer is not None:
                for key, value in record.items():
                    if key not in ("stage", "step", "epoch"):
                        self.tb_writer.add_scalar(f"{self.stage.tb_prefix}{key}", value, state.global_step)
        self.window_loss, self.window_steps = 0.0, 0

    def _checkpoint(self) -> None:
        self.last_checkpoint = save_checkpoint(self.ctx, self.cfg.output_dir, self.state, self.optimizer,
                                               self.scheduler, self.scaler, self.save_model)
        if self.cfg.save_total_limit > 0 and self.ctx.is_main:
            rotate_checkpoints(self.cfg.output_dir, self.cfg.save_total_limit, keep=(self.last_checkpoint,),
                               protect=self.resumed_from)


def check_plan(path: str, state: TrainState, plan: StepPlan) -> None:
    """A checkpoint resumes only under the step plan it was made with (else the schedule, the pruning
    threshold and the epoch boundaries would silently drift from the run being continued)."""
    stored = state.plan or {"total_steps": state.total_steps, "num_epochs": state.num_epochs}
    now = asdict(plan)
    changed = [f"{k} {stored[k]} -> {now[k]}" for k in stored if k in now and stored[k] != now[k]]
    if changed:
        raise UserError(f"{path} was made under another step plan ({', '.join(changed)}): resume with the flags "
                        "of that run (epochs, max steps, batch size, accumulation, warmup, number of processes, "
                        "data) or start afresh")


def train(
    ctx: DistContext,
    cfg: TrainConfig,
    model: nn.Module,
    stages: Sequence[Stage],
    batches: BatchSource | Mapping[str, torch.Tensor],
    save_model: Callable[[str], None],
    tb_writer: Any = None,
    resume_from: str | None = None,
) -> list[TrainResult]:
    """Run `stages` in order on the batches of `batches` (a batch source, or a dict of padded tensors for the
    default seeded shuffle), returning one result per stage run.

    `model` is wrapped in DDP under torchrun. `save_model(folder)` writes whatever the script needs to reload
    the model into a checkpoint folder. With `resume_from`, the stages before the checkpoint's are skipped and
    its stage continues exactly where it stopped (optimizer, schedule, every rank's RNG, position in the epoch).
    Every stage starts from `cfg.seed + rank`: each rank its own dropout and masking, the same on every run.
    """
    os.makedirs(cfg.output_dir, exist_ok=True)
    source = batches if hasattr(batches, "collate") else TensorBatches(
        batches, cfg.per_device_batch_size, cfg.seed, cfg.dynamic_padding)
    plan = plan_steps(source.batches_per_epoch(ctx), cfg, ctx.world_size)
    first = 0
    if resume_from:
        name = read_checkpoint_state(resume_from).stage
        names = [s.name for s in stages]
        if name not in names:
            raise UserError(f"{resume_from} is a checkpoint of stage '{name}', which this run does not have "
                            f"(stages: {', '.join(names)})")
        first = names.index(name)
    results = []
    for index, stage in enumerate(stages[first:], start=first):
        if stage.enter is not None:
            stage.enter()
        runner = _StageRun(ctx, cfg, model, stage, index, source, plan, save_model, tb_writer)
        set_seed(cfg.seed + ctx.rank)
        if resume_from and index == first:
            runner.resume(resume_from)
        result = runner.run()
        results.append(result)
        if stage.on_end is not None:
            stage.on_end(result)
    return results


# ----------------------------------------------------------------------------------------------------------
# prediction


def predict(
    ctx: DistContext,
    data: BatchSource | Mapping[str, torch.Tensor],
    batch_size: int,
    step: Callable[[Batch], Mapping[str, torch.Tensor]],
    dynamic_padding: bool = True,
    desc: str = "eval",
    fp16: bool = False,
    bf16: bool = False,
) -> tuple[dict[str, np.ndarray], float]:
    """Run `step(batch) -> {name: per-example tensor}` over the examples of `data` (a dict of tensors, or a
    batch source whose `collate` makes the batches), sharded over ranks without padding, and gather every
    rank's outputs back into example order. Returns (outputs, wall seconds of the slowest rank). `step` runs
    under torch.no_grad() (the caller sets model.eval())."""
    source = data if hasattr(data, "collate") else TensorBatches(data, batch_size, dynamic_padding=dynamic_padding)
    mine = shard_indices(source.num_examples, ctx)
    chunks: dict[str, list[np.ndarray]] = {}
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in progress_bar(range(0, len(mine), batch_size), desc=desc, disable=not ctx.is_main, leave=False):
            batch = source.collate(mine[i : i + batch_size], ctx.device)
            with autocast_context(ctx.device, fp16, bf16):
                out = step(batch)
            for key, value in out.items():
                chunks.setdefault(key, []).append(value.detach().float().cpu().numpy()
                                                  if value.is_floating_point() else value.detach().cpu().numpy())
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    local = {k: np.concatenate(v) for k, v in chunks.items()}
    return _merge_shards(all_gather_objects((mine, local, seconds), ctx), local)


def _merge_shards(gathered: list[tuple[list[int], dict[str, np.ndarray], float]], local: Mapping[str, Any]
                  ) -> tuple[dict[str, np.ndarray], float]:
    order = np.concatenate([np.asarray(idx, dtype=np.int64) for idx, _, _ in gathered])
    keys = next((out.keys() for _, out, _ in gathered if out), local.keys())
    merged = {}
    for key in keys:
        values = np.concatenate([out[key] for _, out, _ in gathered if key in out])
        merged[key] = np.empty_like(values)
        merged[key][order] = values
    return merged, max(s for _, _, s in gathered)
