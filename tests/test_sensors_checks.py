"""Pool sensor, chaining sensors, the daily schedule and the asset checks on a tiny demo in a temporary DAGSTER_HOME.

The daemon is played by hand: each RunRequest a sensor returns is executed in process with its tags, and the
run-status sensors are fed those runs' success events.
"""

import os
import time

import dagster as dg
import polars as pl
import pytest
from helpers import BUDGET, GROWTH, POOL, copy_of, pipeline_defs, trained_leaves

from harp.contracts import DataContractError
from harp.lineage import LineageStore
from harp_assets.automation import (
    BATCH_TAG,
    CHAIN_SENSORS,
    CHAIN_TAG,
    RANGE_END,
    RANGE_START,
    daily_reselection,
    pool_growth_sensor,
    reselect_cron,
)
from harp_assets.definitions import defs
from harp_resources import LineageResource, PoolSourceResource

pytestmark = pytest.mark.slow

LEAF_SENSOR, SELECT_SENSOR, ACTIVE_SENSOR = CHAIN_SENSORS
CHECKS_JOB = dg.define_asset_job("harp_checks_job", selection=dg.AssetSelection.all_asset_checks())


def _env(copy) -> dict:
    """The sensors' view of a pipeline copy: its resources, definitions (with a checks job) and instance."""
    test_defs = pipeline_defs(copy.resources, sensors=[pool_growth_sensor, LEAF_SENSOR, SELECT_SENSOR],
                              schedules=[daily_reselection])
    test_defs = dg.Definitions.merge(test_defs, dg.Definitions(jobs=[CHECKS_JOB]))
    return {"defs": test_defs, "instance": copy.instance, "resources": copy.resources, "copy": copy,
            "pool_dir": copy.root / "pool", "lineage": copy.lineage}


@pytest.fixture
def fresh(tiny_pipeline, tmp_path):
    """The tiny demo's pool and model with a new, empty instance: nothing prepared or measured yet."""
    with copy_of(tiny_pipeline, tmp_path / "copy", fresh_instance=True) as copy:
        yield _env(copy)


@pytest.fixture
def env(tiny_pipeline, tmp_path):
    """A copy of the materialised tiny pipeline (prepared, representatives measured, selected)."""
    with copy_of(tiny_pipeline, tmp_path / "copy") as copy:
        yield _env(copy)


def _pool_tick(env, cursor):
    with dg.build_sensor_context(instance=env["instance"], cursor=cursor, resources=env["resources"]) as ctx:
        return pool_growth_sensor(ctx)


def _schedule_tick(env):
    with dg.build_schedule_context(instance=env["instance"], resources=env["resources"]) as ctx:
        return daily_reselection(ctx)


def _execute(env, req: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """What the daemon would do with a run request: launch its job with its tags."""
    result = env["defs"].resolve_job_def(req.job_name).execute_in_process(instance=env["instance"], tags=req.tags)
    assert result.success
    return result


def _status_tick(env, sensor, result: dg.ExecuteInProcessResult) -> dg.SensorResult:
    with dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=result.get_run_success_event(), dagster_instance=env["instance"],
        dagster_run=result.dagster_run, resources=env["resources"],
    ) as ctx:
        out = sensor(ctx)
    assert isinstance(out, dg.SensorResult)
    return out


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _run_chain(env, prepare_request: dg.RunRequest) -> dict:
    """Prepare -> leaf runs the leaf sensor asks for -> the selection the second sensor asks for."""
    prep = _execute(env, prepare_request)
    leaf_tick = _status_tick(env, LEAF_SENSOR, prep)
    leaf_runs = [_execute(env, r) for r in leaf_tick.run_requests if r.job_name == "leaf_utilities_job"]
    trained = len(trained_leaves(leaf_runs))
    select_ticks = [_status_tick(env, SELECT_SENSOR, r) for r in leaf_runs]
    asked = [r for t in select_ticks for r in t.run_requests]
    if not leaf_runs:  # nothing to train: the leaf sensor asks for the selection itself
        asked = list(leaf_tick.run_requests)
        assert [r.job_name for r in asked] == ["harp_select_job"]
    assert len({r.run_key for r in asked}) == 1  # one selection per batch, whichever leaf run ends last
    select = _execute(env, asked[-1])
    checks = {**_checks(prep), **_checks(select)}
    return {"prepare": prep, "leaf_tick": leaf_tick, "trained": trained, "select": select, "checks": checks}


def test_definitions_register_sensors_schedule_and_checks():
    dg.Definitions.validate_loadable(defs)
    assert defs.get_sensor_def("pool_growth_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    assert {s.name for s in defs.sensors} == {"pool_growth_sensor", "leaf_refresh_sensor",
                                              "selection_after_leaves_sensor", "active_round_sensor"}
    sched = defs.get_schedule_def("daily_reselection")
    assert sched.cron_schedule == reselect_cron()
    assert sched.default_status == dg.DefaultScheduleStatus.RUNNING and sched.job_name == "harp_prepare_job"
    keys = {(k.asset_key.to_user_string(), k.name) for k in defs.resolve_asset_graph().asset_check_keys}
    assert ("leaf_hierarchy", "every_example_in_one_leaf") in keys
    assert {a for a, _ in keys} == {"leaf_hierarchy", "phi_posteriors", "harp_c_selection", "harp_e_selection",
                                    "tsds_selection", "random_selection"}


def test_reselect_cron_from_env(monkeypatch):
    monkeypatch.delenv("HARP_RESELECT_CRON", raising=False)
    assert reselect_cron() == "0 3 * * *"
    monkeypatch.setenv("HARP_RESELECT_CRON", "*/15 * * * *")
    assert reselect_cron() == "*/15 * * * *"


def test_missing_pool_source_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    resources = {"pool_source": PoolSourceResource(pool_path=str(tmp_path / "absent")), "lineage": LineageResource()}
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, cursor="abc", resources=resources) as ctx:
            out = pool_growth_sensor(ctx)
        with dg.build_schedule_context(instance=instance, resources=resources) as ctx:
            sched = daily_reselection(ctx)
    assert isinstance(out, dg.SkipReason) and "absent does not exist" in out.skip_message
    assert isinstance(sched, dg.SkipReason) and "absent does not exist" in sched.skip_message


def test_waits_while_a_harp_run_is_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "pool").mkdir()
    resources = {"pool_source": PoolSourceResource(pool_path=str(tmp_path / "pool")), "lineage": LineageResource()}
    with dg.instance_for_test() as instance:
        instance.add_run(dg.DagsterRun(job_name="leaf_utilities_job", run_id="r1", status=dg.DagsterRunStatus.STARTED))
        with dg.build_sensor_context(instance=instance, cursor="abc", resources=resources) as ctx:
            out = pool_growth_sensor(ctx)
    assert isinstance(out, dg.SkipReason) and "in flight, e.g. r1" in out.skip_message


def test_first_pool_chains_prepare_leaves_and_selection(fresh):
    env = fresh
    first = _pool_tick(env, None)
    assert [r.job_name for r in first.run_requests] == ["harp_prepare_job"]
    fp = env["resources"]["pool_source"].fingerprint()
    assert first.cursor == fp and first.run_requests[0].tags[CHAIN_TAG] == "pool_growth_sensor"
    t0 = time.perf_counter()
    chain = _run_chain(env, first.run_requests[0])
    print(f"\nfirst chain {time.perf_counter() - t0:.1f} s")
    table = env["lineage"].read_table("leaves")
    reps = sorted(table.filter(pl.col("is_representative"))["leaf_id"].to_list())
    # a first build registers representatives first: one range, one run
    reqs = chain["leaf_tick"].run_requests
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in reqs] == [(reps[0], reps[-1])]
    assert all(r.job_name == "leaf_utilities_job" and BATCH_TAG in r.tags for r in reqs)
    assert chain["trained"] == len(reps) >= 2
    assert chain["checks"] and all(chain["checks"].values()), chain["checks"]
    assert len(chain["checks"]) == 7
    # the same pool again: no request, the cursor stays
    again = _pool_tick(env, first.cursor)
    assert not again.run_requests and again.cursor == first.cursor


def test_no_change_no_request(env):
    # a pool already prepared (by run_harp): its content matches, so no run; the cursor takes the fingerprint
    seen = _pool_tick(env, None)
    cursor = env["resources"]["pool_source"].fingerprint()
    assert not seen.run_requests and seen.cursor == cursor
    again = _pool_tick(env, cursor)
    assert not again.run_requests and again.cursor == cursor
    # a touched file moves the fingerprint, but its content is prepared already: no run, cursor advances
    f = env["pool_dir"] / "part-000.parquet"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = _pool_tick(env, cursor)
    assert not touched.run_requests and touched.cursor != cursor
    # the schedule: same check, nothing to do
    assert isinstance(_schedule_tick(env), dg.SkipReason)
    # a prepare run outside the chain (run_harp, the UI) is not chained; a chained one with nothing stale and
    # current posteriors asks for nothing
    plain = env["defs"].resolve_job_def("harp_prepare_job").execute_in_process(instance=env["instance"])
    assert not _status_tick(env, LEAF_SENSOR, plain).run_requests
    chained = _execute(env, dg.RunRequest(job_name="harp_prepare_job", tags={CHAIN_TAG: "test"}))
    assert not _status_tick(env, LEAF_SENSOR, chained).run_requests


def _outcome(lineage: LineageStore) -> dict:
    """What a re-selection leaves behind: the leaves with their member sets, and each method's selection."""
    leaves = sorted(lineage.read_table("leaves").select("leaf_id", "member_hash", "is_representative").iter_rows())
    sel = lineage.query("SELECT method, example_id FROM latest_selections ORDER BY method, rank")
    return {"leaves": leaves, "selections": {m: sel.filter(pl.col("method") == m)["example_id"].to_list()
                                             for m in sorted(set(sel["method"].to_list()))}}


def test_new_pool_file_takes_the_same_path_as_the_command_line(env, tiny_pipeline, tmp_path):
    """Pool file added -> pool sensor -> prepare -> leaf sensor -> leaf runs -> selection, against `run_harp` on
    another copy with the same file added: the same leaves, the same retrained leaves, the same selections."""
    from harp_assets.runner import run_harp

    lineage: LineageStore = env["lineage"]
    before = {r["leaf_id"]: r["member_hash"] for r in lineage.read_table("leaves").iter_rows(named=True)}
    cursor = env["resources"]["pool_source"].fingerprint()
    env["copy"].grow()
    # the schedule sees the change too (it compares the pool's content with the prepared one)
    sched = _schedule_tick(env)
    assert isinstance(sched, dg.RunRequest) and sched.job_name == "harp_prepare_job"
    tick = _pool_tick(env, cursor)
    assert [r.job_name for r in tick.run_requests] == ["harp_prepare_job"]
    assert tick.cursor == env["resources"]["pool_source"].fingerprint() != cursor
    chain = _run_chain(env, tick.run_requests[0])
    after = lineage.read_table("leaves")
    stale_reps = sorted(r["leaf_id"] for r in after.iter_rows(named=True)
                        if r["is_representative"] and before.get(r["leaf_id"]) != r["member_hash"])
    registered = env["instance"].get_dynamic_partitions("leaves")
    requested = [k for r in chain["leaf_tick"].run_requests if r.job_name == "leaf_utilities_job"
                 for k in registered[registered.index(r.tags[RANGE_START]): registered.index(r.tags[RANGE_END]) + 1]]
    assert requested == [k for k in registered if k in set(stale_reps)]
    assert chain["trained"] == len(stale_reps)
    assert all(chain["checks"].values()), chain["checks"]
    assert lineage.query("SELECT count(*) AS n FROM examples")["n"][0] == POOL + GROWTH
    by_sensor = _outcome(lineage)
    with copy_of(tiny_pipeline, tmp_path / "cli") as cli:
        cli.grow()
        res = run_harp(cli.instance, cli.defs)
        assert res["select"].success
        assert len(trained_leaves(res["leaf_runs"])) == chain["trained"]
        by_command = _outcome(cli.lineage)
    assert by_sensor == by_command
    assert by_sensor["selections"]["harp_c"] and by_sensor["selections"]["harp_e"]
    print(f"\ngrowth: {chain['trained']} representatives retrained on both paths")


def test_checks_fail_on_corrupted_tables(env):
    lineage: LineageStore = env["lineage"]
    run_checks = env["defs"].resolve_job_def("harp_checks_job")
    assert all(_checks(run_checks.execute_in_process(instance=env["instance"])).values())
    # one example moved to a leaf that does not exist
    ex = lineage.read_table("examples")
    lineage.write_table("examples", ex.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("L_missing")).otherwise(pl.col("leaf_id")).alias("leaf_id")))
    # a representative's stored utilities carry another data version
    rep = lineage.read_table("leaves").filter(pl.col("is_representative"))["leaf_id"][0]
    rows = lineage.read_partition("leaf_utilities", rep)
    lineage.write_partition("leaf_utilities", rep, rows.with_columns(pl.lit("0" * 16).alias("data_version")))
    # a non-finite posterior
    post = lineage.read_table("phi_posteriors")
    lineage.write_table("phi_posteriors", post.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(float("nan")).otherwise(pl.col("mean")).alias("mean")))
    # the latest random selection gains an example from outside the pool, one over the budget
    event = env["instance"].get_latest_materialization_event(dg.AssetKey("random_selection"))
    sid = str(event.asset_materialization.metadata["selection_id"].value)
    sel = lineage.read_partition("selections", sid)
    extra = sel.head(1).with_columns(pl.lit("not-in-pool").alias("example_id"), pl.lit(BUDGET + 1, pl.Int32).alias("rank"))
    lineage.append_run("selections", sid, pl.concat([sel, extra]), exist_ok=True)

    res = run_checks.execute_in_process(instance=env["instance"], raise_on_error=False)
    evals = {e.check_name: e for e in res.get_asset_check_evaluations()}
    failed = {name for name, e in evals.items() if not e.passed}
    assert failed == {"every_example_in_one_leaf", "representatives_measured_and_current", "posteriors_finite",
                      "random_within_budget_and_pool"}
    md = {k: v.value for k, v in evals["random_within_budget_and_pool"].metadata.items()}
    assert md["outside_pool"] == 1 and md["over_budget"] == 1
    md = {k: v.value for k, v in evals["representatives_measured_and_current"].metadata.items()}
    assert md["stale"] == 1 and md["stale_examples"] == [rep]
    # the stale representative makes the leaf sensor ask for exactly that leaf again
    chained = _execute(env, dg.RunRequest(job_name="harp_prepare_job", tags={CHAIN_TAG: "test"}))
    reqs = _status_tick(env, LEAF_SENSOR, chained).run_requests
    assert [(r.tags[RANGE_START], r.tags[RANGE_END]) for r in reqs] == [(rep, rep)]


def test_a_run_left_by_a_dead_process_does_not_hold_the_sensor(tmp_path, monkeypatch):
    import subprocess
    import sys

    from harp_assets.recovery import PID_TAG, process_tags

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "pool").mkdir()
    resources = {"pool_source": PoolSourceResource(pool_path=str(tmp_path / "pool")), "lineage": LineageResource()}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with dg.instance_for_test() as instance:
        tags = {**process_tags(), PID_TAG: str(gone.pid)}
        instance.add_run(dg.DagsterRun(job_name="leaf_utilities_job", run_id="r1", status=dg.DagsterRunStatus.STARTED,
                                       tags=tags))
        # past the in-flight check, the sensor reads the (empty) pool folder instead of skipping
        with dg.build_sensor_context(instance=instance, cursor="abc", resources=resources) as ctx, \
                pytest.raises(DataContractError, match="folder holds no data files"):
            pool_growth_sensor(ctx)
        assert instance.get_run_by_id("r1").status == dg.DagsterRunStatus.FAILURE
