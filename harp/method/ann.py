"""Nearest-neighbour search over embeddings with faiss: exact (flat) or approximate (IVF-Flat), CPU or GPU.

Plain faiss and numpy, no Dagster, so the method code (hierarchy, TSDS) and its tests can use it alone.

Distances: for ``metric="l2"`` faiss returns SQUARED Euclidean distances and so does :meth:`AnnIndex.search`;
use :func:`to_euclidean` where a caller needs the Euclidean distance itself. For ``metric="ip"`` the
"distances" are inner products (larger is closer). Both come back as float32, the precision faiss searches in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

from harp.validate import check_int, check_matrix

logger = logging.getLogger("harp.ann")

Metric = Literal["l2", "ip"]
_METRICS = ("l2", "ip")


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU; never raises."""
    try:
        if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
            return False
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # a broken CUDA runtime must read as "no GPU", not crash the caller
        return False


def to_euclidean(sq_distances: np.ndarray) -> np.ndarray:
    """Euclidean distances from faiss's squared L2 ones (tiny negative round-off is clipped to 0)."""
    return np.sqrt(np.maximum(np.asarray(sq_distances, dtype=np.float64), 0.0))


def _as_matrix(a: Any, name: str) -> np.ndarray:
    """``a`` as float32, C-contiguous and 2-D, after checking shape and finiteness (faiss needs float32)."""
    return check_matrix(a, name, np.float32)


def default_nlist(n: int) -> int:
    """About 4 * sqrt(n) inverted lists, clamped to [1, n / 39] so k-means has >= 39 points per centroid."""
    return int(max(1, min(round(4.0 * math.sqrt(n)), n // 39)))


def default_nprobe(nlist: int) -> int:
    """ceil(sqrt(nlist)) lists probed: a recall/speed middle ground; pass nprobe >= nlist for exhaustive."""
    return int(min(nlist, max(1, math.ceil(math.sqrt(nlist)))))


@dataclass
class AnnIndex:
    """A faiss index with what callers need to know about it; ``search`` validates queries first."""

    index: Any
    metric: Metric
    dim: int
    size: int
    on_gpu: bool
    exact: bool
    nlist: int | None = None
    nprobe: int | None = None
    _gpu_resources: Any = field(default=None, repr=False)

    def search(self, Q: Any, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest indexed rows for each query row, best first.

        Returns ``(distances, ids)`` of shape (len(Q), k): float32 distances (SQUARED L2 for ``metric="l2"``,
        see :func:`to_euclidean`; inner products for ``"ip"``) and int64 row ids into the indexed data.
        An IVF search that probes too few lists to find k rows pads with id -1 (distance +inf for l2).
        ``nprobe`` (IVF only) overrides the index's default and is capped at nlist (= exhaustive).
        """
        q = _as_matrix(Q, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]} but the index holds dimension {self.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise ValueError(f"k={k} exceeds the number of indexed rows ({self.size})")
        if self.exact:
            if nprobe is not None:
                logger.debug("nprobe=%s ignored: exact index", nprobe)
        else:
            probe = self.nprobe if nprobe is None else nprobe
            if isinstance(probe, bool) or not isinstance(probe, (int, np.integer)) or probe < 1:
                raise ValueError(f"nprobe must be a positive integer, got {probe!r}")
            probe = min(int(probe), int(self.nlist))
            if self.on_gpu:
                self.index.nprobe = probe  # GPU IVF indexes take nprobe as an attribute
            else:
                # Per-call parameters leave the shared index untouched (safe under concurrent searches).
                params = faiss.SearchParametersIVF(nprobe=probe)
                distances, ids = self.index.search(q, int(k), params=params)
                return distances, ids.astype(np.int64, copy=False)
        distances, ids = self.index.search(q, int(k))
        return distances, ids.astype(np.int64, copy=False)


def build_index(
    X: Any,
    *,
    exact: bool = True,
    metric: Metric = "l2",
    nlist: int | None = None,
    use_gpu: bool | Literal["auto"] = "auto",
    seed: int = 0,
    train_size: int | None = None,
) -> AnnIndex:
    """Index the rows of ``X`` (cast to float32) for k-NN search.

    ``exact=True``: IndexFlatL2 / IndexFlatIP. ``exact=False``: IVF-Flat with ``nlist`` lists (default
    :func:`default_nlist`), its coarse k-means seeded by ``seed`` and trained on all rows or, with
    ``train_size``, on a seeded random subset of that many rows. ``use_gpu``: True requires a GPU build,
    "auto" uses a GPU when :func:`faiss_gpu_available`, False stays on CPU.
    """
    x = _as_matrix(X, "data")
    n, dim = x.shape
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    gpu_ok = faiss_gpu_available()
    if use_gpu is True and not gpu_ok:
        raise RuntimeError(
            "use_gpu=True but faiss has no usable GPU (GPU build missing or no device); use use_gpu='auto'"
        )
    on_gpu = bool(use_gpu is True or (use_gpu == "auto" and gpu_ok))
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT

    nprobe = None
    if exact:
        if nlist is not None:
            raise ValueError("nlist applies to the approximate (IVF) index only; pass exact=False")
        cpu_index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        cpu_index.add(x)
    else:
        nl = default_nlist(n) if nlist is None else check_int(nlist, "nlist", minimum=1)
        if nl > n:
            raise ValueError(f"nlist={nl} exceeds the number of rows ({n}); IVF needs at least one row per list")
        train = x
        if train_size is not None:
            ts = check_int(train_size, "train_size", minimum=1)
            if ts < nl:
                raise ValueError(f"train_size={ts} is smaller than nlist={nl}")
            if ts < n:
                pick = np.sort(np.random.default_rng(seed).choice(n, size=ts, replace=False))
                train = np.ascontiguousarray(x[pick])
        quantizer = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        cpu_index = faiss.IndexIVFFlat(quantizer, dim, nl, faiss_metric)
        cpu_index.cp.seed = int(seed)
        # Training on CPU keeps the lists the same with and without a GPU for a given seed.
        cpu_index.train(train)
        cpu_index.add(x)
        nlist = nl
        nprobe = default_nprobe(nl)
        cpu_index.nprobe = nprobe

    resources = None
    index = cpu_index
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
    kind = "flat" if exact else f"IVF-Flat(nlist={nlist})"
    logger.info(
        "ANN index %s metric=%s n=%d dim=%d on %s (use_gpu=%r, GPU available=%s)",
        kind, metric, n, dim, "GPU" if on_gpu else "CPU", use_gpu, gpu_ok,
    )
    return AnnIndex(
        index=index, metric=metric, dim=dim, size=n, on_gpu=on_gpu, exact=exact,
        nlist=nlist, nprobe=nprobe, _gpu_resources=resources,
    )


def knn(X: Any, Q: Any, k: int, *, nprobe: int | None = None, **build_kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """One-shot k-NN of ``Q`` among the rows of ``X``: :func:`build_index` (``build_kw``) then search."""
    return build_index(X, **build_kw).search(Q, k, nprobe=nprobe)
