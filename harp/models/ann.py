"""Nearest-neighbour search with its settings: faiss on the GPU when this install can, else on the CPU.

The search itself lives in `harp.method.ann` (plain faiss); this class holds the index settings as
configuration and decides the backend once, so a run's log states which one was used.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from harp.method import ann as ann_method
from harp.method.ann import AnnIndex

log = logging.getLogger("harp.ann")

_USE_GPU = {"auto": "auto", "true": True, "false": False}


class AnnSearch(BaseModel):
    """ANN: k-nearest-neighbour search with faiss, GPU when present else CPU."""

    use_gpu: str = Field(default="auto", description="auto (GPU when faiss sees one), true or false")
    exact: bool = Field(default=True, description="exact flat index; false builds IVF-Flat")
    nlist: int | None = Field(default=None, description="IVF lists (approximate only); default ~4*sqrt(n)")
    nprobe: int | None = Field(default=None, description="IVF lists probed per query; default ~sqrt(nlist)")
    metric: str = Field(default="l2", description="l2 (squared distances) or ip (inner product)")
    seed: int = Field(default=0, description="seed of the IVF coarse k-means")
    train_size: int | None = Field(default=None, description="rows sampled to train IVF; default all")

    _backend: str | None = PrivateAttr(default=None)
    _run_log: Any = PrivateAttr(default=None)

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _check_use_gpu(cls, v: Any) -> str:
        key = str(v).strip().lower()  # Python callers may pass a bool
        if key not in _USE_GPU:
            raise ValueError(f"use_gpu must be 'auto', 'true' or 'false', got {v!r}")
        return key

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, v: str) -> str:
        if v not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {v!r}")
        return v

    def report_to(self, logger: Any) -> None:
        """Also send the backend choice to `logger` (anything with `.info`, e.g. a Dagster run's log)."""
        self._run_log = logger

    @property
    def backend(self) -> str:
        """'faiss-gpu' or 'faiss-cpu': decided (and logged) on first use, then fixed for this instance."""
        if self._backend is None:
            gpu = ann_method.faiss_gpu_available()
            want = _USE_GPU[self.use_gpu]
            if want is True and not gpu:
                raise RuntimeError(
                    "ANN resource has use_gpu='true' but this faiss install has no usable GPU "
                    "(faiss-cpu installed, or no device visible); set use_gpu='auto' or 'false'"
                )
            self._backend = "faiss-gpu" if (want is True or (want == "auto" and gpu)) else "faiss-cpu"
            why = {
                "auto": "GPU build with a visible GPU" if gpu else "no GPU faiss available",
                True: "use_gpu=true",
                False: "use_gpu=false",
            }[want]
            msg = f"ANN backend: {self._backend} ({why})"
            log.info(msg)
            if self._run_log is not None:
                self._run_log.info(msg)
        return self._backend

    def build(self, X: Any, *, exact: bool | None = None, nlist: int | None = None) -> AnnIndex:
        """Index the rows of X; `exact`/`nlist` override the configured defaults for this call."""
        exact = self.exact if exact is None else exact
        nl = (self.nlist if nlist is None else nlist) if not exact else None
        return ann_method.build_index(
            X,
            exact=exact,
            metric=self.metric,  # type: ignore[arg-type]
            nlist=nl,
            use_gpu=self.backend == "faiss-gpu",
            seed=self.seed,
            train_size=None if exact else self.train_size,
        )

    def search(
        self, index: AnnIndex, Q: Any, k: int, *, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search a built index; the configured `nprobe` applies unless one is given."""
        return index.search(Q, k, nprobe=self.nprobe if nprobe is None else nprobe)

    def knn(
        self, X: Any, Q: Any, k: int, *, exact: bool | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest rows of X for each row of Q: (distances, ids), best first; squared L2 for metric l2."""
        return self.search(self.build(X, exact=exact), Q, k, nprobe=nprobe)
