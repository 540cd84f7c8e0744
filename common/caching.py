"""Feature cache: built once by rank 0, keyed by everything that shapes the features, stored as plain tensors.

The cache is a safetensors file (no pickled code runs on load). Its name carries a hash of the key (task,
split, tokenizer identity and options, max length, source file identity, featurizer version), and the full
key is stored in the file's metadata and checked on load. Writes go to a temporary file renamed into place;
a damaged or mismatched file is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.distributed import DistContext, main_process_first
from common.io import save_tensors_atomic

logger = logging.getLogger(__name__)


def file_identity(path: str) -> dict[str, Any]:
    """Path, size and content hash of a source file: a changed file gets a new cache entry."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": digest.hexdigest()}


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What about a tokenizer changes its output: class, source, and a hash of its full serialized state
    (vocabulary, normalizer with lower-casing, special tokens, truncation side)."""
    ident: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ident["backend_sha256"] = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    return ident


def cache_path(cache_dir: str, prefix: str, key: Mapping[str, Any]) -> str:
    """`<cache_dir>/cached_<prefix>_<hash>.safetensors`, the hash covering the whole key."""
    digest = hashlib.sha256(_canonical(key).encode("utf-8")).hexdigest()[:16]
    safe_prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", prefix).strip("-")
    return os.path.join(cache_dir, f"cached_{safe_prefix}_{digest}.safetensors")


def _canonical(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _try_load(path: str, key_json: str) -> dict[str, torch.Tensor] | None:
    if not os.path.exists(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("cache_key") != key_json:
            logger.warning("Feature cache %s was made for other settings; rebuilding it", path)
            return None
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        logger.warning("Feature cache %s is damaged (%s); rebuilding it", path, err)
        return None


def load_and_cache_examples(
    ctx: DistContext,
    cache_dir: str,
    prefix: str,
    key: Mapping[str, Any],
    build: Callable[[], dict[str, torch.Tensor]],
    overwrite_cache: bool = False,
) -> dict[str, torch.Tensor]:
    """Features for one split: from the cache when its key matches, else built by `build()` and cached.

    Rank 0 builds and writes first; the other ranks wait, then read the file rank 0 wrote. A folder that
    cannot be written (read-only data) only costs the cache, not the run.
    """
    path = cache_path(cache_dir, prefix, key)
    key_json = _canonical(key)
    with main_process_first(ctx):
        # Only rank 0 honours --overwrite_cache: the others must read what rank 0 just rebuilt.
        features = None if (overwrite_cache and ctx.is_main) else _try_load(path, key_json)
        if features is not None:
            logger.info("Loaded features from cache %s", path)
            return features
        features = build()
        if ctx.is_main:
            try:
                save_tensors_atomic(path, features, {"cache_key": key_json})
                logger.info("Saved features to cache %s", path)
            except OSError as err:
                logger.warning("Could not write feature cache %s (%s); continuing without it", path, err)
        return features


def first_examples(features: Mapping[str, torch.Tensor], n: int | None, example_index: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """--max_train_samples / --max_eval_samples: the first `n` examples of a featurized set (all of it when n is
    None), cut after caching so that the cache stays keyed by the whole file. With `example_index`, rows are
    windows of examples (SQuAD) and those of the first n examples are kept."""
    if n is None:
        return dict(features)
    if example_index is None:
        return {k: v[:n] for k, v in features.items()}
    keep = features[example_index] < n
    return {k: v[keep] for k, v in features.items()}
