"""Phi posteriors: bootstrap main effects of the measured leaves, shrunk over the hierarchy to every leaf."""


import base64
import dataclasses
import io
import time

import dagster as dg
import numpy as np
import polars as pl

from harp_assets import stages
from harp_assets.active_round import harp_leaves
from harp_assets.base_scores import load_base
from harp_assets.leaf_utilities import aligned_correctness, leaf_versions, read_measurements
from harp_assets.leaves import load_leaf_table
from harp_assets.method import Hyperparameters, Posteriors
from harp_assets.method.envelopes import active_domains
from harp_assets.settings import (
    GROUP,
    HarpSettings,
    artifacts_dir,
    read_json,
    write_json_atomic,
    write_npz_atomic,
)
from harp_assets.sources import load_pool_artifact
from harp_resources.finetuner import LoraFinetuner
from harp_resources.lineage_store import LineageStore

POSTERIORS_FILE = "posteriors.npz"
POSTERIORS_META = "posteriors.json"


def load_posteriors(lineage: LineageStore) -> tuple[Posteriors, dict]:
    """The persisted posteriors (rows in the leaf table's order) and their metadata."""
    out = artifacts_dir(lineage)
    meta = read_json(out / POSTERIORS_META, "phi_posteriors")
    with np.load(out / POSTERIORS_FILE, allow_pickle=False) as z:
        mean, sd, measured = z["mean"], z["sd"], z["measured"]
        leaf_ids = z["leaf_ids"].tolist()
    h = meta["hyper"]
    hyper = Hyperparameters(**{f.name: _from_json(f.name, h[f.name]) for f in dataclasses.fields(Hyperparameters)})
    meta["leaf_ids"] = leaf_ids
    return Posteriors(mean=mean, sd=sd, measured=measured, hyper=hyper, n_measured=int(measured.sum())), meta


def _from_json(name: str, value: object) -> object:
    if name == "fallback":
        return tuple(value)
    return np.asarray(value) if isinstance(value, list) else value


def _heatmap(mean: np.ndarray, measured: np.ndarray, domains: list[str]) -> str | None:
    """A small PNG of the posterior means (leaves x domains) as markdown, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    lim = float(np.nanmax(np.abs(mean))) or 1.0
    im = ax.imshow(mean.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(domains)), domains, fontsize=7)
    ax.set_xlabel(f"leaf ({int(measured.sum())} measured of {measured.size})")
    fig.colorbar(im, ax=ax, label="posterior mean phi")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"![phi heatmap](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


@dg.asset(group_name=GROUP, kinds={"numpy", "parquet"}, deps=["leaf_utilities", "leaf_hierarchy", "base_model_scores"])
def phi_posteriors(
    context: dg.AssetExecutionContext, finetuner: LoraFinetuner, settings: HarpSettings, lineage: LineageStore
) -> dg.MaterializeResult:
    """Posterior mean and sd of every leaf's per-domain effect phi, from HARP's up-to-date measured leaves.

    HARP's leaves are the representatives and the active rounds' picks; other measured partitions (the
    exhaustive validation mode) are left out, so the posteriors never use data HARP did not pay for.
    """
    t0 = time.perf_counter()
    table = load_leaf_table(lineage)
    base, meta = load_base(lineage)
    domains = list(meta["domains"])
    versions = leaf_versions(lineage, finetuner, settings)
    fresh_all, stale = read_measurements(lineage, versions)
    wanted = harp_leaves(lineage)
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
    measurements = aligned_correctness(fresh, table, base)
    effects = stages.main_effects(measurements, base, domains, n_boot=settings.n_boot, seed=settings.seed)
    measured_idx = np.array(sorted(measurements), dtype=np.int64)
    post = stages.infer_posteriors(table, effects, measured_idx)
    if not (np.isfinite(post.mean).all() and np.isfinite(post.sd).all()):
        raise ValueError("posteriors are not finite: check the leaf measurements")
    active = active_domains(post.mean, post.sd, z=settings.z_active)
    _, version = load_pool_artifact(lineage)
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
    out = artifacts_dir(lineage)
    write_npz_atomic(out / POSTERIORS_FILE, mean=post.mean, sd=post.sd, measured=post.measured,
                     leaf_ids=np.asarray(leaf_ids, dtype=str))
    hyper = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(post.hyper).items()}
    write_json_atomic(out / POSTERIORS_META, {
        "domains": domains, "hyper": hyper, "measured_leaves": sorted(fresh), "stale_leaves": stale,
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
    return dg.MaterializeResult(metadata=md)
