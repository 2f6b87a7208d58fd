"""TSDS baseline: the probabilities follow the README's TSDS steps, behave as the parameters say, and validate."""

import heapq
from pathlib import Path

import numpy as np
import pytest

from harp.method.tsds import tsds_probabilities, tsds_run, tsds_select

# The public TSDS toy input (1000 candidates, 10 queries, 16-d float64), kept with the tests.
TOY = Path(__file__).parent / "data" / "tsds_toy"
REF = dict(alpha=0.5, C=5.0, sigma=0.75, K=100, K_kde=100)


@pytest.fixture(scope="module")
def toy():
    return np.load(TOY / "candidates.npy"), np.load(TOY / "query_examples.npy")


def _random(n=300, m=6, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(size=(m, dim)) * 0.5


def _loop_reference(X, Q, alpha, C, sigma, K, K_kde):
    """The TSDS steps written as plain loops over brute-force float64 distances."""
    M = len(Q)
    D = np.sqrt(((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    ids = np.argsort(D, axis=1, kind="stable")[:, :K]
    d = np.take_along_axis(D, ids, axis=1)
    union = sorted(set(ids.ravel().tolist()))
    kde_of = {}
    for i in union:
        sq = sorted(float(((X[i] - X[u]) ** 2).sum()) for u in union)[:K_kde]
        kde_of[i] = 1.0 if sigma == 0 else sum(max(0.0, 1 - v / sigma**2) for v in sq)
    kde = np.vectorize(kde_of.get)(ids)
    last = [-1] * M
    heap = [(1 / kde[j, 0], 0, j) for j in range(M)]
    heapq.heapify(heap)
    cost, total, s = [0.0] * M, 0.0, None
    while heap:
        c, k, j = heapq.heappop(heap)
        s = c
        new = d[j, k + 1] * c - sum(d[j, t] / kde[j, t] for t in range(k + 1))
        total += new - cost[j]
        cost[j] = new
        if alpha / C * total >= (1 - alpha) * M:
            break
        last[j] = k
        if k < K - 2:
            heapq.heappush(heap, (c + 1 / kde[j, k + 1], k + 1, j))
    p = np.zeros(len(X))
    for j in range(M):
        given = 0.0
        for k in range(last[j] + 1):
            p[ids[j, k]] += 1 / (M * s * kde[j, k])
            given += 1 / (M * s * kde[j, k])
        p[ids[j, last[j] + 1]] += max(1 / M - given, 0.0)
    return p


@pytest.mark.parametrize(
    "alpha,sigma,expect_stop",
    [(0.5, 0.8, True), (0.9, 0.0, True), (0.05, 1.5, False), (0.3, 0.0, None)],
)
def test_matches_loop_reference(alpha, sigma, expect_stop):
    X, Q = _random(n=200, m=5, dim=6, seed=1)
    res = tsds_run(X, Q, alpha=alpha, C=2.0, sigma=sigma, K=20, K_kde=15)
    np.testing.assert_allclose(res.p, _loop_reference(X, Q, alpha, 2.0, sigma, 20, 15), rtol=0, atol=1e-12)
    if expect_stop is not None:
        assert res.stopped is expect_stop
    if expect_stop is False:  # every frontier ran out: the last level stands, last_j = K - 2 everywhere
        assert (res.last == 18).all()
    assert abs(res.p.sum() - 1) <= 1e-9


def test_sums_to_one_and_non_negative(toy):
    X, Q = toy
    for cand, qry, kw in [
        (X, Q, REF),
        (X, Q, dict(REF, alpha=0.05)),
        (*_random(n=500, m=12, dim=10, seed=4), dict(alpha=0.7, C=1.0, sigma=0.3, K=30, K_kde=10)),
        (*_random(n=120, m=40, dim=3, seed=5), dict(alpha=0.2, C=10.0, sigma=2.0, K=12, K_kde=50)),
    ]:
        p = tsds_probabilities(cand, qry, **kw)
        assert p.dtype == np.float64 and p.shape == (len(cand),)
        assert (p >= 0).all()
        assert abs(p.sum() - 1.0) <= 1e-9


def test_exact_toy_is_deterministic_and_on_prefetched(toy):
    X, Q = toy
    a = tsds_run(X, Q, **REF)
    b = tsds_probabilities(X, Q, **REF)
    np.testing.assert_array_equal(a.p, b)
    prefetched = np.zeros(len(X), dtype=bool)
    prefetched[a.neighbor_ids.ravel()] = True
    assert (a.p[~prefetched] == 0).all()
    assert (a.p > 0).sum() > len(Q)  # the mass is spread, not one candidate per query
    assert (np.diff(a.neighbor_dist, axis=1) >= 0).all()


def test_alpha_concentrates_mass(toy):
    X, Q = toy
    spread = {}
    for alpha in (0.1, 0.5, 0.9):
        p = tsds_probabilities(X, Q, **dict(REF, alpha=alpha))
        nz = p[p > 0]
        spread[alpha] = ((p > 0).sum(), float(-(nz * np.log(nz)).sum()))
    assert spread[0.1][0] > spread[0.5][0] > spread[0.9][0]
    assert spread[0.1][1] > spread[0.5][1] > spread[0.9][1]


def test_kde_discounts_near_duplicates():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8))
    Q = rng.normal(size=(6, 8)) * 0.3
    cluster = Q.mean(axis=0) + 0.05 * rng.normal(size=8) + 1e-3 * rng.normal(size=(20, 8))
    Xc = np.vstack([X, cluster])
    members = np.arange(400, 420)
    kw = dict(alpha=0.5, C=5.0, K=40, K_kde=40)
    without = tsds_probabilities(Xc, Q, sigma=0.0, **kw)[members].sum()
    with_kde = tsds_probabilities(Xc, Q, sigma=0.5, **kw)[members].sum()
    assert with_kde < 0.5 * without


def test_kde_counts_itself_and_close_neighbours():
    # Two exact duplicates and one far point: kde = 2 for the pair, 1 for the loner.
    X = np.vstack([np.zeros((2, 2)), [[10.0, 10.0]], np.full((17, 2), 50.0) + np.arange(17)[:, None]])
    Q = np.array([[0.0, 0.0], [10.0, 10.0]])
    res = tsds_run(X, Q, alpha=0.5, C=1.0, sigma=1.0, K=2, K_kde=5)
    kde = dict(zip(res.neighbor_ids.ravel().tolist(), res.neighbor_kde.ravel().tolist(), strict=True))
    assert kde[0] == kde[1] == 2.0
    assert kde[2] == 1.0
    # K_kde bounds the neighbourhood, itself included: ten copies with K_kde=4 give kde = 4, not 10 or 5.
    X = np.vstack([np.zeros((10, 2)), np.full((90, 2), 50.0) + np.arange(90)[:, None]])
    res = tsds_run(X, Q[:1], alpha=0.5, C=1.0, sigma=1.0, K=10, K_kde=4)
    assert (res.neighbor_kde == 4.0).all() and res.K_kde == 4


def test_ivf_with_full_probe_matches_exact(toy):
    X, Q = toy
    exact = tsds_probabilities(X, Q, **REF)
    approx = tsds_probabilities(X, Q, exact=False, nprobe=10**6, **REF)
    np.testing.assert_allclose(approx, exact, rtol=0, atol=1e-15)
    coarse = tsds_probabilities(X, Q, exact=False, nlist=20, nprobe=3, **REF)
    assert abs(coarse.sum() - 1) <= 1e-9


def test_stop_at_first_pop_keeps_unit_mass():
    # A huge alpha / C stops at the very first pop: each query puts its whole 1/M on its nearest candidate,
    # including queries whose nearest candidate has a different density than the one popped.
    X, Q = _random(n=200, m=8, dim=4, seed=7)
    X = np.vstack([X, X[:30] + 1e-4])  # near-duplicates make kde differ between queries' nearest neighbours
    res = tsds_run(X, Q, alpha=0.999, C=1e-3, sigma=0.5, K=20, K_kde=10)
    assert res.stopped and (res.last == -1).all()
    assert len(set(res.neighbor_kde[:, 0].tolist())) > 1
    want = np.bincount(res.neighbor_ids[:, 0], minlength=len(X)) / len(Q)
    np.testing.assert_allclose(res.p, want, atol=1e-15)


def test_single_neighbour_gives_nearest():
    X, Q = _random(n=50, m=4, seed=8)
    res = tsds_run(X, Q, alpha=0.5, C=1.0, sigma=0.0, K=1, K_kde=1)
    nearest = ((Q[:, None] - X[None]) ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_allclose(res.p, np.bincount(nearest, minlength=50) / 4, atol=1e-15)


def test_parameter_validation():
    X, Q = _random(n=100, m=3, dim=4)
    ok = dict(alpha=0.5, C=1.0, sigma=0.5, K=5, K_kde=5)
    for change, msg in [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(C=0.0), "C must be > 0"),
        (dict(sigma=-0.1), "sigma"),
        (dict(K=0), "K must be"),
        (dict(K=2.5), "K must be"),
        (dict(K=True), "K must be"),
        (dict(K_kde=0), "K_kde"),
    ]:
        with pytest.raises(ValueError, match=msg):
            tsds_probabilities(X, Q, **{**ok, **change})
    with pytest.raises(ValueError, match="dimension 5"):
        tsds_probabilities(X, np.zeros((2, 5)), **ok)
    bad = X.copy()
    bad[42, 1] = np.nan
    with pytest.raises(ValueError, match=r"candidates has non-finite.*\[42\]"):
        tsds_probabilities(bad, Q, **ok)
    with pytest.raises(ValueError, match="approximate"):
        tsds_probabilities(X, Q, nprobe=4, **ok)
    with pytest.raises(ValueError, match="at least 10 candidates"):
        tsds_probabilities(X[:9], Q, **ok)
    with pytest.warns(UserWarning, match="K=30 exceeds N/10 for N=100"):
        res = tsds_run(X, Q, **{**ok, "K": 30})
    assert res.K == 10


def test_select_budget_and_seed(toy):
    X, Q = toy
    a = tsds_select(X, Q, 250, seed=3, **REF)
    b = tsds_select(X, Q, 250, seed=3, **REF)
    c = tsds_select(X, Q, 250, seed=4, **REF)
    assert a.sample.size == 250 and a.counts.sum() == 250
    np.testing.assert_array_equal(a.sample, b.sample)
    assert not np.array_equal(a.sample, c.sample)
    np.testing.assert_array_equal(np.bincount(a.sample, minlength=len(X)), a.counts)
    assert (a.p[a.sample] > 0).all()
    with pytest.raises(ValueError, match="budget"):
        tsds_select(X, Q, 0, **REF)


def test_k_kde_is_capped_at_a_tenth_of_the_pool():
    # 30 exact copies and 70 far points: N/10 = 10, so K_kde=25 acts as 10 and the copies' kde is 10, not 25.
    X = np.vstack([np.zeros((30, 2)), np.full((70, 2), 50.0) + np.arange(70)[:, None]])
    Q = np.zeros((1, 2))
    with pytest.warns(UserWarning, match="K_kde=25 exceeds N/10 for N=100"):
        res = tsds_run(X, Q, alpha=0.5, C=1.0, sigma=1.0, K=10, K_kde=25)
    assert res.K_kde == 10
    assert (res.neighbor_kde == 10.0).all()
    np.testing.assert_array_equal(res.p, tsds_run(X, Q, alpha=0.5, C=1.0, sigma=1.0, K=10, K_kde=10).p)


def test_tsds_queries_are_embedded_like_candidates():
    import polars as pl

    from harp import stages

    ev = pl.DataFrame({"prompt": ["2+2=", "capital of France?"], "answer_text": ["4", "Paris"]})
    assert stages.eval_item_texts(ev) == [stages.embed_text("2+2=", "4"), stages.embed_text("capital of France?", "Paris")]
    assert stages.eval_item_texts(ev)[1] == "capital of France?\nParis"
