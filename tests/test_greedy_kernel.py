"""The compiled greedy (harp.method.greedy_kernel) against the numpy reference: same results, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from harp.method import greedy_kernel
from harp.method.envelopes import ENVELOPES, GREEDY_KERNELS, greedy_taskaware


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.int64)


def _assert_same(a, b, context: str) -> None:
    """Kernel result ``a`` equals numpy result ``b`` in every field; float arrays bit for bit."""
    np.testing.assert_array_equal(a.order, b.order, err_msg=context)
    np.testing.assert_array_equal(_bits(a.gains), _bits(b.gains), err_msg=f"gains differ: {context}")
    np.testing.assert_array_equal(_bits(a.running), _bits(b.running), err_msg=context)
    assert (a.cut, a.stop_reason, a.rows_scanned, a.empty_prefix_best) == (
        b.cut,
        b.stop_reason,
        b.rows_scanned,
        b.empty_prefix_best,
    ), context
    np.testing.assert_array_equal(_bits(a.predicted), _bits(b.predicted), err_msg=context)
    assert a.objective == b.objective and a.empty_objective == b.empty_objective, context


def _random_instance(seed: int) -> dict:
    """A random instance with the features that break naive kernels.

    Exact ties (duplicated leaves, zero rows and columns, dyadic values), bases at and near 0 and 1, wide
    and narrow effects, G from 1 to a few hundred (so compaction runs), D from 1 to 57, optional active
    mask, max_steps, budget with leaf sizes (zeros included) and early stop on or off.
    """
    rng = np.random.default_rng(seed)
    G = int(rng.choice([1, 2, 3, int(rng.integers(4, 40)), int(rng.integers(60, 300))]))
    D = int(rng.choice([1, 2, int(rng.integers(3, 12)), 57]))
    kind = seed % 3
    if kind == 0:  # dyadic: every operation exact, many real ties
        phi = rng.integers(-8, 9, size=(G, D)) / 16.0
        base = rng.integers(0, 17, size=D) / 16.0
    else:
        scale = [0.03, 0.4][kind - 1]
        phi = rng.normal(rng.normal(0.0, scale / 3, size=D), scale, size=(G, D))
        base = rng.choice([0.0, 1e-12, 0.02, 0.5, 0.98, 1.0 - 1e-12, 1.0], size=D)
        base = np.clip(base + rng.uniform(-0.01, 0.01, size=D) * (rng.random(D) < 0.5), 0.0, 1.0)
    phi[rng.random((G, D)) < 0.2] = 0.0
    if G > 2:  # duplicated leaves tie exactly, wherever they sit (other tiles included)
        for _ in range(int(rng.integers(1, 4))):
            phi[rng.integers(0, G)] = phi[rng.integers(0, G)]
        phi[rng.integers(0, G)] = 0.0
    if D > 1 and rng.random() < 0.3:
        phi[:, rng.integers(0, D)] = 0.0  # a domain no leaf moves
    kwargs: dict = {"early_stop": bool(rng.random() < 0.5)}
    if rng.random() < 0.3:
        kwargs["active"] = rng.random(D) < 0.7  # may be all False
    if rng.random() < 0.25:
        kwargs["max_steps"] = int(rng.integers(0, G + 2))
    if rng.random() < 0.3:
        sizes = rng.integers(0, 20, size=G)
        kwargs["leaf_sizes"] = sizes
        kwargs["budget_points"] = int(rng.integers(0, sizes.sum() + 3))
    return {"phi": phi, "base": base, **kwargs}


@pytest.fixture(params=[None, 8, 3], ids=["tile-default", "tile-8", "tile-3"])
def tile(request, monkeypatch):
    """Small tiles put several tiles, padding and cross-tile ties into small instances."""
    if request.param is not None:
        monkeypatch.setattr(greedy_kernel, "TILE", request.param)
    return request.param


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_kernel_matches_numpy_on_random_instances(envelope, tile):
    stops = set()
    for seed in range(150):
        inst = _random_instance(seed)
        a = greedy_taskaware(envelope=envelope, kernel="numba", **inst)
        b = greedy_taskaware(envelope=envelope, kernel="numpy", **inst)
        _assert_same(a, b, f"seed {seed}, tile {tile}, G x D {inst['phi'].shape}")
        stops.add(a.stop_reason)
    assert stops == {"complete", "max_steps", "budget", "bound"}  # every exit path was compared


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_kernel_matches_numpy_at_benchmark_shape(envelope):
    """A larger case with the benchmark's synthetic effects: several compactions, default tiles."""
    rng = np.random.default_rng(5)
    G, D = 3000, 57
    phi = rng.normal(0.0, 0.01, size=D) + rng.normal(0.0, 0.03, size=(G, D))
    base = rng.uniform(0.05, 0.95, size=D)
    sizes = rng.integers(50, 151, size=G)
    for kwargs in ({"early_stop": False}, {"leaf_sizes": sizes, "budget_points": int(0.3 * sizes.sum())}):
        a = greedy_taskaware(phi, base, envelope, kernel="numba", **kwargs)
        b = greedy_taskaware(phi, base, envelope, kernel="numpy", **kwargs)
        _assert_same(a, b, str(kwargs))


@pytest.mark.parametrize("kernel", GREEDY_KERNELS)
def test_hand_derived_rankings(kernel):
    """Worked by hand, b = (0.5, 0.75); leaf 2 duplicates leaf 0, leaf 3 only harms domain 0.

    HARP-E, step 1: leaf 0 gains 0.25 + 0.25 (domain 1 clips at 1), leaf 1 0.5 - 0.25, leaf 2 ties leaf 0,
    leaf 3 -0.5: leaf 0. Step 2: V = (0.75, 1.25); leaves 1 and 2 both gain 0.25 (tie: leaf 1). Step 3:
    V = (1.25, 1.0); leaf 2 gains 0, leaf 3 -0.25: leaf 2. Step 4: V = (1.5, 1.5), leaf 3's harm stays above
    the clip: gain 0. HARP-C differs at the end: leaf 2 adds nothing to the best positive effects and leaf
    3's harm counts in full, -0.5. Both cut at 2 (0.75, shortest). With the early stop, after two steps
    every domain's bound is 1 = y, so sum(bound) - F = 0 <= best - running = 0: stop "bound".
    """
    phi = np.array([[0.25, 0.5], [0.5, -0.25], [0.25, 0.5], [-0.5, 0.0]])
    base = np.array([0.5, 0.75])
    expected = {"expansive": [0.5, 0.25, 0.0, 0.0], "conservative": [0.5, 0.25, 0.0, -0.5]}
    for envelope, gains in expected.items():
        res = greedy_taskaware(phi, base, envelope, early_stop=False, kernel=kernel)
        assert res.order.tolist() == [0, 1, 2, 3]
        assert res.gains.tolist() == gains
        assert res.cut == 2 and res.stop_reason == "complete" and res.rows_scanned == 16
        fast = greedy_taskaware(phi, base, envelope, early_stop=True, kernel=kernel)
        assert fast.order.tolist() == [0, 1] and fast.gains.tolist() == gains[:2]
        assert fast.cut == 2 and fast.stop_reason == "bound" and fast.rows_scanned == 8


@pytest.mark.parametrize("G", [63, 64, 65, 127, 128, 129, 255, 256])
def test_compaction_boundaries_scan_the_same_rows(G):
    """Compaction needs >= 64 working columns and half of them ranked: same schedule, same rows scanned."""
    rng = np.random.default_rng(G)
    phi = rng.normal(0.0, 0.05, size=(G, 4))
    base = np.array([0.0, 0.3, 0.9, 1.0])
    for envelope in ENVELOPES:
        for early_stop in (False, True):
            a = greedy_taskaware(phi, base, envelope, early_stop=early_stop)
            b = greedy_taskaware(phi, base, envelope, early_stop=early_stop, kernel="numpy")
            _assert_same(a, b, f"{envelope}, early_stop {early_stop}")


@pytest.mark.parametrize("tile_size", [1, 5, 512])
def test_bound_statistics_match_numpy(tile_size):
    """The early-stop bound's per-domain max (C) and pairwise sum (E) of phi+, and positive counts."""
    rng = np.random.default_rng(tile_size)
    for G, D in ((1, 3), (9, 2), (1000, 57), (20_011, 2)):
        phi = rng.normal(0.0, 0.3, size=(G, D))
        phi[rng.random((G, D)) < 0.3] = 0.0
        work = np.ascontiguousarray(phi.T)  # as the numpy path holds it: contiguous along leaves
        act_idx = np.arange(D, dtype=np.int64)
        W = greedy_kernel._tile(phi, act_idx, G, tile_size)
        for conservative, expected in ((True, work.max(axis=1, initial=0.0)), (False, np.maximum(work, 0.0).sum(axis=1))):
            stat, count = np.zeros(D), np.zeros(D, dtype=np.int64)
            greedy_kernel._bound_stats(W, G, D, tile_size, conservative, stat, count, np.empty(G))
            np.testing.assert_array_equal(_bits(stat), _bits(expected))
            np.testing.assert_array_equal(count, (work > 0).sum(axis=1))


def test_ties_across_tiles_go_to_the_lowest_leaf_id():
    """Identical leaves in every tile: each step must pick the lowest remaining id, across compactions."""
    G = 2 * greedy_kernel.TILE + 37
    phi = np.tile(np.array([[0.125, -0.25, 0.0]]), (G, 1))
    base = np.array([0.5, 0.5, 0.5])
    for envelope in ENVELOPES:
        res = greedy_taskaware(phi, base, envelope, early_stop=False)
        assert res.order.tolist() == list(range(G))
        ref = greedy_taskaware(phi, base, envelope, early_stop=False, kernel="numpy")
        _assert_same(res, ref, envelope)


def test_single_leaf_sums_like_numpy():
    """G = 1: numpy sums the single column pairwise along the domains; the kernel must do the same."""
    rng = np.random.default_rng(3)
    for D in (1, 7, 8, 9, 57, 200, 300):
        for _ in range(4):
            phi = rng.normal(0.0, 0.3, size=(1, D)) * rng.choice([1e-6, 1.0], size=(1, D))
            base = rng.uniform(0.0, 1.0, size=D)
            for envelope in ENVELOPES:
                a = greedy_taskaware(phi, base, envelope, kernel="numba")
                b = greedy_taskaware(phi, base, envelope, kernel="numpy")
                _assert_same(a, b, f"D {D}")


def test_numpy_sum_emulation_is_bit_exact():
    """The early-stop bound and G = 1 depend on numpy's pairwise summation; pin it on many lengths."""
    rng = np.random.default_rng(0)
    lengths = [*range(0, 300), 511, 1000, 1031, 4096, 8191, 8193, 20_000, 100_003]
    for n in lengths:
        a = rng.normal(size=n) * rng.choice([1e-8, 1.0, 1e8], size=n)
        assert greedy_kernel.numpy_sum(a) == float(np.sum(a)), f"n = {n}"
    assert greedy_kernel.numpy_sum(np.array([-0.0])) == 0.0
    with pytest.raises(ValueError, match="1-D"):
        greedy_kernel.numpy_sum(np.zeros((2, 2)))


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="'numba', 'numpy'"):
        greedy_taskaware(np.ones((2, 2)), np.zeros(2), "expansive", kernel="cuda")
