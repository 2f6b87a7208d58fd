"""The active measuring round: after the representatives, measure the leaves most likely to change the selection.

`active_round_plan` reads the current posteriors and, while fewer than `settings.active_rounds` rounds are
planned and the previous round is folded into the posteriors, picks the next `settings.active_runs`
unmeasured leaves (`method.active`): first the leaves the current `primary_envelope` selection relies on
without a measurement, then those with the largest posterior sd times possible gain. Their ids go to
`artifacts/active_rounds.json` and the `active_rounds` lineage table; the leaves are then measured as
ordinary `leaf_utilities` partitions (by `run_harp`, or by the chain sensors), and the next `phi_posteriors`
fit uses the representatives plus every planned leaf. Leaves measured for other reasons (the exhaustive
validation mode) are never read by HARP's posteriors, so HARP is never silently given the oracle's data.
"""


import datetime as dt
import time

import dagster as dg
import numpy as np
import polars as pl

from harp_assets import stages
from harp_assets.base_scores import load_base
from harp_assets.leaves import load_leaf_table
from harp_assets.method.active import choose_active_leaves
from harp_assets.method.envelopes import active_domains
from harp_assets.settings import GROUP, HarpSettings, artifacts_dir, read_json, sha16, write_json_atomic
from harp_resources.lineage_store import LineageStore

ACTIVE_PLAN = "active_rounds.json"


def read_plan(lineage: LineageStore) -> list[dict]:
    """The planned rounds, oldest first: `{"round", "leaves", "scores", "created_at", "run_id"}` each."""
    path = artifacts_dir(lineage) / ACTIVE_PLAN
    return read_json(path, "active_round_plan")["rounds"] if path.is_file() else []


def planned_leaves(lineage: LineageStore) -> list[str]:
    """Every leaf some active round asked for that is still in the current leaf table."""
    current = set(load_leaf_table(lineage).leaf_ids.tolist())
    return sorted({leaf for r in read_plan(lineage) for leaf in r["leaves"] if leaf in current})


def harp_leaves(lineage: LineageStore) -> set[str]:
    """The leaves HARP measures: the representatives and the active rounds' picks."""
    table = load_leaf_table(lineage)
    return set(table.leaf_ids[table.representative].tolist()) | set(planned_leaves(lineage))


@dg.asset(group_name=GROUP, kinds={"numpy"}, deps=["phi_posteriors", "leaf_hierarchy"])
def active_round_plan(
    context: dg.AssetExecutionContext, settings: HarpSettings, lineage: LineageStore
) -> dg.MaterializeResult:
    """The next active round's leaves (sd x possible gain), once the previous round is in the posteriors."""
    from harp_assets.posteriors import load_posteriors  # posteriors.py imports harp_leaves from here

    t0 = time.perf_counter()
    rounds = read_plan(lineage)
    table = load_leaf_table(lineage)
    post, meta = load_posteriors(lineage)
    if meta["leaf_ids"] != table.leaf_ids.tolist():
        raise ValueError("phi_posteriors were fitted on another leaf table: materialise phi_posteriors again")
    in_posteriors = set(meta["measured_leaves"])
    pending = [leaf for leaf in planned_leaves(lineage) if leaf not in in_posteriors]
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
    active = active_domains(post.mean, post.sd, z=settings.z_active)
    base, bmeta = load_base(lineage)
    current = stages.select_harp(post, stages.base_scores(base, list(bmeta["domains"])), table,
                                 envelope=settings.primary_envelope, top_k_points=settings.top_k_points,
                                 z_active=settings.z_active)
    selected = np.unique(np.asarray(current.leaf_of_row, dtype=np.int64))
    pick = choose_active_leaves(post.mean, post.sd, post.measured, settings.active_runs, active,
                                z=settings.active_z, selected=selected)
    leaves = table.leaf_ids[pick.leaves].tolist()
    scores = [float(pick.scores[g]) for g in pick.leaves]
    number = len(rounds) + 1
    now = dt.datetime.now(dt.timezone.utc)
    rounds.append({"round": number, "leaves": leaves, "scores": scores, "created_at": now.isoformat(),
                   "run_id": context.run.run_id, "posterior_leaves_measured": len(in_posteriors)})
    write_json_atomic(artifacts_dir(lineage) / ACTIVE_PLAN, {"rounds": rounds})
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
    context.log.info(f"active round {number}: {len(leaves)} leaf(s) to measure: {leaves}")
    return dg.MaterializeResult(metadata={
        **md, "rounds_planned": number, "new_round": True, "round": number,
        "leaves": dg.MetadataValue.json(leaves), "scores": dg.MetadataValue.json([round(s, 6) for s in scores]),
        "seconds": round(time.perf_counter() - t0, 3)})
