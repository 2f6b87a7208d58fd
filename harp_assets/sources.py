"""The pool and the proxy eval set, read from the configured source and frozen as artifacts.

Downstream assets read these artifacts rather than the source, so every stage of one run sees the same
pool even when files are added to the source meanwhile.
"""


import time

import dagster as dg
import polars as pl

from harp_assets.settings import (
    GROUP,
    artifacts_dir,
    eval_set_hash,
    read_json,
    read_parquet,
    write_json_atomic,
    write_parquet_atomic,
)
from harp_resources.lineage_store import LineageStore
from harp_resources.pool_source import PoolSource, pool_version

POOL_FILE = "pool.parquet"
POOL_META = "pool.json"
EVAL_FILE = "eval_set.parquet"
EVAL_META = "eval_set.json"


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def pool_examples(context: dg.AssetExecutionContext, pool_source: PoolSource, lineage: LineageStore) -> dg.MaterializeResult:
    """The candidate training pool (example_id, prompt, response, source file), validated and versioned."""
    t0 = time.perf_counter()
    pool = pool_source.load_pool().select("example_id", "prompt", "response", "source")
    version = pool_version(pool)
    out = artifacts_dir(lineage)
    write_parquet_atomic(pool, out / POOL_FILE)
    write_json_atomic(out / POOL_META, {"pool_version": version, "n_examples": pool.height,
                                        "files": [f.name for f in pool_source.files()]})
    context.log.info(f"pool: {pool.height} examples from {len(pool_source.files())} file(s), version {version}")
    return dg.MaterializeResult(
        metadata={
            "examples": pool.height,
            "files": len(pool_source.files()),
            "pool_version": version,
            "source": str(pool_source.resolved_pool_path()),
            "seconds": round(time.perf_counter() - t0, 3),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(group_name=GROUP, kinds={"polars", "parquet"})
def proxy_eval_set(context: dg.AssetExecutionContext, pool_source: PoolSource, lineage: LineageStore) -> dg.MaterializeResult:
    """The proxy eval set whose per-domain accuracy defines a leaf's utility; also TSDS's query examples."""
    ev = pool_source.load_eval_set()
    digest = eval_set_hash(ev)
    out = artifacts_dir(lineage)
    write_parquet_atomic(ev, out / EVAL_FILE)
    per_domain = ev.group_by("domain").len().sort("domain")
    write_json_atomic(out / EVAL_META, {"eval_hash": digest, "n_examples": ev.height})
    return dg.MaterializeResult(
        metadata={
            "examples": ev.height,
            "examples_per_domain": dg.MetadataValue.json(dict(per_domain.iter_rows())),
            "eval_hash": digest,
            "source": str(pool_source.resolved_eval_path()),
        },
        data_version=dg.DataVersion(digest),
    )


def load_pool_artifact(lineage: LineageStore) -> tuple[pl.DataFrame, str]:
    out = artifacts_dir(lineage)
    return read_parquet(out / POOL_FILE, "pool_examples"), read_json(out / POOL_META, "pool_examples")["pool_version"]


def load_eval_artifact(lineage: LineageStore) -> tuple[pl.DataFrame, str]:
    out = artifacts_dir(lineage)
    return read_parquet(out / EVAL_FILE, "proxy_eval_set"), read_json(out / EVAL_META, "proxy_eval_set")["eval_hash"]
