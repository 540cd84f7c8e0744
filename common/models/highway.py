"""DeeBERT off-ramps around a stock transformers sequence classifier, with batched early exit.

The backbone is an unmodified `AutoModelForSequenceClassification` (BERT, RoBERTa, or any encoder whose
layers sit in one `nn.ModuleList`). An off-ramp (DeeBERT's "highway") reads the hidden states after each of
the first L-1 layers; after layer L the stock head decides.

* Training: DeeBERT's two stages (backbone + head, then the off-ramps on the frozen backbone, all layers'
  hidden states from one stock forward with `output_hidden_states=True`), or PABEE's joint training (backbone
  and every exit at once, on the loss of exit i weighted by i). Off-ramps may also learn the final head's
  softened predictions (FastBERT's self-distillation).
* An off-ramp reads the layer's output as DeeBERT's highway does (`first_token`: the first token through a
  tanh dense layer, then a linear classifier) or as sentence encoders are trained to be read (`mean`: the mean
  over the real tokens straight into a linear classifier).
* Early exit runs the stock forward with a pre-hook on every layer: before layer j runs, the off-ramp after
  layer j-1 scores the rows still in the batch, rows whose exit rule fires leave with those logits, and the
  layer (and every later one) only computes the rows that stay. No row waits for the slowest one, so early
  exit saves compute at every batch size, not only at batch size 1 as in the original. The rule decides on
  the host, in plain Python, from the off-ramp's logits as lists of floats: early exit needs the answer there
  anyway (it decides how the batch is cut), and right after a layer's work at batch size 1 each torch (or
  numpy) operator costs tens of microseconds, while the arithmetic on a handful of numbers costs a few. A
  rule that cannot fire (entropy threshold 0, patience 0 or longer than the off-ramps) runs the plain
  forward: no hooks, no off-ramps.

The off-ramps are saved beside the stock checkpoint (`off_ramps.safetensors` + `off_ramps.json`), so the
folder still loads in plain transformers as an ordinary classifier.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from common.distillation import soft_cross_entropy
from common.errors import UserError
from common.models.pooling import FIRST_TOKEN, MEAN, POOLINGS
from common.pretrained import find_encoder_layers

OFF_RAMPS_WEIGHTS = "off_ramps.safetensors"
OFF_RAMPS_CONFIG = "off_ramps.json"
# Checkpoint folder prefixes of DeeBERT's two training stages (backbone + head, then the off-ramps) and of
# PABEE's single joint stage.
STAGE1, STAGE2, JOINT_STAGE = "checkpoint-stage1", "checkpoint-stage2", "checkpoint-joint"
# What a training step optimises (EarlyExitModel.forward's `objective`; set_stage's trainable parts).
HEAD, OFF_RAMPS, JOINT = "head", "off_ramps", "joint"


def row_entropy(row: Sequence[float]) -> float:
    """Entropy (nats) of softmax(row), in double precision. With z = sum exp(x - max): H = log z - sum p (x - max).
    Plain Python: the exit rules decide on the host (see the module doc)."""
    top = max(row)
    z = weighted = 0.0
    for x in row:  # one loop, no comprehensions: this runs after every layer, where each frame counts
        d = x - top
        e = math.exp(d)
        z += e
        weighted += e * d
    return math.log(z) - weighted / z


def entropy(logits: Any) -> np.ndarray:
    """row_entropy of each row of `logits` ([..., classes]: a CPU tensor, an array or nested lists)."""
    rows = np.asarray(logits, dtype=np.float64)
    flat = [row_entropy(r) for r in rows.reshape(-1, rows.shape[-1]).tolist()]
    return np.array(flat, dtype=np.float64).reshape(rows.shape[:-1])


def token_weights(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row weights that average the real tokens ([B, 1, T], each row summing to 1), for mean pooling; None
    when every token is real (no mask, or no padding: a plain mean, fewer operators per layer)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = attention_mask.float()
    return (mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)).unsqueeze(1)


class OffRamp(nn.Module):
    """An exit classifier on one layer's output. `first_token`: DeeBERT's highway, the first token's state
    through a tanh dense layer (the "pooler"), dropout, a linear classifier. `mean`: the mean of the real
    tokens' states, dropout, a linear classifier: how sentence encoders (all-MiniLM-L6-v2 and its kind) are
    read, whose first token says little in the early layers; and two operators per layer instead of four."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, pooling: str = FIRST_TOKEN):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown off-ramp pooling {pooling!r} (one of {', '.join(POOLINGS)})")
        self.pooling = pooling
        self.pooler = nn.Linear(hidden_size, hidden_size) if pooling == FIRST_TOKEN else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] from a layer's output [B, T, H]; `weights` [B, 1, T] (token_weights) for mean pooling."""
        # As few operators as possible, each called directly (addmm, not linear's chain; tanh in place; the mean's
        # division folded into the classifier's product), and dropout only in training: early exit runs this
        # after every layer, where at batch size 1 each operator costs tens of microseconds (its code is no
        # longer in cache after the layer's work).
        scale = 1.0
        if self.pooler is not None:
            pooled = torch.addmm(self.pooler.bias, hidden_states[:, 0], self.pooler.weight.t()).tanh_()
        elif weights is None:
            pooled, scale = hidden_states.sum(dim=1), 1.0 / hidden_states.shape[1]
        else:
            pooled = torch.bmm(weights.to(hidden_states.dtype), hidden_states).squeeze(1)
        if self.training:
            pooled = self.dropout(pooled)
        return torch.addmm(self.classifier.bias, pooled, self.classifier.weight.t(), alpha=scale)


# ----------------------------------------------------------------------------------------------------------
# exit rules: each decides on the host, row by row, from an off-ramp's logits (a list of rows of floats, as
# `tensor.tolist()` gives), and keeps a little per-row state (lists) that is cut along with the batch


@dataclass(frozen=True)
class EntropyExit:
    """DeeBERT: leave at the first off-ramp whose prediction entropy is below `threshold` (0 never exits)."""

    threshold: float

    def init_state(self, batch_size: int) -> dict[str, list]:
        return {}

    def decide(self, logits: list[list[float]], state: dict[str, list]) -> list[bool]:
        threshold = self.threshold
        return [row_entropy(row) < threshold for row in logits]

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

    def init_state(self, batch_size: int) -> dict[str, list]:
        return {"count": [0] * batch_size, "previous": [None] * batch_size}  # None: no off-ramp seen yet

    def decide(self, logits: list[list[float]], state: dict[str, list]) -> list[bool]:
        if self.regression:
            current: list = [row[0] for row in logits]
            agree = [p is not None and abs(c - p) < self.regression_threshold
                     for c, p in zip(current, state["previous"])]
        else:
            current = [row.index(max(row)) for row in logits]  # argmax, the first on ties as torch's
            agree = [c == p for c, p in zip(current, state["previous"])]
        state["count"] = [n + 1 if a else 0 for n, a in zip(state["count"], agree)]
        state["previous"] = current
        # patience 0 would exit at the first off-ramp whatever it says; PABEE treats it as "never exit".
        return [n >= self.patience > 0 for n in state["count"]]

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

    def __init__(self, backbone: PreTrainedModel, off_ramps: nn.ModuleList | None = None, trained: bool = True,
                 pooling: str = FIRST_TOKEN):
        """`pooling` is that of fresh off-ramps (when `off_ramps` is None)."""
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
                OffRamp(config.hidden_size, config.num_labels, dropout, pooling) for _ in range(self.num_layers - 1)
            )
            self.off_ramps_trained = False
        else:
            self.off_ramps_trained = trained
        if len(off_ramps) != self.num_layers - 1:
            raise UserError(f"{len(off_ramps)} off-ramps for a {self.num_layers}-layer model (expected one fewer)")
        self.off_ramps = off_ramps
        self.pooling = off_ramps[0].pooling if len(off_ramps) else pooling

    def token_weights(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """What the off-ramps' pooling needs besides the layer's output: mean-pooling weights from the
        attention mask (None for first-token pooling)."""
        return token_weights(inputs.get("attention_mask")) if self.pooling == MEAN else None

    # -- persistence --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, pooling: str | None = None, **kwargs: Any) -> "EarlyExitModel":
        """Load the stock classifier from `path`, and its off-ramps when the folder holds them. `pooling`: that
        of fresh off-ramps (default first_token); saved off-ramps keep theirs, and asking for another is an
        error."""
        backbone = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        weights = os.path.join(path, OFF_RAMPS_WEIGHTS)
        meta_file = os.path.join(path, OFF_RAMPS_CONFIG)
        if not os.path.isfile(weights):
            return cls(backbone, pooling=pooling or FIRST_TOKEN)
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
        saved_pooling = meta.get("pooling", FIRST_TOKEN)  # folders from before mean pooling have first-token ramps
        if saved_pooling not in POOLINGS:
            raise UserError(f"{meta_file}: unknown pooling {saved_pooling!r} (one of {', '.join(POOLINGS)})")
        if pooling is not None and pooling != saved_pooling:
            raise UserError(f"{path} has off-ramps that pool with {saved_pooling}, not {pooling}: drop "
                            f"--off_ramp_pooling or start from a model without off-ramps")
        ramps = nn.ModuleList(
            OffRamp(config.hidden_size, config.num_labels, meta.get("dropout", 0.1), saved_pooling)
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
            "pooling": self.pooling,
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
            if source is not None and self.pooling == FIRST_TOKEN:
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
        weights = self.token_weights(inputs)
        losses = [distill.off_ramp_loss(ramp(out.hidden_states[i + 1], weights), labels, out.logits, self.regression)
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
        weights = self.token_weights(inputs)
        ramps = [ramp(out.hidden_states[i + 1], weights) for i, ramp in enumerate(self.off_ramps)]
        return torch.stack([*ramps, out.logits]).float()

    @torch.no_grad()
    def early_exit(self, rule: ExitRule | None, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and 1-based exit layer [B] of each row under `rule` (None: every row runs all layers).

        Rows leave the batch as they exit; later layers only compute the rows that remain. A rule that cannot
        fire costs nothing: the plain forward runs, without hooks or off-ramps.
        """
        batch_size = inputs["input_ids"].shape[0]
        device = inputs["input_ids"].device
        if rule is None or not rule.can_exit(len(self.off_ramps)):
            return self.backbone(**inputs).logits.float(), self._exit_layers(batch_size, device, [])

        # Nothing is allocated per call until a row leaves: at batch size 1 every operator counts.
        exits: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (original rows, their logits, exit layer)
        rows = _RowSelection(batch_size, device)
        state = rule.init_state(batch_size)
        weights = self.token_weights(inputs)

        def pre_hook(layer_index: int):
            # The off-ramp's forward itself: in eval it has no hooks, and the module call's overhead counts here.
            ramp = self.off_ramps[layer_index - 1].forward

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                nonlocal state
                hidden = args[0] if args else kwargs["hidden_states"]
                logits = ramp(hidden, rows.take(weights))
                if logits.dtype != torch.float32:
                    logits = logits.float()
                # The one host sync per layer: the rule decides on the host, where the batch is cut.
                leave = rule.decide(logits.tolist(), state)
                if any(leave):
                    if all(leave):
                        exits.append((rows.active, logits, layer_index))
                        raise _AllExited
                    leave_rows = torch.tensor(leave, device=device)
                    exits.append((rows.active[leave_rows], logits[leave_rows], layer_index))
                    stay_rows = ~leave_rows
                    rows.keep(stay_rows)
                    state = {k: [x for x, gone in zip(v, leave) if not gone] for k, v in state.items()}
                    hidden = hidden[stay_rows]
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
            if not exits:
                return final, self._exit_layers(batch_size, device, [])
            exits.append((rows.active, final, self.num_layers))
        except _AllExited:
            pass
        finally:
            for h in handles:
                h.remove()
        logits_out = torch.empty(batch_size, exits[0][1].shape[-1], device=device)
        for leaving, logits, _ in exits:
            logits_out[leaving] = logits
        return logits_out, self._exit_layers(batch_size, device, exits)

    def _exit_layers(self, batch_size: int, device: torch.device,
                     exits: list[tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
        """1-based exit layer of each row: the last layer, except for the rows in `exits`."""
        exit_layer = torch.full((batch_size,), self.num_layers, dtype=torch.long, device=device)
        for leaving, _, layer in exits:
            exit_layer[leaving] = layer
        return exit_layer


class _RowSelection:
    """The rows of the batch still running (`active`, their original indices) and the full-batch tensors the
    encoder passes to every layer, cut to those rows; the cut copies are kept until the batch shrinks again, so
    a 4-D attention mask is cut once per shrink, not once per layer."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.device = device
        self._active: torch.Tensor | None = None  # made when first asked for (most calls never cut the batch)
        self.shrunk = False
        self._cut: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def active(self) -> torch.Tensor:
        if self._active is None:
            self._active = torch.arange(self.batch_size, device=self.device)
        return self._active

    def keep(self, stay: torch.Tensor) -> None:
        self._active = self.active[stay]
        self.shrunk = True
        self._cut = {}

    def take(self, obj: Any) -> Any:
        """`obj` (a tensor, or tensors in a tuple, list or mapping) cut to the rows still running."""
        if not self.shrunk:
            return obj
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
