"""Stage 1a hierarchy: partition invariants, ordering, determinism, representatives, bad input."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from harp.method import hierarchy
from harp.method.hierarchy import (
    Hierarchy,
    _choose_representatives,
    assign_to_nearest_leaf,
    build_parent_leaf_hierarchy,
    member_order_for,
    normalized_embeddings,
    validate_embeddings,
)

ARRAYS = Hierarchy._ARRAYS


def clustered(n: int, dim: int = 16, n_centers: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, dim))
    X = centers[rng.integers(0, n_centers, n)] + 0.4 * rng.standard_normal((n, dim))
    return X.astype(np.float32)


def unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def assert_valid(h: Hierarchy, n: int) -> None:
    """Independent re-check of every structural promise (not via Hierarchy.check)."""
    G, P, R = h.n_leaves, h.n_parents, h.n_regions
    assert h.leaf_of.shape == (n,) and h.leaf_of.dtype == np.int32
    assert h.member_order.dtype == np.int64 and h.leaf_offsets.dtype == np.int64
    assert h.parent_of_leaf.dtype == np.int32 and h.region_of_parent.dtype == np.int32
    assert h.representatives.dtype == np.int32
    # every row in exactly one leaf, every leaf non-empty
    counts = np.bincount(h.leaf_of, minlength=G)
    assert counts.shape == (G,) and counts.min() >= 1 and counts.sum() == n
    # CSR covers every row once and agrees with leaf_of
    assert h.leaf_offsets[0] == 0 and h.leaf_offsets[-1] == n
    assert np.array_equal(np.sort(h.member_order), np.arange(n))
    for g in range(G):
        assert np.all(h.leaf_of[h.members(g)] == g)
    assert np.array_equal(h.leaf_sizes, counts)
    # leaves ordered by parent, parents by region; no empty parent or region
    assert np.all(np.diff(h.parent_of_leaf) >= 0) and np.all(np.diff(h.region_of_parent) >= 0)
    assert np.array_equal(np.unique(h.parent_of_leaf), np.arange(P))
    assert np.array_equal(np.unique(h.region_of_parent), np.arange(R))
    for C, k in ((h.leaf_centroids, G), (h.parent_centroids, P), (h.region_centroids, R)):
        assert C.shape == (k, h.dim) and C.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)
    # inside each level, siblings are numbered by their lowest member row
    leaf_first = np.array([h.members(g).min() for g in range(G)])
    parent_first = np.array([leaf_first[h.parent_of_leaf == p].min() for p in range(P)])
    region_first = np.array([parent_first[h.region_of_parent == r].min() for r in range(R)])
    assert np.all(np.diff(region_first) > 0)
    for first, owner in ((leaf_first, h.parent_of_leaf), (parent_first, h.region_of_parent)):
        same = owner[1:] == owner[:-1]
        assert np.all(np.diff(first)[same] > 0)
    # at least one representative per parent, all representatives valid leaf ids
    assert np.all(np.diff(h.representatives) > 0)
    assert np.array_equal(np.unique(h.parent_of_leaf[h.representatives]), np.arange(P))
    assert np.array_equal(np.flatnonzero(h.is_representative), h.representatives)


def test_partition_and_sizing_rule():
    n, leaf_size, lpp, ppr = 1200, 10, 4, 5
    X = clustered(n)
    h = build_parent_leaf_hierarchy(
        X, leaf_size=leaf_size, leaves_per_parent=lpp, parents_per_region=ppr, use_gpu=False
    )
    assert_valid(h, n)
    h.check()
    assert h.device == "cpu"
    # regions: ceil(n / (leaf_size * lpp * ppr)) = 6 asked; k-means may only drop empty ones
    assert 1 <= h.n_regions <= math.ceil(n / (leaf_size * lpp * ppr))
    assert np.bincount(h.region_of_parent).max() <= 2 * ppr
    assert np.bincount(h.parent_of_leaf).max() <= 2 * lpp
    # leaf counts follow round(parent_size / leaf_size) within the clamp, except for dropped empties
    for p in range(h.n_parents):
        leaves = h.leaves_of_parent(p)
        size = int(h.leaf_sizes[leaves].sum())
        assert len(leaves) <= max(1, min(math.floor(size / leaf_size + 0.5), 2 * lpp))
    assert 0.5 * n / leaf_size <= h.n_leaves <= 1.5 * n / leaf_size
    # default min_leaf_size = leaf_size // 5: a smaller leaf must be alone in its parent
    small = np.flatnonzero(h.leaf_sizes < leaf_size // 5)
    assert all(len(h.leaves_of_parent(h.parent_of_leaf[g])) == 1 for g in small)
    # centroids are the normalised member means
    g = int(np.argmax(h.leaf_sizes))
    np.testing.assert_allclose(h.leaf_centroids[g], unit(unit(X)[h.members(g)].sum(0, keepdims=True))[0], atol=1e-5)


def test_members_ordered_nearest_first_ties_by_row():
    X = clustered(600, seed=3)
    X[100:110] = X[5]  # exact duplicates of row 5 tie with it; they must follow row order
    h = build_parent_leaf_hierarchy(X, leaf_size=25, leaves_per_parent=4, parents_per_region=4, use_gpu=False)
    Xn = unit(X)
    for g in range(h.n_leaves):
        rows = h.members(g)
        sims = Xn[rows] @ h.leaf_centroids[g].astype(np.float64)
        assert np.all(np.diff(sims) <= 1e-6), f"leaf {g} not nearest-first"
    g5 = h.leaf_of[5]
    assert np.all(h.leaf_of[100:110] == g5)
    rows = list(h.members(g5))
    dup_positions = [rows.index(r) for r in [5, *range(100, 110)]]
    assert dup_positions == list(range(dup_positions[0], dup_positions[0] + 11))


def test_deterministic_for_seed_and_does_not_touch_input():
    X = clustered(900, seed=1)
    X_before = X.copy()
    kw = dict(leaf_size=15, leaves_per_parent=3, parents_per_region=4, n_representatives=2, use_gpu=False)
    a = build_parent_leaf_hierarchy(X, seed=7, **kw)
    b = build_parent_leaf_hierarchy(X.astype(np.float64), seed=7, **kw)
    assert np.array_equal(X, X_before)
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = build_parent_leaf_hierarchy(X, seed=8, **kw)
    assert_valid(c, 900)
    assert c.seed == 8


def test_thread_count_does_not_change_result(monkeypatch):
    monkeypatch.setattr(hierarchy, "_SINGLE_THREAD_ROWS", 0)  # let every node use the set thread count
    X = clustered(700, seed=2)
    kw = dict(leaf_size=12, leaves_per_parent=4, parents_per_region=3, use_gpu=False)
    before = faiss.omp_get_max_threads()
    a = build_parent_leaf_hierarchy(X, **kw)
    try:
        faiss.omp_set_num_threads(1)
        b = build_parent_leaf_hierarchy(X, **kw)
    finally:
        faiss.omp_set_num_threads(before)
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def _three_tight_groups(angles_deg, per_group=10, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for a in np.deg2rad(angles_deg):
        jitter = rng.normal(0.0, np.deg2rad(0.3), per_group)
        rows.append(np.stack([np.cos(a + jitter), np.sin(a + jitter)], axis=1))
    return np.concatenate(rows).astype(np.float32)


def test_representative_is_leaf_nearest_parent_centroid():
    # groups at 0, 10 and 40 degrees: the parent mean sits near 16.7 degrees, so the 10-degree leaf is
    # nearest, then the 0-degree one.
    X = _three_tight_groups([0.0, 10.0, 40.0])
    kw = dict(leaf_size=10, leaves_per_parent=3, parents_per_region=1, use_gpu=False)
    h = build_parent_leaf_hierarchy(X, **kw)
    assert (h.n_regions, h.n_parents, h.n_leaves) == (1, 1, 3)
    group_leaf = [int(h.leaf_of[i * 10]) for i in range(3)]
    for i in range(3):
        assert np.all(h.leaf_of[i * 10 : (i + 1) * 10] == group_leaf[i])
    assert h.representatives.tolist() == [group_leaf[1]]
    h2 = build_parent_leaf_hierarchy(X, n_representatives=2, **kw)
    assert h2.representatives.tolist() == sorted([group_leaf[1], group_leaf[0]])
    h5 = build_parent_leaf_hierarchy(X, n_representatives=5, **kw)  # capped at the parent's 3 leaves
    assert h5.representatives.tolist() == [0, 1, 2]


def test_representative_ties_go_to_lowest_leaf_id():
    s = np.sin(np.deg2rad(20.0))
    c = np.cos(np.deg2rad(20.0))
    leaves = np.array([[1.0, 0.0], [c, -s], [c, s], [0.0, 1.0], [0.0, -1.0]], dtype=np.float32)
    parents = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    parent_of_leaf = np.array([0, 1, 1, 1, 1], dtype=np.int32)
    # parent 1: leaves 1 and 2 tie exactly; leaves 3 and 4 tie too, further away
    assert _choose_representatives(leaves, parents, parent_of_leaf, 1).tolist() == [0, 1]
    assert _choose_representatives(leaves, parents, parent_of_leaf, 3).tolist() == [0, 1, 2, 3]


def test_single_row_and_fewer_rows_than_clusters():
    h = build_parent_leaf_hierarchy(np.array([[3.0, 4.0]]), leaf_size=1, use_gpu=False)
    assert_valid(h, 1)
    assert (h.n_regions, h.n_parents, h.n_leaves) == (1, 1, 1)
    np.testing.assert_allclose(h.leaf_centroids[0], [0.6, 0.8], atol=1e-6)
    X = clustered(5, n_centers=5, seed=4)
    h = build_parent_leaf_hierarchy(X, leaf_size=1, leaves_per_parent=1, parents_per_region=1, use_gpu=False)
    assert_valid(h, 5)
    assert h.n_regions <= 5 and h.n_leaves <= 5


def test_all_duplicate_rows_form_one_leaf():
    X = np.tile(np.array([[1.0, 2.0, 2.0]], dtype=np.float32), (300, 1))
    h = build_parent_leaf_hierarchy(X, leaf_size=2, leaves_per_parent=2, parents_per_region=2, use_gpu=False)
    assert_valid(h, 300)
    assert (h.n_regions, h.n_parents, h.n_leaves) == (1, 1, 1)
    assert h.members(0).tolist() == list(range(300))  # all tie: row order
    np.testing.assert_allclose(h.leaf_centroids[0], [1 / 3, 2 / 3, 2 / 3], atol=1e-6)


def test_few_distinct_points_repeated():
    base = np.eye(4, dtype=np.float32) + 0.1
    X = np.tile(base, (50, 1))  # 4 distinct directions, 50 copies each, interleaved
    h = build_parent_leaf_hierarchy(X, leaf_size=10, leaves_per_parent=4, parents_per_region=2, use_gpu=False)
    assert_valid(h, 200)
    for k in range(4):
        assert np.unique(h.leaf_of[k::4]).size == 1  # copies never split
    assert h.n_leaves == 4  # distinct directions never merge when 20 leaves are asked for


def test_small_outlier_leaf_is_merged_into_nearest_sibling():
    # 30 rows near 0 degrees, 1 outlier at 90 and 12 rows near 60: 3 leaves asked (round(43 / 15)).
    X = np.concatenate([_three_tight_groups([0.0], per_group=30), [[0.0, 1.0]], _three_tight_groups([60.0], 12)])
    kw = dict(leaf_size=15, leaves_per_parent=4, parents_per_region=1, use_gpu=False)
    raw = build_parent_leaf_hierarchy(X, min_leaf_size=1, **kw)
    assert raw.n_parents == 1 and sorted(raw.leaf_sizes.tolist()) == [1, 12, 30]
    merged = build_parent_leaf_hierarchy(X, min_leaf_size=5, **kw)
    assert_valid(merged, 43)
    assert sorted(merged.leaf_sizes.tolist()) == [13, 30]
    assert merged.leaf_of[30] == merged.leaf_of[31]  # the outlier joined the 60-degree group
    everything = build_parent_leaf_hierarchy(X, min_leaf_size=100, **kw)
    assert everything.n_leaves == 1  # merging stops at one cluster


def test_small_outlier_region_is_merged():
    # 41 rows ask for ceil(41 / 20) = 3 regions: groups at 0 and 90 degrees and one row at 200 degrees.
    X = np.concatenate([_three_tight_groups([0.0, 90.0], per_group=20), _three_tight_groups([200.0], 1)])
    kw = dict(leaf_size=5, leaves_per_parent=2, parents_per_region=2, use_gpu=False)
    raw = build_parent_leaf_hierarchy(X, min_leaf_size=1, **kw)
    assert raw.n_regions == 3 and raw.region_of_leaf[raw.leaf_of[40]] == 2
    merged = build_parent_leaf_hierarchy(X, min_leaf_size=3, **kw)
    assert_valid(merged, 41)
    region_of_row = merged.region_of_leaf[merged.leaf_of]
    assert merged.n_regions == 2 and region_of_row[40] == region_of_row[20]  # nearest: the 90-degree group


def test_antipodal_rows_get_a_finite_centroid():
    h = build_parent_leaf_hierarchy(np.array([[1.0, 0.0], [-1.0, 0.0]]), use_gpu=False)
    assert_valid(h, 2)
    assert np.all(np.isfinite(h.leaf_centroids))
    np.testing.assert_allclose(h.leaf_centroids[0], [1.0, 0.0])  # falls back to the lowest-index member


@pytest.mark.parametrize(
    ("bad_rows", "value", "what"),
    [([3], np.nan, "NaN or inf"), ([0, 7], np.inf, "NaN or inf"), ([2, 5], 0.0, "all zeros")],
)
def test_bad_rows_are_named(bad_rows, value, what):
    X = clustered(10)
    X[bad_rows] = value
    with pytest.raises(ValueError) as exc:
        build_parent_leaf_hierarchy(X, use_gpu=False)
    msg = str(exc.value)
    assert what in msg and "X_feat" in msg
    assert f"rows [{', '.join(map(str, bad_rows))}]" in msg


def test_many_bad_rows_are_counted_and_both_problems_reported():
    X = clustered(40)
    X[5:30, 1] = np.nan
    X[35] = 0.0
    with pytest.raises(ValueError) as exc:
        validate_embeddings(X, name="pool")
    msg = str(exc.value)
    assert msg.startswith("pool:")
    assert "rows [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, ... (25 rows in total)]" in msg
    assert "all zeros" in msg and "[35]" in msg


def test_float64_overflow_is_reported_after_conversion():
    X = np.ones((4, 3))
    X[2, 0] = 1e300
    with pytest.raises(ValueError, match=r"after conversion to float32.*rows \[2\]"):
        validate_embeddings(X)


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 3, 4)), "2-D"),
        (np.ones((0, 4)), "empty"),
        (np.ones((3, 0)), "empty"),
        (np.array([["a", "b"]]), "real numbers"),
    ],
)
def test_malformed_arrays_rejected(X, match):
    with pytest.raises(ValueError, match=match):
        validate_embeddings(X)


def test_validate_returns_float32_contiguous_without_needless_copy():
    X = clustered(20)
    assert validate_embeddings(X) is X
    Y = validate_embeddings(np.asfortranarray(X.astype(np.float64)))
    assert Y.dtype == np.float32 and Y.flags.c_contiguous and np.array_equal(Y, X)
    N = normalized_embeddings(X)
    assert N is not X and np.array_equal(X, clustered(20))
    np.testing.assert_allclose(np.linalg.norm(N, axis=1), 1.0, atol=1e-6)


def test_bad_parameters_rejected():
    X = clustered(20)
    bad = ({"leaf_size": 0}, {"leaves_per_parent": -1}, {"n_representatives": 0}, {"niter": 1.5}, {"min_leaf_size": 0})
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw))):
            build_parent_leaf_hierarchy(X, use_gpu=False, **kw)
    with pytest.raises(ValueError, match="seed"):
        build_parent_leaf_hierarchy(X, seed=-1, use_gpu=False)
    with pytest.raises(ValueError, match="use_gpu"):
        build_parent_leaf_hierarchy(X, use_gpu="yes")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU error")
def test_gpu_required_but_absent_is_an_error():
    with pytest.raises(RuntimeError, match="no GPU"):
        build_parent_leaf_hierarchy(clustered(20), use_gpu=True)


def test_assign_to_nearest_leaf_constructed():
    centroids = unit(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=np.float64))
    X_new = np.array(
        [
            [5.0, 0.1, 0.0],  # 0
            [0.2, 3.0, 0.1],  # 1
            [0.0, 0.0, -1.0],  # cosines 0, 0, -1, 0: a tie between 0, 1 and 3 -> 0
            [1.0, 1.1, 0.0],  # 3 (cos 0.99 vs 0.74)
            [0.0, 0.0, 0.5],  # 2
        ]
    )
    assert assign_to_nearest_leaf(centroids, X_new, use_gpu=False).tolist() == [0, 1, 0, 3, 2]
    twins = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert assign_to_nearest_leaf(twins, [[2.0, 0.0]], use_gpu=False).tolist() == [1]  # tie -> lowest id
    with pytest.raises(ValueError, match="dims"):
        assign_to_nearest_leaf(centroids, np.ones((2, 5)), use_gpu=False)
    with pytest.raises(ValueError, match=r"X_new: .*rows \[1\]"):
        assign_to_nearest_leaf(centroids, np.array([[1.0, 0, 0], [0, 0, 0]]), use_gpu=False)


def test_assign_matches_brute_force_on_built_hierarchy():
    X = clustered(500, seed=5)
    h = build_parent_leaf_hierarchy(X, leaf_size=20, leaves_per_parent=3, parents_per_region=3, use_gpu=False)
    X_new = clustered(200, seed=6)
    got = assign_to_nearest_leaf(h.leaf_centroids, X_new, use_gpu=False)
    sims = unit(X_new) @ h.leaf_centroids.astype(np.float64).T
    best = sims.max(axis=1)
    assert np.all(sims[np.arange(200), got] >= best - 1e-5)


def test_member_order_for_handles_new_rows_and_empty_leaves():
    Xn = unit(np.array([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [1.0, 0.05], [0.1, 1.0]])).astype(np.float32)
    C = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    order, offsets = member_order_for(np.array([0, 0, 1, 0, 1]), Xn, C)
    assert offsets.tolist() == [0, 3, 5, 5]
    assert order.tolist() == [0, 3, 1, 2, 4]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        member_order_for(np.array([0, 3, 1, 0, 1]), Xn, C)


def test_save_and_load_round_trip(tmp_path):
    h = build_parent_leaf_hierarchy(clustered(300), leaf_size=20, leaves_per_parent=3, use_gpu=False)
    path = tmp_path / "sub" / "hierarchy.npz"
    h.save_npz(path)
    assert [p.name for p in path.parent.iterdir()] == ["hierarchy.npz"]  # no temp file left behind
    back = Hierarchy.load_npz(path)
    for name in ARRAYS:
        assert np.array_equal(getattr(h, name), getattr(back, name)), name
    assert (back.seed, back.device) == (h.seed, h.device)
    with pytest.raises(ValueError):
        h.leaf_of[0] = 1  # read-only arrays keep the frozen promise
    broken = {name: np.array(getattr(h, name)) for name in ARRAYS}
    broken["leaf_offsets"][1] = broken["leaf_offsets"][0]  # leaf 0 emptied
    np.savez(tmp_path / "broken.npz", **broken, seed=0, device="cpu")
    with pytest.raises(ValueError, match="broken.npz: invalid hierarchy"):
        Hierarchy.load_npz(tmp_path / "broken.npz")
