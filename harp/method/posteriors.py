"""Stage 1b: bootstrap noise of measured main effects and empirical-Bayes posteriors for every leaf.

Two steps, both plain numpy:

1. ``bootstrap_main_effects`` turns per-example correctness of the measured leaves and of the base model
   into ``phi_hat = U_d(leaf) - b_d`` and its sampling variance, by a paired bootstrap over eval examples,
   independently per domain.
2. ``fit_posteriors`` fits, per domain, the hierarchical normal model

       phi_hat[g, d] = theta[g, d] + e,           e ~ N(0, phi_var[g, d])        (measured leaves)
       theta[g, d]   = mu_d + u[r, d] + v[p, d] + w[g, d],   p = parent(g), r = region(p)
       u ~ N(0, tau_R2[d]),  v ~ N(0, tau_P2[d]),  w ~ N(0, tau_L2[d]),  flat prior on mu_d

   with the variances chosen by restricted maximum likelihood (mu integrated out; by default with a
   penalty that keeps them off zero), and returns the exact Gaussian posterior of every leaf's theta. The
   model is a tree, so one upward and one downward sweep over (measured leaves -> parents -> regions ->
   domain) gives the likelihood, its gradient and all posterior marginals in O(G * D) time; no G x G matrix
   is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "KERNEL_LENGTHSCALES",
    "Hyperparameters",
    "KernelPrior",
    "MainEffects",
    "Posteriors",
    "bootstrap_main_effects",
    "fit_kernel_posteriors",
    "fit_kernel_prior",
    "fit_posteriors",
]

_LOG_2PI = float(np.log(2.0 * np.pi))


# --------------------------------------------------------------------------------------------------------
# Bootstrap of measured main effects
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MainEffects:
    """Measured main effects of R leaves on D domains, with their bootstrap sampling variance."""

    phi_hat: np.ndarray  # (R, D) mean leaf score minus mean base score, per domain
    phi_var: np.ndarray  # (R, D) noise variance of phi_hat: the raw one, partly pooled across leaves
    phi_var_raw: np.ndarray  # (R, D) each leaf's own bootstrap variance, floored at var_floor
    pool_weight: np.ndarray  # (D,) weight of the domain's mean raw variance in phi_var
    base_score: np.ndarray  # (D,) b_d, the base model's mean score per domain
    leaf_score: np.ndarray  # (R, D) U_d(leaf), the leaf adapter's mean score per domain
    n_eval: np.ndarray  # (D,) eval examples per domain
    var_floor: np.ndarray  # (D,) the floor applied to phi_var
    n_boot: int
    seed: int

    def to_leaves(self, leaf_ids: Any, n_leaves: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scatter the R measured rows into (G, D) arrays for ``fit_posteriors``; other rows are NaN."""
        ids = np.asarray(leaf_ids)
        R, D = self.phi_hat.shape
        if ids.shape != (R,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"leaf_ids must be ({R},) integers, one per measured row; got {ids.dtype}{ids.shape}")
        if R and (ids.min() < 0 or ids.max() >= n_leaves):
            raise ValueError(f"leaf_ids hold ids outside [0, {n_leaves})")
        if np.unique(ids).size != R:
            raise ValueError("leaf_ids repeat a leaf: each measured leaf must appear once")
        phi = np.full((n_leaves, D), np.nan)
        var = np.full((n_leaves, D), np.nan)
        measured = np.zeros(n_leaves, dtype=bool)
        phi[ids] = self.phi_hat
        var[ids] = self.phi_var
        measured[ids] = True
        return phi, var, measured


def _as_scores(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}{list(pos)} = {float(arr[pos])!r}: scores must be finite and in [0, 1]")
    return arr


def bootstrap_main_effects(
    leaf_correct: Any,
    base_correct: Any,
    domain_of_eval: Any,
    *,
    n_domains: int | None = None,
    n_boot: int = 200,
    seed: int = 0,
    min_discordant: float = 0.5,
    pool_examples: float = 100.0,
) -> MainEffects:
    """Per-domain main effects of measured leaves and their paired-bootstrap variance.

    The bootstrap is *paired*: one resample of a domain's eval examples is applied to the leaf and to the
    base model alike, because both are scored on the same examples. Example difficulty then cancels in the
    difference, and the variance is that of the mean of per-example differences, not the (much larger) sum
    of two independent variances. Domains are resampled independently, each from its own child seed of
    ``seed``, so a domain's variance depends only on its own examples (adding examples to one domain leaves
    the others unchanged). ``phi_var`` is floored at ``min_discordant / n_d**2`` per domain: the variance the
    mean difference would have if ``min_discordant`` of the ``n_d`` examples disagreed; without it a domain
    where leaf and base agree on every example (every resample equal) would claim zero noise.

    A leaf's own bootstrap variance rests on the few examples where leaf and base disagree, so with tens of
    examples per domain it is itself very noisy, and inverse-variance weighting then trusts the leaves whose
    noise happened to be underestimated. ``phi_var`` therefore moves each leaf's variance toward the mean over
    the R leaves of its domain, with weight ``pool_examples / (n_d + pool_examples)``: a prior worth
    ``pool_examples`` eval examples, which fades as the domain's eval set grows. ``pool_examples=0`` keeps
    the raw per-leaf variances (also returned as ``phi_var_raw``).
    """
    leaf = _as_scores(leaf_correct, "leaf_correct", 2)
    base = _as_scores(base_correct, "base_correct", 1)
    dom = np.asarray(domain_of_eval)
    R, n = leaf.shape
    if base.shape != (n,):
        raise ValueError(f"base_correct has shape {base.shape}; leaf_correct has {n} eval columns")
    if dom.shape != (n,):
        raise ValueError(f"domain_of_eval has shape {dom.shape}; leaf_correct has {n} eval columns")
    if not np.issubdtype(dom.dtype, np.integer):
        raise ValueError(f"domain_of_eval must hold integer domain ids, got dtype {dom.dtype}")
    if n == 0:
        raise ValueError("no eval examples: leaf_correct has 0 columns")
    if R == 0:
        raise ValueError("no measured leaves: leaf_correct has 0 rows")
    if int(dom.min()) < 0:
        i = int(np.argmin(dom))
        raise ValueError(f"domain_of_eval[{i}] = {int(dom[i])} is negative")
    if n_domains is None:
        D = int(dom.max()) + 1
    else:
        D = int(n_domains)
        if int(dom.max()) >= D:
            i = int(np.argmax(dom))
            raise ValueError(f"domain_of_eval[{i}] = {int(dom[i])} is outside [0, n_domains={D})")
    if int(n_boot) < 2:
        raise ValueError(f"n_boot must be >= 2 to estimate a variance, got {n_boot}")
    if not pool_examples >= 0:
        raise ValueError(f"pool_examples must be >= 0, got {pool_examples}")
    if not min_discordant > 0:
        raise ValueError(f"min_discordant must be > 0, got {min_discordant}")
    n_boot = int(n_boot)

    order = np.argsort(dom, kind="stable")
    n_eval = np.bincount(dom, minlength=D)
    empty = np.flatnonzero(n_eval == 0)
    if empty.size:
        raise ValueError(f"domain(s) {empty.tolist()[:10]} have no eval examples; cannot measure them")
    starts = np.concatenate([[0], np.cumsum(n_eval)])

    phi_hat = np.empty((R, D))
    raw_var = np.empty((R, D))
    leaf_score = np.empty((R, D))
    base_score = np.empty(D)
    var_floor = min_discordant / n_eval.astype(np.float64) ** 2
    children = np.random.SeedSequence(int(seed)).spawn(D)
    for d in range(D):  # a loop over domains only; leaves and resamples are vectorised
        idx = order[starts[d] : starts[d + 1]]
        n_d = idx.size
        leaf_d = leaf[:, idx]
        base_d = base[idx]
        diff = leaf_d - base_d  # (R, n_d): the paired per-example differences
        leaf_score[:, d] = leaf_d.mean(axis=1)
        base_score[d] = base_d.mean()
        phi_hat[:, d] = diff.mean(axis=1)
        rng = np.random.default_rng(children[d])
        draws = rng.integers(0, n_d, size=(n_boot, n_d))
        # Resample b draws example i counts[b, i] times; the resampled mean is then a matrix product.
        counts = np.bincount((draws + (np.arange(n_boot) * n_d)[:, None]).ravel(), minlength=n_boot * n_d)
        boot = diff @ counts.reshape(n_boot, n_d).T.astype(np.float64) / n_d  # (R, n_boot)
        raw_var[:, d] = np.maximum(boot.var(axis=1, ddof=1), var_floor[d])
    pool = pool_examples / (n_eval + pool_examples)
    phi_var = (1.0 - pool) * raw_var + pool * raw_var.mean(axis=0)
    return MainEffects(
        phi_hat=phi_hat,
        phi_var=phi_var,
        phi_var_raw=raw_var,
        pool_weight=pool,
        base_score=base_score,
        leaf_score=leaf_score,
        n_eval=n_eval,
        var_floor=var_floor,
        n_boot=n_boot,
        seed=int(seed),
    )


# --------------------------------------------------------------------------------------------------------
# Hierarchical normal model
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Hyperparameters:
    """Per-domain empirical-Bayes estimates and what the measurement design could identify."""

    mu: np.ndarray  # (D,) posterior mean of mu_d (its GLS estimate)
    mu_sd: np.ndarray  # (D,) posterior sd of mu_d
    tau_R2: np.ndarray  # (D,) region-level variance
    tau_P2: np.ndarray  # (D,) parent-level variance
    tau_L2: np.ndarray  # (D,) leaf-level variance
    loglik: np.ndarray  # (D,) restricted log-likelihood at the estimate (without the boundary penalty)
    n_iter: np.ndarray  # (D,) Newton iterations used
    converged: np.ndarray  # (D,) bool
    identified_L: bool  # some parent has >= 2 measured leaves: tau_L2 separate from tau_P2
    identified_P: bool  # some region has >= 2 measured parents: tau_P2 separate from tau_R2
    identified_R: bool  # >= 2 regions hold measured leaves: tau_R2 separate from mu
    fallback: tuple[str, ...]  # human-readable notes on every level that could not be identified
    parent_share: float  # share of the leaf+parent variance given to parents when not identified
    boundary_prior: bool  # whether the variances are penalised away from 0 (see fit_posteriors)


@dataclass(frozen=True, eq=False)
class Posteriors:
    """Posterior mean and sd of theta[g, d] for every leaf g and domain d."""

    mean: np.ndarray  # (G, D)
    sd: np.ndarray  # (G, D)
    measured: np.ndarray  # (G,) bool
    hyper: Hyperparameters
    n_measured: int

    def interval(self, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Central credible interval (lower, upper), each (G, D), at the given level."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        return self.mean - z * self.sd, self.mean + z * self.sd


class _Tree:
    """The measured part of the hierarchy, sorted by (region, parent) so levels sum with ``reduceat``."""

    def __init__(self, leaf_ids: np.ndarray, parent_of_leaf: np.ndarray, region_of_parent: np.ndarray):
        parents = parent_of_leaf[leaf_ids]
        regions = region_of_parent[parents]
        order = np.lexsort((leaf_ids, parents, regions))
        self.leaf_ids = leaf_ids[order]
        parents = parents[order]
        regions = regions[order]
        new_parent = np.concatenate([[True], parents[1:] != parents[:-1]])
        self.p_start = np.flatnonzero(new_parent)  # first measured leaf of each measured parent
        self.parent_ids = parents[self.p_start]
        p_regions = regions[self.p_start]
        new_region = np.concatenate([[True], p_regions[1:] != p_regions[:-1]])
        self.r_start = np.flatnonzero(new_region)  # first measured parent of each measured region
        self.region_ids = p_regions[self.r_start]
        self.leaves_per_parent = np.diff(np.append(self.p_start, self.leaf_ids.size))
        self.parents_per_region = np.diff(np.append(self.r_start, self.parent_ids.size))


@dataclass
class _Sweep:
    loglik: np.ndarray  # (D,) restricted log-likelihood
    grad: np.ndarray  # (3, D) its gradient in (tau_R2, tau_P2, tau_L2)
    m0: np.ndarray
    V0: np.ndarray
    Eb: np.ndarray
    Vb: np.ndarray
    Ea: np.ndarray
    Va: np.ndarray
    lam: np.ndarray


def _sweep(tree: _Tree, y: np.ndarray, s: np.ndarray, theta: np.ndarray) -> _Sweep:
    """Restricted log-likelihood, its gradient and the parents' posteriors at variances ``theta`` (3, D)."""
    Rv, Pv, Lv = theta[0], theta[1], theta[2]
    # Up: measured leaves -> parents. Given a_p = mu + u_r + v_p, y_g ~ N(a_p, tau_L2 + s_g).
    lam = 1.0 / (Lv + s)
    Lam = np.add.reduceat(lam, tree.p_start, axis=0)
    ybar = np.add.reduceat(lam * y, tree.p_start, axis=0) / Lam
    r_leaf = y - np.repeat(ybar, tree.leaves_per_parent, axis=0)
    ll = -0.5 * np.log(Lv + s).sum(axis=0) - 0.5 * np.log(Lam).sum(axis=0)
    ll -= 0.5 * (lam * r_leaf**2).sum(axis=0)
    # Parents -> regions. Given b_r = mu + u_r, ybar_p ~ N(b_r, tau_P2 + 1/Lam_p).
    kap = Lam / (1.0 + Pv * Lam)
    K = np.add.reduceat(kap, tree.r_start, axis=0)
    zbar = np.add.reduceat(kap * ybar, tree.r_start, axis=0) / K
    r_par = ybar - np.repeat(zbar, tree.parents_per_region, axis=0)
    ll += 0.5 * np.log(kap).sum(axis=0) - 0.5 * np.log(K).sum(axis=0) - 0.5 * (kap * r_par**2).sum(axis=0)
    # Regions -> mu (flat prior). zbar_r ~ N(mu, tau_R2 + 1/K_r).
    rho = K / (1.0 + Rv * K)
    A = rho.sum(axis=0)
    m0 = (rho * zbar).sum(axis=0) / A
    V0 = 1.0 / A
    ll += 0.5 * np.log(rho).sum(axis=0) - 0.5 * np.log(A) - 0.5 * (rho * (zbar - m0) ** 2).sum(axis=0)
    ll -= 0.5 * (y.shape[0] - 1) * _LOG_2PI
    # Down: b_r | mu, data = (1 - B) mu + B zbar with variance tau_R2 (1 - B); then average over mu.
    B = K * Rv / (1.0 + K * Rv)
    Eb = (1.0 - B) * m0 + B * zbar
    Vb = Rv * (1.0 - B) + (1.0 - B) ** 2 * V0
    # a_p | b_r, data = (1 - C) b_r + C ybar with variance tau_P2 (1 - C).
    C = Lam * Pv / (1.0 + Lam * Pv)
    Ebp = np.repeat(Eb, tree.parents_per_region, axis=0)
    Vbp = np.repeat(Vb, tree.parents_per_region, axis=0)
    Ea = (1.0 - C) * Ebp + C * ybar
    Va = Pv * (1.0 - C) + (1.0 - C) ** 2 * Vbp
    # Score: d loglik / d tau_k = 1/2 sum over level-k nodes of prec^2 (E[resid^2 | data] - 1/prec).
    n_lp = tree.leaves_per_parent
    e_leaf = (y - np.repeat(Ea, n_lp, axis=0)) ** 2 + np.repeat(Va, n_lp, axis=0)
    grad = np.stack(
        [
            0.5 * (rho**2 * ((zbar - m0) ** 2 + V0) - rho).sum(axis=0),
            0.5 * (kap**2 * ((ybar - Ebp) ** 2 + Vbp) - kap).sum(axis=0),
            0.5 * (lam**2 * e_leaf - lam).sum(axis=0),
        ],
        axis=0,
    )
    return _Sweep(ll, grad, m0, V0, Eb, Vb, Ea, Va, lam)


def _fit_variances(
    tree: _Tree,
    y: np.ndarray,
    s: np.ndarray,
    free: np.ndarray,
    min_var: float,
    max_iter: int,
    tol: float,
    prior: float,
    max_var: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """REML variances per domain: projected Newton in log-variances with a step cap and line search.

    Working in log(tau2) keeps the three variances on one scale and lets a variance whose optimum is 0
    reach the floor in a few capped steps. The gradient is exact (one sweep); the Hessian is a forward
    difference of it (one sweep per free variance). A variance at the floor whose gradient points down is
    held there, and so is one at the ceiling ``max_var`` whose gradient points up: main effects are differences
    of scores in [0, 1], so no variance component can exceed 1, and with very few measured leaves the penalised
    likelihood can keep rising without bound (the ``log tau2`` prior outgrows the likelihood's decline). Where the Hessian is not negative definite the step is steepest ascent; every accepted step
    raises the objective, the restricted log-likelihood plus ``prior * sum(log tau2)`` over free variances.
    """
    D = y.shape[1]
    theta = np.zeros((3, D))
    n_iter = np.zeros(D, dtype=np.int64)
    if not free.any():
        return theta, _sweep(tree, y, s, theta).loglik, n_iter, np.ones(D, dtype=bool)
    spread = y.var(axis=0)
    noise = s.mean(axis=0)
    scale = spread + noise  # the data's own variance scale, for the stopping rule
    theta[free] = np.minimum(
        np.maximum(np.maximum(spread - noise, 0.25 * spread), 10.0 * min_var) / free.sum(), 0.5 * max_var
    )
    fidx = np.flatnonzero(free)
    k = fidx.size
    diag = np.arange(k)
    floor, ceiling = np.log(min_var), np.log(max_var)
    cap, h = 2.0, 1e-4  # largest log-variance step per iteration; finite-difference step
    converged = np.zeros(D, dtype=bool)
    sw = _sweep(tree, y, s, theta)
    cur_ll, cur_grad = sw.loglik + prior * np.log(theta[fidx]).sum(axis=0), sw.grad
    for it in range(1, max_iter + 1):
        act = np.flatnonzero(~converged)
        ya, sa, th = y[:, act], s[:, act], theta[:, act]
        eta = np.log(th[fidx]).T  # (n_act, k)
        ll0 = cur_ll[act]
        g = (th[fidx] * cur_grad[fidx][:, act]).T + prior  # d objective / d log(tau2)
        H = np.empty((act.size, k, k))
        for j, fj in enumerate(fidx):
            tj = th.copy()
            tj[fj] *= np.exp(h)
            H[:, :, j] = (tj[fidx] * _sweep(tree, ya, sa, tj).grad[fidx]).T + prior - g
        H = 0.5 * (H + H.transpose(0, 2, 1)) / h
        held = ((eta <= floor + 1e-9) & (g <= 0)) | ((eta >= ceiling - 1e-9) & (g >= 0))
        Hm = np.where(held[:, :, None] | held[:, None, :], 0.0, H)
        Hm[:, diag, diag] = np.where(held, -1.0, H[:, diag, diag])
        gm = np.where(held, 0.0, g)
        neg_def = np.linalg.eigvalsh(Hm).max(axis=1) < 0
        newton = -np.linalg.solve(np.where(neg_def[:, None, None], Hm, -np.eye(k)), gm[:, :, None])[:, :, 0]
        big = np.abs(gm).max(axis=1, keepdims=True)
        ascent = cap * gm / np.where(big > 0, big, 1.0)
        step = np.where(neg_def[:, None], newton, ascent)
        size = np.abs(step).max(axis=1, keepdims=True)
        step *= np.minimum(1.0, cap / np.where(size > 0, size, 1.0))
        accepted = np.zeros(act.size, dtype=bool)
        new = th.copy()
        t = 1.0
        for _ in range(40):  # halve the step, for the domains still waiting, until the likelihood rises
            pend = np.flatnonzero(~accepted)
            trial = th[:, pend].copy()
            trial[fidx] = np.clip(np.exp(eta[pend] + t * step[pend]), min_var, max_var).T
            tsw = _sweep(tree, ya[:, pend], sa[:, pend], trial)
            obj = tsw.loglik + prior * np.log(trial[fidx]).sum(axis=0)
            ok = obj >= ll0[pend] - 1e-10 * (1.0 + np.abs(ll0[pend]))  # rounding slack
            done = pend[ok]
            new[:, done] = trial[:, ok]
            cur_ll[act[done]] = obj[ok]
            cur_grad[:, act[done]] = tsw.grad[:, ok]
            accepted[done] = True
            if accepted.all():
                break
            t *= 0.5
        moved = np.abs(new - th).max(axis=0)
        theta[:, act] = new
        n_iter[act] = it
        converged[act] = moved <= tol * scale[act]
        if converged.all():
            break
    return theta, _sweep(tree, y, s, theta).loglik, n_iter, converged


def _as_index(x: Any, name: str, ndim: int = 1) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a {ndim}-D integer array, got {arr.dtype}{arr.shape}")
    return arr.astype(np.int64)


def fit_posteriors(
    phi_hat: Any,
    phi_var: Any,
    measured: Any,
    parent_of_leaf: Any,
    region_of_parent: Any,
    *,
    min_var: float = 1e-6,
    parent_share: float = 0.0,
    boundary_prior: bool = True,
    max_iter: int = 500,
    tol: float = 1e-6,
    min_measured_regions: int = 2,
) -> Posteriors:
    """Empirical-Bayes posterior of every leaf's main effect, per domain, from the measured leaves.

    ``phi_hat``/``phi_var`` are (G, D); only rows with ``measured`` are read (NaN elsewhere is fine).
    ``min_var`` floors the noise variances and the free variance components, so that no posterior
    collapses to a point. When no parent has two measured leaves, the parent and leaf variances cannot be
    told apart; their sum is estimated and ``parent_share`` of it (default 0, the conservative choice: an
    unmeasured leaf learns nothing from its measured sibling) is given to the parent level.
    ``boundary_prior`` maximises the restricted likelihood plus ``sum_k log tau_k`` (the posterior mode
    under a Gamma(2) prior on each free sd) instead of the bare likelihood: with few groups or noisy
    measurements the bare maximum often sits at tau = 0, which would make unmeasured leaves' intervals far
    too narrow; the penalty keeps each estimate about one standard error off zero.
    ``min_measured_regions`` (default 2, the reference): the region variance is fitted only when at least this
    many regions hold measured leaves, else it is 0 and carried by the level below. Two measured regions give
    one contrast, and the penalised fit then runs to its ceiling; a larger value leaves it free only with
    enough regions to estimate it.
    """
    if isinstance(min_measured_regions, bool) or int(min_measured_regions) != min_measured_regions \
            or min_measured_regions < 2:
        raise ValueError(f"min_measured_regions must be an integer >= 2, got {min_measured_regions!r}")
    if not min_var > 0:
        raise ValueError(f"min_var must be > 0, got {min_var}")
    if not 0.0 <= parent_share <= 1.0:
        raise ValueError(f"parent_share must be in [0, 1], got {parent_share}")
    phi = np.asarray(phi_hat, dtype=np.float64)
    var = np.asarray(phi_var, dtype=np.float64)
    meas = np.asarray(measured)
    pol = _as_index(parent_of_leaf, "parent_of_leaf")
    rop = _as_index(region_of_parent, "region_of_parent")
    if phi.ndim != 2:
        raise ValueError(f"phi_hat must be (G, D), got shape {phi.shape}")
    G, D = phi.shape
    if D == 0:
        raise ValueError("phi_hat has no domains (D = 0)")
    if var.shape != (G, D):
        raise ValueError(f"phi_var has shape {var.shape}, phi_hat has {(G, D)}")
    if meas.shape != (G,) or meas.dtype != np.bool_:
        raise ValueError(f"measured must be a ({G},) bool array, got {meas.dtype}{meas.shape}")
    if pol.shape != (G,):
        raise ValueError(f"parent_of_leaf has shape {pol.shape}, expected ({G},) (one parent per leaf)")
    P = rop.shape[0]
    if G and (pol.min() < 0 or pol.max() >= P):
        i = int(np.flatnonzero((pol < 0) | (pol >= P))[0])
        raise ValueError(f"parent_of_leaf[{i}] = {int(pol[i])} is outside [0, {P})")
    if P and rop.min() < 0:
        i = int(np.argmin(rop))
        raise ValueError(f"region_of_parent[{i}] = {int(rop[i])} is negative")
    leaf_ids = np.flatnonzero(meas)
    if leaf_ids.size == 0:
        raise ValueError("no measured leaves: at least one leaf must be measured to fit posteriors")
    y = phi[leaf_ids]
    s = var[leaf_ids]
    bad = ~np.isfinite(y)
    if bad.any():
        i, d = np.argwhere(bad)[0]
        raise ValueError(f"phi_hat[{int(leaf_ids[i])}, {int(d)}] = {float(y[i, d])!r} for a measured leaf: must be finite")
    bad = ~np.isfinite(s) | (s < 0)
    if bad.any():
        i, d = np.argwhere(bad)[0]
        raise ValueError(
            f"phi_var[{int(leaf_ids[i])}, {int(d)}] = {float(s[i, d])!r} for a measured leaf: must be finite and >= 0"
        )
    n_regions = int(rop.max()) + 1 if P else 0

    tree = _Tree(leaf_ids, pol, rop)
    y = phi[tree.leaf_ids]
    s = np.maximum(var[tree.leaf_ids], min_var)
    identified_L = bool((tree.leaves_per_parent >= 2).any())
    identified_P = bool((tree.parents_per_region >= 2).any())
    identified_R = tree.region_ids.size >= 2
    enough_R = tree.region_ids.size >= int(min_measured_regions)
    # A level that the design cannot separate from the one below it (or, at the top, from mu) is fixed at 0
    # while fitting, so its variance is carried by the lower level: unmeasured leaves then borrow less from
    # measured neighbours and get wider intervals, never narrower ones.
    free = np.array(
        [
            identified_P and identified_R and enough_R,
            identified_L and tree.parent_ids.size >= 2,
            leaf_ids.size >= 2,
        ]
    )
    notes: list[str] = []
    if leaf_ids.size < 2:
        notes.append("a single measured leaf: no variance component is estimable, all set to 0")
    else:
        if not identified_L:
            notes.append(
                "no parent has >= 2 measured leaves: tau_P2 + tau_L2 estimated jointly, parent share "
                f"{parent_share:g} (measure 2 leaves in some parents to separate them)"
            )
        elif not free[1]:
            notes.append("only one parent is measured: tau_P2 not estimable, carried by tau_L2")
        if not identified_R:
            notes.append("only one region is measured: tau_R2 not estimable, set to 0")
        elif not identified_P:
            notes.append("no region has >= 2 measured parents: tau_R2 not estimable, carried by the level below")
        elif not enough_R:
            notes.append(
                f"only {tree.region_ids.size} regions are measured (min_measured_regions={int(min_measured_regions)}):"
                " tau_R2 set to 0, carried by the level below")
    prior = 0.5 if boundary_prior else 0.0
    theta, loglik, n_iter, converged = _fit_variances(
        tree, y, s, free, min_var, int(max_iter), float(tol), prior
    )
    if not identified_L and leaf_ids.size >= 2:
        total = theta[2].copy()
        theta[1] = parent_share * total
        theta[2] = total - theta[1]
    sw = _sweep(tree, y, s, theta)

    Rv, Pv, Lv = theta
    Eb = np.broadcast_to(sw.m0, (n_regions, D)).copy()
    Vb = np.broadcast_to(Rv + sw.V0, (n_regions, D)).copy()
    Eb[tree.region_ids] = sw.Eb
    Vb[tree.region_ids] = sw.Vb
    Ea = Eb[rop]
    Va = Pv + Vb[rop]
    Ea[tree.parent_ids] = sw.Ea
    Va[tree.parent_ids] = sw.Va
    mean = Ea[pol]
    post_var = Lv + Va[pol]
    # Measured leaves: theta_g | a_p, y_g = (1 - W) a_p + W y_g, variance tau_L2 (1 - W),
    # W = tau_L2 / (tau_L2 + s_g); averaging over a_p's posterior adds (1 - W)^2 Var(a_p).
    W = Lv * sw.lam
    Ea_leaf = np.repeat(sw.Ea, tree.leaves_per_parent, axis=0)
    Va_leaf = np.repeat(sw.Va, tree.leaves_per_parent, axis=0)
    mean[tree.leaf_ids] = (1.0 - W) * Ea_leaf + W * y
    post_var[tree.leaf_ids] = Lv * (1.0 - W) + (1.0 - W) ** 2 * Va_leaf
    hyper = Hyperparameters(
        mu=sw.m0,
        mu_sd=np.sqrt(sw.V0),
        tau_R2=Rv.copy(),
        tau_P2=Pv.copy(),
        tau_L2=Lv.copy(),
        loglik=loglik,
        n_iter=n_iter,
        converged=converged,
        identified_L=identified_L,
        identified_P=identified_P,
        identified_R=identified_R,
        fallback=tuple(notes),
        parent_share=float(parent_share),
        boundary_prior=bool(boundary_prior),
    )
    return Posteriors(
        mean=mean, sd=np.sqrt(post_var), measured=meas.copy(), hyper=hyper, n_measured=int(leaf_ids.size)
    )


# --------------------------------------------------------------------------------------------------------
# Option: a cross-domain kernel prior over leaf centroids, the tree model on its residual
# --------------------------------------------------------------------------------------------------------

# Length scales tried, in Euclidean distance between unit centroids (0 .. 2).
KERNEL_LENGTHSCALES: tuple[float, ...] = (0.15, 0.3, 0.6, 1.2)
_KERNEL_S2_GRID = np.geomspace(1e-5, 0.25, 16)


@dataclass(frozen=True, eq=False)
class KernelPrior:
    """The shared effect ``c`` of every leaf (one value for all domains) and its fitted hyper-parameters."""

    mean: np.ndarray  # (G,) posterior mean of c at every leaf
    sd: np.ndarray  # (G,) its posterior sd
    shared_var: float  # s2: prior variance of c
    lengthscale: float  # ell of k(x, x') = exp(-|x - x'|^2 / (2 ell^2))
    resid_var: np.ndarray  # (D,) tau2_d: per-domain variance around mu_d + c
    mu: np.ndarray  # (D,) per-domain centre (inverse-variance weighted mean of the measured effects)
    loglik: float  # marginal log-likelihood at the estimate


def _kernel_loglik(K: np.ndarray, r: np.ndarray, s: np.ndarray, s2: float, tau2: np.ndarray) -> float:
    """log N(vec r; 0, s2 K (x) 11' + diag(tau2_d + s_gd)), through the per-leaf sufficient statistic."""
    N = tau2[None, :] + s
    W = (1.0 / N).sum(axis=1)
    ybar = (r / N).sum(axis=1) / W
    ll = -0.5 * (np.log(2.0 * np.pi * N).sum() + ((r - ybar[:, None]) ** 2 / N).sum())
    ll += 0.5 * np.log(2.0 * np.pi / W).sum()
    A = s2 * K + np.diag(1.0 / W)
    L = np.linalg.cholesky(A)
    z = np.linalg.solve(L, ybar)
    return float(ll - 0.5 * (z @ z) - np.log(np.diag(L)).sum() - 0.5 * ybar.size * _LOG_2PI)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)  # unit rows: |x - x'|^2 = 2 - 2 cos


def fit_kernel_prior(
    phi_hat: Any,
    phi_var: Any,
    measured: Any,
    leaf_centroids: Any,
    *,
    min_var: float = 1e-6,
    lengthscales: tuple[float, ...] = KERNEL_LENGTHSCALES,
) -> KernelPrior:
    """Empirical-Bayes fit of ``phi_hat[g, d] = mu_d + c(x_g) + e[g, d]`` over the measured leaves.

    ``c`` is one Gaussian process over the leaf centroids ``x_g`` shared by every domain (a leaf that hurts
    some domains is likely to hurt others, and so are leaves near it), ``e ~ N(0, tau2_d + phi_var)``. The
    length scale and ``s2`` maximise the marginal likelihood on a grid (``tau2_d`` by moments given ``s2``,
    then refined one domain at a time on a log grid); the likelihood needs one R x R Cholesky factor per
    point, through each leaf's inverse-variance weighted mean over domains.
    """
    phi = np.asarray(phi_hat, dtype=np.float64)
    var = np.asarray(phi_var, dtype=np.float64)
    meas = np.asarray(measured, dtype=bool)
    X = np.asarray(leaf_centroids, dtype=np.float64)
    G, D = phi.shape
    if X.ndim != 2 or X.shape[0] != G:
        raise ValueError(f"leaf_centroids must have one row per leaf ({G}), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"leaf_centroids row {int(np.argwhere(~np.isfinite(X))[0][0])} is not finite")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1.0)
    ids = np.flatnonzero(meas)
    y, s = phi[ids], np.maximum(var[ids], min_var)
    w = 1.0 / s
    mu = (w * y).sum(axis=0) / w.sum(axis=0)
    r = y - mu
    if ids.size < 3:  # fewer than three leaves carry no information on a shared covariance
        return KernelPrior(mean=np.zeros(G), sd=np.zeros(G), shared_var=0.0, lengthscale=float("nan"),
                           resid_var=np.full(D, min_var), mu=mu, loglik=float("nan"))
    d2 = _sq_dist(X[ids], X[ids])
    spread, noise = r.var(axis=0), s.mean(axis=0)

    def moments(s2: float) -> np.ndarray:
        return np.maximum(spread - noise - s2, min_var)

    best = (-np.inf, 0.0, 0.0, moments(0.0))
    for ell in lengthscales:
        K = np.exp(-d2 / (2.0 * ell**2))
        for s2 in _KERNEL_S2_GRID:
            tau = moments(float(s2))
            ll = _kernel_loglik(K, r, s, float(s2), tau)
            if ll > best[0]:
                best = (ll, float(ell), float(s2), tau)
    ll, ell, s2, tau = best
    K = np.exp(-d2 / (2.0 * ell**2))
    factors = np.geomspace(0.25, 4.0, 9)
    for _ in range(2):  # refine each tau2_d, then s2, on log grids around the current values
        for d in range(D):
            for f in factors:
                trial = tau.copy()
                trial[d] = float(np.clip(tau[d] * f, min_var, 1.0))
                got = _kernel_loglik(K, r, s, s2, trial)
                if got > ll:
                    ll, tau = got, trial
        for s2_try in _KERNEL_S2_GRID:
            got = _kernel_loglik(K, r, s, float(s2_try), tau)
            if got > ll:
                ll, s2 = got, float(s2_try)
    N = tau[None, :] + s
    Wl = (1.0 / N).sum(axis=1)
    ybar = (r / N).sum(axis=1) / Wl
    A = s2 * K + np.diag(1.0 / Wl)
    L = np.linalg.cholesky(A)
    Ks = s2 * np.exp(-_sq_dist(X, X[ids]) / (2.0 * ell**2))  # (G, R)
    alpha = np.linalg.solve(L.T, np.linalg.solve(L, ybar))
    V = np.linalg.solve(L, Ks.T)  # (R, G)
    c_var = np.maximum(s2 - (V**2).sum(axis=0), 0.0)
    return KernelPrior(mean=Ks @ alpha, sd=np.sqrt(c_var), shared_var=s2, lengthscale=ell, resid_var=tau,
                       mu=mu, loglik=ll)


def fit_kernel_posteriors(
    phi_hat: Any,
    phi_var: Any,
    measured: Any,
    parent_of_leaf: Any,
    region_of_parent: Any,
    leaf_centroids: Any,
    *,
    min_var: float = 1e-6,
    lengthscales: tuple[float, ...] = KERNEL_LENGTHSCALES,
    **tree_kw: Any,
) -> Posteriors:
    """The cross-domain kernel prior (``fit_kernel_prior``), then the tree model (``fit_posteriors``) on the
    measured effects minus the shared effect ``c``; posterior mean ``c + tree``, variance the sum of both.

    Siblings then differ by their positions, and a leaf near leaves measured harmful on some domains starts
    lower on every domain. Two stages, not one joint model: the tree ignores its covariance with ``c``,
    and a measured leaf's own data enters ``c`` too, which the tree's shrinkage of the residual corrects in
    part. The fitted kernel is described in ``hyper.fallback``.
    """
    phi = np.asarray(phi_hat, dtype=np.float64)
    meas = np.asarray(measured)
    if meas.shape != (phi.shape[0],) or meas.dtype != np.bool_:
        raise ValueError(f"measured must be a ({phi.shape[0]},) bool array, got {meas.dtype}{meas.shape}")
    kp = fit_kernel_prior(phi, phi_var, meas, leaf_centroids, min_var=min_var, lengthscales=lengthscales)
    resid = np.where(meas[:, None], phi - kp.mean[:, None], np.nan)
    tree = fit_posteriors(resid, phi_var, meas, parent_of_leaf, region_of_parent, min_var=min_var, **tree_kw)
    note = (f"kernel prior: shared variance {kp.shared_var:.3g}, length scale {kp.lengthscale:.3g}, "
            f"loglik {kp.loglik:.4g}")
    hyper = replace(tree.hyper, fallback=(*tree.hyper.fallback, note))
    return Posteriors(mean=tree.mean + kp.mean[:, None], sd=np.sqrt(tree.sd**2 + kp.sd[:, None] ** 2),
                      measured=tree.measured, hyper=hyper, n_measured=tree.n_measured)
