"""The graph as a user drives it: the `dagster` command line, and the webserver's GraphQL API.

Both run in a temporary DAGSTER_HOME on a small demo (data only: the cheap source assets need no model).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import requests

from harp_demo.build import build_demo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHEAP = ["pool_examples", "proxy_eval_set"]
GRAPH = {"pool_examples", "proxy_eval_set", "example_embeddings", "leaf_hierarchy", "base_model_scores",
         "leaf_utilities", "phi_posteriors", "harp_c_selection", "harp_e_selection", "tsds_selection",
         "random_selection", "active_round_plan", "lineage_catalog"}
VALIDATION = {"exhaustive_selection", "selection_validation"}


@pytest.fixture
def user_env(tmp_path: Path) -> dict:
    """This test's own instance (the repo's dagster.yaml plus a run coordinator that needs no daemon) and demo."""
    root = tmp_path
    home = root / "dagster_home"
    home.mkdir()
    config = (REPO / "dagster_home" / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(
        config + "\nrun_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    demo = build_demo(root / "demo", pool_size=200, seed=0, build_base_model=False)
    env = {**os.environ, "DAGSTER_HOME": str(home), "HARP_DEMO_DIR": str(demo.root), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DAGSTER_DISABLE_TELEMETRY": "1"}
    for var in ("HARP_POOL", "HARP_EVAL", "HARP_BASE_MODEL"):
        env.pop(var, None)
    return {"home": home, "env": env, "demo": demo}


def _materialisations(home: Path, key: str) -> list:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return instance.fetch_materializations(dg.AssetKey(key), limit=10).records


def test_cli_materialises_assets_into_the_instance(user_env):
    proc = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "harp_assets.definitions", "--select", ",".join(CHEAP)],
        cwd=REPO, env=user_env["env"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key in CHEAP:
        records = _materialisations(user_env["home"], key)
        assert len(records) == 1, key
    md = records[0].asset_materialization.metadata
    pool_md = _materialisations(user_env["home"], "pool_examples")[0].asset_materialization.metadata
    assert any(v.value == 200 for v in pool_md.values()), {k: v.value for k, v in pool_md.items()}
    assert md  # the eval set's materialisation carries metadata too
    # the assets' outputs went under the temporary DAGSTER_HOME, not the repository's
    assert (user_env["home"] / "harp" / "artifacts").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webserver(user_env) -> Iterator[int]:
    """`dagster-webserver` on a free loopback port; the whole process group is stopped afterwards."""
    port = _free_port()
    log = open(user_env["home"] / "webserver.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=user_env["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError((user_env["home"] / "webserver.log").read_text()[-3000:])
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("webserver did not answer in 90 s")
            time.sleep(0.5)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


ASSETS_QUERY = """
query { assetNodes { assetKey { path } groupName } }
"""


def test_webserver_lists_assets_and_launches_a_materialisation(user_env, webserver):
    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    client = DagsterGraphQLClient("127.0.0.1", port_number=webserver, timeout=60)
    nodes = client._execute(ASSETS_QUERY)["assetNodes"]
    keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert GRAPH | VALIDATION <= keys, sorted((GRAPH | VALIDATION) - keys)
    groups = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
    assert {groups[k] for k in GRAPH} == {"prepare", "measure", "select"}
    assert groups["leaf_utilities"] == "measure" and groups["pool_examples"] == "prepare"
    assert groups["phi_posteriors"] == groups["lineage_catalog"] == "select"
    assert {n["groupName"] for n in nodes if "/".join(n["assetKey"]["path"]) in VALIDATION} == {"validation"}

    run_id = client.submit_job_execution("__ASSET_JOB", asset_selection=[[k] for k in CHEAP])
    deadline = time.monotonic() + 120
    status = None
    while time.monotonic() < deadline:
        try:
            status = client.get_run_status(run_id)
        except DagsterGraphQLClientError:
            status = None
        if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            break
        time.sleep(1)
    assert status == dg.DagsterRunStatus.SUCCESS, (status, (user_env["home"] / "webserver.log").read_text()[-3000:])
    with dg.DagsterInstance.from_config(str(user_env["home"])) as instance:
        for key in CHEAP:
            latest = instance.get_latest_materialization_event(dg.AssetKey(key))
            assert latest is not None and latest.run_id == run_id, key



def test_demo_run_fails_with_a_clear_message(user_env, tmp_path):
    env = {**user_env["env"], "HARP_DEMO_DIR": str(tmp_path / "no_demo_here")}
    proc = subprocess.run([sys.executable, "-m", "harp_demo.run", "--no-build"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: the HARP pipeline failed" in proc.stderr and "no_demo_here" in proc.stderr, proc.stderr[-2000:]
    env.pop("DAGSTER_HOME")
    proc = subprocess.run([sys.executable, "-m", "harp_demo.run", "--no-build"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "DAGSTER_HOME is not set" in proc.stderr, proc.stderr[-2000:]
