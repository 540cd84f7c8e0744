"""DeeBERT off-ramps around a stock transformers sequence classifier, with batched early exit.

The backbone is an unmodified `AutoModelForSequenceClassification` (BERT, RoBERTa, or any encoder whose
layers sit in one `nn.ModuleList`). An off-ramp (pooler + dropout + classifier, as DeeBERT's "highway")
reads the hidden states after each of the first L-1 layers; after layer L the stock head decides.

* Training stage two reads all layers' hidden states from one stock forward (`output_hidden_states=True`).
* Early exit runs the stock forward with a pre-hook on every layer: before layer j runs, the off-ramp after
  layer j-1 scores the rows still in the batch, rows whose exit rule fires leave with those logits, and the
  layer (and every later one) only computes the rows that stay. No row waits for the slowest one, so early
  exit saves compute at every batch size, not only at batch size 1 as in the original.

The off-ramps are saved beside the stock checkpoint (`off_ramps.safetensors` + `off_ramps.json`), so the
folder still loads in plain transformers as an ordinary classifier.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from common.errors import UserError
from common.pretrained import find_encoder_layers

OFF_RAMPS_WEIGHTS = "off_ramps.safetensors"
OFF_RAMPS_CONFIG = "off_ramps.json"
# Checkpoint folder prefixes of DeeBERT's two training stages (backbone + head, then the off-ramps).
STAGE1, STAGE2 = "checkpoint-stage1", "checkpoint-stage2"


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row, computed stably: logsumexp(x) - sum(softmax(x) * x)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


class OffRamp(nn.Module):
    """DeeBERT's highway: tanh pooler on the first token, dropout, linear classifier."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(hidden_states[:, 0]))
        return self.classifier(self.dropout(pooled))


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

    @property
    def label(self) -> str:
        return f"entropy={self.threshold:g}"


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


class EarlyExitModel(nn.Module):
    """A stock sequence classifier plus one off-ramp after each of its first L-1 layers."""

    def __init__(self, backbone: PreTrainedModel, off_ramps: nn.ModuleList | None = None, trained: bool = True):
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        self.num_layers = len(encoder_layers(backbone))
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

    def set_stage(self, stage: int) -> None:
        """Stage 1 trains the backbone and its head; stage 2 freezes them and trains the off-ramps (DeeBERT).
        Stage 2 starts each off-ramp's pooler from the fine-tuned head's pooler, as DeeBERT copied the
        pre-trained pooler into its highways."""
        for p in self.backbone.parameters():
            p.requires_grad_(stage == 1)
        for p in self.off_ramps.parameters():
            p.requires_grad_(stage == 2)
        if stage == 2 and not self.off_ramps_trained:
            source = _pooler_dense(self.backbone)
            if source is not None:
                with torch.no_grad():
                    for ramp in self.off_ramps:
                        ramp.pooler.weight.copy_(source.weight)
                        ramp.pooler.bias.copy_(source.bias)
            self.off_ramps_trained = True

    def forward(self, labels: torch.Tensor, train_off_ramps: bool = False, **inputs: torch.Tensor) -> dict:
        """The training loss: the stock model's (stage 1) or the sum of the off-ramps' losses (stage 2)."""
        if not train_off_ramps:
            out = self.backbone(**inputs, labels=labels)
            return {"loss": out.loss}
        with torch.no_grad():
            hidden = self.backbone(**inputs, output_hidden_states=True).hidden_states
        losses = [task_loss(ramp(hidden[i + 1]), labels, self.regression) for i, ramp in enumerate(self.off_ramps)]
        return {"loss": torch.stack(losses).sum()}

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

        Rows leave the batch as they exit; later layers only compute the rows that remain.
        """
        batch_size = inputs["input_ids"].shape[0]
        device = inputs["input_ids"].device
        num_labels = self.backbone.config.num_labels
        logits_out = torch.empty(batch_size, num_labels, device=device)
        exit_layer = torch.full((batch_size,), self.num_layers, dtype=torch.long, device=device)
        if rule is None:
            logits_out.copy_(self.backbone(**inputs).logits.float())
            return logits_out, exit_layer

        active = torch.arange(batch_size, device=device)  # original row of each row still in the batch
        state = rule.init_state(batch_size, device)

        def pre_hook(layer_index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                nonlocal active, state
                hidden = args[0] if args else kwargs["hidden_states"]
                logits = self.off_ramps[layer_index - 1](hidden).float()
                leave = rule.decide(logits, state)
                if bool(leave.any()):
                    logits_out[active[leave]] = logits[leave]
                    exit_layer[active[leave]] = layer_index
                    stay = ~leave
                    if not bool(stay.any()):
                        raise _AllExited
                    active = active[stay]
                    state = {k: v[stay] for k, v in state.items()}
                    hidden = hidden[stay]
                if len(active) == batch_size:
                    return None
                # The encoder hands every layer the full-batch attention mask (and any other per-row tensor):
                # cut those to the rows still running; the hidden states were cut above.
                kwargs = _take_rows(kwargs, active, batch_size)
                if args:
                    return (hidden, *_take_rows(args[1:], active, batch_size)), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            return hook

        layers = encoder_layers(self.backbone)
        handles = [layers[j].register_forward_pre_hook(pre_hook(j), with_kwargs=True) for j in range(1, len(layers))]
        try:
            final = self.backbone(**inputs).logits.float()
            logits_out[active] = final
        except _AllExited:
            pass
        finally:
            for h in handles:
                h.remove()
        return logits_out, exit_layer


def _take_rows(obj: Any, rows: torch.Tensor, batch_size: int) -> Any:
    """Select `rows` of every tensor whose first dimension is the full batch (attention mask, per-row position
    ids); broadcast tensors (first dimension 1) and everything else pass unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows) if obj.dim() > 0 and obj.shape[0] == batch_size > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_take_rows(o, rows, batch_size) for o in obj)
    if isinstance(obj, list):
        return [_take_rows(o, rows, batch_size) for o in obj]
    if isinstance(obj, Mapping):
        return {k: _take_rows(v, rows, batch_size) for k, v in obj.items()}
    return obj
