"""The method core end to end (hierarchy -> bootstrap -> posteriors -> envelopes -> budget), and its isolation."""

import subprocess
import sys

import numpy as np

from harp.method import (
    bootstrap_main_effects,
    build_parent_leaf_hierarchy,
    fit_posteriors,
    harp_select,
    random_selection,
    tsds_select,
)


def test_core_imports_neither_dagster_nor_torch():
    code = (
        "import sys, harp.method\n"
        "bad = [m for m in ('dagster', 'torch', 'transformers', 'polars') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the method core pulled in {out.stdout.strip()}"


def _planted_pool(seed=0, n_clusters=24, per_cluster=60, dim=32):
    """Clusters in embedding space; cluster c helps domain c % 3 when c < 6, harms it when 6 <= c < 9."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    X = np.repeat(centers, per_cluster, axis=0) + 0.05 * rng.normal(size=(n_clusters * per_cluster, dim))
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    effect = np.zeros((n_clusters, 3))
    for c in range(6):
        effect[c, c % 3] = 0.35
    for c in range(6, 9):
        effect[c, c % 3] = -0.3
    return X.astype(np.float32), cluster, effect


def test_harp_pipeline_on_planted_effects_prefers_helpful_rows():
    X, cluster, effect = _planted_pool()
    h = build_parent_leaf_hierarchy(X, leaf_size=30, leaves_per_parent=4, parents_per_region=4, n_representatives=2, seed=0)
    # Every leaf is pure here (clusters are far apart), so a leaf's true effect is its cluster's.
    leaf_cluster = np.array([np.bincount(cluster[h.members(g)]).argmax() for g in range(h.n_leaves)])
    assert all(np.unique(cluster[h.members(g)]).size == 1 for g in range(h.n_leaves))

    rng = np.random.default_rng(1)
    n_per_domain, base_p = 60, 0.4
    domain_of_eval = np.repeat(np.arange(3), n_per_domain)
    base_correct = (rng.random(domain_of_eval.size) < base_p).astype(float)
    reps = np.asarray(h.representatives)
    p_leaf = np.clip(base_p + effect[leaf_cluster[reps]][:, domain_of_eval], 0, 1)
    leaf_correct = (rng.random(p_leaf.shape) < p_leaf).astype(float)

    me = bootstrap_main_effects(leaf_correct, base_correct, domain_of_eval, n_boot=200, seed=0)
    phi, var, measured = me.to_leaves(reps, h.n_leaves)
    post = fit_posteriors(phi, var, measured, h.parent_of_leaf, h.region_of_parent)
    assert np.isfinite(post.mean).all() and (post.sd > 0).all()

    budget = 400
    helpful = effect[:, :].max(axis=1) > 0
    harmful = effect.min(axis=1) < 0
    for envelope in ("conservative", "expansive"):
        sel = harp_select(
            post.mean, post.sd, me.base_score, h.member_order, h.leaf_offsets,
            envelope=envelope, top_k_points=budget,
        )
        rows = sel.example_rows
        assert 0 < rows.size <= budget and np.unique(rows).size == rows.size
        share_harmful = harmful[cluster[rows]].mean()
        assert share_harmful == 0.0, f"{envelope} picked harmful rows ({share_harmful:.2f})"
        assert helpful[cluster[rows]].mean() > 0.9
    # The baselines run on the same pool and budget; random lands at the pool's base rates.
    rnd = random_selection(X.shape[0], budget, seed=0)
    assert rnd.size == budget and helpful[cluster[rnd]].mean() < 0.5
    queries = X[cluster < 3][::20]
    ts = tsds_select(X, queries, budget, seed=0, alpha=0.5, C=5.0, sigma=0.1, K=50, K_kde=20)
    assert ts.sample.size == budget
