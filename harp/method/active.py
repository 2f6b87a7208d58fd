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

__all__ = ["ActiveRound", "active_round_scores", "choose_active_leaves"]


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
