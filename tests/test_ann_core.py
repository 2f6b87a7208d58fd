"""Nearest-neighbour core: exact search agrees with numpy, IVF recall, validation, CPU-only behaviour."""

import logging

import numpy as np
import pytest

from harp.method.ann import (
    build_index,
    default_nlist,
    faiss_gpu_available,
    knn,
    to_euclidean,
)


def _data(n=600, m=25, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(size=(m, dim))


def test_exact_l2_matches_numpy():
    X, Q = _data()
    d, ids = knn(X, Q, 7)
    sq = ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    want = np.argsort(sq, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(d, np.take_along_axis(sq, want, axis=1), rtol=1e-4, atol=1e-4)
    assert ids.dtype == np.int64
    # Squared distances are returned; to_euclidean gives the Euclidean ones.
    np.testing.assert_allclose(to_euclidean(d), np.sqrt(np.take_along_axis(sq, want, axis=1)), rtol=1e-4)


def test_exact_ip_matches_numpy():
    X, Q = _data(seed=1)
    idx = build_index(X, metric="ip", use_gpu=False)
    d, ids = idx.search(Q, 5)
    ip = Q @ X.T
    want = np.argsort(-ip, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(d, np.take_along_axis(ip, want, axis=1), rtol=1e-4, atol=1e-4)


def test_to_euclidean_clips_round_off():
    np.testing.assert_array_equal(to_euclidean(np.array([-1e-7, 4.0])), [0.0, 2.0])


def test_ivf_recall_and_exhaustive_probe():
    X, Q = _data(n=2000, m=40, dim=16, seed=2)
    _, exact_ids = knn(X, Q, 10)
    idx = build_index(X, exact=False, seed=0)
    assert idx.nlist == default_nlist(2000) and not idx.exact
    _, all_ids = idx.search(Q, 10, nprobe=idx.nlist)
    np.testing.assert_array_equal(all_ids, exact_ids)
    _, some_ids = idx.search(Q, 10, nprobe=max(1, idx.nlist // 2))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(some_ids, exact_ids, strict=True)])
    assert recall >= 0.9
    # The per-call nprobe does not change the index's default.
    _, again = idx.search(Q, 10)
    _, default = build_index(X, exact=False, seed=0).search(Q, 10)
    np.testing.assert_array_equal(again, default)


def test_ivf_training_is_seeded():
    X, Q = _data(n=1200, seed=3)
    a = build_index(X, exact=False, nlist=16, seed=5, train_size=800).search(Q, 5, nprobe=2)
    b = build_index(X, exact=False, nlist=16, seed=5, train_size=800).search(Q, 5, nprobe=2)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_default_nlist_bounds():
    assert default_nlist(10) == 1
    assert default_nlist(1000) == 25  # 4 * sqrt(1000) = 126, capped at 1000 // 39
    assert default_nlist(1_000_000) == 4000


def test_validation_errors():
    X, Q = _data(n=50, m=3, dim=4)
    idx = build_index(X)
    with pytest.raises(ValueError, match="dimension 5"):
        idx.search(np.zeros((2, 5)), 3)
    with pytest.raises(ValueError, match="k=51 exceeds"):
        idx.search(Q, 51)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        idx.search(Q, 0)
    bad = Q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\[1\]"):
        idx.search(bad, 3)
    Xbad = X.copy()
    Xbad[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"data has non-finite.*\[7\]"):
        build_index(Xbad)
    with pytest.raises(ValueError, match="overflows float32"):
        build_index(np.full((3, 2), 1e300))
    with pytest.raises(ValueError, match="2-D"):
        build_index(np.zeros(5))
    with pytest.raises(ValueError, match="empty"):
        build_index(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="metric"):
        build_index(X, metric="cosine")
    with pytest.raises(ValueError, match="nlist=60 exceeds"):
        build_index(X, exact=False, nlist=60)
    with pytest.raises(ValueError, match="approximate"):
        build_index(X, nlist=4)
    with pytest.raises(ValueError, match="nprobe"):
        build_index(X, exact=False, nlist=2).search(Q, 2, nprobe=0)


def test_cpu_only_build(caplog):
    assert faiss_gpu_available() is False  # faiss-cpu here: must answer, not raise
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        build_index(np.zeros((5, 2)), use_gpu=True)
    with caplog.at_level(logging.INFO, logger="harp.ann"):
        idx = build_index(np.eye(4), use_gpu="auto")
    assert idx.on_gpu is False and idx.size == 4 and idx.dim == 4
    assert any("on CPU" in r.getMessage() for r in caplog.records)
