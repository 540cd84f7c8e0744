"""DeeBERT off-ramps around a stock transformers sequence classifier, with batched early exit.

The backbone is an unmodified `AutoModelForSequenceClassification` (BERT, RoBERTa, or any encoder whose
layers sit in one `nn.ModuleList`). An off-ramp (pooler + dropout + classifier, as DeeBERT's "highway")
reads the hidden states after each of the first L-1 layers; after layer L the stock head decides.

* Training: DeeBERT's two stages (backbone + head, then the off-ramps on the frozen backbone, all layers'
  hidden states from one stock forward with `output_hidden_states=True`), or PABEE's joint training (backbone
  and every exit at once, on the loss of exit i weighted by i). Off-ramps may also learn the final head's
  softened predictions (FastBERT's self-distillation).
* Early exit runs the stock forward with a pre-hook on every layer: before layer j runs, the off-ramp after
  layer j-1 scores the rows still in the batch, rows whose exit rule fires leave with those logits, and the
  layer (and every later one) only computes the rows that stay. No row waits for the slowest one, so early
  exit saves compute at every batch size, not only at batch size 1 as in the original. A rule that cannot
  fire (entropy threshold 0, patience 0 or longer than the off-ramps) runs the plain forward: no hooks, no
  off-ramps.

The off-ramps are saved beside the stock checkpoint (`off_ramps.safetensors` + `off_ramps.json`), so the
folder still loads in plain transformers as an ordinary classifier.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from common.distillation import soft_cross_entropy
from common.errors import UserError
from common.pretrained import find_encoder_layers

OFF_RAMPS_WEIGHTS = "off_ramps.safetensors"
OFF_RAMPS_CONFIG = "off_ramps.json"
# Checkpoint folder prefixes of DeeBERT's two training stages (backbone + head, then the off-ramps) and of
# PABEE's single joint stage.
STAGE1, STAGE2, JOINT_STAGE = "checkpoint-stage1", "checkpoint-stage2", "checkpoint-joint"
# What a training step optimises (EarlyExitModel.forward's `objective`; set_stage's trainable parts).
HEAD, OFF_RAMPS, JOINT = "head", "off_ramps", "joint"


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, -sum(p * log p) from a stable log-softmax (few kernels: early
    exit computes it after every layer)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class OffRamp(nn.Module):
    """DeeBERT's highway: tanh pooler on the first token, dropout, linear classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The linear layers as functions and dropout only in training: early exit runs this after every layer,
        # where each module call's overhead counts at batch size 1.
        pooled = torch.tanh(nn.functional.linear(hidden_states[:, 0], self.pooler.weight, self.pooler.bias))
        if self.training:
            pooled = self.dropout(pooled)
        return nn.functional.linear(pooled, self.classifier.weight, self.classifier.bias)


# ----------------------------------------------------------------------------------------------------------
# exit rules: each keeps a little per-row state that is sliced along with the batch


@dataclass(frozen=True)
class EntropyExit:
    """DeeBERT: leave at the first off-ramp whose prediction entropy is below `threshold` (0 never exits)."""

    threshold: float

    def init_state(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def decide(self, logits: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return entropy(logits) < self.threshold

    def can_exit(self, num_off_ramps: int) -> bool:
        return self.threshold > 0 and num_off_ramps > 0  # entropy is never below 0

    @property
    def label(self) -> str:
        return f"entropy={self.threshold:g}"


@dataclass(frozen=True)
class NeverFires(EntropyExit):
    """For measuring: early exit's whole machinery (hooks, every off-ramp, the entropy check and its host sync
    per layer) with a threshold no entropy is below: what early exit costs when no row leaves."""

    threshold: float = -1.0

    def can_exit(self, num_off_ramps: int) -> bool:
        return True

    @property
    def label(self) -> str:
        return "machinery only (never fires)"


@dataclass(frozen=True)
class PatienceExit:
    """PABEE (BERT Loses Patience): leave once `patience` consecutive off-ramps agree with the one before
    (same class; for regression, predictions within `regression_threshold`)."""

    patience: int
    regression: bool = False
    regression_threshold: float = 0.1

    def init_state(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
            "previous": torch.full((batch_size,), float("nan"), device=device),
        }

    def decide(self, logits: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.regression:
            current = logits.float().squeeze(-1)
            agree = (current - state["previous"]).abs() < self.regression_threshold
        else:
            current = logits.argmax(dim=-1).float()
            agree = current == state["previous"]  # NaN on the first off-ramp: never agrees
        state["count"] = torch.where(agree, state["count"] + 1, torch.zeros_like(state["count"]))
        state["previous"] = current
        # patience 0 would exit at the first off-ramp whatever it says; PABEE treats it as "never exit".
        return state["count"] >= self.patience if self.patience > 0 else torch.zeros_like(agree)

    def can_exit(self, num_off_ramps: int) -> bool:
        # n off-ramps give at most n - 1 agreements in a row.
        return 0 < self.patience < num_off_ramps

    @property
    def label(self) -> str:
        return f"patience={self.patience}"


ExitRule = EntropyExit | PatienceExit


class _AllExited(Exception):
    """Raised inside a layer pre-hook when no row is left; stops the stock forward early."""


# ----------------------------------------------------------------------------------------------------------


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The stock model's list of transformer layers (common.pretrained.find_encoder_layers)."""
    return find_encoder_layers(model)[1]


def _pooler_dense(model: PreTrainedModel) -> nn.Linear | None:
    """The stock head's pooler-like dense layer (BERT pooler, RoBERTa classification head), if any."""
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear):
        return pooler.dense
    head = getattr(model, "classifier", None)
    if head is not None and isinstance(getattr(head, "dense", None), nn.Linear):
        return head.dense
    return None


def is_regression(config: Any) -> bool:
    return config.num_labels == 1 or getattr(config, "problem_type", None) == "regression"


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return nn.functional.cross_entropy(logits.float(), labels)


@dataclass(frozen=True)
class SelfDistillation:
    """FastBERT's self-distillation: an off-ramp's loss is (1 - weight) * its task loss + weight * its distance
    to the final head's prediction (the teacher, never updated through this term): KL between the
    temperature-softened distributions (times T^2) for classification, the squared error for regression.
    weight 1 is FastBERT (off-ramps learn from the head alone), 0 is DeeBERT/PABEE (labels alone)."""

    weight: float
    temperature: float = 1.0

    def off_ramp_loss(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                      regression: bool) -> torch.Tensor:
        hard = task_loss(logits, labels, regression)
        if self.weight == 0:
            return hard
        teacher = teacher.detach()
        if regression:
            soft = nn.functional.mse_loss(logits.squeeze(-1).float(), teacher.squeeze(-1).float())
        else:
            soft = soft_cross_entropy(logits, teacher, self.temperature)
        return (1 - self.weight) * hard + self.weight * soft


NO_DISTILLATION = SelfDistillation(0.0)


class EarlyExitModel(nn.Module):
    """A stock sequence classifier plus one off-ramp after each of its first L-1 layers."""

    def __init__(self, backbone: PreTrainedModel, off_ramps: nn.ModuleList | None = None, trained: bool = True):
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        # Found once: the search walks every module, a cost early exit would otherwise pay per batch.
        self._layers = tuple(encoder_layers(backbone))
        self.num_layers = len(self._layers)
        self.regression = is_regression(config)
        if off_ramps is None:
            dropout = getattr(config, "hidden_dropout_prob", getattr(config, "dropout", 0.1))
            off_ramps = nn.ModuleList(
                OffRamp(config.hidden_size, config.num_labels, dropout) for _ in range(self.num_layers - 1)
            )
            self.off_ramps_trained = False
        else:
            self.off_ramps_trained = trained
        if len(off_ramps) != self.num_layers - 1:
            raise UserError(f"{len(off_ramps)} off-ramps for a {self.num_layers}-layer model (expected one fewer)")
        self.off_ramps = off_ramps

    # -- persistence --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> "EarlyExitModel":
        """Load the stock classifier from `path`, and its off-ramps when the folder holds them."""
        backbone = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        weights = os.path.join(path, OFF_RAMPS_WEIGHTS)
        meta_file = os.path.join(path, OFF_RAMPS_CONFIG)
        if not os.path.isfile(weights):
            return cls(backbone)
        if not os.path.isfile(meta_file):
            raise UserError(f"{path} has {OFF_RAMPS_WEIGHTS} but no {OFF_RAMPS_CONFIG}: the folder is incomplete")
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        config = backbone.config
        if meta["num_labels"] != config.num_labels or meta["hidden_size"] != config.hidden_size:
            raise UserError(
                f"{path}: off-ramps were trained for {meta['num_labels']} labels / hidden size "
                f"{meta['hidden_size']}, the model has {config.num_labels} / {config.hidden_size}"
            )
        ramps = nn.ModuleList(
            OffRamp(config.hidden_size, config.num_labels, meta.get("dropout", 0.1))
            for _ in range(meta["num_off_ramps"])
        )
        state = load_file(weights)
        missing, unexpected = ramps.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{path}/{OFF_RAMPS_WEIGHTS} does not match the model (missing {missing[:3]})")
        return cls(backbone, ramps.to(backbone.dtype), trained=bool(meta.get("trained", True)))

    def save_pretrained(self, folder: str) -> None:
        """Stock checkpoint (loads in plain transformers) plus the off-ramps beside it."""
        self.backbone.save_pretrained(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.off_ramps.state_dict().items()}
        save_file(state, os.path.join(folder, OFF_RAMPS_WEIGHTS))
        meta = {
            "num_off_ramps": len(self.off_ramps),
            "hidden_size": self.backbone.config.hidden_size,
            "num_labels": self.backbone.config.num_labels,
            "dropout": self.off_ramps[0].dropout.p if len(self.off_ramps) else 0.1,
            "trained": self.off_ramps_trained,
        }
        with open(os.path.join(folder, OFF_RAMPS_CONFIG), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

    # -- training -----------------------------------------------------------------------------------------

    def set_stage(self, trainable: str | None) -> None:
        """Which parts train: HEAD (DeeBERT stage one: the backbone and its head), OFF_RAMPS (stage two: the
        off-ramps on the frozen backbone), JOINT (PABEE: everything), None (nothing). Off-ramps about to be
        trained for the first time start their pooler from the model's own pooler, as DeeBERT copied the
        pre-trained pooler into its highways."""
        if trainable not in (HEAD, OFF_RAMPS, JOINT, None):
            raise ValueError(f"unknown training stage {trainable!r}")
        for p in self.backbone.parameters():
            p.requires_grad_(trainable in (HEAD, JOINT))
        for p in self.off_ramps.parameters():
            p.requires_grad_(trainable in (OFF_RAMPS, JOINT))
        if trainable in (OFF_RAMPS, JOINT) and not self.off_ramps_trained:
            source = _pooler_dense(self.backbone)
            if source is not None:
                with torch.no_grad():
                    for ramp in self.off_ramps:
                        ramp.pooler.weight.copy_(source.weight)
                        ramp.pooler.bias.copy_(source.bias)
            self.off_ramps_trained = True

    def forward(self, labels: torch.Tensor, objective: str = HEAD, distill: SelfDistillation = NO_DISTILLATION,
                **inputs: torch.Tensor) -> dict:
        """The training loss of `objective`: HEAD, the stock model's (DeeBERT stage one); OFF_RAMPS, the sum of
        the off-ramps' losses on the frozen backbone (stage two); JOINT, PABEE's weighted average over every exit,
        sum_i i * loss_i / sum_i i (i = 1..L, the last exit being the head), backbone included. `distill` mixes
        the final head's softened predictions into the off-ramps' losses. Also returns each exit's loss."""
        if objective == HEAD:
            return {"loss": self.backbone(**inputs, labels=labels).loss}
        if objective not in (OFF_RAMPS, JOINT):
            raise ValueError(f"unknown training objective {objective!r}")
        with torch.no_grad() if objective == OFF_RAMPS else contextlib.nullcontext():
            out = self.backbone(**inputs, output_hidden_states=True)
        losses = [distill.off_ramp_loss(ramp(out.hidden_states[i + 1]), labels, out.logits, self.regression)
                  for i, ramp in enumerate(self.off_ramps)]
        if objective == OFF_RAMPS:
            return {"loss": torch.stack(losses).sum(), "exit_losses": torch.stack(losses).detach()}
        losses.append(task_loss(out.logits, labels, self.regression))
        stacked = torch.stack(losses)
        weights = torch.arange(1, len(losses) + 1, device=stacked.device, dtype=stacked.dtype)
        return {"loss": (weights * stacked).sum() / weights.sum(), "exit_losses": stacked.detach()}

    # -- inference ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def all_exit_logits(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits of every exit from one forward pass: [num_layers, batch, num_labels] (the last is the head)."""
        out = self.backbone(**inputs, output_hidden_states=True)
        ramps = [ramp(out.hidden_states[i + 1]) for i, ramp in enumerate(self.off_ramps)]
        return torch.stack([*ramps, out.logits]).float()

    @torch.no_grad()
    def early_exit(self, rule: ExitRule | None, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and 1-based exit layer [B] of each row under `rule` (None: every row runs all layers).

        Rows leave the batch as they exit; later layers only compute the rows that remain. A rule that cannot
        fire costs nothing: the plain forward runs, without hooks or off-ramps.
        """
        batch_size = inputs["input_ids"].shape[0]
        device = inputs["input_ids"].device
        exit_layer = torch.full((batch_size,), self.num_layers, dtype=torch.long, device=device)
        if rule is None or not rule.can_exit(len(self.off_ramps)):
            return self.backbone(**inputs).logits.float(), exit_layer

        logits_out = torch.empty(batch_size, self.backbone.config.num_labels, device=device)
        rows = _RowSelection(batch_size, device)
        state = rule.init_state(batch_size, device)

        def pre_hook(layer_index: int):
            ramp = self.off_ramps[layer_index - 1]

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                nonlocal state
                hidden = args[0] if args else kwargs["hidden_states"]
                logits = ramp(hidden).float()
                leave = rule.decide(logits, state)
                if leave.any():  # the one host sync per layer: whether the batch shrinks
                    leaving = rows.active[leave]
                    logits_out[leaving] = logits[leave]
                    exit_layer[leaving] = layer_index
                    stay = ~leave
                    if not stay.any():
                        raise _AllExited
                    rows.keep(stay)
                    state = {k: v[stay] for k, v in state.items()}
                    hidden = hidden[stay]
                elif not rows.shrunk:
                    return None  # the common case: nobody has left, nothing to cut
                # The encoder hands every layer the full-batch attention mask (and any other per-row tensor):
                # cut those to the rows still running (once per shrink, not per layer).
                kwargs = rows.take(kwargs)
                if args:
                    return (hidden, *rows.take(args[1:])), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            return hook

        layers = self._layers
        handles = [layers[j].register_forward_pre_hook(pre_hook(j), with_kwargs=True) for j in range(1, len(layers))]
        try:
            final = self.backbone(**inputs).logits.float()
            if rows.shrunk:
                logits_out[rows.active] = final
            else:
                logits_out = final
        except _AllExited:
            pass
        finally:
            for h in handles:
                h.remove()
        return logits_out, exit_layer


class _RowSelection:
    """The rows of the batch still running (`active`, their original indices) and the full-batch tensors the
    encoder passes to every layer, cut to those rows; the cut copies are kept until the batch shrinks again, so
    a 4-D attention mask is cut once per shrink, not once per layer."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.active = torch.arange(batch_size, device=device)
        self.shrunk = False
        self._cut: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(self, stay: torch.Tensor) -> None:
        self.active = self.active[stay]
        self.shrunk = True
        self._cut = {}

    def take(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if not (obj.dim() > 0 and obj.shape[0] == self.batch_size > 1):
                return obj  # broadcast (first dimension 1) or not per row
            cached = self._cut.get(id(obj))
            if cached is None or cached[0] is not obj:
                cached = (obj, obj.index_select(0, self.active))
                self._cut[id(obj)] = cached
            return cached[1]
        if isinstance(obj, tuple):
            return tuple(self.take(o) for o in obj)
        if isinstance(obj, list):
            return [self.take(o) for o in obj]
        if isinstance(obj, Mapping):
            return {k: self.take(v) for k, v in obj.items()}
        return obj
