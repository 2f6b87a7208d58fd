"""The leaf hierarchy under stable string leaf ids, and the `leaves` dynamic partitions that follow it.

First build: cluster the pool (`stages.build_hierarchy`). Later builds keep the persisted leaf table and update
it (`stages.update_leaf_table`): measured leaves keep their member sets, so their cached utilities stay exact;
new examples near them gather in delta leaves; a removed or edited example makes only its own leaf stale.
Each measured leaf's drift (how far its members moved since its measurement) is in the catalog's `leaf_drift`
view and, for leaves that changed, on the leaf's partition in the UI as an observation.

The `leaves` partitions are the leaves HARP means to measure, not every leaf: the representatives, then each
active round's picks (`active_round_plan` registers those), plus every leaf only once the exhaustive
validation mode asks for them (`register_leaf_partitions`). So a partition shown as missing is pending HARP
work, and "Materialize all" trains what HARP would. A registered leaf that is not HARP's keeps its partition
while it has a stored measurement; a leaf that left the hierarchy loses its partition, its rows stay.
"""


import datetime as dt
import time
from collections import Counter
from collections.abc import Iterable

import dagster as dg
import numpy as np
import polars as pl

from harp import stages, store
from harp.method import LeafTable, LeafTableFormatError
from harp.versions import content_hashes, sha16
from harp_assets.checking import check_result
from harp_assets.embeddings import example_embeddings
from harp_assets.groups import PREPARE
from harp_assets.sources import pool_examples
from harp_resources import LineageResource, SettingsResource

LEAVES_PARTITIONS = dg.DynamicPartitionsDefinition(name="leaves")
LEAF_UTILITIES_KEY = dg.AssetKey("leaf_utilities")


def partition_order(table: LeafTable) -> list[str]:
    """Leaf ids, representatives first (so one partition range covers them), each block in id order."""
    reps = sorted(table.leaf_ids[table.representative].tolist())
    rest = sorted(table.leaf_ids[~table.representative].tolist())
    return reps + rest


def harp_partition_order(table: LeafTable, rounds: list[dict]) -> list[str]:
    """HARP's leaves in registration order: the representatives (id order), then each planned round's picks
    in the order the round ranked them; leaves no longer in the table are left out."""
    current = set(table.leaf_ids.tolist())
    order = sorted(table.leaf_ids[table.representative].tolist())
    for r in rounds:
        order += [leaf for leaf in r["leaves"] if leaf in current]
    return list(dict.fromkeys(order))


def measurement_reasons(table: LeafTable, rounds: list[dict]) -> dict[str, str]:
    """Why each current leaf is (or would be) measured: "representative", "active round <k>" (the first round
    that picked it), or "exhaustive" (only the exhaustive validation mode measures it; HARP never reads it)."""
    reasons = dict.fromkeys(table.leaf_ids.tolist(), "exhaustive")
    for r in reversed(rounds):  # the earliest round that picked a leaf wins
        for leaf in r["leaves"]:
            if leaf in reasons:
                reasons[leaf] = f"active round {r['round']}"
    for leaf in table.leaf_ids[table.representative].tolist():
        reasons[leaf] = "representative"
    return reasons


def register_leaf_partitions(instance: dg.DagsterInstance, leaf_ids: Iterable[str]) -> list[str]:
    """Register the `leaves` partitions of `leaf_ids` not registered yet, in the given order (new keys go to
    the end of the registry, so each call's keys form contiguous ranges); returns the keys added."""
    known = set(instance.get_dynamic_partitions(LEAVES_PARTITIONS.name))
    fresh = [k for k in dict.fromkeys(leaf_ids) if k not in known]
    if fresh:
        instance.add_dynamic_partitions(LEAVES_PARTITIONS.name, fresh)
    return fresh


def registration_observations(fresh: list[str], reasons: dict[str, str]) -> list[dg.AssetObservation]:
    """One observation per newly registered partition saying why HARP measures it, so a partition still
    missing already shows in the UI whether it is a representative or an active round's pick."""
    return [dg.AssetObservation(asset_key=LEAF_UTILITIES_KEY, partition=leaf,
                                metadata={"registered_because": reasons.get(leaf, "exhaustive"),
                                          "is_representative": reasons.get(leaf) == "representative"})
            for leaf in fresh]


def _drift_observations(drift: pl.DataFrame, changed: set[str]) -> list[dg.AssetObservation]:
    """One observation per measured leaf whose members changed, shown on its `leaf_utilities` partition."""
    out = []
    for row in drift.filter(pl.col("leaf_id").is_in(changed)).iter_rows(named=True):
        current = row["current_member_hash"]
        out.append(dg.AssetObservation(
            asset_key=LEAF_UTILITIES_KEY,
            partition=row["leaf_id"],
            metadata={
                "measured_member_hash": row["measured_member_hash"] or "",
                "current_member_hash": current,
                "drift": round(float(row["drift"]), 4),
                "members_added": int(row["members_added"]),
                "members_removed": int(row["members_removed"]),
                "measurement_stale": current != row["measured_member_hash"],
            },
        ))
    return out


@dg.asset(group_name=PREPARE, kinds={"faiss", "numpy"}, deps=[example_embeddings, pool_examples])
def leaf_hierarchy(
    context: dg.AssetExecutionContext, settings: SettingsResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """Region -> parent -> leaf tree over the pool; measured leaves keep their members as the pool changes."""
    t0 = time.perf_counter()
    pool, version = store.load_pool_artifact(lineage)
    ids, X, model_id = store.load_embeddings(lineage)
    if ids.tolist() != pool["example_id"].to_list():
        raise ValueError("embeddings and pool disagree on the example ids: materialise example_embeddings again")
    content = content_hashes(pool["prompt"].to_list(), pool["response"].to_list())
    path = store.leaf_table_path(lineage)
    previous, reason = None, None
    if path.is_file():
        try:
            previous = LeafTable.from_npz(path)
        except LeafTableFormatError as exc:
            reason = f"the stored leaf table has another format ({exc})"
    measured = store.measured_leaf_ids(lineage)
    update = stages.update_leaf_table(
        previous, X, ids.tolist(), content, seed=settings.seed, config=settings.hierarchy_config(),
        max_leaf_size=settings.max_leaf_size, frozen=sorted(measured), known_leaf_ids=sorted(measured),
        rebuild_reason=reason,
    )
    if update.reason:
        context.log.warning(f"rebuilding the hierarchy: {update.reason}; cached leaf utilities will not match")
    table, how, growth = update.table, update.how, update.growth
    table.to_npz(path)

    # Lineage tables: leaves and examples (examples keep the time they first joined).
    cols = table.leaf_columns()
    leaves = pl.DataFrame({
        "leaf_id": cols["leaf_id"].tolist(),
        "parent_id": cols["parent_id"].tolist(),
        "region_id": [f"R{int(r):03d}" for r in cols["region"].tolist()],
        "size": cols["size"].astype(np.int32),
        "member_hash": cols["member_hash"].tolist(),
        "is_representative": cols["representative"].astype(bool),
        "pool_version": [version] * table.n_leaves,
    })
    lineage.write_table("leaves", leaves)
    rank = np.empty(table.n_examples, dtype=np.int32)
    sizes = table.leaf_sizes
    for g in range(table.n_leaves):
        rank[table.members(g)] = np.arange(sizes[g], dtype=np.int32)
    g_of = table.leaf_index_of_row
    now = dt.datetime.now(dt.timezone.utc)
    before = lineage.read_table("examples").select("example_id", "added_at")
    pool_by_id = pool.select("example_id", "prompt", "response", "source")
    examples = (
        pl.DataFrame({
            "example_id": table.example_ids.tolist(),
            "leaf_id": table.leaf_ids[g_of].tolist(),
            "parent_id": table.parent_ids[table.parent_of_leaf[g_of]].tolist(),
            "region_id": [f"R{int(r):03d}" for r in table.region_of_parent[table.parent_of_leaf[g_of]].tolist()],
            "rank_in_leaf": rank,
        })
        .join(pool_by_id, on="example_id", how="left")
        .join(before, on="example_id", how="left")
        .with_columns(
            pl.lit(version).alias("pool_version"),
            pl.col("added_at").fill_null(pl.lit(now).cast(pl.Datetime("us", "UTC"))),
        )
        .join(pl.DataFrame({"example_id": table.example_ids.tolist(),
                            "content_hash": table.example_content.tolist()}), on="example_id", how="left")
    )
    lineage.write_table("examples", examples)
    drift = store.leaf_drift(lineage)

    # The partitions are HARP's leaves (representatives, then the planned rounds' picks still current).
    rounds = store.read_plan(lineage)
    order = harp_partition_order(table, rounds)
    current = set(table.leaf_ids.tolist())
    known = set(context.instance.get_dynamic_partitions(LEAVES_PARTITIONS.name))
    # Leaves retired (split, emptied, or a rebuild) leave the partition list; their stored rows stay as history.
    retired = sorted(known - current)
    # A current leaf that is not HARP's (registered by the exhaustive mode, or by an older version that
    # registered every leaf) keeps its partition while a measurement of it is stored; else it goes, so
    # "Materialize all" never trains it.
    unplanned = sorted((known & current) - set(order) - measured)
    for key in retired + unplanned:
        context.instance.delete_dynamic_partition(LEAVES_PARTITIONS.name, key)
    fresh = register_leaf_partitions(context.instance, order)
    for obs in registration_observations(fresh, measurement_reasons(table, rounds)):
        context.log_event(obs)
    reps = sorted(table.leaf_ids[table.representative].tolist())
    store.write_hierarchy_meta(lineage, {
        "how": how, "pool_version": version, "embedder": model_id, "representatives": reps,
        "changed": growth.changed if growth else None, "reason": update.reason,
    })
    meta = {
        "how": how,
        "examples": table.n_examples,
        "leaves": table.n_leaves,
        "parents": table.n_parents,
        "regions": int(np.unique(table.region_of_parent).size),
        "representatives": len(reps),
        "new_partitions": len(fresh),
        "retired_partitions": len(retired),
        "unplanned_partitions_removed": len(unplanned),
        "registered_partitions": len(context.instance.get_dynamic_partitions(LEAVES_PARTITIONS.name)),
        "representative_ids": dg.MetadataValue.json(reps),
        "leaf_size_min_median_max": f"{int(sizes.min())} / {int(np.median(sizes))} / {int(sizes.max())}",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if growth is not None:
        meta.update(added_examples=growth.n_added, removed_examples=growth.n_removed,
                    edited_examples=growth.n_edited, leaves_grown=len(growth.grown),
                    leaves_shrunk=len(growth.shrunk), leaves_split=len(growth.split),
                    leaves_retired=len(growth.retired), leaves_new=len(growth.new),
                    delta_leaves_opened=len(growth.delta), examples_deferred_to_delta_leaves=growth.deferred,
                    leaves_unchanged=len(growth.unchanged))
        for obs in _drift_observations(drift, set(growth.changed)):
            context.log_event(obs)
    meta["measured_leaves_drifted"] = int((drift["drift"] > 0).sum())
    return dg.MaterializeResult(
        metadata=meta,
        data_version=dg.DataVersion(sha16(table.leaf_ids.tolist(), table.member_hashes().tolist())),
    )


@dg.asset_check(asset=leaf_hierarchy, description="Every pool example is in exactly one leaf.")
def every_example_in_one_leaf(lineage: LineageResource) -> dg.AssetCheckResult:
    """Checks the leaf table and the `examples` lineage table against the pool and the `leaves` table."""
    table = store.load_leaf_table(lineage)
    pool, _ = store.load_pool_artifact(lineage)
    pool_ids = pool["example_id"].to_list()
    ids = table.example_ids.tolist()
    repeated_in_table = sorted(e for e, n in Counter(ids).items() if n > 1)
    examples = lineage.read_table("examples")
    leaf_ids = set(lineage.read_table("leaves")["leaf_id"].to_list())
    counts = examples.group_by("example_id").len()
    in_leaf = dict(zip(table.example_ids.tolist(), table.leaf_ids[table.leaf_index_of_row].tolist(), strict=True))
    row_leaf = dict(examples.select("example_id", "leaf_id").iter_rows())
    return check_result(
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
