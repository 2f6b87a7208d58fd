"""The HARP greedy ranking as one compiled loop (numba): same order, gains, cut and stop as the numpy path.

Why: the numpy step (:func:`harp.method.envelopes.greedy_taskaware` with ``kernel="numpy"``) makes four or
five passes over the (active domains x remaining leaves) matrix and writes a same-sized scratch buffer on
each, so it moves 3-10 times the bytes it needs. Here one step reads every working leaf column once,
computes its per-domain gain, sums it and keeps the running argmax in the same pass; HARP-C's harm part
``min(phi, 0)`` is recomputed on the fly instead of stored. The whole loop runs compiled, state updates,
compaction, early-stop bound and budget included, so a step costs one streaming read of the matrix.

Layout: the working matrix is stored in tiles of ``TILE`` leaves; inside a tile, domain-major (one row of
``TILE`` contiguous values per domain), tiles one after the other. A step therefore reads one sequential
stream, and the inner loop over a tile's leaves is independent per leaf, so it vectorises while each leaf's
sum over domains still runs in domain order.

Identity with the numpy path, and why it holds bit for bit:

- numpy's ``buf.sum(axis=0)`` over a C-contiguous (domains x leaves) array adds the rows in domain order
  starting from 0.0 (numpy only uses pairwise summation along the contiguous axis); the kernel adds in the
  same order from 0.0. With a single working column (G = 1) numpy sums along the contiguous axis, so the
  kernel then reproduces numpy's pairwise summation (:func:`numpy_sum`; tested against ``np.sum``).
- The 1-D sums of the early-stop bound (``ub.sum() - y.sum()``) and HARP-E's per-domain sum of ``phi+``
  over the remaining leaves (taken at the same compactions as the numpy path: when half the working columns
  are ranked and there are at least 64) use the same pairwise emulation, so the stop decision is the same.
- Every per-element operation (subtract, min, max, clip, add) gives the same value as numpy's; they may
  differ only in the sign of a zero (numpy skips adding a zero shift, SIMD max/min pick either zero), and
  no later operation or comparison can tell ``-0.0`` from ``0.0`` by value. A gain is a sum started at 0.0,
  which in round-to-nearest is never ``-0.0``, so gains are bit-identical, not just equal.
- The argmax keeps the first strictly larger gain scanning leaves in increasing id, as ``np.argmax`` does.

Compile cost: ``cache=True`` writes the compiled code next to this file (``__pycache__``) or, when that
directory is not writable, under the user's cache directory (numba's ``_UserWideCacheLocator``), or under
``NUMBA_CACHE_DIR`` when that is set. See docs/performance.md for the measured compile and cache-load times.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

__all__ = ["TILE", "numpy_sum", "rank"]

# Leaves per tile: the per-tile gain accumulator (TILE float64) stays in L1, a tile's domain rows are long
# enough for the prefetcher and the vector loop.
TILE = 512

# Below this many working columns compaction is not worth the copy (same rule as the numpy path).
MIN_COMPACT_COLUMNS = 64

STOP_CODES: tuple[str, ...] = ("complete", "max_steps", "budget", "bound")
_COMPLETE, _MAX_STEPS, _BUDGET, _BOUND = 0, 1, 2, 3

# Names of the functions compiled without the on-disk cache (no writable cache directory was found).
UNCACHED: list[str] = []


def _compiled(fn: Callable) -> Callable:
    """``njit(cache=True)``, or plain ``njit`` when numba finds no writable cache directory.

    numba refuses ``cache=True`` at import (RuntimeError) when neither ``__pycache__`` next to this file,
    the user cache directory nor ``NUMBA_CACHE_DIR`` is writable; the kernel then compiles once per process.
    """
    try:
        return njit(cache=True)(fn)
    except RuntimeError:
        UNCACHED.append(fn.__name__)
        return njit(fn)


@_compiled
def _pairwise_block(a, start, n):  # pragma: no cover - compiled
    """numpy's ``pairwise_sum`` leaf case (n <= 128): up to 8 accumulators, then the rest in order."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[start + i]
        return res
    r0 = a[start]
    r1 = a[start + 1]
    r2 = a[start + 2]
    r3 = a[start + 3]
    r4 = a[start + 4]
    r5 = a[start + 5]
    r6 = a[start + 6]
    r7 = a[start + 7]
    end = n - n % 8
    i = 8
    while i < end:
        p = start + i
        r0 += a[p]
        r1 += a[p + 1]
        r2 += a[p + 2]
        r3 += a[p + 3]
        r4 += a[p + 4]
        r5 += a[p + 5]
        r6 += a[p + 6]
        r7 += a[p + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@_compiled
def _pairwise(a, start, n):  # pragma: no cover - compiled
    """numpy's float64 ``pairwise_sum`` (numpy/_core/src/umath/loops_utils.h.src), same grouping.

    numpy recurses (halves rounded down to a multiple of 8 until at most 128 values); this walks the same
    tree with explicit stacks, because numba's on-disk cache cannot reload self-recursive functions.
    """
    if n <= 128:
        return _pairwise_block(a, start, n)
    seg_start = np.empty(128, dtype=np.int64)
    seg_n = np.empty(128, dtype=np.int64)
    seg_done = np.zeros(128, dtype=np.bool_)
    vals = np.empty(128)
    top = 0
    nv = 0
    seg_start[0] = start
    seg_n[0] = n
    seg_done[0] = False
    top = 1
    while top > 0:
        top -= 1
        s0 = seg_start[top]
        m = seg_n[top]
        if m <= 128:
            vals[nv] = _pairwise_block(a, s0, m)
            nv += 1
        elif seg_done[top]:
            nv -= 1
            vals[nv - 1] = vals[nv - 1] + vals[nv]
        else:
            m2 = m // 2
            m2 -= m2 % 8
            seg_done[top] = True
            top += 1
            seg_start[top] = s0 + m2
            seg_n[top] = m - m2
            seg_done[top] = False
            top += 1
            seg_start[top] = s0
            seg_n[top] = m2
            seg_done[top] = False
            top += 1
    return vals[0]


@_compiled
def _np_sum(a, n):  # pragma: no cover - compiled
    """``np.sum`` of ``a[:n]`` (1-D, contiguous): the identity 0.0 plus the pairwise sum."""
    return 0.0 + _pairwise(a, 0, n)


@_compiled
def _clip01(v):  # pragma: no cover - compiled
    v = v if v > 0.0 else 0.0
    return v if v < 1.0 else 1.0


@_compiled
def _tile(phi, act_idx, n_cols, tile):  # pragma: no cover - compiled
    """The tiled working matrix of the first ``n_cols`` rows of ``phi`` on the active domains.

    Writes run along each tile row; the reads of a tile's rows stay in cache across the domains.
    """
    D = act_idx.size
    n_tiles = (n_cols + tile - 1) // tile
    W = np.zeros(n_tiles * D * tile)
    for t in range(n_tiles):
        j0 = t * tile
        width = min(tile, n_cols - j0)
        for d in range(D):
            off = (t * D + d) * tile
            c = act_idx[d]
            for jj in range(width):
                W[off + jj] = phi[j0 + jj, c]
    return W


@_compiled
def _compact(W, alive, n_cols, n_alive, D, tile):  # pragma: no cover - compiled
    """The tiled matrix of the alive columns only, in the same order (reads sequential, writes along rows)."""
    newpos = np.empty(n_cols, dtype=np.int64)
    p = 0
    for j in range(n_cols):
        newpos[j] = p
        if alive[j]:
            p += 1
    W_new = np.zeros(((n_alive + tile - 1) // tile) * D * tile)
    n_tiles = (n_cols + tile - 1) // tile
    for t in range(n_tiles):
        j0 = t * tile
        width = min(tile, n_cols - j0)
        for d in range(D):
            off = (t * D + d) * tile
            for jj in range(width):
                j = j0 + jj
                if alive[j]:
                    q = newpos[j]
                    tq = q // tile
                    W_new[(tq * D + d) * tile + (q - tq * tile)] = W[off + jj]
    return W_new


@_compiled
def _bound_stats(W, n_cols, D, tile, conservative, rem_stat, pos_count, scratch):  # pragma: no cover
    """Max (C) or sum (E) of ``phi+`` over the working columns and their positive counts, per domain.

    As numpy's ``work.max(axis=1, initial=0.0)`` and ``np.maximum(work, 0.0).sum(axis=1)`` (pairwise).
    """
    n_tiles = (n_cols + tile - 1) // tile
    for d in range(D):
        cnt = 0
        mx = 0.0
        p = 0
        for t in range(n_tiles):
            width = min(tile, n_cols - t * tile)
            off = (t * D + d) * tile
            for jj in range(width):
                x = W[off + jj]
                if x > 0.0:
                    cnt += 1
                if x > mx:
                    mx = x
                scratch[p] = x if x > 0.0 else 0.0
                p += 1
        pos_count[d] = cnt
        rem_stat[d] = mx if conservative else _np_sum(scratch, n_cols)


@_compiled
def _rank(phi, act_idx, base_act, conservative, limit, sizes, use_budget, budget, early_stop, tile):  # pragma: no cover
    """The whole greedy ranking; returns (order, gains, steps, stop code, rows scanned)."""
    G = phi.shape[0]
    D = act_idx.size
    n_cols = G
    ids = np.arange(G)
    W = _tile(phi, act_idx, n_cols, tile)
    alive = np.zeros(((G + tile - 1) // tile) * tile, dtype=np.bool_)
    alive[:G] = True
    n_alive = G

    M = np.zeros(D)
    N = np.zeros(D)
    V = base_act.copy()
    y = np.empty(D)
    for d in range(D):
        y[d] = _clip01(V[d])
    shift = np.empty(D)
    lo = np.empty(D)
    hi = np.empty(D)
    ub = np.empty(D)
    col = np.empty(D)
    acc = np.empty(tile)

    rem_stat = np.zeros(D)
    pos_count = np.zeros(D, dtype=np.int64)
    scratch = np.empty(G if early_stop else 0)
    if early_stop:
        _bound_stats(W, n_cols, D, tile, conservative, rem_stat, pos_count, scratch)

    order = np.empty(limit, dtype=np.int64)
    gains_out = np.empty(limit)
    run = 0.0
    best = 0.0
    taken = 0
    rows_scanned = 0
    k = 0
    stop = _COMPLETE
    while True:
        if n_alive == 0:
            stop = _COMPLETE
            break
        if k >= limit:
            stop = _MAX_STEPS
            break
        if use_budget and taken >= budget:
            stop = _BUDGET
            break
        if early_stop:
            for d in range(D):
                reach = rem_stat[d] if pos_count[d] > 0 else 0.0
                if conservative:
                    ub[d] = _clip01((base_act[d] - N[d]) + max(M[d], reach))
                else:
                    ub[d] = _clip01(V[d] + reach)
            if _np_sum(ub, D) - _np_sum(y, D) <= best - run:
                stop = _BOUND
                break

        # One pass: per-domain gain clip(shift + delta, -y, 1 - y), summed over domains in domain order.
        for d in range(D):
            shift[d] = V[d] - y[d]
            lo[d] = -y[d]
            hi[d] = 1.0 - y[d]
        best_gain = -np.inf
        best_j = -1
        if n_cols == 1:
            # numpy sums a single column along its contiguous axis: pairwise (G = 1 only).
            for d in range(D):
                x = W[d * tile]
                if conservative:
                    v = max(x - M[d], min(x, 0.0))
                else:
                    v = x
                v = v + shift[d]
                v = v if v > lo[d] else lo[d]
                col[d] = v if v < hi[d] else hi[d]
            best_gain = _np_sum(col, D)
            best_j = 0
        else:
            n_tiles = (n_cols + tile - 1) // tile
            for t in range(n_tiles):
                if D == 0:
                    acc[:] = 0.0
                for d in range(D):
                    off = (t * D + d) * tile
                    m = M[d]
                    s = shift[d]
                    lo_d = lo[d]
                    hi_d = hi[d]
                    if conservative:
                        if d == 0:
                            for jj in range(tile):
                                x = W[off + jj]
                                v = max(x - m, min(x, 0.0)) + s
                                v = v if v > lo_d else lo_d
                                acc[jj] = 0.0 + (v if v < hi_d else hi_d)
                        else:
                            for jj in range(tile):
                                x = W[off + jj]
                                v = max(x - m, min(x, 0.0)) + s
                                v = v if v > lo_d else lo_d
                                acc[jj] += v if v < hi_d else hi_d
                    else:
                        if d == 0:
                            for jj in range(tile):
                                v = W[off + jj] + s
                                v = v if v > lo_d else lo_d
                                acc[jj] = 0.0 + (v if v < hi_d else hi_d)
                        else:
                            for jj in range(tile):
                                v = W[off + jj] + s
                                v = v if v > lo_d else lo_d
                                acc[jj] += v if v < hi_d else hi_d
                j0 = t * tile
                width = min(tile, n_cols - j0)
                for jj in range(width):
                    if acc[jj] > best_gain and alive[j0 + jj]:
                        best_gain = acc[jj]
                        best_j = j0 + jj
        rows_scanned += n_cols

        g = ids[best_j]
        order[k] = g
        gains_out[k] = best_gain
        run += best_gain
        if run > best:
            best = run
        k += 1
        if use_budget:
            taken += sizes[g]

        t = best_j // tile
        jj = best_j - t * tile
        for d in range(D):
            x = W[(t * D + d) * tile + jj]
            if conservative:
                M[d] = max(M[d], x)
                N[d] = N[d] - min(x, 0.0)
                V[d] = (base_act[d] - N[d]) + M[d]
            else:
                V[d] = V[d] + x
            y[d] = _clip01(V[d])
            if x > 0.0:
                pos_count[d] -= 1
        alive[best_j] = False
        n_alive -= 1

        if n_alive <= n_cols // 2 and n_cols >= MIN_COMPACT_COLUMNS:
            new_ids = np.empty(n_alive, dtype=np.int64)
            p = 0
            for j in range(n_cols):
                if alive[j]:
                    new_ids[p] = ids[j]
                    p += 1
            W_new = _compact(W, alive, n_cols, n_alive, D, tile)
            W = W_new
            ids = new_ids
            n_cols = n_alive
            alive[:] = False
            alive[:n_cols] = True
            if early_stop:
                _bound_stats(W, n_cols, D, tile, conservative, rem_stat, pos_count, scratch)

    return order, gains_out, k, stop, rows_scanned


def numpy_sum(a: np.ndarray) -> float:
    """``np.sum`` of a 1-D float64 array as numpy computes it (pairwise); exposed so tests can pin it."""
    arr = np.ascontiguousarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"numpy_sum takes a 1-D array, got shape {arr.shape}")
    return float(_np_sum(arr, arr.size))


def rank(
    phi: np.ndarray,
    base: np.ndarray,
    active: np.ndarray,
    conservative: bool,
    limit: int,
    sizes: np.ndarray | None,
    budget: int | None,
    early_stop: bool,
    tile: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str, int]:
    """Greedy order, gains, stop reason and rows scanned, for inputs already checked by ``greedy_taskaware``.

    ``phi`` is (leaves x all domains) float64, ``active`` a bool mask over domains, ``sizes`` the leaf sizes
    (needed only with a ``budget``). The result is the numpy path's, bit for bit (module docstring).
    """
    tile = TILE if tile is None else tile
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    phi = np.ascontiguousarray(phi, dtype=np.float64)
    act_idx = np.flatnonzero(np.asarray(active, dtype=bool)).astype(np.int64)
    base_act = np.ascontiguousarray(np.asarray(base, dtype=np.float64)[act_idx])
    use_budget = budget is not None
    sz = np.zeros(phi.shape[0], dtype=np.int64) if sizes is None else np.ascontiguousarray(sizes, dtype=np.int64)
    order, gains, k, stop, rows = _rank(
        phi, act_idx, base_act, bool(conservative), int(limit), sz, use_budget,
        int(budget) if use_budget else 0, bool(early_stop), int(tile),
    )
    return order[:k].copy(), gains[:k].copy(), STOP_CODES[stop], int(rows)
