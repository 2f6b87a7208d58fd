"""A run killed with SIGKILL never blocks the next one: its run is marked failed, its pool slot freed.

A real `run_harp` runs in a child process on a copy of the tiny demo, with the `gpu` pool limited to one slot
as in `dagster_home/dagster.yaml`; the test kills it (kill -9) mid-way, then runs `run_harp` again here.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from helpers import pipeline_defs, pipeline_resources, trained_leaves

from harp.lineage import LineageStore
from harp_assets.recovery import PID_TAG, process_tags, recover_dead_runs
from harp_assets.runner import run_harp

POOL_LIMIT = {"concurrency": {"pools": {"default_limit": 1}}}

CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import dagster as dg
import torch
torch.set_num_threads(1)
from helpers import pipeline_defs, pipeline_resources
from harp_assets.runner import run_harp
root = Path({root!r})
with dg.instance_for_test(temp_dir=str(root / "dagster_home"), overrides={limit!r}) as instance:
    run_harp(instance, pipeline_defs(pipeline_resources(root)))
"""


def _child(root: Path) -> subprocess.Popen:
    code = CHILD.format(tests=str(Path(__file__).parent), root=str(root), limit=POOL_LIMIT)
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home")}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "the child run ended before the point the test kills it at"
        assert time.monotonic() - t0 < timeout, "timed out waiting for the child run"
        time.sleep(0.05)


def _in_progress(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING])))


@pytest.fixture
def fresh_copy(tiny_pipeline, tmp_path, monkeypatch):
    """The tiny demo's data and model in a new folder with an empty instance (nothing measured yet)."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_pipeline.root, root, ignore=shutil.ignore_patterns("dagster_home"))
    (root / "dagster_home").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    return root


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_leaf_run_killed_mid_way_is_recovered_and_only_missing_leaves_train(fresh_copy, torch_one_thread):
    root = fresh_copy
    leaf_dir = root / "dagster_home" / "harp" / "leaf_utilities"
    proc = _child(root)
    try:
        _wait_for(lambda: leaf_dir.is_dir() and any(leaf_dir.glob("*.parquet")), proc)
        _kill(proc)
    finally:
        if proc.poll() is None:
            _kill(proc)
    measured_before = set(LineageStore(root=str(root / "dagster_home" / "harp")).partition_keys("leaf_utilities"))
    assert measured_before
    with dg.instance_for_test(temp_dir=str(root / "dagster_home"), overrides=POOL_LIMIT) as instance:
        stuck = _in_progress(instance)
        assert [r.job_name for r in stuck] == ["leaf_utilities_job"] and stuck[0].tags[PID_TAG] == str(proc.pid)
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [s.run_id for s in claimed] == [stuck[0].run_id]  # the dead run still holds the only slot
        resources = pipeline_resources(root)
        res = run_harp(instance, pipeline_defs(resources))
        assert res["select"].success
        # the dead run is failed, with the reason, and nothing is left in progress or holding a slot
        dead = instance.get_run_by_id(stuck[0].run_id)
        assert dead.status == dg.DagsterRunStatus.FAILURE
        assert _in_progress(instance) == []
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
        # only the representatives the killed run had not finished train now
        reps = set(resources["lineage"].read_table("leaves").filter("is_representative")["leaf_id"].to_list())
        assert sorted(trained_leaves(res["leaf_runs"])) == sorted(reps - measured_before)


@pytest.mark.slow
def test_a_select_run_killed_mid_way_does_not_block_the_next_run(fresh_copy, torch_one_thread):
    root = fresh_copy
    proc = _child(root)
    try:
        with dg.instance_for_test(temp_dir=str(root / "dagster_home"), overrides=POOL_LIMIT) as instance:
            _wait_for(lambda: any(r.job_name == "harp_select_job" for r in _in_progress(instance)), proc)
            _kill(proc)
            assert [r.job_name for r in _in_progress(instance)] == ["harp_select_job"]
            res = run_harp(instance, pipeline_defs(pipeline_resources(root)))
            assert res["select"].success and trained_leaves(res["leaf_runs"]) == []
            assert _in_progress(instance) == []
            failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
            assert [r.job_name for r in failed] == ["harp_select_job"]
    finally:
        if proc.poll() is None:
            _kill(proc)


def test_live_and_foreign_runs_are_left_alone(tmp_path):
    """Only a run whose recorded process on this host is gone is failed: a live one, another host's, one without
    our tags and one whose pid now belongs to a younger process are left as they are."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        mine = process_tags()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()

        def started(tags: dict) -> str:
            run = instance.create_run_for_job(dg.GraphDefinition(name="g").to_job(), tags=tags)
            instance.handle_new_event(_started_event(run))
            return run.run_id

        live = started(mine)
        dead = started({**mine, PID_TAG: str(gone.pid)})
        other_host = started({**mine, "harp/host": "elsewhere", PID_TAG: str(gone.pid)})
        untagged = started({})
        reused = started({**mine, "harp/pid_started": "1.00"})  # our pid, but started long after that time
        assert sorted(recover_dead_runs(instance)) == sorted([dead, reused])
        status = {r: instance.get_run_by_id(r).status for r in (live, dead, other_host, untagged, reused)}
        assert status[dead] == status[reused] == dg.DagsterRunStatus.FAILURE
        assert {status[live], status[other_host], status[untagged]} == {dg.DagsterRunStatus.STARTED}


def _started_event(run: dg.DagsterRun) -> dg.EventLogEntry:
    from dagster._core.events import DagsterEvent, DagsterEventType

    event = DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name=run.job_name)
    return dg.EventLogEntry(error_info=None, level="debug", user_message="", run_id=run.run_id,
                            timestamp=time.time(), dagster_event=event)


@pytest.mark.slow
def test_a_step_subprocess_dies_with_its_killed_launcher(tmp_path):
    """`dagster job execute` runs the step in a subprocess; kill -9 of the launcher takes the step down too."""
    import psutil

    pid_file = tmp_path / "step.pid"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "HARP_TEST_PID_FILE": str(pid_file)}
    job_file = Path(__file__).parent / "data" / "sleepy_job.py"
    launcher = subprocess.Popen([str(Path(sys.executable).with_name("dagster")), "job", "execute", "-f",
                                 str(job_file), "-j", "sleepy"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (pid_file.is_file() and pid_file.read_text()):
            assert launcher.poll() is None and time.monotonic() - t0 < 120, "the step never started"
            time.sleep(0.1)
        step = psutil.Process(int(pid_file.read_text()))
        assert step.pid != launcher.pid and step.is_running()
        _kill(launcher)
        gone, _ = psutil.wait_procs([step], timeout=30)
        assert gone, "the step process outlived its killed launcher"
        # the run was tagged with its worker (the launcher) by its first step, so recovery can fail it
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            [run] = _in_progress(instance)
            assert run.tags[PID_TAG] == str(launcher.pid)
            assert recover_dead_runs(instance) == [run.run_id] and _in_progress(instance) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


# The waiter starts with the signal handling a terminal gives a command (SIGINT raises KeyboardInterrupt, SIGTERM
# kills, neither blocked), whatever the test process's own children inherit from it.
WAITER = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT, signal.SIGTERM}})
import dagster as dg
from harp_assets.recovery import wait_for_pool_slot
with dg.instance_for_test(temp_dir={home!r}, overrides={limit!r}) as instance:
    print("waiting", flush=True)
    wait_for_pool_slot(instance, poll_s=0.2)
    print("got a slot", flush=True)
"""


@pytest.mark.slow
def test_waiting_for_a_held_slot_sleeps_and_stops_on_sigterm_and_ctrl_c(tmp_path):
    """A live run holds the only `gpu` slot: a waiter uses almost no CPU, and SIGTERM or SIGINT ends it at once;
    once the holder's process is gone, the next waiter gets the slot."""
    import psutil

    home = str(tmp_path / "home")
    os.makedirs(home)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with dg.instance_for_test(temp_dir=home, overrides=POOL_LIMIT) as instance:
            run = instance.create_run_for_job(dg.GraphDefinition(name="g").to_job(), tags={
                **process_tags(), PID_TAG: str(holder.pid),
                "harp/pid_started": f"{psutil.Process(holder.pid).create_time():.2f}"})
            instance.handle_new_event(_started_event(run))
            instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
            claim = instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "leaf_utilities")
            assert claim.is_claimed
            for sig in (signal.SIGTERM, signal.SIGINT):
                waiter = subprocess.Popen([sys.executable, "-c", WAITER.format(home=home, limit=POOL_LIMIT)],
                                          stdout=subprocess.PIPE, text=True)
                assert waiter.stdout.readline().strip() == "waiting"
                proc = psutil.Process(waiter.pid)
                before = sum(proc.cpu_times()[:2])
                time.sleep(3.0)
                assert waiter.poll() is None  # still waiting: the slot is held by a live run
                assert sum(proc.cpu_times()[:2]) - before < 1.0  # 3 s of waiting: it sleeps, no busy loop
                t0 = time.monotonic()
                waiter.send_signal(sig)
                try:
                    waiter.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    status = [line.strip() for line in open(f"/proc/{waiter.pid}/status")
                              if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt"))]
                    waiter.kill()
                    pytest.fail(f"the waiter outlived {sig!r} by 10 s: {status}")
                assert time.monotonic() - t0 < 5 and waiter.returncode != 0
            holder.kill()
            holder.wait()
            waiter = subprocess.run([sys.executable, "-c", WAITER.format(home=home, limit=POOL_LIMIT)],
                                    capture_output=True, text=True, timeout=120)
            assert waiter.stdout.split() == ["waiting", "got", "a", "slot"]
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_main_process_whose_parent_is_gone_is_left_alone(tmp_path):
    """A nohup'd or daemonised run (its parent already exited) keeps running: only step subprocesses die with
    their parent."""
    marker = tmp_path / "alive"
    code = ("import time; time.sleep(1); from harp_resources import die_with_parent; die_with_parent(); "
            f"time.sleep(0.5); open({str(marker)!r}, 'w').write('yes')")
    subprocess.run(["sh", "-c", f"{sys.executable} -c \"{code}\" > /dev/null 2>&1 &"], check=True, cwd=os.getcwd())
    t0 = time.monotonic()
    while not marker.exists() and time.monotonic() - t0 < 60:
        time.sleep(0.2)
    assert marker.exists() and marker.read_text() == "yes"
