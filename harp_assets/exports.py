"""Finetuning-ready exports of the newest selections: `<method>.parquet` and `.jsonl` plus `manifest.json`.

The same writer serves `harp-dagster run --out DIR` and the `selection_exports` asset, which keeps a copy under
`$DAGSTER_HOME/harp/exports/` for people who work from the UI. Each file holds the selected examples' original
columns (chat `messages` and extra columns included), in selection order.
"""

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from harp import store
from harp.chat import ChatTemplate
from harp.io import atomic_write, write_json, write_parquet
from harp.lineage import LineageStore
from harp_assets.catalog import lineage_catalog
from harp_assets.groups import SELECT
from harp_resources import FinetunerResource, LineageResource, PoolSourceResource, SettingsResource

EXPORT_METHODS = ("harp_c", "harp_e", "tsds", "random")


def export_selections(lineage: LineageStore, pool: pl.DataFrame, out: Path, methods: list[str],
                      info: dict[str, Any]) -> dict:
    """Write each method's newest committed selection as Parquet and JSON Lines with the pool's original
    columns, in selection order, and the manifest; returns the manifest."""
    sel = lineage.query("SELECT method, selection_id, rank, example_id, run_id FROM latest_selections "
                        "ORDER BY method, rank")
    files: dict[str, Any] = {}
    for method in methods:
        rows = sel.filter(pl.col("method") == method)
        if rows.height == 0 and method not in set(sel["method"].to_list()):
            continue
        picked = rows.select("example_id", pl.col("rank").alias("__rank")).join(pool, on="example_id", how="left")
        picked = picked.sort("__rank").drop("__rank")
        write_parquet(picked, out / f"{method}.parquet")
        with atomic_write(out / f"{method}.jsonl") as fh:
            picked.write_ndjson(fh)
        files[method] = {
            "examples": picked.height,
            "selection_id": rows["selection_id"][0] if rows.height else None,
            "run_id": rows["run_id"][0] if rows.height else None,
            "parquet": f"{method}.parquet",
            "jsonl": f"{method}.jsonl",
        }
    manifest = {**info, "methods": files, "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    write_json(out / "manifest.json", manifest)
    return manifest


def exports_dir(lineage: LineageStore) -> Path:
    return lineage.root_path / "exports"


@dg.asset(group_name=SELECT, kinds={"parquet"}, deps=[lineage_catalog])
def selection_exports(
    context: dg.AssetExecutionContext, settings: SettingsResource, pool_source: PoolSourceResource,
    finetuner: FinetunerResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    """Each method's newest selection as finetuning-ready Parquet and JSON Lines, with the pool's own columns."""
    render = ChatTemplate(finetuner.base_model, trust_remote_code=finetuner.trust_remote_code)
    pool = pool_source.load_pool(render)
    _, version = store.load_pool_artifact(lineage)
    out = exports_dir(lineage)
    out.mkdir(parents=True, exist_ok=True)
    manifest = export_selections(lineage, pool, out, list(EXPORT_METHODS), {
        "pool": str(pool_source.resolved_pool_path()), "pool_version": version,
        "base_model": finetuner.base_model, "budget": settings.top_k_points, "seed": settings.seed,
        "run_id": context.run.run_id})
    missing = {m: f["examples"] for m, f in manifest["methods"].items()
               if pl.read_parquet(out / f["parquet"])["prompt"].null_count()}
    if missing:
        raise ValueError(f"selected examples are missing from the pool source {pool_source.resolved_pool_path()} "
                         f"(changed since the selection ran?): {missing}; materialise the pipeline again")
    return dg.MaterializeResult(metadata={
        "folder": dg.MetadataValue.path(str(out)),
        "examples": dg.MetadataValue.json({m: f["examples"] for m, f in manifest["methods"].items()}),
        "columns": dg.MetadataValue.json(pool.columns),
        "load_with": f'datasets.load_dataset("parquet", data_files="{out}/harp_e.parquet", split="train")',
    })
