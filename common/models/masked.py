"""Movement pruning (Sanh, Wolf & Rush 2020) around a stock transformers model.

* `MaskedLinear` is an `nn.Linear` whose weight is multiplied by a mask on every forward. The mask comes from
  importance scores (a parameter of the weight's shape) or from the weights themselves, by method:
  ``topK`` (movement pruning: the top fraction of scores), ``threshold`` (scores above a value),
  ``sigmoied_threshold`` (soft movement pruning: sigmoid(scores) above a value), ``magnitude`` (the top
  fraction of |W|, no scores) and ``l0`` (hard-concrete gates, Louizos et al.). The binary masks pass the
  gradient straight through to the scores (straight-through estimator), as in the paper.
* The threshold lives in each module's state (`set_threshold`), so the model keeps the stock `forward()`
  signature: anything that calls a transformers model can call a masked one.
* `mask_model` swaps every `nn.Linear` of the encoder's layers (the `nn.ModuleList` with one entry per hidden
  layer, whatever the model family) for a MaskedLinear sharing its weight and bias. Embeddings, pooler and
  the task head stay dense, as in the original.
* `threshold_schedule` is the paper's cubic schedule; `global_score_cut` gives global top-k;
  `regularization_term` the L1 / L0 penalty on the scores.
* Structured pruning (`mask_model(..., structure=...)`): "blocks" gives each matrix one score per square block;
  "heads_neurons" one score per attention head, held by the query matrix and shared by the key, value and
  attention output matrices, and one per FFN neuron, held by the intermediate matrix and shared by the output
  matrix (common.models.structured). The same binarizers decide the scores' mask, which is expanded to the
  weights; the straight-through gradients of all the matrices a score decides add up in it. Global top-k weighs
  each score by the weights it decides. common.models.shrink then removes the emptied heads and neurons.
* `save_masked_model` writes a folder that does not lie to stock code: under the stock keys it holds the pruned
  weights (the masks multiplied in), so `AutoModelForQuestionAnswering.from_pretrained` gives exactly the masked
  model's evaluation outputs; the unpruned weights (`<module>.unpruned_weight`) and the scores
  (`<module>.mask_scores`), which stock code reports as unexpected and ignores, and the pruning state in
  `config.json` (`"pruning": {...}`) let `load_masked_model` rebuild the masked model exactly (another threshold,
  resume). `fold_masks` multiplies the masks into the weights and gives back a stock model ("bertarize");
  `save_compact` / `load_compact_state_dict` store the pruned matrices in CSR form. The readers take what
  transformers writes today (`model.safetensors`, sharded or not) and the older `pytorch_model.bin` files, the
  original's `masked_bert` folders and folders saved before the pruned weights went under the stock keys
  included.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import autograd, nn

from common.distributed import unwrap_ddp
from common.errors import UserError
from common.io import save_tensors_atomic
from common.models.structured import STRUCTURES, UNIT_PARTS, layer_parts, unit_size
from common.pretrained import WEIGHT_FILES, find_encoder_layers

PRUNING_METHODS = ("topK", "threshold", "sigmoied_threshold", "magnitude", "l0")
SCORE_METHODS = ("topK", "threshold", "sigmoied_threshold", "l0")
FRACTION_METHODS = ("topK", "magnitude")  # the threshold is the fraction of weights kept
GLOBAL_METHODS = ("topK", "threshold", "magnitude")
MASK_INITS = ("constant", "uniform", "kaiming")
REGULARIZATIONS = ("l1", "l0")
PRUNING_KEY = "pruning"
UNPRUNED_WEIGHT = "unpruned_weight"  # where a saved masked module keeps its weight before masking
MIN_KEPT_FRACTION = 0.005  # threshold masks keep at least 0.5% of a matrix (the original's floor)
L0_LEFT, L0_RIGHT, L0_BETA = -0.1, 1.1, 2.0 / 3.0  # hard-concrete stretch interval and temperature

COMPACT_FILE = "model.sparse.safetensors"


# ----------------------------------------------------------------------------------------------------------
# masks


def topk_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """A 0/1 mask (values' dtype) keeping exactly `keep` entries: the largest ones, ties broken by position."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if keep >= n:
        return torch.ones_like(values)
    if keep <= 0:
        return torch.zeros_like(values)
    cut = flat.kthvalue(n - keep).values  # exactly n - keep entries are <= cut when there are no ties
    mask = flat > cut
    missing = keep - int(mask.sum())
    if missing > 0:  # ties at the cut: keep the first tied positions
        tied = (flat == cut).nonzero().squeeze(1)
        mask[tied[:missing]] = True
    return mask.view_as(values).to(values.dtype)


def threshold_mask(scores: torch.Tensor, threshold: float, sigmoid: bool) -> torch.Tensor:
    """Scores (or their sigmoid) above `threshold`; at least 0.5% of the entries are kept (the top ones)."""
    s = scores.detach()
    mask = (torch.sigmoid(s) if sigmoid else s) > threshold
    floor = int(MIN_KEPT_FRACTION * s.numel()) + 1
    if int(mask.sum()) < floor:
        return topk_mask(s, floor)
    return mask.to(scores.dtype)


class _TopKBinarizer(autograd.Function):
    """Top-k of the scores; the gradient passes straight through to the scores."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, keep: int) -> torch.Tensor:
        return topk_mask(scores, keep)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ThresholdBinarizer(autograd.Function):
    """Scores (or sigmoid(scores)) above a threshold; straight-through gradient (also for the sigmoid, as in
    the original)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, threshold: float, sigmoid: bool) -> torch.Tensor:
        return threshold_mask(scores, threshold, sigmoid)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def l0_gates(scores: torch.Tensor, training: bool) -> torch.Tensor:
    """Hard-concrete gates in [0, 1]: sampled with logistic noise in training, deterministic in evaluation."""
    if training:
        u = torch.rand_like(scores).clamp(1e-4, 1 - 1e-4)
        s = torch.sigmoid((u.log() - (1 - u).log() + scores) / L0_BETA)
    else:
        s = torch.sigmoid(scores)
    return (s * (L0_RIGHT - L0_LEFT) + L0_LEFT).clamp(0.0, 1.0)


def default_threshold(method: str) -> float:
    """The threshold that keeps every weight (a fresh masked model computes the dense function)."""
    return {"topK": 1.0, "magnitude": 1.0, "threshold": -math.inf, "sigmoied_threshold": 0.0, "l0": 1.0}[method]


class MaskedLinear(nn.Linear):
    """nn.Linear with a mask recomputed on each forward from scores (or |W|) and the module's threshold."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pruning_method: str = "topK",
                 mask_init: str = "constant", mask_scale: float = 0.0, device: Any = None, dtype: Any = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if pruning_method not in PRUNING_METHODS:
            raise ValueError(f"unknown pruning method {pruning_method!r}; choose one of {', '.join(PRUNING_METHODS)}")
        if mask_init not in MASK_INITS:
            raise ValueError(f"unknown mask init {mask_init!r}; choose one of {', '.join(MASK_INITS)}")
        self.pruning_method = pruning_method
        self.mask_init = mask_init
        self.mask_scale = mask_scale
        self.threshold = default_threshold(pruning_method)
        self.score_cut: float | None = None  # set by global top-k: one cut on scores (or |W|) for all modules
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        # Structured pruning (set by `structure_scores` / `share_scores`): the scores' mask is expanded to the
        # weight's shape, over square blocks or over units (heads, neurons) of `unit_size` rows (axis 0) or
        # columns (axis 1); the units' scores may live in another module (the owner).
        self.structure = "weights"
        self.block_size: int | None = None
        self.unit_axis: int | None = None
        self.unit_size = 1
        self._owner: list[MaskedLinear] = []  # a list, so the owner is not registered as a submodule
        self._live_mask: torch.Tensor | None = None
        if pruning_method in SCORE_METHODS:
            self.mask_scores = nn.Parameter(torch.empty_like(self.weight))
            self.init_mask()
        else:
            self.register_parameter("mask_scores", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pruning_method: str, mask_init: str = "constant",
                    mask_scale: float = 0.0) -> "MaskedLinear":
        """A MaskedLinear sharing `linear`'s weight and bias (same Parameter objects, device and dtype)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  pruning_method=pruning_method, mask_init=mask_init, mask_scale=mask_scale,
                  device="meta")  # no throw-away allocation: the parameters are replaced just below
        new.weight = linear.weight
        new.bias = linear.bias
        if new.mask_scores is not None:
            new.mask_scores = nn.Parameter(torch.empty_like(linear.weight))
            new.init_mask()
        new.train(linear.training)
        return new

    def init_mask(self) -> None:
        with torch.no_grad():
            if self.mask_init == "constant":
                nn.init.constant_(self.mask_scores, self.mask_scale)
            elif self.mask_init == "uniform":
                nn.init.uniform_(self.mask_scores, -self.mask_scale, self.mask_scale)
            else:
                nn.init.kaiming_uniform_(self.mask_scores, a=math.sqrt(5))

    def structure_scores(self, structure: str, shape: tuple[int, ...], block_size: int | None = None,
                         unit_axis: int | None = None, unit_size: int = 1) -> None:
        """Own scores of `shape` (blocks: one per block_size x block_size block; units: one per unit)."""
        if self.pruning_method not in SCORE_METHODS:
            raise ValueError(f"structured pruning needs scores; {self.pruning_method} has none")
        self.structure, self.block_size, self.unit_axis, self.unit_size = structure, block_size, unit_axis, unit_size
        self.mask_scores = nn.Parameter(self.weight.new_empty(shape))
        self.init_mask()

    def share_scores(self, owner: "MaskedLinear", unit_axis: int, unit_size: int) -> None:
        """Use `owner`'s unit scores (same units along `unit_axis` of this weight); no scores of its own."""
        self.structure, self.unit_axis, self.unit_size = owner.structure, unit_axis, unit_size
        self.mask_scores = None
        self._owner = [owner]

    @property
    def score_owner(self) -> "MaskedLinear":
        """The module whose scores decide this one's mask (itself, except for modules sharing unit scores)."""
        return self._owner[0] if self._owner else self

    def _compute_mask(self) -> torch.Tensor:
        method = self.pruning_method
        if self.score_cut is not None:  # global top-k: one cut for the whole encoder
            if method == "magnitude":
                with torch.no_grad():
                    return threshold_mask(self.weight.abs(), self.score_cut, False)
            return _ThresholdBinarizer.apply(self.mask_scores, self.score_cut, False)
        if method == "topK":
            return _TopKBinarizer.apply(self.mask_scores, int(self.threshold * self.mask_scores.numel()))
        if method in ("threshold", "sigmoied_threshold"):
            return _ThresholdBinarizer.apply(self.mask_scores, self.threshold, method == "sigmoied_threshold")
        if method == "magnitude":
            with torch.no_grad():
                return topk_mask(self.weight.abs(), int(self.threshold * self.weight.numel()))
        return l0_gates(self.mask_scores, self.training)

    def score_mask(self) -> torch.Tensor:
        """The mask of the scores (of the weights, for unstructured pruning). Without autograd (evaluation) it is
        cached until the threshold, the scores or the weights change."""
        if torch.is_grad_enabled() or (self.training and self.pruning_method == "l0"):
            self._mask_cache = None
            mask = self._compute_mask()
            if self.unit_axis is not None:  # unit scores: the modules sharing them reuse this forward's mask
                self._live_mask = mask
            return mask
        scores = self.mask_scores
        key = (self.threshold, self.score_cut, self.training, self.weight._version, self.weight.data_ptr(),
               None if scores is None else (scores._version, scores.data_ptr()))
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, self._compute_mask())
        return self._mask_cache[1]

    def mask(self) -> torch.Tensor:
        """The current mask, in the weight's shape (or one broadcasting to it: a column for row units, a row for
        column units)."""
        if self.structure == "weights":
            return self.score_mask()
        owner = self.score_owner
        if owner is not self and owner._live_mask is not None and (
                torch.is_grad_enabled() or (self.training and self.pruning_method == "l0")):
            # Training: the owner ran first in this forward pass (query before key, value and the attention
            # output; intermediate before output): its mask (one l0 sample) is shared, and the straight-through
            # gradients of all the unit's matrices add up in its scores.
            unit_mask = owner._live_mask
        else:
            unit_mask = owner.score_mask()
        return self._expand(unit_mask)

    def _expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        if self.block_size is not None:
            b = self.block_size
            return unit_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)[: self.out_features, : self.in_features]
        per_unit = unit_mask.repeat_interleave(self.unit_size) if self.unit_size > 1 else unit_mask
        return per_unit[:, None] if self.unit_axis == 0 else per_unit[None, :]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight * self.mask(), self.bias)

    def eval_mask(self) -> torch.Tensor:
        """The evaluation-mode mask (deterministic for l0), without autograd."""
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.mask()
        finally:
            self.train(training)

    def folded_weight(self) -> torch.Tensor:
        """The weight with its evaluation-mode mask multiplied in (what the bertarized model holds)."""
        with torch.no_grad():
            return self.weight * self.eval_mask()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pruning_method={self.pruning_method}, threshold={self.threshold:g}"
                + (f", score_cut={self.score_cut:g}" if self.score_cut is not None else "")
                + (f", structure={self.structure}" if self.structure != "weights" else ""))


# ----------------------------------------------------------------------------------------------------------
# module surgery


def encoder_layers_prefix(model: nn.Module) -> str:
    """Name of the model's list of transformer layers (common.pretrained.find_encoder_layers)."""
    return find_encoder_layers(model)[0]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def mask_model(model: nn.Module, pruning_method: str, mask_init: str = "constant", mask_scale: float = 0.0,
               structure: str = "weights", block_size: int = 32) -> list[str]:
    """Swap every nn.Linear inside the encoder layers for a MaskedLinear (in place); returns their names.

    `structure`: "weights" scores each weight; "blocks" each block_size x block_size block of a matrix;
    "heads_neurons" each attention head (one score shared by its rows of the query, key and value matrices and
    its columns of the attention output matrix) and each FFN neuron (its row of the intermediate matrix and
    column of the output matrix), the parts listed in common.models.structured."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    prefix, layers = find_encoder_layers(model)
    names = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and type(m) is nn.Linear]
    if not names:
        raise UserError(f"{type(model).__name__} has no nn.Linear layers in its encoder to prune")
    for name in names:
        _replace(model, name, MaskedLinear.from_linear(model.get_submodule(name), pruning_method, mask_init,
                                                       mask_scale))
    if structure == "blocks":
        for name in names:
            module = model.get_submodule(name)
            module.structure_scores(structure, (-(-module.out_features // block_size),
                                                -(-module.in_features // block_size)), block_size=block_size)
    elif structure == "heads_neurons":
        for i, layer in enumerate(layers):
            for kind, parts in layer_parts(layer, f"{prefix}.{i}").items():
                size = unit_size(model.config, kind)
                (owner_name, axis), *others = UNIT_PARTS[kind]
                owner = parts[owner_name]
                owner.structure_scores(structure, (owner.weight.shape[axis] // size,), unit_axis=axis, unit_size=size)
                for name, axis in others:
                    parts[name].share_scores(owner, axis, size)
        unstructured = [n for n, m in masked_modules(model).items() if m.structure == "weights"]
        if unstructured:
            raise UserError(f"heads_neurons pruning covers the attention and FFN matrices only; {unstructured[0]} "
                            "is neither")
    return names


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear]:
    """The MaskedLinear modules of a model, by name (a DDP wrapper is looked through)."""
    model = unwrap_ddp(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def is_masked(model: nn.Module) -> bool:
    return bool(masked_modules(model))


def set_threshold(model: nn.Module, threshold: float, score_cut: float | None = None) -> None:
    """Set every masked module's threshold (and the global cut, None for per-matrix masks)."""
    for module in masked_modules(model).values():
        module.threshold = float(threshold)
        module.score_cut = None if score_cut is None else float(score_cut)


def global_score_cut(model: nn.Module, keep_fraction: float) -> float:
    """Global top-k: the value above which `keep_fraction` of all the encoder's scores (|W| for magnitude)
    lie; every module then keeps its entries above this one cut (the original's --global_topk). Structured
    scores are weighed by the weights each one decides (a head of BERT-base: 4 x 64 x 768, a neuron 2 x 768),
    so the cut keeps `keep_fraction` of the encoder's weights (to within one unit), not of its scores."""
    modules = list(masked_modules(model).values())
    weights_per_owner: dict[int, int] = {}
    for m in modules:
        weights_per_owner[id(m.score_owner)] = weights_per_owner.get(id(m.score_owner), 0) + m.weight.numel()
    owners = [m for m in modules if m.score_owner is m]
    with torch.no_grad():
        entries = [m.weight.abs() if m.pruning_method == "magnitude" else m.mask_scores for m in owners]
        values = torch.cat([e.reshape(-1) for e in entries])
    sizes = [weights_per_owner[id(m)] / e.numel() for m, e in zip(owners, entries)]
    if any(size != 1 for size in sizes):
        weights = torch.cat([torch.full((e.numel(),), size, dtype=torch.float64) for e, size in zip(entries, sizes)])
        return _weighted_cut(values, weights, keep_fraction)
    n = values.numel()
    keep = int(keep_fraction * n)
    if keep >= n:
        return -math.inf
    return float(values.float().kthvalue(max(n - keep, 1)).values)


def _weighted_cut(values: torch.Tensor, weights: torch.Tensor, keep_fraction: float) -> float:
    """The cut (entries above it kept) whose kept weights come closest to `keep_fraction` of all weights."""
    order = values.float().argsort()
    sorted_values, dropped = values.float()[order], weights[order].cumsum(0)  # dropped[i]: weights <= entry i
    total = float(dropped[-1])
    target = total * (1 - keep_fraction)  # weights to drop
    if target <= 0:
        return -math.inf
    i = int(torch.searchsorted(dropped, torch.tensor([target], dtype=dropped.dtype)))
    i = min(i, len(dropped) - 1)
    if i > 0 and abs(float(dropped[i - 1]) - target) < abs(float(dropped[i]) - target):
        i -= 1
    return float(sorted_values[i])


# ----------------------------------------------------------------------------------------------------------
# schedule and regularization


@dataclass(frozen=True)
class Schedule:
    """The cubic sparsity schedule of the paper (and the original's flags)."""

    initial_threshold: float
    final_threshold: float
    warmup_steps: int
    initial_warmup: int
    final_warmup: int
    final_lambda: float = 0.0

    def __call__(self, step: int, total_steps: int) -> tuple[float, float]:
        """(threshold, regularization lambda) at optimizer step `step` (1-based) of `total_steps`.

        The threshold stays at its initial value for initial_warmup * warmup_steps steps, reaches its final
        value final_warmup * warmup_steps steps before the end, and in between follows
        final + (initial - final) * (1 - progress)^3. Lambda grows as final_lambda * threshold / final_threshold.
        """
        hold_start = self.initial_warmup * self.warmup_steps
        hold_end = self.final_warmup * self.warmup_steps
        if step <= hold_start:
            threshold = self.initial_threshold
        elif step > total_steps - hold_end:
            threshold = self.final_threshold
        else:
            remaining = 1 - (step - hold_start) / (total_steps - hold_start - hold_end)
            threshold = self.final_threshold + (self.initial_threshold - self.final_threshold) * remaining**3
        if self.final_lambda == 0:
            return threshold, 0.0
        return threshold, self.final_lambda * threshold / self.final_threshold

    def shortfall(self, total_steps: int) -> str | None:
        """Why a run of `total_steps` optimizer steps does not follow the whole schedule (None when it does): it
        ends within the initial hold, so the threshold never leaves its initial value, or it is shorter than both
        holds, so the threshold jumps to its final value with no cubic descent."""
        hold_start = self.initial_warmup * self.warmup_steps
        needed = hold_start + self.final_warmup * self.warmup_steps
        if self.initial_threshold == self.final_threshold or total_steps > needed:
            return None
        holds = (f"(--initial_warmup {self.initial_warmup} + --final_warmup {self.final_warmup}) x --warmup_steps "
                 f"{self.warmup_steps} = {needed}")
        fix = ("raise --max_steps / --num_train_epochs, or lower --warmup_steps (it also sets the learning-rate "
               "warmup), --initial_warmup or --final_warmup")
        if total_steps <= hold_start:
            return (f"the run has {total_steps} optimizer steps, but the threshold holds at --initial_threshold "
                    f"{self.initial_threshold:g} for the first --initial_warmup {self.initial_warmup} x --warmup_steps "
                    f"{self.warmup_steps} = {hold_start}: it never moves towards --final_threshold "
                    f"{self.final_threshold:g} and prunes no more than the initial threshold does; the schedule needs "
                    f"more than {holds} steps: {fix}")
        return (f"the run has {total_steps} optimizer steps, not more than {holds}: the threshold jumps from "
                f"{self.initial_threshold:g} to {self.final_threshold:g} at step {hold_start + 1} with no cubic "
                f"descent; {fix}")


def regularization_term(model: nn.Module, mode: str) -> torch.Tensor:
    """Mean over the masked matrices of the scores' penalty: l1 = mean sigmoid(scores) (soft movement
    pruning), l0 = mean probability that a hard-concrete gate is non-zero."""
    terms = []
    for module in masked_modules(model).values():
        scores = module.mask_scores
        if scores is None:
            continue
        if mode == "l1":
            terms.append(torch.sigmoid(scores).sum() / scores.numel())
        elif mode == "l0":
            terms.append(torch.sigmoid(scores - L0_BETA * math.log(-L0_LEFT / L0_RIGHT)).sum() / scores.numel())
        else:
            raise ValueError(f"unknown regularization {mode!r}; choose l1 or l0")
    if not terms:
        raise UserError("regularization needs mask scores: the model has none (magnitude pruning?)")
    return torch.stack(terms).mean()


def threshold_problem(method: str, value: float, flag: str = "--threshold", global_topk: bool = False) -> str | None:
    """Why `value` is not a valid threshold for `method` (None when it is)."""
    if not math.isfinite(value):
        return f"{flag} must be a finite number (got {value})"
    if (method in FRACTION_METHODS or global_topk) and not 0 < value <= 1:
        how = " with --global_topk" if global_topk and method not in FRACTION_METHODS else ""
        return (f"{flag} {value:g} is out of range for {method}{how}: it is the fraction of weights kept, "
                "in (0, 1]")
    if method == "sigmoied_threshold" and not 0 <= value < 1:
        return (f"{flag} {value:g} is out of range for sigmoied_threshold: sigmoid(scores) is compared with it, "
                "so it must be in [0, 1) (1 would prune every weight)")
    return None


def check_pruning_flags(pruning_method: str, initial_threshold: float, final_threshold: float,
                        regularization: str | None, final_lambda: float, global_topk: bool, mask_init: str,
                        initial_warmup: int = 1, final_warmup: int = 2, structure: str = "weights",
                        block_size: int = 32) -> list[str]:
    """Problems with the pruning flags, each naming the flag and what the method accepts."""
    if pruning_method not in PRUNING_METHODS:
        return [f"unknown --pruning_method {pruning_method!r}; choose one of {', '.join(PRUNING_METHODS)}"]
    problems = []
    if structure not in STRUCTURES:
        problems.append(f"unknown --pruning_structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    elif structure != "weights" and pruning_method not in SCORE_METHODS:
        problems.append(f"--pruning_structure {structure} learns scores; {pruning_method} has none (choose one of "
                        f"{', '.join(SCORE_METHODS)})")
    elif structure == "heads_neurons" and mask_init == "kaiming":
        problems.append("--mask_init kaiming needs a matrix of scores; heads_neurons has one score per head or "
                        "neuron (use constant or uniform)")
    if structure == "blocks" and block_size < 1:
        problems.append(f"--block_size must be at least 1 (got {block_size})")
    for flag, value in (("--initial_threshold", initial_threshold), ("--final_threshold", final_threshold)):
        problem = threshold_problem(pruning_method, value, flag, global_topk)
        if problem:
            problems.append(problem)
    if mask_init not in MASK_INITS:
        problems.append(f"unknown --mask_init {mask_init!r}; choose one of {', '.join(MASK_INITS)}")
    if regularization is not None and regularization not in REGULARIZATIONS:
        problems.append(f"unknown --regularization {regularization!r}; choose l1, l0 or null")
    if regularization is not None and pruning_method == "magnitude":
        problems.append("--regularization acts on mask scores, which magnitude pruning does not have")
    if final_lambda < 0 or not math.isfinite(final_lambda):
        problems.append(f"--final_lambda must be >= 0 (got {final_lambda})")
    elif final_lambda > 0 and regularization is None:
        problems.append(f"--final_lambda {final_lambda:g} has no effect without --regularization l1 or l0")
    elif final_lambda > 0 and final_threshold == 0:
        problems.append("--final_threshold 0 with --final_lambda: lambda follows threshold / final_threshold, so "
                        "the final threshold must be non-zero")
    if global_topk and pruning_method not in GLOBAL_METHODS:
        problems.append(f"--global_topk works with {', '.join(GLOBAL_METHODS)}, not {pruning_method}")
    for flag, value in (("--initial_warmup", initial_warmup), ("--final_warmup", final_warmup)):
        if value < 0:
            problems.append(f"{flag} cannot be negative (got {value})")
    return problems


# ----------------------------------------------------------------------------------------------------------
# counting


def remaining_weights(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(kept, total) weights of every masked matrix under its evaluation-mode mask (non-zero gate for l0)."""
    return {name: (int((m.eval_mask() != 0).expand_as(m.weight).sum()), m.weight.numel())
            for name, m in masked_modules(model).items()}


def layer_index(name: str, prefix: str) -> int | None:
    """The encoder layer a module or parameter name belongs to (`<prefix>.<i>.`), or None."""
    match = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def matrix_label(name: str, prefix: str) -> str:
    """The part of a module name after its layer number, e.g. `attention.self.query`."""
    return re.sub(re.escape(prefix) + r"\.\d+\.", "", name)


def summarize_remaining(counts: Mapping[str, tuple[int, int]], prefix: str) -> dict[str, Any]:
    """Per-matrix, per-layer and whole-encoder remaining fractions from (kept, total) counts."""
    per_layer: dict[int, list[int]] = {}
    for name, (kept, total) in counts.items():
        layer = layer_index(name, prefix)
        bucket = per_layer.setdefault(-1 if layer is None else layer, [0, 0])
        bucket[0] += kept
        bucket[1] += total
    kept_all = sum(k for k, _ in counts.values())
    total_all = sum(t for _, t in counts.values())
    return {
        "matrices": {n: {"kept": k, "total": t, "fraction": k / t} for n, (k, t) in counts.items()},
        "layers": {str(i): {"kept": k, "total": t, "fraction": k / t} for i, (k, t) in sorted(per_layer.items())},
        "encoder": {"kept": kept_all, "total": total_all, "fraction": kept_all / max(total_all, 1)},
    }


# ----------------------------------------------------------------------------------------------------------
# saving and loading


@dataclass(frozen=True)
class PruningState:
    """What config.json records about a masked model: enough to rebuild its masks exactly."""

    method: str
    mask_init: str = "constant"
    mask_scale: float = 0.0
    threshold: float | None = None
    score_cut: float | None = None
    structure: str = "weights"
    block_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: infinite values (keep everything) are written as +-1e30. Unstructured pruning writes no
        structure keys (its config.json is what it was before structured pruning existed)."""
        values = asdict(self)
        if self.structure == "weights":
            del values["structure"], values["block_size"]
        elif self.block_size is None:
            del values["block_size"]
        return {k: (math.copysign(1e30, v) if isinstance(v, float) and math.isinf(v) else v)
                for k, v in values.items()}


def pruning_state(model: nn.Module) -> PruningState:
    modules = list(masked_modules(model).values())
    if not modules:
        raise ValueError("the model has no masked layers")
    first = modules[0]
    return PruningState(first.pruning_method, first.mask_init, first.mask_scale, first.threshold,
                        first.score_cut, first.structure, first.block_size)


def prepare_config_for_save(model: nn.Module) -> None:
    """Record the pruning state in model.config (saved in config.json by save_pretrained)."""
    model = unwrap_ddp(model)
    setattr(model.config, PRUNING_KEY, pruning_state(model).to_json())


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a masked model's folder holds: under each masked module's stock `weight` key the pruned weight (its
    evaluation-mode mask multiplied in), so that stock `from_pretrained` builds the pruned model and not the
    unpruned one; the weight itself under `<module>.unpruned_weight` and the scores under `<module>.mask_scores`
    (keys stock classes do not have: reported as unexpected and ignored), for `load_masked_model`."""
    model = unwrap_ddp(model)
    state = model.state_dict()
    for name, module in masked_modules(model).items():
        state[f"{name}.{UNPRUNED_WEIGHT}"] = state[f"{name}.weight"]
        state[f"{name}.weight"] = module.folded_weight()
    return state


def save_masked_model(model: nn.Module, folder: str, **kwargs: Any) -> None:
    """save_pretrained for a masked model: its pruning state in config.json, the weights of
    `state_dict_for_save` (stock loading gives exactly the masked model's evaluation outputs)."""
    model = unwrap_ddp(model)
    prepare_config_for_save(model)
    model.save_pretrained(folder, state_dict=state_dict_for_save(model), **kwargs)


def unpruned_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masked model's own state dict from a saved one: the unpruned weights go back under `weight` (a folder
    saved without them, by the original code or before they were split off, already holds them there)."""
    suffix = f".{UNPRUNED_WEIGHT}"
    own = dict(state)
    for key in [k for k in state if k.endswith(suffix)]:
        own[key[: -len(suffix)] + ".weight"] = own.pop(key)
    return own


def read_config_json(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder} holds no config.json; give a model folder written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def masked_state_of(config_dict: Mapping[str, Any]) -> PruningState | None:
    """The pruning state a config.json records: ours (`pruning`), or the original's `masked_bert` config
    (method, init and scale; its threshold was never saved). None for a stock model."""
    if isinstance(config_dict.get(PRUNING_KEY), dict):
        raw = config_dict[PRUNING_KEY]
        return PruningState(raw.get("method", "topK"), raw.get("mask_init", "constant"),
                            float(raw.get("mask_scale", 0.0)), raw.get("threshold"), raw.get("score_cut"),
                            raw.get("structure", "weights"), raw.get("block_size"))
    if config_dict.get("model_type") == "masked_bert":
        return PruningState(config_dict.get("pruning_method", "topK"), config_dict.get("mask_init", "constant"),
                            float(config_dict.get("mask_scale", 0.0)))
    return None


def is_masked_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and masked_state_of(read_config_json(folder)) is not None


def stock_config(config_dict: Mapping[str, Any]) -> Any:
    """A transformers config object for the stock model under a (possibly masked) config.json."""
    from transformers import AutoConfig, BertConfig

    values = {k: v for k, v in config_dict.items() if k != PRUNING_KEY}
    if values.get("model_type") == "masked_bert":
        for key in ("model_type", "pruning_method", "mask_init", "mask_scale", "architectures"):
            values.pop(key, None)
        return BertConfig(**values)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise UserError("config.json has no model_type; it was not written by transformers")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as err:
        raise UserError(f"unknown model_type {model_type!r} in config.json ({str(err).splitlines()[0]})") from None


def weight_files(folder: str) -> list[str]:
    """The weight files of a folder: one safetensors file, its shards, or the older .bin file(s)."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            try:
                with open(path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{path} is not a valid shard index ({err})") from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise UserError(f"{folder} is missing weight shard(s) {', '.join(missing)} listed in {name}")
            return [os.path.join(folder, s) for s in shards]
        return [path]
    raise UserError(f"{folder} holds no weights (model.safetensors, its shards, or pytorch_model.bin)")


def weights_bytes(folder: str) -> int:
    """Bytes on disk of a folder's weight files (what `weight_files` lists)."""
    return sum(os.path.getsize(f) for f in weight_files(folder))


def read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, from safetensors (sharded or not) or the older .bin files."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            if path.endswith(".safetensors"):
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
            raise UserError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    return state


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], folder: str) -> None:
    """Load a state dict whose keys are the model's own; a missing or extra parameter is an error."""
    params = dict(model.named_parameters())
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k in params]
    if missing:
        raise UserError(f"{folder} does not hold a complete model: missing {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    unexpected = [k for k in result.unexpected_keys if not k.endswith(("position_ids", "token_type_ids"))]
    if unexpected:
        raise UserError(f"{folder} holds weights this model does not have: {', '.join(unexpected[:3])}")


def build_model(config: Any, auto_class: Any = None) -> nn.Module:
    from transformers import AutoModelForQuestionAnswering

    auto_class = auto_class or AutoModelForQuestionAnswering
    return auto_class.from_config(config)


def load_masked_model(folder: str, auto_class: Any = None, threshold: float | None = None) -> nn.Module:
    """A masked model saved by this project (or by the original's masked_bert code), in evaluation mode.
    `threshold` replaces the recorded one (the original's folders record none: then it is required, except
    for l0)."""
    config_dict = read_config_json(folder)
    state = masked_state_of(config_dict)
    if state is None:
        raise UserError(f"{folder} holds no masked model (config.json has no pruning state): give the output "
                        "folder of run_squad_pruning.py")
    if state.method not in PRUNING_METHODS:
        raise UserError(f"{folder}: unknown pruning method {state.method!r} in config.json")
    if state.structure not in STRUCTURES or (state.structure == "blocks" and not isinstance(state.block_size, int)):
        raise UserError(f"{folder}: unknown pruning structure {state.structure!r} (block size {state.block_size}) "
                        "in config.json")
    model = build_model(stock_config(config_dict), auto_class)
    mask_model(model, state.method, state.mask_init, state.mask_scale, state.structure, state.block_size or 32)
    load_state_into(model, unpruned_state(read_state_dict(folder)), folder)
    if threshold is not None:
        set_threshold(model, threshold)
    elif state.threshold is not None:
        set_threshold(model, state.threshold, state.score_cut)
    elif state.method != "l0":
        raise UserError(f"{folder} does not record its pruning threshold (an original masked_bert folder); "
                        "give --threshold")
    return model.eval()


def fold_masks(model: nn.Module) -> nn.Module:
    """Multiply each MaskedLinear's evaluation-mode mask into its weight and swap it back for a plain
    nn.Linear (in place): the result is a stock model computing what the masked one computes in eval mode."""
    for name, module in masked_modules(model).items():
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.folded_weight().clone())
        linear.bias = module.bias
        linear.train(module.training)
        _replace(model, name, linear)
    if hasattr(getattr(model, "config", None), PRUNING_KEY):
        delattr(model.config, PRUNING_KEY)
    return model


# ----------------------------------------------------------------------------------------------------------
# compact storage


def save_compact(state: Mapping[str, torch.Tensor], path: str, sparse_names: Iterable[str]) -> dict[str, int]:
    """Write a state dict with the matrices in `sparse_names` in CSR form (non-zero values in their dtype,
    int16 column indices where the width allows, int32 row pointers) and the rest dense, as one safetensors
    file. Lossless. Returns byte counts, dense vs as stored, of all tensors and of the sparse matrices alone."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    sparse_names = set(sparse_names)
    dense_bytes = stored = sparse_dense = sparse_stored = 0
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        dense_bytes += tensor.numel() * tensor.element_size()
        if name in sparse_names and tensor.dim() == 2:
            sparse_dense += tensor.numel() * tensor.element_size()
            with warnings.catch_warnings():  # "sparse CSR support is in beta": only its plain layout is used
                warnings.simplefilter("ignore", UserWarning)
                csr = tensor.to_sparse_csr()
            cols = csr.col_indices()
            index_dtype = torch.int16 if tensor.shape[1] <= 32767 else torch.int32
            parts = {"values": csr.values().contiguous(), "col": cols.to(index_dtype),
                     "crow": csr.crow_indices().to(torch.int32)}
            if parts["crow"][-1] != csr.values().numel():
                raise ValueError(f"{name}: too many non-zeros for int32 row pointers")
            for part, value in parts.items():
                tensors[f"{name}::{part}"] = value
                stored += value.numel() * value.element_size()
                sparse_stored += value.numel() * value.element_size()
            layout[name] = {"format": "csr", "shape": list(tensor.shape)}
        else:
            tensors[name] = tensor
            stored += tensor.numel() * tensor.element_size()
    save_tensors_atomic(path, tensors, metadata={"compact_layout": json.dumps(layout)})
    return {"dense_bytes": dense_bytes, "stored_bytes": stored, "sparse_matrices_dense_bytes": sparse_dense,
            "sparse_matrices_stored_bytes": sparse_stored}


def load_compact_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The dense state dict stored by save_compact."""
    try:
        with safe_open(path, framework="pt") as f:
            layout = json.loads((f.metadata() or {}).get("compact_layout", "null"))
        raw = load_file(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read compact weights {path}: {err}") from None
    if layout is None:
        raise UserError(f"{path} was not written by bertarize.py --compact_path (no layout metadata)")
    state = {k: v for k, v in raw.items() if "::" not in k}
    for name, info in layout.items():
        values, col, crow = raw[f"{name}::values"], raw[f"{name}::col"], raw[f"{name}::crow"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(crow.to(torch.int64), col.to(torch.int64), values,
                                          size=tuple(info["shape"]))
            state[name] = csr.to_dense()
    return state
