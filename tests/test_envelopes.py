"""Greedy ranking under the HARP-C / HARP-E envelopes, checked against the direct formula."""

from __future__ import annotations

import numpy as np
import pytest

from harp.method.envelopes import (
    ENVELOPES,
    GREEDY_KERNELS,
    active_domains,
    envelope_objective,
    envelope_values,
    greedy_taskaware,
)

SEEDS = range(12)


def _instance(seed: int, *, dyadic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A small instance where the clip matters: bases near 0 and 1 and large effects.

    ``dyadic`` draws multiples of 1/32, so every sum, max and clip is exact in float64 and ties are real.
    """
    rng = np.random.default_rng(seed)
    G = int(rng.integers(2, 13))
    D = int(rng.integers(1, 7))
    if dyadic:
        phi = rng.integers(-16, 17, size=(G, D)) / 32.0
        phi[rng.random((G, D)) < 0.2] = 0.0
        if G > 3:  # duplicated leaves force exact ties
            phi[G - 1] = phi[0]
        base = rng.integers(0, 33, size=D) / 32.0
    else:
        phi = rng.normal(0.0, 0.45, size=(G, D))
        phi[rng.random((G, D)) < 0.15] = 0.0
        base = rng.choice([0.0, 0.02, 0.5, 0.97, 1.0], size=D) + rng.uniform(-0.02, 0.02, size=D)
        base = np.clip(base, 0.0, 1.0)
    return phi, base


def _direct_gains(phi, base, chosen, envelope, active=None) -> np.ndarray:
    """F(S + g) - F(S) for every leaf by the direct formula; -inf for leaves already in S."""
    f0, _ = envelope_objective(phi, base, chosen, envelope, active)
    out = np.full(phi.shape[0], -np.inf)
    for g in range(phi.shape[0]):
        if g not in chosen:
            out[g] = envelope_objective(phi, base, [*chosen, g], envelope, active)[0] - f0
    return out


@pytest.mark.parametrize("kernel", GREEDY_KERNELS)
@pytest.mark.parametrize("envelope", ENVELOPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_gains_and_choices_match_direct_formula(seed, envelope, kernel):
    phi, base = _instance(seed)
    res = greedy_taskaware(phi, base, envelope, early_stop=False, kernel=kernel)
    assert res.complete and sorted(res.order.tolist()) == list(range(phi.shape[0]))
    chosen: list[int] = []
    for k, g in enumerate(res.order.tolist()):
        direct = _direct_gains(phi, base, chosen, envelope)
        assert res.gains[k] == pytest.approx(direct[g], abs=1e-12)
        assert direct[g] >= direct.max() - 1e-12
        chosen.append(g)


@pytest.mark.parametrize("kernel", GREEDY_KERNELS)
@pytest.mark.parametrize("envelope", ENVELOPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_exact_ties_go_to_lowest_leaf_id(seed, envelope, kernel):
    phi, base = _instance(seed, dyadic=True)
    res = greedy_taskaware(phi, base, envelope, early_stop=False, kernel=kernel)
    chosen: list[int] = []
    n_ties = 0
    for k, g in enumerate(res.order.tolist()):
        direct = _direct_gains(phi, base, chosen, envelope)
        best = np.flatnonzero(direct == direct.max())
        n_ties += best.size > 1
        assert g == best[0], f"step {k}: chose {g}, argmax set {best.tolist()}"
        assert res.gains[k] == direct[g]
        chosen.append(g)
    if phi.shape[0] > 3:
        assert n_ties > 0  # the duplicated leaf ties with leaf 0 at least once


@pytest.mark.parametrize("envelope", ENVELOPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_cut_is_shortest_best_prefix(seed, envelope):
    phi, base = _instance(seed, dyadic=seed % 2 == 0)
    res = greedy_taskaware(phi, base, envelope, early_stop=False)
    np.testing.assert_array_equal(res.running, np.cumsum(res.gains))
    prefix_values = np.concatenate(([0.0], res.running))
    best = prefix_values.max()
    assert res.cut == int(np.flatnonzero(prefix_values == best)[0])
    assert res.empty_prefix_best == (res.cut == 0)
    np.testing.assert_array_equal(res.kept, res.order[: res.cut])
    f_kept, y_kept = envelope_objective(phi, base, res.kept, envelope)
    assert res.objective == pytest.approx(f_kept, abs=1e-12)
    np.testing.assert_allclose(res.predicted, y_kept, atol=1e-12)
    assert res.objective == pytest.approx(res.empty_objective + best, abs=1e-9)


def test_cut_prefers_empty_prefix_on_ties_and_when_everything_hurts():
    phi = np.array([[0.0, 0.0], [-0.25, 0.0], [0.0, 0.0]])
    res = greedy_taskaware(phi, np.array([0.5, 0.5]), "expansive", early_stop=False)
    assert res.order.tolist() == [0, 2, 1]  # zero-gain leaves by id, then the harmful one
    assert res.gains.tolist() == [0.0, 0.0, -0.25]
    assert res.cut == 0 and res.empty_prefix_best and res.kept.size == 0


def test_conservative_credits_one_positive_leaf_per_domain():
    phi = np.array([[0.25, 0.0], [0.125, 0.0], [0.0, 0.0625]])
    base = np.array([0.25, 0.5])
    res = greedy_taskaware(phi, base, "conservative", early_stop=False)
    assert res.order.tolist() == [0, 2, 1]
    assert res.gains.tolist() == [0.25, 0.0625, 0.0]  # the second positive leaf on domain 0 adds nothing
    assert res.cut == 2
    np.testing.assert_array_equal(res.predicted, [0.5, 0.5625])
    _, y_both = envelope_objective(phi, base, [0, 1], "conservative")
    assert y_both[0] == 0.5


def test_conservative_accumulates_every_harm():
    phi = np.array([[0.5, 0.0], [-0.125, 0.0], [-0.25, 0.0]])
    _, y = envelope_objective(phi, np.array([0.25, 0.0]), [0, 1, 2], "conservative")
    assert y.tolist() == [0.375, 0.0]


def test_expansive_adds_effects_that_fit_under_the_clip():
    phi = np.array([[0.125, 0.0], [0.25, 0.0625], [0.0625, 0.125]])
    base = np.array([0.25, 0.5])
    res = greedy_taskaware(phi, base, "expansive", early_stop=False)
    assert res.cut == 3
    np.testing.assert_array_equal(res.predicted, base + phi.sum(axis=0))
    assert res.running[-1] == phi.sum()


def test_clip_caps_gains_at_both_ends():
    phi = np.array([[0.5, -0.5]])
    f, y = envelope_objective(phi, np.array([0.75, 0.25]), [0], "expansive")
    assert y.tolist() == [1.0, 0.0] and f == 1.0
    res = greedy_taskaware(phi, np.array([0.75, 0.25]), "expansive")
    assert res.gains.tolist() == [0.0]


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_gain_rises_after_all_gains_were_negative(envelope):
    """Why 'all gains <= 0' is no stopping rule: a harm pulls a saturated domain back into range."""
    phi = np.array([[0.5, -0.25], [-0.5, 0.5]])
    base = np.array([1.0, 0.875])
    for early_stop in (False, True):
        res = greedy_taskaware(phi, base, envelope, early_stop=early_stop)
        assert res.order.tolist() == [0, 1]
        assert res.gains.tolist() == [-0.25, 0.375]
        assert res.cut == 2 and res.objective == 2.0


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_early_stop_never_changes_the_cut(envelope):
    n_stopped = 0
    for seed in range(120):
        phi, base = _instance(1000 + seed, dyadic=seed % 2 == 0)
        full = greedy_taskaware(phi, base, envelope, early_stop=False)
        fast = greedy_taskaware(phi, base, envelope, early_stop=True)
        k = fast.order.size
        np.testing.assert_array_equal(fast.order, full.order[:k])
        np.testing.assert_array_equal(fast.gains, full.gains[:k])
        assert fast.cut == full.cut, f"seed {seed}"
        np.testing.assert_array_equal(fast.kept, full.kept)
        assert fast.objective == full.objective
        if fast.stop_reason == "bound":
            assert k < phi.shape[0]
            n_stopped += 1
        else:
            assert fast.complete
    assert n_stopped > 10  # the bound does fire, so the comparison is not vacuous


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_point_budget_is_never_exceeded_beyond_one_leaf(envelope):
    rng = np.random.default_rng(7)
    for trial in range(60):
        phi, base = _instance(2000 + trial, dyadic=trial % 2 == 0)
        G = phi.shape[0]
        sizes = rng.integers(0, 20, size=G)
        budget = int(rng.integers(0, sizes.sum() + 5))
        full = greedy_taskaware(phi, base, envelope, early_stop=False)
        res = greedy_taskaware(phi, base, envelope, leaf_sizes=sizes, budget_points=budget, early_stop=False)
        k = res.order.size
        np.testing.assert_array_equal(res.order, full.order[:k])
        taken = int(sizes[res.order].sum())
        # ranking goes on only while the ranked leaves hold fewer rows than the budget
        assert int(sizes[res.order[:-1]].sum()) < budget if k else budget == 0
        if res.stop_reason == "budget":
            assert taken >= budget
        else:
            assert res.complete and k == G
        # the cut is the best prefix among the ranked ones
        assert res.cut == int(np.argmax(np.concatenate(([0.0], full.running[:k]))))


def test_budget_zero_ranks_nothing_and_needs_sizes():
    phi, base = _instance(3)
    res = greedy_taskaware(phi, base, "expansive", leaf_sizes=np.ones(phi.shape[0], int), budget_points=0)
    assert res.order.size == 0 and res.cut == 0 and res.stop_reason == "budget"
    with pytest.raises(ValueError, match="leaf_sizes"):
        greedy_taskaware(phi, base, "expansive", budget_points=3)
    with pytest.raises(ValueError, match="leaf_sizes"):
        greedy_taskaware(phi, base, "expansive", leaf_sizes=np.ones(phi.shape[0] + 1, int), budget_points=3)
    with pytest.raises(ValueError, match="leaf 1 is negative"):
        greedy_taskaware(phi, base, "expansive", leaf_sizes=np.r_[1, -1, np.ones(phi.shape[0] - 2, int)])


def test_max_steps_truncates_the_ranking():
    phi, base = _instance(5)
    full = greedy_taskaware(phi, base, "conservative", early_stop=False)
    res = greedy_taskaware(phi, base, "conservative", max_steps=2, early_stop=False)
    assert res.stop_reason == "max_steps"
    np.testing.assert_array_equal(res.order, full.order[:2])
    with pytest.raises(ValueError, match="max_steps"):
        greedy_taskaware(phi, base, "conservative", max_steps=-1)


@pytest.mark.parametrize("envelope", ENVELOPES)
def test_inactive_domains_are_ignored(envelope):
    for seed in range(8):
        phi, base = _instance(300 + seed)
        active = np.random.default_rng(seed).random(phi.shape[1]) < 0.6
        res = greedy_taskaware(phi, base, envelope, active=active, early_stop=False)
        sub = greedy_taskaware(phi[:, active], base[active], envelope, early_stop=False) if active.any() else None
        if sub is None:
            assert (res.gains == 0).all() and res.cut == 0
        else:
            np.testing.assert_array_equal(res.order, sub.order)
            np.testing.assert_array_equal(res.gains, sub.gains)
        assert res.predicted.shape == (phi.shape[1],)
        np.testing.assert_array_equal(res.active, active)


def test_identical_inputs_give_identical_results_and_inputs_are_untouched():
    phi, base = _instance(11)
    phi0, base0 = phi.copy(), base.copy()
    for envelope in ENVELOPES:
        a = greedy_taskaware(phi, base, envelope)
        b = greedy_taskaware(phi.copy(), base.copy(), envelope)
        for field in ("order", "gains", "running", "predicted", "active"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert (a.cut, a.objective, a.stop_reason) == (b.cut, b.objective, b.stop_reason)
        with pytest.raises(ValueError):
            a.order[0] = 1  # results are read-only
    np.testing.assert_array_equal(phi, phi0)
    np.testing.assert_array_equal(base, base0)


@pytest.mark.parametrize("kernel", GREEDY_KERNELS)
def test_larger_instance_with_compaction_matches_direct_objective(kernel):
    rng = np.random.default_rng(99)
    phi = rng.normal(0.0, 0.05, size=(300, 5))
    base = np.array([0.0, 0.1, 0.5, 0.95, 1.0])
    for envelope in ENVELOPES:
        res = greedy_taskaware(phi, base, envelope, early_stop=False, kernel=kernel)
        assert res.complete and np.unique(res.order).size == 300
        f_all = [envelope_objective(phi, base, res.order[:k], envelope)[0] for k in (0, 50, 160, 240, 300)]
        for k, f in zip((50, 160, 240, 300), f_all[1:], strict=True):
            assert res.running[k - 1] == pytest.approx(f - f_all[0], abs=1e-9)
        # masking alone would scan all 300 columns every step (90000); halving compaction scans ~2/3 of that
        assert res.rows_scanned <= 0.7 * 300**2


@pytest.mark.parametrize("bad", ["C", "HARP-E", "", None, "Conservative"])
def test_invalid_envelope_names(bad):
    phi, base = _instance(0)
    with pytest.raises(ValueError, match="'conservative', 'expansive'"):
        greedy_taskaware(phi, base, bad)
    with pytest.raises(ValueError, match="valid envelopes"):
        envelope_objective(phi, base, [0], bad)


def test_bad_inputs_are_named():
    phi, base = _instance(0)
    bad_phi = phi.copy()
    bad_phi[1, 0] = np.nan
    with pytest.raises(ValueError, match="leaf 1, domain 0"):
        greedy_taskaware(bad_phi, base, "expansive")
    with pytest.raises(ValueError, match="domain 0"):
        greedy_taskaware(phi, np.r_[1.5, base[1:]], "expansive")
    with pytest.raises(ValueError, match="base must have shape"):
        greedy_taskaware(phi, base[:-1] if base.size > 1 else np.r_[base, base], "expansive")
    with pytest.raises(ValueError, match="active"):
        greedy_taskaware(phi, base, "expansive", active=np.ones(phi.shape[1]))
    with pytest.raises(ValueError, match="repeats leaf id 0"):
        envelope_objective(phi, base, [0, 0], "expansive")
    with pytest.raises(ValueError, match="outside"):
        envelope_objective(phi, base, [phi.shape[0]], "expansive")
    with pytest.raises(ValueError, match="2-D"):
        greedy_taskaware(phi[0], base, "expansive")


def test_envelope_values_with_whole_and_partial_leaves():
    phi = np.array([[0.5, -0.25], [0.25, -0.5]])
    base = np.array([0.25, 0.75])
    for envelope in ENVELOPES:
        np.testing.assert_array_equal(
            envelope_values(phi, base, np.array([1.0, 1.0]), envelope),
            envelope_objective(phi, base, [0, 1], envelope)[1],
        )
    np.testing.assert_array_equal(envelope_values(phi, base, np.array([0.5, 0.0]), "expansive"), [0.5, 0.625])
    np.testing.assert_array_equal(envelope_values(phi, base, np.array([0.5, 1.0]), "conservative"), [0.5, 0.125])
    with pytest.raises(ValueError, match="weights"):
        envelope_values(phi, base, np.array([1.5, 0.0]), "expansive")


def test_active_domains():
    mean = np.array([[0.3, 0.05, 0.0, -0.2], [0.0, -0.05, 0.0, 0.0]])
    sd = np.array([[0.1, 0.1, 0.0, 0.0], [0.1, 0.1, 0.0, 0.3]])
    np.testing.assert_array_equal(active_domains(mean, sd), [True, False, False, True])
    np.testing.assert_array_equal(active_domains(mean, sd, z=4.0), [False, False, False, True])
    np.testing.assert_array_equal(active_domains(mean, sd, z=0.0), [True, True, False, True])
    # exactly on the threshold is not credible
    np.testing.assert_array_equal(active_domains(np.array([[0.2]]), np.array([[0.1]]), z=2.0), [False])
    with pytest.raises(ValueError, match="leaf 1, domain 0"):
        active_domains(mean, np.array([[0.1] * 4, [-0.1, 0.1, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="shape"):
        active_domains(mean, sd[:, :2])
    with pytest.raises(ValueError, match="z"):
        active_domains(mean, sd, z=-1.0)
