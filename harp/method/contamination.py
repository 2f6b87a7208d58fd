"""Pool examples that nearly duplicate an evaluation item: the contamination guard.

A selection scored on a proxy or test item that the model was trained on (or on a near copy of it) reports
memorisation, not the effect of data. Two independent signals flag a pool example `i` against an eval item `j`:

- **13-gram coverage**: with `T(x)` the lower-cased word n-grams of a text (`n` = 13 words), the share of
  the eval item's n-grams found in the example, `|T(i) & T(j)| / |T(j)|`, is at least `min_coverage`. An eval
  item shorter than `n` words counts as one gram, its whole word sequence. Coverage of the eval item (rather
  than "shares any 13-gram") keeps templated text from flagging: pools often repeat long boilerplate
  phrases that eval items share, and one shared phrase is not a copy of the item.
- **embedding cosine**: the example's embedding and the eval item's (both L2-normalised, as the embedder
  writes them) have cosine at least `cosine`.

Inputs are plain texts and matrices; both passes are linear in the pool (a hash lookup per example n-gram, and
a blocked matrix product against the eval set, which is small).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Match:
    """Pool row `row` nearly duplicates eval item `item`: by `kind` ("ngram" or "embedding"), with `score`."""

    row: int
    item: int
    kind: str
    score: float


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[k:k + n]) for k in range(len(tokens) - n + 1)}


def ngram_matches(pool_texts: Sequence[str], eval_texts: Sequence[str], *, n: int = 13,
                  min_coverage: float = 0.8) -> list[Match]:
    """For each pool text, the eval item it covers best, when that coverage is at least `min_coverage`."""
    if n < 1 or not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"n must be >= 1 and min_coverage in (0, 1], got n={n}, min_coverage={min_coverage}")
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    sizes = np.zeros(len(eval_texts), dtype=np.int64)
    short_lengths: set[int] = set()
    for j, text in enumerate(eval_texts):
        tokens = words(text)
        grams = _grams(tokens, n)
        sizes[j] = len(grams)
        if 0 < len(tokens) < n:
            short_lengths.add(len(tokens))
        for g in grams:
            index[g].append(j)
    out: list[Match] = []
    lengths = sorted({n} | short_lengths)
    for i, text in enumerate(pool_texts):
        tokens = words(text)
        hits: dict[int, int] = defaultdict(int)
        for length in lengths:
            seen = {tuple(tokens[k:k + length]) for k in range(len(tokens) - length + 1)}
            for g in seen:
                for j in index.get(g, ()):
                    hits[j] += 1
        if not hits:
            continue
        j, cover = max(((j, c / sizes[j]) for j, c in hits.items()), key=lambda t: (t[1], -t[0]))
        if cover >= min_coverage:
            out.append(Match(row=i, item=int(j), kind="ngram", score=float(cover)))
    return out


def embedding_matches(X_pool: np.ndarray, X_eval: np.ndarray, *, cosine: float = 0.98,
                      block: int = 65536) -> list[Match]:
    """For each pool row, its most similar eval item, when the cosine is at least `cosine` (unit rows)."""
    X_pool, X_eval = np.asarray(X_pool, dtype=np.float32), np.asarray(X_eval, dtype=np.float32)
    if X_pool.ndim != 2 or X_eval.ndim != 2 or X_pool.shape[1] != X_eval.shape[1]:
        raise ValueError(f"embeddings must be 2-D with one width; got {X_pool.shape} and {X_eval.shape}")
    out: list[Match] = []
    if X_eval.shape[0] == 0:
        return out
    for start in range(0, X_pool.shape[0], block):
        sims = X_pool[start:start + block] @ X_eval.T
        best = sims.argmax(axis=1)
        score = sims[np.arange(sims.shape[0]), best]
        for r in np.flatnonzero(score >= cosine):
            out.append(Match(row=start + int(r), item=int(best[r]), kind="embedding", score=float(score[r])))
    return out
