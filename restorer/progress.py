"""Progress of long work, for a person: a bar on a terminal, periodic log lines elsewhere.

On a terminal (stderr is a TTY) a ``tqdm`` bar shows done / total (when known), the rate and
the time left. In a log file, a CI job or a submitted job's log (no TTY) the same figures come
as one ``INFO`` line every ``interval`` seconds, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Self

log = logging.getLogger(__name__)


_tty: bool | None = None  # what stderr was before restorer.console put a filter on it


def remember_tty(value: bool) -> None:
    global _tty
    _tty = value


def stderr_is_tty() -> bool:
    if _tty is not None:
        return _tty
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``done`` of ``total`` items (``total`` may be unknown, ``None``, and set later)."""

    def __init__(self, description: str, total: int | None = None, unit: str = "images",
                 interval: float = 10.0, tty: bool | None = None, initial: int = 0,
                 bar: Any = None):
        """``initial``: items done before this run (a resumed job), not counted in the rate.
        ``bar``: a tqdm-like class to draw with instead of ``tqdm`` (e.g. Ray's
        ``ray.experimental.tqdm_ray.tqdm``, which draws a worker's bar on the driver)."""
        self.description = description
        self.total = total
        self.unit = unit
        self.interval = interval
        self.initial = self.done = initial
        self.started = time.monotonic()
        self._last_log = self.started
        self._postfix: dict[str, Any] = {}
        self._bar = None
        if bar is not None:
            self._bar = bar(total=total, desc=description, unit=unit)
            if initial:
                self._bar.update(initial)
        elif stderr_is_tty() if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=" " + unit.removesuffix("s"),
                             file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                             initial=initial)

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.done += count
        if postfix:
            self._postfix.update(postfix)
        if self._bar is not None:
            if postfix and hasattr(self._bar, "set_postfix"):
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval:
            self._last_log = now
            log.info("%s", self.line())

    def set_total(self, total: int | None) -> None:
        """Set the total once known (e.g. by a counting thread); thread-safe enough for a
        progress display."""
        self.total = total
        if self._bar is not None and hasattr(self._bar, "refresh"):
            self._bar.total = total
            self._bar.refresh()

    def line(self) -> str:
        """The progress as one line: done/total, rate, time left (when the total is known)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        text = f"{self.description}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.2f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        if self._postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self._postfix.items())
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
