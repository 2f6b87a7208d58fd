"""The base model's proxy-set scores `b_d`: the null every leaf's utility is measured against."""


import time

import dagster as dg
import numpy as np
import polars as pl

from harp_assets import stages
from harp_assets.settings import (
    GROUP,
    artifacts_dir,
    base_model_id,
    read_json,
    read_parquet,
    write_json_atomic,
    write_parquet_atomic,
)
from harp_assets.sources import load_eval_artifact
from harp_resources.evaluator import EvalResult, Evaluator
from harp_resources.finetuner import LoraFinetuner
from harp_resources.lineage_store import LineageStore

BASE_FILE = "base_eval.parquet"
BASE_META = "base_eval.json"


def load_base(lineage: LineageStore) -> tuple[EvalResult, dict]:
    """The persisted base evaluation (per-example correctness) and its metadata (base model id, eval hash)."""
    out = artifacts_dir(lineage)
    df = read_parquet(out / BASE_FILE, "base_model_scores")
    meta = read_json(out / BASE_META, "base_model_scores")
    result = EvalResult(
        example_ids=df["example_id"].to_list(),
        domains=df["domain"].to_list(),
        correct=df["correct"].to_numpy().astype(np.float32),
        per_domain={str(k): float(v) for k, v in meta["per_domain"].items()},
        seconds=float(meta["seconds"]),
    )
    return result, meta


@dg.asset(group_name=GROUP, kinds={"pytorch"}, deps=["proxy_eval_set"], pool="gpu")
def base_model_scores(
    context: dg.AssetExecutionContext, finetuner: LoraFinetuner, evaluator: Evaluator, lineage: LineageStore
) -> dg.MaterializeResult:
    """Per-domain accuracy `b_d` of the base model (adapters off) on the proxy eval set."""
    eval_set, eval_hash = load_eval_artifact(lineage)
    t0 = time.perf_counter()
    base = stages.score_base(finetuner, evaluator, eval_set)
    domains = stages.eval_domains(base)
    b = stages.base_scores(base, domains)
    df = pl.DataFrame(
        {"example_id": base.example_ids, "domain": base.domains, "correct": np.asarray(base.correct, np.float32)}
    )
    out = artifacts_dir(lineage)
    write_parquet_atomic(df, out / BASE_FILE)
    model_id = base_model_id(finetuner.base_model)
    write_json_atomic(out / BASE_META, {
        "base_model_id": model_id, "base_model": finetuner.base_model, "eval_hash": eval_hash,
        "domains": domains, "per_domain": dict(zip(domains, b.tolist(), strict=True)), "seconds": base.seconds,
    })
    return dg.MaterializeResult(
        metadata={
            "base_model": finetuner.base_model,
            "base_model_id": model_id,
            "eval_examples": len(base.example_ids),
            "mean_accuracy": round(float(base.mean), 4),
            "per_domain": dg.MetadataValue.json({d: round(float(v), 4) for d, v in zip(domains, b, strict=True)}),
            "seconds": round(time.perf_counter() - t0, 3),
        },
        data_version=dg.DataVersion(f"{model_id}-{eval_hash}"),
    )
