"""Progress of long work, for a person: a bar on a terminal, periodic log lines elsewhere.

On a terminal (stderr is a TTY) a ``tqdm`` bar shows done / total (when known), the rate and
the time left. In a log file, a CI job or a submitted job's log (no TTY) the same figures come
as one ``INFO`` line every ``interval`` seconds, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Self

log = logging.getLogger(__name__)


_tty: bool | None = None  # what stderr was before restorer.job.console put a filter on it


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


MIN_RATE_SECONDS = 1.0  # results spread over less than this give no rate (one burst)


class Progress:
    """``done`` of ``total`` items (``total`` may be unknown, ``None``, and set later).

    Rate and time left count from the first result, not from the start: start-up (Ray, the
    actors, the model, a first batch) is no measure of the pace, and a first batch that brings
    many items at once is not one either. So there is no rate until results have come over at
    least :data:`MIN_RATE_SECONDS`; until then the line says what it waits for and how long it
    has. :meth:`tick` (called while nothing arrives) keeps the log line coming every
    ``interval`` seconds and the terminal's clock moving.
    """

    def __init__(self, description: str, total: int | None = None, unit: str = "images",
                 interval: float = 10.0, tty: bool | None = None, initial: int = 0,
                 bar: Any = None, clock: Callable[[], float] = time.monotonic):
        """``initial``: items done before this run (a resumed job), not counted in the rate.
        ``bar``: a tqdm-like class to draw with instead of ``tqdm`` (e.g. Ray's
        ``ray.experimental.tqdm_ray.tqdm``, which draws a worker's bar on the driver).
        ``clock``: seconds, monotonic (tests pass a fake one)."""
        self.description = description
        self.total = total
        self.unit = unit
        self.interval = interval
        self.initial = self.done = self.shown = initial
        self._clock = clock
        self.started = clock()
        self._first: tuple[float, int] | None = None  # (when, done) at the first result
        self._last_log = self._last_draw = self.started
        self._postfix: dict[str, Any] = {}
        self._bar = None
        self._own_bar = False
        if bar is not None:
            self._bar = bar(total=total, desc=description, unit=unit)
            if initial:
                self._bar.update(initial)
        elif stderr_is_tty() if tty is None else tty:
            from tqdm import tqdm

            # tqdm's own rate and time left would count the start-up; ours go in the postfix
            self._bar = tqdm(total=total, desc=description, unit=" " + unit.removesuffix("s"),
                             file=sys.stderr, dynamic_ncols=True, initial=initial,
                             bar_format=self._bar_format())
            self._own_bar = True

    def _bar_format(self) -> str:
        if self.total:
            return "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
        return "{desc}: {n_fmt} " + self.unit + " [{elapsed}{postfix}]"

    def update(self, count: int = 1, **postfix: Any) -> None:
        """``count`` more results came (:attr:`done`)."""
        self.done += count
        if postfix:
            self._postfix.update(postfix)
        self._show(self.done)

    def ahead(self, count: int) -> None:
        """``count`` items are finished elsewhere and their results have not come yet (the
        images restored in the batches the workers are on): the count shown (:attr:`shown`,
        which the rate and time left use) moves on to ``done + count``, never back and never
        past the total, while :attr:`done` counts the results that came."""
        self._show(self.done + max(0, count))

    def _show(self, count: int) -> None:
        if self.total:
            count = min(count, max(self.total, self.done))
        now = self._clock()
        moved = count - self.shown
        if moved <= 0:
            if self._bar is not None:
                self._draw(now)
            else:
                self._log(now)
            return
        self.shown = count
        if self._first is None:
            self._first = (now, self.shown)
        if self._bar is not None:
            self._draw(now)
            self._bar.update(moved)
            return
        self._log(now)

    def tick(self) -> None:
        """Nothing new: keep the log line every ``interval`` s, and the bar's clock moving."""
        now = self._clock()
        if self._bar is None:
            self._log(now)
        elif now - self._last_draw >= 1.0:
            self._draw(now)
            if hasattr(self._bar, "refresh"):
                self._bar.refresh()

    def _log(self, now: float) -> None:
        if now - self._last_log >= self.interval:
            self._last_log = now
            log.info("%s", self.line())

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if self._own_bar:
            self._bar.set_postfix_str(self._figures(now), refresh=False)
        elif self._postfix and hasattr(self._bar, "set_postfix"):
            self._bar.set_postfix(self._postfix, refresh=False)

    def set_total(self, total: int | None) -> None:
        """Set the total once known (e.g. by a counting thread); thread-safe enough for a
        progress display."""
        self.total = total
        if self._bar is not None and hasattr(self._bar, "refresh"):
            self._bar.total = total
            if self._own_bar:
                self._bar.bar_format = self._bar_format()
            self._bar.refresh()

    def rate(self, now: float | None = None) -> float | None:
        """Items per second since the first result (the items of that first result not
        counted); None until results have come over :data:`MIN_RATE_SECONDS`."""
        now = self._clock() if now is None else now
        if self._first is None:
            return None
        since, base = self._first
        if now - since < MIN_RATE_SECONDS or self.shown <= base:
            return None
        return (self.shown - base) / (now - since)

    def line(self) -> str:
        """The progress as one line: done/total, then rate and time left, or what it waits
        for."""
        text = f"{self.description}: {self.shown}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.shown / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        return text + ", " + self._figures(self._clock())

    def _figures(self, now: float) -> str:
        rate = self.rate(now)
        if self._first is None:
            text = f"waiting for the first results ({_duration(now - self.started)} so far)"
        elif rate is None:
            text = (f"first results after {_duration(self._first[0] - self.started)}; "
                    "measuring the rate")
        else:
            text = f"{rate:.2f} {self.unit}/s"
            if self.total and rate > 0 and self.shown < self.total:
                text += f", about {_duration((self.total - self.shown) / rate)} left"
        if self._postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self._postfix.items())
        return text

    def close(self) -> None:
        if self._bar is not None:
            if self._own_bar:
                self._draw(self._clock())
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
