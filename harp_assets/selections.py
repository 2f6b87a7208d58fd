"""The selections under one point budget (HARP-C, HARP-E, TSDS, random).

Each selection is appended to the `selections` history table under a new selection id, so data teams can
compare runs; `lineage_catalog` (catalog.py) then records the run manifest and rebuilds the DuckDB views.
"""


import datetime as dt
import time
from collections import Counter

import dagster as dg
import numpy as np
import polars as pl

from harp import driver, explain, stages, store
from harp.config import HarpSettings
from harp.lineage import LineageStore, selection_id_for
from harp.method.selection import HarpSelection
from harp_assets import plots
from harp_assets.base_scores import base_model_scores
from harp_assets.checking import check_result
from harp_assets.contamination import pool_contamination
from harp_assets.embeddings import example_embeddings
from harp_assets.groups import SELECT
from harp_assets.hierarchy import leaf_hierarchy
from harp_assets.posteriors import phi_posteriors
from harp_assets.sources import pool_examples, proxy_eval_set
from harp_resources import EmbedderResource, LineageResource, SettingsResource

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


def excluded_ids(settings: HarpSettings, lineage: LineageStore) -> set[str]:
    """The examples every selection leaves out: the contamination guard's flags, unless it is turned off."""
    return store.contaminated_ids(lineage) if settings.exclude_contaminated else set()


def guard_metadata(lineage: LineageStore, excluded: set[str], example_ids: list[str]) -> dict:
    flagged = store.contaminated_ids(lineage)
    return {"contaminated_left_out": len(excluded),
            "contaminated_selected": sum(e in flagged for e in example_ids)}


def previous_selection(lineage: LineageStore, method: str) -> tuple[str, pl.DataFrame, dict[str, float] | None]:
    """The method's newest committed selection (an empty one included): its id ('' when none), its rows
    (example_id, leaf_id) and, for HARP, its predicted utility per domain."""
    pair = lineage.query("SELECT newer_selection_id AS sid FROM selection_pairs WHERE method = $m", {"m": method})
    if pair.height == 0:
        return "", pl.DataFrame(schema={"example_id": pl.String, "leaf_id": pl.String}), None
    sid = str(pair["sid"][0])
    rows = lineage.query("SELECT example_id, leaf_id FROM selections WHERE selection_id = $sid", {"sid": sid})
    pred = lineage.query("SELECT domain, predicted FROM selection_predictions WHERE selection_id = $sid",
                         {"sid": sid})
    return sid, rows, (dict(pred.rows()) if pred.height else None)


def _composition_of(lineage: LineageStore, leaves: list[str]) -> dict[str, dict[str, int]]:
    """Selected examples by region and by their leaf's most helped domain, from the catalog's current tables."""
    if not leaves:
        return {}
    region = dict(lineage.query("SELECT leaf_id, region_id FROM leaves").rows())
    post = lineage.query("SELECT leaf_id, domain, mean FROM phi_posteriors ORDER BY leaf_id, domain")
    best: dict[str, str] = {}
    if post.height:
        wide = post.pivot(on="domain", index="leaf_id", values="mean").sort("leaf_id")
        domains = [c for c in wide.columns if c != "leaf_id"]
        best = explain.best_domains(wide["leaf_id"].to_list(), domains,
                                    wide.select(domains).fill_null(0.0).to_numpy())
    return explain.composition(leaves, region, best)


def record_selection(
    context: dg.AssetExecutionContext,
    lineage: LineageStore,
    method: str,
    example_ids: list[str],
    budget: int,
    gain: list[float] | None = None,
    predicted: float | None = None,
    *,
    commit: bool = False,
    harp: HarpSelection | None = None,
    domains: list[str] | None = None,
    base: np.ndarray | None = None,
    leaf_sizes: np.ndarray | None = None,
) -> dict:
    """Append one selection to the `selections` table; returns metadata shared by every method.

    A HARP selection (`harp`, with its `domains`, `base` scores and the `leaf_sizes` it saw) also writes its
    greedy trace (`selection_traces`) and its per-domain prediction (`selection_predictions`, written for an
    empty selection too, with the reason). The metadata says what changed against the method's previous
    committed selection and how the selection divides by region and domain. A selection shows in
    `latest_selections` once its run commits: the select job's manifest commits its four selections together;
    a job that writes one selection alone passes `commit=True`."""
    table = store.load_leaf_table(lineage)
    pool, version = store.load_pool_artifact(lineage)
    pool_ids = set(pool["example_id"].to_list())
    outside = [e for e in example_ids if e not in pool_ids]
    if outside:
        raise ValueError(f"{method} selected {len(outside)} example(s) outside the pool, e.g. {outside[:3]}")
    if len(example_ids) > budget:
        raise ValueError(f"{method} selected {len(example_ids)} examples, over the budget of {budget}")
    row = {e: r for r, e in enumerate(table.example_ids.tolist())}
    g = table.leaf_index_of_row[[row[e] for e in example_ids]] if example_ids else np.zeros(0, np.int32)
    now = dt.datetime.now(dt.timezone.utc)
    run_id = context.run.run_id
    sid = selection_id_for(method, run_id, now)
    n = len(example_ids)
    leaves = table.leaf_ids[g].tolist()
    df = pl.DataFrame(
        {
            "selection_id": [sid] * n,
            "method": [method] * n,
            "rank": np.arange(1, n + 1, dtype=np.int32),
            "example_id": example_ids,
            "leaf_id": leaves,
            "parent_id": table.parent_ids[table.parent_of_leaf[g]].tolist(),
            "gain": gain if gain is not None else [None] * n,
            "predicted_utility": [predicted] * n,
            "budget": [budget] * n,
            "pool_version": [version] * n,
            "created_at": [now] * n,
            "run_id": [run_id] * n,
        },
        schema_overrides={"gain": pl.Float64, "predicted_utility": pl.Float64, "budget": pl.Int32, "created_at": pl.Datetime("us", "UTC")},
    )
    prev_sid, previous, prev_pred = previous_selection(lineage, method)
    now_pred = None
    if harp is not None:
        if domains is None or base is None or leaf_sizes is None:
            raise ValueError("record_selection: a HARP selection needs its domains, base scores and leaf sizes")
        parents = table.parent_ids[table.parent_of_leaf].tolist()
        lineage.append_run("selection_traces", sid, explain.trace_frame(
            harp, table.leaf_ids.tolist(), parents, leaf_sizes, selection_id=sid, method=method, created_at=now,
            run_id=run_id), exist_ok=True)
        preds = explain.prediction_frame(harp, domains, base, selection_id=sid, method=method, created_at=now,
                                         run_id=run_id)
        lineage.append_run("selection_predictions", sid, preds, exist_ok=True)
        now_pred = dict(zip(domains, preds["predicted"].to_list(), strict=True))
    lineage.append_run("selections", sid, df, exist_ok=True)
    if commit:
        lineage.append_run("selection_commits", run_id, pl.DataFrame(
            {"run_id": [run_id], "committed_at": [now]},
            schema_overrides={"committed_at": pl.Datetime("us", "UTC")}), exist_ok=True)
    diff = explain.diff_summary(previous["example_id"].to_list(), previous["leaf_id"].to_list(), example_ids, leaves,
                                previous_predicted=prev_pred, predicted=now_pred)
    md: dict = {
        "selection_id": sid, "selected": n, "budget": budget, "leaves_used": int(np.unique(g).size),
        "previous_selection_id": prev_sid,
        **{k: diff[k] for k in ("examples_added", "examples_removed", "examples_kept", "leaves_kept")},
        "leaves_added": dg.MetadataValue.json(diff["leaves_added"]),
        "leaves_removed": dg.MetadataValue.json(diff["leaves_removed"]),
        "predicted_change_by_domain": dg.MetadataValue.json(diff["predicted_change_by_domain"]),
        "empty_selection": not n,
    }
    reason = explain.empty_reason(method, n, budget, harp.note if harp is not None else None)
    if reason:  # an empty file says why it is empty
        md["empty_reason"] = reason
    counts = _composition_of(lineage, leaves)
    md["composition_by_region"] = dg.MetadataValue.json(counts)
    img = plots.composition(counts)
    if img:
        md["composition"] = dg.MetadataValue.md(img)
    return md


def _harp(context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore, key: str):
    t0 = time.perf_counter()
    table = store.load_leaf_table(lineage)
    post, meta = store.load_posteriors(lineage)
    if meta["leaf_ids"] != table.leaf_ids.tolist():
        raise ValueError("phi_posteriors were fitted on another leaf table: materialise phi_posteriors again")
    base, _ = store.load_base(lineage)
    domains = list(meta["domains"])
    b = stages.base_scores(base, domains)
    excluded = excluded_ids(settings, lineage)
    out_rows = np.flatnonzero(np.isin(table.example_ids, list(excluded))) if excluded else None
    sel = driver.select_envelopes(post, b, table, top_k_points=settings.top_k_points, z_active=settings.z_active,
                                  methods=(key,), exclude_rows=out_rows,
                                  options=settings.selection_options())[key]
    envelope = driver.ENVELOPES[key]
    rows = sel.example_rows.tolist()
    ids = table.example_ids[rows].tolist()
    gain = np.asarray(sel.row_gain, dtype=np.float64)
    gains = gain.tolist() if gain.shape == (len(rows),) else None
    active = np.asarray(sel.active, dtype=bool)
    pred = np.asarray(sel.predicted_rows, dtype=np.float64)
    predicted = float(pred[active].mean()) if active.any() else None
    sizes = np.asarray(table.leaf_sizes, dtype=np.int64)
    if out_rows is not None and out_rows.size:  # the leaf sizes the greedy saw: without the excluded rows
        sizes = sizes - np.bincount(table.leaf_index_of_row[out_rows], minlength=sizes.size)
    md = record_selection(context, lineage, key, ids, settings.top_k_points, gains, predicted,
                          harp=sel, domains=domains, base=b, leaf_sizes=sizes)
    md.update(guard_metadata(lineage, excluded, ids))
    g = sel.greedy
    per_domain = explain.per_domain(sel, domains)
    md.update({
        "envelope": envelope,
        "leaves_ranked": int(np.asarray(g.order).size),
        "cut_index": int(g.cut),
        "stop_reason": g.stop_reason,
        "objective": float(g.objective),
        # y_d of the selected rows with its credible band, and the line the commands' summaries print.
        "predicted_per_domain": dg.MetadataValue.json(per_domain),
        "predicted_summary": explain.format_predictions(per_domain, sel.band.level),
        "running_gain": dg.MetadataValue.json([round(float(x), 5) for x in np.asarray(g.running)[:200]]),
        "note": sel.note or "",
        # A prediction at the clip (y_d = 1) says the envelope saturates, not that accuracy reaches 100%.
        "saturated_domains": dg.MetadataValue.json([d for d, p in per_domain.items() if p["saturated"]]),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    img = plots.gain_curve(np.asarray(g.running, dtype=np.float64), int(g.cut),
                           table.leaf_sizes[np.asarray(g.order, dtype=np.int64)], settings.top_k_points)
    if img:
        md["gain_curve"] = dg.MetadataValue.md(img)
    img = plots.predicted_band(per_domain, dict(zip(domains, np.asarray(b, dtype=float).tolist(), strict=True)))
    if img:
        md["predicted_utility"] = dg.MetadataValue.md(img)
    return dg.MaterializeResult(metadata=md)


_SEL_DEPS = [phi_posteriors, leaf_hierarchy, base_model_scores, pool_contamination]


@dg.asset(group_name=SELECT, kinds={"numpy"}, deps=_SEL_DEPS)
def harp_c_selection(
    context: dg.AssetExecutionContext, settings: SettingsResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """HARP-C: leaves ranked by the conservative envelope's greedy gain, cut at the best prefix, capped at the budget."""
    return _harp(context, settings, lineage, "harp_c")


@dg.asset(group_name=SELECT, kinds={"numpy"}, deps=_SEL_DEPS)
def harp_e_selection(
    context: dg.AssetExecutionContext, settings: SettingsResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """HARP-E: as HARP-C under the expansive envelope, which accepts more uncertain leaves."""
    return _harp(context, settings, lineage, "harp_e")


@dg.asset(group_name=SELECT, kinds={"faiss"},
          deps=[example_embeddings, proxy_eval_set, leaf_hierarchy, pool_contamination])
def tsds_selection(
    context: dg.AssetExecutionContext, settings: SettingsResource, embedder: EmbedderResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    """TSDS baseline: pool examples drawn towards the proxy eval items (prompt and answer: the queries), at the same budget."""
    t0 = time.perf_counter()
    ids, X, model_id = store.load_embeddings(lineage)
    if model_id != embedder.model_id:
        raise ValueError(f"pool embeddings come from {model_id}, the embedder is {embedder.model_id}: "
                         "materialise example_embeddings again")
    eval_set, _ = store.load_eval_artifact(lineage)
    Q = embedder.embed(stages.eval_item_texts(eval_set))  # queries embedded as candidates: prompt + answer
    excluded = excluded_ids(settings, lineage)
    keep = ~np.isin(ids, list(excluded)) if excluded else np.ones(len(ids), dtype=bool)
    ids, X = ids[keep], X[keep]  # the candidates: the pool without the examples the guard flagged
    budget = min(settings.top_k_points, len(ids))
    sel = stages.select_tsds(X, Q, budget, seed=settings.seed, params=settings.tsds_params())
    counts = np.asarray(sel.counts)
    picked = np.flatnonzero(counts > 0)
    order = picked[np.lexsort((picked, -counts[picked]))]  # most drawn first, ties by pool row
    md = record_selection(context, lineage, "tsds", ids[order].tolist(), settings.top_k_points)
    md.update(guard_metadata(lineage, excluded, ids[order].tolist()))
    md.update({"draws": int(counts.sum()), "distinct": int(order.size), "queries": int(Q.shape[0]),
               "seconds": round(time.perf_counter() - t0, 3)})
    return dg.MaterializeResult(metadata=md)


@dg.asset(group_name=SELECT, kinds={"numpy"}, deps=[pool_examples, leaf_hierarchy, pool_contamination])
def random_selection(
    context: dg.AssetExecutionContext, settings: SettingsResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """Random baseline: distinct pool examples drawn uniformly for the seed, at the same budget."""
    pool, _ = store.load_pool_artifact(lineage)
    excluded = excluded_ids(settings, lineage)
    if excluded:
        pool = pool.filter(~pl.col("example_id").is_in(list(excluded)))
    sel = stages.select_random(pool.height, settings.top_k_points, seed=settings.seed)
    ids = pool["example_id"].gather(sel.example_rows.tolist()).to_list()
    md = record_selection(context, lineage, "random", ids, settings.top_k_points)
    return dg.MaterializeResult(metadata={**md, **guard_metadata(lineage, excluded, ids)})


SELECTION_ASSETS = {"harp_c": harp_c_selection, "harp_e": harp_e_selection, "tsds": tsds_selection,
                    "random": random_selection}


def _selection_check(method: str, asset_def: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    asset = asset_def.key.to_user_string()

    @dg.asset_check(
        asset=asset_def,
        name=f"{method}_within_budget_and_pool",
        description="The latest selection is within the budget, has no repeats and only pool examples.",
    )
    def _check(
        context: dg.AssetCheckExecutionContext, lineage: LineageResource, settings: SettingsResource
    ) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
        mat = event.asset_materialization if event is not None else None
        if mat is None or "selection_id" not in mat.metadata:
            return dg.AssetCheckResult(passed=False, metadata={"error": f"{asset} has no materialisation with a selection_id"})
        sid = str(mat.metadata["selection_id"].value)
        rows = lineage.read_partition("selections", sid)
        if rows is None:
            return dg.AssetCheckResult(passed=False, metadata={"error": f"selection {sid} is not in the selections table"})
        pool, _ = store.load_pool_artifact(lineage)
        pool_ids = set(pool["example_id"].to_list())
        ids = rows["example_id"].to_list()
        over = [f"{len(ids)} > {settings.top_k_points}"] if len(ids) > settings.top_k_points else []
        return check_result(
            {
                "over_budget": over,
                "outside_pool": [e for e in ids if e not in pool_ids],
                "repeated": sorted(e for e, n in Counter(ids).items() if n > 1),
                "other_method_rows": sorted(set(rows["method"].to_list()) - {method}),
            },
            selection_id=sid,
            selected=len(ids),
            budget=settings.top_k_points,
        )

    return _check


SELECTION_CHECKS = [_selection_check(m, a) for m, a in SELECTION_ASSETS.items()]
