"""The base model's proxy-set scores `b_d`: the null every leaf's utility is measured against."""

import time

import dagster as dg

from harp import stages, store
from harp.versions import base_model_id, base_scores_key, sha16
from harp_assets.groups import PREPARE
from harp_assets.sources import proxy_eval_set
from harp_resources import EvaluatorResource, FinetunerResource, LineageResource


@dg.asset(group_name=PREPARE, kinds={"pytorch"}, deps=[proxy_eval_set], pool="gpu")
def base_model_scores(
    context: dg.AssetExecutionContext,
    finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    """Per-domain accuracy `b_d` of the base model (adapters off) on the proxy eval set."""
    eval_set, eval_hash = store.load_eval_artifact(lineage)
    t0 = time.perf_counter()
    base = stages.score_base(finetuner, evaluator, eval_set)
    domains = stages.eval_domains(base)
    b = stages.base_scores(base, domains)
    model_id = base_model_id(finetuner.base_model)
    key = base_scores_key(finetuner, evaluator)
    store.write_base(lineage, base, {
        "base_model_id": model_id, "base_model": finetuner.base_model, "eval_hash": eval_hash, "scoring": key,
        "domains": domains, "per_domain": dict(zip(domains, b.tolist(), strict=True)), "seconds": base.seconds,
    })
    return dg.MaterializeResult(
        metadata={
            "base_model": finetuner.base_model,
            "base_model_id": model_id,
            "eval_examples": len(base.example_ids),
            "mean_accuracy": round(float(base.mean), 4),
            "per_domain": dg.MetadataValue.json({d: round(float(v), 4) for d, v in zip(domains, b, strict=True)}),
            "scoring": dg.MetadataValue.json(key),
            "seconds": round(time.perf_counter() - t0, 3),
        },
        data_version=dg.DataVersion(sha16(model_id, eval_hash, key)),
    )
