"""ANN resource: faiss backend choice, exact results against brute force, direct and inside Dagster."""

from __future__ import annotations

import logging

import dagster as dg
import numpy as np
import pytest

from harp.method.ann import faiss_gpu_available
from harp_resources import AnnResource


def _data(n: int = 400, m: int = 25, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)


def _brute(X: np.ndarray, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((Q[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, ids, axis=1), ids


def test_exact_knn_matches_brute_force():
    X, Q = _data()
    dist, ids = AnnResource().knn(X, Q, 7)
    ref_d, ref_ids = _brute(X, Q, 7)
    assert ids.shape == (len(Q), 7) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)  # squared L2


def test_ivf_exhaustive_probe_matches_brute_force_and_build_reuses():
    X, Q = _data(n=800)
    ann = AnnResource(exact=False, nlist=8, nprobe=8, seed=3)
    index = ann.build(X)
    assert not index.exact and index.nlist == 8
    _, ids = ann.search(index, Q, 5)
    np.testing.assert_array_equal(ids, _brute(X, Q, 5)[1])
    # a per-call override of exactness is honoured
    assert ann.build(X, exact=True).exact


@pytest.mark.skipif(faiss_gpu_available(), reason="this install has GPU faiss")
def test_logs_cpu_choice_once(caplog):
    X, Q = _data(n=60, m=3)
    ann = AnnResource()
    with caplog.at_level(logging.INFO, logger="harp.ann"):
        ann.knn(X, Q, 2)
        ann.knn(X, Q, 2)
    choices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ANN backend")]
    assert choices == ["ANN backend: faiss-cpu (no GPU faiss available)"]
    assert ann.backend == "faiss-cpu"
    with pytest.raises(RuntimeError, match="no usable GPU"):
        AnnResource(use_gpu="true").knn(X, Q, 2)


def test_use_gpu_values():
    assert AnnResource(use_gpu="FALSE").use_gpu == "false"
    assert AnnResource(use_gpu=True).use_gpu == "true"  # type: ignore[arg-type]
    assert AnnResource(use_gpu="false").backend == "faiss-cpu"
    with pytest.raises(ValueError, match="use_gpu"):
        AnnResource(use_gpu="sometimes")
    with pytest.raises(ValueError, match="metric"):
        AnnResource(metric="cosine")


def test_inside_dagster_asset_materialisation():
    X, Q = _data(n=200, m=10)

    @dg.asset
    def neighbours(ann: AnnResource) -> dg.MaterializeResult:
        _, ids = ann.knn(X, Q, 3)
        np.testing.assert_array_equal(ids, _brute(X, Q, 3)[1])
        return dg.MaterializeResult(metadata={"backend": ann.backend, "first": int(ids[0, 0])})

    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize([neighbours], resources={"ann": AnnResource(use_gpu="auto")}, instance=instance)
    assert res.success
    md = res.asset_materializations_for_node("neighbours")[0].metadata
    backend = "faiss-gpu" if faiss_gpu_available() else "faiss-cpu"
    assert md["backend"].value == backend
    assert md["first"].value == int(_brute(X, Q, 1)[1][0, 0])
    # the choice is also written to the run's own log (what the UI shows)
    messages = [e.user_message for e in instance.all_logs(res.run_id)]
    assert sum(m.startswith(f"ANN backend: {backend}") for m in messages) == 1
