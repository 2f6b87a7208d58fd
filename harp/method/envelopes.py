"""HARP selection objective: the two first-order envelopes and their greedy ranking with a best-prefix cut.

With ``phi+ = max(phi, 0)``, ``phi- = max(-phi, 0)`` (posterior means) and base scores ``b_d``:

- HARP-C ("conservative"): ``y_d(S) = clip01(b_d + max_{g in S} phi+[g, d] - sum_{g in S} phi-[g, d])``,
  the max over the empty set being 0: only the strongest positive leaf per domain is credited, every harm
  accumulates, so redundant leaves are not rewarded;
- HARP-E ("expansive"): ``y_d(S) = clip01(b_d + sum_{g in S} phi[g, d])``: effects add up until the clip;
- ``F(S) = sum over active domains d of y_d(S)``.

Numerics: everything runs in float64. The greedy keeps the (active domains x leaves) matrix transposed so
that each step is a handful of contiguous numpy passes over it (or, by default, one compiled pass:
:mod:`harp.method.greedy_kernel`, bit-identical), and computes a leaf's per-domain gain as
``clip(shift_d + delta[g, d], -y_d, 1 - y_d)``; a leaf with no effect on a domain therefore gains exactly 0
there, and two leaves whose effects saturate the same clip gain bit-identical amounts, so plateaus and ties
in the running sum are exact rather than rounding noise. Gains agree with the direct formula
(:func:`envelope_objective`) to a few ulps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from harp.validate import check_int

__all__ = [
    "ENVELOPES",
    "GREEDY_KERNELS",
    "GreedyResult",
    "active_domains",
    "envelope_objective",
    "envelope_values",
    "greedy_taskaware",
    "validate_envelope",
]

ENVELOPES: tuple[str, ...] = ("conservative", "expansive")

# Implementations of the greedy loop: the compiled one (default) and the numpy reference.
GREEDY_KERNELS: tuple[str, ...] = ("numba", "numpy")

# Stop reasons reported by greedy_taskaware.
STOP_COMPLETE = "complete"  # every leaf ranked
STOP_MAX_STEPS = "max_steps"
STOP_BUDGET = "budget"  # the ranked leaves' sizes reached the point budget
STOP_BOUND = "bound"  # proven that no longer prefix can beat the best one (see greedy_taskaware)

# Below this many working columns compaction is not worth the copy.
_MIN_COMPACT_COLUMNS = 64


def validate_envelope(envelope: Any) -> str:
    """The envelope name, or a ValueError that lists the valid ones."""
    if not isinstance(envelope, str) or envelope not in ENVELOPES:
        raise ValueError(f"unknown envelope {envelope!r}; valid envelopes are {', '.join(map(repr, ENVELOPES))}")
    return envelope


def _as_phi(phi: Any, name: str = "phi") -> np.ndarray:
    arr = np.asarray(phi)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (leaves x domains), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): need at least one leaf and one domain")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        g, d = np.argwhere(bad)[0]
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values, first at leaf {g}, domain {d}")
    return arr


def _as_base(base: Any, n_domains: int) -> np.ndarray:
    arr = np.asarray(base)
    if arr.shape != (n_domains,):
        raise ValueError(f"base must have shape ({n_domains},) (one score per domain), got {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"base must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~(np.isfinite(arr) & (arr >= 0.0) & (arr <= 1.0))
    if bad.any():
        d = int(np.flatnonzero(bad)[0])
        raise ValueError(f"base scores must be finite and in [0, 1]; domain {d} has {arr[d]!r}")
    return arr


def _as_active(active: Any, n_domains: int) -> np.ndarray:
    if active is None:
        return np.ones(n_domains, dtype=bool)
    arr = np.asarray(active)
    if arr.shape != (n_domains,) or arr.dtype != bool:
        raise ValueError(f"active must be a bool array of shape ({n_domains},), got {arr.dtype} {arr.shape}")
    return arr.copy()


def as_leaf_ids(subset: Any, n_leaves: int, name: str = "subset") -> np.ndarray:
    """A 1-D array of distinct, in-range leaf ids; errors name the argument."""
    arr = np.atleast_1d(np.asarray([] if subset is None else subset))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of integer leaf ids, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64)
    out = (arr < 0) | (arr >= n_leaves)
    if out.any():
        raise ValueError(f"{name} has leaf id {int(arr[out][0])} outside [0, {n_leaves})")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name} repeats leaf id {int(uniq[counts > 1][0])}")
    return arr


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def envelope_values(phi: Any, base: Any, weights: Any, envelope: str) -> np.ndarray:
    """Predicted ``y_d`` (all domains) for leaf weights in [0, 1].

    With 0/1 weights this is exactly the envelope of the set of weight-1 leaves. Fractional weights scale
    a leaf's effect by the share of it that is used (``max_g w_g phi+`` for HARP-C, ``sum_g w_g phi`` for
    HARP-E): a first-order extrapolation, used only to score example sets that take parts of leaves.
    """
    envelope = validate_envelope(envelope)
    phi = _as_phi(phi)
    b = _as_base(base, phi.shape[1])
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (phi.shape[0],):
        raise ValueError(f"weights must have shape ({phi.shape[0]},) (one per leaf), got {w.shape}")
    if not (np.isfinite(w) & (w >= 0.0) & (w <= 1.0)).all():
        raise ValueError("weights must be finite and in [0, 1]")
    used = w > 0
    wphi = phi[used] * w[used, None]
    if envelope == "expansive":
        return np.clip(b + wphi.sum(axis=0), 0.0, 1.0)
    best_pos = np.maximum(wphi, 0.0).max(axis=0, initial=0.0)
    harm = np.maximum(-wphi, 0.0).sum(axis=0)
    return np.clip(b + best_pos - harm, 0.0, 1.0)


def envelope_objective(
    phi: Any, base: Any, subset: Any, envelope: str, active: Any = None
) -> tuple[float, np.ndarray]:
    """``(F(S), y(S))`` by the direct formula; the reference the incremental greedy is checked against."""
    envelope = validate_envelope(envelope)
    phi = _as_phi(phi)
    act = _as_active(active, phi.shape[1])
    idx = as_leaf_ids(subset, phi.shape[0])
    w = np.zeros(phi.shape[0])
    w[idx] = 1.0
    y = envelope_values(phi, base, w, envelope)
    return float(y[act].sum()), y


def active_domains(post_mean: Any, post_sd: Any, *, z: float = 1.0) -> np.ndarray:
    """Domains on which at least one leaf's effect is credibly non-zero: ``|mean| > z * sd``.

    A zero sd (a value known exactly) makes any non-zero mean credible, which the same inequality gives.
    Domains no leaf can credibly move carry only noise into the objective, so selection ignores them.
    """
    mean = _as_phi(post_mean, "post_mean")
    sd = _as_phi(post_sd, "post_sd")
    if sd.shape != mean.shape:
        raise ValueError(f"post_sd shape {sd.shape} differs from post_mean shape {mean.shape}")
    if (sd < 0).any():
        g, d = np.argwhere(sd < 0)[0]
        raise ValueError(f"post_sd must be >= 0; leaf {g}, domain {d} has {sd[g, d]!r}")
    if isinstance(z, bool) or not np.isfinite(z) or z < 0:
        raise ValueError(f"z must be a finite number >= 0, got {z!r}")
    return np.any(np.abs(mean) > float(z) * sd, axis=0)


@dataclass(frozen=True)
class GreedyResult:
    """A greedy ranking and its best-prefix cut.

    ``running[k-1]`` is the cumulative gain after ``k`` leaves; the cut is the ``k`` in ``0..len(order)``
    that maximises it with the empty prefix counting as 0, the shortest such prefix on ties (a leaf that
    adds nothing is not kept). ``predicted``/``objective`` are ``y_d`` (all domains) and ``F`` (active
    domains) of the kept prefix by the direct formula; ``empty_objective`` is ``F`` of the empty set.
    ``order`` may be shorter than the number of leaves: see ``stop_reason``.
    """

    order: np.ndarray
    gains: np.ndarray
    running: np.ndarray
    cut: int
    empty_prefix_best: bool
    predicted: np.ndarray
    objective: float
    empty_objective: float
    envelope: str
    active: np.ndarray
    stop_reason: str
    n_leaves: int
    rows_scanned: int  # leaf columns evaluated over all steps (work done; benchmarks turn it into bytes)

    @property
    def kept(self) -> np.ndarray:
        return self.order[: self.cut]

    @property
    def complete(self) -> bool:
        return self.stop_reason == STOP_COMPLETE


def _best_prefix(running: np.ndarray) -> int:
    """Length of the best prefix; ``np.argmax`` returns the first maximum, i.e. the shortest prefix."""
    return int(np.argmax(np.concatenate(([0.0], running))))


def greedy_taskaware(
    phi: Any,
    base: Any,
    envelope: str,
    *,
    active: Any = None,
    max_steps: int | None = None,
    leaf_sizes: Any = None,
    budget_points: int | None = None,
    early_stop: bool = True,
    kernel: str = "numba",
) -> GreedyResult:
    """Rank leaves by greedy marginal gain of ``F`` and cut at the best prefix.

    Each step adds the leaf with the largest ``F(S + g) - F(S)`` (negative gains included, ties to the
    lowest leaf id) from one pass over the remaining leaves, with per-domain running state
    (HARP-C: best positive effect ``M_d`` and summed harm ``N_d``; HARP-E: ``V_d = b_d + sum phi``) updated
    for the chosen leaf only. Chosen leaves are masked; the working matrix is compacted only when half of
    it is masked, so the copying is amortised.

    The ranking stops when every leaf is ranked, after ``max_steps`` leaves, or, when ``leaf_sizes`` and
    ``budget_points`` are given, as soon as the ranked leaves hold at least ``budget_points`` examples.
    Longer prefixes could not be realised under the budget (their extra leaves would be cut off by the
    point cap), so the cut is then the best prefix among the ranked ones: this can keep fewer leaves than
    "cut the full ranking, then cap" when the full running sum peaks beyond the budget, and it keeps the
    prefix with the higher predicted objective. The last ranked leaf may be only partly inside the budget.

    Early stop (``early_stop=True``): gains can grow again as ``S`` grows in both envelopes because of the
    clip (HARP-E: a harmful leaf pulls a domain above 1 back into range where a helpful one counts again;
    HARP-C: a harm pulls ``b + M - N`` below 1 and a larger ``phi+`` then counts), so "all gains <= 0 now"
    proves nothing. What is used instead is an upper bound on ``F`` of every superset of ``S`` drawn from the
    remaining leaves R, per domain, by monotonicity of the clip:

    - HARP-C: ``y_d(S + T) <= clip01(b_d + max(M_d, max_{g in R} phi+[g, d]) - N_d)`` since ``N_d`` only grows;
    - HARP-E: ``y_d(S + T) <= clip01(V_d + sum_{g in R} phi+[g, d])``.

    Every later running sum equals the current one plus ``F(S + T) - F(S)`` for some T, so once
    ``sum_d bound_d - F(S) <= best - running`` no later prefix beats the best one strictly and the cut
    (shortest on ties) is final. The max/sum over R are taken at the last compaction (an upper bound, as R
    only shrinks) and set to 0 exactly when no positive entry is left in a domain. Pass ``early_stop=False``
    for the full ranking; the cut and kept set are the same (in exact arithmetic).

    ``kernel``: ``"numba"`` (default) runs the whole ranking as one compiled loop that reads each working
    column once per step (:mod:`harp.method.greedy_kernel`, several times faster at scale); ``"numpy"``
    runs the vectorised numpy passes described above and is kept as the reference the kernel is tested
    against. Both give the same order, gains (bit for bit), cut, stop reason and ``rows_scanned``.
    """
    envelope = validate_envelope(envelope)
    if kernel not in GREEDY_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels are {', '.join(map(repr, GREEDY_KERNELS))}")
    phi = _as_phi(phi)
    G, D = phi.shape
    b = _as_base(base, D)
    act = _as_active(active, D)
    limit = G if max_steps is None else min(G, check_int(max_steps, "max_steps", minimum=0))
    sizes = None
    if leaf_sizes is not None:
        sizes = np.asarray(leaf_sizes)
        if sizes.shape != (G,) or sizes.dtype == bool or not np.issubdtype(sizes.dtype, np.integer):
            raise ValueError(f"leaf_sizes must be an integer array of shape ({G},), got {sizes.dtype} {sizes.shape}")
        if (sizes < 0).any():
            raise ValueError(f"leaf_sizes must be >= 0; leaf {int(np.flatnonzero(sizes < 0)[0])} is negative")
        sizes = sizes.astype(np.int64)
    budget = None
    if budget_points is not None:
        if sizes is None:
            raise ValueError("budget_points needs leaf_sizes (the number of examples in each leaf)")
        budget = check_int(budget_points, "budget_points", minimum=0)

    conservative = envelope == "conservative"
    if kernel == "numba":
        from harp.method import greedy_kernel  # numba is imported only when the kernel is used

        order, gains_arr, stop, rows_scanned = greedy_kernel.rank(
            phi, b, act, conservative, limit, sizes, budget, early_stop
        )
    else:
        order, gains_arr, stop, rows_scanned = _rank_numpy(
            phi, b, act, conservative, limit, sizes, budget, early_stop
        )
    running = np.cumsum(gains_arr)
    cut = _best_prefix(running)
    objective, predicted = envelope_objective(phi, b, order[:cut], envelope, act)
    empty_objective, _ = envelope_objective(phi, b, [], envelope, act)
    return GreedyResult(
        order=_readonly(order),
        gains=_readonly(gains_arr),
        running=_readonly(running),
        cut=cut,
        empty_prefix_best=cut == 0,
        predicted=_readonly(predicted),
        objective=objective,
        empty_objective=empty_objective,
        envelope=envelope,
        active=_readonly(act),
        stop_reason=stop,
        n_leaves=G,
        rows_scanned=rows_scanned,
    )


def _rank_numpy(
    phi: np.ndarray,
    b: np.ndarray,
    act: np.ndarray,
    conservative: bool,
    limit: int,
    sizes: np.ndarray | None,
    budget: int | None,
    early_stop: bool,
) -> tuple[np.ndarray, np.ndarray, str, int]:
    """The reference greedy loop in numpy passes: (order, gains, stop reason, rows scanned)."""
    G = phi.shape[0]
    # Working matrix: active domains x remaining leaves, contiguous along leaves.
    work = np.ascontiguousarray(phi[:, act].T)
    ba = b[act]
    neg = np.minimum(work, 0.0) if conservative else None  # -phi- (C only)
    ids = np.arange(G, dtype=np.int64)  # leaf id of each working column, increasing
    alive = np.ones(G, dtype=bool)
    n_alive = G
    buf = np.empty_like(work)

    # Per-domain state: HARP-C keeps M (best positive) and N (summed harm); HARP-E keeps V = b + sum phi.
    M = np.zeros(ba.size)
    N = np.zeros(ba.size)
    V = ba.copy()  # also HARP-C's pre-clip value (b - N) + M, as N = M = 0
    y = np.clip(V, 0.0, 1.0)

    def bound_stats() -> tuple[np.ndarray, np.ndarray]:
        """Max (C) or sum (E) of phi+ over the working columns, and their positive counts per domain.

        Called only when every working column is alive (at the start and right after a compaction).
        """
        pos_count = (work > 0).sum(axis=1)
        if conservative:
            return work.max(axis=1, initial=0.0), pos_count
        return np.maximum(work, 0.0).sum(axis=1), pos_count

    rem_stat, pos_count = bound_stats()

    order = np.empty(limit, dtype=np.int64)
    gains_out = np.empty(limit)
    run = 0.0
    best = 0.0
    taken_points = 0
    rows_scanned = 0
    k = 0
    stop = STOP_COMPLETE
    while True:
        if n_alive == 0:
            stop = STOP_COMPLETE
            break
        if k >= limit:
            stop = STOP_MAX_STEPS
            break
        if budget is not None and taken_points >= budget:
            stop = STOP_BUDGET
            break
        if early_stop:
            reach = np.where(pos_count > 0, rem_stat, 0.0)
            if conservative:
                ub = np.clip((ba - N) + np.maximum(M, reach), 0.0, 1.0)
            else:
                ub = np.clip(V + reach, 0.0, 1.0)
            if ub.sum() - y.sum() <= best - run:
                stop = STOP_BOUND
                break

        # One pass: per-domain gain clip(shift + delta, -y, 1 - y), summed over domains.
        shift = V - y
        lo = (-y)[:, None]
        hi = (1.0 - y)[:, None]
        if conservative:
            # delta = max(phi+, M) - M - phi- = max(phi - M, min(phi, 0)) since M >= 0.
            np.subtract(work, M[:, None], out=buf)
            np.maximum(buf, neg, out=buf)
            if shift.any():
                buf += shift[:, None]
            np.clip(buf, lo, hi, out=buf)
        elif shift.any():
            np.add(work, shift[:, None], out=buf)
            np.clip(buf, lo, hi, out=buf)
        else:
            np.clip(work, lo, hi, out=buf)
        gains = buf.sum(axis=0)
        rows_scanned += work.shape[1]
        if n_alive < work.shape[1]:
            gains[~alive] = -np.inf
        j = int(np.argmax(gains))
        g = int(ids[j])
        col = work[:, j]

        order[k] = g
        gains_out[k] = gains[j]
        run += float(gains[j])
        best = max(best, run)
        k += 1
        if sizes is not None:
            taken_points += int(sizes[g])

        if conservative:
            np.maximum(M, col, out=M)
            N -= neg[:, j]
            V = (ba - N) + M
        else:
            V = V + col
        y = np.clip(V, 0.0, 1.0)
        pos_count -= col > 0
        alive[j] = False
        n_alive -= 1

        if n_alive <= work.shape[1] // 2 and work.shape[1] >= _MIN_COMPACT_COLUMNS:
            keep = np.flatnonzero(alive)
            work = np.ascontiguousarray(work[:, keep])
            if conservative:
                neg = np.ascontiguousarray(neg[:, keep])
            ids = ids[keep]
            alive = np.ones(keep.size, dtype=bool)
            buf = np.empty_like(work)
            rem_stat, pos_count = bound_stats()

    return order[:k].copy(), gains_out[:k].copy(), stop, rows_scanned
