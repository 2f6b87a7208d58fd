"""TSDS, the train-free baseline: a sampling distribution over candidates that aligns with the query set.

Each query j owns 1/M of the probability mass and pours it onto its nearest candidates, nearest first, at a
common "water level" s shared by all queries: a candidate at level s receives 1 / (M * s * kde) from each
query that reaches it, so near-duplicates (high kde) share what one distinct example would get. The level
rises (a min-heap over the queries' running counts) until the transport cost outweighs the diversity term,
i.e. until ``(alpha / C) * total_cost >= (1 - alpha) * M``. The README's TSDS section states the steps,
the formulas and the edge cases decided here.
"""

from __future__ import annotations

import heapq
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from harp.method.ann import build_index
from harp.validate import check_int, check_matrix

logger = logging.getLogger("harp.tsds")

# Gathering neighbour rows for float64 distances is done in blocks of at most this many numbers.
_BLOCK_ELEMS = 1 << 22


@dataclass(frozen=True)
class TsdsResult:
    """The probabilities and what produced them (for diagnostics and metadata)."""

    p: np.ndarray  # (N,) float64, non-negative, sums to 1
    neighbor_ids: np.ndarray  # (M, K) n_j(k), ascending distance (ties by id)
    neighbor_dist: np.ndarray  # (M, K) d_j(k), Euclidean, float64
    neighbor_kde: np.ndarray  # (M, K) kde(n_j(k))
    level: float  # s at the last pop; nan when no pop happened (K == 1)
    last: np.ndarray  # (M,) last_j; -1 when query j never completed a pop before the stop
    stopped: bool  # whether the stopping rule was met (False: every frontier reached K - 2)
    K: int  # neighbours prefetched per query, after the N/10 cap
    K_kde: int  # KDE neighbourhood actually used (capped at the number of prefetched candidates)


@dataclass(frozen=True)
class TsdsSelection:
    """A TSDS selection: ``sample`` is a multiset of candidate indices (sorted), ``counts[i]`` its multiplicity."""

    p: np.ndarray
    sample: np.ndarray
    counts: np.ndarray
    result: TsdsResult


def _embeddings(a: Any, name: str) -> np.ndarray:
    return check_matrix(a, name, np.float64)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _validate(alpha: Any, C: Any, sigma: Any, K: Any, K_kde: Any, n: int) -> tuple[float, float, float, int, int]:
    a = _real(alpha, "alpha")
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must lie in the open interval (0, 1), got {alpha!r}")
    c = _real(C, "C")
    if c <= 0.0:
        raise ValueError(f"C must be > 0, got {C!r}")
    sg = _real(sigma, "sigma")
    if sg < 0.0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    k = check_int(K, "K", minimum=1)
    kk = check_int(K_kde, "K_kde", minimum=1)
    cap = n // 10
    if cap < 1:
        raise ValueError(f"TSDS needs at least 10 candidates (K is at most N/10), got N={n}")
    # Both neighbourhoods are capped at N/10, as the reference does (no effect at the defaults on large pools).
    if k > cap:
        msg = f"K={k} exceeds N/10 for N={n} candidates; using K={cap}"
        warnings.warn(msg, UserWarning, stacklevel=3)
        logger.warning(msg)
        k = cap
    if kk > cap:
        msg = f"K_kde={kk} exceeds N/10 for N={n} candidates; using K_kde={cap}"
        warnings.warn(msg, UserWarning, stacklevel=3)
        logger.warning(msg)
        kk = cap
    return a, c, sg, k, kk


def _sq_dists(ref: np.ndarray, points: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 |ref[r] - points[ids[r, c]]|^2; +inf where ids is -1 (not found by an IVF search)."""
    rows, cols = ids.shape
    out = np.empty((rows, cols), dtype=np.float64)
    safe = np.where(ids >= 0, ids, 0)
    step = max(1, _BLOCK_ELEMS // max(1, cols * points.shape[1]))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        diff = points[safe[a:b]] - ref[a:b, None, :]
        out[a:b] = np.einsum("rkd,rkd->rk", diff, diff)
    out[ids < 0] = np.inf
    return out


def _sort_rows(d: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row ascending by float64 distance, ties by id, so float32 search order does not leak through."""
    order = np.lexsort((ids, d), axis=1)
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _kde(
    points: np.ndarray, K_kde: int, sigma: float, *, exact: bool, nlist: int | None, nprobe: int | None,
    seed: int, use_gpu: bool | str,
) -> tuple[np.ndarray, int]:
    """kde_i = 1 (itself) + sum over its K_kde - 1 nearest others of max(0, 1 - |x_i - x_i'|^2 / sigma^2)."""
    u = points.shape[0]
    kk = min(K_kde, u)
    if sigma == 0.0:
        return np.ones(u, dtype=np.float64), kk
    index = build_index(
        points, exact=exact, nlist=None if (exact or nlist is None) else min(nlist, u), use_gpu=use_gpu, seed=seed
    )
    _, ids = index.search(points, kk, nprobe=nprobe)
    d2 = _sq_dists(points, points, ids)
    # Count the point itself once, explicitly: an exact duplicate can displace it in the search order, and
    # an approximate search can miss it; either way the K_kde - 1 nearest others are kept.
    others = (ids >= 0) & (ids != np.arange(u)[:, None])
    d2 = np.where(others, d2, np.inf)
    d2, ids = _sort_rows(d2, np.where(others, ids, np.iinfo(np.int64).max))
    d2 = d2[:, : kk - 1]
    kernel = np.where(np.isfinite(d2), np.maximum(0.0, 1.0 - d2 / (sigma * sigma)), 0.0)
    return 1.0 + kernel.sum(axis=1), kk


def _water_level(dist: np.ndarray, inv_kde: np.ndarray, alpha: float, C: float) -> tuple[float, np.ndarray, bool]:
    """The heap loop of step 3: returns the level s, last_j per query and whether the stop rule fired.

    Sequential over pops by nature; each pop is O(log M) on Python floats, everything else is precomputed.
    """
    m, k_max = dist.shape
    last = [-1] * m
    if k_max < 2:  # no frontier can advance: every query keeps last_j = -1
        return math.nan, np.asarray(last, dtype=np.int64), False
    counts = np.cumsum(inv_kde, axis=1).tolist()  # c_j(k) = sum_{k' <= k} 1 / kde(n_j(k'))
    wsum = np.cumsum(dist * inv_kde, axis=1).tolist()  # sum_{k' <= k} d_j(k') / kde(n_j(k'))
    d = dist.tolist()
    heap = [(counts[j][0], 0, j) for j in range(m)]  # ties broken by frontier, then query index
    heapq.heapify(heap)
    cost = [0.0] * m
    total = 0.0
    ratio, target = alpha / C, (1.0 - alpha) * m
    level, stopped = math.nan, False
    while heap:
        c, k, j = heapq.heappop(heap)
        level = c
        new_cost = d[j][k + 1] * c - wsum[j][k]
        total += new_cost - cost[j]
        cost[j] = new_cost
        if ratio * total >= target:
            stopped = True
            break
        last[j] = k
        if k < k_max - 2:
            heapq.heappush(heap, (counts[j][k + 1], k + 1, j))
    return level, np.asarray(last, dtype=np.int64), stopped


def tsds_run(
    candidates: Any,
    queries: Any,
    *,
    alpha: float,
    C: float,
    sigma: float,
    K: int,
    K_kde: int,
    exact: bool = True,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    use_gpu: bool | Literal["auto"] = "auto",
) -> TsdsResult:
    """TSDS probabilities with diagnostics; see :func:`tsds_probabilities` for the parameters."""
    x = _embeddings(candidates, "candidates")
    q = _embeddings(queries, "queries")
    n, m = x.shape[0], q.shape[0]
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but candidates have dimension {x.shape[1]}")
    alpha, C, sigma, K, K_kde = _validate(alpha, C, sigma, K, K_kde, n)
    if exact and (nlist is not None or nprobe is not None):
        raise ValueError("nlist and nprobe apply to the approximate index only; pass exact=False")

    # Step 1: K nearest candidates per query, distances recomputed in float64 and rows re-sorted.
    index = build_index(x, exact=exact, nlist=nlist, use_gpu=use_gpu, seed=seed)
    _, ids = index.search(q, K, nprobe=nprobe)
    if (ids < 0).any():
        bad = np.flatnonzero((ids < 0).any(axis=1))
        raise ValueError(
            f"approximate search found fewer than K={K} candidates for {bad.size} query(ies), first "
            f"{bad[:5].tolist()}; raise nprobe (nlist={index.nlist}) or use exact=True"
        )
    d2, ids = _sort_rows(_sq_dists(q, x, ids), ids)
    dist = np.sqrt(d2)

    # Step 2: KDE over the union of prefetched candidates.
    union, inverse = np.unique(ids, return_inverse=True)
    kde_u, kk = _kde(x[union], K_kde, sigma, exact=exact, nlist=nlist, nprobe=nprobe, seed=seed, use_gpu=use_gpu)
    kde = kde_u[inverse.reshape(ids.shape)]
    inv_kde = 1.0 / kde

    # Step 3: the water level.
    level, last, stopped = _water_level(dist, inv_kde, alpha, C)

    # Step 4: 1 / (M s kde) for k <= last_j, the rest of j's 1/M to n_j(last_j + 1).
    p = np.zeros(n, dtype=np.float64)
    rows = np.arange(m)
    leftover = np.full(m, 1.0 / m)
    if math.isfinite(level):
        full = np.arange(K)[None, :] <= last[:, None]
        p += np.bincount(ids[full], weights=(inv_kde / (m * level))[full], minlength=n)
        reached = last >= 0
        c_last = np.cumsum(inv_kde, axis=1)[rows, np.maximum(last, 0)]
        leftover = np.where(reached, np.maximum(1.0 / m - c_last / (m * level), 0.0), leftover)
    p += np.bincount(ids[rows, last + 1], weights=leftover, minlength=n)

    total = float(p.sum())
    if not abs(total - 1.0) <= 1e-9 or (p < 0).any():
        raise RuntimeError(f"TSDS probabilities are inconsistent (sum {total!r}); please report this input")
    logger.info(
        "TSDS N=%d M=%d K=%d K_kde=%d sigma=%g: level s=%.6g, stopped=%s, %d candidates with p > 0",
        n, m, K, kk, sigma, level, stopped, int(np.count_nonzero(p)),
    )
    return TsdsResult(
        p=p, neighbor_ids=ids, neighbor_dist=dist, neighbor_kde=kde, level=float(level), last=last,
        stopped=stopped, K=K, K_kde=kk,
    )


def tsds_probabilities(
    candidates: Any,
    queries: Any,
    *,
    alpha: float,
    C: float,
    sigma: float,
    K: int,
    K_kde: int,
    exact: bool = True,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    use_gpu: bool | Literal["auto"] = "auto",
) -> np.ndarray:
    """TSDS sampling probabilities over the candidate rows (float64, non-negative, sums to 1).

    ``alpha`` in (0, 1) trades alignment (high) against diversity (low); ``C`` > 0 scales distances;
    ``sigma`` >= 0 is the KDE kernel width (0 turns the near-duplicate discount off); ``K`` neighbours are
    prefetched per query (capped at N/10 with a warning); ``K_kde`` >= 1 is the KDE neighbourhood.
    ``exact=False`` uses IVF-Flat (``nlist`` lists, ``nprobe`` probed; ``nprobe >= nlist`` is exhaustive),
    trained with ``seed``.
    """
    return tsds_run(
        candidates, queries, alpha=alpha, C=C, sigma=sigma, K=K, K_kde=K_kde, exact=exact, nlist=nlist,
        nprobe=nprobe, seed=seed, use_gpu=use_gpu,
    ).p


def tsds_select(candidates: Any, queries: Any, budget: int, *, seed: int = 0, **params: Any) -> TsdsSelection:
    """Draw ``budget`` candidates (with replacement) from the TSDS distribution; ``seed`` fixes the draw
    (numpy Generator) and the IVF training. ``params`` are those of :func:`tsds_probabilities`."""
    budget = check_int(budget, "budget", minimum=1)
    result = tsds_run(candidates, queries, seed=seed, **params)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(int(budget), result.p / result.p.sum()).astype(np.int64)
    sample = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    return TsdsSelection(p=result.p, sample=sample, counts=counts, result=result)
