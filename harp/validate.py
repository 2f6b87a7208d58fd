"""Argument checks shared by the library: one wording for every integer setting a caller can get wrong."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """`value` as an int; a bool, a float or a value below `minimum` is refused with the setting's name."""
    bound = "" if minimum is None else f" >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)
