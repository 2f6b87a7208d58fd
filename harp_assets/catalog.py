"""The run manifest and the DuckDB catalog: the one writer of the catalog, after every selection.

A manifest counts what was done apart from what is stored: `train_eval_runs` is the leaf train-evaluate
cycles stored since the previous manifest (`trained_since`; the leaf runs of this pipeline call, 0 for a
selection run on its own), `leaves_stored` every stored leaf measurement, current or not, HARP's or not.
"""

import datetime as dt
import json
import time

import dagster as dg
import polars as pl

from harp import store
from harp.lineage import LineageStore
from harp.versions import measurement_key
from harp_assets.active_round import active_round_plan
from harp_assets.groups import SELECT
from harp_assets.selections import SELECTION_ASSETS, newest_selection
from harp_resources import (
    EmbedderResource,
    EvaluatorResource,
    FinetunerResource,
    LineageResource,
    SettingsResource,
)

_STAGES = ("pool_examples", "proxy_eval_set", "example_embeddings", "leaf_hierarchy", "base_model_scores",
           "leaf_utilities", "phi_posteriors", "harp_c_selection", "harp_e_selection", "tsds_selection",
           "random_selection")


def _stage_seconds(context: dg.AssetExecutionContext) -> dict[str, float]:
    """Wall seconds each stage reported in its latest materialisation (leaf_utilities: its latest step)."""
    out: dict[str, float] = {}
    for name in _STAGES:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(name))
        mat = event.asset_materialization if event is not None else None
        if mat is None:
            continue
        for field in ("seconds", "train_eval_seconds"):
            if field in mat.metadata:
                out[name] = float(mat.metadata[field].value)
    return out


def previous_manifest_time(lineage: LineageStore, run_id: str) -> dt.datetime | None:
    """When the newest manifest of another run was written (a retried step rewrites its own run's), or None
    before the first: the start of the window whose leaf measurements this manifest counts as trained."""
    manifests = lineage.read_table("run_manifests").filter(pl.col("run_id") != run_id)
    return manifests["created_at"].max() if manifests.height else None


@dg.asset(
    group_name=SELECT,
    kinds={"duckdb"},
    deps=[*SELECTION_ASSETS.values(), active_round_plan],
)
def lineage_catalog(
    context: dg.AssetExecutionContext,
    settings: SettingsResource,
    finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    embedder: EmbedderResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    """The run manifest, and the DuckDB catalog of views over every lineage table (rebuilt by this one writer)."""
    t0 = time.perf_counter()
    pool, version = store.load_pool_artifact(lineage)
    table = store.load_leaf_table(lineage)
    _, bmeta = store.load_base(lineage)
    fresh_all, _ = store.read_measurements(lineage, store.leaf_versions(lineage, finetuner, evaluator, settings.seed))
    wanted = store.harp_leaves(lineage)
    fresh = [leaf for leaf in fresh_all if leaf in wanted]
    rounds = store.read_plan(lineage)
    stored = lineage.partition_keys("leaf_utilities")
    since = previous_manifest_time(lineage, context.run.run_id)
    trained = store.leaves_measured_since(lineage, since)
    now = dt.datetime.now(dt.timezone.utc)
    manifest = pl.DataFrame({
        "run_id": [context.run.run_id],
        "created_at": [now],
        "pool_version": [version],
        "embedder": [embedder.model_id],
        "base_model": [f"{bmeta['base_model']} ({bmeta['base_model_id']})"],
        "config_json": [json.dumps({"settings": settings.model_dump(), "measurement": measurement_key(finetuner, evaluator),
                                    "eval_hash": bmeta["eval_hash"]}, sort_keys=True, default=str)],
        "seed": [settings.seed],
        "train_eval_runs": [len(trained)],
        "leaves_total": [table.n_leaves],
        "leaves_measured": [len(fresh)],
        "examples": [pool.height],
        "seconds_json": [json.dumps(_stage_seconds(context), sort_keys=True)],
        "active_rounds": [len(rounds)],
        "active_leaves": [sum(len(r["leaves"]) for r in rounds)],
        "leaves_stored": [len(stored)],
        "trained_since": [since],
    }, schema_overrides={"created_at": pl.Datetime("us", "UTC"), "train_eval_runs": pl.Int32,
                         "leaves_total": pl.Int32, "leaves_measured": pl.Int32, "active_rounds": pl.Int32,
                         "active_leaves": pl.Int32, "leaves_stored": pl.Int32,
                         "trained_since": pl.Datetime("us", "UTC")})
    lineage.append_run("run_manifests", context.run.run_id, manifest, exist_ok=True)
    files = lineage.refresh_catalog()
    sizes = {}
    for method in SELECTION_ASSETS:
        got = newest_selection(context.instance, lineage, method)
        if got is not None:
            sizes[method] = len(got[1])
    return dg.MaterializeResult(metadata={
        "duckdb": str(lineage.catalog_path),
        "files_per_table": dg.MetadataValue.json(files),
        "latest_selection_sizes": dg.MetadataValue.json(sizes),
        "leaves_measured": len(fresh),
        "leaves_total": table.n_leaves,
        "leaves_trained_since_previous_manifest": len(trained),
        "leaves_stored": len(stored),
        "seconds": round(time.perf_counter() - t0, 3),
    })
