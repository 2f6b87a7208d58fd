"""Crash recovery: runs a dead process left in progress are marked failed and their pool slots freed.

A run executed in process (`run_harp`, `make demo`, the benchmarks) that is killed (kill -9, OOM, a pre-empted
node) stays STARTED in the instance forever, and its `gpu` pool slot stays claimed, so the next leaf run waits
for a slot no one will give back and the sensors, which wait for in-flight runs, skip forever. Dagster's run
monitoring cannot see this: the default run launcher has no worker health check, and an in-process run has no
launcher at all. So every run carries the host, pid and start time of the process executing it: runs our code
starts get them at launch (`process_tags`), any other run (the daemon's, the UI's, `dagster job execute`) from
its first step (`harp_resources.tag_run_worker`). `recover_dead_runs`, called before our commands and sensors start anything, marks a run
failed when that process is gone, then frees the slots of every run that is no longer in progress.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import dagster as dg
import psutil

from harp_resources import HOST_TAG, PID_STARTED_TAG, PID_TAG, process_tags

__all__ = ["GPU_POOL", "HOST_TAG", "PID_STARTED_TAG", "PID_TAG", "process_tags", "recover_dead_runs",
           "wait_for_pool_slot"]

GPU_POOL = "gpu"
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def _alive(pid: int, started: str | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, ValueError):
        return True  # another user's process, or a tag we cannot read: never fail a run we cannot judge


def _emit(log: Callable[[str], object] | None, message: str) -> None:
    if log is not None:
        log(message)


def recover_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], object] | None = None) -> list[str]:
    """Mark failed every in-progress run whose executing process on this host is gone; free the pool slots of
    every run no longer in progress. Returns the ids of the runs marked failed."""
    host = socket.gethostname()
    failed: list[str] = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        tags = run.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        pid = int(tags[PID_TAG])
        if _alive(pid, tags.get(PID_STARTED_TAG)):
            continue
        instance.report_run_failed(
            run, message=f"process {pid} executing this run is gone (killed or crashed); marked failed by harp")
        failed.append(run.run_id)
        _emit(log, f"run {run.run_id} ({run.job_name}) was left {run.status.value} by process {pid}, which is "
                   "gone: marked it failed")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for key in storage.get_concurrency_keys():
            info = storage.get_concurrency_info(key)
            holders = {s.run_id for s in info.claimed_slots} | {s.run_id for s in info.pending_steps}
            for run_id in sorted(holders):
                run = instance.get_run_by_id(run_id)
                if run is None or run.is_finished:
                    storage.free_concurrency_slots_for_run(run_id)
                    _emit(log, f"freed the {key!r} pool slots of run {run_id}, which is no longer in progress")
    return failed


def wait_for_pool_slot(instance: dg.DagsterInstance, pool: str = GPU_POOL, *, poll_s: float = 2.0,
                       log: Callable[[str], object] | None = None) -> None:
    """Block until `pool` has a free slot, sleeping between checks (Ctrl-C and SIGTERM stop it at once) and
    recovering dead runs each time; a run started while another live run holds the slot waits here, not in a
    busy loop inside the executor."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    said = 0.0
    while True:
        recover_dead_runs(instance, log)
        info = storage.get_concurrency_info(pool)
        limit = info.limit if info.limit is not None else info.slot_count
        if not limit or len(info.claimed_slots) < limit:
            return
        if time.monotonic() - said > 30.0:
            holders = sorted({s.run_id for s in info.claimed_slots})
            _emit(log, f"waiting for a free {pool!r} pool slot ({len(info.claimed_slots)}/{limit} held by run(s) "
                       f"{', '.join(holders)})")
            said = time.monotonic()
        time.sleep(poll_s)
