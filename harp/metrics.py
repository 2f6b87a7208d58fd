"""Scores of a selection against the demo's ground truth, and agreement between effect estimates.

Plain numpy and polars: the validation assets and the benchmark share them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

__all__ = ["kind_shares", "load_ground_truth", "oracle_fraction", "spearman"]


def load_ground_truth(path: str | Path) -> dict[str, str]:
    """example id -> kind (clean, harmful, redundant, filler) from the demo's `ground_truth.parquet`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist")
    df = pl.read_parquet(path)
    missing = [c for c in ("example_id", "kind") if c not in df.columns]
    if missing:
        raise ValueError(f"ground-truth file {path} lacks column(s) {missing}; it has {df.columns}")
    return dict(zip(df["example_id"].to_list(), df["kind"].to_list(), strict=True))


def kind_shares(example_ids: Sequence[str], truth: Mapping[str, str], kinds: Sequence[str]) -> dict[str, float]:
    """Share of the selected examples of each kind (0.0 for an empty selection)."""
    unknown = [e for e in example_ids if e not in truth]
    if unknown:
        raise ValueError(f"{len(unknown)} selected example(s) are not in the ground truth, e.g. {unknown[:3]}")
    n = len(example_ids)
    return {k: (sum(truth[e] == k for e in example_ids) / n if n else 0.0) for k in kinds}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant or n < 2."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs two equally long inputs, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman inputs must be finite")
    if x.size < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def oracle_fraction(accuracy: float, oracle_accuracy: float, base_accuracy: float) -> float:
    """A selection's validated gain over the base model as a fraction of the oracle's (NaN if the oracle
    gained nothing)."""
    gain = oracle_accuracy - base_accuracy
    return (accuracy - base_accuracy) / gain if gain > 0 else float("nan")
