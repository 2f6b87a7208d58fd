"""Each method option on a constructed case where it must move the selection in its stated direction, and the
reference behaviour one setting away (the defaults give exactly what the reference code gives)."""

import numpy as np
import pytest

from harp.config import HarpSettings
from harp.method.active import choose_active_leaves, choose_decision_leaves
from harp.method.envelopes import (
    expected_clip01,
    greedy_risk_aware,
    greedy_taskaware,
    risk_envelope_values,
)
from harp.method.hierarchy import choose_representatives
from harp.method.posteriors import fit_kernel_posteriors, fit_posteriors


def test_defaults_are_the_reference():
    s = HarpSettings()
    assert s.posterior_options() == {} and s.selection_options() == {}
    assert "representative_rule" not in s.hierarchy_config() and s.active_rule == "verify_upside"
    with pytest.raises(ValueError, match=r"envelope_risk='mean' is not one of \['plugin', 'expected', 'lcb'\]"):
        HarpSettings(envelope_risk="mean")
    mean = np.array([[0.1, -0.2], [0.3, 0.05], [-0.1, 0.2]])
    plug = greedy_risk_aware(mean, np.full_like(mean, 0.1), np.array([0.5, 0.6]), "expansive", risk="plugin")
    ref = greedy_taskaware(mean, np.array([0.5, 0.6]), "expansive")
    assert plug.order.tolist() == ref.order.tolist() and plug.cut == ref.cut


def test_expected_clip_matches_monte_carlo():
    rng = np.random.default_rng(0)
    for m, v in [(0.9, 0.04), (-0.2, 0.1), (1.3, 0.5), (0.5, 0.0)]:
        mc = np.clip(rng.normal(m, np.sqrt(v), 400_000), 0, 1).mean()
        assert expected_clip01(m, v) == pytest.approx(mc, abs=2e-3)


@pytest.mark.parametrize("envelope", ["expansive", "conservative"])
@pytest.mark.parametrize("risk", ["expected", "lcb"])
def test_risk_aware_ranks_the_uncertain_leaf_lower_near_the_clip(envelope, risk):
    # Equal means near the clip: plug-in ties and takes the lower id (the uncertain leaf 0) first.
    mean = np.array([[0.1], [0.1]])
    sd = np.array([[0.2], [0.01]])
    b = np.array([0.9])
    plug = greedy_taskaware(mean, b, envelope)
    assert plug.order[0] == 0
    res = greedy_risk_aware(mean, sd, b, envelope, risk=risk, risk_samples=400, seed=1)
    assert res.order[0] == 1 and res.gains[0] > 0
    y0 = risk_envelope_values(mean, sd, b, [0], envelope, risk=risk, risk_samples=400, seed=1)
    y1 = risk_envelope_values(mean, sd, b, [1], envelope, risk=risk, risk_samples=400, seed=1)
    assert y0[0] < y1[0] <= 1.0


def test_risk_aware_selection_runs_through_harp_select():
    from harp.method.selection import harp_select

    mean = np.array([[0.1], [0.1]])
    sd = np.array([[0.2], [0.01]])
    order, offsets = np.arange(4), np.array([0, 2, 4])
    plug = harp_select(mean, sd, np.array([0.9]), order, offsets, envelope="expansive", top_k_points=2, z_active=0)
    risk = harp_select(mean, sd, np.array([0.9]), order, offsets, envelope="expansive", top_k_points=2, z_active=0,
                       **HarpSettings(envelope_risk="expected").selection_options())
    assert plug.example_rows.tolist() == [0, 1] and risk.example_rows.tolist() == [2, 3]


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_kernel_prior_lowers_a_leaf_near_leaves_harmful_on_other_domains():
    # Parent 0 (region 0): leaves 0-3 near e1, measured, harmful on domains 0-2; domain 3 has few questions,
    # so there they are measured noisily (sd 0.1) at -0.05. Parent 1 (region 1): leaves 4-6 near e2, measured,
    # flat everywhere; leaf 7 is unmeasured, in parent 1, but its centroid sits next to parent 0's leaves.
    rng = np.random.default_rng(0)
    e1, e2 = np.eye(8)[0], np.eye(8)[1]
    cents = np.stack([_unit(e1 + 0.05 * rng.normal(size=8)) for _ in range(4)]
                     + [_unit(e2 + 0.05 * rng.normal(size=8)) for _ in range(3)] + [_unit(e1 + 0.05 * e2)])
    G, D = 8, 4
    phi = np.full((G, D), np.nan)
    phi[:4] = [-0.3, -0.3, -0.3, -0.05]
    phi[4:7] = 0.0
    phi[:7] += 0.01 * rng.normal(size=(7, D))
    var = np.full((G, D), 1e-4)
    var[:, 3] = 0.01
    measured = np.arange(G) < 7
    pol, rop = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0, 1])
    tree = fit_posteriors(phi, var, measured, pol, rop)
    kern = fit_kernel_posteriors(phi, var, measured, pol, rop, cents)
    assert any(n.startswith("kernel prior") for n in kern.hyper.fallback)
    # The tree gives the unmeasured leaf its flat siblings' ~0 on every domain; the kernel prior carries the
    # harm its neighbours showed on domains 0-2 to it, on the noisy domain 3 as well.
    assert np.abs(tree.mean[7]).max() < 0.02
    assert (kern.mean[7, :3] < tree.mean[7, :3] - 0.1).all()
    assert kern.mean[7, 3] < tree.mean[7, 3] - 0.05
    # Measured leaves keep (close to) what was measured.
    assert np.abs(kern.mean[:7, :3] - phi[:7, :3]).max() < 0.03
    assert np.isfinite(kern.sd).all() and (kern.sd > 0).all()


def test_region_variance_left_free_only_with_enough_measured_regions():
    # Two regions measured, one with harmful leaves: with two regions the fit sends tau_R2 up; asked for three,
    # tau_R2 is 0 and an unmeasured parent of the harmful region is pulled less towards it.
    G = 10
    pol = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    rop = np.array([0, 0, 1, 1, 0])
    phi = np.full((G, 1), np.nan)
    phi[[0, 1, 2, 3]] = [[-0.3], [-0.28], [-0.32], [-0.29]]
    phi[[4, 5, 6, 7]] = [[0.2], [0.22], [0.18], [0.21]]
    var = np.full((G, 1), 1e-3)
    measured = np.isfinite(phi[:, 0])
    free = fit_posteriors(phi, var, measured, pol, rop)
    fixed = fit_posteriors(phi, var, measured, pol, rop, min_measured_regions=3)
    assert free.hyper.tau_R2[0] > 0.01
    assert fixed.hyper.tau_R2[0] == 0.0 and any("min_measured_regions=3" in n for n in fixed.hyper.fallback)
    assert fixed.mean[8, 0] > free.mean[8, 0]  # leaf 8 (parent 4, region 0) is pulled less towards -0.3
    with pytest.raises(ValueError, match="min_measured_regions must be an integer >= 2"):
        fit_posteriors(phi, var, measured, pol, rop, min_measured_regions=1)


def test_central_farthest_picks_the_farthest_leaf():
    parent = _unit([1.0, 0.0, 0.0])
    leaves = _unit([[1.0, 0.05, 0.0], [1.0, 0.3, 0.0], [1.0, 0.6, 0.0], [1.0, 1.5, 0.0], [1.0, 0.9, 0.0]])
    pol = np.zeros(5, dtype=np.int64)
    central = choose_representatives(leaves, parent[None], pol, 2)
    spread = choose_representatives(leaves, parent[None], pol, 2, "central_farthest")
    assert central.tolist() == [0, 1]
    assert spread.tolist() == [0, 3]  # the most central and the farthest
    assert choose_representatives(leaves, parent[None], pol, 1, "central_farthest").tolist() == [0]
    with pytest.raises(ValueError, match="unknown representative rule"):
        choose_representatives(leaves, parent[None], pol, 2, "random")


@pytest.mark.parametrize("rule", ["thompson", "knowledge_gradient"])
def test_decision_rounds_pick_the_leaf_that_can_flip_the_selection(rule):
    # Domain 0 is saturated (b = 1): leaf 1's large, uncertain upside there can never change the selection,
    # but the reference rule ranks it first. Leaf 2, slightly harmful on the open domain 1 with a wide sd,
    # would enter the selection if its measurement came out positive.
    mean = np.array([[0.2, 0.2], [0.3, -0.05], [0.0, -0.02]])
    sd = np.array([[0.01, 0.01], [0.3, 0.01], [0.01, 0.1]])
    measured = np.array([True, False, False])
    b = np.array([1.0, 0.3])
    assert choose_active_leaves(mean, sd, measured, 1).leaves.tolist() == [1]
    got = choose_decision_leaves(mean, sd, measured, 1, b, np.ones(3, dtype=np.int64), envelope="expansive",
                                 top_k_points=None, rule=rule, n_samples=64, seed=0)
    assert got.leaves.tolist() == [2]
    assert got.scores[1] == 0.0 and got.scores[2] > 0 and got.scores[0] == -np.inf
    # With one run to spare, the leaf that cannot flip anything is still never picked.
    assert choose_decision_leaves(mean, sd, measured, 2, b, np.ones(3, dtype=np.int64), envelope="expansive",
                                  top_k_points=None, rule=rule, n_samples=64, seed=0).leaves.tolist() == [2]
