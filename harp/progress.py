"""Progress of long loops (counts, rate, time left) to a logger, Dagster's `context.log` or a callable.

Besides the log lines (at most every 30 s), every step is handed to the listeners registered with `listen`,
which is how the console commands draw their progress bars from the same counts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("harp.stages")

LogTarget = Callable[[str], None] | logging.Logger | logging.LoggerAdapter | None

# A loop reports at most this often (seconds), besides its first and last item.
_LOG_EVERY_S = 30.0


def emit(log: Any, message: str) -> None:
    """Progress to a logger (anything with `.info`, e.g. Dagster's `context.log`) or to a callable."""
    if log is None:
        logger.info(message)
    elif hasattr(log, "info"):
        log.info(message)
    elif callable(log):
        log(message)
    else:
        raise TypeError(
            f"log must be a logging.Logger, a callable taking a string, or None; got {type(log).__name__}"
        )



@dataclass(frozen=True)
class ProgressUpdate:
    """Where one loop stands: handed to every listener at its start (count 0) and after every step."""

    key: int  # tells loops apart (two loops may share `what`)
    what: str
    plural: str
    count: int
    total: int
    elapsed: float
    rate: float  # items per second
    left: float  # seconds, from the weights when the loop has them; nan before the first step
    detail: str = ""

    @property
    def text(self) -> str:
        """Rate and time left, as the log lines word them."""
        return f"{self.rate:.2f} {self.plural}/s, about {_fmt_s(self.left)} left"


_listeners: list[Callable[[ProgressUpdate], None]] = []


@contextlib.contextmanager
def listen(fn: Callable[[ProgressUpdate], None]) -> Iterator[None]:
    """Hand every loop's updates in this process to `fn` while the block runs."""
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)


def _notify(update: ProgressUpdate) -> None:
    for fn in list(_listeners):
        fn(update)


def _fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Count, rate and time left of a loop with a known total, reported at most every `every_s` seconds.

    `weight` lets the time left follow the work (training examples) rather than the item count.
    """

    def __init__(self, total: int, log: LogTarget = None, *, what: str = "leaf", plural: str = "leaves",
                 total_weight: float | None = None, weight_unit: str | None = None,
                 every_s: float = _LOG_EVERY_S) -> None:
        self.total, self.log, self.what, self.plural, self.every_s = int(total), log, what, plural, every_s
        self.weight_unit = weight_unit
        self.total_weight = float(total if total_weight is None else total_weight)
        self.count, self.weight = 0, 0.0
        self.t0 = self._last = time.perf_counter()
        if _listeners:
            _notify(self._update(self.t0, ""))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _update(self, now: float, detail: str) -> ProgressUpdate:
        elapsed = now - self.t0
        rate = self.count / elapsed if elapsed > 0 else float("inf")
        left = (self.total_weight - self.weight) * elapsed / self.weight if self.weight else float("nan")
        return ProgressUpdate(id(self), self.what, self.plural, self.count, self.total, elapsed, rate, left, detail)

    def step(self, detail: str = "", weight: float = 1.0) -> None:
        self.advance(1, detail, weight)

    def advance(self, n: int, detail: str = "", weight: float | None = None) -> None:
        """`n` more items done (a batch at once), weighing `weight` (default `n`)."""
        if n <= 0:
            return
        self.count += n
        self.weight += float(n if weight is None else weight)
        now = time.perf_counter()
        update = self._update(now, detail)
        if self.count == n or self.count >= self.total or now - self._last >= self.every_s:
            per = f", {self.weight / max(update.elapsed, 1e-9):.1f} {self.weight_unit}/s" if self.weight_unit else ""
            emit(self.log, f"{self.what} {self.count}/{self.total}" + (f" ({detail})" if detail else "")
                 + f"; {update.rate:.2f} {self.plural}/s{per}, about {_fmt_s(update.left)} left")
            self._last = now
        if _listeners:
            _notify(update)
