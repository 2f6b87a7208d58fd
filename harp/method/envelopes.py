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
    "RISKS",
    "active_domains",
    "envelope_objective",
    "envelope_values",
    "expected_clip01",
    "greedy_risk_aware",
    "greedy_taskaware",
    "risk_envelope_values",
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


def envelope_values(phi: Any, base: Any, weights: Any, envelope: str, *, clip: bool = True) -> np.ndarray:
    """Predicted ``y_d`` (all domains) for leaf weights in [0, 1]; ``clip=False`` gives the value before clip01.

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
        raw = b + wphi.sum(axis=0)
    else:
        raw = b + np.maximum(wphi, 0.0).max(axis=0, initial=0.0) - np.maximum(-wphi, 0.0).sum(axis=0)
    return np.clip(raw, 0.0, 1.0) if clip else raw


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


# --------------------------------------------------------------------------------------------------------
# Option: risk-aware envelopes (the posterior expectation or a lower quantile instead of plug-in means)
# --------------------------------------------------------------------------------------------------------

RISKS: tuple[str, ...] = ("plugin", "expected", "lcb")


def _norm_cdf(x: Any) -> np.ndarray:
    """Standard normal CDF through ``math.erfc`` on the unique values (double precision, no scipy)."""
    from math import erfc, sqrt

    x = np.asarray(x, dtype=np.float64)
    flat = x.ravel()
    uniq, inv = np.unique(flat, return_inverse=True)
    vals = np.fromiter((0.5 * erfc(-u / sqrt(2.0)) for u in uniq.tolist()), dtype=np.float64, count=uniq.size)
    return vals[inv].reshape(x.shape)


def expected_clip01(m: Any, v: Any) -> np.ndarray:
    """``E[clip01(X)]`` for ``X ~ N(m, v)``, elementwise; ``v = 0`` gives ``clip01(m)``.

    ``E[X 1{0<X<1}] + P(X > 1) = m (Phi(b) - Phi(a)) + s (phi(a) - phi(b)) + 1 - Phi(b)`` with
    ``a = -m/s``, ``b = (1-m)/s``.
    """
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    s = np.sqrt(np.maximum(v, 0.0))
    pos = s > 0
    ss = np.where(pos, s, 1.0)
    a, b = -m / ss, (1.0 - m) / ss
    Pa, Pb = _norm_cdf(a), _norm_cdf(b)
    pdf_a = np.exp(-0.5 * a * a) / np.sqrt(2.0 * np.pi)
    pdf_b = np.exp(-0.5 * b * b) / np.sqrt(2.0 * np.pi)
    e = m * (Pb - Pa) + s * (pdf_a - pdf_b) + 1.0 - Pb
    return np.where(pos, np.clip(e, 0.0, 1.0), np.clip(m, 0.0, 1.0))


def _check_risk(risk: Any, kappa: Any) -> tuple[str, float]:
    if not isinstance(risk, str) or risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; valid values are {', '.join(map(repr, RISKS))}")
    if isinstance(kappa, bool) or not np.isfinite(kappa) or kappa < 0:
        raise ValueError(f"risk_kappa must be a finite number >= 0, got {kappa!r}")
    return risk, float(kappa)


class _RiskObjective:
    """Per-domain risk-aware envelope values of ``S`` and of every ``S + g``, from a running state.

    HARP-E in closed form (leaves independent a posteriori): ``X_d = b_d + sum_{g in S} theta_gd`` is normal
    with mean ``b_d + sum mean`` and variance ``sum sd^2``; ``expected`` is ``E[clip01(X_d)]`` and ``lcb``
    ``clip01(mean - kappa sd)``, the ``Phi(-kappa)`` quantile of ``clip01(X_d)``. HARP-C from ``samples``
    seeded posterior draws of every leaf: ``expected`` is the mean of ``y_d`` over draws, ``lcb`` its
    ``Phi(-kappa)`` quantile.
    """

    def __init__(self, mean: np.ndarray, sd: np.ndarray, b: np.ndarray, conservative: bool, risk: str,
                 kappa: float, samples: int, seed: int) -> None:
        self.mean, self.sd, self.b, self.conservative = mean, sd, b, conservative
        self.expected, self.kappa = risk == "expected", kappa
        self.q = float(_norm_cdf(np.array(-kappa)))
        if conservative:
            rng = np.random.default_rng(seed)
            self.theta = mean[None] + sd[None] * rng.standard_normal((samples, *mean.shape))  # (S, G, D)
            self.best = np.zeros((samples, mean.shape[1]))
            self.harm = np.zeros((samples, mean.shape[1]))
        else:
            self.m = b.copy()
            self.v = np.zeros_like(b)

    def _reduce(self, y: np.ndarray) -> np.ndarray:  # y (S, ...) -> (...)
        return y.mean(axis=0) if self.expected else np.quantile(y, self.q, axis=0)

    def _e_value(self, m: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.expected:
            return expected_clip01(m, v)
        return np.clip(m - self.kappa * np.sqrt(v), 0.0, 1.0)

    def current(self) -> np.ndarray:
        if self.conservative:
            return self._reduce(np.clip(self.b + self.best - self.harm, 0.0, 1.0))
        return self._e_value(self.m, self.v)

    def with_each(self, cand: np.ndarray) -> np.ndarray:
        """(len(cand), D): y of S + g for each candidate leaf g."""
        if self.conservative:
            th = self.theta[:, cand]  # (S, C, D)
            y = self.b + np.maximum(self.best[:, None], th) - (self.harm[:, None] + np.maximum(-th, 0.0))
            return self._reduce(np.clip(y, 0.0, 1.0))
        return self._e_value(self.m + self.mean[cand], self.v + self.sd[cand] ** 2)

    def add(self, g: int) -> None:
        if self.conservative:
            th = self.theta[:, g]
            np.maximum(self.best, th, out=self.best)
            self.harm += np.maximum(-th, 0.0)
        else:
            self.m = self.m + self.mean[g]
            self.v = self.v + self.sd[g] ** 2


def risk_envelope_values(
    mean: Any, sd: Any, base: Any, subset: Any, envelope: str, *, risk: str, risk_kappa: float = 1.0,
    risk_samples: int = 64, seed: int = 0,
) -> np.ndarray:
    """Risk-aware ``y_d`` (all domains) of a set of whole leaves, as ``greedy_risk_aware`` scores it."""
    envelope = validate_envelope(envelope)
    risk, kappa = _check_risk(risk, risk_kappa)
    mu = _as_phi(mean, "mean")
    s = _as_phi(sd, "sd")
    b = _as_base(base, mu.shape[1])
    if risk == "plugin":
        return envelope_objective(mu, b, subset, envelope)[1]
    obj = _RiskObjective(mu, s, b, envelope == "conservative", risk, kappa, int(risk_samples), int(seed))
    for g in as_leaf_ids(subset, mu.shape[0]).tolist():
        obj.add(g)
    return obj.current()


def greedy_risk_aware(
    mean: Any,
    sd: Any,
    base: Any,
    envelope: str,
    *,
    risk: str,
    risk_kappa: float = 1.0,
    risk_samples: int = 64,
    seed: int = 0,
    active: Any = None,
    max_steps: int | None = None,
    leaf_sizes: Any = None,
    budget_points: int | None = None,
) -> GreedyResult:
    """``greedy_taskaware`` with a risk-aware objective: ``F`` sums, over active domains, ``E[y_d]``
    (``risk="expected"``) or its ``Phi(-kappa)`` lower quantile (``"lcb"``) under the posterior, instead of
    ``y_d`` of the posterior means. ``risk="plugin"`` is ``greedy_taskaware`` itself.

    Near the clip a plug-in mean overstates what an uncertain effect adds (the mean crosses 1 while half the
    posterior does not), so at equal means the leaf with the smaller sd gains more. Same ranking rules (ties
    to the lowest leaf id, best-prefix cut, budget stop) without the early-stop bound; numpy only.
    """
    risk, kappa = _check_risk(risk, risk_kappa)
    mu = _as_phi(mean, "mean")
    s = _as_phi(sd, "sd")
    if s.shape != mu.shape or (s < 0).any():
        raise ValueError(f"sd must be >= 0 with the shape of mean {mu.shape}, got {s.shape}")
    if risk == "plugin":
        return greedy_taskaware(mu, base, envelope, active=active, max_steps=max_steps, leaf_sizes=leaf_sizes,
                                budget_points=budget_points)
    envelope = validate_envelope(envelope)
    G, D = mu.shape
    b = _as_base(base, D)
    act = _as_active(active, D)
    samples = check_int(risk_samples, "risk_samples", minimum=2)
    limit = G if max_steps is None else min(G, check_int(max_steps, "max_steps", minimum=0))
    sizes = None if leaf_sizes is None else np.asarray(leaf_sizes, dtype=np.int64)
    if sizes is not None and sizes.shape != (G,):
        raise ValueError(f"leaf_sizes must have shape ({G},), got {sizes.shape}")
    budget = None if budget_points is None else check_int(budget_points, "budget_points", minimum=0)
    if budget is not None and sizes is None:
        raise ValueError("budget_points needs leaf_sizes (the number of examples in each leaf)")
    obj = _RiskObjective(mu, s, b, envelope == "conservative", risk, kappa, samples, int(seed))
    empty_y = obj.current()
    y = empty_y
    remaining = np.arange(G, dtype=np.int64)
    order, gains = [], []
    taken, stop, scanned = 0, STOP_COMPLETE, 0
    while True:
        if remaining.size == 0:
            stop = STOP_COMPLETE
            break
        if len(order) >= limit:
            stop = STOP_MAX_STEPS
            break
        if budget is not None and taken >= budget:
            stop = STOP_BUDGET
            break
        f_now = y[act].sum()
        cand_y = obj.with_each(remaining)
        gain = cand_y[:, act].sum(axis=1) - f_now
        scanned += remaining.size
        j = int(np.argmax(gain))  # first maximum: the lowest leaf id among ties
        g = int(remaining[j])
        order.append(g)
        gains.append(float(gain[j]))
        obj.add(g)
        y = obj.current()
        if sizes is not None:
            taken += int(sizes[g])
        remaining = np.delete(remaining, j)
    order_arr = np.asarray(order, dtype=np.int64)
    gains_arr = np.asarray(gains, dtype=np.float64)
    running = np.cumsum(gains_arr)
    cut = _best_prefix(running)
    predicted = risk_envelope_values(mu, s, b, order_arr[:cut], envelope, risk=risk, risk_kappa=kappa,
                                     risk_samples=samples, seed=seed)
    return GreedyResult(
        order=_readonly(order_arr), gains=_readonly(gains_arr), running=_readonly(running), cut=cut,
        empty_prefix_best=cut == 0, predicted=_readonly(predicted), objective=float(predicted[act].sum()),
        empty_objective=float(empty_y[act].sum()), envelope=envelope, active=_readonly(act), stop_reason=stop,
        n_leaves=G, rows_scanned=scanned,
    )
