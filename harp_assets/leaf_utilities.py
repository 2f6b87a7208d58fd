"""Leaf utilities: one dynamic partition per leaf, trained only when its content hash changed.

A leaf's data version hashes what its measurement depends on: its member set, the base model's files, the
eval set, the seed, and every measurement field of the finetuner and the evaluator plus the dtype
(`harp.versions.measurement_key`, built from the models' fields, not a hand-kept list). A partition whose
stored rows carry that version is skipped, so re-materialising with nothing changed trains no leaf.

Every key of a partition range runs in one step, so the base model loads once per run
(`BackfillPolicy.single_run`). The `leaf_execution` resource says where the cycles run: in the step's process,
or fanned out over a pool of Ray actors that each keep the base model loaded (docs/scale-out.md); the step
writes every partition the same way either way. The step records each leaf's own materialization, with its own data version,
as soon as the leaf is done, so the UI shows progress leaf by leaf and every partition its own version.

Each partition's materialization carries that leaf's own stored values (per-domain utility U_d, base b_d,
phi = U_d - b_d), read back from its lineage rows, also when the leaf was up to date and not retrained, and
why HARP measures it (representative, active round k, or exhaustive), so a partition's page in the UI shows
the leaf, never the run.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import polars as pl

from harp import driver, stages, store
from harp_assets.base_scores import base_model_scores
from harp_assets.groups import MEASURE
from harp_assets.hierarchy import LEAVES_PARTITIONS, leaf_hierarchy, measurement_reasons
from harp_assets.sources import pool_examples, proxy_eval_set
from harp_resources import (
    EvaluatorResource,
    FinetunerResource,
    LeafExecutionResource,
    LineageResource,
    SettingsResource,
)


def leaf_values(leaf_id: str, rows: pl.DataFrame | None, data_version: str) -> dict[str, Any]:
    """The partition's own metadata from its stored lineage rows: per-domain U_d, b_d and phi, the data
    version, and when and in which run the measurement was made (an up-to-date leaf: an earlier run)."""
    if rows is None or rows.height == 0:
        raise ValueError(f"leaf partition {leaf_id!r}: no stored leaf_utilities rows after its measurement")
    versions = set(rows["data_version"].to_list())
    if versions != {data_version}:
        raise ValueError(f"leaf partition {leaf_id!r}: stored rows carry data version(s) {sorted(versions)}, "
                         f"expected {data_version}")
    rows = rows.sort("domain")

    def per_domain(col: str) -> dg.MetadataValue:
        return dg.MetadataValue.json({d: round(float(v), 4) for d, v in zip(rows["domain"], rows[col], strict=True)})

    return {
        "data_version": data_version,
        "utility": per_domain("utility"),
        "base": per_domain("base"),
        "phi": per_domain("phi"),
        "phi_mean": round(float(rows["phi"].mean()), 4),
        "measured_at": rows["measured_at"][0].isoformat(),
        "measured_in_run": rows["run_id"][0] or "",
    }


@dg.asset(
    group_name=MEASURE,
    kinds={"pytorch", "parquet"},
    partitions_def=LEAVES_PARTITIONS,
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[leaf_hierarchy, base_model_scores, pool_examples, proxy_eval_set],
    output_required=False,
)
def leaf_utilities(
    context: dg.AssetExecutionContext,
    finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    settings: SettingsResource,
    lineage: LineageResource,
    leaf_execution: LeafExecutionResource,
) -> Iterator[dg.AssetMaterialization]:
    """Per-domain utility U_d and phi = U_d - b_d of a LoRA adapter trained on one leaf; cached by content hash."""
    keys = list(context.partition_keys)
    progress = stages.Progress(len(keys), context.log, what="leaf partition", plural="partitions")
    cycle_seconds = 0.0
    table = store.load_leaf_table(lineage)
    reasons = measurement_reasons(table, store.read_plan(lineage))
    stored = lineage.read_partitions("leaf_utilities", keys)  # the up-to-date leaves' rows, one folder listing
    for leaf in driver.measure_leaf_partitions(lineage, finetuner, evaluator, settings, keys,
                                               run_id=context.run.run_id, execution=leaf_execution,
                                               log=context.log):
        cycle_seconds += leaf.seconds
        progress.step(f"{leaf.leaf_id}: " + (f"trained on {leaf.examples} examples in {leaf.seconds:.2f} s, "
                      + ", ".join(f"phi[{d}]={v:+.3f}" for d, v in leaf.phi.items()) if leaf.trained
                      else "up to date"))
        rows = lineage.read_partition("leaf_utilities", leaf.leaf_id) if leaf.trained else stored.get(leaf.leaf_id)
        yield dg.AssetMaterialization(
            asset_key=context.asset_key,
            partition=leaf.leaf_id,
            tags={"dagster/data_version": leaf.data_version},
            metadata={
                **leaf_values(leaf.leaf_id, rows, leaf.data_version),
                "trained": leaf.trained,
                "is_representative": reasons.get(leaf.leaf_id) == "representative",
                "measured_because": reasons.get(leaf.leaf_id, "exhaustive"),
                "examples": leaf.examples,
                # The member set this measurement stands for; the hierarchy reports drift from it later.
                "member_hash": leaf.member_hash,
                "train_eval_seconds": round(leaf.seconds, 3),
                "step_partition": f"{progress.count}/{len(keys)}",
                # Step wall time not spent training or scoring, per partition so far (Dagster's share).
                "step_overhead_seconds_per_partition": round((progress.elapsed - cycle_seconds) / progress.count, 4),
            },
        )
