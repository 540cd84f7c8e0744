"""The parts of a transformer layer that structured pruning and shrinking act on, in one place.

A BERT-style layer (BERT, RoBERTa and the families that share their module names) has two kinds of units:

* attention heads: head h owns rows h*d .. (h+1)*d - 1 of the query, key and value matrices (d = hidden size /
  number of heads) and the same columns of the attention output matrix;
* FFN neurons: neuron j owns row j of the intermediate matrix and column j of the output matrix.

`UNIT_PARTS` names, per unit kind, the linear layers (relative to the layer) and the axis of their weight that
the units index (0: rows, 1: columns). The first entry of each kind runs first in the layer's forward pass:
it holds the kind's scores when pruning (see common.models.masked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.errors import UserError

if TYPE_CHECKING:
    from torch import nn

STRUCTURES = ("weights", "heads_neurons", "blocks")
HEADS, NEURONS = "heads", "neurons"
UNIT_PARTS = {
    HEADS: (("attention.self.query", 0), ("attention.self.key", 0), ("attention.self.value", 0),
            ("attention.output.dense", 1)),
    NEURONS: (("intermediate.dense", 0), ("output.dense", 1)),
}
ATTENTION_SELF = "attention.self"


def head_size(config: Any) -> int:
    return int(config.hidden_size) // int(config.num_attention_heads)


def unit_size(config: Any, kind: str) -> int:
    """Rows (or columns) of a matrix that one unit owns: the head size for heads, 1 for neurons."""
    return head_size(config) if kind == HEADS else 1


def layer_parts(layer: nn.Module, where: str) -> dict[str, dict[str, nn.Linear]]:
    """The linear layers of one encoder layer by unit kind and name; a clear error for a layer that is not
    BERT-style (`where` names the layer in it)."""
    from torch import nn  # imported here: the module itself loads no torch, so parsers can offer STRUCTURES

    parts: dict[str, dict[str, nn.Linear]] = {}
    for kind, names in UNIT_PARTS.items():
        for name, _ in names:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                raise UserError(f"{where} has no linear layer {name}: structured pruning and shrinking need a "
                                "BERT-style layer (bert, roberta, ...)")
            parts.setdefault(kind, {})[name] = module
    return parts
