"""Phi posteriors: bootstrap main effects of the measured leaves, shrunk over the hierarchy to every leaf."""


import time

import dagster as dg
import numpy as np
import polars as pl

from harp import driver, store
from harp.method import active_domains
from harp.versions import base_scores_key
from harp_assets import plots
from harp_assets.base_scores import base_model_scores
from harp_assets.checking import check_result
from harp_assets.groups import SELECT
from harp_assets.hierarchy import leaf_hierarchy
from harp_assets.leaf_utilities import leaf_utilities
from harp_resources import EvaluatorResource, FinetunerResource, LineageResource, SettingsResource


def _heatmap(mean: np.ndarray, measured: np.ndarray, domains: list[str]) -> str | None:
    """A small PNG of the posterior means (leaves x domains) as markdown, or None without matplotlib."""
    plt = plots.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    lim = float(np.nanmax(np.abs(mean))) or 1.0
    im = ax.imshow(mean.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(domains)), domains, fontsize=7)
    ax.set_xlabel(f"leaf ({int(measured.sum())} measured of {measured.size})")
    fig.colorbar(im, ax=ax, label="posterior mean phi")
    return plots.png_markdown(fig, "phi heatmap")


@dg.asset(group_name=SELECT, kinds={"numpy", "parquet"}, deps=[leaf_utilities, leaf_hierarchy, base_model_scores])
def phi_posteriors(
    context: dg.AssetExecutionContext,
    finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    settings: SettingsResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    """Posterior mean and sd of every leaf's per-domain effect phi, from HARP's up-to-date measured leaves.

    HARP's leaves are the representatives and the active rounds' picks; other measured partitions (the
    exhaustive validation mode) are left out, so the posteriors never use data HARP did not pay for.
    """
    t0 = time.perf_counter()
    table = store.load_leaf_table(lineage)
    base, meta = store.load_base(lineage, base_scores_key(finetuner, evaluator))
    domains = list(meta["domains"])
    versions = store.leaf_versions(lineage, finetuner, evaluator, settings.seed)
    fresh_all, stale = store.read_measurements(lineage, versions)
    wanted = store.harp_leaves(lineage)
    fresh = {leaf: frame for leaf, frame in fresh_all.items() if leaf in wanted}
    stale = [leaf for leaf in stale if leaf in wanted]
    if not fresh:
        raise ValueError(
            "no up-to-date leaf measurements: materialise leaf_utilities for the representative leaves first "
            f"({len(stale)} stored partition(s) are stale)"
        )
    reps = set(table.leaf_ids[table.representative].tolist())
    unmeasured_reps = sorted(reps - set(fresh))
    if unmeasured_reps:
        context.log.warning(f"{len(unmeasured_reps)} representative leaves are not measured or stale: {unmeasured_reps[:10]}")
    fit = driver.fit_posteriors(table, store.aligned_correctness(fresh, table, base), base, domains,
                                n_boot=settings.n_boot, seed=settings.seed, options=settings.posterior_options())
    post = fit.posteriors
    active = active_domains(post.mean, post.sd, z=settings.z_active)
    _, version = store.load_pool_artifact(lineage)
    G, D = post.mean.shape
    leaf_ids = table.leaf_ids.tolist()
    lineage.write_table("phi_posteriors", pl.DataFrame({
        "leaf_id": np.repeat(leaf_ids, D).tolist(),
        "domain": domains * G,
        "mean": post.mean.ravel().tolist(),
        "sd": post.sd.ravel().tolist(),
        "measured": np.repeat(post.measured, D).tolist(),
        "active_domain": np.tile(active, G).tolist(),
        "pool_version": [version] * (G * D),
    }))
    store.write_posteriors(lineage, post, leaf_ids, {
        "domains": domains, "measured_leaves": sorted(fresh), "stale_leaves": stale,
        "active": active.tolist(), "pool_version": version,
    })
    md = {
        "leaves": G,
        "measured": int(post.measured.sum()),
        "inferred": int(G - post.measured.sum()),
        "stale_partitions": len(stale),
        "measured_outside_harp": len(fresh_all) - len(fresh),
        "representatives_unmeasured": len(unmeasured_reps),
        "active_domains": dg.MetadataValue.json([d for d, a in zip(domains, active, strict=True) if a]),
        "notes": dg.MetadataValue.json(list(post.hyper.fallback)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    img = _heatmap(post.mean, post.measured, domains)
    if img:
        md["phi_heatmap"] = dg.MetadataValue.md(img)
    img = plots.sd_by_source(np.asarray(post.sd), np.asarray(post.measured, dtype=bool))
    if img:
        md["posterior_sd_measured_vs_inferred"] = dg.MetadataValue.md(img)
    return dg.MaterializeResult(metadata=md)


@dg.asset_check(
    asset=phi_posteriors,
    description="Every representative leaf has stored utilities carrying the current data version, used by the fit.",
)
def representatives_measured_and_current(
    lineage: LineageResource, finetuner: FinetunerResource, evaluator: EvaluatorResource, settings: SettingsResource
) -> dg.AssetCheckResult:
    """Compares each representative's stored data version with the expected one (members, model, eval, recipe, seed)."""
    table = store.load_leaf_table(lineage)
    versions = store.leaf_versions(lineage, finetuner, evaluator, settings.seed)
    reps = sorted(table.leaf_ids[table.representative].tolist())
    stored = store.stored_versions(lineage, list(reps))
    _, meta = store.load_posteriors(lineage)
    used = set(meta.get("measured_leaves", []))
    return check_result(
        {
            "unmeasured": [leaf for leaf in reps if stored[leaf] is None],
            "stale": [leaf for leaf in reps if stored[leaf] is not None and stored[leaf] != versions[leaf]],
            "not_in_posteriors": [leaf for leaf in reps if leaf not in used],
        },
        representatives=len(reps),
    )


@dg.asset_check(asset=phi_posteriors, description="Posterior means and sds are finite (sd >= 0) for every leaf and domain.")
def posteriors_finite(lineage: LineageResource) -> dg.AssetCheckResult:
    """Reads the queryable `phi_posteriors` table, the one data teams see."""
    table = store.load_leaf_table(lineage)
    post = lineage.read_table("phi_posteriors")
    bad = post.filter(~pl.col("mean").is_finite() | ~pl.col("sd").is_finite() | (pl.col("sd") < 0))
    n_dom = post["domain"].n_unique()
    covered = post.group_by("leaf_id").len()
    short = covered.filter(pl.col("len") != n_dom)["leaf_id"].to_list()
    missing = sorted(set(table.leaf_ids.tolist()) - set(covered["leaf_id"].to_list()))
    return check_result(
        {"non_finite_rows": [f"{r['leaf_id']}/{r['domain']}" for r in bad.iter_rows(named=True)],
         "leaves_missing": missing + short},
        rows=post.height,
        max_abs_mean=float(np.nanmax(np.abs(post["mean"].to_numpy()))) if post.height else 0.0,
    )


POSTERIOR_CHECKS = [representatives_measured_and_current, posteriors_finite]
