"""The offline harness: entries written and checked, halves split per domain, variants replayed from a cache
(constructed, then one real tiny benchmark seed), and the command line."""

import numpy as np
import pytest

from benchmarks.quality import harness
from benchmarks.quality.harness import (
    CacheEntry,
    evaluate,
    load_cache_entry,
    split_halves,
    summarise,
    write_cache_entry,
)
from harp.config import HarpSettings
from harp.method.hierarchy import build_parent_leaf_hierarchy

SETTINGS = HarpSettings(leaf_size=20, leaves_per_parent=4, parents_per_region=2, n_representatives=1, n_boot=20)


def _world(tmp_path, seed=0):
    """Clustered embeddings -> a small hierarchy; each leaf helps or hurts two domains by a set amount, and
    within every parent the leaf farthest from the centre hurts, so the central representative misleads."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, 12))
    X = np.concatenate([c + 0.3 * rng.normal(size=(40, 12)) for c in centres])
    h = build_parent_leaf_hierarchy(X, leaf_size=20, leaves_per_parent=4, parents_per_region=2,
                                    n_representatives=1, seed=0, use_gpu=False)
    n_per, D = 60, 2
    dom = np.repeat(np.arange(D), n_per)
    base = (rng.random(dom.size) < 0.3).astype(np.float64)
    sim = np.einsum("ij,ij->i", h.leaf_centroids, h.parent_centroids[h.parent_of_leaf])
    effect = np.full((h.n_leaves, D), 0.25)
    for p in range(h.n_parents):
        leaves = h.leaves_of_parent(p)
        if leaves.size > 1:
            effect[leaves[np.argmin(sim[leaves])]] = -0.25
    p_correct = np.clip(0.3 + effect[:, dom], 0.0, 1.0)
    correct = (rng.random((h.n_leaves, dom.size)) < p_correct).astype(np.float64)
    path = tmp_path / f"harness-seed{seed}-test.npz"
    write_cache_entry(path, h, correct, base, dom, ["alpha", "beta"], SETTINGS, seed)
    return path, h, effect


def test_entry_round_trip_and_bad_values_are_named(tmp_path):
    path, h, _ = _world(tmp_path)
    e = load_cache_entry(path)
    assert isinstance(e, CacheEntry) and e.hierarchy.n_leaves == h.n_leaves and e.domains == ["alpha", "beta"]
    assert e.correct.shape == (h.n_leaves, 120) and e.settings.leaf_size == 20 and e.seed == 0
    with np.load(path) as z:
        arrays = dict(z)
    arrays["correct"] = arrays["correct"].copy()
    arrays["correct"][3, 7] = 2.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz: correct at leaf 3, question 7 is 2\.0"):
        load_cache_entry(bad)
    del arrays["base_correct"]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=r"missing arrays \['base_correct'\]"):
        load_cache_entry(bad)


def test_split_halves_each_domain_in_both_directions():
    dom = np.repeat([0, 1, 2], [10, 7, 4])
    splits = split_halves(dom, 3, seed=1)
    assert len(splits) == 6
    for k in range(0, 6, 2):
        a, b = splits[k]
        assert np.array_equal(splits[k + 1][0], b) and np.array_equal(splits[k + 1][1], a)
        assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(dom.size))
        assert np.bincount(dom[a], minlength=3).tolist() == [5, 3, 2]
    assert not np.array_equal(splits[0][0], splits[2][0])  # different halvings


def test_every_leaf_measured_is_the_oracle_and_central_representatives_miss_the_harm(tmp_path):
    path, h, _ = _world(tmp_path)
    e = load_cache_entry(path)
    variants = {"reference": {}, "all_leaves": {"n_representatives": 99}, "central_farthest":
                {"n_representatives": 2, "representative_rule": "central_farthest"}}
    rows = evaluate([e], variants, n_splits=2, budget_denominator=3, envelopes=("expansive",), active_runs=0,
                    active_rounds=0)
    assert len(rows) == 4 * 3
    by = {v: [r for r in rows if r["variant"] == v] for v in variants}
    # Measuring every leaf with the reference settings is exactly what the oracle does.
    assert all(r["share"] == pytest.approx(1.0) and r["runs"] == h.n_leaves for r in by["all_leaves"])
    assert all(r["oracle_gain"] > 0 for r in rows)
    ref = np.mean([r["share"] for r in by["reference"]])
    far = np.mean([r["share"] for r in by["central_farthest"]])
    assert ref < 0.95  # the unmeasured harmful siblings inherit the central leaf's help
    assert far > ref  # measuring the farthest leaf of each parent finds them
    summary = summarise(rows)
    means = [s["share_mean"] for s in summary]
    assert means == sorted(means, reverse=True) and {s["variant"] for s in summary} == set(variants)
    assert next(s for s in summary if s["variant"] == "all_leaves")["share_mean"] == pytest.approx(1.0)
    assert "| expansive | reference |" in harness.markdown(summary)


def test_cli_ranks_the_cache_and_rejects_unknown_variants(tmp_path, capsys):
    _world(tmp_path)
    out = tmp_path / "rows.json"
    assert harness.main(["--cache", str(tmp_path), "--variants", "reference,risk_expected,active_kg",
                         "--splits", "1", "--budget", "3", "--active-runs", "1", "--active-rounds", "1",
                         "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for v in ("reference", "risk_expected", "active_kg"):
        assert f"| {v} |" in table
    assert out.is_file()
    assert harness.main(["--cache", str(tmp_path), "--variants", "nope"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert harness.main(["--cache", str(tmp_path / "empty")]) == 2


@pytest.mark.slow
def test_real_tiny_benchmark_seed_replays_offline(tmp_path, torch_one_thread):
    from benchmarks.quality.run import Bench, BenchConfig
    from harp import stages
    from harp.models.embedder import Embedder
    from harp_demo.build import BaseModelConfig

    tiny = BaseModelConfig(vocab_size=600, n_layer=2, n_head=2, n_embd=64, n_positions=128, steps=150,
                           batch_size=16)
    settings = HarpSettings(leaf_size=40, leaves_per_parent=3, parents_per_region=2, n_representatives=1,
                            n_boot=20, tsds_K=10, tsds_K_kde=10)
    bench = Bench(BenchConfig(pool_size=240, seeds=(0,), denominators=(3,), main_denominator=3), tmp_path / "demo",
                  tmp_path / "out", base_model=tiny, embedder=Embedder(device="cpu", max_length=32), threads=1,
                  settings=settings)
    h = stages.build_hierarchy(bench.X, seed=0, config=settings.hierarchy_config())
    all_m, _ = bench.measure_all(h, 0)
    path = bench.write_harness_entry(h, 0, all_m)
    e = load_cache_entry(path)
    assert e.correct.shape == (h.n_leaves, bench.eval_set.height) and e.domains == bench.domains
    rows = evaluate([e], {"reference": {}, "all": {"n_representatives": 99}}, n_splits=1, budget_denominator=3,
                    envelopes=("expansive",), active_runs=0, active_rounds=0)
    assert {r["variant"] for r in rows} == {"reference", "all"} and len(rows) == 4
    for r in rows:
        if r["variant"] == "all":  # every leaf measured with the reference settings is the oracle
            assert r["gain"] == pytest.approx(r["oracle_gain"]) and r["runs"] == h.n_leaves
        else:
            assert r["runs"] == h.representatives.size
        assert np.isfinite(r["gain"]) and np.isfinite(r["oracle_gain"])
