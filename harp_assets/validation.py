"""The validation group: what each selection is really worth, measured on a held-out test split.

Off the default jobs (it trains one adapter per selection plus the full pool, and the exhaustive oracle
needs every leaf measured); `make validate` runs it. Two assets:

- `exhaustive_selection`: the oracle HARP approximates. Every leaf is measured (ordinary `leaf_utilities`
  partitions), the posteriors are fitted on all of them and the primary envelope selects under the same
  budget. Its metadata holds the rank correlation between HARP's posterior means and these measured effects.
- `selection_validation`: the newest HARP-C, HARP-E, TSDS, random and exhaustive selections, and the full
  pool, each LoRA-finetuned with one fixed recipe (`validation_finetuner`) and scored on the test split
  (never the proxy set). Results go to the `validation_results` lineage table and the metadata.
"""


import base64
import datetime as dt
import io
import time

import dagster as dg
import numpy as np
import polars as pl

from harp import driver, stages, store
from harp.config import HarpSettings
from harp.contracts import load_eval_set
from harp.lineage import LineageStore
from harp.method import active_domains
from harp.metrics import kind_shares, load_ground_truth, oracle_fraction, spearman
from harp.versions import sha16
from harp_assets.base_scores import base_model_scores
from harp_assets.groups import VALIDATION
from harp_assets.hierarchy import harp_partition_order, leaf_hierarchy, partition_order
from harp_assets.leaf_utilities import leaf_utilities
from harp_assets.posteriors import phi_posteriors
from harp_assets.selections import SELECTION_ASSETS, excluded_ids, newest_selection, record_selection
from harp_assets.sources import pool_examples
from harp_resources import (
    EvaluatorResource,
    FinetunerResource,
    LineageResource,
    SettingsResource,
    ValidationResource,
)

VALIDATED_METHODS = ("harp_c", "harp_e", "tsds", "random", "exhaustive")


def all_leaf_measurements(
    lineage: LineageStore, finetuner: object, evaluator: object, settings: HarpSettings
) -> tuple[dict[int, np.ndarray], list[str]]:
    """Correctness of every current leaf, keyed by leaf index, aligned with the base evaluation; and the ids
    of the leaves not measured or stale (which the exhaustive mode needs measured first)."""
    table = store.load_leaf_table(lineage)
    base, _ = store.load_base(lineage)
    fresh, _ = store.read_measurements(lineage, store.leaf_versions(lineage, finetuner, evaluator, settings.seed))
    missing = sorted(set(table.leaf_ids.tolist()) - set(fresh))
    return store.aligned_correctness(fresh, table, base), missing


@dg.asset(group_name=VALIDATION, kinds={"numpy"},
          deps=[leaf_utilities, leaf_hierarchy, base_model_scores, phi_posteriors])
def exhaustive_selection(
    context: dg.AssetExecutionContext,
    settings: SettingsResource,
    finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    """The oracle: every leaf measured, the primary envelope selecting on those effects at the same budget."""
    t0 = time.perf_counter()
    table = store.load_leaf_table(lineage)
    measurements, missing = all_leaf_measurements(lineage, finetuner, evaluator, settings)
    if missing:
        raise ValueError(
            f"the exhaustive mode needs every leaf measured; {len(missing)} of {table.n_leaves} are not (or are "
            f"stale), e.g. {missing[:5]}: run `make validate` (harp_assets.runner.run_validation registers every leaf "
            "as a leaf_utilities partition and measures it)"
        )
    base, meta = store.load_base(lineage)
    domains = list(meta["domains"])
    fit = driver.fit_posteriors(table, measurements, base, domains, n_boot=settings.n_boot, seed=settings.seed)
    effects, post = fit.effects, fit.posteriors
    b = stages.base_scores(base, domains)
    excluded = excluded_ids(settings, lineage)
    sel = stages.select_harp(post, b, table, envelope=settings.primary_envelope,
                             top_k_points=settings.top_k_points, z_active=settings.z_active,
                             exclude_rows=np.flatnonzero(np.isin(table.example_ids, list(excluded))) if excluded
                             else None)
    ids = table.example_ids[sel.example_rows.tolist()].tolist()
    active = np.asarray(sel.active, dtype=bool)
    pred = np.asarray(sel.predicted_rows, dtype=np.float64)
    md = record_selection(context, lineage, "exhaustive", ids, settings.top_k_points,
                 np.asarray(sel.row_gain, dtype=np.float64).tolist(),
                 float(pred[active].mean()) if active.any() else None, commit=True)
    # How well HARP's posteriors (from its own leaves only) rank the effects the oracle measured.
    harp_post, pmeta = store.load_posteriors(lineage)
    phi_all = effects.phi_hat  # rows follow idx = every leaf, in index order
    inferred = ~harp_post.measured
    act = active_domains(harp_post.mean, harp_post.sd, z=settings.z_active) | active
    rho_all = spearman(harp_post.mean[:, act], phi_all[:, act]) if act.any() else float("nan")
    rho_inf = (spearman(harp_post.mean[inferred][:, act], phi_all[inferred][:, act])
               if act.any() and inferred.any() else float("nan"))
    md.update({
        "envelope": settings.primary_envelope,
        "train_eval_runs": len(measurements),
        "harp_leaves_measured": len(pmeta["measured_leaves"]),
        "spearman_posterior_vs_exhaustive": round(rho_all, 4),
        "spearman_inferred_leaves": round(rho_inf, 4),
        "predicted_per_domain": dg.MetadataValue.json(
            {d: round(float(v), 4) for d, v in zip(domains, pred, strict=True)}),
        "note": sel.note or "",
        "seconds": round(time.perf_counter() - t0, 3),
    })
    context.log.info(f"exhaustive: {len(ids)} examples from {table.n_leaves} measured leaves; "
                     f"Spearman(HARP posterior, measured) = {rho_all:.3f} ({rho_inf:.3f} on inferred leaves)")
    return dg.MaterializeResult(metadata=md)


def _bar_plot(rows: list[dict], base: float) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    names = [r["method"] for r in rows]
    ax.bar(names, [r["accuracy"] for r in rows], color="#4c72b0")
    ax.axhline(base, color="k", linestyle="--", linewidth=1, label=f"base {base:.3f}")
    ax.set_ylabel("test accuracy (mean over domains)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"![validated accuracy](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


@dg.asset(group_name=VALIDATION, kinds={"pytorch", "duckdb"}, pool="gpu",
          deps=[*SELECTION_ASSETS.values(), exhaustive_selection, pool_examples])
def selection_validation(
    context: dg.AssetExecutionContext,
    validation: ValidationResource,
    validation_finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    """Each newest selection and the full pool, finetuned with one recipe and scored on the held-out split."""
    t0 = time.perf_counter()
    pool, version = store.load_pool_artifact(lineage)
    test = load_eval_set(validation.test_path)
    truth = load_ground_truth(validation.ground_truth_path) if validation.ground_truth_path else None
    by_id = {e: k for k, e in enumerate(pool["example_id"].to_list())}
    prompts, responses = pool["prompt"].to_list(), pool["response"].to_list()
    sets: list[tuple[str, str | None, list[str]]] = []
    for method in VALIDATED_METHODS:
        got = newest_selection(context.instance, lineage, method)
        if got is None:
            raise ValueError(f"{method}_selection has never been materialised on this instance: "
                             "materialise the selections (and exhaustive_selection) first")
        sets.append((method, *got))
    if validation.include_full_pool:
        sets.append(("full", None, pool["example_id"].to_list()))
    base_eval = stages.validate_examples(validation_finetuner, evaluator, [], [], test, seed=validation.seed)
    domains = sorted(base_eval.per_domain)
    base_mean = float(np.mean([base_eval.per_domain[d] for d in domains]))
    now = dt.datetime.now(dt.timezone.utc)
    vid = f"validation-{now:%Y%m%dT%H%M%S}-{sha16(context.run.run_id)[:8]}"
    frames, summary = [], []
    loop = stages.Progress(len(sets), context.log, what="validation finetune", plural="finetunes",
                           total_weight=sum(len(ids) for _m, _s, ids in sets), weight_unit="examples")
    for method, sid, ids in sets:
        absent = [e for e in ids if e not in by_id]
        if absent:
            raise ValueError(f"{method} selection {sid} names {len(absent)} example(s) not in the pool "
                             f"{version}, e.g. {absent[:3]}: materialise the selections again")
        rows = [by_id[e] for e in ids]
        m = stages.validate_examples(validation_finetuner, evaluator, [prompts[r] for r in rows],
                                     [responses[r] for r in rows], test, seed=validation.seed)
        shares = kind_shares(ids, truth, ("harmful", "redundant")) if truth is not None else None
        acc = float(np.mean([m.per_domain[d] for d in domains]))
        summary.append({"method": method, "examples": len(ids), "accuracy": acc,
                        "harmful_share": shares["harmful"] if shares else None,
                        "redundant_share": shares["redundant"] if shares else None,
                        "train_seconds": m.train_seconds})
        frames.append(pl.DataFrame({
            "validation_id": vid, "method": method, "selection_id": sid, "domain": domains,
            "accuracy": [float(m.per_domain[d]) for d in domains],
            "base_accuracy": [float(base_eval.per_domain[d]) for d in domains],
            "examples": len(ids), "harmful_share": shares["harmful"] if shares else None,
            "redundant_share": shares["redundant"] if shares else None, "train_seconds": m.train_seconds,
            "seed": validation.seed, "created_at": now, "run_id": context.run.run_id,
        }, schema_overrides={"examples": pl.Int32, "seed": pl.Int64, "selection_id": pl.String,
                             "harmful_share": pl.Float64, "redundant_share": pl.Float64,
                             "created_at": pl.Datetime("us", "UTC")}))
        loop.step(f"{method}, {len(ids)} examples -> test accuracy {acc:.3f} (base {base_mean:.3f}), "
                  f"{m.seconds:.1f} s", weight=len(ids))
    lineage.append_run("validation_results", vid, pl.concat(frames))
    lineage.refresh_catalog()
    oracle = next((r["accuracy"] for r in summary if r["method"] == "exhaustive"), None)
    lines = ["| method | examples | test accuracy | gain (points) | of oracle gain | harmful | redundant |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        frac = oracle_fraction(r["accuracy"], oracle, base_mean) if oracle is not None else float("nan")
        lines.append(
            f"| {r['method']} | {r['examples']} | {r['accuracy']:.3f} | {100 * (r['accuracy'] - base_mean):+.1f} | "
            + (f"{frac:.2f}" if np.isfinite(frac) else "-") + " | "
            + " | ".join(f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("harmful_share", "redundant_share"))
            + " |")
    md = {
        "validation_id": vid,
        "base_accuracy": round(base_mean, 4),
        "results": dg.MetadataValue.md("\n".join(lines)),
        "accuracy": dg.MetadataValue.json({r["method"]: round(r["accuracy"], 4) for r in summary}),
        "recipe_epochs": validation_finetuner.epochs,
        "test_examples": test.height,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    img = _bar_plot(summary, base_mean)
    if img:
        md["accuracy_plot"] = dg.MetadataValue.md(img)
    return dg.MaterializeResult(metadata=md)


def exhaustive_leaf_ids(lineage: LineageStore) -> list[str]:
    """Every current leaf: what the exhaustive mode measures (HARP's own leaves are among them, cached), in
    registration order: HARP's leaves first, then the rest in id order. Only this mode registers the rest
    as `leaves` partitions (`hierarchy.register_leaf_partitions`), so "Materialize all" trains them only
    after the exhaustive mode was asked for."""
    table = store.load_leaf_table(lineage)
    order = harp_partition_order(table, store.read_plan(lineage))
    harp = set(order)
    return order + [leaf for leaf in partition_order(table) if leaf not in harp]

