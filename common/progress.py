"""Progress of long loops, made in one place so that a log stays readable wherever it goes.

    with progress_bar(total=n, desc="train") as bar:      # or: for x in progress_bar(items, desc="featurize")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

* On a terminal (stderr is a TTY, or a notebook): a tqdm bar. `set_postfix` does not force a redraw; the new
  postfix shows at the bar's next refresh, which tqdm rate-limits (mininterval).
* In a file or pipe (CI, nohup, `> log 2>&1`): no bar, but a plain logger line at most every `LOG_INTERVAL`
  seconds and one at the end (position/total, elapsed time, rate and the postfix, e.g. the loss). A transient
  bar (`leave=False`) writes its end line only if it ran long enough to write a line before.
* Nothing at all on the ranks other than the main one, when TQDM_DISABLE is set (to anything but "" or "0"),
  after `configure(disable=True)` (the scripts' --disable_tqdm), or when the caller passes `disable=True`.

`configure` also turns off transformers' and huggingface_hub's own bars (loading weights, writing shards,
downloads) wherever ours would not be a tqdm bar.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import tqdm.auto
import tqdm.std

logger = logging.getLogger(__name__)

LOG_INTERVAL = 30.0  # seconds between two log lines of one loop, outside a terminal
clock: Callable[[], float] = time.monotonic  # what the log lines are timed with (tests replace it)

_settings: dict[str, bool | None] = {"disable": False, "main": None}


def env_disabled() -> bool:
    """TQDM_DISABLE set to anything but "" or "0" (tqdm's own switch, honoured by every bar made here)."""
    return os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0")


def _is_main() -> bool:
    main = _settings["main"]
    if main is None:  # not configured (a library call): torchrun's RANK says
        return os.environ.get("RANK", "0") in ("", "0")
    return bool(main)


def _interactive() -> bool:
    """A terminal (stderr is a TTY) or a notebook (tqdm.auto chose its widget bar)."""
    if sys.modules["tqdm.autonotebook"].tqdm is not tqdm.std.tqdm:  # imported by tqdm.auto
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def enabled() -> bool:
    """Whether a bar made now shows anything at all (a tqdm bar or log lines)."""
    return _is_main() and not _settings["disable"] and not env_disabled()


def configure(disable: bool = False, main: bool | None = None) -> Callable[[], None]:
    """Settings for every bar made from now on in this process: `disable` (--disable_tqdm) turns them all off,
    `main` says whether this process is the main rank (None: torchrun's RANK environment variable says).
    Turns transformers' own bars off unless ours are tqdm bars. Returns a function that puts the previous
    settings back (script_context calls it when the script ends)."""
    import transformers

    previous = dict(_settings)
    hf_was_on = transformers.utils.logging.is_progress_bar_enabled()
    _settings.update(disable=bool(disable), main=main)
    if not (enabled() and _interactive()):
        transformers.utils.logging.disable_progress_bar()

    def restore() -> None:
        _settings.update(previous)
        if hf_was_on:
            transformers.utils.logging.enable_progress_bar()

    return restore


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, initial: float = 0, leave: bool = True,
                 disable: bool = False) -> Any:
    """A progress bar over `iterable` (or one updated by hand up to `total`), as the module docstring says:
    a tqdm bar on a terminal, rate-limited log lines elsewhere, nothing when disabled. Whatever it returns
    iterates, and has update(n), set_postfix(**values), close() and works as a context manager."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or not enabled():
        return _Silent(iterable)
    if _interactive():
        return _TerminalBar(iterable, total=total, desc=desc or None, unit=unit, unit_scale=unit_scale,
                            initial=initial, leave=leave, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                       leave=leave)


class _TerminalBar(tqdm.auto.tqdm):
    """tqdm whose set_postfix waits for the next (rate-limited) refresh instead of redrawing at once."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


class _Base:
    """Iteration, postfix and context-manager plumbing shared by the bars that are not tqdm's."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable
        self.postfix = ""

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        values = {**dict(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(_Base):
    """A bar that shows nothing (disabled, or not the main rank)."""


class LogProgress(_Base):
    """A bar for a log file: one logger line at most every `interval` seconds while it moves, and one when it
    closes (for a transient bar, only if it already wrote one)."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, initial: float = 0, leave: bool = True,
                 interval: float | None = None) -> None:
        super().__init__(iterable)
        self.total, self.desc, self.unit, self.unit_scale, self.leave = total, desc, unit, unit_scale, leave
        self.n = self.initial = initial
        self.interval = LOG_INTERVAL if interval is None else interval
        self.start = self.last_logged = clock()
        self.lines = 0
        self.logged_n: float | None = None  # where the last line was
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        if clock() - self.last_logged >= self.interval:
            self._log()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if (self.leave or self.lines) and self.n != self.logged_n:
            self._log()

    def line(self) -> str:
        """'train: 40/157 (25%), 0:12 elapsed, 3.33 it/s, loss=0.6931' ('12.0M/40.0MB (30%), ...' with unit_scale)."""
        elapsed = clock() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.unit_scale:
            def fmt(x: float) -> str:
                return tqdm.std.tqdm.format_sizeof(x)
            scaled_unit, unit_gap = self.unit, ""
        else:
            def fmt(x: float) -> str:
                return f"{x:.3g}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x)}"
            scaled_unit, unit_gap = "", " "
        where = fmt(self.n) + (f"/{fmt(self.total)}{scaled_unit} ({100.0 * self.n / self.total:.0f}%)"
                               if self.total else scaled_unit)
        speed = tqdm.std.tqdm.format_sizeof(rate) if self.unit_scale else f"{rate:.3g}"
        parts = [where, f"{tqdm.std.tqdm.format_interval(elapsed)} elapsed", f"{speed}{unit_gap}{self.unit}/s"]
        if self.postfix:
            parts.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _log(self) -> None:
        self.last_logged = clock()
        self.lines += 1
        self.logged_n = self.n
        logger.info("%s", self.line())
