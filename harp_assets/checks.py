"""Asset checks on the unpartitioned assets, read from the lineage store and artifacts as the assets wrote them.

Leaf utilities are checked through `phi_posteriors` (an unpartitioned check on the partitioned asset would
load every partition). Every check returns passed=False with the offending ids in its metadata, never raises
on bad data.
"""


from collections import Counter

import dagster as dg
import numpy as np
import polars as pl

from harp_assets.leaf_utilities import leaf_versions, stored_version
from harp_assets.leaves import load_leaf_table
from harp_assets.posteriors import load_posteriors
from harp_assets.settings import HarpSettings
from harp_assets.sources import load_pool_artifact
from harp_resources.finetuner import LoraFinetuner
from harp_resources.lineage_store import LineageStore

SELECTION_ASSETS = {"harp_c_selection": "harp_c", "harp_e_selection": "harp_e", "tsds_selection": "tsds",
                    "random_selection": "random"}


def _result(problems: dict[str, list], **metadata) -> dg.AssetCheckResult:
    """Pass when no problem list is non-empty; each list's count and first ids go into the metadata."""
    md = {**metadata}
    for name, items in problems.items():
        md[name] = len(items)
        if items:
            md[f"{name}_examples"] = dg.MetadataValue.json([str(x) for x in items[:10]])
    return dg.AssetCheckResult(passed=not any(problems.values()), metadata=md)


@dg.asset_check(asset="leaf_hierarchy", description="Every pool example is in exactly one leaf.")
def every_example_in_one_leaf(lineage: LineageStore) -> dg.AssetCheckResult:
    """Checks the leaf table and the `examples` lineage table against the pool and the `leaves` table."""
    table = load_leaf_table(lineage)
    pool, _ = load_pool_artifact(lineage)
    pool_ids = pool["example_id"].to_list()
    ids = table.example_ids.tolist()
    repeated_in_table = sorted(e for e, n in Counter(ids).items() if n > 1)
    examples = lineage.read_table("examples")
    leaf_ids = set(lineage.read_table("leaves")["leaf_id"].to_list())
    counts = examples.group_by("example_id").len()
    in_leaf = dict(zip(table.example_ids.tolist(), table.leaf_ids[table.leaf_index_of_row].tolist(), strict=True))
    row_leaf = dict(examples.select("example_id", "leaf_id").iter_rows())
    return _result(
        {
            "pool_examples_without_leaf": sorted((set(pool_ids) - set(ids)) | (set(pool_ids) - set(row_leaf))),
            "leaf_members_outside_pool": sorted(set(ids) - set(pool_ids)),
            "examples_in_several_leaves": repeated_in_table
            + counts.filter(pl.col("len") > 1)["example_id"].sort().to_list(),
            "examples_in_unknown_leaves": sorted(e for e, g in row_leaf.items() if g not in leaf_ids),
            "examples_table_disagrees_with_leaf_table": sorted(
                e for e, g in row_leaf.items() if in_leaf.get(e, g) != g),
        },
        examples=len(pool_ids),
        leaves=len(leaf_ids),
    )


@dg.asset_check(
    asset="phi_posteriors",
    description="Every representative leaf has stored utilities carrying the current data version, used by the fit.",
)
def representatives_measured_and_current(
    lineage: LineageStore, finetuner: LoraFinetuner, settings: HarpSettings
) -> dg.AssetCheckResult:
    """Compares each representative's stored data version with the expected one (members, model, eval, recipe, seed)."""
    table = load_leaf_table(lineage)
    versions = leaf_versions(lineage, finetuner, settings)
    reps = sorted(table.leaf_ids[table.representative].tolist())
    stored = {leaf: stored_version(lineage, leaf) for leaf in reps}
    _, meta = load_posteriors(lineage)
    used = set(meta.get("measured_leaves", []))
    return _result(
        {
            "unmeasured": [leaf for leaf in reps if stored[leaf] is None],
            "stale": [leaf for leaf in reps if stored[leaf] is not None and stored[leaf] != versions[leaf]],
            "not_in_posteriors": [leaf for leaf in reps if leaf not in used],
        },
        representatives=len(reps),
    )


@dg.asset_check(asset="phi_posteriors", description="Posterior means and sds are finite (sd >= 0) for every leaf and domain.")
def posteriors_finite(lineage: LineageStore) -> dg.AssetCheckResult:
    """Reads the queryable `phi_posteriors` table, the one data teams see."""
    table = load_leaf_table(lineage)
    post = lineage.read_table("phi_posteriors")
    bad = post.filter(~pl.col("mean").is_finite() | ~pl.col("sd").is_finite() | (pl.col("sd") < 0))
    n_dom = post["domain"].n_unique()
    covered = post.group_by("leaf_id").len()
    short = covered.filter(pl.col("len") != n_dom)["leaf_id"].to_list()
    missing = sorted(set(table.leaf_ids.tolist()) - set(covered["leaf_id"].to_list()))
    return _result(
        {"non_finite_rows": [f"{r['leaf_id']}/{r['domain']}" for r in bad.iter_rows(named=True)],
         "leaves_missing": missing + short},
        rows=post.height,
        max_abs_mean=float(np.nanmax(np.abs(post["mean"].to_numpy()))) if post.height else 0.0,
    )


def _selection_check(asset: str, method: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name=f"{method}_within_budget_and_pool",
        description="The latest selection is within the budget, has no repeats and only pool examples.",
    )
    def _check(context: dg.AssetCheckExecutionContext, lineage: LineageStore, settings: HarpSettings) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
        mat = event.asset_materialization if event is not None else None
        if mat is None or "selection_id" not in mat.metadata:
            return dg.AssetCheckResult(passed=False, metadata={"error": f"{asset} has no materialisation with a selection_id"})
        sid = str(mat.metadata["selection_id"].value)
        rows = lineage.read_partition("selections", sid)
        if rows is None:
            return dg.AssetCheckResult(passed=False, metadata={"error": f"selection {sid} is not in the selections table"})
        pool, _ = load_pool_artifact(lineage)
        pool_ids = set(pool["example_id"].to_list())
        ids = rows["example_id"].to_list()
        over = [f"{len(ids)} > {settings.top_k_points}"] if len(ids) > settings.top_k_points else []
        return _result(
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


CHECKS = [every_example_in_one_leaf, representatives_measured_and_current, posteriors_finite,
          *(_selection_check(a, m) for a, m in SELECTION_ASSETS.items())]
