"""Point-budget cap, end-to-end HARP selection over CSR leaves, random baseline."""

from __future__ import annotations

import numpy as np
import pytest

from harp.method.envelopes import ENVELOPES, envelope_objective, greedy_taskaware
from harp.method.selection import (
    cap_to_budget,
    harp_select,
    leaf_of_rows,
    predicted_utility,
    random_selection,
)

# Three leaves over 7 rows: leaf 0 = rows 4, 0; leaf 1 = rows 2, 6, 1; leaf 2 = rows 5, 3.
MEMBER_ORDER = np.array([4, 0, 2, 6, 1, 5, 3])
LEAF_OFFSETS = np.array([0, 2, 5, 7])


def _random_csr(rng: np.random.Generator, G: int, max_size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    sizes = rng.integers(1, max_size + 1, size=G)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    return rng.permutation(int(offsets[-1])), offsets


def test_cap_takes_kept_leaves_in_rank_order_then_csr_order():
    rows, leaf, rank = cap_to_budget([1, 2, 0], MEMBER_ORDER, LEAF_OFFSETS, None)
    assert rows.tolist() == [2, 6, 1, 5, 3, 4, 0]
    assert leaf.tolist() == [1, 1, 1, 2, 2, 0, 0]
    assert rank.tolist() == [0, 0, 0, 1, 1, 2, 2]
    rows, leaf, rank = cap_to_budget([2, 1], MEMBER_ORDER, LEAF_OFFSETS, 3)
    assert rows.tolist() == [5, 3, 2] and leaf.tolist() == [2, 2, 1] and rank.tolist() == [0, 0, 1]
    assert cap_to_budget([2, 1], MEMBER_ORDER, LEAF_OFFSETS, 0)[0].size == 0
    assert cap_to_budget([], MEMBER_ORDER, LEAF_OFFSETS, 5)[0].size == 0
    assert cap_to_budget([0], MEMBER_ORDER, LEAF_OFFSETS, 100)[0].tolist() == [4, 0]


def test_cap_property_over_random_budgets():
    rng = np.random.default_rng(3)
    for _ in range(80):
        G = int(rng.integers(1, 15))
        order, offsets = _random_csr(rng, G)
        kept = rng.permutation(G)[: int(rng.integers(0, G + 1))]
        budget = int(rng.integers(0, offsets[-1] + 3))
        full_rows, full_leaf, full_rank = cap_to_budget(kept, order, offsets, None)
        rows, leaf, rank = cap_to_budget(kept, order, offsets, budget)
        total = int((offsets[kept + 1] - offsets[kept]).sum())
        assert full_rows.size == total
        assert rows.size == min(budget, total) <= budget
        np.testing.assert_array_equal(rows, full_rows[: rows.size])
        np.testing.assert_array_equal(leaf, full_leaf[: rows.size])
        assert np.unique(rows).size == rows.size
        assert (np.diff(rank) >= 0).all()
        np.testing.assert_array_equal(kept[rank], leaf)
        owner = leaf_of_rows(order, offsets)
        np.testing.assert_array_equal(owner[rows], leaf)
        pos = np.argsort(order)[rows]  # CSR position of each row: increasing inside every leaf
        for g in np.unique(leaf):
            assert (np.diff(pos[leaf == g]) > 0).all()


def test_cap_rejects_bad_csr_and_leaves():
    with pytest.raises(ValueError, match="from 0 to len"):
        cap_to_budget([0], MEMBER_ORDER, np.array([0, 2, 5, 6]), None)
    with pytest.raises(ValueError, match="row 4 more than once"):
        cap_to_budget([0], np.array([4, 4, 2, 6, 1, 5, 3]), LEAF_OFFSETS, None)
    with pytest.raises(ValueError, match="non-decreasing"):
        cap_to_budget([0], MEMBER_ORDER, np.array([0, 5, 2, 7]), None)
    with pytest.raises(ValueError, match="member_order\\[3\\] = 9"):
        cap_to_budget([0], np.array([4, 0, 2, 9, 1, 5, 3]), LEAF_OFFSETS, None)
    with pytest.raises(ValueError, match="outside"):
        cap_to_budget([3], MEMBER_ORDER, LEAF_OFFSETS, None)
    with pytest.raises(ValueError, match="repeats leaf id 1"):
        cap_to_budget([1, 1], MEMBER_ORDER, LEAF_OFFSETS, None)
    with pytest.raises(ValueError, match="top_k_points"):
        cap_to_budget([1], MEMBER_ORDER, LEAF_OFFSETS, -1)
    with pytest.raises(ValueError, match="top_k_points"):
        cap_to_budget([1], MEMBER_ORDER, LEAF_OFFSETS, 2.5)


def _harp_instance(seed: int):
    rng = np.random.default_rng(seed)
    G, D = int(rng.integers(3, 13)), int(rng.integers(1, 7))
    order, offsets = _random_csr(rng, G)
    mean = rng.normal(0.0, 0.3, size=(G, D))
    sd = rng.uniform(0.0, 0.4, size=(G, D))
    base = rng.choice([0.01, 0.5, 0.98], size=D)
    return mean, sd, base, order, offsets


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_harp_select_end_to_end(envelope):
    rng = np.random.default_rng(0)
    for seed in range(40):
        mean, sd, base, order, offsets = _harp_instance(seed)
        budget = None if seed % 4 == 0 else int(rng.integers(0, offsets[-1] + 1))
        sel = harp_select(mean, sd, base, order, offsets, envelope=envelope, top_k_points=budget)
        active = (np.abs(mean) > sd).any(axis=0)
        np.testing.assert_array_equal(sel.active, active)
        g = sel.greedy
        if budget is not None:
            assert sel.n_selected <= budget
        rows, leaf, rank = cap_to_budget(g.kept, order, offsets, budget)
        np.testing.assert_array_equal(sel.example_rows, rows)
        np.testing.assert_array_equal(sel.leaf_of_row, leaf)
        np.testing.assert_array_equal(sel.leaf_rank, rank)
        np.testing.assert_array_equal(sel.row_gain, g.gains[rank])
        # the ranking is the unbudgeted ranking's prefix and the cut is its best prefix
        full = greedy_taskaware(mean, base, envelope, active=active, early_stop=False)
        k = g.order.size
        np.testing.assert_array_equal(g.order, full.order[:k])
        if g.stop_reason == "budget":
            assert int(np.diff(offsets)[g.order].sum()) >= budget
        assert g.cut == int(np.argmax(np.concatenate(([0.0], full.running[:k]))))
        _, y = envelope_objective(mean, base, g.kept, envelope, active)
        np.testing.assert_allclose(sel.predicted, y, atol=1e-12)
        if g.empty_prefix_best:
            assert sel.n_selected == 0 and sel.note is not None
        elif budget != 0:
            assert sel.note is None and sel.n_selected > 0


def test_harp_select_says_so_when_the_empty_prefix_wins():
    # every leaf credibly hurts the only domain: nothing is worth selecting
    mean = np.array([[-0.2], [-0.1], [-0.3]])
    sd = np.full((3, 1), 0.01)
    sel = harp_select(mean, sd, np.array([0.5]), MEMBER_ORDER, LEAF_OFFSETS, envelope="expansive", top_k_points=5)
    assert sel.n_selected == 0 and sel.greedy.empty_prefix_best
    assert "empty prefix" in sel.note and "nothing is selected" in sel.note
    np.testing.assert_array_equal(sel.predicted, [0.5])


def test_harp_select_without_active_domains_selects_nothing():
    mean = np.array([[0.2], [0.1], [0.3]])
    sel = harp_select(
        mean, np.full((3, 1), 1.0), np.array([0.5]), MEMBER_ORDER, LEAF_OFFSETS, envelope="conservative", top_k_points=None
    )
    assert not sel.active.any() and sel.n_selected == 0
    assert "no active domain" in sel.note


def test_harp_select_budget_cuts_inside_a_leaf():
    mean = np.array([[0.25], [0.125], [0.0625]])
    sd = np.zeros((3, 1))
    sel = harp_select(mean, sd, np.array([0.0]), MEMBER_ORDER, LEAF_OFFSETS, envelope="expansive", top_k_points=3)
    # leaf 0 (2 rows) then leaf 1 (3 rows); the budget is reached inside leaf 1
    assert sel.greedy.order.tolist() == [0, 1] and sel.greedy.stop_reason == "budget"
    assert sel.example_rows.tolist() == [4, 0, 2]
    np.testing.assert_array_equal(sel.predicted, [0.375])
    assert sel.predicted_rows[0] == pytest.approx(0.25 + 0.125 / 3)
    assert sel.row_gain.tolist() == [0.25, 0.25, 0.125]
    with pytest.raises(ValueError, match="one row per leaf"):
        harp_select(mean[:2], sd[:2], np.array([0.0]), MEMBER_ORDER, LEAF_OFFSETS, envelope="expansive", top_k_points=3)
    with pytest.raises(ValueError, match="valid envelopes"):
        harp_select(mean, sd, np.array([0.0]), MEMBER_ORDER, LEAF_OFFSETS, envelope="harp-e", top_k_points=3)


def test_predicted_utility_of_row_sets():
    phi = np.array([[0.25, -0.5], [0.5, 0.25], [-0.25, 0.125]])
    base = np.array([0.25, 0.5])
    whole = [4, 0, 5, 3]  # leaves 0 and 2 entirely
    for envelope in ENVELOPES:
        f, y, w = predicted_utility(whole, phi, base, MEMBER_ORDER, LEAF_OFFSETS, envelope=envelope)
        f_ref, y_ref = envelope_objective(phi, base, [0, 2], envelope)
        assert f == f_ref
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(w, [1.0, 0.0, 1.0])
    _, y, w = predicted_utility([6, 6, 2], phi, base, MEMBER_ORDER, LEAF_OFFSETS, envelope="expansive")
    np.testing.assert_allclose(w, [0.0, 2 / 3, 0.0])
    np.testing.assert_allclose(y, base + phi[1] * 2 / 3)
    with pytest.raises(ValueError, match="outside the pool"):
        predicted_utility([7], phi, base, MEMBER_ORDER, LEAF_OFFSETS, envelope="expansive")


def test_random_selection():
    a = random_selection(1000, 100, seed=5)
    b = random_selection(1000, 100, seed=5)
    c = random_selection(1000, 100, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.size == 100 and np.unique(a).size == 100 and a.min() >= 0 and a.max() < 1000
    everything = random_selection(10, 50, seed=1)
    assert sorted(everything.tolist()) == list(range(10))
    assert random_selection(10, 0, seed=1).size == 0
    with pytest.raises(ValueError, match="budget must be an integer >= 0"):
        random_selection(10, -1, seed=1)
    with pytest.raises(ValueError, match="n_pool"):
        random_selection(-3, 1, seed=1)
    with pytest.raises(ValueError, match="budget must be an integer"):
        random_selection(10, 2.0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        random_selection(10, 2, seed=-1)
