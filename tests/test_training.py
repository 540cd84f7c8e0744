"""Tests for common/training.py: parameter groups, step counting, accumulation, exact resume, checkpoints,
divergence, logging, prediction and batching.

Everything runs on a tiny plain torch model (Linear + ReLU + Dropout + LayerNorm + Linear) over random float
features with a class label, single process on the CPU; a fake 2-rank DistContext (no process group) checks
how work is split between ranks.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import training
from common.args import check_precision_flags
from common.batches import TensorBatches, epoch_batches, make_batch
from common.checkpoint import TrainState, find_checkpoints, read_checkpoint_state, resolve_resume_path
from common.distributed import DistContext, shard_indices
from common.errors import UserError
from common.io import save_folder_atomic, write_json_atomic
from common.training import (
    Stage, StepPlan, TrainConfig, TrainingDiverged, param_groups, plan_for_examples, predict, train,
)

CPU = torch.device("cpu")
CTX = DistContext(device=CPU)
FEATURES, HIDDEN, CLASSES = 6, 16, 3
CHECKPOINT_FILES = {"model.pt", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pt"}


# --------------------------------------------------------------------------------------------- helpers


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dense = nn.Linear(FEATURES, HIDDEN)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(HIDDEN)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.LayerNorm(self.dropout(torch.relu(self.dense(x)))))


def make_model(dropout: float = 0.0, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout)


def make_dataset(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, FEATURES, generator=gen),
        "labels": torch.randint(0, CLASSES, (n,), generator=gen),
        "idx": torch.arange(n),  # lets a loss_step see which examples it got
    }


def ce_loss(model: nn.Module, batch: dict[str, torch.Tensor], state: TrainState) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["labels"])  # a mean over the batch


def saver(model: nn.Module):
    def save(folder: str) -> None:
        torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
    return save


def config(out: Path, **kw) -> TrainConfig:
    values = dict(output_dir=str(out), per_device_batch_size=4, learning_rate=0.05, num_train_epochs=1.0,
                  logging_steps=0)
    values.update(kw)
    return TrainConfig(**values)


def run_train(model: nn.Module, dataset, cfg: TrainConfig, loss_step=ce_loss, groups=None, on_log=None,
              tb_prefix="", **kw):
    """One stage named "checkpoint" on the default batch source; its result."""
    if groups is None:
        groups = param_groups(model.named_parameters(), cfg.learning_rate, cfg.weight_decay)
    stage = Stage("checkpoint", loss_step, lambda: groups, on_log=on_log, tb_prefix=tb_prefix)
    (result,) = train(CTX, cfg, model, [stage], dataset, saver(model), **kw)
    return result


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def hidden_leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".") or ".tmp" in name or "saving" in name]


class Recorder:
    """A loss_step that records (epoch, global_step, example indices) of every micro-batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, list[int]]] = []

    def __call__(self, model, batch, state):
        self.calls.append((state.epoch, state.global_step, batch["idx"].tolist()))
        return ce_loss(model, batch, state)


# --------------------------------------------------------------------------------------------- 1. param groups


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(2, 2)
        self.LayerNorm = nn.LayerNorm(2)
        self.encoder = nn.Module()
        self.encoder.layer_norm = nn.LayerNorm(2)
        self.mask_scores = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Linear(2, 2)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def _settings_by_name(groups) -> dict[str, tuple[float, float]]:
    out = {}
    for group in groups:
        assert len(group["names"]) == len(group["params"])
        for name in group["names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (group["lr"], group["weight_decay"])
    return out


def test_param_groups_no_decay_overrides_and_frozen():
    model = Grouped()
    overrides = [(lambda n: "mask_scores" in n, {"lr": 0.5})]
    groups = param_groups(model.named_parameters(), 1e-3, 0.01, overrides)
    settings = _settings_by_name(groups)
    assert settings == {
        "dense.weight": (1e-3, 0.01),
        "dense.bias": (1e-3, 0.0),
        "LayerNorm.weight": (1e-3, 0.0),
        "LayerNorm.bias": (1e-3, 0.0),
        "encoder.layer_norm.weight": (1e-3, 0.0),
        "encoder.layer_norm.bias": (1e-3, 0.0),
        "mask_scores": (0.5, 0.01),
    }
    # The params in each group are the very tensors named there, and frozen ones are nowhere.
    named = dict(model.named_parameters())
    for group in groups:
        assert all(p is named[n] for n, p in zip(group["names"], group["params"]))
        assert all(p.requires_grad for p in group["params"])
    # One group per distinct setting: decay, no decay, override.
    assert len(groups) == 3


def test_param_groups_override_on_bias_keeps_no_decay_and_first_match_wins():
    model = Grouped()
    overrides = [(lambda n: n.startswith("dense"), {"lr": 0.3}), (lambda n: "dense" in n, {"lr": 0.9})]
    settings = _settings_by_name(param_groups(model.named_parameters(), 1e-3, 0.05, overrides))
    assert settings["dense.weight"] == (0.3, 0.05)
    assert settings["dense.bias"] == (0.3, 0.0)
    assert settings["LayerNorm.weight"] == (1e-3, 0.0)
    assert settings["mask_scores"] == (1e-3, 0.05)


class DecayProbe(nn.Module):
    """TinyNet plus a `probe` Linear whose gradient is exactly zero: Adam moves it by 0, so only weight decay
    (p *= 1 - lr * weight_decay) can change it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.probe = nn.Linear(3, 1)
        self.mask_scores = nn.Parameter(torch.zeros(2))


def probe_loss(model, batch, state):
    probe = model.probe
    return (ce_loss(model.net, batch, state) + 0.0 * (probe.weight.sum() + probe.bias.sum())
            + 0.0 * model.mask_scores.sum())


def test_default_weight_decay_is_zero_and_torch_default_does_not_leak(tmp_path):
    assert TrainConfig(output_dir="x").weight_decay == 0.0
    data = make_dataset(8)
    # Groups built by the caller without a weight_decay key: the config default (0.0) must apply, never
    # AdamW's own default of 0.01.
    model = DecayProbe()
    before = clone_state(model.probe)
    cfg = config(tmp_path / "a", learning_rate=0.1, save_steps=2)
    groups = [{"params": list(model.parameters())}]
    assert run_train(model, data, cfg, probe_loss, groups).global_step == 2
    assert_same_weights(clone_state(model.probe), before)
    saved = torch.load(tmp_path / "a" / "checkpoint-000002" / "optimizer.pt", weights_only=True)
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.0]

    # Groups from param_groups(weight_decay=0.0): the probe is untouched too.
    model = DecayProbe()
    cfg = config(tmp_path / "b", learning_rate=0.1)
    run_train(model, data, cfg, probe_loss)
    assert_same_weights(clone_state(model.probe), before)


def test_weight_decay_and_lr_override_reach_the_optimizer(tmp_path):
    data = make_dataset(8)  # batch 4 -> 2 optimization steps
    model = DecayProbe()
    before = clone_state(model.probe)
    cfg = config(tmp_path, learning_rate=0.1, weight_decay=0.1, save_steps=2)
    groups = param_groups(model.named_parameters(), 0.1, 0.1, [(lambda n: "mask_scores" in n, {"lr": 0.7})])
    run_train(model, data, cfg, probe_loss, groups)
    # Linear decay without warmup over 2 steps: lr 0.1 then 0.05, so the weight shrinks by
    # (1 - 0.1 * 0.1) * (1 - 0.05 * 0.1) = 0.99 * 0.995; the bias is in the no-decay group.
    assert torch.allclose(model.probe.weight, before["weight"] * (0.99 * 0.995), rtol=1e-6, atol=0)
    assert torch.equal(model.probe.bias, before["bias"])
    # mask_scores: lr 0.7 with decay 0.1 on a zero tensor stays zero; its group carries its own lr.
    saved = torch.load(tmp_path / "checkpoint-000002" / "optimizer.pt", weights_only=True)
    found = sorted((g["initial_lr"], g["weight_decay"], len(g["params"])) for g in saved["param_groups"])
    n_no_decay = sum(1 for n, _ in model.named_parameters() if "bias" in n or "LayerNorm" in n)
    n_decay = sum(1 for n, _ in model.named_parameters() if n != "mask_scores") - n_no_decay
    assert found == [(0.1, 0.0, n_no_decay), (0.1, 0.1, n_decay), (0.7, 0.1, 1)]
    # After the last step the schedule has reached 0 for every group.
    assert all(g["lr"] == 0.0 for g in saved["param_groups"])


# --------------------------------------------------------------------------------------------- 2. step counting


@pytest.mark.parametrize("n, batch, accum, epochs", [
    (10, 3, 2, 2),  # 4 batches/epoch -> 2 updates
    (10, 3, 3, 2),  # 4 batches/epoch -> 1 update, the 4th micro-batch is dropped
    (11, 2, 3, 1),  # 6 batches -> 2 updates
    (8, 4, 1, 3),   # 2 batches -> 2 updates
])
def test_step_count_drops_leftover_micro_batches(tmp_path, n, batch, accum, epochs):
    rec = Recorder()
    cfg = config(tmp_path, per_device_batch_size=batch, gradient_accumulation_steps=accum, num_train_epochs=epochs)
    result = run_train(make_model(), make_dataset(n), cfg, rec)
    updates = math.ceil(n / batch) // accum
    assert result.global_step == updates * epochs
    assert len(rec.calls) == updates * accum * epochs
    for epoch in range(epochs):
        calls = [c for c in rec.calls if c[0] == epoch]
        assert len(calls) == updates * accum
        seen = [i for _, _, idx in calls for i in idx]
        assert len(seen) == len(set(seen)), "an example came twice in one epoch"
        # micro-batch k of the epoch belongs to optimization step epoch * updates + k // accum
        assert [c[1] for c in calls] == [epoch * updates + k // accum for k in range(len(calls))]
    orders = {tuple(i for c in rec.calls if c[0] == e for i in c[2]) for e in range(epochs)}
    assert len(orders) == epochs, "every epoch should be shuffled differently"


def test_max_steps_overrides_epochs_and_stops_exactly(tmp_path):
    rec = Recorder()
    cfg = config(tmp_path / "a", per_device_batch_size=3, max_steps=6, num_train_epochs=1)  # 4 updates/epoch
    assert run_train(make_model(), make_dataset(10), cfg, rec).global_step == 6
    assert len(rec.calls) == 6 and {c[0] for c in rec.calls} == {0, 1}
    rec = Recorder()
    cfg = config(tmp_path / "b", per_device_batch_size=3, max_steps=3, num_train_epochs=50)
    assert run_train(make_model(), make_dataset(10), cfg, rec).global_step == 3
    assert len(rec.calls) == 3 and {c[0] for c in rec.calls} == {0}


@pytest.mark.parametrize("epochs, expected", [(1.5, 6), (0.25, 1), (2.0, 8)])
def test_fractional_epochs(tmp_path, epochs, expected):
    rec = Recorder()
    cfg = config(tmp_path, per_device_batch_size=2, num_train_epochs=epochs)  # 8 examples: 4 updates/epoch
    assert run_train(make_model(), make_dataset(8), cfg, rec).global_step == expected
    assert len(rec.calls) == expected


def test_too_few_batches_for_accumulation_is_a_user_error(tmp_path):
    cfg = config(tmp_path, per_device_batch_size=2, gradient_accumulation_steps=3)  # 3 examples: 2 batches
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        run_train(make_model(), make_dataset(3), cfg)


# --------------------------------------------------------------------------------------------- 3. accumulation


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    # epoch_batches draws one permutation of range(n) from (seed, epoch) alone, independent of the batch
    # size, and cuts it into consecutive batches. So 2 micro-batches of 4 are exactly the 8 examples of the
    # big batch: perm[0:4] + perm[4:8] == perm[0:8]. With n = 32 (a multiple of 8) no step has a short batch
    # or a dropped leftover. With dropout off, mean loss / 2 summed over the two halves is the mean over 8, so
    # both runs take the same gradient steps (up to float rounding).
    data = make_dataset(32)
    runs = {}
    for batch, accum in [(8, 1), (4, 2)]:
        model, rec = make_model(dropout=0.0), Recorder()
        cfg = config(tmp_path / f"b{batch}", per_device_batch_size=batch, gradient_accumulation_steps=accum,
                     num_train_epochs=2, learning_rate=0.05, max_grad_norm=1.0)
        result = run_train(model, data, cfg, rec)
        per_step: dict[int, list[int]] = {}
        for _, step, idx in rec.calls:
            per_step.setdefault(step, []).extend(idx)
        runs[batch] = (clone_state(model), per_step, result)
    (big, big_steps, big_result), (small, small_steps, small_result) = runs[8], runs[4]
    assert big_result.global_step == small_result.global_step == 8
    assert big_steps == small_steps  # the same examples, in the same order, for every optimization step
    assert big_result.average_loss == pytest.approx(small_result.average_loss, rel=1e-5)
    for key in big:
        assert torch.allclose(big[key], small[key], atol=1e-5, rtol=1e-5), key
    assert not torch.allclose(big["dense.weight"], make_model().dense.weight.detach(), atol=1e-3)  # it trained


# --------------------------------------------------------------------------------------------- 4. exact resume

# 12 examples, batch 2, accumulation 2: 6 micro-batches = 3 updates per epoch; 3 epochs = 9 steps;
# checkpoints at 2, 4, 6 (the end of epoch 1) and 8. Dropout is on, so resuming needs the RNG state.
RESUME_N, RESUME_KW = 12, dict(per_device_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=3,
                               save_steps=2, learning_rate=0.05)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    model = make_model(dropout=0.3)
    result = run_train(model, make_dataset(RESUME_N), config(out, **RESUME_KW))
    return out, clone_state(model), result


def resume(out: Path, checkpoint: Path):
    model = make_model(dropout=0.3, seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True))
    result = run_train(model, make_dataset(RESUME_N), config(out, **RESUME_KW), resume_from=str(checkpoint))
    return clone_state(model), result


def test_uninterrupted_run_writes_complete_checkpoints(full_run):
    out, _, result = full_run
    assert result.global_step == 9
    names = ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006", "checkpoint-000008"]
    assert sorted(os.listdir(out)) == names  # no .tmp folder, no log (logging_steps=0)
    assert result.last_checkpoint == str(out / "checkpoint-000008")
    for name in names:
        assert set(os.listdir(out / name)) == CHECKPOINT_FILES
    state = read_checkpoint_state(str(out / "checkpoint-000006"))
    assert (state.global_step, state.epoch, state.step_in_epoch, state.total_steps) == (6, 1, 3, 9)
    assert state.stage == "checkpoint" and state.stage_index == 0
    state = read_checkpoint_state(str(out / "checkpoint-000004"))
    assert (state.global_step, state.epoch, state.step_in_epoch) == (4, 1, 1)
    assert find_checkpoints(str(out)) == [str(out / n) for n in names]
    assert resolve_resume_path("latest", str(out)) == str(out / "checkpoint-000008")


@pytest.mark.parametrize("step", [2, 4, 6], ids=["epoch0-mid", "epoch1-mid", "epoch-boundary"])
def test_resume_is_exact(full_run, tmp_path, step):
    out, final, result = full_run
    weights, resumed = resume(tmp_path, out / f"checkpoint-{step:06d}")
    assert resumed.global_step == 9
    assert_same_weights(weights, final)
    assert resumed.average_loss == result.average_loss  # loss_sum was restored too
    # The resumed run writes the later checkpoints, identical to the uninterrupted run's.
    later = [f"checkpoint-{s:06d}" for s in range(step + 2, 9, 2)]
    assert sorted(os.listdir(tmp_path)) == later
    for name in later:
        assert_same_weights(torch.load(tmp_path / name / "model.pt", weights_only=True),
                            torch.load(out / name / "model.pt", weights_only=True))


def test_resume_without_rng_state_differs(full_run, tmp_path, caplog):
    # The control for test_resume_is_exact: dropout makes the RNG state matter, so the equality above is not
    # a given.
    out, final, _ = full_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint-000004", ckpt)
    os.remove(ckpt / "rng_state_0.pt")
    with caplog.at_level("WARNING", logger="common.checkpoint"):
        weights, _ = resume(tmp_path / "out", ckpt)
    assert "no RNG state" in caplog.text
    assert not torch.equal(weights["dense.weight"], final["dense.weight"])


# --------------------------------------------------------------------------------------------- 5. finding checkpoints


def fake_checkpoint(folder: Path, step: int, stage_index: int = 0, files=("optimizer.pt", "scheduler.pt"),
                    state: bool = True) -> Path:
    folder.mkdir(parents=True)
    for name in files:
        torch.save({}, folder / name)  # a whole (if empty) archive, as verify_checkpoint wants
    if state:
        ts = TrainState(global_step=step, stage=folder.name.split("-")[0], extra={"stage_index": stage_index})
        (folder / "trainer_state.json").write_text(json.dumps(asdict(ts)))
    return folder


def test_find_checkpoints_orders_by_stored_progress(tmp_path):
    fake_checkpoint(tmp_path / "a-late", 20, stage_index=1)
    fake_checkpoint(tmp_path / "b-mid", 50)
    fake_checkpoint(tmp_path / "c-early", 5)
    fake_checkpoint(tmp_path / "checkpoint-9", 9)
    fake_checkpoint(tmp_path / "checkpoint-000010", 10)
    fake_checkpoint(tmp_path / ".hidden-000999.tmp", 999, stage_index=9)  # a half-written one
    fake_checkpoint(tmp_path / "no-state", 0, state=False)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    os.utime(tmp_path / "c-early", (1e9, 2e9))  # newest mtime: must not matter either
    expected = ["c-early", "checkpoint-9", "checkpoint-000010", "b-mid", "a-late"]
    assert find_checkpoints(str(tmp_path)) == [str(tmp_path / n) for n in expected]
    assert resolve_resume_path("latest", str(tmp_path)) == str(tmp_path / "a-late")
    assert find_checkpoints(str(tmp_path / "missing")) == []


def test_read_checkpoint_state_names_the_missing_file(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "checkpoint-000004", 4, files=("optimizer.pt",))
    with pytest.raises(UserError, match="scheduler.pt"):
        read_checkpoint_state(str(ckpt))
    with pytest.raises(UserError, match="scheduler.pt"):
        resolve_resume_path(str(ckpt), str(tmp_path))
    ckpt = fake_checkpoint(tmp_path / "checkpoint-000006", 6, files=("scheduler.pt",))
    with pytest.raises(UserError, match="optimizer.pt"):
        read_checkpoint_state(str(ckpt))
    ckpt = fake_checkpoint(tmp_path / "checkpoint-000008", 8, state=False)
    with pytest.raises(UserError, match="trainer_state.json"):
        read_checkpoint_state(str(ckpt))
    good = fake_checkpoint(tmp_path / "checkpoint-000010", 10)
    assert read_checkpoint_state(str(good)).global_step == 10
    assert resolve_resume_path(str(good), str(tmp_path)) == str(good)


def test_resolve_resume_path_errors(tmp_path):
    assert resolve_resume_path(None, str(tmp_path)) is None
    assert resolve_resume_path("", str(tmp_path)) is None
    with pytest.raises(UserError, match="no such folder"):
        resolve_resume_path(str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_resume_path("latest", str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_resume_path("latest", str(tmp_path / "missing"))


@pytest.mark.parametrize("content", [
    json.dumps({"global_step": 500, "epoch": 1.5, "log_history": [], "best_metric": None}),  # transformers' Trainer
    '{"global_step": 5, "epo',  # damaged
], ids=["hf-trainer", "damaged"])
def test_foreign_or_damaged_trainer_state_is_a_user_error(tmp_path, content):
    ckpt = fake_checkpoint(tmp_path / "checkpoint-500", 500, state=False)
    (ckpt / "trainer_state.json").write_text(content)
    with pytest.raises(UserError, match="checkpoint-500"):
        read_checkpoint_state(str(ckpt))


# --------------------------------------------------------------------------------------------- 6. divergence


def test_nan_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    def nan_at_step_4(model, batch, state):
        loss = ce_loss(model, batch, state)
        return loss * float("nan") if state.global_step == 3 else loss  # step 4 is the 4th update

    model = make_model(dropout=0.3)
    cfg = config(tmp_path, per_device_batch_size=2, num_train_epochs=2, save_steps=1)  # 12 ex.: 6 steps/epoch
    with pytest.raises(TrainingDiverged) as info:
        run_train(model, make_dataset(12), cfg, nan_at_step_4)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert re.search(r"\bstep 4\b", message), message
    assert str(tmp_path / "checkpoint-000003") in message
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]
    last = tmp_path / "checkpoint-000003"
    assert set(os.listdir(last)) == CHECKPOINT_FILES
    assert read_checkpoint_state(str(last)).global_step == 3
    weights = torch.load(last / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())
    # The model itself was not stepped with the NaN gradient either.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # And it is resumable.
    torch.load(last / "optimizer.pt", weights_only=True)
    assert resolve_resume_path("latest", str(tmp_path)) == str(last)


def test_nan_before_any_checkpoint_says_so(tmp_path):
    cfg = config(tmp_path, per_device_batch_size=2)
    with pytest.raises(TrainingDiverged, match=r"step 1\b.*no checkpoint"):
        run_train(make_model(), make_dataset(4), cfg, lambda m, b, s: ce_loss(m, b, s) * float("inf"))


# --------------------------------------------------------------------------------------------- 7. logging


def read_tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars from tensorboard event files (TFRecord framing: u64 length, u32 crc, Event proto, u32 crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(str(folder / "events.out.tfevents.*"))):
        data, pos = Path(path).read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_log_history_schedule_and_tensorboard(tmp_path):
    from tensorboardX import SummaryWriter

    losses: list[float] = []

    def loss_step(model, batch, state):
        loss = ce_loss(model, batch, state)
        losses.append(loss.item())
        return loss, {"aux": float(state.global_step)}

    out, tb_dir = tmp_path / "out", tmp_path / "tb"
    # 16 examples, batch 2: 8 steps; warmup 3; lr 0.1; a log line every 2 steps.
    cfg = config(out, per_device_batch_size=2, learning_rate=0.1, warmup_steps=3, logging_steps=2)
    writer = SummaryWriter(logdir=str(tb_dir))
    try:
        result = run_train(make_model(), make_dataset(16), cfg, loss_step, tb_writer=writer, tb_prefix="s1/",
                           on_log=lambda state: {"eval_acc": state.global_step / 10})
    finally:
        writer.close()
    assert result.global_step == 8 and len(losses) == 8
    assert result.average_loss == pytest.approx(sum(losses) / 8, rel=1e-6)
    assert result.last_checkpoint is None and result.seconds > 0 and result.examples_per_second > 0
    lines = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    # lr logged after step s is the one for the next step: 0.1 * s / 3 while warming up, then
    # 0.1 * (8 - s) / (8 - 3).
    expected_lr = {2: 0.1 * 2 / 3, 4: 0.1 * 4 / 5, 6: 0.1 * 2 / 5, 8: 0.0}
    for record in lines:
        step = record["step"]
        assert record["lr"] == pytest.approx(expected_lr[step], abs=1e-12)
        assert record["loss"] == pytest.approx((losses[step - 2] + losses[step - 1]) / 2, rel=1e-6)
        # The loss step's scalars are averaged over the logging window (steps s-1 and s, whose states are
        # before their updates: s-2 and s-1).
        assert record["aux"] == pytest.approx(step - 1.5)
        assert record["eval_acc"] == pytest.approx(step / 10)
        assert record["stage"] == "checkpoint" and record["epoch"] == 0
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] >= 0
    scalars = read_tb_scalars(tb_dir)
    assert {"s1/loss", "s1/lr", "s1/grad_norm", "s1/aux", "s1/eval_acc"} <= set(scalars)
    assert [s for s, _ in scalars["s1/lr"]] == [2, 4, 6, 8]
    assert [v for _, v in scalars["s1/lr"]] == pytest.approx([expected_lr[s] for s in (2, 4, 6, 8)], abs=1e-7)


def test_lr_schedule_with_warmup_proportion(tmp_path):
    cfg = config(tmp_path, per_device_batch_size=1, learning_rate=1.0, warmup_proportion=0.25, logging_steps=1)
    run_train(make_model(), make_dataset(8), cfg)  # 8 steps, warmup int(0.25 * 8) = 2
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log_history.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0], abs=1e-12)


# --------------------------------------------------------------------------------------------- 8. predict, batching


def predict_step(batch):
    return {"idx": batch["idx"], "twice": batch["x"].sum(dim=1) * 2, "length": batch["attention_mask"].shape[1]
            * torch.ones_like(batch["idx"])}


def padded_dataset(n: int, seq: int = 9) -> dict[str, torch.Tensor]:
    data = make_dataset(n)
    lengths = (torch.arange(n) % (seq - 1)) + 1  # 1 .. seq-1 real tokens, right-padded
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    data["attention_mask"] = mask
    data["input_ids"] = (torch.arange(n * seq).view(n, seq) + 5) * mask
    return data


@pytest.mark.parametrize("n, batch", [(10, 3), (10, 4), (7, 7), (5, 8), (1, 2)])
def test_predict_returns_every_example_once_in_order(n, batch):
    data = padded_dataset(n)
    out, seconds = predict(CTX, data, batch, predict_step)
    assert seconds >= 0
    assert out["idx"].tolist() == list(range(n))
    np.testing.assert_allclose(out["twice"], (data["x"].sum(dim=1) * 2).numpy(), rtol=1e-6)
    assert out["twice"].dtype == np.float32 and out["idx"].dtype == np.int64


def test_predict_merges_two_ranks_into_dataset_order(monkeypatch):
    # No process group here: run each fake rank once to capture what it would send, then again with a gather
    # that hands back both payloads, as all_gather_object would.
    n, batch = 11, 3
    data = padded_dataset(n)
    payloads = {}

    class Captured(Exception):
        pass

    def capture(obj, ctx):
        payloads[ctx.rank] = obj
        raise Captured

    monkeypatch.setattr(training, "all_gather_objects", capture)
    for rank in (0, 1):
        with pytest.raises(Captured):
            predict(DistContext(device=CPU, rank=rank, world_size=2), data, batch, predict_step)
    assert payloads[0][0] == list(range(0, n, 2)) and payloads[1][0] == list(range(1, n, 2))
    monkeypatch.setattr(training, "all_gather_objects", lambda obj, ctx: [payloads[0], payloads[1]])
    for rank in (0, 1):
        out, _ = predict(DistContext(device=CPU, rank=rank, world_size=2), data, batch, predict_step)
        assert out["idx"].tolist() == list(range(n))
        np.testing.assert_allclose(out["twice"], (data["x"].sum(dim=1) * 2).numpy(), rtol=1e-6)


def test_make_batch_dynamic_padding():
    data = padded_dataset(8)  # rows 0..7 have 1..8 real tokens of 9
    data["soft_labels"] = torch.rand(8, 3)  # 2-D but not [B, S]: never trimmed
    rows = [0, 2, 1]  # 1, 3 and 2 real tokens: trimmed to 3 columns
    batch = make_batch(data, rows, CPU, dynamic_padding=True)
    assert batch["attention_mask"].shape == (3, 3) and batch["input_ids"].shape == (3, 3)
    assert torch.equal(batch["input_ids"], data["input_ids"][rows, :3])
    assert torch.equal(batch["attention_mask"], data["attention_mask"][rows, :3])
    assert batch["attention_mask"].sum().item() == 6  # no real token was cut
    assert torch.equal(batch["labels"], data["labels"][rows])
    assert torch.equal(batch["idx"], torch.tensor(rows))
    assert batch["x"].shape == (3, FEATURES) and batch["soft_labels"].shape == (3, 3)
    # Without dynamic padding, or when the longest row fills the width, nothing is cut.
    assert make_batch(data, rows, CPU, dynamic_padding=False)["input_ids"].shape == (3, 9)
    full = padded_dataset(8)
    full["attention_mask"][3] = 1
    assert make_batch(full, [3, 0], CPU, dynamic_padding=True)["input_ids"].shape == (2, 9)
    # No attention_mask: nothing to trim by.
    assert make_batch(make_dataset(4), [2, 3], CPU, dynamic_padding=True)["x"].shape == (2, FEATURES)


def test_make_batch_dynamic_padding_keeps_the_real_tokens_of_left_padded_rows():
    data = {
        "attention_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]),
        "input_ids": torch.tensor([[0, 0, 0, 7, 8], [0, 0, 5, 6, 9]]),
        "labels": torch.tensor([0, 1]),
    }
    batch = make_batch(data, [0, 1], CPU, dynamic_padding=True)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["attention_mask"].sum().item() == 5  # every real token survives the trim
    assert batch["input_ids"][batch["attention_mask"].bool()].tolist() == [7, 8, 5, 6, 9]


@pytest.mark.parametrize("n", [7, 8, 1])
def test_epoch_batches_two_ranks(n):
    batch = 2
    per_rank = [epoch_batches(n, batch, seed=42, epoch=3, ctx=DistContext(device=CPU, rank=r, world_size=2))
                for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == math.ceil(math.ceil(n / 2) / batch)
    flat = [[i for b in batches for i in b] for batches in per_rank]
    assert len(flat[0]) == len(flat[1]) == math.ceil(n / 2)
    together = flat[0] + flat[1]
    assert set(together) == set(range(n))
    assert len(together) - n == (n % 2)  # one wrapped-around duplicate exactly when n is odd
    # Deterministic: the same (seed, epoch) gives each rank the same share again.
    assert per_rank[0] == epoch_batches(n, batch, seed=42, epoch=3, ctx=DistContext(device=CPU, world_size=2))


def test_epoch_batches_single_rank_is_a_seeded_permutation():
    a = epoch_batches(10, 3, seed=1, epoch=0, ctx=CTX)
    assert [len(b) for b in a] == [3, 3, 3, 1]
    assert sorted(i for b in a for i in b) == list(range(10))
    assert a == epoch_batches(10, 3, seed=1, epoch=0, ctx=CTX)
    assert a != epoch_batches(10, 3, seed=1, epoch=1, ctx=CTX)
    assert a != epoch_batches(10, 3, seed=2, epoch=0, ctx=CTX)


@pytest.mark.parametrize("n, world", [(7, 2), (10, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_indices_cover_each_index_once(n, world):
    shards = [shard_indices(n, DistContext(device=CPU, rank=r, world_size=world)) for r in range(world)]
    together = [i for s in shards for i in s]
    assert sorted(together) == list(range(n))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


# --------------------------------------------------------------------------------------------- 9. atomic folder save


def test_save_folder_atomic_failure_leaves_previous_files(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "model.pt").write_bytes(b"old weights")
    (dest / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def broken(folder):
        Path(folder, "config.json").write_text('{"new": true}')
        Path(folder, "model.pt").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_folder_atomic(broken, str(dest))
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert hidden_leftovers(dest) == []


def test_save_folder_atomic_replaces_files_and_folders(tmp_path):
    dest = tmp_path / "model"
    (dest / "tokenizer").mkdir(parents=True)
    (dest / "tokenizer" / "stale.txt").write_text("old")
    (dest / "model.pt").write_bytes(b"old")
    (dest / "results.json").write_text("{}")

    def good(folder):
        Path(folder, "model.pt").write_bytes(b"new")
        Path(folder, "tokenizer").mkdir()
        Path(folder, "tokenizer", "vocab.txt").write_text("[PAD]\n")

    save_folder_atomic(good, str(dest))
    assert (dest / "model.pt").read_bytes() == b"new"
    assert sorted(os.listdir(dest / "tokenizer")) == ["vocab.txt"]
    assert (dest / "results.json").read_text() == "{}"  # files the save does not write are kept
    assert hidden_leftovers(dest) == []
    save_folder_atomic(good, str(tmp_path / "fresh" / "dir"))  # a missing destination is created
    assert (tmp_path / "fresh" / "dir" / "model.pt").read_bytes() == b"new"


def test_write_json_atomic_replaces_the_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"old": 1}')
    write_json_atomic(str(target), {"b": 2, "a": float("nan"), "path": Path("x")})
    loaded = json.loads(target.read_text())
    assert loaded["b"] == 2 and loaded["path"] == "x" and math.isnan(loaded["a"])  # default=str, NaN allowed
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_json_atomic_failure_leaves_nothing_behind(tmp_path):
    target = tmp_path / "results.json"
    target.write_text('{"old": 1}')
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        write_json_atomic(str(target), {"x": loop})
    assert target.read_text() == '{"old": 1}'
    assert os.listdir(tmp_path) == ["results.json"]


# --------------------------------------------------------------------------------------------- small pieces


def test_train_config_from_args_and_precision_flags():
    import argparse

    args = argparse.Namespace(per_gpu_train_batch_size=16, learning_rate=3e-5, weight_decay=0.1, seed=7,
                              output_dir="ignored", unrelated_flag=True)
    cfg = TrainConfig.from_args(args, output_dir="out", max_steps=3)
    assert (cfg.per_device_batch_size, cfg.learning_rate, cfg.weight_decay, cfg.seed) == (16, 3e-5, 0.1, 7)
    assert (cfg.output_dir, cfg.max_steps) == ("out", 3)
    assert check_precision_flags(False, False, CPU) == []
    assert check_precision_flags(False, True, CPU) == []
    assert len(check_precision_flags(True, False, CPU)) == 1
    assert len(check_precision_flags(True, True, torch.device("cuda"))) == 1


def test_bf16_on_cpu_trains(tmp_path):
    model = make_model()
    before = clone_state(model)
    result = run_train(model, make_dataset(8), config(tmp_path, bf16=True))
    assert result.global_step == 2 and math.isfinite(result.average_loss)
    assert not torch.equal(model.dense.weight, before["dense.weight"])
    assert model.dense.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------- stages, plans, sources


def two_stages(model: nn.Module, cfg: TrainConfig, events: list, lr2: float = 0.01) -> list[Stage]:
    """Stage one trains everything; stage two freezes `dense` and trains the rest at its own learning rate."""
    def freeze() -> None:
        events.append("enter two")
        model.dense.requires_grad_(False)

    return [
        Stage("one", ce_loss, lambda: param_groups(model.named_parameters(), cfg.learning_rate, 0.0),
              on_end=lambda r: events.append(("end", r.stage, r.global_step))),
        Stage("two", ce_loss, lambda: param_groups(model.named_parameters(), lr2, 0.0), enter=freeze,
              on_end=lambda r: events.append(("end", r.stage, r.global_step))),
    ]


def test_stages_run_in_order_with_their_own_groups(tmp_path):
    model, events = make_model(dropout=0.3), []
    cfg = config(tmp_path, per_device_batch_size=2, num_train_epochs=1, save_steps=3)  # 12 rows: 6 steps each
    frozen_before = model.dense.weight.detach().clone()
    seen_lrs = []
    stages = two_stages(model, cfg, events)
    original = stages[1].param_groups
    stages[1] = Stage("two", ce_loss, lambda: seen_lrs.append(original()) or seen_lrs[-1], enter=stages[1].enter,
                      on_end=stages[1].on_end)
    results = train(CTX, cfg, model, stages, make_dataset(12), saver(model))
    assert [(r.stage, r.global_step) for r in results] == [("one", 6), ("two", 6)]
    assert events == [("end", "one", 6), "enter two", ("end", "two", 6)]
    assert {g["lr"] for g in seen_lrs[0]} == {0.01}
    assert all("dense" not in n for g in seen_lrs[0] for n in g["names"])  # frozen by `enter`, left out
    assert not torch.equal(model.dense.weight, frozen_before)  # stage one trained it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("one", "two"))) == [
        "one-000003", "one-000006", "two-000003", "two-000006"]
    assert find_checkpoints(str(tmp_path))[-1].endswith("two-000006")  # stage order first, then step
    assert read_checkpoint_state(str(tmp_path / "two-000003")).stage_index == 1


@pytest.mark.parametrize("checkpoint", ["one-000003", "two-000003"])
def test_resume_finds_its_stage_and_is_exact(tmp_path, checkpoint):
    cfg_kw = dict(per_device_batch_size=2, num_train_epochs=1, save_steps=3)
    full = make_model(dropout=0.3)
    train(CTX, config(tmp_path / "full", **cfg_kw), full, two_stages(full, config(tmp_path, **cfg_kw), []),
          make_dataset(12), saver(full))
    model, events = make_model(dropout=0.3), []
    model.load_state_dict(torch.load(tmp_path / "full" / checkpoint / "model.pt", weights_only=True))
    if checkpoint.startswith("two"):
        model.dense.requires_grad_(False)
    cfg = config(tmp_path / "resumed", **cfg_kw)
    results = train(CTX, cfg, model, two_stages(model, cfg, events), make_dataset(12), saver(model),
                    resume_from=str(tmp_path / "full" / checkpoint))
    assert [r.stage for r in results] == (["one", "two"] if checkpoint.startswith("one") else ["two"])
    assert_same_weights(clone_state(model), clone_state(full))


def test_resume_of_an_unknown_stage_is_a_user_error(tmp_path, full_run):
    out, _, _ = full_run
    model = make_model()
    stage = Stage("other", ce_loss, lambda: param_groups(model.named_parameters(), 0.05, 0.0))
    with pytest.raises(UserError, match="stage 'checkpoint'.*stages: other"):
        train(CTX, config(tmp_path, **RESUME_KW), model, [stage], make_dataset(RESUME_N), saver(model),
              resume_from=str(out / "checkpoint-000004"))


@pytest.mark.parametrize("change", [dict(num_train_epochs=4), dict(per_device_batch_size=3), dict(max_steps=20),
                                    dict(warmup_steps=2)])
def test_resume_under_another_step_plan_is_refused(full_run, tmp_path, change):
    out, _, _ = full_run
    with pytest.raises(UserError, match="another step plan"):
        run_train(make_model(dropout=0.3), make_dataset(RESUME_N), config(tmp_path, **{**RESUME_KW, **change}),
                  resume_from=str(out / "checkpoint-000004"))
    # Flags that leave the plan alone (logging, checkpoint interval) may change.
    result = run_train(make_model(dropout=0.3), make_dataset(RESUME_N),
                       config(tmp_path / "ok", **{**RESUME_KW, "save_steps": 0, "logging_steps": 1}),
                       resume_from=str(out / "checkpoint-000004"))
    assert result.global_step == 9


@pytest.mark.parametrize("n, batch, accum, epochs, max_steps",
                         [(10, 3, 2, 2, -1), (11, 2, 3, 1.5, -1), (10, 3, 1, 1, 7)])
def test_step_plan_is_what_the_loop_does(tmp_path, n, batch, accum, epochs, max_steps):
    cfg = config(tmp_path, per_device_batch_size=batch, gradient_accumulation_steps=accum, num_train_epochs=epochs,
                 max_steps=max_steps, warmup_proportion=0.5)
    plan = plan_for_examples(n, cfg)
    assert isinstance(plan, StepPlan) and plan.warmup_steps == int(0.5 * plan.total_steps)
    rec = Recorder()
    assert run_train(make_model(), make_dataset(n), cfg, rec).global_step == plan.total_steps
    assert len({c[0] for c in rec.calls}) == plan.num_epochs
    assert plan_for_examples(n, cfg, world_size=2).batches_per_epoch == math.ceil(math.ceil(n / 2) / batch)


class ReversedSource(TensorBatches):
    """A batch source of its own: fixed, unshuffled batches in reverse order, each batch tagged."""

    def epoch(self, epoch, ctx):
        return [list(range(i, min(i + self.batch_size, self.num_examples)))
                for i in range(0, self.num_examples, self.batch_size)][::-1]

    def collate(self, indices, device):
        batch = super().collate(indices, device)
        batch["tag"] = torch.full((len(indices),), 7)
        return batch


def test_a_batch_source_decides_batches_and_collation(tmp_path):
    rec, tags = Recorder(), []

    def step(model, batch, state):
        tags.append(batch["tag"].tolist())
        return rec(model, batch, state)

    source, model = ReversedSource(make_dataset(6), batch_size=2), make_model()
    (result,) = train(CTX, config(tmp_path, num_train_epochs=1), model, [
        Stage("checkpoint", step, lambda: param_groups(model.named_parameters(), 0.05, 0.0))], source, saver(model))
    assert result.global_step == 3
    assert [c[2] for c in rec.calls] == [[4, 5], [2, 3], [0, 1]]
    assert tags == [[7, 7]] * 3


def test_scalars_are_averaged_over_every_micro_batch_of_the_window(tmp_path):
    def step(model, batch, state):
        return ce_loss(model, batch, state), {"rows": batch["idx"].float().mean(), "const": 2.0}

    cfg = config(tmp_path, per_device_batch_size=2, gradient_accumulation_steps=2, logging_steps=2,
                 num_train_epochs=1)  # 16 rows: 8 micro-batches, 4 steps, 2 log lines of 4 micro-batches each
    data = make_dataset(16)
    run_train(make_model(), data, cfg, step)
    lines = [json.loads(line) for line in (tmp_path / "log_history.jsonl").read_text().splitlines()]
    batches = epoch_batches(16, 2, cfg.seed, 0, CTX)
    for k, record in enumerate(lines):
        window = [i for b in batches[4 * k : 4 * k + 4] for i in b]
        assert record["rows"] == pytest.approx(sum(window) / len(window))
        assert record["const"] == 2.0


def test_session_seeds_each_rank_differently(tmp_path):
    from common.cli import Session

    draws = []
    for rank in (0, 1):
        Session(DistContext(device=CPU, rank=rank)).start(str(tmp_path), [], argparse_namespace(), {}, seed=5,
                                                          fresh=True)
        draws.append(torch.rand(3))
        assert torch.initial_seed() == 5 + rank
    assert not torch.equal(draws[0], draws[1])
    assert json.loads((tmp_path / "run_args.json").read_text())["args"] == {"x": 1}


def argparse_namespace():
    import argparse

    return argparse.Namespace(x=1)
