"""From a greedy leaf ranking to selected pool rows: the point-budget cap, HARP selection, random baseline.

Leaves are given as CSR arrays from the hierarchy: ``member_order`` (n,) lists pool rows grouped by leaf,
nearest the leaf centroid first, and ``leaf_offsets`` (G + 1,) delimits leaf ``g`` as
``member_order[leaf_offsets[g]:leaf_offsets[g + 1]]``. Rows are positions in the pool table; the caller
maps them to ``example_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from harp.method.envelopes import (
    GreedyResult,
    active_domains,
    as_leaf_ids,
    envelope_values,
    greedy_risk_aware,
    greedy_taskaware,
    validate_envelope,
)
from harp.validate import check_int

__all__ = [
    "HarpSelection",
    "PredictionBand",
    "cap_to_budget",
    "harp_select",
    "leaf_of_rows",
    "predicted_utility",
    "prediction_band",
    "random_selection",
    "without_rows",
]


def _as_budget(top_k_points: Any) -> int | None:
    if top_k_points is None:
        return None
    return check_int(top_k_points, "top_k_points (or None: no cap)", minimum=0)


def _as_csr(member_order: Any, leaf_offsets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked int64 copies of the CSR arrays: offsets from 0 to n, non-decreasing, rows a permutation."""
    order = np.asarray(member_order)
    offsets = np.asarray(leaf_offsets)
    for name, arr in (("member_order", order), ("leaf_offsets", offsets)):
        if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    order = order.astype(np.int64)
    offsets = offsets.astype(np.int64)
    n = order.size
    if offsets.size < 2:
        raise ValueError(f"leaf_offsets must have G + 1 >= 2 entries, got {offsets.size}")
    if offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(f"leaf_offsets must run from 0 to len(member_order)={n}, got {offsets[0]}..{offsets[-1]}")
    dec = np.flatnonzero(np.diff(offsets) < 0)
    if dec.size:
        raise ValueError(f"leaf_offsets must be non-decreasing; leaf {int(dec[0])} has negative size")
    if n:
        bad = (order < 0) | (order >= n)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"member_order[{i}] = {int(order[i])} is not a row in [0, {n})")
        counts = np.bincount(order, minlength=n)
        if (counts > 1).any():
            raise ValueError(f"member_order lists row {int(np.flatnonzero(counts > 1)[0])} more than once")
    return order, offsets




def cap_to_budget(
    kept_leaves: Any, member_order: Any, leaf_offsets: Any, top_k_points: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the kept leaves in ranking order (inside a leaf, CSR order), stopping at ``top_k_points``.

    Returns ``(example_rows, leaf_of_selected, rank_of_leaf)``: the rows, the leaf of each row, and the
    position of that leaf in ``kept_leaves`` (0 = ranked first). ``top_k_points=None`` takes every row.
    """
    order, offsets = _as_csr(member_order, leaf_offsets)
    kept = as_leaf_ids(kept_leaves, offsets.size - 1, "kept_leaves")
    budget = _as_budget(top_k_points)
    starts = offsets[kept]
    lengths = offsets[kept + 1] - starts
    total = int(lengths.sum())
    take = total if budget is None else min(total, budget)
    # Vectorised concatenation of the kept leaves' slices: position p of the output lies in kept leaf r at
    # offset p - (rows before r), i.e. at CSR position starts[r] + p - before[r].
    ranks = np.repeat(np.arange(kept.size, dtype=np.int64), lengths)[:take]
    before = np.cumsum(lengths) - lengths
    pos = np.arange(take, dtype=np.int64) - before[ranks] + starts[ranks]
    return order[pos], kept[ranks], ranks


def without_rows(member_order: Any, leaf_offsets: Any, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays with `rows` left out, renumbered compactly, and the way back.

    Returns ``(order, offsets, back)``: a valid CSR over the ``n - len(rows)`` remaining rows (each leaf keeps
    its remaining rows in their order; a leaf may become empty) and ``back[i]``, the original row of compact
    row ``i``. A selection made on the compact arrays maps to pool rows as ``back[selected]``.
    """
    order, offsets = _as_csr(member_order, leaf_offsets)
    n = order.size
    r = np.unique(np.atleast_1d(np.asarray(rows, dtype=np.int64)))
    if r.size and (r[0] < 0 or r[-1] >= n):
        raise ValueError(f"rows to leave out must lie in [0, {n}), got {int(r[0])}..{int(r[-1])}")
    drop = np.zeros(n, dtype=bool)
    drop[r] = True
    back = np.flatnonzero(~drop)
    compact = np.full(n, -1, dtype=np.int64)
    compact[back] = np.arange(back.size, dtype=np.int64)
    keep = ~drop[order]
    leaf = np.repeat(np.arange(offsets.size - 1, dtype=np.int64), np.diff(offsets))
    counts = np.bincount(leaf[keep], minlength=offsets.size - 1)
    return compact[order[keep]], np.concatenate(([0], np.cumsum(counts))).astype(np.int64), back


def leaf_of_rows(member_order: Any, leaf_offsets: Any) -> np.ndarray:
    """Leaf id of every pool row, from the CSR arrays."""
    order, offsets = _as_csr(member_order, leaf_offsets)
    leaf_of = np.empty(order.size, dtype=np.int64)
    leaf_of[order] = np.repeat(np.arange(offsets.size - 1, dtype=np.int64), np.diff(offsets))
    return leaf_of


def predicted_utility(
    rows: Any,
    phi: Any,
    base: Any,
    member_order: Any,
    leaf_offsets: Any,
    *,
    envelope: str,
    active: Any = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Envelope prediction for an arbitrary set of pool rows (e.g. a baseline's selection).

    Each leaf enters with weight = the share of its rows that are selected (see ``envelope_values``), so
    whole leaves are scored exactly as the greedy scores them. Returns ``(F over active domains, y (D,),
    weights (G,))``. Repeated rows count once.
    """
    envelope = validate_envelope(envelope)
    leaf_of = leaf_of_rows(member_order, leaf_offsets)
    n = leaf_of.size
    r = np.atleast_1d(np.asarray(rows))
    if r.size and (r.ndim != 1 or r.dtype == bool or not np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"rows must be a 1-D sequence of integer pool rows, got {r.dtype} {r.shape}")
    r = np.unique(r.astype(np.int64))
    if r.size and (r[0] < 0 or r[-1] >= n):
        bad = r[(r < 0) | (r >= n)][0]
        raise ValueError(f"rows has {int(bad)}, outside the pool's rows [0, {n})")
    G = np.asarray(leaf_offsets).size - 1
    sizes = np.diff(np.asarray(leaf_offsets, dtype=np.int64))
    hit = np.bincount(leaf_of[r], minlength=G).astype(np.float64)
    weights = np.divide(hit, sizes, out=np.zeros(G), where=sizes > 0)
    phi_arr = np.asarray(phi)
    if phi_arr.ndim != 2 or phi_arr.shape[0] != G:
        raise ValueError(f"phi must have one row per leaf ({G}), got shape {phi_arr.shape}")
    y = envelope_values(phi_arr, base, weights, envelope)
    act = np.ones(y.size, dtype=bool) if active is None else np.asarray(active)
    if act.shape != y.shape or act.dtype != bool:
        raise ValueError(f"active must be a bool array of shape {y.shape}, got {act.dtype} {act.shape}")
    return float(y[act].sum()), y, weights


# A domain whose envelope value before the clip reaches this is reported as saturated: y_d = 1 is the clip.
SATURATION = 1.0 - 1e-9


@dataclass(frozen=True)
class PredictionBand:
    """Predicted ``y_d`` per domain with a credible band, and whether the clip at 1 decided it.

    ``low``/``high`` are the envelope with every used leaf's effect at its lower/upper posterior quantile
    (``mean -/+ z * sd``) together. Both envelopes rise with every effect, so this is the band of ``y_d`` when
    the leaves' errors are fully correlated: the widest case, the honest one when only the posterior marginals
    are known (leaves under one parent share its error). ``unclipped`` is ``y_d`` before ``clip01``;
    ``saturated`` marks domains where it reaches 1: there a predicted 1.0 is the clip, not 100% accuracy.
    """

    predicted: np.ndarray
    low: np.ndarray
    high: np.ndarray
    unclipped: np.ndarray
    saturated: np.ndarray
    level: float


def prediction_band(
    phi_mean: Any, phi_sd: Any, base: Any, weights: Any, *, envelope: str, level: float = 0.9
) -> PredictionBand:
    """The envelope's ``y_d`` for leaf ``weights`` with its central ``level`` credible band (see PredictionBand)."""
    if isinstance(level, bool) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean = np.asarray(phi_mean, dtype=np.float64)
    sd = np.asarray(phi_sd, dtype=np.float64)
    if sd.shape != mean.shape:
        raise ValueError(f"phi_sd shape {sd.shape} differs from phi_mean shape {mean.shape}")
    if (sd < 0).any() or not np.isfinite(sd).all():
        raise ValueError("phi_sd must be finite and >= 0")
    z = NormalDist().inv_cdf(0.5 + float(level) / 2.0)
    y = envelope_values(mean, base, weights, envelope)
    raw = envelope_values(mean, base, weights, envelope, clip=False)
    return PredictionBand(
        predicted=y,
        low=envelope_values(mean - z * sd, base, weights, envelope),
        high=envelope_values(mean + z * sd, base, weights, envelope),
        unclipped=raw,
        saturated=raw >= SATURATION,
        level=float(level),
    )


@dataclass(frozen=True)
class HarpSelection:
    """One envelope's selection: pool rows in selection order and the diagnostics behind them.

    ``row_gain[i]`` is the greedy step gain of the leaf row ``i`` came from. ``predicted`` is ``y_d`` of the
    kept leaves (whole), ``predicted_rows`` that of the rows actually selected (a leaf cut by the budget
    weighted by its selected share), ``band`` the same with its credible band and saturated domains. ``note``
    explains an empty or degenerate selection (``None`` otherwise).
    """

    envelope: str
    example_rows: np.ndarray
    leaf_of_row: np.ndarray
    leaf_rank: np.ndarray
    row_gain: np.ndarray
    greedy: GreedyResult
    active: np.ndarray
    predicted: np.ndarray
    predicted_rows: np.ndarray
    top_k_points: int | None
    note: str | None
    band: PredictionBand

    @property
    def n_selected(self) -> int:
        return int(self.example_rows.size)


def harp_select(
    phi_mean: Any,
    phi_sd: Any,
    base: Any,
    member_order: Any,
    leaf_offsets: Any,
    *,
    envelope: str,
    top_k_points: int | None,
    z_active: float = 1.0,
    early_stop: bool = True,
    risk: str = "plugin",
    risk_kappa: float = 1.0,
    risk_samples: int = 64,
    risk_seed: int = 0,
) -> HarpSelection:
    """Active domains, greedy ranking with best-prefix cut, then the point cap.

    The ranking is told the leaf sizes and the budget, so it stops once the ranked leaves hold
    ``top_k_points`` rows; the cut is then the best prefix among the ranked ones (see
    ``greedy_taskaware``) and the cap takes the first ``top_k_points`` rows of the kept leaves.
    ``risk`` other than ``"plugin"`` ranks with the risk-aware objective (``greedy_risk_aware``).
    """
    envelope = validate_envelope(envelope)
    budget = _as_budget(top_k_points)
    order, offsets = _as_csr(member_order, leaf_offsets)
    mean = np.asarray(phi_mean)
    G = offsets.size - 1
    if mean.ndim != 2 or mean.shape[0] != G:
        raise ValueError(f"phi_mean must have one row per leaf ({G} leaves from leaf_offsets), got {mean.shape}")
    active = active_domains(mean, phi_sd, z=z_active)
    greedy = greedy_taskaware(
        mean,
        base,
        envelope,
        active=active,
        leaf_sizes=np.diff(offsets),
        budget_points=budget,
        early_stop=early_stop,
    ) if risk == "plugin" else greedy_risk_aware(
        mean, phi_sd, base, envelope, risk=risk, risk_kappa=risk_kappa, risk_samples=risk_samples, seed=risk_seed,
        active=active, leaf_sizes=np.diff(offsets), budget_points=budget)
    rows, leaf_of_row, rank = cap_to_budget(greedy.kept, order, offsets, budget)
    notes = []
    if not active.any():
        notes.append(f"no active domain: no leaf's effect is beyond {z_active} posterior sd of 0 on any domain")
    if budget == 0:
        notes.append("top_k_points is 0: nothing is selected")
    elif greedy.empty_prefix_best:
        first = (
            f"; the best first leaf would change it by {float(greedy.gains[0]):+.4g}"
            if greedy.gains.size else "; no leaf has a positive posterior mean on any of them"
        )
        notes.append(
            f"the empty prefix is best: on the {int(active.sum())} credible domain(s) no ranked prefix raises the "
            f"predicted objective above the base model's (every credible gain is <= 0{first}), "
            "so nothing is selected"
        )
    # What the capped rows themselves predict: the last kept leaf may be only partly inside the budget.
    _, predicted_rows, weights = predicted_utility(
        rows, mean, base, order, offsets, envelope=envelope, active=active
    )
    return HarpSelection(
        envelope=envelope,
        example_rows=rows,
        leaf_of_row=leaf_of_row,
        leaf_rank=rank,
        row_gain=greedy.gains[rank],
        greedy=greedy,
        active=active,
        predicted=greedy.predicted,
        predicted_rows=predicted_rows,
        top_k_points=budget,
        note="; ".join(notes) if notes else None,
        band=prediction_band(mean, phi_sd, base, weights, envelope=envelope),
    )


def random_selection(n_pool: int, budget: int, *, seed: int) -> np.ndarray:
    """``min(budget, n_pool)`` distinct pool rows drawn uniformly for ``seed`` (in draw order)."""
    n = check_int(n_pool, "n_pool", minimum=0)
    k = check_int(budget, "budget", minimum=0)
    s = check_int(seed, "seed", minimum=0)
    rng = np.random.default_rng(s)
    return rng.permutation(n)[: min(k, n)].astype(np.int64)
