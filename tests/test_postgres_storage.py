"""PostgreSQL as the Dagster instance storage (`dagster_home/dagster.postgres.yaml`, `harp-dagster run
--storage postgres`), with SQLite left the default.

The slow test starts a real PostgreSQL server in a temp dir (Debian's package or any `initdb`/`pg_ctl` found),
reachable only through a unix socket there, runs the tiny pipeline on an instance stored in it, then two
`leaf_utilities_job` runs on different leaves at once with the `gpu` pool limit at 2, and reads runs, event logs,
partitions and pool slots back from the database itself. Without a server it skips, unless
`HARP_REQUIRE_POSTGRES=1` (set by `.ci/run`) makes that a failure.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy
import yaml
from helpers import pipeline_defs, pipeline_resources, trained_leaves
from packaging.version import Version

from harp.lineage import LineageStore
from harp_assets.cli import (
    INSTANCE_CONFIGS,
    PG_URL_ENV,
    UsageError,
    instance_storage,
    prepare_home,
    redact_url,
)
from harp_assets.hierarchy import register_leaf_partitions
from harp_assets.runner import RANGE_START, run_harp
from harp_assets.validation import exhaustive_leaf_ids

REQUIRE_ENV = "HARP_REQUIRE_POSTGRES"
DATABASE = "dagster"


# --------------------------------------------------------------------------------------------------------
# Selecting the storage (no server needed)
# --------------------------------------------------------------------------------------------------------

def test_the_postgres_variant_differs_from_the_default_only_in_storage():
    """A team instance must not lose the `gpu` pool limit or run monitoring the default has."""
    default = yaml.safe_load(INSTANCE_CONFIGS["sqlite"].read_text())
    variant = yaml.safe_load(INSTANCE_CONFIGS["postgres"].read_text())
    assert "storage" not in default and instance_storage(INSTANCE_CONFIGS["sqlite"]) == "sqlite"
    assert variant.pop("storage") == {"postgres": {"postgres_url": {"env": PG_URL_ENV}}}
    assert variant == default


def test_a_new_home_is_sqlite_unless_postgres_is_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv(PG_URL_ENV, raising=False)
    assert prepare_home(tmp_path / "a") == "sqlite"
    assert (tmp_path / "a" / "dagster.yaml").read_text() == INSTANCE_CONFIGS["sqlite"].read_text()
    # an existing home keeps its storage: asking for another one is refused, not silently ignored
    with pytest.raises(UsageError, match=r"already holds a sqlite instance.*needs a new --home"):
        prepare_home(tmp_path / "a", "postgres")
    assert prepare_home(tmp_path / "a", "sqlite") == "sqlite"
    with pytest.raises(UsageError, match="--storage: expected one of"):
        prepare_home(tmp_path / "b", "mysql")


def test_a_postgres_home_needs_a_reachable_server_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(PG_URL_ENV, raising=False)
    with pytest.raises(UsageError, match=f"set {PG_URL_ENV}"):
        prepare_home(tmp_path / "home", "postgres")
    assert instance_storage(tmp_path / "home" / "dagster.yaml") == "postgres"
    # an existing Postgres home is checked whether or not --storage is given; the password is never printed
    no_server = tmp_path / "no_server"
    no_server.mkdir()
    monkeypatch.setenv(PG_URL_ENV, f"postgresql+psycopg2://harp:s3cret@/{DATABASE}?host={no_server}")
    with pytest.raises(UsageError, match="cannot connect to PostgreSQL") as err:
        prepare_home(tmp_path / "home")
    assert "s3cret" not in str(err.value) and "harp:***@" in str(err.value)
    # a bare postgresql:// is psycopg 3 to SQLAlchemy 2.1: without that driver, the message says what to write
    monkeypatch.setenv(PG_URL_ENV, f"postgresql://harp@/{DATABASE}?host={no_server}")
    bare = ("cannot connect to PostgreSQL" if importlib.util.find_spec("psycopg") or Version(sqlalchemy.__version__) < Version("2.1")
            else r"needs the 'psycopg' driver .* name the installed one: postgresql\+psycopg2://")
    with pytest.raises(UsageError, match=bare):
        prepare_home(tmp_path / "home")
    assert redact_url("postgresql://u:pw@h:5432/d?sslmode=require") == "postgresql://u:***@h:5432/d?sslmode=require"
    assert redact_url("postgresql://u@/d?host=/s&password=pw") == "postgresql://u@/d?host=/s&password=***"


# --------------------------------------------------------------------------------------------------------
# A real server
# --------------------------------------------------------------------------------------------------------

def _server_binaries() -> tuple[Path, Path] | None:
    """`initdb` and `pg_ctl` from PATH, else from the newest Debian `/usr/lib/postgresql/<major>/bin`."""
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if all(found):
        return Path(found[0]), Path(found[1])

    def major(folder: str) -> int:
        name = Path(folder).parent.name
        return int(name) if name.isdigit() else -1

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        initdb, pg_ctl = Path(folder) / "initdb", Path(folder) / "pg_ctl"
        if initdb.is_file() and pg_ctl.is_file():
            return initdb, pg_ctl
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires the PostgreSQL test (.ci/run installs the server)")
    pytest.skip(f"{reason} (install Debian's `postgresql` package, or put initdb and pg_ctl on PATH)")


def _server_user() -> dict[str, Any]:
    """subprocess arguments that run the server as an unprivileged user when we are root: PostgreSQL refuses
    to run as root. The Debian package's `postgres` user when it exists, else `nobody`."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    _unavailable("running as root and no unprivileged user (postgres, nobody) to run the server as")
    return {}


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster in a temp dir, trust auth, listening only on a unix socket in that dir
    (no TCP port to collide with or expose); yields the SQLAlchemy URL of its empty database `dagster`."""
    binaries = _server_binaries()
    if binaries is None:
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin")
    initdb, pg_ctl = binaries
    as_user = _server_user()
    # Directly under the temp root: pytest's own folders are private to root, which the server user cannot cross,
    # and a unix socket path must stay under about 100 characters.
    root = Path(tempfile.mkdtemp(prefix="harp-pg-"))
    data, log = root / "data", root / "server.log"
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C"}

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, cwd=root, env=env, timeout=120, **as_user)

    started = False
    try:
        got = call(str(initdb), "-D", str(data), "-U", "harp", "--auth=trust", "-E", "UTF8", "--locale=C",
                   "--no-sync")
        if got.returncode != 0:
            _unavailable(f"initdb failed: {got.stderr.strip()[-500:]}")
        # fsync off (-F): a test database need not survive a power cut, and it is much faster on a shared disk
        got = call(str(pg_ctl), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                   "-o", f"-k '{root}' -c listen_addresses='' -F", "start")
        if got.returncode != 0:
            server_log = log.read_text()[-1000:] if log.exists() else ""
            _unavailable(f"the PostgreSQL server did not start: {got.stderr.strip()[-500:]} {server_log}")
        started = True
        import psycopg2

        conn = psycopg2.connect(f"postgresql://harp@/postgres?host={root}", connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DATABASE}")
        conn.close()
        yield f"postgresql+psycopg2://harp@/{DATABASE}?host={root}"
    finally:
        if started:
            call(str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def _rows(url: str, sql: str) -> list[tuple]:
    import psycopg2

    libpq_url = url.replace("postgresql+psycopg2://", "postgresql://", 1)
    with contextlib.closing(psycopg2.connect(libpq_url, connect_timeout=10)) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


# A leaf run in its own process, as a second user or host would start one. Its training holds on until both
# runs' steps hold a `gpu` slot (or `WAIT_S` passes): proof that the two ran at once, not one after the other.
WAIT_S = 300
CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import dagster as dg
import torch
torch.set_num_threads(1)
from harp.models.finetuner import LoraFinetuner
from helpers import pipeline_defs, pipeline_resources
from harp_assets.runner import run_leaf_ranges

root, leaf, seen = Path({root!r}), {leaf!r}, Path({seen!r})
with dg.DagsterInstance.get() as instance:
    train = LoraFinetuner.train

    def train_once_both_hold_a_slot(self, *args, **kwargs):
        t0 = time.monotonic()
        while True:
            holders = sorted({{s.run_id for s in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}})
            if len(holders) >= 2 or time.monotonic() - t0 > {wait}:
                break
            time.sleep(0.2)
        seen.write_text(json.dumps(holders))
        return train(self, *args, **kwargs)

    LoraFinetuner.train = train_once_both_hold_a_slot
    [run] = run_leaf_ranges(instance, pipeline_defs(pipeline_resources(root)), {{leaf}})
    sys.exit(0 if run.success else 1)
"""


def _leaf_run_process(root: Path, leaf: str, seen: Path) -> subprocess.Popen:
    code = CHILD.format(tests=str(Path(__file__).parent), root=str(root), leaf=leaf, seen=str(seen), wait=WAIT_S)
    return subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_pipeline_on_postgres_with_two_leaf_runs_at_once(pg_url, tiny_pipeline, tmp_path, monkeypatch,
                                                         torch_one_thread):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    t_start = time.perf_counter()
    root = tmp_path / "copy"
    shutil.copytree(tiny_pipeline.root, root, ignore=shutil.ignore_patterns("dagster_home"))
    home = root / "dagster_home"
    monkeypatch.setenv(PG_URL_ENV, pg_url)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert prepare_home(home, "postgres") == "postgres"  # what `harp-dagster run --storage postgres` does
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    config["concurrency"]["pools"]["default_limit"] = 2  # two accelerators' worth of `gpu` slots
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        t_run = time.perf_counter()
        res = run_harp(instance, pipeline_defs(pipeline_resources(root)))
        run_s = time.perf_counter() - t_run
        assert res["prepare"].success and res["select"].success and all(r.success for r in res["leaf_runs"])
        reps = trained_leaves(res["leaf_runs"])
        assert sorted(instance.get_dynamic_partitions("leaves")) == sorted(reps)  # HARP's leaves only
        # two leaves beyond HARP's, registered in PostgreSQL the way the exhaustive mode registers them
        rest = [k for k in exhaustive_leaf_ids(LineageStore()) if k not in reps]
        assert reps and len(rest) >= 2
        pair = rest[:2]
        assert register_leaf_partitions(instance, pair) == pair
        registered = instance.get_dynamic_partitions("leaves")
        t_pair = time.perf_counter()
        seen = [tmp_path / f"seen-{k}.json" for k in range(2)]
        procs = [_leaf_run_process(root, leaf, s) for leaf, s in zip(pair, seen, strict=True)]
        try:
            outputs = [p.communicate(timeout=WAIT_S + 600)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
        pair_s = time.perf_counter() - t_pair
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        assert all(s.is_file() for s in seen), "a leaf run trained nothing"

        # the two leaf runs held both `gpu` slots at once, and finished with SUCCESS
        leaf_runs = {r.tags[RANGE_START]: r for r in instance.get_runs(
            filters=dg.RunsFilter(job_name="leaf_utilities_job")) if r.run_id not in {x.run_id for x in res["leaf_runs"]}}
        assert sorted(leaf_runs) == sorted(pair)
        pair_ids = sorted(leaf_runs[k].run_id for k in pair)
        assert [json.loads(s.read_text()) for s in seen] == [pair_ids, pair_ids]
        records = instance.get_run_records(filters=dg.RunsFilter(run_ids=pair_ids))
        assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
        assert max(r.start_time for r in records) < min(r.end_time for r in records)  # their run times overlap
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []

        # every leaf_utilities partition measured is recorded: the representatives and the pair
        measured = instance.get_materialized_partitions(dg.AssetKey("leaf_utilities"))
        assert measured == set(reps) | set(pair)
        all_runs = instance.get_runs()
        run_ids = {r.run_id for r in all_runs}

    # ... and it is all in PostgreSQL, read with psycopg2, not in SQLite files under DAGSTER_HOME
    assert list(home.rglob("*.db")) == []
    statuses = dict(_rows(pg_url, "SELECT run_id, status FROM runs"))
    assert set(statuses) == run_ids and set(statuses.values()) == {"SUCCESS"}
    assert len(run_ids) == 2 + len(res["leaf_runs"]) + len(res["select_runs"]) + 1  # + prepare
    mats = _rows(pg_url, "SELECT run_id, partition FROM event_logs WHERE dagster_event_type = "
                         "'ASSET_MATERIALIZATION' AND asset_key = '[\"leaf_utilities\"]'")
    assert sorted(p for _, p in mats) == sorted([*reps, *pair])
    assert {p: r for r, p in mats if p in pair} == {k: leaf_runs[k].run_id for k in pair}
    events = dict(_rows(pg_url, "SELECT run_id, count(*) FROM event_logs GROUP BY run_id"))
    assert set(events) == run_ids and all(n > 0 for n in events.values())
    partitions = _rows(pg_url, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'leaves'")
    assert sorted(p for (p,) in partitions) == sorted(registered)
    assert _rows(pg_url, "SELECT count(*) FROM concurrency_slots WHERE concurrency_key = 'gpu' AND run_id IS NOT "
                         "NULL AND deleted = false") == [(0,)]
    print(f"\npostgres: run_harp {run_s:.1f} s, then 2 leaf runs at once {pair_s:.1f} s wall, "
          f"{time.perf_counter() - t_start:.1f} s in all; {len(run_ids)} runs, {sum(events.values())} events")
