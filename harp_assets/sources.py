"""The pool and the proxy eval set, read from the configured source and frozen as artifacts.

Downstream assets read these artifacts rather than the source, so every stage of one run sees the same
pool even when files are added to the source meanwhile.
"""


import time

import dagster as dg

from harp import store
from harp.chat import ChatTemplate
from harp.sources import pool_version
from harp.versions import eval_set_hash
from harp_assets.groups import PREPARE
from harp_resources import FinetunerResource, LineageResource, PoolSourceResource


@dg.asset(group_name=PREPARE, kinds={"polars", "parquet"})
def pool_examples(
    context: dg.AssetExecutionContext, pool_source: PoolSourceResource, lineage: LineageResource,
    finetuner: FinetunerResource,
) -> dg.MaterializeResult:
    """The candidate training pool (example_id, prompt, response, source file), validated and versioned.

    Chat rows (`messages`) are rendered with the base model's own chat template (`harp.chat`).
    """
    t0 = time.perf_counter()
    render = ChatTemplate(finetuner.base_model, trust_remote_code=finetuner.trust_remote_code)
    pool = pool_source.load_pool(render).select("example_id", "prompt", "response", "source")
    version = pool_version(pool)
    files = [f.name for f in pool_source.files()]
    store.write_pool(lineage, pool, version, files)
    context.log.info(f"pool: {pool.height} examples from {len(files)} file(s), version {version}")
    return dg.MaterializeResult(
        metadata={
            "examples": pool.height,
            "files": len(files),
            "pool_version": version,
            "source": str(pool_source.resolved_pool_path()),
            "seconds": round(time.perf_counter() - t0, 3),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(group_name=PREPARE, kinds={"polars", "parquet"})
def proxy_eval_set(
    context: dg.AssetExecutionContext, pool_source: PoolSourceResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """The proxy eval set whose per-domain accuracy defines a leaf's utility; also TSDS's query examples."""
    ev = pool_source.load_eval_set()
    digest = eval_set_hash(ev)
    store.write_eval(lineage, ev, digest)
    per_domain = ev.group_by("domain").len().sort("domain")
    return dg.MaterializeResult(
        metadata={
            "examples": ev.height,
            "examples_per_domain": dg.MetadataValue.json(dict(per_domain.iter_rows())),
            "eval_hash": digest,
            "source": str(pool_source.resolved_eval_path()),
        },
        data_version=dg.DataVersion(digest),
    )
