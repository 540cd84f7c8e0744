"""What the scripts read of a pretrained model before and after from_pretrained: the folder checked first (so a
bad path gets one clear line, not a traceback), the names of its weight files, and where its layers are."""

from __future__ import annotations

import os
import zipfile

from safetensors import SafetensorError, safe_open
from torch import nn

from common.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_folder(path: str) -> None:
    """A local folder must hold a config and weights (sharded or not, safetensors or the older .bin).

    Names that are not local folders are left to from_pretrained (a hub id, which needs a network)."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/", "~")):
            raise UserError(f"model folder {path} does not exist; give a folder written by save_pretrained")
        return
    missing = []
    if not os.path.isfile(os.path.join(path, "config.json")):
        missing.append("config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        missing.append("weights (" + " or ".join(WEIGHT_FILES[:3:2]) + ")")
    if missing:
        raise UserError(f"{path} is not a complete model folder: {' and '.join(missing)} missing; point "
                        "--model_name_or_path at a folder written by save_pretrained (or a finished checkpoint)")
    for name in sorted(os.listdir(path)):
        check_weights_file(os.path.join(path, name))


def check_weights_file(file: str, fix: str = "save or copy the model again") -> None:
    """A safetensors file must have a complete header and cover its tensors, a .bin file must be a complete
    archive: a truncated or corrupt one is a clear error here rather than a traceback inside from_pretrained."""
    if file.endswith(".safetensors"):
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file} is damaged ({str(err).splitlines()[0]}); {fix}") from None
    elif file.endswith(".bin") and os.path.basename(file).startswith("pytorch_model") and \
            not zipfile.is_zipfile(file):
        raise UserError(f"{file} is damaged (not a complete torch.save archive); {fix}")


def find_encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer layers and its module name (BERT/RoBERTa `...encoder.layer`, DistilBERT
    `...transformer.layer`, ...): the nn.ModuleList with one entry per hidden layer, the outermost if several.
    The one rule early exit (hooks on each layer) and pruning (the layers' linear maps) both use."""
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == expected]
    if not found:
        raise UserError(f"cannot find the {expected} encoder layers of {type(model).__name__}: this needs a model "
                        "whose transformer layers form one nn.ModuleList (bert, roberta, distilbert, ...)")
    return min(found, key=lambda item: len(item[0]))
