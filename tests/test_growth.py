"""Leaf table and pool growth: stable ids, partition, splits, hashes, representatives, persistence."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np
import pytest

from harp.method.growth import (
    GrowthResult,
    LeafTable,
    LeafTableFormatError,
    grow_leaf_table,
    leaf_table_from_hierarchy,
)
from harp.method.hierarchy import Hierarchy, build_parent_leaf_hierarchy

DIM = 16
N = 600
KW = dict(leaf_size=20, leaves_per_parent=4, parents_per_region=4, use_gpu=False)


def clustered(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, DIM))
    return (centers[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, DIM))).astype(np.float32), centers


def unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def manual_hash(ids: list[str]) -> str:
    return hashlib.sha256("\x00".join(sorted(ids)).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def base() -> tuple[np.ndarray, np.ndarray, Hierarchy, LeafTable]:
    X, _ = clustered(N)
    ids = np.asarray([f"ex{i:05d}" for i in range(N)])
    h = build_parent_leaf_hierarchy(X, **KW)
    return X, ids, h, leaf_table_from_hierarchy(h, ids)


def growth_rows(X: np.ndarray, table: LeafTable, target_leaf: int, n_tight: int, n_spread: int, seed: int = 1):
    """Rows tightly around one leaf's centroid (to force a split) plus rows near random old rows."""
    rng = np.random.default_rng(seed)
    tight = table.leaf_centroids[target_leaf] + 0.03 * rng.standard_normal((n_tight, DIM))
    spread = X[rng.integers(0, X.shape[0], n_spread)] + 0.1 * rng.standard_normal((n_spread, DIM))
    return np.vstack([tight, spread]).astype(np.float32)


@pytest.fixture(scope="module")
def grown(base):
    X, ids, _, table = base
    g = int(np.argmax(table.leaf_sizes))
    max_leaf = int(table.leaf_sizes.max()) + 5
    X_new = growth_rows(X, table, g, n_tight=40, n_spread=20)
    ids_new = np.asarray([f"new{i:04d}" for i in range(X_new.shape[0])])
    X_all, ids_all = np.vstack([X, X_new]), np.r_[ids, ids_new]
    res = grow_leaf_table(table, X_all, ids_all, max_leaf_size=max_leaf, seed=3, use_gpu=False)
    return dict(X_all=X_all, ids_all=ids_all, res=res, target=g, max_leaf=max_leaf, n_new=X_new.shape[0])


def assert_partition(t: LeafTable) -> None:
    """Independent re-check (not via LeafTable.check)."""
    n, G = t.n_examples, t.n_leaves
    counts = np.bincount(t.leaf_index_of_row, minlength=G)
    assert counts.shape == (G,) and counts.min() >= 1 and counts.sum() == n
    assert np.array_equal(np.sort(t.member_order), np.arange(n))
    for g in range(G):
        assert np.all(t.leaf_index_of_row[t.members(g)] == g)
    assert len(set(t.leaf_ids.tolist())) == G and len(set(t.example_ids.tolist())) == n
    assert np.all(np.diff(t.parent_of_leaf) >= 0)  # leaves stay grouped by parent


def test_table_from_hierarchy_mirrors_hierarchy(base):
    X, ids, h, t = base
    assert_partition(t)
    assert t.leaf_ids.tolist() == [f"L{g:05d}" for g in range(h.n_leaves)]
    assert t.parent_ids.tolist() == [f"P{p:04d}" for p in range(h.n_parents)]
    assert np.array_equal(t.leaf_index_of_row, h.leaf_of)
    assert np.array_equal(np.flatnonzero(t.representative), h.representatives)
    assert np.array_equal(t.leaf_centroids, h.leaf_centroids)
    for g in (0, h.n_leaves - 1):
        assert np.array_equal(t.member_ids(g), ids[h.members(g)])
        assert t.member_hash(g) == manual_hash(ids[h.members(g)].tolist())
    assert t.member_hashes().shape == (h.n_leaves,) and len(set(t.member_hashes().tolist())) == h.n_leaves
    cols = t.leaf_columns()
    assert cols["size"].sum() == N and cols["parent_id"][0] == "P0000"
    assert t.index_of("L00003") == 3
    with pytest.raises(KeyError, match="L99999"):
        t.index_of("L99999")
    with pytest.raises(ValueError, match="599 entries"):
        leaf_table_from_hierarchy(h, ids[:-1])
    with pytest.raises(ValueError, match="duplicate id.*'ex00000'"):
        leaf_table_from_hierarchy(h, np.r_[ids[:-1], ids[:1]])
    with pytest.raises(ValueError, match="must hold strings"):
        leaf_table_from_hierarchy(h, np.arange(N))


def test_growth_partition_and_old_rows_keep_their_leaf(base, grown):
    _, ids, _, t = base
    res: GrowthResult = grown["res"]
    t2 = res.table
    assert res.n_added == grown["n_new"] == t2.n_examples - t.n_examples
    assert_partition(t2)
    assert np.array_equal(t2.example_ids, grown["ids_all"])
    child_to_old = {c: old for old, kids in res.split.items() for c in kids}
    old_leaf = t.leaf_ids[t.leaf_index_of_row]
    new_leaf = t2.leaf_ids[t2.leaf_index_of_row[: t.n_examples]]  # old rows first in this pool
    mapped = np.asarray([child_to_old.get(x, x) for x in new_leaf.tolist()])
    assert np.array_equal(mapped, old_leaf)
    # new rows join the old leaf whose centroid is nearest (or a child of it when it split)
    X_new = unit(grown["X_all"][t.n_examples :])
    nearest = t.leaf_ids[np.argmax(X_new @ t.leaf_centroids.T.astype(np.float64), axis=1)]
    got = np.asarray([child_to_old.get(x, x) for x in t2.leaf_ids[t2.leaf_index_of_row[t.n_examples :]].tolist()])
    assert np.array_equal(got, nearest)
    # bookkeeping covers every leaf exactly once
    assert sorted(res.unchanged + res.grown + res.new) == sorted(t2.leaf_ids.tolist())
    assert set(res.unchanged) | set(res.grown) | set(res.split) == set(t.leaf_ids.tolist())
    assert res.changed == sorted(res.grown + res.new)


def test_untouched_leaves_keep_id_hash_centroid_order(base, grown):
    _, _, _, t = base
    t2 = grown["res"].table
    assert len(grown["res"].unchanged) > 0
    for leaf_id in grown["res"].unchanged:
        a, b = t.index_of(leaf_id), t2.index_of(leaf_id)
        assert t2.member_hash(b) == t.member_hash(a)
        assert np.array_equal(t2.leaf_centroids[b], t.leaf_centroids[a])
        assert np.array_equal(t2.member_ids(b), t.member_ids(a))


def test_grown_leaves_change_hash_and_centroid(base, grown):
    _, _, _, t = base
    t2, res = grown["res"].table, grown["res"]
    assert len(res.grown) > 0
    Xn = unit(grown["X_all"])
    for leaf_id in res.grown:
        a, b = t.index_of(leaf_id), t2.index_of(leaf_id)
        assert set(t.member_ids(a)) < set(t2.member_ids(b))
        assert t2.member_hash(b) != t.member_hash(a)
        assert t2.member_hash(b) == manual_hash(t2.member_ids(b).tolist())
        mean = Xn[t2.members(b)].sum(axis=0)
        np.testing.assert_allclose(t2.leaf_centroids[b], mean / np.linalg.norm(mean), atol=1e-6)
        cos = Xn[t2.members(b)] @ t2.leaf_centroids[b].astype(np.float64)
        assert np.all(np.diff(cos) <= 1e-6)  # nearest centroid first


def test_oversized_leaf_splits_into_new_children(base, grown):
    _, _, _, t = base
    res, t2 = grown["res"], grown["res"].table
    target_id = str(t.leaf_ids[grown["target"]])
    assert list(res.split) == [target_id]  # only the leaf pushed past the maximum splits
    kids = res.split[target_id]
    assert len(kids) >= 2 and res.new == kids
    size = len(t.member_ids(grown["target"])) + 40
    assert len(kids) == math.ceil(size / (grown["max_leaf"] // 2))  # children sized near half the maximum
    assert kids == [f"{target_id}s{i + 1}" for i in range(len(kids))]
    assert target_id not in set(t2.leaf_ids.tolist())
    with pytest.raises(KeyError):
        t2.index_of(target_id)
    old_members = set(t.member_ids(grown["target"]).tolist())
    kid_idx = [t2.index_of(k) for k in kids]
    union = set().union(*(set(t2.member_ids(k).tolist()) for k in kid_idx))
    assert old_members < union
    assert sum(t2.leaf_sizes[k] for k in kid_idx) == len(union)
    assert all(t2.leaf_sizes[k] <= grown["max_leaf"] for k in kid_idx)
    assert {int(t2.parent_of_leaf[k]) for k in kid_idx} == {int(t.parent_of_leaf[grown["target"]])}
    # children are numbered by their smallest example id
    smallest = [min(t2.member_ids(k).tolist()) for k in kid_idx]
    assert smallest == sorted(smallest)
    # every leaf that gained but stayed under the maximum was not split
    for leaf_id in res.grown:
        assert t2.leaf_sizes[t2.index_of(leaf_id)] <= grown["max_leaf"]


def test_representatives_survive_growth_and_parents_recompute_centroids(base, grown):
    _, _, _, t = base
    res, t2 = grown["res"], grown["res"].table
    target_was_rep = bool(t.representative[grown["target"]])
    for p in range(t.n_parents):
        old = t.leaf_ids[(t.parent_of_leaf == p) & t.representative].tolist()
        new = t2.leaf_ids[(t2.parent_of_leaf == p) & t2.representative].tolist()
        if not target_was_rep or p != int(t.parent_of_leaf[grown["target"]]):
            assert new == old
    assert res.reselected_parents == ([str(t.parent_ids[t.parent_of_leaf[grown["target"]]])] if target_was_rep else [])
    # a parent that gained examples gets a recomputed centroid; one that did not keeps it exactly
    Xn = unit(grown["X_all"])
    gained_parents = {int(t.parent_of_leaf[t.index_of(x)]) for x in [*res.grown, *res.split]}
    for p in range(t.n_parents):
        if p in gained_parents:
            mean = Xn[t2.parent_of_leaf[t2.leaf_index_of_row] == p].sum(axis=0)
            np.testing.assert_allclose(t2.parent_centroids[p], mean / np.linalg.norm(mean), atol=1e-6)
        else:
            assert np.array_equal(t2.parent_centroids[p], t.parent_centroids[p])


@pytest.mark.parametrize("n_reps", [1, 2])
def test_a_parent_whose_representative_splits_refills_by_centroid(base, n_reps):
    """Only the split representative's slot is refilled: the nearest leaf to the parent centroid that is
    not already a representative, by hand from the grown table's centroids."""
    X, ids, _, t0 = base
    reps0 = t0.representative.copy()
    if n_reps == 2:  # give every parent a second representative so both slots exist before growth
        for p in range(t0.n_parents):
            leaves = np.flatnonzero((t0.parent_of_leaf == p) & ~reps0)
            reps0[leaves[:1]] = True
    t = dataclasses.replace(t0, representative=reps0)
    g = int(np.flatnonzero(t.representative)[np.argmax(t.leaf_sizes[t.representative])])
    max_leaf = int(t.leaf_sizes[g]) + 5
    X_new = growth_rows(X, t, g, n_tight=40, n_spread=0, seed=8)
    res = grow_leaf_table(t, np.vstack([X, X_new]), np.r_[ids, [f"n{i}" for i in range(40)]],
                          max_leaf_size=max_leaf, n_representatives=n_reps, seed=3, use_gpu=False)
    t2, p = res.table, int(t.parent_of_leaf[g])
    assert str(t.leaf_ids[g]) in res.split and res.reselected_parents == [str(t.parent_ids[p])]
    kept = [x for x in t.leaf_ids[(t.parent_of_leaf == p) & t.representative].tolist() if x != t.leaf_ids[g]]
    leaves = np.flatnonzero(t2.parent_of_leaf == p)
    cand = [k for k in leaves.tolist() if str(t2.leaf_ids[k]) not in kept]
    sim = [float(t2.leaf_centroids[k].astype(np.float64) @ t2.parent_centroids[p].astype(np.float64)) for k in cand]
    best = str(t2.leaf_ids[cand[int(np.argmax(sim))]])
    assert sorted(t2.leaf_ids[leaves[t2.representative[leaves]]].tolist()) == sorted([*kept, best])


def test_growth_is_deterministic_and_independent_of_pool_order(base, grown):
    _, _, _, t = base
    args = (t, grown["X_all"], grown["ids_all"])
    again = grow_leaf_table(*args, max_leaf_size=grown["max_leaf"], seed=3, use_gpu=False).table
    first = grown["res"].table
    for name in LeafTable._ARRAYS:
        assert np.array_equal(getattr(again, name), getattr(first, name)), name
    perm = np.random.default_rng(5).permutation(grown["ids_all"].size)
    shuffled = grow_leaf_table(
        t, grown["X_all"][perm], grown["ids_all"][perm], max_leaf_size=grown["max_leaf"], seed=3, use_gpu=False
    ).table
    assert shuffled.leaf_ids.tolist() == first.leaf_ids.tolist()
    assert shuffled.member_hashes().tolist() == first.member_hashes().tolist()
    for g in range(first.n_leaves):
        assert shuffled.member_ids(g).tolist() == first.member_ids(g).tolist()
    np.testing.assert_allclose(shuffled.leaf_centroids, first.leaf_centroids, atol=1e-6)


def test_repeated_growth_keeps_ids_unique(base, grown):
    _, _, _, t = base
    res1 = grown["res"]
    t1 = res1.table
    kid = res1.new[0]
    k = t1.index_of(kid)
    X_more = growth_rows(grown["X_all"], t1, k, n_tight=grown["max_leaf"], n_spread=10, seed=9)
    ids_more = np.asarray([f"more{i:04d}" for i in range(X_more.shape[0])])
    res2 = grow_leaf_table(
        t1, np.vstack([grown["X_all"], X_more]), np.r_[grown["ids_all"], ids_more],
        max_leaf_size=grown["max_leaf"], seed=3, use_gpu=False,
    )
    assert kid in res2.split and all(c.startswith(kid + "s") for c in res2.split[kid])
    retired = set(res1.split) | set(res2.split)
    live = set(res2.table.leaf_ids.tolist())
    assert not retired & live
    ever = list(t.leaf_ids) + res1.new + res2.new
    assert len(ever) == len(set(ever))  # no id is ever created twice
    assert_partition(res2.table)
    # leaves untouched by both growths still carry the original hash
    both = set(res1.unchanged) & set(res2.unchanged)
    assert both
    for leaf_id in both:
        assert res2.table.member_hash(res2.table.index_of(leaf_id)) == t.member_hash(t.index_of(leaf_id))


def test_leaves_and_parents_without_a_split_keep_their_given_state(base):
    """Centroids, member sequences and flags are carried over, not recomputed, where nothing changed."""
    X, ids, _, t = base
    rng = np.random.default_rng(4)
    C = t.leaf_centroids + 0.01 * rng.standard_normal(t.leaf_centroids.shape).astype(np.float32)
    C = (C / np.linalg.norm(C, axis=1, keepdims=True)).astype(np.float32)
    order = np.concatenate([t.members(g)[::-1] for g in range(t.n_leaves)])
    reps = np.zeros(t.n_leaves, dtype=bool)
    last_of_parent = np.flatnonzero(np.r_[t.parent_of_leaf[1:] != t.parent_of_leaf[:-1], True])
    reps[last_of_parent] = True  # not the rule's choice: must survive where the parent had no split
    given = dataclasses.replace(t, leaf_centroids=C, member_order=order, representative=reps)
    given.check()
    g = int(np.argmax(t.leaf_sizes))
    X_new = growth_rows(X, given, g, n_tight=40, n_spread=20, seed=6)
    res = grow_leaf_table(
        given, np.vstack([X, X_new]), np.r_[ids, [f"n{i}" for i in range(60)]],
        max_leaf_size=int(t.leaf_sizes.max()) + 5, use_gpu=False,
    )
    t2 = res.table
    assert list(res.split) == [str(t.leaf_ids[g])] and res.unchanged
    for leaf_id in res.unchanged:
        a, b = given.index_of(leaf_id), t2.index_of(leaf_id)
        assert np.array_equal(t2.leaf_centroids[b], given.leaf_centroids[a])
        assert np.array_equal(t2.member_ids(b), given.member_ids(a))
    split_parent = int(t.parent_of_leaf[g])
    for p in range(t.n_parents):
        if p != split_parent:
            old = given.leaf_ids[(given.parent_of_leaf == p) & given.representative].tolist()
            assert t2.leaf_ids[(t2.parent_of_leaf == p) & t2.representative].tolist() == old


def test_only_leaves_that_gained_can_split(base):
    X, ids, _, t = base
    max_leaf = int(np.median(t.leaf_sizes))
    small = int(np.argmin(t.leaf_sizes))
    over = t.leaf_ids[t.leaf_sizes > max_leaf].tolist()
    assert over and t.leaf_sizes[small] + 2 <= max_leaf
    X_new = growth_rows(X, t, small, n_tight=2, n_spread=0)
    res = grow_leaf_table(t, np.vstack([X, X_new]), np.r_[ids, ["n0", "n1"]], max_leaf_size=max_leaf, use_gpu=False)
    assert res.split == {} and res.grown == [str(t.leaf_ids[small])]
    assert set(over) <= set(res.unchanged)


def test_growth_without_new_rows_changes_nothing(base):
    X, ids, _, t = base
    res = grow_leaf_table(t, X, ids, max_leaf_size=int(t.leaf_sizes.max()), use_gpu=False)
    assert res.n_added == 0 and res.grown == [] and res.split == {} and res.new == []
    for name in LeafTable._ARRAYS:
        assert np.array_equal(getattr(res.table, name), getattr(t, name)), name


def test_duplicate_rows_still_split_below_the_maximum(base):
    X, ids, _, t = base
    g = 0
    dup = np.repeat(t.leaf_centroids[g : g + 1] * 3.0, 50, axis=0)  # identical rows: k-means cannot separate
    res = grow_leaf_table(
        t, np.vstack([X, dup]), np.r_[ids, [f"dup{i:03d}" for i in range(50)]], max_leaf_size=15, use_gpu=False
    )
    assert str(t.leaf_ids[0]) in res.split
    assert res.table.leaf_sizes.max() <= max(15, int(t.leaf_sizes.max()))
    kid_idx = [res.table.index_of(c) for c in res.new]
    assert all(res.table.leaf_sizes[k] <= 15 for k in kid_idx)
    smallest = [min(res.table.member_ids(k).tolist()) for k in kid_idx]
    assert smallest == sorted(smallest)  # numbering by smallest example id holds through re-splits


def test_npz_round_trip_and_corruption(base, grown, tmp_path):
    t2 = grown["res"].table
    path = tmp_path / "sub" / "leaves.npz"
    t2.to_npz(path)
    assert os.listdir(path.parent) == ["leaves.npz"]  # no temp file left behind
    back = LeafTable.from_npz(path)
    for name in LeafTable._ARRAYS:
        a, b = getattr(back, name), getattr(t2, name)
        assert np.array_equal(a, b) and a.dtype == b.dtype, name
    assert back.member_hashes().tolist() == t2.member_hashes().tolist()
    # a table whose leaf ids collide is refused, naming the file and the id
    arrays = {k: getattr(t2, k) for k in LeafTable._ARRAYS}
    bad_ids = t2.leaf_ids.copy()
    bad_ids[1] = bad_ids[0]
    np.savez(tmp_path / "dup.npz", **{**arrays, "leaf_ids": bad_ids}, format=np.str_("harp-leaf-table-v2"))
    with pytest.raises(ValueError, match=r"dup\.npz.*duplicate id.*" + str(bad_ids[0])):
        LeafTable.from_npz(tmp_path / "dup.npz")
    np.savez(tmp_path / "partial.npz", leaf_ids=t2.leaf_ids)
    with pytest.raises(ValueError, match=r"partial\.npz.*missing arrays"):
        LeafTable.from_npz(tmp_path / "partial.npz")
    # a table of the earlier format (no content hashes) is refused as such, so callers can rebuild
    np.savez(tmp_path / "old.npz", **arrays, format=np.str_("harp-leaf-table-v1"))
    with pytest.raises(LeafTableFormatError, match=r"old\.npz.*'harp-leaf-table-v1'"):
        LeafTable.from_npz(tmp_path / "old.npz")


def test_check_catches_broken_tables(base):
    _, _, _, t = base
    with pytest.raises(ValueError, match="not partition keys"):
        dataclasses.replace(t, leaf_ids=np.asarray([f"L{g},x" for g in range(t.n_leaves)])).check()
    order = t.member_order.copy()
    a, b = t.members(0)[0], t.members(1)[0]
    order[t.leaf_offsets[0]], order[t.leaf_offsets[1]] = b, a
    with pytest.raises(ValueError, match="wrong leaf"):
        dataclasses.replace(t, member_order=order).check()
    with pytest.raises(ValueError, match="without a representative"):
        dataclasses.replace(t, representative=np.zeros(t.n_leaves, dtype=bool)).check()
    li = t.leaf_index_of_row.copy()
    li[t.members(1)] = 0  # leaf 1 emptied
    with pytest.raises(ValueError, match="leaf_offsets disagree|without examples"):
        dataclasses.replace(t, leaf_index_of_row=li).check()


def test_hash_independent_of_member_order_and_pool_order(base):
    X, ids, h, t = base
    # reversing one leaf's member sequence leaves every hash unchanged
    order = t.member_order.copy()
    s, e = t.leaf_offsets[2], t.leaf_offsets[3]
    order[s:e] = order[s:e][::-1]
    reordered = dataclasses.replace(t, member_order=order)
    reordered.check()
    assert reordered.member_hashes().tolist() == t.member_hashes().tolist()
    # the same leaves over a permuted pool hash the same
    perm = np.random.default_rng(2).permutation(N)
    inv = np.argsort(perm)
    permuted = dataclasses.replace(
        t, example_ids=ids[perm], leaf_index_of_row=t.leaf_index_of_row[perm], member_order=inv[t.member_order]
    )
    permuted.check()
    assert permuted.member_hashes().tolist() == t.member_hashes().tolist()
    # moving one example to another leaf changes exactly the two hashes involved
    li = t.leaf_index_of_row.copy()
    row = int(t.members(4)[-1])
    li[row] = 5
    from harp.method.hierarchy import member_order_for

    mo, off = member_order_for(li, unit(X).astype(np.float32), t.leaf_centroids)
    moved = dataclasses.replace(t, leaf_index_of_row=li, member_order=mo, leaf_offsets=off)
    diff = np.flatnonzero(moved.member_hashes() != t.member_hashes())
    assert diff.tolist() == [4, 5]


def test_bad_growth_input_is_named(base):
    X, ids, _, t = base
    extra = X[:3] + 0.01
    X_all, ids_all = np.vstack([X, extra]), np.r_[ids, ["a", "b", "c"]]
    with pytest.raises(ValueError, match=r"frozen names leaf id.*'nope'"):
        grow_leaf_table(t, X_all, ids_all, max_leaf_size=50, frozen=["nope", str(t.leaf_ids[0])], use_gpu=False)
    with pytest.raises(ValueError, match="content_all has 2 entries but there are 603"):
        grow_leaf_table(t, X_all, ids_all, max_leaf_size=50, content_all=["a", "b"], use_gpu=False)
    with pytest.raises(ValueError, match="15 dims but the leaf table's centroids have 16"):
        grow_leaf_table(t, X_all[:, :15], ids_all, max_leaf_size=50, use_gpu=False)
    with pytest.raises(ValueError, match="603 rows but example_ids_all has 602"):
        grow_leaf_table(t, X_all, ids_all[:-1], max_leaf_size=50, use_gpu=False)
    with pytest.raises(ValueError, match="duplicate id.*'a'"):
        grow_leaf_table(t, X_all, np.r_[ids, ["a", "a", "c"]], max_leaf_size=50, use_gpu=False)
    bad = X_all.copy()
    bad[601, 3] = np.nan
    with pytest.raises(ValueError, match=r"rows \[601\] \(example ids \['b'\]\).*NaN"):
        grow_leaf_table(t, bad, ids_all, max_leaf_size=50, use_gpu=False)
    bad = X_all.copy()
    bad[602] = 0.0
    with pytest.raises(ValueError, match=r"rows \[602\] \(example ids \['c'\]\) are all zeros"):
        grow_leaf_table(t, bad, ids_all, max_leaf_size=50, use_gpu=False)
    for kw in ({"max_leaf_size": 0}, {"max_leaf_size": 50, "n_representatives": 0}, {"max_leaf_size": 50, "seed": -1}):
        with pytest.raises(ValueError, match="max_leaf_size|n_representatives|seed"):
            grow_leaf_table(t, X_all, ids_all, use_gpu=False, **kw)


# --------------------------------------------------------------------------------------------------
# Removed and edited examples, frozen leaves and delta leaves
# --------------------------------------------------------------------------------------------------


def contents(ids: np.ndarray) -> np.ndarray:
    return np.asarray([f"c-{e}" for e in ids.tolist()])


@pytest.fixture(scope="module")
def tracked(base):
    """The base table with content hashes, so edits can be told apart."""
    X, ids, h, _ = base
    return leaf_table_from_hierarchy(h, ids, contents(ids))


def test_content_is_part_of_the_member_hash(base, tracked):
    _, ids, _, t = base
    g = 3
    entries = sorted(f"{e}\x1fc-{e}" for e in tracked.member_ids(g).tolist())
    assert tracked.member_hash(g) == hashlib.sha256("\x00".join(entries).encode()).hexdigest()[:16]
    assert t.member_hash(g) == manual_hash(t.member_ids(g).tolist())  # ids only without content


def test_removed_examples_invalidate_exactly_their_leaves(base, tracked):
    X, ids, _, t = base
    gone = [int(t.members(2)[0]), int(t.members(7)[1])]
    emptied = 9  # every member of leaf 9 leaves too
    drop = np.r_[gone, t.members(emptied)]
    keep = np.setdiff1d(np.arange(N), drop)
    res = grow_leaf_table(tracked, X[keep], ids[keep], content_all=contents(ids[keep]), max_leaf_size=100,
                          use_gpu=False)
    t2 = res.table
    assert res.n_removed == drop.size and res.n_added == res.n_edited == 0
    assert res.shrunk == [str(tracked.leaf_ids[2]), str(tracked.leaf_ids[7])]
    assert res.retired == [str(tracked.leaf_ids[emptied])] and not res.grown and not res.new
    assert res.changed == res.shrunk
    assert_partition(t2)
    for leaf_id in res.unchanged:
        a, b = tracked.index_of(leaf_id), t2.index_of(leaf_id)
        assert t2.member_hash(b) == tracked.member_hash(a)
        assert np.array_equal(t2.leaf_centroids[b], tracked.leaf_centroids[a])
    for leaf_id in res.shrunk:
        members = t2.member_ids(t2.index_of(leaf_id)).tolist()
        expect = [e for e in tracked.member_ids(tracked.index_of(leaf_id)).tolist() if e not in ids[gone]]
        assert sorted(members) == sorted(expect)
        assert t2.member_hash(t2.index_of(leaf_id)) == hashlib.sha256(
            "\x00".join(f"{e}\x1fc-{e}" for e in sorted(expect)).encode()).hexdigest()[:16]
    assert str(tracked.leaf_ids[emptied]) not in set(t2.leaf_ids.tolist())


def test_an_edited_example_leaves_its_leaf_and_arrives_again(base, tracked):
    X, ids, _, t = base
    row = int(t.members(4)[0])
    new_content = contents(ids)
    new_content[row] = "edited"
    X2 = X.copy()
    X2[row] = X[int(t.members(11)[0])]  # its new text sits where leaf 11's members are
    res = grow_leaf_table(tracked, X2, ids, content_all=new_content, max_leaf_size=100, use_gpu=False)
    t2 = res.table
    assert (res.n_edited, res.n_added, res.n_removed) == (1, 0, 0)
    assert str(tracked.leaf_ids[4]) in res.shrunk
    dest = t2.leaf_ids[t2.leaf_index_of_row[row]]
    assert dest in res.grown and dest != tracked.leaf_ids[4]
    assert set(res.changed) == {str(tracked.leaf_ids[4]), str(dest)}
    # without content tracking the same edit goes unseen: ids alone did not change
    same = grow_leaf_table(tracked, X2, ids, max_leaf_size=100, use_gpu=False)
    assert same.changed == [] and same.n_edited == 0


def test_frozen_leaves_take_no_member_and_arrivals_gather_in_delta_leaves(base, tracked):
    X, ids, _, t = base
    frozen = tracked.leaf_ids[tracked.representative].tolist()
    rng = np.random.default_rng(12)
    X_new = X[rng.integers(0, N, 120)] + 0.05 * rng.standard_normal((120, DIM)).astype(np.float32)
    ids_new = np.asarray([f"g1-{i:03d}" for i in range(120)])
    X_all, ids_all = np.vstack([X, X_new]), np.r_[ids, ids_new]
    res = grow_leaf_table(tracked, X_all, ids_all, content_all=contents(ids_all), frozen=frozen,
                          max_leaf_size=100, use_gpu=False)
    t2 = res.table
    assert_partition(t2)
    for leaf_id in frozen:  # exact: same members, hash and centroid
        a, b = tracked.index_of(leaf_id), t2.index_of(leaf_id)
        assert t2.member_hash(b) == tracked.member_hash(a) and t2.representative[b]
        assert np.array_equal(t2.leaf_centroids[b], tracked.leaf_centroids[a])
    # by hand: arrivals whose nearest leaf is frozen sit in the delta leaf of that leaf's parent
    nearest = np.argmax(unit(X_new) @ tracked.leaf_centroids.T.astype(np.float64), axis=1)
    to_delta = tracked.representative[nearest]
    assert res.deferred == int(to_delta.sum()) > 0
    parents = sorted({int(tracked.parent_of_leaf[g]) for g in nearest[to_delta]})
    assert res.delta == [f"{tracked.parent_ids[p]}d1" for p in parents]
    got = t2.leaf_ids[t2.leaf_index_of_row[N:]]
    for i in np.flatnonzero(to_delta):
        assert got[i] == f"{tracked.parent_ids[tracked.parent_of_leaf[nearest[i]]]}d1"
    for i in np.flatnonzero(~to_delta):
        assert got[i] == tracked.leaf_ids[nearest[i]]
    for d in res.delta:
        k = t2.index_of(d)
        assert not t2.representative[k] and d.startswith(str(t2.parent_ids[t2.parent_of_leaf[k]]))


def test_delta_ids_are_never_made_twice(base, tracked):
    """An open delta leaf takes later arrivals; once measured (frozen) or emptied, the next one is d2, d3."""
    X, ids, _, t = base
    rep = int(np.flatnonzero(tracked.representative)[0])
    p = str(tracked.parent_ids[tracked.parent_of_leaf[rep]])
    near = tracked.leaf_centroids[rep]
    rng = np.random.default_rng(3)

    def batch(tag: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        return (near + 0.01 * rng.standard_normal((n, DIM))).astype(np.float32), np.asarray(
            [f"{tag}{i}" for i in range(n)])

    frozen = [str(tracked.leaf_ids[rep])]
    Xa, ia = batch("a", 5)
    X1, i1 = np.vstack([X, Xa]), np.r_[ids, ia]
    r1 = grow_leaf_table(tracked, X1, i1, content_all=contents(i1), frozen=frozen, max_leaf_size=100, use_gpu=False)
    assert r1.delta == [f"{p}d1"]
    Xb, ib = batch("b", 4)
    X2, i2 = np.vstack([X1, Xb]), np.r_[i1, ib]
    r2 = grow_leaf_table(r1.table, X2, i2, content_all=contents(i2), frozen=frozen, max_leaf_size=100,
                         use_gpu=False)
    assert r2.delta == [] and f"{p}d1" in r2.grown  # the open delta leaf took them
    assert r2.table.leaf_sizes[r2.table.index_of(f"{p}d1")] == 9
    # d1 measured now: new arrivals near the representative open d2
    Xc, ic = batch("c", 3)
    X3, i3 = np.vstack([X2, Xc]), np.r_[i2, ic]
    r3 = grow_leaf_table(r2.table, X3, i3, content_all=contents(i3), frozen=[*frozen, f"{p}d1"],
                         max_leaf_size=100, use_gpu=False)
    assert r3.delta == [f"{p}d2"] and f"{p}d1" in r3.unchanged
    # d2's members all leave: it is retired, and the next delta leaf is d3, never d2 again
    keep = ~np.isin(i3, ic)
    r4 = grow_leaf_table(r3.table, X3[keep], i3[keep], content_all=contents(i3[keep]), frozen=frozen,
                         max_leaf_size=100, use_gpu=False)
    assert r4.retired == [f"{p}d2"]
    X5, i5 = np.vstack([X3[keep], Xc]), np.r_[i3[keep], np.asarray([f"e{i}" for i in range(3)])]
    r5 = grow_leaf_table(r4.table, X5, i5, content_all=contents(i5), frozen=[*frozen, f"{p}d1"],
                         max_leaf_size=100, use_gpu=False)
    assert r5.delta == [f"{p}d3"]
    # the counter persists with the table
    assert int(r5.table.delta_count[list(r5.table.parent_ids).index(p)]) == 3


def test_a_parent_left_without_leaves_is_dropped(base, tracked):
    X, ids, _, t = base
    p = 1
    rows = np.flatnonzero(tracked.parent_of_leaf[tracked.leaf_index_of_row] == p)
    keep = np.setdiff1d(np.arange(N), rows)
    res = grow_leaf_table(tracked, X[keep], ids[keep], content_all=contents(ids[keep]), max_leaf_size=100,
                          use_gpu=False)
    assert res.removed_parents == [str(tracked.parent_ids[p])]
    assert sorted(res.retired) == sorted(tracked.leaf_ids[tracked.parent_of_leaf == p].tolist())
    t2 = res.table
    assert str(tracked.parent_ids[p]) not in t2.parent_ids.tolist() and t2.n_parents == tracked.n_parents - 1
    assert_partition(t2)
    for leaf_id in res.unchanged:
        assert t2.parent_ids[t2.parent_of_leaf[t2.index_of(leaf_id)]] == tracked.parent_ids[
            tracked.parent_of_leaf[tracked.index_of(leaf_id)]]


def test_a_rebuild_names_its_leaves_in_a_new_generation(base):
    """A rebuilt tree never reuses a leaf id that has a stored measurement or was in the previous tree."""
    from harp.method import tree_generation
    from harp.stages import update_leaf_table

    X, ids, h, t = base
    content = [f"c-{e}" for e in ids.tolist()]
    cfg = dict(leaf_size=20, leaves_per_parent=4, parents_per_region=4)
    first = update_leaf_table(None, X, ids.tolist(), content, seed=0, config=cfg, max_leaf_size=100)
    assert first.how == "built" and first.table.leaf_ids[0] == "L00000" and first.table.parent_ids[0] == "P0000"
    again = update_leaf_table(first.table, X[:, :8], ids.tolist(), content, seed=0, config=cfg, max_leaf_size=100)
    assert again.how == "rebuilt" and "dimension" in again.reason
    assert again.table.leaf_ids[0] == "L1x00000" and again.table.parent_ids[0] == "P1x0000"
    assert not set(again.table.leaf_ids.tolist()) & set(first.table.leaf_ids.tolist())
    # an unreadable table: the generation comes from the measured leaf ids the caller knows of
    third = update_leaf_table(None, X, ids.tolist(), content, seed=0, config=cfg, max_leaf_size=100,
                              known_leaf_ids=["L00003", "P1x0000d2"], rebuild_reason="format")
    assert third.how == "rebuilt" and {tree_generation(x) for x in third.table.leaf_ids.tolist()} == {2}


def test_a_pool_replaced_whole_is_rebuilt_not_grown(base):
    from harp.stages import update_leaf_table

    X, ids, _, _ = base
    cfg = dict(leaf_size=20, leaves_per_parent=4, parents_per_region=4)
    first = update_leaf_table(None, X, ids.tolist(), ["c"] * N, seed=0, config=cfg, max_leaf_size=100)
    other = [f"new{i}" for i in range(N)]
    again = update_leaf_table(first.table, X, other, ["c"] * N, seed=0, config=cfg, max_leaf_size=100)
    assert again.how == "rebuilt" and "no example of the previous pool" in again.reason
    assert again.table.leaf_ids[0] == "L1x00000" and again.table.example_ids.tolist() == other
    same = update_leaf_table(first.table, X[::-1], ids[::-1].tolist(), ["c"] * N, seed=0, config=cfg,
                             max_leaf_size=100)
    assert same.how == "unchanged" and same.table is first.table  # the same rows in another order
