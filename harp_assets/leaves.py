"""The leaf hierarchy under stable string leaf ids, and the `leaves` dynamic partitions that follow it.

First build: cluster the pool (`stages.build_hierarchy`). Later builds keep the persisted leaf table and fold
new examples in (`grow_leaf_table`), so a leaf that gained nothing keeps its id, member hash and cached
utility. A pool that lost examples, or embeddings of another dimension, forces a fresh build.
"""


import datetime as dt
import time

import dagster as dg
import numpy as np
import polars as pl

from harp_assets import stages
from harp_assets.embeddings import load_embeddings
from harp_assets.method import LeafTable, grow_leaf_table, leaf_table_from_hierarchy
from harp_assets.settings import GROUP, HarpSettings, artifacts_dir, sha16, write_json_atomic
from harp_assets.sources import load_pool_artifact
from harp_resources.lineage_store import LineageStore

LEAVES_PARTITIONS = dg.DynamicPartitionsDefinition(name="leaves")
LEAF_TABLE_FILE = "leaf_table.npz"


def load_leaf_table(lineage: LineageStore) -> LeafTable:
    path = artifacts_dir(lineage) / LEAF_TABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialise the leaf_hierarchy asset first")
    return LeafTable.from_npz(path)


def partition_order(table: LeafTable) -> list[str]:
    """Leaf ids, representatives first (so one partition range covers them), each block in id order."""
    reps = sorted(table.leaf_ids[table.representative].tolist())
    rest = sorted(table.leaf_ids[~table.representative].tolist())
    return reps + rest


def _build(X: np.ndarray, ids: np.ndarray, settings: HarpSettings) -> LeafTable:
    h = stages.build_hierarchy(X, seed=settings.seed, config=settings.hierarchy_config())
    return leaf_table_from_hierarchy(h, ids)


@dg.asset(group_name=GROUP, kinds={"faiss", "numpy"}, deps=["example_embeddings", "pool_examples"])
def leaf_hierarchy(
    context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore
) -> dg.MaterializeResult:
    """Region -> parent -> leaf tree over the pool; leaf ids stay stable as the pool grows."""
    t0 = time.perf_counter()
    pool, version = load_pool_artifact(lineage)
    ids, X, model_id = load_embeddings(lineage)
    if ids.tolist() != pool["example_id"].to_list():
        raise ValueError("embeddings and pool disagree on the example ids: materialise example_embeddings again")
    path = artifacts_dir(lineage) / LEAF_TABLE_FILE
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
    write_json_atomic(artifacts_dir(lineage) / "leaf_hierarchy.json", {
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
