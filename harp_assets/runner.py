"""`run_harp` and `run_validation`: the whole graph materialised in order, through Dagster's own jobs.

`run_harp` is `harp.driver.drive_rounds` with Dagster as the measuring hand: prepare, then one
`leaf_utilities_job` run per contiguous range of the representative leaves, then `harp_select_job` (which
fits the posteriors and plans the next active round), then each planned round's leaves and a new selection.
Already-measured, unchanged leaves are skipped inside the leaf runs.

Every run is created the way the UI and `dagster job launch` create theirs: it carries the code location's
job origin (`harp_assets.definitions`, workspace.yaml's module), so the UI lists it under its job and on the
timeline, and it is executed synchronously in this process (`execute_job`). Executing here rather than through
the run launcher keeps the caller's resources (`harp-dagster run` configures the pool, budget and recipe per
call), keeps the process tags that crash recovery relies on true of the executing process, and costs no
process start per run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
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
# The code location every run names as its origin: the one workspace.yaml loads for the UI (`make ui`).
CODE_LOCATION = "harp_assets.definitions"
REPO_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = REPO_ROOT / "workspace.yaml"


def code_location_origin() -> Any:
    """The code location's origin exactly as the UI's workspace builds it from workspace.yaml (its location
    name included, `harp_assets.definitions:defs`); the module's own origin where that file is absent."""
    from dagster._core.workspace.load import (
        location_origin_from_module_name,
        location_origins_from_yaml_paths,
    )

    if WORKSPACE.is_file():
        for origin in location_origins_from_yaml_paths([str(WORKSPACE)]):
            if getattr(origin.loadable_target_origin, "module_name", None) == CODE_LOCATION:
                return origin
    return location_origin_from_module_name(CODE_LOCATION, "defs", str(REPO_ROOT))


def job_origins(job_name: str) -> tuple[Any, Any]:
    """The remote (code-location) and Python origins of `job_name` in this project's code location: the remote
    one is what lists a run under its job in the UI (the hidden repository tag it filters by)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
    from dagster._core.origin import JobPythonOrigin
    from dagster._core.remote_origin import RemoteJobOrigin, RemoteRepositoryOrigin

    remote = RemoteJobOrigin(RemoteRepositoryOrigin(code_location_origin(), SINGLETON_REPOSITORY_NAME), job_name)
    python = JobPythonOrigin(job_name, ReconstructableRepository.for_module(
        CODE_LOCATION, "defs", str(REPO_ROOT)).get_python_origin())
    return remote, python


class RunEvents(logging.Handler):
    """Receives a run's Dagster event records (`execute_job(events=...)`); `start` is told each run's steps first."""

    def start(self, job_name: str, run_id: str, steps: list[str]) -> None:
        """Called once per run, before its first event."""

    def emit(self, record: logging.LogRecord) -> None:
        """One event record; the default drops it."""


def _handler_logger(handler: logging.Handler) -> dg.LoggerDefinition:
    """A run logger that hands every event record to `handler`; same config as Dagster's console logger, so
    the run config it needs stays valid for the code location's own job (re-execution from the UI)."""

    @dg.logger(dg.Field({"log_level": dg.Field(str, is_required=False, default_value="DEBUG"),
                         "name": dg.Field(str, is_required=False, default_value="dagster")}, is_required=False))
    def to_handler(init: dg.InitLoggerContext) -> logging.Logger:
        logger = logging.Logger(init.logger_config["name"], level=init.logger_config["log_level"])
        logger.addHandler(handler)
        return logger

    return to_handler


def execute_job(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions,
    job_name: str,
    *,
    tags: Mapping[str, str] | None = None,
    events: RunEvents | None = None,
) -> dg.ExecuteInProcessResult:
    """Run `job_name` of `definitions` to the end in this process, as a run of the code location's job.

    What `JobDefinition.execute_in_process` does (in-process executor, outputs captured, a failing step
    raises), except that the run is created with the job's remote origin, like a run launched from the UI.
    `events`, when given, receives Dagster's event records instead of the console (a log file, a progress bar).
    """
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.execution.api import (
        ExecuteRunWithPlanIterable,
        create_execution_plan,
        job_execution_iterator,
    )
    from dagster._core.execution.context_creation_job import (
        PlanOrchestrationContextManager,
        orchestration_context_event_generator,
    )

    job_def = definitions.resolve_job_def(job_name)
    ephemeral = job_def.as_ephemeral_job(resource_defs={}, input_values={})
    run_config: dict[str, Any] = {}
    if events is not None:
        ephemeral = ephemeral.with_logger_defs({"console": _handler_logger(events)})
        run_config = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}
    job = InMemoryJob(job_def=ephemeral)
    plan = create_execution_plan(job, run_config=run_config,
                                 instance_ref=instance.get_ref() if instance.is_persistent else None)
    remote, python = job_origins(job_name)
    run = instance.create_run_for_job(job_def=ephemeral, execution_plan=plan, run_config=run_config,
                                      tags={**job_def.run_tags, **dict(tags or {})}, remote_job_origin=remote,
                                      job_code_origin=python)
    if events is not None:
        events.start(job_name, run.run_id, list(plan.step_keys_to_execute))
    output_capture: dict[Any, Any] = {}
    event_list = list(ExecuteRunWithPlanIterable(
        execution_plan=plan,
        iterator=job_execution_iterator,
        execution_context_manager=PlanOrchestrationContextManager(
            context_event_generator=orchestration_context_event_generator, job=job, execution_plan=plan,
            dagster_run=run, instance=instance, run_config=run_config, executor_defs=None,
            output_capture=output_capture, raise_on_error=True),
    ))
    return dg.ExecuteInProcessResult(job_def=ephemeral, event_list=event_list,
                                     dagster_run=instance.get_run_by_id(run.run_id), output_capture=output_capture)


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
    events: RunEvents | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """One `leaf_utilities_job` run per contiguous range of `wanted` keys in the registered partition order
    (each range is one step, so the base model loads once per range)."""
    registered = instance.get_dynamic_partitions(LEAVES_PARTITIONS.name)
    runs = []
    for a, b in driver.partition_ranges(registered, wanted):
        wait_for_pool_slot(instance, log=log.info)
        runs.append(execute_job(instance, definitions, leaf_utilities_job.name, events=events,
                                tags={**dict(tags or {}), **process_tags(), RANGE_START: a, RANGE_END: b}))
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
    events: RunEvents | None = None,
) -> dict[str, Any]:
    """Materialise the whole graph in order: prepare, the representative leaves (or `leaf_ids`), select,
    then each planned active round (its leaves, then select again).

    Returns the stages' Dagster results (`leaf_runs` is a list: one run per partition range, active rounds
    included; `select` is the last selection run, `select_runs` all of them) and their wall `seconds`; it
    stops after a stage whose run failed. `events` receives Dagster's event records (see `execute_job`).
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

    results["prepare"] = timed("prepare", lambda: execute_job(instance, definitions, harp_prepare_job.name,
                                                              tags=tags, events=events))
    if not results["prepare"].success:
        return results

    def measure(leaves: list[str]) -> None:
        round_tags = tags if not results["select_runs"] else {**tags, "harp/active_round": str(
            len(store.read_plan(lineage)))}
        stage = "leaf_runs" if not results["select_runs"] else "active_leaf_runs"
        register_leaf_partitions(instance, leaves)  # `leaf_ids` beyond HARP's become partitions when asked for
        runs = timed(stage, lambda: run_leaf_ranges(instance, definitions, set(leaves), round_tags, events))
        results["leaf_runs"].extend(runs)
        if not all(r.success for r in runs):
            raise Failed

    def refit(_round: int) -> list[str]:
        run = timed("select", lambda: execute_job(instance, definitions, harp_select_job.name, tags=tags,
                                                  events=events))
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
    events: RunEvents | None = None,
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
                                           {**dict(tags or {}), "harp/exhaustive": "true"}, events)
    results["seconds"]["exhaustive_leaf_runs"] = time.perf_counter() - t0
    if not all(r.success for r in results["leaf_runs"]):
        return results
    t0 = time.perf_counter()
    wait_for_pool_slot(instance, log=log.info)  # the validation step trains models in the `gpu` pool too
    results["validate"] = execute_job(instance, definitions, harp_validation_job.name, tags=tags, events=events)
    results["seconds"]["validate"] = time.perf_counter() - t0
    return results
