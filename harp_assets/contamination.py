"""The contamination guard: pool examples that nearly duplicate a proxy-eval or test item.

A selection that trains on copies of the items it is scored on reports memorisation, not the effect of its
data. This asset flags such examples by two signals (13-gram coverage of the item, embedding cosine;
`harp/method/contamination.py`) in the `contamination` lineage table; every selection leaves them out unless
`settings.exclude_contaminated` is off, and says how many it left out.
"""

import hashlib
import json
import time
from pathlib import Path

import dagster as dg
import polars as pl

from harp import stages, store
from harp.contracts import load_eval_set
from harp.io import read_json, write_json
from harp.versions import eval_set_hash
from harp_assets.embeddings import example_embeddings
from harp_assets.groups import PREPARE
from harp_assets.sources import pool_examples, proxy_eval_set
from harp_resources import EmbedderResource, LineageResource, SettingsResource, ValidationResource


@dg.asset(group_name=PREPARE, kinds={"numpy", "parquet"}, deps=[pool_examples, proxy_eval_set, example_embeddings])
def pool_contamination(
    context: dg.AssetExecutionContext, settings: SettingsResource, embedder: EmbedderResource,
    lineage: LineageResource, validation: ValidationResource,
) -> dg.MaterializeResult:
    """Pool examples flagged as near copies of a proxy-eval or test item; kept out of every selection."""
    t0 = time.perf_counter()
    pool, version = store.load_pool_artifact(lineage)
    ids, X, model_id = store.load_embeddings(lineage)
    if model_id != embedder.model_id:
        raise ValueError(f"pool embeddings come from {model_id}, the embedder is {embedder.model_id}: "
                         "materialise example_embeddings again")
    by_id = dict(zip(pool["example_id"].to_list(), zip(pool["prompt"].to_list(), pool["response"].to_list(),
                                                       strict=True), strict=True))
    texts = [stages.embed_text(*by_id[e]) for e in ids.tolist()]
    proxy, eval_hash = store.load_eval_artifact(lineage)
    evals = {"proxy": proxy}
    test = Path(validation.test_path)
    if test.is_file():  # the held-out split the validation scores on, when this deployment has one
        evals["test"] = load_eval_set(test)
    # What the flags depend on: the pool, both eval sets, the embedder and the thresholds. Unchanged: reuse.
    key = hashlib.sha256(json.dumps([version, eval_hash, eval_set_hash(evals["test"]) if "test" in evals else None,
                                     model_id, settings.contamination_ngram, settings.contamination_coverage,
                                     settings.contamination_cosine]).encode()).hexdigest()[:16]
    key_file = store.artifacts_dir(lineage) / "contamination_key.json"
    if key_file.is_file() and read_json(key_file, "pool_contamination").get("key") == key:
        found = lineage.read_table("contamination")
        return dg.MaterializeResult(metadata={
            "flagged_examples": found["example_id"].n_unique(), "reused": True, "inputs_key": key,
            "excluded_from_selections": settings.exclude_contaminated,
            "seconds": round(time.perf_counter() - t0, 3)})
    sets = {}
    for name, ev in evals.items():
        item_texts = stages.eval_item_texts(ev)
        sets[name] = (ev["example_id"].to_list(), item_texts, embedder.embed(item_texts))
    found = stages.find_contamination(
        ids.tolist(), texts, X, sets, ngram=settings.contamination_ngram,
        min_coverage=settings.contamination_coverage, cosine=settings.contamination_cosine)
    store.write_contamination(lineage, found.with_columns(pool_version=pl.lit(version)))
    write_json(key_file, {"key": key})
    flagged = found["example_id"].unique().to_list()
    context.log.info(f"contamination guard: {len(flagged)} of {len(ids)} pool examples nearly duplicate an "
                     f"item of {', '.join(f'{k} ({v.height} items)' for k, v in evals.items())}")
    return dg.MaterializeResult(metadata={
        "flagged_examples": len(flagged),
        "pairs_by_signal": dg.MetadataValue.json(
            {k: int(v) for k, v in found.group_by("kind").len().iter_rows()}),
        "pairs_by_eval_set": dg.MetadataValue.json(
            {k: int(v) for k, v in found.group_by("eval_set").len().iter_rows()}),
        "eval_sets": dg.MetadataValue.json({k: v.height for k, v in evals.items()}),
        "excluded_from_selections": settings.exclude_contaminated,
        "thresholds": dg.MetadataValue.json({"ngram": settings.contamination_ngram,
                                             "coverage": settings.contamination_coverage,
                                             "cosine": settings.contamination_cosine}),
        "examples": dg.MetadataValue.json(found.sort("score", descending=True).head(20).to_dicts()),
        "reused": False,
        "inputs_key": key,
        "seconds": round(time.perf_counter() - t0, 3),
    })

