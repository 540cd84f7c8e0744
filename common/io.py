"""Atomic writes: the one place that does "write under a temporary name, then rename into place".

A crash (or an exception, or a full disk) while writing leaves the previous file or folder, or none, never
half of one, and no temporary left behind. Every module that writes results, caches, models or checkpoints
goes through `atomic_path` or the helpers built on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterator, Mapping

import torch

TEMP_MARK = ".tmp-"  # every temporary name holds it (hidden, next to its target): easy to recognise and clean


def remove_path(path: str) -> None:
    """Remove a file or a folder tree, if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def temp_name(path: str, suffix: str = "") -> str:
    """A unique hidden name in `path`'s folder (same file system, so the final rename is atomic). `suffix`
    keeps an extension for writers that choose the format from it (cv2, matplotlib, safetensors)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", replace_folder: bool = True) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block succeeds, rename it onto `path` (a file, or a
    folder the block created, which then replaces an existing folder whole); when it fails, remove it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path) and replace_folder:
            remove_path(path)
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Text (UTF-8, '\\n' line ends) written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_json_atomic(path: str, obj: Any, indent: int | None = 2, sort_keys: bool = True, **dump_kw: Any) -> None:
    """JSON (by default indented, sorted keys) written atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str, **dump_kw)
    write_text_atomic(path, text + "\n")


def write_bytes_atomic(path: str, chunks: Any) -> None:
    """Bytes (one `bytes` object or an iterable of them) written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in ([chunks] if isinstance(chunks, (bytes, bytearray)) else chunks):
            f.write(chunk)


def save_tensors_atomic(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                        ) -> None:
    """A safetensors file written atomically; the file mode follows the umask (mkstemp's 0600 would keep
    another user sharing a data folder from reading a cache)."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata) if metadata is not None else None)


def save_folder_atomic(save: Callable[[str], None], dest: str) -> None:
    """Run `save(folder)` into a temporary folder next to `dest`'s files, then move each file into `dest`:
    a crash while saving leaves the previous files (or none), never a half-written model beside good ones.
    (`dest` itself may hold other things, such as checkpoints and results, which are kept.)"""
    os.makedirs(dest, exist_ok=True)
    tmp = temp_name(os.path.join(dest, "saving"))
    os.makedirs(tmp)
    try:
        save(tmp)
        for name in os.listdir(tmp):
            target = os.path.join(dest, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        remove_path(tmp)
