"""Re-selection as the pool grows: a pool sensor, a daily schedule and two run-status sensors that chain the jobs.

A sensor cannot chain runs itself, so the three jobs are linked by run-status sensors:

1. `pool_growth_sensor` (and, as a backstop, the `daily_reselection` schedule) requests `harp_prepare_job`
   when the pool source changed: first the cheap fingerprint (file names, sizes, mtimes) against the cursor,
   then, only when that moved, the pool's content hash against the one the last prepare run persisted, so a
   touched but unchanged file launches nothing. No request while any HARP run is queued or in flight.
2. `leaf_refresh_sensor` reacts to a successful prepare run tagged `harp/chain` (the tag the two above set;
   runs from `run_harp` or the UI carry none, so they are never chained twice) and requests one
   `leaf_utilities_job` run per contiguous partition range of HARP's leaves (representatives and planned
   rounds' picks, the only leaves registered as partitions) that are new or stale (stored data version
   differs from the expected one). With nothing to train it requests
   `harp_select_job` directly, and nothing at all when the stored posteriors already fit the current leaves.
3. `selection_after_leaves_sensor` requests `harp_select_job` once every leaf run of a batch succeeded.
4. `active_round_sensor` reacts to a successful chained selection run: when `active_round_plan` asked for
   leaves that are not measured yet, it requests their leaf runs as a new batch, and sensor 3 then selects
   again with them in the posteriors. With nothing pending the chain ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from harp import driver, store
from harp.config import HarpSettings
from harp.lineage import LineageStore
from harp.sources import PoolSource, pool_version
from harp_assets.hierarchy import LEAVES_PARTITIONS, harp_partition_order
from harp_assets.jobs import harp_prepare_job, harp_select_job, leaf_utilities_job
from harp_assets.recovery import recover_dead_runs
from harp_resources import (
    EvaluatorResource,
    FinetunerResource,
    LineageResource,
    PoolSourceResource,
    SettingsResource,
)

CHAIN_TAG = "harp/chain"
FINGERPRINT_TAG = "harp/pool_fingerprint"
BATCH_TAG = "harp/leaf_batch"
BATCH_SIZE_TAG = "harp/leaf_batch_size"
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
HARP_JOBS = (harp_prepare_job.name, leaf_utilities_job.name, harp_select_job.name)
DEFAULT_CRON = "0 3 * * *"

_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class PoolCheck:
    """What the pool source looks like now, and whether a prepare run should pick it up."""

    fingerprint: str
    changed: bool
    reason: str


def check_pool(pool_source: PoolSource, lineage: LineageStore, known_fingerprint: str | None) -> PoolCheck:
    """Compare the pool source with what is known: the cheap fingerprint first, then its content hash.

    The content is read only when the fingerprint moved; it is compared with the pool version the last
    prepare run persisted (`artifacts/pool.json`), so a pool never prepared counts as changed.
    """
    fp = pool_source.fingerprint()
    if fp == known_fingerprint:
        return PoolCheck(fp, False, f"pool fingerprint {fp} unchanged")
    version = pool_version(pool_source.load_pool())
    stored = store.stored_pool_version(lineage)
    if version == stored:
        return PoolCheck(fp, False, f"pool files changed (fingerprint {fp}) but their content {version} is prepared")
    return PoolCheck(fp, True, f"pool content {version} differs from the prepared {stored or 'none'}")


def missing_source(pool_source: PoolSource) -> str | None:
    """Why there is no pool to look at yet (before the demo is built), else None; other bad input raises."""
    path = pool_source.resolved_pool_path()
    if not path.exists():
        return f"pool source {path} does not exist yet: build the demo or set HARP_POOL"
    return None


def harp_runs_in_flight(instance: dg.DagsterInstance, log: Callable[[str], object] | None = None) -> list[str]:
    """Ids of HARP runs queued or running: a new prepare run then waits, so no run sees a half-grown table.

    Runs a dead process left in progress are marked failed first (`recovery.recover_dead_runs`), so one
    crash never makes the sensors skip forever."""
    recover_dead_runs(instance, log)
    return [
        r.run_id for job in HARP_JOBS
        for r in instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=_IN_FLIGHT), limit=5)
    ]


def _prepare_request(check: PoolCheck, source: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"prepare-{check.fingerprint}",
        job_name=harp_prepare_job.name,
        tags={CHAIN_TAG: source, FINGERPRINT_TAG: check.fingerprint},
    )


@dg.sensor(
    job=harp_prepare_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests harp_prepare_job when pool files are added or changed (fingerprint, then content).",
)
def pool_growth_sensor(
    context: dg.SensorEvaluationContext, pool_source: PoolSourceResource, lineage: LineageResource
) -> dg.SensorResult | dg.SkipReason:
    """Cursor: the pool fingerprint last handled. Waits while a HARP run is in flight (cursor unchanged)."""
    missing = missing_source(pool_source)
    if missing:
        return dg.SkipReason(missing)
    busy = harp_runs_in_flight(context.instance, context.log.info)
    if busy:
        return dg.SkipReason(f"{len(busy)} HARP run(s) in flight, e.g. {busy[0]}; checking the pool afterwards")
    check = check_pool(pool_source, lineage, context.cursor)
    if not check.changed:
        return dg.SensorResult(skip_reason=check.reason, cursor=check.fingerprint)
    context.log.info(check.reason)
    return dg.SensorResult(run_requests=[_prepare_request(check, "pool_growth_sensor")], cursor=check.fingerprint)


def _last_chained_fingerprint(instance: dg.DagsterInstance) -> str | None:
    """The fingerprint of the newest chained prepare run that did not fail (the schedule has no cursor)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=harp_prepare_job.name, statuses=[*_IN_FLIGHT, dg.DagsterRunStatus.SUCCESS]),
        limit=20,
    )
    for run in runs:  # newest first
        if FINGERPRINT_TAG in run.tags:
            return run.tags[FINGERPRINT_TAG]
    return None


def reselect_cron() -> str:
    """`HARP_RESELECT_CRON` when set (validated by Dagster at load), else daily at 03:00."""
    return os.environ.get("HARP_RESELECT_CRON") or DEFAULT_CRON


@dg.schedule(
    cron_schedule=reselect_cron(),
    job=harp_prepare_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily backstop of pool_growth_sensor: prepares again only when the pool changed.",
)
def daily_reselection(
    context: dg.ScheduleEvaluationContext, pool_source: PoolSourceResource, lineage: LineageResource
) -> dg.RunRequest | dg.SkipReason:
    """Same check as the sensor, against the fingerprint of the newest chained prepare run."""
    missing = missing_source(pool_source)
    if missing:
        return dg.SkipReason(missing)
    busy = harp_runs_in_flight(context.instance, context.log.info)
    if busy:
        return dg.SkipReason(f"{len(busy)} HARP run(s) in flight; the pool sensor picks up changes afterwards")
    check = check_pool(pool_source, lineage, _last_chained_fingerprint(context.instance))
    if not check.changed:
        return dg.SkipReason(check.reason)
    return _prepare_request(check, "daily_reselection")


def leaf_requests(
    instance: dg.DagsterInstance,
    lineage: LineageStore,
    finetuner: FinetunerResource,
    evaluator: EvaluatorResource,
    settings: HarpSettings,
    batch: str,
    *,
    select_when_idle: bool = True,
) -> dg.SensorResult:
    """Leaf runs for HARP's new or stale leaves (one per contiguous range), else the selection job (when
    `select_when_idle` and the posteriors are not current)."""
    wanted = driver.stale_harp_leaves(lineage, finetuner, evaluator, settings)
    registered = list(instance.get_dynamic_partitions(LEAVES_PARTITIONS.name))
    # The hierarchy and the plan register HARP's leaves; any still missing are added here, in HARP's order
    # (representatives, then the rounds' picks), so the registry keeps holding HARP's leaves only.
    known, stale = set(registered), set(wanted)
    order = harp_partition_order(store.load_leaf_table(lineage), store.read_plan(lineage))
    missing = [k for k in order if k in stale and k not in known]
    ranges = driver.partition_ranges(registered + missing, set(wanted))
    if not ranges:
        if not select_when_idle:
            return dg.SensorResult(skip_reason="no leaf of HARP's plan is waiting to be measured")
        if driver.posteriors_current(lineage, finetuner, evaluator, settings):
            return dg.SensorResult(skip_reason="no stale representative leaf and the posteriors are current")
        return dg.SensorResult(run_requests=[dg.RunRequest(
            run_key=f"select-{batch}", job_name=harp_select_job.name, tags={CHAIN_TAG: "leaf_refresh_sensor"})])
    requests = [
        dg.RunRequest(
            run_key=f"leaves-{batch}-{a}-{b}",
            job_name=leaf_utilities_job.name,
            tags={RANGE_START: a, RANGE_END: b, CHAIN_TAG: "leaf_refresh_sensor", BATCH_TAG: batch,
                  BATCH_SIZE_TAG: str(len(ranges))},
        )
        for a, b in ranges
    ]
    adds = [LEAVES_PARTITIONS.build_add_request(missing)] if missing else []
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=adds)


def chain_sensors(
    prepare_job: dg.UnresolvedAssetJobDefinition,
    leaf_job: dg.UnresolvedAssetJobDefinition,
    select_job: dg.UnresolvedAssetJobDefinition,
) -> list[dg.RunStatusSensorDefinition]:
    """The run-status sensors that chain prepare -> leaf runs -> selection -> active rounds (from the job objects)."""

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="leaf_refresh_sensor",
        monitored_jobs=[prepare_job],
        request_jobs=[leaf_job, select_job],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="After a chained prepare run: leaf runs for new or stale representative leaves, or the selection.",
    )
    def leaf_refresh_sensor(
        context: dg.RunStatusSensorContext, lineage: LineageResource, finetuner: FinetunerResource,
        evaluator: EvaluatorResource, settings: SettingsResource,
    ) -> dg.SensorResult:
        """Only prepare runs tagged `harp/chain` continue, so a run_harp or manual run is never chained twice."""
        if CHAIN_TAG not in context.dagster_run.tags:
            return dg.SensorResult(skip_reason=f"prepare run {context.dagster_run.run_id} is not chained")
        return leaf_requests(context.instance, lineage, finetuner, evaluator, settings, context.dagster_run.run_id)

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="selection_after_leaves_sensor",
        monitored_jobs=[leaf_job],
        request_jobs=[select_job],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests harp_select_job once every leaf run of a chained batch succeeded.",
    )
    def selection_after_leaves_sensor(context: dg.RunStatusSensorContext) -> dg.SensorResult:
        """One selection per batch: the run key is the batch id, so two runs ending together ask once."""
        tags = context.dagster_run.tags
        batch = tags.get(BATCH_TAG)
        if batch is None:
            return dg.SensorResult(skip_reason=f"leaf run {context.dagster_run.run_id} is not part of a chained batch")
        size = int(tags.get(BATCH_SIZE_TAG, "1"))
        runs = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=leaf_job.name, tags={BATCH_TAG: batch}))
        done = sum(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        if done < size:
            return dg.SensorResult(skip_reason=f"batch {batch}: {done} of {size} leaf runs succeeded")
        return dg.SensorResult(run_requests=[dg.RunRequest(
            run_key=f"select-{batch}", job_name=select_job.name, tags={CHAIN_TAG: "selection_after_leaves_sensor"})])

    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        name="active_round_sensor",
        monitored_jobs=[select_job],
        request_jobs=[leaf_job],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="After a chained selection: leaf runs for the active round's leaves, when one is planned.",
    )
    def active_round_sensor(
        context: dg.RunStatusSensorContext, lineage: LineageResource, finetuner: FinetunerResource,
        evaluator: EvaluatorResource, settings: SettingsResource,
    ) -> dg.SensorResult:
        """The chain's last link: never requests a selection itself, so it cannot loop."""
        if CHAIN_TAG not in context.dagster_run.tags:
            return dg.SensorResult(skip_reason=f"selection run {context.dagster_run.run_id} is not chained")
        if not driver.pending_active_leaves(lineage, finetuner, evaluator, settings):
            return dg.SensorResult(skip_reason="no active-round leaf is waiting to be measured")
        return leaf_requests(context.instance, lineage, finetuner, evaluator, settings,
                             f"active-{context.dagster_run.run_id}", select_when_idle=False)

    return [leaf_refresh_sensor, selection_after_leaves_sensor, active_round_sensor]


CHAIN_SENSORS = chain_sensors(harp_prepare_job, leaf_utilities_job, harp_select_job)
