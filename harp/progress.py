"""Progress of long loops (counts, rate, time left) to a logger, Dagster's `context.log` or a callable."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
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

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, detail: str = "", weight: float = 1.0) -> None:
        self.count += 1
        self.weight += weight
        now = time.perf_counter()
        if self.count == 1 or self.count == self.total or now - self._last >= self.every_s:
            elapsed = now - self.t0
            rate = self.count / elapsed if elapsed > 0 else float("inf")
            left = (self.total_weight - self.weight) * elapsed / self.weight if self.weight else float("nan")
            per = f", {self.weight / max(elapsed, 1e-9):.1f} {self.weight_unit}/s" if self.weight_unit else ""
            emit(self.log, f"{self.what} {self.count}/{self.total}" + (f" ({detail})" if detail else "")
                 + f"; {rate:.2f} {self.plural}/s{per}, about {_fmt_s(left)} left")
            self._last = now
