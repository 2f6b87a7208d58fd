"""Stage 1a of HARP: the large region -> parent -> leaf hierarchy over L2-normalised embeddings.

Leaves are the unit that is measured (finetuned on) and selected, so they must partition the pool, keep
a stable identity when the pool grows, and be reproducible for a seed. Everything here is plain
numpy + faiss so the Dagster assets stay thin wrappers around it.

Sizing rule (``round`` is round-half-up, every count is also capped at the number of rows it splits):

- regions: ``ceil(n / (leaf_size * leaves_per_parent * parents_per_region))``, at least 1;
- parents inside a region of ``m`` rows: ``round(m / (leaf_size * leaves_per_parent))`` clamped to
  ``[1, 2 * parents_per_region]``;
- leaves inside a parent of ``m`` rows: ``round(m / leaf_size)`` clamped to ``[1, 2 * leaves_per_parent]``.

k-means may return fewer clusters than asked: empty ones are dropped and ones under ``min_leaf_size``
rows are merged into their nearest sibling.

The upper clamps keep the tree's fan-out bounded when k-means makes an unbalanced cluster, so that the
share of leaves measured per parent stays near ``n_representatives / leaves_per_parent``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

from harp.io import write_npz
from harp.method.ann import faiss_gpu_available
from harp.validate import check_int

__all__ = [
    "REPRESENTATIVE_RULES",
    "Hierarchy",
    "assign_to_nearest_leaf",
    "build_parent_leaf_hierarchy",
    "choose_representatives",
    "member_order_for",
    "normalized_embeddings",
    "validate_embeddings",
]

logger = logging.getLogger(__name__)

UseGpu = bool | Literal["auto"]

# Rows processed per block when scanning the full matrix, so temporaries stay a few tens of MB.
_BLOCK_ROWS = 32768
# faiss samples at most this many points per centroid when training (its default), which keeps the
# top-level k-means cheap on a million rows.
_MAX_POINTS_PER_CENTROID = 256
# A cluster whose mean unit vector is shorter than this has no meaningful direction (e.g. antipodal
# points); its centroid falls back to its lowest-index member.
_MIN_MEAN_NORM = 1e-6
_MAX_IDS_IN_MESSAGE = 10
# Nodes with fewer rows than this are clustered on one OpenMP thread.
_SINGLE_THREAD_ROWS = 50_000
# k-means++ seeding gives more even leaves than uniform seeding at little cost for the small k used
# per node; faiss builds without it fall back to uniform seeding.
_KMEANS_PLUS_PLUS = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)


# --------------------------------------------------------------------------------------------------
# Input validation and normalisation
# --------------------------------------------------------------------------------------------------


def _describe_rows(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:_MAX_IDS_IN_MESSAGE])
    more = f", ... ({rows.size} rows in total)" if rows.size > _MAX_IDS_IN_MESSAGE else ""
    return f"[{shown}{more}]"


def _validated_with_norms(X: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return the float32 C-contiguous matrix and its row norms (float64)."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dim), got shape {arr.shape}")
    n, d = arr.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name} is empty: shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        X32 = np.ascontiguousarray(arr, dtype=np.float32)
    norms = np.empty(n, dtype=np.float64)
    bad: list[np.ndarray] = []
    for start in range(0, n, _BLOCK_ROWS):
        block = X32[start : start + _BLOCK_ROWS]
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad.append(start + np.flatnonzero(~finite))
        b64 = block.astype(np.float64)
        norms[start : start + block.shape[0]] = np.sqrt(np.einsum("ij,ij->i", b64, b64))
    problems = []
    if bad:
        rows = np.concatenate(bad)
        converted = "" if arr.dtype == np.float32 else " (after conversion to float32)"
        problems.append(f"{rows.size} row(s) contain NaN or inf{converted}: rows {_describe_rows(rows)}")
    zero = np.flatnonzero(norms == 0.0)
    if zero.size:
        problems.append(f"{zero.size} row(s) are all zeros and cannot be normalised: rows {_describe_rows(zero)}")
    if problems:
        raise ValueError(f"{name}: " + "; ".join(problems))
    return X32, norms


def validate_embeddings(X: Any, *, name: str = "X_feat") -> np.ndarray:
    """Return ``X`` as a float32 C-contiguous 2-D array, rejecting rows that cannot be normalised.

    No copy is made when ``X`` already is float32 and C-contiguous. Raises ``ValueError`` naming the
    offending row indices for non-finite or all-zero rows.
    """
    return _validated_with_norms(X, name)[0]


def normalized_embeddings(X: Any, *, name: str = "X_feat") -> np.ndarray:
    """Validate ``X`` and return an L2-normalised float32 copy (norms computed in float64)."""
    X32, norms = _validated_with_norms(X, name)
    # Normalise in place when validation already had to copy; never write into the caller's array.
    owned = X32 is not X and not np.may_share_memory(X32, np.asarray(X))
    out = X32 if owned else np.empty_like(X32)
    for start in range(0, X32.shape[0], _BLOCK_ROWS):
        stop = start + _BLOCK_ROWS
        out[start:stop] = X32[start:stop] / norms[start:stop, None]
    return out


# --------------------------------------------------------------------------------------------------
# The hierarchy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """A partition of the pool into leaves, grouped into parents and large regions.

    Ids are dense and ordered by region, then parent, then leaf; inside each level clusters are
    numbered by their lowest member row index, so the numbering does not depend on k-means internals.
    Centroids are the normalised means of the member rows. Arrays are read-only.
    """

    leaf_of: np.ndarray  # (n,) int32: leaf of each row
    parent_of_leaf: np.ndarray  # (G,) int32, non-decreasing
    region_of_parent: np.ndarray  # (P,) int32, non-decreasing
    leaf_centroids: np.ndarray  # (G, dim) float32, unit rows
    parent_centroids: np.ndarray  # (P, dim) float32, unit rows
    region_centroids: np.ndarray  # (R, dim) float32, unit rows
    member_order: np.ndarray  # (n,) int64: rows grouped by leaf, nearest-to-centroid first
    leaf_offsets: np.ndarray  # (G + 1,) int64: CSR offsets into member_order
    representatives: np.ndarray  # sorted int32 leaf ids chosen for measurement
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for field in (
            "leaf_of",
            "parent_of_leaf",
            "region_of_parent",
            "leaf_centroids",
            "parent_centroids",
            "region_centroids",
            "member_order",
            "leaf_offsets",
            "representatives",
        ):
            arr = getattr(self, field)
            if isinstance(arr, np.ndarray) and arr.flags.writeable:
                arr.flags.writeable = False

    @property
    def n_examples(self) -> int:
        return int(self.leaf_of.shape[0])

    @property
    def dim(self) -> int:
        return int(self.leaf_centroids.shape[1])

    @property
    def n_leaves(self) -> int:
        return int(self.parent_of_leaf.shape[0])

    @property
    def n_parents(self) -> int:
        return int(self.region_of_parent.shape[0])

    @property
    def n_regions(self) -> int:
        return int(self.region_centroids.shape[0])

    @property
    def leaf_sizes(self) -> np.ndarray:
        return np.diff(self.leaf_offsets)

    @property
    def region_of_leaf(self) -> np.ndarray:
        return self.region_of_parent[self.parent_of_leaf]

    @property
    def is_representative(self) -> np.ndarray:
        mask = np.zeros(self.n_leaves, dtype=bool)
        mask[self.representatives] = True
        return mask

    def members(self, g: int) -> np.ndarray:
        """Rows of leaf ``g``, nearest its centroid first (ties by row index)."""
        if not 0 <= g < self.n_leaves:
            raise IndexError(f"leaf id {g} out of range [0, {self.n_leaves})")
        return self.member_order[self.leaf_offsets[g] : self.leaf_offsets[g + 1]]

    def leaves_of_parent(self, p: int) -> np.ndarray:
        if not 0 <= p < self.n_parents:
            raise IndexError(f"parent id {p} out of range [0, {self.n_parents})")
        return np.flatnonzero(self.parent_of_leaf == p).astype(np.int32)

    def check(self) -> None:
        """Raise ``ValueError`` if the arrays do not describe a valid hierarchy (used on load)."""
        n, G, P, R = self.n_examples, self.n_leaves, self.n_parents, self.n_regions
        errors = []
        if self.leaf_offsets.shape != (G + 1,) or self.leaf_offsets[0] != 0 or self.leaf_offsets[-1] != n:
            errors.append("leaf_offsets must have G+1 entries from 0 to n")
        elif np.any(np.diff(self.leaf_offsets) <= 0):
            errors.append(f"empty leaves: {_describe_rows(np.flatnonzero(np.diff(self.leaf_offsets) <= 0))}")
        if self.member_order.shape != (n,) or not np.array_equal(
            np.sort(self.member_order), np.arange(n, dtype=np.int64)
        ):
            errors.append("member_order must be a permutation of the rows")
        elif self.leaf_offsets.shape == (G + 1,):
            owner = np.repeat(np.arange(G), np.diff(self.leaf_offsets))
            if not np.array_equal(self.leaf_of[self.member_order], owner):
                errors.append("member_order/leaf_offsets disagree with leaf_of")
        if G and (self.leaf_of.min() < 0 or self.leaf_of.max() >= G):
            errors.append("leaf_of holds ids outside [0, n_leaves)")
        if G and (self.parent_of_leaf.min() < 0 or self.parent_of_leaf.max() >= P):
            errors.append("parent_of_leaf holds ids outside [0, n_parents)")
        elif np.unique(self.parent_of_leaf).size != P:
            errors.append("some parent has no leaf")
        if P and (self.region_of_parent.min() < 0 or self.region_of_parent.max() >= R):
            errors.append("region_of_parent holds ids outside [0, n_regions)")
        elif np.unique(self.region_of_parent).size != R:
            errors.append("some region has no parent")
        if self.parent_centroids.shape != (P, self.dim) or self.region_centroids.shape != (R, self.dim):
            errors.append("centroid arrays have inconsistent shapes")
        reps = self.representatives
        if reps.size and (reps.min() < 0 or reps.max() >= G or np.any(np.diff(reps) <= 0)):
            errors.append("representatives must be sorted unique leaf ids")
        if errors:
            raise ValueError("invalid hierarchy: " + "; ".join(errors))

    _ARRAYS = (
        "leaf_of",
        "parent_of_leaf",
        "region_of_parent",
        "leaf_centroids",
        "parent_centroids",
        "region_centroids",
        "member_order",
        "leaf_offsets",
        "representatives",
    )

    def save_npz(self, path: str | os.PathLike[str]) -> None:
        """Write the hierarchy atomically (`harp.io.write_npz`)."""
        write_npz(path, **{k: getattr(self, k) for k in self._ARRAYS}, seed=np.int64(self.seed),
                  device=np.str_(self.device))

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> Hierarchy:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in (*cls._ARRAYS, "seed", "device") if k not in data.files]
            if missing:
                raise ValueError(f"{path}: not a saved hierarchy, missing arrays {missing}")
            h = cls(
                **{k: np.array(data[k]) for k in cls._ARRAYS},
                seed=int(data["seed"]),
                device=str(data["device"]),
            )
        try:
            h.check()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return h


# --------------------------------------------------------------------------------------------------
# k-means backend
# --------------------------------------------------------------------------------------------------


def _resolve_gpu(use_gpu: UseGpu) -> bool:
    if isinstance(use_gpu, str):
        if use_gpu != "auto":
            raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
        return faiss_gpu_available()
    if use_gpu is True:
        if not faiss_gpu_available():
            raise RuntimeError("use_gpu=True but this faiss build sees no GPU (install faiss-gpu or use 'auto')")
        return True
    if use_gpu is False:
        return False
    raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")


class _FlatIP:
    """One reusable exact inner-product index (CPU or GPU) shared by every k-means call."""

    def __init__(self, dim: int, gpu: bool) -> None:
        self.dim = dim
        self.gpu = gpu
        cpu_index = faiss.IndexFlatIP(dim)
        if gpu:
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, 0, cpu_index)
        else:
            self.index = cpu_index

    def nearest(self, centroids: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Index of the largest inner product per row; ties go to the lowest centroid index."""
        self.index.reset()
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        _, ids = self.index.search(X, 1)
        self.index.reset()
        return ids[:, 0]

    def kmeans_labels(self, X: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
        """Spherical k-means labels for the unit rows ``X``; callers keep ``k`` <= the row count."""
        m = X.shape[0]
        if k <= 1:
            return np.zeros(m, dtype=np.int64)
        # Small nodes gain nothing from OpenMP, and on a busy machine its spinning threads made the
        # build ~10x slower; the result does not depend on the thread count.
        with _faiss_threads(1 if m < _SINGLE_THREAD_ROWS else None):
            return self._kmeans_labels(X, k, seed, niter)

    def _kmeans_labels(self, X: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
        cp = faiss.ClusteringParameters()
        cp.niter = niter
        cp.seed = seed
        cp.spherical = True
        cp.max_points_per_centroid = _MAX_POINTS_PER_CENTROID
        cp.min_points_per_centroid = 1  # small clusters are expected deep in the tree; no warning
        if _KMEANS_PLUS_PLUS is not None:
            cp.init_method = _KMEANS_PLUS_PLUS
        clus = faiss.Clustering(self.dim, k, cp)
        clus.train(X, self.index)
        centroids = faiss.vector_to_array(clus.centroids).reshape(k, self.dim)
        return self.nearest(centroids, X)


@contextmanager
def _faiss_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _cluster_sums(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Float64 sum of the rows of each label, in blocks so no full copy of ``X`` is made."""
    sums = np.zeros((k, X.shape[1]), dtype=np.float64)
    for start in range(0, X.shape[0], _BLOCK_ROWS):
        lab = labels[start : start + _BLOCK_ROWS]
        perm = np.argsort(lab, kind="stable")
        sorted_lab = lab[perm]
        starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]])
        block = X[start : start + _BLOCK_ROWS][perm].astype(np.float64)
        sums[sorted_lab[starts]] += np.add.reduceat(block, starts, axis=0)
    return sums


def _merge_small_clusters(labels: np.ndarray, X: np.ndarray, min_size: int) -> np.ndarray:
    """Fold clusters under ``min_size`` rows into their most similar sibling, smallest first.

    A leaf of a handful of rows is too small to finetune on and its measured effect is mostly noise,
    so outlier clusters join the sibling whose mean direction is closest (ties: lowest label).
    """
    if min_size <= 1:
        return labels
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k)
    alive = counts > 0
    if alive.sum() <= 1 or not np.any(alive & (counts < min_size)):
        return labels
    sums = _cluster_sums(X, labels, k)
    target_of = np.arange(k)
    while alive.sum() > 1:
        small = np.flatnonzero(alive & (counts < min_size))
        if small.size == 0:
            break
        s = int(small[np.lexsort((small, counts[small]))[0]])
        others = np.flatnonzero(alive)
        others = others[others != s]
        dirs = sums[others] / np.maximum(np.linalg.norm(sums[others], axis=1), 1e-300)[:, None]
        t = int(others[np.argmax(dirs @ sums[s])])
        sums[t] += sums[s]
        counts[t] += counts[s]
        counts[s] = 0
        alive[s] = False
        target_of[target_of == s] = t
    return target_of[labels]


def _sub_seed(seed: int, *path: int) -> int:
    """A 31-bit faiss seed for one k-means call, derived from the user seed and its tree position."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0] & 0x7FFFFFFF)


def _target_count(size: int, target: int, max_count: int) -> int:
    return max(1, min(int(math.floor(size / target + 0.5)), max_count, size))


def _canonical_groups(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renumber labels of ascending rows by first appearance and group them.

    Returns (perm, offsets, labels): rows ``perm[offsets[c]:offsets[c+1]]`` form cluster ``c`` in
    ascending order. Empty clusters vanish because only labels that occur get a number.
    """
    uniq, first = np.unique(labels, return_index=True)
    remap = np.empty(int(uniq[-1]) + 1, dtype=np.int64)
    remap[uniq[np.argsort(first)]] = np.arange(uniq.size)
    new = remap[labels]
    perm = np.argsort(new, kind="stable")
    offsets = np.zeros(uniq.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(new, minlength=uniq.size), out=offsets[1:])
    return perm, offsets, new


def _unit_centroids(sums: np.ndarray, counts: np.ndarray, first_rows: np.ndarray, Xn: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(sums, axis=1)
    out = np.empty_like(sums)
    ok = norms > _MIN_MEAN_NORM * counts
    out[ok] = sums[ok] / norms[ok, None]
    if not ok.all():
        out[~ok] = Xn[first_rows[~ok]]
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------------


def member_order_for(
    leaf_of: np.ndarray, X_norm: np.ndarray, leaf_centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CSR grouping of rows by leaf, each leaf's rows by decreasing cosine to its centroid.

    Returns ``(member_order, leaf_offsets)``. Ties keep ascending row order (stable sort). Leaves with
    no row get an empty range. Used again after the pool grows and new rows join existing leaves.
    """
    leaf_of = np.asarray(leaf_of)
    if X_norm.ndim != 2 or leaf_centroids.ndim != 2 or X_norm.shape[1] != leaf_centroids.shape[1]:
        raise ValueError(
            f"X_norm {X_norm.shape} and leaf_centroids {leaf_centroids.shape} must be 2-D with equal dims"
        )
    n = X_norm.shape[0]
    G = leaf_centroids.shape[0]
    if leaf_of.shape != (n,):
        raise ValueError(f"leaf_of has shape {leaf_of.shape}, expected ({n},)")
    if n and (leaf_of.min() < 0 or leaf_of.max() >= G):
        bad = np.flatnonzero((leaf_of < 0) | (leaf_of >= G))
        raise ValueError(f"leaf_of holds ids outside [0, {G}) at rows {_describe_rows(bad)}")
    C = np.ascontiguousarray(leaf_centroids, dtype=np.float32)
    neg_score = np.empty(n, dtype=np.float32)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, n)
        neg_score[start:stop] = -np.einsum("ij,ij->i", X_norm[start:stop], C[leaf_of[start:stop]])
    order = np.lexsort((neg_score, leaf_of)).astype(np.int64)
    offsets = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(np.bincount(leaf_of, minlength=G), out=offsets[1:])
    return order, offsets


REPRESENTATIVE_RULES: tuple[str, ...] = ("central", "central_farthest")


def choose_representatives(
    leaf_centroids: Any, parent_centroids: Any, parent_of_leaf: Any, k: int, rule: str = "central"
) -> np.ndarray:
    """Sorted leaf ids measured for their parents: ``k`` per parent (all of a smaller parent's leaves).

    ``central`` (the reference): the ``k`` leaves with the largest ``cos(leaf, parent centroid)``, ties to the
    lowest id. ``central_farthest``: the ``ceil(k/2)`` most central and the ``floor(k/2)`` least central
    (farthest) leaves, so the measured leaves span the parent instead of sitting at its centre; with ``k=1``
    it is ``central``.
    """
    if rule not in REPRESENTATIVE_RULES:
        raise ValueError(f"unknown representative rule {rule!r}; valid rules are {list(REPRESENTATIVE_RULES)}")
    k = check_int(k, "n_representatives", minimum=1)
    leaf_c = np.asarray(leaf_centroids, dtype=np.float64)
    pol = np.asarray(parent_of_leaf, dtype=np.int64)
    sim = np.einsum("ij,ij->i", leaf_c, np.asarray(parent_centroids, dtype=np.float64)[pol])
    G = pol.shape[0]
    order = np.lexsort((np.arange(G), -sim, pol))
    sorted_parents = pol[order]
    start_of = np.searchsorted(sorted_parents, sorted_parents, side="left")
    rank = np.arange(G) - start_of
    if rule == "central":
        keep = rank < k
    else:
        size = np.bincount(pol, minlength=int(pol.max()) + 1 if G else 0)[sorted_parents]
        back = size - 1 - rank  # 0 for the farthest leaf of its parent
        keep = (rank < (k + 1) // 2) | (back < k // 2)
    return np.sort(order[keep]).astype(np.int32)


def _choose_representatives(
    leaf_centroids: np.ndarray, parent_centroids: np.ndarray, parent_of_leaf: np.ndarray, k: int
) -> np.ndarray:
    """The reference rule, ``choose_representatives(..., "central")`` (the name the tests use)."""
    return choose_representatives(leaf_centroids, parent_centroids, parent_of_leaf, k)


def build_parent_leaf_hierarchy(
    X_feat: Any,
    *,
    leaf_size: int = 100,
    leaves_per_parent: int = 8,
    parents_per_region: int = 8,
    n_representatives: int = 1,
    min_leaf_size: int | None = None,
    seed: int = 0,
    niter: int = 20,
    use_gpu: UseGpu = "auto",
    representative_rule: str = "central",
) -> Hierarchy:
    """Build the region -> parent -> leaf hierarchy by top-down spherical k-means (faiss).

    Rows are validated and L2-normalised (one float32 copy). Each level clusters the rows of one node
    of the level above; counts follow the module's sizing rule. Clusters k-means leaves empty are
    dropped (identical rows never split, so duplicates can yield fewer leaves than asked). At every
    level a cluster of fewer than ``min_leaf_size`` rows (default ``leaf_size // 5``, at least 1;
    1 disables this) is folded into the sibling with the most similar mean direction, so a leaf is
    smaller than that only when its whole parent is. Per parent, the ``n_representatives`` leaves
    whose centroid is closest (cosine) to the parent centroid are representatives, ties by leaf id
    (``representative_rule="central_farthest"``: see ``choose_representatives``).
    Same input, seed and faiss build give identical arrays, whatever the OpenMP thread count (CPU).
    """
    leaf_size = check_int(leaf_size, "leaf_size", minimum=1)
    leaves_per_parent = check_int(leaves_per_parent, "leaves_per_parent", minimum=1)
    parents_per_region = check_int(parents_per_region, "parents_per_region", minimum=1)
    n_representatives = check_int(n_representatives, "n_representatives", minimum=1)
    if representative_rule not in REPRESENTATIVE_RULES:
        raise ValueError(
            f"unknown representative_rule {representative_rule!r}; valid rules are {list(REPRESENTATIVE_RULES)}")
    if min_leaf_size is None:
        min_leaf_size = max(1, leaf_size // 5)
    min_leaf_size = check_int(min_leaf_size, "min_leaf_size", minimum=1)
    niter = check_int(niter, "niter", minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    gpu = _resolve_gpu(use_gpu)

    Xn = normalized_embeddings(X_feat, name="X_feat")
    n, d = Xn.shape
    backend = _FlatIP(d, gpu)
    device = "gpu" if gpu else "cpu"
    region_target = leaf_size * leaves_per_parent * parents_per_region
    parent_target = leaf_size * leaves_per_parent
    k_regions = max(1, min(math.ceil(n / region_target), n))
    logger.info(
        "hierarchy: %d rows x %d dims, %d region(s) asked, k-means on %s (faiss %s, %d threads)",
        n,
        d,
        k_regions,
        device.upper(),
        faiss.__version__,
        faiss.omp_get_max_threads(),
    )

    region_labels = backend.kmeans_labels(Xn, k_regions, _sub_seed(seed, 0), niter)
    region_labels = _merge_small_clusters(region_labels, Xn, min_leaf_size)
    r_perm, r_offsets, _ = _canonical_groups(region_labels)
    del region_labels
    n_regions = r_offsets.shape[0] - 1

    leaf_of = np.empty(n, dtype=np.int32)
    leaf_sums: list[np.ndarray] = []
    leaf_counts: list[np.ndarray] = []
    leaf_first: list[np.ndarray] = []
    parent_of_leaf: list[np.ndarray] = []
    region_of_parent: list[int] = []
    n_leaves = 0
    for r in range(n_regions):
        rows_r = r_perm[r_offsets[r] : r_offsets[r + 1]]  # ascending (stable grouping)
        Xr = Xn if rows_r.size == n else Xn[rows_r]  # a single region needs no copy
        k_p = _target_count(rows_r.size, parent_target, 2 * parents_per_region)
        p_labels = backend.kmeans_labels(Xr, k_p, _sub_seed(seed, 1, r), niter)
        p_perm, p_offsets, _ = _canonical_groups(_merge_small_clusters(p_labels, Xr, min_leaf_size))
        for p in range(p_offsets.shape[0] - 1):
            local = p_perm[p_offsets[p] : p_offsets[p + 1]]
            rows_p = rows_r[local]
            Xp = Xr if local.size == Xr.shape[0] else Xr[local]
            k_l = _target_count(rows_p.size, leaf_size, 2 * leaves_per_parent)
            l_labels = backend.kmeans_labels(Xp, k_l, _sub_seed(seed, 2, r, p), niter)
            l_perm, l_offsets, l_labels = _canonical_groups(_merge_small_clusters(l_labels, Xp, min_leaf_size))
            g = l_offsets.shape[0] - 1
            leaf_of[rows_p] = n_leaves + l_labels
            leaf_sums.append(np.add.reduceat(Xp[l_perm].astype(np.float64), l_offsets[:-1], axis=0))
            leaf_counts.append(np.diff(l_offsets))
            leaf_first.append(rows_p[l_perm[l_offsets[:-1]]])
            parent_of_leaf.append(np.full(g, len(region_of_parent), dtype=np.int32))
            region_of_parent.append(r)
            n_leaves += g

    sums = np.concatenate(leaf_sums)
    counts = np.concatenate(leaf_counts)
    firsts = np.concatenate(leaf_first)
    parent_arr = np.concatenate(parent_of_leaf)
    region_arr = np.asarray(region_of_parent, dtype=np.int32)
    leaf_centroids = _unit_centroids(sums, counts, firsts, Xn)

    n_parents = region_arr.shape[0]
    leaf_starts = np.flatnonzero(np.r_[True, parent_arr[1:] != parent_arr[:-1]])
    p_sums = np.add.reduceat(sums, leaf_starts, axis=0)
    p_counts = np.add.reduceat(counts, leaf_starts)
    p_first = np.minimum.reduceat(firsts, leaf_starts)
    parent_centroids = _unit_centroids(p_sums, p_counts, p_first, Xn)
    parent_starts = np.flatnonzero(np.r_[True, region_arr[1:] != region_arr[:-1]])
    region_centroids = _unit_centroids(
        np.add.reduceat(p_sums, parent_starts, axis=0),
        np.add.reduceat(p_counts, parent_starts),
        np.minimum.reduceat(p_first, parent_starts),
        Xn,
    )

    member_order, leaf_offsets = member_order_for(leaf_of, Xn, leaf_centroids)
    representatives = choose_representatives(leaf_centroids, parent_centroids, parent_arr, n_representatives,
                                             representative_rule)
    logger.info(
        "hierarchy: %d regions, %d parents, %d leaves (sizes %d..%d), %d representatives",
        n_regions,
        n_parents,
        n_leaves,
        int(counts.min()),
        int(counts.max()),
        representatives.size,
    )
    return Hierarchy(
        leaf_of=leaf_of,
        parent_of_leaf=parent_arr,
        region_of_parent=region_arr,
        leaf_centroids=leaf_centroids,
        parent_centroids=parent_centroids,
        region_centroids=region_centroids,
        member_order=member_order,
        leaf_offsets=leaf_offsets,
        representatives=representatives,
        seed=seed,
        device=device,
    )


def assign_to_nearest_leaf(leaf_centroids: Any, X_new: Any, *, use_gpu: UseGpu = "auto") -> np.ndarray:
    """Leaf id (int32) with the largest cosine to each row of ``X_new``; ties go to the lowest id.

    New pool rows join existing leaves this way, so leaf identity survives pool growth. Rows need not
    be normalised (scaling a row does not change its argmax) but must be finite and non-zero.
    """
    C = np.asarray(leaf_centroids)
    if C.ndim != 2 or C.shape[0] == 0:
        raise ValueError(f"leaf_centroids must be a non-empty 2-D array, got shape {C.shape}")
    C = np.ascontiguousarray(C, dtype=np.float32)
    if not np.isfinite(C).all():
        bad = np.flatnonzero(~np.isfinite(C).all(axis=1))
        raise ValueError(f"leaf_centroids: rows {_describe_rows(bad)} contain NaN or inf")
    X = validate_embeddings(X_new, name="X_new")
    if X.shape[1] != C.shape[1]:
        raise ValueError(f"X_new has {X.shape[1]} dims but leaf_centroids have {C.shape[1]}")
    backend = _FlatIP(C.shape[1], _resolve_gpu(use_gpu))
    return backend.nearest(C, X).astype(np.int32)
