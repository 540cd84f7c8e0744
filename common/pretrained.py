"""Checks on model folders before from_pretrained, so a bad path gets one clear line, not a traceback."""

from __future__ import annotations

import os

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
