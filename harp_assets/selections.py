"""The selections under one point budget (HARP-C, HARP-E, TSDS, random) and the lineage catalog.

Each selection is appended to the `selections` history table under a new selection id, so data teams can
compare runs; `lineage_catalog` then records the run manifest and rebuilds the DuckDB views (the one writer).
"""


import datetime as dt
import json
import time

import dagster as dg
import numpy as np
import polars as pl

from harp_assets import stages
from harp_assets.active_round import harp_leaves, read_plan
from harp_assets.base_scores import load_base
from harp_assets.embeddings import load_embeddings
from harp_assets.leaf_utilities import leaf_versions, read_measurements
from harp_assets.leaves import load_leaf_table
from harp_assets.posteriors import load_posteriors
from harp_assets.settings import GROUP, HarpSettings, lora_recipe
from harp_assets.sources import load_eval_artifact, load_pool_artifact
from harp_resources.embedder import EmbedderResource
from harp_resources.finetuner import LoraFinetuner
from harp_resources.lineage_store import LineageStore, selection_id_for

METHODS = ("harp_c", "harp_e", "tsds", "random")


def newest_selection(instance: dg.DagsterInstance, lineage: LineageStore, method: str) -> tuple[str, list[str]] | None:
    """(selection id, example ids in rank order) of the newest materialisation of `<method>_selection`.

    Read through the asset's own metadata rather than the `latest_selections` view: an empty selection (HARP
    may rightly pick nothing) writes no rows, so the view would still show the one before it.
    """
    event = instance.get_latest_materialization_event(dg.AssetKey(f"{method}_selection"))
    mat = event.asset_materialization if event is not None else None
    if mat is None or "selection_id" not in mat.metadata:
        return None
    sid = str(mat.metadata["selection_id"].value)
    rows = lineage.query("SELECT example_id FROM selections WHERE selection_id = $sid ORDER BY rank", {"sid": sid})
    return sid, rows["example_id"].to_list()


def _record(
    context: dg.AssetExecutionContext,
    lineage: LineageStore,
    method: str,
    example_ids: list[str],
    budget: int,
    gain: list[float] | None = None,
    predicted: float | None = None,
) -> dict:
    """Append one selection to the `selections` table; returns metadata shared by every method."""
    table = load_leaf_table(lineage)
    pool, version = load_pool_artifact(lineage)
    pool_ids = set(pool["example_id"].to_list())
    outside = [e for e in example_ids if e not in pool_ids]
    if outside:
        raise ValueError(f"{method} selected {len(outside)} example(s) outside the pool, e.g. {outside[:3]}")
    if len(example_ids) > budget:
        raise ValueError(f"{method} selected {len(example_ids)} examples, over the budget of {budget}")
    row = {e: r for r, e in enumerate(table.example_ids.tolist())}
    g = table.leaf_index_of_row[[row[e] for e in example_ids]] if example_ids else np.zeros(0, np.int32)
    now = dt.datetime.now(dt.timezone.utc)
    sid = selection_id_for(method, context.run.run_id, now)
    n = len(example_ids)
    df = pl.DataFrame(
        {
            "selection_id": [sid] * n,
            "method": [method] * n,
            "rank": np.arange(1, n + 1, dtype=np.int32),
            "example_id": example_ids,
            "leaf_id": table.leaf_ids[g].tolist(),
            "parent_id": table.parent_ids[table.parent_of_leaf[g]].tolist(),
            "gain": gain if gain is not None else [None] * n,
            "predicted_utility": [predicted] * n,
            "budget": [budget] * n,
            "pool_version": [version] * n,
            "created_at": [now] * n,
            "run_id": [context.run.run_id] * n,
        },
        schema_overrides={"gain": pl.Float64, "predicted_utility": pl.Float64, "budget": pl.Int32, "created_at": pl.Datetime("us", "UTC")},
    )
    lineage.append_run("selections", sid, df, exist_ok=True)
    return {"selection_id": sid, "selected": n, "budget": budget, "leaves_used": int(np.unique(g).size)}


def _harp(context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore, key: str, envelope: str):
    t0 = time.perf_counter()
    table = load_leaf_table(lineage)
    post, meta = load_posteriors(lineage)
    if meta["leaf_ids"] != table.leaf_ids.tolist():
        raise ValueError("phi_posteriors were fitted on another leaf table: materialise phi_posteriors again")
    base, bmeta = load_base(lineage)
    domains = list(meta["domains"])
    b = stages.base_scores(base, domains)
    sel = stages.select_harp(post, b, table, envelope=envelope, top_k_points=settings.top_k_points,
                             z_active=settings.z_active)
    rows = sel.example_rows.tolist()
    ids = table.example_ids[rows].tolist()
    gain = np.asarray(sel.row_gain, dtype=np.float64)
    gains = gain.tolist() if gain.shape == (len(rows),) else None
    active = np.asarray(sel.active, dtype=bool)
    pred = np.asarray(sel.predicted_rows, dtype=np.float64)
    predicted = float(pred[active].mean()) if active.any() else None
    md = _record(context, lineage, key, ids, settings.top_k_points, gains, predicted)
    g = sel.greedy
    md.update({
        "envelope": envelope,
        "leaves_ranked": int(np.asarray(g.order).size),
        "cut_index": int(g.cut),
        "stop_reason": g.stop_reason,
        "objective": float(g.objective),
        "predicted_per_domain": dg.MetadataValue.json(
            {d: round(float(v), 4) for d, v in zip(domains, pred, strict=True)}),
        "running_gain": dg.MetadataValue.json([round(float(x), 5) for x in np.asarray(g.running)[:200]]),
        "note": sel.note or "",
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return dg.MaterializeResult(metadata=md)


_SEL_DEPS = ["phi_posteriors", "leaf_hierarchy", "base_model_scores"]


@dg.asset(group_name=GROUP, kinds={"numpy"}, deps=_SEL_DEPS)
def harp_c_selection(context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore) -> dg.MaterializeResult:
    """HARP-C: leaves ranked by the conservative envelope's greedy gain, cut at the best prefix, capped at the budget."""
    return _harp(context, settings, lineage, "harp_c", "conservative")


@dg.asset(group_name=GROUP, kinds={"numpy"}, deps=_SEL_DEPS)
def harp_e_selection(context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore) -> dg.MaterializeResult:
    """HARP-E: as HARP-C under the expansive envelope, which accepts more uncertain leaves."""
    return _harp(context, settings, lineage, "harp_e", "expansive")


@dg.asset(group_name=GROUP, kinds={"faiss"}, deps=["example_embeddings", "proxy_eval_set", "leaf_hierarchy"])
def tsds_selection(
    context: dg.AssetExecutionContext, settings: HarpSettings, embedder: EmbedderResource, lineage: LineageStore
) -> dg.MaterializeResult:
    """TSDS baseline: pool examples drawn towards the proxy eval prompts (the queries), at the same budget."""
    t0 = time.perf_counter()
    ids, X, model_id = load_embeddings(lineage)
    if model_id != embedder.model_id:
        raise ValueError(f"pool embeddings come from {model_id}, the embedder is {embedder.model_id}: "
                         "materialise example_embeddings again")
    eval_set, _ = load_eval_artifact(lineage)
    Q = embedder.embed(eval_set["prompt"].to_list())
    budget = min(settings.top_k_points, len(ids))
    sel = stages.select_tsds(X, Q, budget, seed=settings.seed, params=settings.tsds_params())
    counts = np.asarray(sel.counts)
    picked = np.flatnonzero(counts > 0)
    order = picked[np.lexsort((picked, -counts[picked]))]  # most drawn first, ties by pool row
    md = _record(context, lineage, "tsds", ids[order].tolist(), settings.top_k_points)
    md.update({"draws": int(counts.sum()), "distinct": int(order.size), "queries": int(Q.shape[0]),
               "seconds": round(time.perf_counter() - t0, 3)})
    return dg.MaterializeResult(metadata=md)


@dg.asset(group_name=GROUP, kinds={"numpy"}, deps=["pool_examples", "leaf_hierarchy"])
def random_selection(context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore) -> dg.MaterializeResult:
    """Random baseline: distinct pool examples drawn uniformly for the seed, at the same budget."""
    pool, _ = load_pool_artifact(lineage)
    sel = stages.select_random(pool.height, settings.top_k_points, seed=settings.seed)
    ids = pool["example_id"].gather(sel.example_rows.tolist()).to_list()
    return dg.MaterializeResult(metadata=_record(context, lineage, "random", ids, settings.top_k_points))


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
        for field in ("seconds", "step_seconds"):
            if field in mat.metadata:
                out[name] = float(mat.metadata[field].value)
    return out


@dg.asset(
    group_name=GROUP,
    kinds={"duckdb"},
    deps=["harp_c_selection", "harp_e_selection", "tsds_selection", "random_selection", "active_round_plan"],
)
def lineage_catalog(
    context: dg.AssetExecutionContext,
    settings: HarpSettings,
    finetuner: LoraFinetuner,
    embedder: EmbedderResource,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    """The run manifest, and the DuckDB catalog of views over every lineage table (rebuilt by this one writer)."""
    t0 = time.perf_counter()
    pool, version = load_pool_artifact(lineage)
    table = load_leaf_table(lineage)
    _, bmeta = load_base(lineage)
    fresh_all, _ = read_measurements(lineage, leaf_versions(lineage, finetuner, settings))
    wanted = harp_leaves(lineage)
    fresh = [leaf for leaf in fresh_all if leaf in wanted]
    rounds = read_plan(lineage)
    stored = lineage.partition_keys("leaf_utilities")
    now = dt.datetime.now(dt.timezone.utc)
    manifest = pl.DataFrame({
        "run_id": [context.run.run_id],
        "created_at": [now],
        "pool_version": [version],
        "embedder": [embedder.model_id],
        "base_model": [f"{bmeta['base_model']} ({bmeta['base_model_id']})"],
        "config_json": [json.dumps({"settings": settings.model_dump(), "lora": lora_recipe(finetuner),
                                    "eval_hash": bmeta["eval_hash"]}, sort_keys=True, default=str)],
        "seed": [settings.seed],
        "train_eval_runs": [len(stored)],
        "leaves_total": [table.n_leaves],
        "leaves_measured": [len(fresh)],
        "examples": [pool.height],
        "seconds_json": [json.dumps(_stage_seconds(context), sort_keys=True)],
        "active_rounds": [len(rounds)],
        "active_leaves": [sum(len(r["leaves"]) for r in rounds)],
    }, schema_overrides={"created_at": pl.Datetime("us", "UTC"), "train_eval_runs": pl.Int32,
                         "leaves_total": pl.Int32, "leaves_measured": pl.Int32, "active_rounds": pl.Int32,
                         "active_leaves": pl.Int32})
    lineage.append_run("run_manifests", context.run.run_id, manifest, exist_ok=True)
    files = lineage.refresh_catalog()
    sizes = {}
    for method in METHODS:
        got = newest_selection(context.instance, lineage, method)
        if got is not None:
            sizes[method] = len(got[1])
    return dg.MaterializeResult(metadata={
        "duckdb": str(lineage.catalog_path),
        "files_per_table": dg.MetadataValue.json(files),
        "latest_selection_sizes": dg.MetadataValue.json(sizes),
        "leaves_measured": len(fresh),
        "leaves_total": table.n_leaves,
        "seconds": round(time.perf_counter() - t0, 3),
    })
