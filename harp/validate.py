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


def check_matrix(a: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """`a` as a C-contiguous 2-D array of `dtype`: non-empty, real and finite, a bad row named by index."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dim), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has non-finite values in {rows.size} row(s), first rows {rows[:5].tolist()}")
    big = (np.abs(arr) > np.finfo(dtype).max).any(axis=1) if np.issubdtype(np.dtype(dtype), np.floating) else None
    if big is not None and big.any():
        rows = np.flatnonzero(big)
        raise ValueError(f"{name} overflows {np.dtype(dtype).name} in {rows.size} row(s), first rows {rows[:5].tolist()}")
    return np.ascontiguousarray(arr, dtype=dtype)
