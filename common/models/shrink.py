"""A physically smaller model: the attention heads and FFN neurons that pruning emptied are removed.

Zeros in dense matrices save no time; a matrix with fewer rows does. After pruning (structured pruning empties
whole heads and neurons; any method may), `shrink_model` removes from each BERT-style layer
(common.models.structured):

* a head whose columns of the attention output matrix are all zero (it adds nothing), or whose rows of the
  value matrix are (its output is then the same for every token: attention weights sum to one, so it adds
  W_O[:, head] @ b_V[head], folded into the output bias);
* a neuron whose column of the output matrix is zero, or whose row of the intermediate matrix is (it then adds
  act(b) * W_out[:, neuron], folded into the output bias).

Every remaining linear layer is a stock `nn.Linear` with fewer rows or columns: BERT's attention infers the
number of heads from the projection width (`view(..., -1, head_size)`; checked in transformers 5.23 for BERT
and RoBERTa). A layer left with no head gets `NoHeads` in place of its self-attention (a zero-width context:
the attention output is its bias, the residual path carries the layer); a layer with no neuron keeps
zero-width FFN matrices (the same).

A stock config cannot say that layers differ in width, so the per-layer widths are written beside it, in
`shrink_layout.json`, and the folder loads with one call::

    from common.models.shrink import load_shrunk_model
    model = load_shrunk_model("runs/squad-shrunk")      # AutoModelForQuestionAnswering by default

which builds the stock model from config.json and replaces its linear layers with the recorded smaller ones
before loading the weights; a layout that does not match the weights is refused. When every layer keeps all
its heads and the same number of neurons, the config's `intermediate_size` says it all and stock
`from_pretrained` loads the folder too (`stock_loadable` in the layout).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from common.errors import UserError
from common.io import write_json_atomic
from common.models.structured import ATTENTION_SELF, HEADS, NEURONS, UNIT_PARTS, head_size, layer_parts
from common.pretrained import find_encoder_layers

LAYOUT_FILE = "shrink_layout.json"
LAYOUT_FORMAT = "compress-bert shrink layout"
LAYOUT_VERSION = 1


class NoHeads(nn.Module):
    """The self-attention of a layer that kept no head: a zero-width context (no attention weights)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _zero(weight: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Which units (groups of `size` rows for axis 0, columns for axis 1) of `weight` are all zero."""
    w = weight.detach() if axis == 0 else weight.detach().t()
    return (w.reshape(-1, size * w.shape[1]) == 0).all(dim=1)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with warnings.catch_warnings():  # "initializing zero-element tensors is a no-op": a unit-less layer's matrix
        warnings.simplefilter("ignore", UserWarning)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear


def _set(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, child, module)


def _weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as it computes (a masked one's mask multiplied in)."""
    folded = getattr(module, "folded_weight", None)
    return folded() if folded is not None else module.weight.detach()


def live_units(layer: nn.Module, config: Any, where: str) -> dict[str, Any]:
    """The heads and neurons of one layer that still contribute: kept indices per kind, and the constant each
    removed-but-not-silent unit adds to its output matrix's bias."""
    parts = layer_parts(layer, where)
    result: dict[str, Any] = {}
    with torch.no_grad():
        for kind, size in ((HEADS, head_size(config)), (NEURONS, 1)):
            (rows_name, _), *_, (out_name, _) = UNIT_PARTS[kind]
            source = "attention.self.value" if kind == HEADS else rows_name
            out, src = parts[kind][out_name], parts[kind][source]
            w_out, w_src = _weight(out), _weight(src)
            silent = _zero(w_out, 1, size)  # adds nothing at all
            constant = _zero(w_src, 0, size) & ~silent  # adds a constant: its input rows are zero
            keep = ~(silent | constant)
            shift = torch.zeros(w_out.shape[0], dtype=w_out.dtype)
            if bool(constant.any()) and src.bias is not None:
                value = src.bias.detach()
                if kind == NEURONS:
                    value = layer.intermediate.intermediate_act_fn(value)
                cols = constant.repeat_interleave(size)
                shift = w_out[:, cols] @ value[cols]
            result[kind] = keep.nonzero().squeeze(1).tolist()
            result[f"{kind}_bias_shift"] = shift
    return result


def shrink_model(model: nn.Module) -> dict[str, Any]:
    """Remove the heads and neurons that no longer contribute (in place, on a stock or masked model whose masks
    are folded in or not); returns the layout that `load_shrunk_model` needs."""
    prefix, layers = find_encoder_layers(model)
    config = model.config
    d = head_size(config)
    entries = []
    for i, layer in enumerate(layers):
        units = live_units(layer, config, f"{prefix}.{i}")
        parts = layer_parts(layer, f"{prefix}.{i}")
        for kind, size in ((HEADS, d), (NEURONS, 1)):
            keep = torch.tensor(units[kind], dtype=torch.long)
            index = (keep[:, None] * size + torch.arange(size)).reshape(-1)
            for name, axis in UNIT_PARTS[kind]:
                module = parts[kind][name]
                weight = _weight(module).index_select(axis, index)
                bias = None if module.bias is None else module.bias.detach()
                if axis == 0 and bias is not None:
                    bias = bias.index_select(0, index)
                elif bias is not None:
                    bias = bias + units[f"{kind}_bias_shift"].to(bias.dtype)
                _set(layer, name, _linear(weight, bias))
        _fit_attention(layer, len(units[HEADS]), d)
        entries.append({HEADS: units[HEADS], NEURONS: len(units[NEURONS])})
    if hasattr(config, "pruning"):
        delattr(config, "pruning")
    return make_layout(model, prefix, entries)


def _fit_attention(layer: nn.Module, heads: int, d: int) -> None:
    """Record the kept number of heads on the self-attention module, or replace it by NoHeads when none is left
    (a zero-width view cannot infer its number of heads)."""
    attention = layer.get_submodule(ATTENTION_SELF)
    if heads == 0:
        _set(layer, ATTENTION_SELF, NoHeads())
    elif hasattr(attention, "num_attention_heads"):
        attention.num_attention_heads, attention.all_head_size = heads, heads * d


def make_layout(model: nn.Module, prefix: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    config = model.config
    all_heads = all(len(e[HEADS]) == config.num_attention_heads for e in entries)
    widths = {e[NEURONS] for e in entries}
    return {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, "layers_prefix": prefix,
            "num_attention_heads": int(config.num_attention_heads), "head_size": head_size(config),
            "intermediate_size": int(config.intermediate_size), "layers": entries,
            "stock_loadable": all_heads and len(widths) == 1}


def save_shrunk_model(model: nn.Module, layout: Mapping[str, Any], folder: str) -> None:
    """save_pretrained plus shrink_layout.json. A layout every layer of which keeps all heads and one FFN width
    also writes that width as the config's intermediate_size, so stock from_pretrained loads the folder."""
    if layout["stock_loadable"]:
        model.config.intermediate_size = layout["layers"][0][NEURONS]
    model.save_pretrained(folder)
    write_json_atomic(os.path.join(folder, LAYOUT_FILE), dict(layout))


def is_shrunk_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, LAYOUT_FILE))


def read_layout(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, LAYOUT_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            layout = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}); write the folder again with bertarize.py --shrink") from None
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT or layout.get("version") != LAYOUT_VERSION:
        raise UserError(f"{path} is not a version-{LAYOUT_VERSION} shrink layout written by bertarize.py --shrink")
    return layout


def _layout_problem(layout: Mapping[str, Any], config: Any, n_layers: int) -> str | None:
    layers = layout.get("layers")
    if not isinstance(layers, list) or len(layers) != n_layers:
        return f"it lists {len(layers) if isinstance(layers, list) else 'no'} layers, the config has {n_layers}"
    if layout.get("head_size") != head_size(config):
        return f"its head size {layout.get('head_size')} is not the config's {head_size(config)}"
    if not isinstance(layout.get("intermediate_size"), int):
        return f"its intermediate_size {layout.get('intermediate_size')!r} is not a whole number"
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            return f"layer {i} is {entry!r}, not a record of its heads and neurons"
        heads, neurons = entry.get(HEADS), entry.get(NEURONS)
        if (not isinstance(heads, list) or not all(isinstance(h, int) and 0 <= h < config.num_attention_heads
                                                   for h in heads) or heads != sorted(set(heads))):
            return (f"layer {i} lists heads {heads!r}: not distinct increasing indices below "
                    f"{config.num_attention_heads}")
        if not isinstance(neurons, int) or not 0 <= neurons <= layout.get("intermediate_size", -1):
            return f"layer {i} keeps {neurons!r} neurons, not a count up to {layout.get('intermediate_size')}"
    return None


def apply_layout(model: nn.Module, layout: Mapping[str, Any]) -> None:
    """Give a freshly built stock model the layout's smaller linear layers (weights to be loaded after)."""
    prefix, layers = find_encoder_layers(model)
    d = head_size(model.config)
    for i, (layer, entry) in enumerate(zip(layers, layout["layers"])):
        parts = layer_parts(layer, f"{prefix}.{i}")
        for kind, width in ((HEADS, len(entry[HEADS]) * d), (NEURONS, entry[NEURONS])):
            for name, axis in UNIT_PARTS[kind]:
                module = parts[kind][name]
                shape = (width, module.in_features) if axis == 0 else (module.out_features, width)
                _set(layer, name, _linear(torch.zeros(shape), None if module.bias is None
                                          else torch.zeros(shape[0])))
        _fit_attention(layer, len(entry[HEADS]), d)


def load_shrunk_model(folder: str, auto_class: Any = None) -> nn.Module:
    """The shrunk model of a folder written by `bertarize.py --shrink`, in evaluation mode: the stock model of its
    config.json with the linear layers of shrink_layout.json. A layout that does not describe the weights
    (edited, or copied from another model) is refused."""
    from common.models.masked import build_model, load_state_into, read_config_json, read_state_dict, stock_config

    layout = read_layout(folder)
    config = stock_config(read_config_json(folder))
    model = build_model(config, auto_class)
    prefix, layers = find_encoder_layers(model)
    problem = _layout_problem(layout, config, len(layers))
    if problem is None and layout.get("layers_prefix") != prefix:
        problem = f"it describes {layout.get('layers_prefix')}, the model's layers are {prefix}"
    if problem:
        raise UserError(f"{folder}/{LAYOUT_FILE} does not fit the model: {problem}; write the folder again with "
                        "bertarize.py --shrink")
    apply_layout(model, layout)
    state = read_state_dict(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise UserError(f"{folder}/{LAYOUT_FILE} does not match the weights: {key} is "
                            f"{'x'.join(map(str, tensor.shape))} in the weights, "
                            f"{'x'.join(map(str, expected[key]))} by the layout; it was edited or belongs to "
                            "another model: write the folder again with bertarize.py --shrink")
    load_state_into(model, state, folder)
    return model.eval()


def layout_summary(layout: Mapping[str, Any]) -> list[dict[str, int]]:
    """Heads and neurons kept per layer, with the totals they are out of."""
    return [{"heads": len(e[HEADS]), "heads_total": layout["num_attention_heads"], "neurons": e[NEURONS],
             "neurons_total": layout["intermediate_size"]} for e in layout["layers"]]


def kept_units(model: nn.Module) -> list[dict[str, int]]:
    """Heads and neurons per layer that still contribute (what shrinking would keep), of a masked or stock model,
    with the totals they are out of."""
    prefix, layers = find_encoder_layers(model)
    config = model.config
    return [{"heads": len(units[HEADS]), "heads_total": int(config.num_attention_heads),
             "neurons": len(units[NEURONS]), "neurons_total": int(config.intermediate_size)}
            for units in (live_units(layer, config, f"{prefix}.{i}") for i, layer in enumerate(layers))]
