"""`run_harp` and `run_validation`: the whole graph materialised in order, through Dagster's own jobs.

`run_harp` is `harp.driver.drive_rounds` with Dagster as the measuring hand: prepare, then one
`leaf_utilities_job` run per contiguous range of the representative leaves, then `harp_select_job` (which
fits the posteriors and plans the next active round), then each planned round's leaves and a new selection.
Already-measured, unchanged leaves are skipped inside the leaf runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from harp import driver, store
from harp.io import check_writable, remove_stale_temps
from harp.lineage import LineageStore
from harp_assets.active_round import active_round_plan
from harp_assets.hierarchy import LEAVES_PARTITIONS, register_leaf_partitions
from harp_assets.jobs import harp_prepare_job, harp_select_job, harp_validation_job, leaf_utilities_job
from harp_assets.recovery import process_tags, recover_dead_runs, wait_for_pool_slot
from harp_assets.validation import exhaustive_leaf_ids

# A bound on the rounds one call measures; the plan asset itself stops at `settings.active_rounds`.
MAX_NEW_ROUNDS = 100
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
log = logging.getLogger("harp.runner")


def _defs() -> dg.Definitions:
    from harp_assets.definitions import defs  # the default code location, built on first use

    return defs


def _lineage(definitions: dg.Definitions) -> LineageStore:
    return (definitions.resources or {}).get("lineage") or LineageStore()


def _planned_round(select_run: dg.ExecuteInProcessResult) -> list[str]:
    """The leaves of the round `active_round_plan` planned in this selection run (none: the rounds are over)."""
    mats = select_run.asset_materializations_for_node(active_round_plan.key.to_python_identifier())
    if not mats or not mats[0].metadata.get("new_round", dg.BoolMetadataValue(False)).value:
        return []
    return list(mats[0].metadata["leaves"].value)


def root_cause(exc: BaseException) -> str:
    """The error to show: the first exception that is not one of Dagster's wrappers around a failing step.

    It stops there rather than at the innermost cause: our own errors (a `DataContractError` naming the file
    and row) chain the parser's error as their cause, and that raw message is not the one to end on.
    """
    seen = exc
    while isinstance(seen, dg.DagsterError):
        inner = getattr(seen, "user_exception", None) or seen.__cause__
        if inner is None or inner is seen:
            break
        seen = inner
    return f"{type(seen).__name__}: {seen}"


def run_leaf_ranges(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions,
    wanted: set[str],
    tags: Mapping[str, str] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """One `leaf_utilities_job` run per contiguous range of `wanted` keys in the registered partition order
    (each range is one step, so the base model loads once per range)."""
    registered = instance.get_dynamic_partitions(LEAVES_PARTITIONS.name)
    runs = []
    for a, b in driver.partition_ranges(registered, wanted):
        wait_for_pool_slot(instance, log=log.info)
        runs.append(definitions.resolve_job_def(leaf_utilities_job.name).execute_in_process(
            instance=instance, tags={**dict(tags or {}), **process_tags(), RANGE_START: a, RANGE_END: b}))
    return runs


def recover(instance: dg.DagsterInstance, lineage: LineageStore) -> None:
    """What every command does before it starts: fail the runs a dead process left in progress, free their
    pool slots, and delete the temp files our dead writers left (only ours, never anyone else's). A home
    that cannot be written (read-only, full) fails here, naming the folder, before any run starts."""
    for folder in (instance.root_directory, lineage.root_path):
        check_writable(folder)
    recover_dead_runs(instance, log.warning)
    removed = remove_stale_temps(lineage.root_path) + remove_stale_temps(lineage.catalog_path.parent,
                                                                         recursive=False)
    if removed:
        log.warning(f"removed {len(removed)} temp file(s) left by writers that died: "
                    + ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))


def run_harp(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions | None = None,
    *,
    leaf_ids: list[str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Materialise the whole graph in order: prepare, the representative leaves (or `leaf_ids`), select,
    then each planned active round (its leaves, then select again).

    Returns the stages' Dagster results (`leaf_runs` is a list: one run per partition range, active rounds
    included; `select` is the last selection run, `select_runs` all of them) and their wall `seconds`; it
    stops after a stage whose run failed.
    """
    definitions = definitions or _defs()
    lineage = _lineage(definitions)
    recover(instance, lineage)
    tags = {**dict(tags or {}), **process_tags()}
    results: dict[str, Any] = {"seconds": {}, "leaf_runs": [], "select_runs": []}

    def timed(stage: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            results["seconds"][stage] = results["seconds"].get(stage, 0.0) + time.perf_counter() - t0

    class Failed(Exception):
        pass

    results["prepare"] = timed("prepare", lambda: definitions.resolve_job_def(harp_prepare_job.name)
                               .execute_in_process(instance=instance, tags=tags))
    if not results["prepare"].success:
        return results

    def measure(leaves: list[str]) -> None:
        round_tags = tags if not results["select_runs"] else {**tags, "harp/active_round": str(
            len(store.read_plan(lineage)))}
        stage = "leaf_runs" if not results["select_runs"] else "active_leaf_runs"
        runs = timed(stage, lambda: run_leaf_ranges(instance, definitions, set(leaves), round_tags))
        results["leaf_runs"].extend(runs)
        if not all(r.success for r in runs):
            raise Failed

    def refit(_round: int) -> list[str]:
        run = timed("select", lambda: definitions.resolve_job_def(harp_select_job.name)
                    .execute_in_process(instance=instance, tags=tags))
        results["select"] = run
        results["select_runs"].append(run)
        if not run.success:
            raise Failed
        return _planned_round(run)

    # HARP's leaves: the representatives and every round planned before (up-to-date ones are skipped).
    first = leaf_ids if leaf_ids is not None else sorted(store.harp_leaves(lineage))
    try:
        driver.drive_rounds(first, measure, refit, max_rounds=len(store.read_plan(lineage)) + MAX_NEW_ROUNDS)
    except Failed:
        pass
    return results


def run_validation(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions | None = None,
    *,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The exhaustive mode and the validation group, after `run_harp`: measure every leaf not yet measured
    (HARP's own leaves are cached partitions), then run `harp_validation_job`."""
    definitions = definitions or _defs()
    lineage = _lineage(definitions)
    recover(instance, lineage)
    tags = {**dict(tags or {}), **process_tags()}
    results: dict[str, Any] = {"seconds": {}}
    t0 = time.perf_counter()
    wanted = exhaustive_leaf_ids(lineage)
    register_leaf_partitions(instance, wanted)  # only this mode makes the leaves beyond HARP's partitions
    results["leaf_runs"] = run_leaf_ranges(instance, definitions, set(wanted),
                                           {**dict(tags or {}), "harp/exhaustive": "true"})
    results["seconds"]["exhaustive_leaf_runs"] = time.perf_counter() - t0
    if not all(r.success for r in results["leaf_runs"]):
        return results
    t0 = time.perf_counter()
    wait_for_pool_slot(instance, log=log.info)  # the validation step trains models in the `gpu` pool too
    results["validate"] = definitions.resolve_job_def(harp_validation_job.name).execute_in_process(
        instance=instance, tags=dict(tags or {}))
    results["seconds"]["validate"] = time.perf_counter() - t0
    return results
