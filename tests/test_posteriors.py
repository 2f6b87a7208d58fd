"""Stage 1b: paired bootstrap of main effects and the empirical-Bayes hierarchical posteriors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from harp.method.posteriors import (
    MainEffects,
    Posteriors,
    _sweep,
    _Tree,
    bootstrap_main_effects,
    fit_posteriors,
)

# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def _tree(n_regions: int, parents_per_region: int, leaves_per_parent: int) -> tuple[np.ndarray, np.ndarray]:
    P = n_regions * parents_per_region
    return np.repeat(np.arange(P), leaves_per_parent), np.repeat(np.arange(n_regions), parents_per_region)


def _paired_leaf(rng: np.random.Generator, base: np.ndarray, p_up: np.ndarray, p_down: np.ndarray) -> np.ndarray:
    """Per-example leaf correctness: a base-wrong example turns right w.p. p_up, a base-right one wrong w.p. p_down."""
    u = rng.random(p_up.shape)
    return np.where(base == 1.0, u >= p_down, u < p_up).astype(np.float64)


TAU_R = np.array([0.06, 0.02, 0.04, 0.00, 0.05])
TAU_P = np.array([0.04, 0.06, 0.02, 0.05, 0.03])
TAU_L = np.array([0.03, 0.04, 0.06, 0.03, 0.02])
MU = np.array([0.02, -0.03, 0.0, 0.05, -0.01])


def _simulate(seed: int, reps: int, n_per_domain: int = 40):
    """6 regions x 8 parents x 8 leaves, 5 domains; measured leaves scored example by example.

    The base model's correctness is one Bernoulli draw per eval example; each measured leaf flips base
    answers with probabilities chosen so that, given the base's answers, E[phi_hat] is exactly the leaf's
    theta. The noise of phi_hat is therefore real binomial noise, estimated by the bootstrap.
    """
    rng = np.random.default_rng(seed)
    pol, rop = _tree(6, 8, 8)
    G, P, D = pol.size, rop.size, MU.size
    theta = (
        MU
        + (rng.normal(size=(6, D)) * TAU_R)[rop][pol]
        + (rng.normal(size=(P, D)) * TAU_P)[pol]
        + rng.normal(size=(G, D)) * TAU_L
    )
    measured = np.zeros(G, dtype=bool)
    for r in range(reps):
        measured[r::8] = True  # the first `reps` leaves of every parent
    dom = np.repeat(np.arange(D), n_per_domain)
    # The base model gets exactly half of every domain right, so flip probabilities stay in [0, 1].
    base = np.concatenate([rng.permutation(np.arange(n_per_domain) % 2) for _ in range(D)]).astype(np.float64)
    bbar = 0.5
    ids = np.flatnonzero(measured)
    th = theta[ids]
    churn = 0.05
    p_up = np.where(th >= 0, (th + bbar * churn) / (1 - bbar), churn)
    p_down = np.where(th >= 0, churn, ((1 - bbar) * churn - th) / bbar)
    assert ((p_up >= 0) & (p_up <= 1) & (p_down >= 0) & (p_down <= 1)).all(), "simulation left its range"
    leaf = _paired_leaf(rng, base, p_up[:, dom], p_down[:, dom])
    effects = bootstrap_main_effects(leaf, base, dom, n_boot=200, seed=seed)
    phi, var, meas = effects.to_leaves(ids, G)
    return theta, phi, var, meas, pol, rop


def _dense_reference(phi, var, meas, pol, rop, d, tau_R2, tau_P2, tau_L2):
    """Posterior mean/sd of every leaf and the restricted log-likelihood by dense GLS algebra (flat mu)."""
    reg = rop[pol]
    S = tau_R2 * (reg[:, None] == reg[None]) + tau_P2 * (pol[:, None] == pol[None]) + tau_L2 * np.eye(pol.size)
    m = np.flatnonzero(meas)
    y = phi[m, d]
    V = S[np.ix_(m, m)] + np.diag(var[m, d])
    Vi = np.linalg.inv(V)
    one = np.ones(m.size)
    a = one @ Vi @ one
    mu = one @ Vi @ y / a
    r = y - mu
    c = S[:, m]
    mean = mu + c @ Vi @ r
    post_var = np.diag(S) - np.einsum("ij,jk,ik->i", c, Vi, c) + (1 - c @ Vi @ one) ** 2 / a
    loglik = -0.5 * (np.linalg.slogdet(V)[1] + np.log(a) + r @ Vi @ r + (m.size - 1) * np.log(2 * np.pi))
    return mean, np.sqrt(post_var), loglik, mu, np.sqrt(1 / a)


# --------------------------------------------------------------------------------------------------------
# bootstrap_main_effects
# --------------------------------------------------------------------------------------------------------


def test_phi_hat_is_the_per_domain_mean_difference() -> None:
    rng = np.random.default_rng(0)
    dom = rng.integers(0, 4, size=300)  # domains interleaved in the eval order
    leaf = rng.random((5, 300))  # float scores, not only 0/1
    base = rng.random(300)
    me = bootstrap_main_effects(leaf, base, dom, n_boot=50, seed=1)
    assert isinstance(me, MainEffects)
    assert me.phi_hat.shape == me.phi_var.shape == (5, 4)
    for d in range(4):
        sel = dom == d
        assert me.base_score[d] == pytest.approx(base[sel].mean(), abs=1e-12)
        np.testing.assert_allclose(me.leaf_score[:, d], leaf[:, sel].mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(me.phi_hat[:, d], leaf[:, sel].mean(axis=1) - base[sel].mean(), atol=1e-12)
    assert me.n_eval.tolist() == np.bincount(dom, minlength=4).tolist()


def test_bootstrap_variance_matches_the_paired_analytic_variance() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    dom = np.repeat([0, 1], n)
    base = (rng.random(2 * n) < 0.55).astype(np.float64)
    p_up = np.array([[0.05], [0.30], [0.15]]) * np.ones((1, 2 * n))
    p_down = np.array([[0.05], [0.02], [0.25]]) * np.ones((1, 2 * n))
    leaf = _paired_leaf(rng, base, p_up, p_down)
    me = bootstrap_main_effects(leaf, base, dom, n_boot=1000, seed=2, pool_examples=0)
    for d in range(2):
        sel = dom == d
        p10 = ((leaf[:, sel] == 1) & (base[sel] == 0)).mean(axis=1)
        p01 = ((leaf[:, sel] == 0) & (base[sel] == 1)).mean(axis=1)
        analytic = (p10 + p01 - (p10 - p01) ** 2) / n  # plug-in variance of a mean paired difference
        ratio = me.phi_var[:, d] / analytic
        assert np.all((ratio > 0.85) & (ratio < 1.15)), ratio
        # Pairing matters: treating leaf and base as independent samples would overstate the noise.
        unpaired = (leaf[:, sel].var(axis=1) + base[sel].var()) / n
        assert np.all(me.phi_var[:, d] < 0.6 * unpaired)


def test_domains_are_resampled_independently() -> None:
    rng = np.random.default_rng(3)
    n0, n1 = 30, 50
    dom = rng.permutation(np.r_[np.zeros(n0, int), np.ones(n1, int)])
    leaf = rng.random((3, dom.size))
    base = rng.random(dom.size)
    # Domain 0: every leaf beats the base by exactly 0.25 on every example, so no resample drawn from
    # domain 0 alone can move its mean; any example of domain 1 mixed in would.
    leaf[:, dom == 0] = 0.5
    base[dom == 0] = 0.25
    me = bootstrap_main_effects(leaf, base, dom, n_boot=300, seed=4)
    np.testing.assert_allclose(me.phi_hat[:, 0], 0.25, atol=1e-12)
    np.testing.assert_array_equal(me.phi_var_raw[:, 0], 0.5 / n0**2)
    assert np.all(me.phi_var_raw[:, 1] > 0.5 / n1**2)
    # A domain's variance depends only on its own examples: change domain 1 (values and size) and
    # domain 2's variance is bit-identical.
    dom3 = np.r_[dom, np.full(40, 2)]
    leaf3 = np.c_[leaf, rng.random((3, 40))]
    base3 = np.r_[base, rng.random(40)]
    a = bootstrap_main_effects(leaf3, base3, dom3, n_boot=100, seed=5)
    keep = dom3 != 1
    extra = np.ones((3, 25)) * 0.9
    b = bootstrap_main_effects(
        np.c_[leaf3[:, keep], extra], np.r_[base3[keep], np.zeros(25)], np.r_[dom3[keep], np.ones(25, int)],
        n_boot=100, seed=5,
    )  # fmt: skip
    np.testing.assert_array_equal(a.phi_var_raw[:, 2], b.phi_var_raw[:, 2])
    np.testing.assert_array_equal(a.phi_var_raw[:, 0], b.phi_var_raw[:, 0])
    assert not np.allclose(a.phi_var_raw[:, 1], b.phi_var_raw[:, 1])


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(6)
    dom = rng.integers(0, 3, size=120)
    leaf = (rng.random((4, 120)) < 0.6).astype(float)
    base = (rng.random(120) < 0.5).astype(float)
    a = bootstrap_main_effects(leaf, base, dom, seed=11)
    b = bootstrap_main_effects(leaf, base, dom, seed=11)
    c = bootstrap_main_effects(leaf, base, dom, seed=12)
    np.testing.assert_array_equal(a.phi_var, b.phi_var)
    np.testing.assert_array_equal(a.phi_hat, c.phi_hat)
    assert not np.array_equal(a.phi_var_raw, c.phi_var_raw)


def test_variance_floor_and_pooling() -> None:
    dom = np.array([0, 1, 1, 1, 1])
    leaf = np.array([[1.0, 1, 0, 1, 0], [0.0, 1, 1, 1, 1]])
    base = np.array([0.0, 0, 0, 1, 1])
    me = bootstrap_main_effects(leaf, base, dom, n_boot=400, seed=0, pool_examples=6.0)
    # One example in domain 0: every resample is the same, so the floor 0.5 / 1^2 applies.
    np.testing.assert_array_equal(me.phi_var_raw[:, 0], [0.5, 0.5])
    assert me.var_floor.tolist() == [0.5, 0.5 / 16]
    w = 6.0 / (me.n_eval + 6.0)
    np.testing.assert_allclose(me.pool_weight, w)
    expect = (1 - w) * me.phi_var_raw + w * me.phi_var_raw.mean(axis=0)
    np.testing.assert_allclose(me.phi_var, expect)
    assert me.phi_var_raw[0, 1] != me.phi_var_raw[1, 1]
    raw = bootstrap_main_effects(leaf, base, dom, n_boot=400, seed=0, pool_examples=0)
    np.testing.assert_array_equal(raw.phi_var, raw.phi_var_raw)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leaf_correct": [[0.0, 1.5]]}, r"leaf_correct\[0, 1\] = 1.5"),
        ({"leaf_correct": [[0.0, np.nan]]}, r"leaf_correct\[0, 1\]"),
        ({"leaf_correct": [0.0, 1.0]}, "2-D"),
        ({"base_correct": [0.0, 1.0, 1.0]}, "base_correct has shape"),
        ({"base_correct": [-0.1, 1.0]}, r"base_correct\[0\]"),
        ({"domain_of_eval": [0.0, 1.0]}, "integer domain ids"),
        ({"domain_of_eval": [0, -1]}, r"domain_of_eval\[1\] = -1"),
        ({"domain_of_eval": [0, 3], "n_domains": 2}, r"domain_of_eval\[1\] = 3 is outside"),
        ({"n_domains": 3}, r"domain\(s\) \[2\] have no eval examples"),
        ({"n_boot": 1}, "n_boot must be >= 2"),
        ({"pool_examples": -1.0}, "pool_examples"),
        ({"leaf_correct": np.zeros((0, 2))}, "no measured leaves"),
    ],
)
def test_bootstrap_rejects_bad_input(kwargs, match) -> None:
    args = {"leaf_correct": [[0.0, 1.0]], "base_correct": [1.0, 0.0], "domain_of_eval": [0, 1]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bootstrap_main_effects(
            args.pop("leaf_correct"), args.pop("base_correct"), args.pop("domain_of_eval"), **args
        )


def test_to_leaves_scatters_rows() -> None:
    me = bootstrap_main_effects([[1.0, 0.0], [0.0, 0.0]], [0.0, 0.0], [0, 0], n_boot=10)
    phi, var, meas = me.to_leaves(np.array([4, 1]), 6)
    assert meas.tolist() == [False, True, False, False, True, False]
    assert phi[4, 0] == 0.5 and phi[1, 0] == 0.0 and np.isnan(phi[0, 0])
    with pytest.raises(ValueError, match="repeat a leaf"):
        me.to_leaves(np.array([1, 1]), 6)
    with pytest.raises(ValueError, match="outside"):
        me.to_leaves(np.array([1, 6]), 6)


# --------------------------------------------------------------------------------------------------------
# fit_posteriors: exactness
# --------------------------------------------------------------------------------------------------------


def _small_case(seed: int = 1):
    rng = np.random.default_rng(seed)
    pol, rop = _tree(3, 3, 4)
    G = pol.size
    meas = rng.random(G) < 0.5
    meas[[0, 1]] = True  # at least one parent with two measured leaves
    theta = rng.normal(0, 0.1, size=(3, 2))[rop][pol] + rng.normal(0, 0.08, (G, 2))
    var = rng.uniform(0.002, 0.01, (G, 2))
    phi = theta + rng.normal(size=(G, 2)) * np.sqrt(var)
    phi[~meas] = np.nan  # unmeasured values are never read
    return phi, var, meas, pol, rop


@pytest.mark.parametrize("boundary_prior", [False, True])
def test_posterior_is_the_exact_gaussian_conditional_and_hypers_maximise(boundary_prior) -> None:
    phi, var, meas, pol, rop = _small_case()
    post = fit_posteriors(phi, var, meas, pol, rop, boundary_prior=boundary_prior)
    h = post.hyper
    assert h.converged.all() and h.identified_L and h.identified_P and h.identified_R
    penalty = 0.5 if boundary_prior else 0.0
    for d in range(2):
        taus = [h.tau_R2[d], h.tau_P2[d], h.tau_L2[d]]
        mean, sd, loglik, mu, mu_sd = _dense_reference(phi, var, meas, pol, rop, d, *taus)
        np.testing.assert_allclose(post.mean[:, d], mean, atol=1e-10)
        np.testing.assert_allclose(post.sd[:, d], sd, atol=1e-10)
        assert h.loglik[d] == pytest.approx(loglik, abs=1e-9)
        assert h.mu[d] == pytest.approx(mu, abs=1e-12) and h.mu_sd[d] == pytest.approx(mu_sd, abs=1e-12)
        best = loglik + penalty * np.log(taus).sum()
        for k in range(3):
            for factor in (0.9, 1.1):
                t = list(taus)
                t[k] = max(t[k] * factor, 1e-6)
                if t[k] == taus[k]:
                    continue
                other = _dense_reference(phi, var, meas, pol, rop, d, *t)[2] + penalty * np.log(t).sum()
                assert other <= best + 1e-9


def test_score_matches_finite_differences_of_the_likelihood() -> None:
    phi, var, meas, pol, rop = _small_case(2)
    tree = _Tree(np.flatnonzero(meas), pol, rop)
    y, s = phi[tree.leaf_ids], var[tree.leaf_ids]
    theta = np.array([[0.004, 0.01], [0.003, 0.002], [0.006, 0.02]])
    g = _sweep(tree, y, s, theta).grad
    for k in range(3):
        h = 1e-7
        up, down = theta.copy(), theta.copy()
        up[k] += h
        down[k] -= h
        fd = (_sweep(tree, y, s, up).loglik - _sweep(tree, y, s, down).loglik) / (2 * h)
        np.testing.assert_allclose(g[k], fd, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# fit_posteriors: calibration on the known model
# --------------------------------------------------------------------------------------------------------


def test_simulated_hierarchy_shrinks_covers_and_recovers_hypers() -> None:
    sq_post, sq_raw, inside = [], [], []
    for seed in range(4):
        theta, phi, var, meas, pol, rop = _simulate(seed, reps=2)
        post = fit_posteriors(phi, var, meas, pol, rop)
        h = post.hyper
        assert h.identified_L and h.identified_P and h.identified_R and h.fallback == ()
        assert h.converged.all()
        sq_post.append((post.mean[meas] - theta[meas]) ** 2)
        sq_raw.append((phi[meas] - theta[meas]) ** 2)
        lo, hi = post.interval(0.9)
        inside.append(((theta >= lo) & (theta <= hi))[~meas])
        # Hyper-parameters within a loose factor of the truth (sd scale), domain by domain.
        for est, true in ((h.tau_L2, TAU_L), (h.tau_P2, TAU_P)):
            ratio = np.sqrt(est) / true
            assert np.all((ratio > 1 / 3) & (ratio < 3)), ratio
        total = np.sqrt((h.tau_R2 + h.tau_P2 + h.tau_L2) / (TAU_R**2 + TAU_P**2 + TAU_L**2))
        assert np.all((total > 0.5) & (total < 2)), total
        assert np.all(np.abs(h.mu - MU) < 0.1)
    mse_post, mse_raw = np.concatenate(sq_post).mean(), np.concatenate(sq_raw).mean()
    coverage = np.concatenate(inside).mean()
    print(f"measured MSE posterior {mse_post:.5f} vs raw {mse_raw:.5f}; unmeasured 90% coverage {coverage:.3f}")
    assert mse_post < 0.8 * mse_raw
    assert 0.8 <= coverage <= 0.97


def test_one_representative_per_parent_falls_back_conservatively() -> None:
    inside = []
    for seed in range(4):
        theta, phi, var, meas, pol, rop = _simulate(10 + seed, reps=1)
        post = fit_posteriors(phi, var, meas, pol, rop)
        h = post.hyper
        assert not h.identified_L and h.identified_P and h.identified_R
        assert any("no parent has >= 2 measured leaves" in note for note in h.fallback)
        np.testing.assert_array_equal(h.tau_P2, 0.0)
        lo, hi = post.interval(0.9)
        inside.append(((theta >= lo) & (theta <= hi))[~meas])
        # Sharing the joint variance with parents changes nothing for measured leaves (only the sum is
        # identified) and lets unmeasured siblings borrow, so their intervals narrow.
        shared = fit_posteriors(phi, var, meas, pol, rop, parent_share=0.5)
        np.testing.assert_allclose(shared.hyper.tau_P2 + shared.hyper.tau_L2, h.tau_L2, rtol=1e-12)
        np.testing.assert_allclose(shared.mean[meas], post.mean[meas], atol=1e-10)
        np.testing.assert_allclose(shared.sd[meas], post.sd[meas], atol=1e-10)
        assert np.all(shared.sd[~meas] < post.sd[~meas])
    coverage = np.concatenate(inside).mean()
    print(f"one representative per parent: unmeasured 90% coverage {coverage:.3f}")
    assert coverage >= 0.75


# --------------------------------------------------------------------------------------------------------
# fit_posteriors: edge cases and errors
# --------------------------------------------------------------------------------------------------------


def test_domain_with_all_measured_values_equal() -> None:
    phi, var, meas, pol, rop = _small_case(3)
    phi[meas, 1] = 0.07
    post = fit_posteriors(phi, var, meas, pol, rop)
    np.testing.assert_allclose(post.mean[:, 1], 0.07, atol=1e-12)
    assert np.isfinite(post.sd).all() and (post.sd > 0).all()
    h = post.hyper
    assert h.converged.all()
    # The boundary prior keeps the variances off zero, but well below the measurement noise...
    assert 0 < h.tau_R2[1] + h.tau_P2[1] + h.tau_L2[1] < 0.5 * var[meas, 1].mean()
    # ...while the bare restricted likelihood puts them all at the floor.
    bare = fit_posteriors(phi, var, meas, pol, rop, boundary_prior=False, min_var=1e-7)
    np.testing.assert_allclose(bare.mean[:, 1], 0.07, atol=1e-12)
    for tau in (bare.hyper.tau_R2, bare.hyper.tau_P2, bare.hyper.tau_L2):
        assert tau[1] == 1e-7


def test_region_without_measured_leaves_falls_back_to_the_domain() -> None:
    phi, var, meas, pol, rop = _small_case(4)
    reg = rop[pol]
    meas[reg == 2] = False
    add = np.array([0, 1, 4, 5, 13, 17])
    phi[add[~meas[add]]] = 0.05
    meas[add] = True
    post = fit_posteriors(phi, var, meas, pol, rop)
    h = post.hyper
    empty = reg == 2
    np.testing.assert_allclose(post.mean[empty], np.broadcast_to(h.mu, (empty.sum(), 2)), atol=1e-12)
    expect = np.sqrt(h.mu_sd**2 + h.tau_R2 + h.tau_P2 + h.tau_L2)
    np.testing.assert_allclose(post.sd[empty], np.broadcast_to(expect, (empty.sum(), 2)), rtol=1e-12)
    assert np.all(post.sd[empty] > post.sd[reg == 0].max(axis=0))


def test_single_measured_leaf_and_single_region() -> None:
    pol, rop = _tree(2, 2, 3)
    G = pol.size
    phi = np.full((G, 2), np.nan)
    var = np.full((G, 2), np.nan)
    meas = np.zeros(G, dtype=bool)
    meas[4] = True
    phi[4], var[4] = [0.1, -0.2], [0.004, 0.009]
    post = fit_posteriors(phi, var, meas, pol, rop)
    assert post.n_measured == 1
    np.testing.assert_allclose(post.mean, np.broadcast_to([0.1, -0.2], (G, 2)))
    np.testing.assert_allclose(post.sd, np.broadcast_to(np.sqrt([0.004, 0.009]), (G, 2)))
    assert "single measured leaf" in post.hyper.fallback[0]
    # Two leaves of one parent in one region: only the leaf level is estimable.
    meas[5] = True
    phi[5], var[5] = [0.3, 0.0], [0.004, 0.009]
    post = fit_posteriors(phi, var, meas, pol, rop)
    h = post.hyper
    assert h.identified_L and not h.identified_P and not h.identified_R
    np.testing.assert_array_equal(h.tau_R2, 0.0)
    np.testing.assert_array_equal(h.tau_P2, 0.0)
    assert (h.tau_L2 > 0).all() and np.isfinite(post.sd).all()


def test_interval() -> None:
    phi, var, meas, pol, rop = _small_case(5)
    post = fit_posteriors(phi, var, meas, pol, rop)
    assert isinstance(post, Posteriors)
    lo, hi = post.interval(0.9)
    np.testing.assert_allclose(hi - post.mean, 1.6448536269514722 * post.sd)
    np.testing.assert_allclose(post.mean - lo, hi - post.mean)
    with pytest.raises(ValueError, match="level"):
        post.interval(1.0)


def test_fit_posteriors_rejects_bad_input() -> None:
    phi, var, meas, pol, rop = _small_case(6)
    with pytest.raises(ValueError, match="no measured leaves"):
        fit_posteriors(phi, var, np.zeros_like(meas), pol, rop)
    i = int(np.flatnonzero(meas)[2])
    bad = phi.copy()
    bad[i, 1] = np.nan
    with pytest.raises(ValueError, match=rf"phi_hat\[{i}, 1\].*measured leaf"):
        fit_posteriors(bad, var, meas, pol, rop)
    bad = var.copy()
    bad[i, 0] = -1.0
    with pytest.raises(ValueError, match=rf"phi_var\[{i}, 0\]"):
        fit_posteriors(phi, bad, meas, pol, rop)
    with pytest.raises(ValueError, match="phi_var has shape"):
        fit_posteriors(phi, var[:, :1], meas, pol, rop)
    with pytest.raises(ValueError, match="measured must be"):
        fit_posteriors(phi, var, meas.astype(int), pol, rop)
    bad_pol = pol.copy()
    bad_pol[3] = rop.size
    with pytest.raises(ValueError, match=r"parent_of_leaf\[3\]"):
        fit_posteriors(phi, var, meas, bad_pol, rop)
    with pytest.raises(ValueError, match="parent_of_leaf has shape"):
        fit_posteriors(phi, var, meas, pol[:-1], rop)
    with pytest.raises(ValueError, match="integer"):
        fit_posteriors(phi, var, meas, pol.astype(float), rop)
    with pytest.raises(ValueError, match="parent_share"):
        fit_posteriors(phi, var, meas, pol, rop, parent_share=1.5)


# --------------------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------------------


def test_scale_smoke_twenty_thousand_leaves() -> None:
    rng = np.random.default_rng(0)
    G, D, per_parent = 20_000, 57, 8
    pol, _ = _tree(1, G // per_parent, per_parent)
    rop = np.sort(rng.integers(0, 50, size=G // per_parent))
    theta = (
        rng.normal(0, 0.05, (50, D))[rop][pol]
        + rng.normal(0, 0.04, (G // per_parent, D))[pol]
        + rng.normal(0, 0.03, (G, D))
    )
    meas = np.zeros(G, dtype=bool)
    meas[0::per_parent] = meas[1::per_parent] = True
    var = rng.uniform(0.002, 0.01, (G, D))
    phi = np.where(meas[:, None], theta + rng.normal(size=(G, D)) * np.sqrt(var), np.nan)
    t0 = time.perf_counter()
    post = fit_posteriors(phi, var, meas, pol, rop)
    elapsed = time.perf_counter() - t0
    print(f"fit_posteriors G={G} D={D} measured={int(meas.sum())}: {elapsed:.2f} s")
    assert post.mean.shape == post.sd.shape == (G, D)
    assert np.isfinite(post.mean).all() and np.isfinite(post.sd).all() and (post.sd > 0).all()
    assert post.hyper.converged.all()


def test_two_measured_leaves_keep_variances_bounded():
    """With two measured leaves the penalised likelihood rises without bound; variances stop at 1."""
    parent_of_leaf = np.array([0, 0, 1, 1, 2, 2])
    region_of_parent = np.array([0, 0, 1])
    phi = np.full((6, 2), np.nan)
    var = np.full((6, 2), np.nan)
    measured = np.zeros(6, dtype=bool)
    measured[[0, 2]] = True
    phi[[0, 2]] = [[-0.05, 0.0], [0.0, 0.025]]
    var[[0, 2]] = 1e-4
    post = fit_posteriors(phi, var, measured, parent_of_leaf, region_of_parent)
    assert np.isfinite(post.mean).all() and np.isfinite(post.sd).all()
    for name in ("tau_R2", "tau_P2", "tau_L2"):
        assert (np.asarray(getattr(post.hyper, name)) <= 1.0 + 1e-12).all()
    assert post.sd.max() <= 2.0
