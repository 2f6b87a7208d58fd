"""The leaf hierarchy under stable string leaf ids, and the `leaves` dynamic partitions that follow it.

First build: cluster the pool (`stages.build_hierarchy`). Later builds keep the persisted leaf table and fold
new examples in (`grow_leaf_table`), so a leaf that gained nothing keeps its id, member hash and cached
utility. A pool that lost examples, or embeddings of another dimension, forces a fresh build.
"""


import datetime as dt
import time
from collections import Counter

import dagster as dg
import numpy as np
import polars as pl

from harp import stages, store
from harp.config import HarpSettings
from harp.method import LeafTable, grow_leaf_table, leaf_table_from_hierarchy
from harp.versions import sha16
from harp_assets.checking import check_result
from harp_assets.embeddings import example_embeddings
from harp_assets.groups import PREPARE
from harp_assets.sources import pool_examples
from harp_resources import LineageResource, SettingsResource

LEAVES_PARTITIONS = dg.DynamicPartitionsDefinition(name="leaves")


def partition_order(table: LeafTable) -> list[str]:
    """Leaf ids, representatives first (so one partition range covers them), each block in id order."""
    reps = sorted(table.leaf_ids[table.representative].tolist())
    rest = sorted(table.leaf_ids[~table.representative].tolist())
    return reps + rest


def _build(X: np.ndarray, ids: np.ndarray, settings: HarpSettings) -> LeafTable:
    h = stages.build_hierarchy(X, seed=settings.seed, config=settings.hierarchy_config())
    return leaf_table_from_hierarchy(h, ids)


@dg.asset(group_name=PREPARE, kinds={"faiss", "numpy"}, deps=[example_embeddings, pool_examples])
def leaf_hierarchy(
    context: dg.AssetExecutionContext, settings: SettingsResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """Region -> parent -> leaf tree over the pool; leaf ids stay stable as the pool grows."""
    t0 = time.perf_counter()
    pool, version = store.load_pool_artifact(lineage)
    ids, X, model_id = store.load_embeddings(lineage)
    if ids.tolist() != pool["example_id"].to_list():
        raise ValueError("embeddings and pool disagree on the example ids: materialise example_embeddings again")
    path = store.leaf_table_path(lineage)
    how, growth = "built", None
    if path.is_file():
        old = LeafTable.from_npz(path)
        old_ids, new_ids = set(old.example_ids.tolist()), set(ids.tolist())
        if old.dim != X.shape[1] or not old_ids <= new_ids:
            context.log.warning(
                f"rebuilding the hierarchy: {len(old_ids - new_ids)} example(s) left the pool or the embedding "
                f"dimension changed ({old.dim} -> {X.shape[1]}); cached leaf utilities will not match"
            )
            table = _build(X, ids, settings)
            how = "rebuilt"
        elif old_ids == new_ids:
            table, how = old, "unchanged"
        else:
            growth = grow_leaf_table(
                old, X, ids, max_leaf_size=settings.max_leaf_size,
                n_representatives=settings.n_representatives, seed=settings.seed,
            )
            table, how = growth.table, "grown"
    else:
        table = _build(X, ids, settings)
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
    )
    lineage.write_table("examples", examples)

    order = partition_order(table)
    known = set(context.instance.get_dynamic_partitions(LEAVES_PARTITIONS.name))
    fresh = [k for k in order if k not in known]
    if fresh:
        context.instance.add_dynamic_partitions(LEAVES_PARTITIONS.name, fresh)
    # Leaves retired by a split (or a rebuild) leave the partition list; their stored rows stay as history.
    retired = sorted(known - set(order))
    for key in retired:
        context.instance.delete_dynamic_partition(LEAVES_PARTITIONS.name, key)
    reps = [k for k in order if k in set(table.leaf_ids[table.representative].tolist())]
    store.write_hierarchy_meta(lineage, {
        "how": how, "pool_version": version, "embedder": model_id, "representatives": reps,
        "changed": growth.changed if growth else None,
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
        "leaf_size_min_median_max": f"{int(sizes.min())} / {int(np.median(sizes))} / {int(sizes.max())}",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if growth is not None:
        meta.update(added_examples=growth.n_added, leaves_grown=len(growth.grown), leaves_split=len(growth.split),
                    leaves_new=len(growth.new), leaves_unchanged=len(growth.unchanged))
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
