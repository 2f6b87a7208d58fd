"""The active measuring round: which unmeasured leaves to train next, given the current posteriors.

After the representative round every other leaf's effect is inferred. A measurement changes the selection in
one of two ways: a selected leaf turns out not to help and leaves it, or an unselected leaf turns out to help
and enters it. So a round first verifies the current selection, then looks for upside:

1. unmeasured leaves of the current selection (``selected``), most uncertain first: ``sum over active d of
   sd[g, d]``. These are the leaves the selection is betting on without evidence; a harmful leaf that
   inherited a positive parent mean is caught here before it is trained on.
2. the other unmeasured leaves, by posterior sd times possible gain:

       score[g] = sum over active d of sd[g, d] * max(mean[g, d] + z * sd[g, d], 0)

   ``mean + z * sd`` is the optimistic (upper-bound) effect: a leaf that is credibly harmful or flat
   everywhere scores 0 however uncertain it is and is never picked.

On the demo benchmark, verifying first kept the validated gain of later rounds and the share of harmful
examples better than the upside rule alone (README, "The active measuring round"). When no domain is active
(nothing is credibly non-zero yet) every domain counts. Ties are broken by leaf index, so a round is
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DECISION_RULES",
    "ActiveRound",
    "active_round_scores",
    "choose_active_leaves",
    "choose_decision_leaves",
    "decision_scores",
]


@dataclass(frozen=True)
class ActiveRound:
    """The leaves picked for one round, best first, with every leaf's score (measured leaves score -inf)."""

    leaves: np.ndarray  # (k,) leaf indices, highest score first
    scores: np.ndarray  # (G,) float64
    active: np.ndarray  # (D,) bool: the domains the score summed over


def _matrix(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (leaves, domains) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        g, d = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite; leaf {g}, domain {d} holds {arr[g, d]!r}")
    return arr


def active_round_scores(
    post_mean: Any, post_sd: Any, measured: Any, active: Any = None, *, z: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, domains used)``: the module's rule for every leaf; measured leaves get ``-inf``."""
    mean = _matrix(post_mean, "post_mean")
    sd = _matrix(post_sd, "post_sd")
    if sd.shape != mean.shape:
        raise ValueError(f"post_sd shape {sd.shape} differs from post_mean shape {mean.shape}")
    if (sd < 0).any():
        g, d = np.argwhere(sd < 0)[0]
        raise ValueError(f"post_sd must be >= 0; leaf {g}, domain {d} has {sd[g, d]!r}")
    G, D = mean.shape
    done = np.asarray(measured, dtype=bool)
    if done.shape != (G,):
        raise ValueError(f"measured must have one flag per leaf ({G}), got shape {done.shape}")
    use = np.ones(D, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    if use.shape != (D,):
        raise ValueError(f"active must have one flag per domain ({D}), got shape {use.shape}")
    if not use.any():
        use = np.ones(D, dtype=bool)
    if isinstance(z, bool) or not np.isfinite(z) or z < 0:
        raise ValueError(f"z must be a finite number >= 0, got {z!r}")
    upside = np.maximum(mean[:, use] + float(z) * sd[:, use], 0.0)
    scores = (sd[:, use] * upside).sum(axis=1)
    scores[done] = -np.inf
    return scores, use


def choose_active_leaves(
    post_mean: Any,
    post_sd: Any,
    measured: Any,
    n_runs: int,
    active: Any = None,
    *,
    z: float = 1.0,
    selected: Any = None,
) -> ActiveRound:
    """Up to ``n_runs`` unmeasured leaves: the unmeasured ``selected`` leaves first (most uncertain first),
    then the others by score (fewer when fewer qualify).

    ``selected``: leaf indices of the current selection (None: no verification step). Unselected leaves
    scoring 0 (no possible gain on any counted domain) are never picked: measuring them cannot add a leaf
    to the selection. ``scores`` in the result is the upside score of every leaf.
    """
    if isinstance(n_runs, bool) or not isinstance(n_runs, int | np.integer) or n_runs < 0:
        raise ValueError(f"n_runs must be a non-negative integer, got {n_runs!r}")
    scores, use = active_round_scores(post_mean, post_sd, measured, active, z=z)
    G = scores.size
    done = np.asarray(measured, dtype=bool)
    first = np.zeros(0, dtype=np.int64)
    if selected is not None:
        sel = np.unique(np.asarray(selected, dtype=np.int64).ravel())
        if sel.size and (sel[0] < 0 or sel[-1] >= G):
            raise ValueError(f"selected holds leaf indices outside [0, {G}): {sel[(sel < 0) | (sel >= G)][:5]}")
        sel = sel[~done[sel]]
        spread = np.asarray(post_sd, dtype=np.float64)[:, use].sum(axis=1)
        first = sel[np.lexsort((sel, -spread[sel]))][: int(n_runs)]
    rest = np.lexsort((np.arange(G), -scores))
    rest = rest[(scores[rest] > 0.0) & ~np.isin(rest, first)][: int(n_runs) - first.size]
    return ActiveRound(leaves=np.concatenate([first, rest]).astype(np.int64), scores=scores, active=use)


# --------------------------------------------------------------------------------------------------------
# Options: rounds that target the selection's decision (Thompson sampling, knowledge gradient)
# --------------------------------------------------------------------------------------------------------

DECISION_RULES: tuple[str, ...] = ("thompson", "knowledge_gradient")


class _Decision:
    """The selection as a function of the effects: the greedy's kept leaves and their objective ``F``."""

    def __init__(self, base: Any, leaf_sizes: Any, envelope: str, top_k_points: int | None, active: np.ndarray):
        self.base, self.envelope, self.active = base, envelope, active
        self.sizes = np.asarray(leaf_sizes, dtype=np.int64)
        self.budget = top_k_points

    def __call__(self, phi: np.ndarray) -> tuple[np.ndarray, float]:
        from harp.method.envelopes import greedy_taskaware

        res = greedy_taskaware(phi, self.base, self.envelope, active=self.active, leaf_sizes=self.sizes,
                               budget_points=self.budget)
        kept = np.zeros(phi.shape[0], dtype=bool)
        kept[res.kept] = True
        return kept, res.objective


def decision_scores(
    post_mean: Any,
    post_sd: Any,
    measured: Any,
    base: Any,
    leaf_sizes: Any,
    *,
    envelope: str,
    top_k_points: int | None,
    rule: str,
    active: Any = None,
    n_samples: int = 32,
    seed: int = 0,
    max_candidates: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, domains used)``: how much measuring each unmeasured leaf bears on the selection.

    - ``thompson``: draw ``n_samples`` effect matrices from the posterior (leaves and domains independent,
      seeded), select under each as the envelope would, and score a leaf by the share of draws in which it is
      kept while the current selection drops it, or the reverse: the probability that its decision flips.
    - ``knowledge_gradient``: the expected rise of the selection's objective ``F`` (plug-in, under the
      updated means) when the leaf alone is measured and its effects come out at ``mean + z * sd`` on every
      domain, ``z`` over 5 Gauss-Hermite nodes; a leaf whose outcome cannot change the selection scores 0.
      Only the ``max_candidates`` unmeasured leaves with the largest summed sd are scored (5 greedy runs each).

    Measured leaves score ``-inf``.
    """
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {rule!r}; valid rules are {list(DECISION_RULES)}")
    mean = _matrix(post_mean, "post_mean")
    sd = _matrix(post_sd, "post_sd")
    _, use = active_round_scores(mean, sd, measured, active)  # the same checks and domain choice
    done = np.asarray(measured, dtype=bool)
    G = mean.shape[0]
    decide = _Decision(base, leaf_sizes, envelope, top_k_points, use)
    current, value = decide(mean)
    scores = np.zeros(G)
    if rule == "thompson":
        if isinstance(n_samples, bool) or int(n_samples) < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        rng = np.random.default_rng(int(seed))
        for _ in range(int(n_samples)):
            kept, _ = decide(mean + sd * rng.standard_normal(mean.shape))
            scores += kept != current
        scores /= int(n_samples)
    else:
        todo = np.flatnonzero(~done)
        spread = sd[:, use].sum(axis=1)
        todo = todo[np.lexsort((todo, -spread[todo]))][: int(max_candidates)]
        nodes, weights = np.polynomial.hermite_e.hermegauss(5)
        weights = weights / weights.sum()
        for g in todo.tolist():
            phi = mean.copy()
            got = 0.0
            for z, w in zip(nodes.tolist(), weights.tolist(), strict=True):
                phi[g] = mean[g] + z * sd[g]
                got += w * decide(phi)[1]
            scores[g] = got - value
    scores[done] = -np.inf
    return scores, use


def choose_decision_leaves(
    post_mean: Any,
    post_sd: Any,
    measured: Any,
    n_runs: int,
    base: Any,
    leaf_sizes: Any,
    *,
    envelope: str,
    top_k_points: int | None,
    rule: str,
    active: Any = None,
    n_samples: int = 32,
    seed: int = 0,
) -> ActiveRound:
    """Up to ``n_runs`` unmeasured leaves by ``decision_scores``, highest first (ties to the lowest index);
    a leaf scoring ``<= 1e-12`` (its measurement cannot change the selection) is never picked."""
    if isinstance(n_runs, bool) or not isinstance(n_runs, int | np.integer) or n_runs < 0:
        raise ValueError(f"n_runs must be a non-negative integer, got {n_runs!r}")
    scores, use = decision_scores(post_mean, post_sd, measured, base, leaf_sizes, envelope=envelope,
                                  top_k_points=top_k_points, rule=rule, active=active, n_samples=n_samples,
                                  seed=seed)
    order = np.lexsort((np.arange(scores.size), -scores))
    picked = order[scores[order] > 1e-12][: int(n_runs)]
    return ActiveRound(leaves=picked.astype(np.int64), scores=scores, active=use)
