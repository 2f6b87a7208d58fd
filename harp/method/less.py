"""LESS, the train-based baseline: select the pool examples whose (Adam-preconditioned) LoRA gradient points
where the proxy examples' gradients point.

Built from its description (Xia et al., 2024), in the terms of ../docs/method.md#less-baseline:

1. Warm up a LoRA adapter on a small random subset of the pool; keep Adam's first and second moments m, v.
2. For every pool example i, the gradient g_i of its loss at the warmed-up adapter, preconditioned as the Adam
   update it would cause:  Gamma(g_i) = m' / (sqrt(v') + eps),  m' = b1 m + (1 - b1) g_i,
   v' = b2 v + (1 - b2) g_i^2  (bias corrections scale every example alike, so they drop out of the cosine).
3. For every proxy example j, its plain gradient g_j (the loss of its correct answer).
4. Both are projected to `dim` dimensions with one random sketch and normalised; the score of i is the
   highest, over domains d, of the mean cosine between Gamma(g_i) and the proxy gradients of domain d.
5. The top `budget` examples by score are the selection (ties by pool row).

The projection is a CountSketch (a sparse Johnson-Lindenstrauss transform: coordinate k goes to bucket h(k)
with sign s(k)), not the dense Gaussian matrix of the reference: inner products are preserved in expectation
alike, and it costs O(P) memory instead of O(P * dim) for P LoRA parameters (a dense 1M x 8192 matrix would
not fit on a laptop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harp.validate import check_int


@dataclass(frozen=True)
class CountSketch:
    """A seeded sparse random projection from `n_in` to `dim` coordinates."""

    buckets: np.ndarray  # (n_in,) int64 in [0, dim)
    signs: np.ndarray  # (n_in,) float32 in {-1, +1}
    dim: int

    @classmethod
    def make(cls, n_in: int, dim: int, seed: int) -> CountSketch:
        n_in = check_int(n_in, "n_in", minimum=1)
        dim = check_int(dim, "dim", minimum=1)
        rng = np.random.default_rng([seed, n_in, dim])
        return cls(buckets=rng.integers(0, dim, size=n_in, dtype=np.int64),
                   signs=np.where(rng.random(n_in) < 0.5, -1.0, 1.0).astype(np.float32), dim=dim)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(n, n_in) -> (n, dim): out[:, b] = sum over k with h(k) = b of s(k) * x[:, k]."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.buckets.size:
            raise ValueError(f"expected vectors of shape (n, {self.buckets.size}), got {x.shape}")
        out = np.zeros((x.shape[0], self.dim), dtype=np.float64)
        signed = x * self.signs[None, :]
        for r in range(x.shape[0]):
            out[r] = np.bincount(self.buckets, weights=signed[r], minlength=self.dim)
        return out


def adam_direction(grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, *, beta1: float,
                   beta2: float, eps: float) -> np.ndarray:
    """Gamma(g) = m' / (sqrt(v') + eps) with m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, row by row."""
    g = np.asarray(grads, dtype=np.float64)
    m = np.asarray(exp_avg, dtype=np.float64)
    v = np.asarray(exp_avg_sq, dtype=np.float64)
    if g.ndim != 2 or m.shape != (g.shape[1],) or v.shape != (g.shape[1],):
        raise ValueError(f"gradients {g.shape} and moments {m.shape}, {v.shape} do not line up")
    m2 = beta1 * m[None, :] + (1.0 - beta1) * g
    v2 = beta2 * v[None, :] + (1.0 - beta2) * g * g
    return m2 / (np.sqrt(v2) + eps)


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = np.flatnonzero(norms[:, 0] == 0)
        raise ValueError(f"{bad.size} {what} gradient feature(s) are all zero (first row {int(bad[0])}): "
                         "the loss has no gradient there (an empty response?)")
    return x / norms


@dataclass(frozen=True)
class LessScores:
    """Per-example LESS scores: `per_domain[i, d]` mean cosine to domain d's proxy gradients, `score` the max."""

    score: np.ndarray  # (n,)
    per_domain: np.ndarray  # (n, D)
    domains: tuple[str, ...]
    best_domain: np.ndarray  # (n,) index into domains


def less_scores(train_features: np.ndarray, proxy_features: np.ndarray, proxy_domains: Sequence[str]) -> LessScores:
    """score_i = max_d mean_{j in d} cos(train_i, proxy_j); domains in sorted order."""
    tr = _unit_rows(np.asarray(train_features, dtype=np.float64), "train")
    px = _unit_rows(np.asarray(proxy_features, dtype=np.float64), "proxy")
    if tr.shape[1] != px.shape[1]:
        raise ValueError(f"train features have {tr.shape[1]} dimensions, proxy features {px.shape[1]}")
    labels = np.asarray(list(proxy_domains), dtype=object)
    if labels.size != px.shape[0]:
        raise ValueError(f"{px.shape[0]} proxy features but {labels.size} domain labels")
    domains = tuple(sorted(set(labels.tolist())))
    per = np.stack([(tr @ px[labels == d].T).mean(axis=1) for d in domains], axis=1)
    best = per.argmax(axis=1)
    return LessScores(score=per[np.arange(per.shape[0]), best], per_domain=per, domains=domains, best_domain=best)


def less_select(score: np.ndarray, budget: int) -> np.ndarray:
    """The `budget` highest-scoring rows, best first, ties by row."""
    budget = check_int(budget, "budget", minimum=1)
    s = np.asarray(score, dtype=np.float64)
    order = np.lexsort((np.arange(s.size), -s))
    return order[: min(budget, s.size)].astype(np.int64)
