"""The active measuring round: after the representatives, measure the leaves most likely to change the selection.

`active_round_plan` reads the current posteriors and, while fewer than `settings.active_rounds` rounds are
planned and the previous round is folded into the posteriors, picks the next `settings.active_runs`
unmeasured leaves (`method.active`): first the leaves the current `primary_envelope` selection relies on
without a measurement, then those with the largest posterior sd times possible gain. Their ids go to
`artifacts/active_rounds.json` and the `active_rounds` lineage table; the leaves are then measured as
ordinary `leaf_utilities` partitions (registered here, so they show as missing until measured; measured by
`run_harp`, by the chain sensors, or by "Materialize all" in the UI), and the next `phi_posteriors`
fit uses the representatives plus every planned leaf. Leaves measured for other reasons (the exhaustive
validation mode) are never read by HARP's posteriors, so HARP is never silently given the oracle's data.
"""


import datetime as dt
import time

import dagster as dg
import numpy as np
import polars as pl

from harp import driver, stages, store
from harp.method import LeafTable
from harp.versions import sha16
from harp_assets.groups import SELECT
from harp_assets.hierarchy import (
    harp_partition_order,
    leaf_hierarchy,
    measurement_reasons,
    register_leaf_partitions,
    registration_observations,
)
from harp_assets.posteriors import phi_posteriors
from harp_resources import LineageResource, SettingsResource


def _register(context: dg.AssetExecutionContext, table: LeafTable, rounds: list[dict], leaves: list[str]) -> list[str]:
    """Register the `leaves` partitions of `leaves` not registered yet, each with an observation saying why."""
    fresh = register_leaf_partitions(context.instance, leaves)
    for obs in registration_observations(fresh, measurement_reasons(table, rounds)):
        context.log_event(obs)
    return fresh


@dg.asset(group_name=SELECT, kinds={"numpy"}, deps=[phi_posteriors, leaf_hierarchy])
def active_round_plan(
    context: dg.AssetExecutionContext, settings: SettingsResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """The next active round's leaves (sd x possible gain), once the previous round is in the posteriors."""
    t0 = time.perf_counter()
    rounds = store.read_plan(lineage)
    table = store.load_leaf_table(lineage)
    # Leaves of rounds planned before are HARP's too: a registry that lost them (or predates them) gets them back.
    _register(context, table, rounds, harp_partition_order(table, rounds))
    post, meta = store.load_posteriors(lineage)
    if meta["leaf_ids"] != table.leaf_ids.tolist():
        raise ValueError("phi_posteriors were fitted on another leaf table: materialise phi_posteriors again")
    in_posteriors = set(meta["measured_leaves"])
    pending = [leaf for leaf in store.planned_leaves(lineage) if leaf not in in_posteriors]
    md: dict = {"rounds_planned": len(rounds), "rounds_configured": settings.active_rounds,
                "runs_per_round": settings.active_runs}
    if settings.active_runs == 0 or len(rounds) >= settings.active_rounds:
        reason = "no active rounds configured" if settings.active_runs == 0 else "every configured round is planned"
        return dg.MaterializeResult(metadata={**md, "new_round": False, "reason": reason,
                                              "pending_leaves": len(pending)})
    if pending:
        return dg.MaterializeResult(metadata={
            **md, "new_round": False, "pending_leaves": len(pending),
            "reason": f"round {len(rounds)} still has {len(pending)} leaf(s) to measure, e.g. {pending[:3]}"})
    base, bmeta = store.load_base(lineage)
    pick = driver.plan_active_round(post, stages.base_scores(base, list(bmeta["domains"])), table, settings)
    leaves = table.leaf_ids[pick.leaves].tolist()
    scores = [float(pick.scores[g]) for g in pick.leaves]
    number = len(rounds) + 1
    now = dt.datetime.now(dt.timezone.utc)
    rounds.append({"round": number, "leaves": leaves, "scores": scores, "created_at": now.isoformat(),
                   "run_id": context.run.run_id, "posterior_leaves_measured": len(in_posteriors)})
    store.write_plan(lineage, rounds)
    if leaves:
        key = f"round{number}-{sha16(context.run.run_id, now.isoformat())}"
        lineage.append_run("active_rounds", key, pl.DataFrame({
            "round_id": [key] * len(leaves),
            "round": [number] * len(leaves),
            "rank": np.arange(1, len(leaves) + 1, dtype=np.int32),
            "leaf_id": leaves,
            "score": scores,
            "created_at": [now] * len(leaves),
            "run_id": [context.run.run_id] * len(leaves),
        }, schema_overrides={"round": pl.Int32, "rank": pl.Int32, "created_at": pl.Datetime("us", "UTC")}))
    fresh = _register(context, table, rounds, leaves)
    context.log.info(f"active round {number}: {len(leaves)} leaf(s) to measure: {leaves}")
    return dg.MaterializeResult(metadata={
        **md, "rounds_planned": number, "new_round": True, "round": number,
        "new_partitions": len(fresh), "leaves": dg.MetadataValue.json(leaves), "scores": dg.MetadataValue.json([round(s, 6) for s in scores]),
        "seconds": round(time.perf_counter() - t0, 3)})
