"""Atomic writes: the one place that does "write under a temporary name, then rename into place".

A crash (or an exception, or a full disk) while writing leaves the previous file or folder, or none, never
half of one, and no temporary left behind. Every module that writes results, caches, models or checkpoints
goes through `atomic_path` or the helpers built on it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from safetensors import SafetensorError

from common.errors import USER_ERRNOS, UserError

if TYPE_CHECKING:  # only named in annotations: the light modules that import io stay free of torch
    import torch

TEMP_MARK = ".tmp-"  # every temporary name holds it (hidden, next to its target): easy to recognise and clean
TEMP_PATTERN = re.compile(r"^\..*\.tmp-(\d+)-[0-9a-f]{8}")  # what temp_name makes: the writer's pid in group 1
LOW_SPACE = 16 * 2**20  # a write that fails with less free space than this failed for want of space
IO_ERRNOS = (*USER_ERRNOS, errno.EIO)  # what run_cli reports as the user's to fix, and a failing device


class WriteError(UserError):
    """A file or folder could not be written (disk full, read-only, no permission): one line naming it."""


def write_error(path: str, err: BaseException) -> WriteError | None:
    """The WriteError to raise for `err` while writing `path`, or None when `err` is not an I/O failure (a
    bug, a bad value) and should propagate as it is. torch.save reports a full disk as a RuntimeError with no
    errno, so the free space of the target's disk decides for errors other than OSError."""
    folder = os.path.dirname(os.path.abspath(path))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        free: int | None = shutil.disk_usage(folder or "/").free
    except OSError:
        free = None
    if isinstance(err, OSError):
        if err.errno not in IO_ERRNOS and not (free is not None and free < LOW_SPACE):
            return None
        reason = err.strerror or str(err)
    elif free is not None and free < LOW_SPACE or "No space left" in str(err):
        reason = "no space left on the device"
    else:
        return None
    space = f" ({free / 2**20:.1f} MB free there)" if free is not None else ""
    return WriteError(f"cannot write {path}: {reason}{space}; free some space, or choose a writable --output_dir")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """I/O failures inside the block become one WriteError naming `path` (see write_error)."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as err:
        converted = write_error(path, err)
        if converted is None:
            raise
        raise converted from err


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
    tmp = temp_name(path, suffix)
    try:
        with writing(path):  # (the temporary is still there: its size counts against the free space)
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
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
    """A safetensors file written atomically; its mode follows the umask (a 0600 cache would keep another user
    sharing the data folder from reading it)."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates its files 0600 whatever the umask


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_folder_atomic(save: Callable[[str], None], dest: str, obsolete: Sequence[str] = ()) -> None:
    """Run `save(folder)` into a temporary folder next to `dest`'s files, then move each file into `dest`:
    a crash while saving leaves the previous files (or none), never a half-written model beside good ones.
    (`dest` itself may hold other things, such as checkpoints and results, which are kept.) `obsolete`: names
    an earlier save may have left in `dest` that would misdescribe the new one; removed before it moves in."""
    tmp = temp_name(os.path.join(dest, "saving"))
    try:
        with writing(dest):
            os.makedirs(tmp)
            save(tmp)
            for name in obsolete:
                if not os.path.exists(os.path.join(tmp, name)):
                    remove_path(os.path.join(dest, name))
            for name in os.listdir(tmp):
                target = os.path.join(dest, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(tmp, name), target)
    finally:
        remove_path(tmp)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries (temp_name's) that dead processes left in `folder`: a run killed while saving
    leaves one that nothing else would ever remove. Those of a process still alive are kept. Returns what
    was removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = TEMP_PATTERN.match(name)
        if match and not _alive(int(match.group(1))):
            remove_path(os.path.join(folder, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
