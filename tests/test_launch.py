"""How the commands start runs and what they show: runs that the UI lists under their jobs, light jobs in one
process, progress bars fed by the stages' progress, and Dagster's event lines in a log file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import dagster as dg
import pytest
from helpers import copy_of

from harp import progress
from harp_assets.console import RunConsole
from harp_assets.definitions import defs
from harp_assets.runner import code_location_origin, run_harp

REPO = Path(__file__).resolve().parents[1]
LOCATION = "harp_assets.definitions:defs"  # workspace.yaml's module and attribute, as the UI names it
LABEL = f"__repository__@{LOCATION}"
JOB_RUNS = """
query ($job: String!, $location: String!) {
  pipelineOrError(params: {repositoryLocationName: $location, repositoryName: "__repository__",
                           pipelineName: $job}) {
    __typename
    ... on Pipeline { runs { runId } }
  }
}
"""
ALL_RUNS = """
query { runsOrError { ... on Runs { results { runId pipelineName
  repositoryOrigin { repositoryLocationName repositoryName } } } } }
"""


def test_light_jobs_run_their_steps_in_the_run_process():
    for name in ("harp_prepare_job", "harp_select_job", "harp_validation_job"):
        assert defs.resolve_job_def(name).executor_def is dg.in_process_executor, name
    # leaf training keeps Dagster's default executor (a process per step, in the `gpu` pool)
    assert defs.resolve_job_def("leaf_utilities_job").executor_def is not dg.in_process_executor


def test_progress_reaches_the_console_as_lines_without_a_terminal(tmp_path):
    out = io.StringIO()
    with RunConsole(tmp_path, stream=out, bars=False) as console:
        loop = progress.Progress(3, log=lambda _m: None, what="leaf", plural="leaves", total_weight=30)
        for w in (10, 10, 10):
            loop.step(weight=w)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  leaf 1/3; ") and "leaves/s, about" in lines[0], lines
    assert lines[-1].startswith("  leaf 3/3; ") and lines[-1].endswith("about 0.0 s left"), lines
    assert not progress._listeners  # the console stopped listening when it closed
    assert console.path.parent == tmp_path / "logs" and console.path.is_file()


@pytest.mark.slow
def test_runs_are_the_code_locations_and_listed_under_their_jobs(tiny_pipeline, tmp_path):
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    assert code_location_origin().location_name == LOCATION
    r = tiny_pipeline.results
    made = [r["prepare"], *r["leaf_runs"], *r["select_runs"]]
    with copy_of(tiny_pipeline, tmp_path) as p:
        by_job: dict[str, set[str]] = {}
        for result in made:
            run = p.instance.get_run_by_id(result.run_id)
            assert run.remote_job_origin is not None, run.job_name
            assert run.remote_job_origin.repository_origin.get_label() == LABEL
            assert run.tags["harp/pid"] == str(os.getpid())  # crash recovery's tag: the process that ran it
            by_job.setdefault(run.job_name, set()).add(run.run_id)
        assert set(by_job) == {"harp_prepare_job", "leaf_utilities_job", "harp_select_job"}
        for job, ids in by_job.items():  # the stored tag the UI filters a job's runs by
            tagged = p.instance.get_run_ids(dg.RunsFilter(job_name=job, tags={REPOSITORY_LABEL_TAG: LABEL}))
            assert ids <= set(tagged), job
        # the UI's own GraphQL over the project's workspace.yaml lists every run under its job
        target = WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])
        with WorkspaceProcessContext(p.instance, target) as process_context:
            context = process_context.create_request_context()
            for job, ids in by_job.items():
                got = execute_dagster_graphql(context, JOB_RUNS, {"job": job, "location": LOCATION})
                assert not got.errors, got.errors
                node = got.data["pipelineOrError"]
                assert node["__typename"] == "Pipeline", node
                assert ids <= {x["runId"] for x in node["runs"]}, job
            runs = execute_dagster_graphql(context, ALL_RUNS).data["runsOrError"]["results"]
            ours = [x for x in runs if x["runId"] in {m.run_id for m in made}]
            assert len(ours) == len(made)
            assert {(x["repositoryOrigin"] or {}).get("repositoryLocationName") for x in ours} == {LOCATION}


@pytest.mark.slow
def test_the_console_shows_bars_and_the_log_file_gets_the_events(tiny_pipeline, tmp_path):
    """From scratch (a fresh instance): embedding and leaf training report count, rate and time left."""
    out = io.StringIO()
    with copy_of(tiny_pipeline, tmp_path, fresh_instance=True) as p, \
            RunConsole(tmp_path / "home", stream=out, bars=True) as console:
        results = run_harp(p.instance, p.defs, events=console.events)
        stored = [e.user_message for e in p.instance.all_logs(results["prepare"].run_id)]
    assert results["prepare"].success and results["select"].success
    # in Dagster's own event log (what the UI shows): the embedding loop's count, rate and time left
    assert any(m.startswith("embedded text 400/400; ") and "texts/s, about" in m for m in stored), stored
    shown = out.getvalue()
    # one bar per run, with its steps, and one per loop fed by harp.progress (count, rate, time left)
    assert "prepare: " in shown and " steps |" in shown and "select: " in shown
    assert "leaf partition: 100%|" in shown and "partitions/s, about" in shown
    assert "embedded text: 100%|" in shown and "texts/s, about" in shown
    # one line per finished run; never Dagster's raw event lines
    assert [line.split()[:2] for line in console.runs] == [
        ["prepare", "done"], *[["leaves", "done"]] * len(results["leaf_runs"]),
        *[["select", "done"]] * len(results["select_runs"])]
    assert "RUN_START" not in shown and "DEBUG" not in shown
    log = console.path.read_text()
    for result in (results["prepare"], *results["leaf_runs"], results["select"]):
        assert f"{result.run_id} - " in log and "STEP_SUCCESS" in log
    assert log.count("RUN_START") == 1 + len(results["leaf_runs"]) + len(results["select_runs"])
    # the stages' own progress lines, at INFO in the Dagster log
    assert "leaf partition 1/" in log and "partitions/s, about" in log and "embedded text 400/400; " in log
