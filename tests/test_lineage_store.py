"""Lineage store: schema checks, atomic and concurrent Parquet writes, the DuckDB catalog, lineage queries."""

import datetime as dt
import fcntl
import multiprocessing as mp
import multiprocessing.pool
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from harp.lineage import (
    EXAMPLE_QUERIES,
    SCHEMAS,
    LineageError,
    LineageStore,
    selection_id_for,
    validate,
)
from harp_resources import LineageResource

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + dt.timedelta(hours=1)
T2 = T0 + dt.timedelta(hours=2)


def frame(name: str, rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMAS[name])


def util_rows(leaf: str, phis: dict[str, float], *, version: str = "v1", run_id: str | None = "r1") -> pl.DataFrame:
    return frame(
        "leaf_utilities",
        [
            dict(
                leaf_id=leaf, domain=d, utility=0.5 + p, base=0.5, phi=p, bootstrap_sd=0.01, n_eval=40,
                data_version=version, measured_at=T0, train_seconds=1.5, eval_seconds=0.5, examples=2,
                run_id=run_id,
            )
            for d, p in phis.items()
        ],
    )


def selection(sid: str, method: str, picks: list[tuple[str, str, str, float | None]], at: dt.datetime) -> pl.DataFrame:
    return frame(
        "selections",
        [
            dict(
                selection_id=sid, method=method, rank=i, example_id=ex, leaf_id=leaf, parent_id=parent,
                gain=gain, predicted_utility=None if gain is None else 0.6, budget=3, pool_version="p1",
                created_at=at, run_id="run-" + sid,
            )
            for i, (ex, leaf, parent, gain) in enumerate(picks)
        ],
    )


def manifest(run_id: str) -> pl.DataFrame:
    return frame(
        "run_manifests",
        [
            dict(
                run_id=run_id, created_at=T0, pool_version="p1", embedder="tiny", base_model="tiny-lm",
                config_json="{}", seed=0, train_eval_runs=2, leaves_total=3, leaves_measured=2, examples=5,
                seconds_json='{"measure": 1.0}',
            )
        ],
    )


@pytest.fixture
def store(tmp_path: Path) -> LineageStore:
    # Superseded versions are pruned at once here, so tests can assert the exact files on disk.
    return LineageStore(
        root=str(tmp_path / "harp"), duckdb_path=str(tmp_path / "catalog" / "harp.duckdb"), keep_superseded_s=0
    )


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- schema validation ------------------------------------------------------------------------------------


def test_valid_frames_round_trip_typed(store: LineageStore) -> None:
    df = util_rows("L1", {"d1": 0.1, "d2": -0.2})
    store.write_partition("leaf_utilities", "L1", df.select(reversed(df.columns)))  # column order is free
    back = store.read_partition("leaf_utilities", "L1")
    assert back is not None and back.schema == SCHEMAS["leaf_utilities"]
    assert back.equals(df)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda df: df.drop("phi"), "missing column(s) ['phi']"),
        (lambda df: df.with_columns(extra=pl.lit(1)), "unexpected column(s) ['extra']"),
        (lambda df: df.with_columns(pl.col("n_eval").cast(pl.Int64)), "column 'n_eval' has dtype Int64"),
        (lambda df: df.with_columns(pl.col("measured_at").dt.replace_time_zone(None)), "column 'measured_at'"),
        (lambda df: df.with_columns(pl.col("utility").cast(pl.Float32)), "column 'utility' has dtype Float32"),
        (lambda df: df.with_columns(domain=pl.lit(None, dtype=pl.String)), "column 'domain' must not be null"),
        (lambda df: df.with_columns(domain=pl.lit("d1")), "duplicate primary key {'leaf_id': 'L1', 'domain': 'd1'}"),
    ],
)
def test_invalid_frames_name_table_and_column(store: LineageStore, mutate, needle: str) -> None:
    bad = mutate(util_rows("L1", {"d1": 0.1, "d2": -0.2}))
    with pytest.raises(LineageError) as err:
        store.write_partition("leaf_utilities", "L1", bad)
    assert "table 'leaf_utilities'" in str(err.value) and needle in str(err.value)
    assert store.read_partition("leaf_utilities", "L1") is None


def test_all_null_columns_take_the_schema_dtype() -> None:
    # A random selection built without a schema: gain and predicted_utility are all None (dtype Null).
    df = pl.DataFrame(
        {
            "selection_id": ["random-1"], "method": ["random"], "rank": pl.Series([0], dtype=pl.Int32),
            "example_id": ["e1"], "leaf_id": ["L1"], "parent_id": ["P1"], "gain": [None],
            "predicted_utility": [None], "budget": pl.Series([1], dtype=pl.Int32), "pool_version": ["p1"],
            "created_at": [T0], "run_id": [None],
        }
    )
    assert df.schema["gain"] == pl.Null
    out = validate("selections", df)
    assert out.schema == SCHEMAS["selections"] and out["gain"].null_count() == 1


def test_unknown_table_and_wrong_storage_kind(store: LineageStore) -> None:
    with pytest.raises(LineageError, match="unknown lineage table 'nope'"):
        store.read_table("nope")
    with pytest.raises(LineageError, match="use write_partition"):
        store.write_table("leaf_utilities", util_rows("L1", {"d1": 0.1}))
    with pytest.raises(LineageError, match="use write_table"):
        store.write_partition("leaves", "L1", store.read_table("leaves"))
    with pytest.raises(LineageError, match="use append_run"):
        store.write_partition("selections", "s1", store.read_table("selections"))


@pytest.mark.parametrize("key", ["a/b", "..", ".hidden", "", "x y", "l\u00e9af", "a\\b", "k" * 201])
def test_bad_keys_are_refused(store: LineageStore, key: str) -> None:
    with pytest.raises(LineageError, match="key"):
        store.write_partition("leaf_utilities", key, util_rows(key or "x", {"d1": 0.1}))
    assert not (store.root_path / "leaf_utilities").exists() or not list((store.root_path).rglob("*.parquet"))


def test_key_must_match_rows(store: LineageStore) -> None:
    with pytest.raises(LineageError, match=r"column 'leaf_id' must equal the key.*\['L2'\]"):
        store.write_partition("leaf_utilities", "L1", util_rows("L2", {"d1": 0.1}))


def test_selection_ids_sort_by_time() -> None:
    a = selection_id_for("harp_c", "0f3a9c12-aaaa", T0)
    b = selection_id_for("harp_c", "0f3a9c12-aaaa", T0 + dt.timedelta(microseconds=1))
    assert a == "harp_c-20250301T120000.000000Z-0f3a9c12" and a < b
    with pytest.raises(LineageError):
        selection_id_for("harp/c", "r")


# -- paths ------------------------------------------------------------------------------------------------


def test_default_paths_follow_dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    s = LineageStore()
    assert s.root_path == tmp_path.resolve() / "harp"
    assert s.catalog_path == tmp_path.resolve() / "harp.duckdb"
    assert LineageStore(root=str(tmp_path / "x" / "lin")).catalog_path == tmp_path.resolve() / "x" / "lin.duckdb"
    monkeypatch.delenv("DAGSTER_HOME")
    with pytest.raises(LineageError, match="set DAGSTER_HOME"):
        LineageStore().read_table("examples")


# -- atomic writes and history ----------------------------------------------------------------------------


def test_write_table_replaces_atomically(store: LineageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = frame("leaves", [dict(leaf_id="L1", parent_id="P1", region_id="R1", size=2, member_hash="h1",
                               is_representative=True, pool_version="p1")])
    v2 = v1.with_columns(size=pl.lit(5, dtype=pl.Int32), pool_version=pl.lit("p2"))
    path = store.write_table("leaves", v1)
    assert path.parent == store.root_path / "leaves" and path.name.startswith("leaves@")
    store.write_table("leaves", v2)
    assert store.read_table("leaves").equals(v2)

    # Invalid frame: refused before any byte is written.
    with pytest.raises(LineageError):
        store.write_table("leaves", v1.drop("size"))
    # Failure in the middle of writing: a partial temp file existed, is removed, the old file stays.
    def broken_write(self: pl.DataFrame, file, *args, **kwargs) -> None:
        file.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.write_table("leaves", v1)
    monkeypatch.undo()
    assert store.read_table("leaves").equals(v2)
    assert temp_files(store.root_path) == []
    files = sorted(p.name for p in (store.root_path / "leaves").iterdir())
    assert len(files) == 1 and files[0].startswith("leaves@") and files[0] != path.name


def test_history_keeps_runs_and_partitions_are_keyed(store: LineageStore) -> None:
    s1 = selection("harp_c-1", "harp_c", [("e1", "L1", "P1", 0.1)], T0)
    s2 = selection("harp_c-2", "harp_c", [("e2", "L1", "P1", 0.2), ("e3", "L2", "P1", 0.05)], T1)
    store.append_run("selections", "harp_c-1", s1)
    store.append_run("selections", "harp_c-2", s2)
    assert store.partition_keys("selections") == ["harp_c-1", "harp_c-2"]
    assert store.read_table("selections").equals(pl.concat([s1, s2]))
    with pytest.raises(LineageError, match="already holds run 'harp_c-1'"):
        store.append_run("selections", "harp_c-1", s1.with_columns(gain=pl.lit(9.0)))
    assert store.read_partition("selections", "harp_c-1").equals(s1)
    store.append_run("selections", "harp_c-1", s1.with_columns(gain=pl.lit(9.0)), exist_ok=True)
    assert store.read_partition("selections", "harp_c-1")["gain"].to_list() == [9.0]

    assert store.read_partition("leaf_utilities", "L9") is None
    store.write_partition("leaf_utilities", "L9", util_rows("L9", {"d1": 0.3}))
    assert store.partition_keys("leaf_utilities") == ["L9"]
    assert store.delete_partition("leaf_utilities", "L9") is True
    assert store.delete_partition("leaf_utilities", "L9") is False
    assert store.partition_keys("leaf_utilities") == []
    assert store.read_table("leaf_utilities").schema == SCHEMAS["leaf_utilities"]
    assert temp_files(store.root_path) == []


def test_superseded_versions_are_invisible_then_pruned(tmp_path: Path) -> None:
    store = LineageStore(root=str(tmp_path / "harp"), keep_superseded_s=0.5)
    store.write_partition("leaf_utilities", "L1", util_rows("L1", {"d1": 0.1}, version="old"))
    store.refresh_catalog()
    store.write_partition("leaf_utilities", "L1", util_rows("L1", {"d1": 0.2, "d2": 0.3}, version="new"))
    folder = store.root_path / "leaf_utilities"
    assert len(list(folder.iterdir())) == 2  # the old version waits for readers already under way
    assert store.read_table("leaf_utilities")["data_version"].to_list() == ["new", "new"]
    q = store.query("SELECT data_version, count(*) AS n FROM leaf_utilities GROUP BY 1")
    assert q.rows() == [("new", 2)]
    store.vacuum()
    assert len(list(folder.iterdir())) == 2  # still within keep_superseded_s
    os.utime(store.files("leaf_utilities")["L1"], (1e9, 1e9))  # the new version is now old enough
    store.vacuum()
    assert [p.name.split("@")[0] for p in folder.iterdir()] == ["L1"]
    assert store.read_partition("leaf_utilities", "L1")["data_version"].to_list() == ["new", "new"]


def test_older_files_without_a_new_column_read_as_nulls(store: LineageStore) -> None:
    # A file written before `eval_seconds` existed (simulated by writing it directly).
    folder = store.root_path / "leaf_utilities"
    folder.mkdir(parents=True)
    util_rows("L1", {"d1": 0.1}).drop("eval_seconds").write_parquet(folder / "L1@0000000000000000000-old.parquet")
    store.write_partition("leaf_utilities", "L2", util_rows("L2", {"d1": 0.2}))
    got = store.read_table("leaf_utilities")
    assert got.schema == SCHEMAS["leaf_utilities"] and got["eval_seconds"].to_list() == [None, 0.5]
    q = store.query("SELECT leaf_id, eval_seconds FROM leaf_utilities ORDER BY leaf_id")
    assert q.rows() == [("L1", None), ("L2", 0.5)]


# -- concurrency ------------------------------------------------------------------------------------------


def _write_leaf(args: tuple[str, str, int]) -> str:
    root, leaf, n_domains = args
    LineageStore(root=root).write_partition(
        "leaf_utilities", leaf, util_rows(leaf, {f"d{i}": i / 100 for i in range(n_domains)})
    )
    return leaf


def _version(writer: int, i: int) -> pl.DataFrame:
    # Versions differ in size and content; each row names its version, so a torn file would show.
    n = 200 + 37 * ((writer * 31 + i) % 11)
    return util_rows("L0", {f"d{k}": writer + i / 1000 for k in range(n)}, version=f"w{writer}-{i}")


def _write_versions(root: str, writer: int, n: int) -> int:
    s = LineageStore(root=root)
    for i in range(n):
        s.write_partition("leaf_utilities", "L0", _version(writer, i))
    return n


@pytest.fixture(scope="module")
def pool() -> Iterator[multiprocessing.pool.Pool]:
    # spawn, not fork: polars' thread pool must not be forked.
    with mp.get_context("spawn").Pool(2) as p:
        yield p


def test_parallel_processes_write_different_leaves(store: LineageStore, pool) -> None:
    jobs = [(str(store.root_path), f"L{i}", 3 + i) for i in range(8)]
    assert sorted(pool.map(_write_leaf, jobs)) == sorted(j[1] for j in jobs)
    assert store.partition_keys("leaf_utilities") == [f"L{i}" for i in range(8)]
    for _, leaf, n in jobs:
        assert store.read_partition("leaf_utilities", leaf).equals(_write_leaf_frame(leaf, n))
    assert store.read_table("leaf_utilities").height == sum(j[2] for j in jobs)
    assert temp_files(store.root_path) == []


def _write_leaf_frame(leaf: str, n: int) -> pl.DataFrame:
    return util_rows(leaf, {f"d{i}": i / 100 for i in range(n)})


def test_two_processes_writing_one_leaf_never_tear_it(tmp_path: Path, pool) -> None:
    store = LineageStore(root=str(tmp_path / "harp"))  # default grace for superseded versions
    n = 60
    store.refresh_catalog()
    seen = False
    runs = [pool.apply_async(_write_versions, (str(store.root_path), w, n)) for w in (1, 2)]
    reads = 0
    while not all(r.ready() for r in runs):
        if reads % 4 == 3:  # through the catalog too
            got = store.query("SELECT * FROM leaf_utilities")
        else:
            got = store.read_partition("leaf_utilities", "L0")  # a torn file fails to parse or mixes versions
        if got is None or got.height == 0:
            assert not seen, "the partition disappeared while being rewritten"
            continue
        seen = True
        versions = got["data_version"].unique().to_list()
        assert len(versions) == 1
        w, i = (int(x) for x in versions[0][1:].split("-"))
        assert got.equals(_version(w, i))
        reads += 1
    assert [r.get() for r in runs] == [n, n]
    final = store.read_partition("leaf_utilities", "L0")
    w, i = (int(x) for x in final["data_version"][0][1:].split("-"))
    assert i == n - 1 and final.equals(_version(w, i))
    print(f"{reads} consistent reads")
    assert reads > 0
    assert temp_files(store.root_path) == []
    assert len(list((store.root_path / "leaf_utilities").iterdir())) == 2 * n  # superseded, kept for readers
    store.model_copy(update={"keep_superseded_s": 0}).vacuum()
    assert [p.name.split("@")[0] for p in (store.root_path / "leaf_utilities").iterdir()] == ["L0"]
    assert store.read_partition("leaf_utilities", "L0").equals(final)


# -- catalog ----------------------------------------------------------------------------------------------


def _duck_types(store: LineageStore, view: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in store.query(f"DESCRIBE {view}").rows()]


def test_catalog_of_an_empty_store_has_typed_empty_views(store: LineageStore) -> None:
    counts = store.refresh_catalog()
    assert counts == dict.fromkeys(SCHEMAS, 0)
    for name, schema in SCHEMAS.items():
        df = store.query(f"SELECT * FROM {name}")
        assert df.height == 0 and df.schema == schema, name
    assert _duck_types(store, "selections")[:3] == [("selection_id", "VARCHAR"), ("method", "VARCHAR"),
                                                    ("rank", "INTEGER")]
    assert ("created_at", "TIMESTAMP WITH TIME ZONE") in _duck_types(store, "selections")
    assert store.query("SELECT * FROM latest_selections").height == 0


def test_catalog_refresh_is_an_atomic_swap(store: LineageStore) -> None:
    store.refresh_catalog()
    cat = store.catalog_path
    old_inode = cat.stat().st_ino
    reader = duckdb.connect(str(cat), read_only=True)  # a reader holding the old catalog open
    try:
        for leaf in ("L1", "L2", "L3"):
            store.write_partition("leaf_utilities", leaf, util_rows(leaf, {"d1": 0.1, "d2": 0.2}))
        store.append_run("run_manifests", "r1", manifest("r1"))
        counts = store.refresh_catalog()
        assert counts["leaf_utilities"] == 3 and counts["run_manifests"] == 1 and counts["examples"] == 0
        assert cat.stat().st_ino != old_inode  # replaced, not rewritten in place
        # The old reader still sees a complete (old) catalog: the empty typed view.
        assert reader.execute("SELECT count(*) FROM leaf_utilities").fetchone() == (0,)
    finally:
        reader.close()
    assert store.query("SELECT count(*) AS n FROM leaf_utilities")["n"].to_list() == [6]
    assert store.query("SELECT run_id FROM run_manifests")["run_id"].to_list() == ["r1"]
    assert sorted(p.name for p in cat.parent.iterdir()) == ["harp.duckdb", "harp.duckdb.lock"]


def test_new_partitions_are_visible_without_refresh(store: LineageStore) -> None:
    store.write_partition("leaf_utilities", "L1", util_rows("L1", {"d1": 0.1}))
    store.refresh_catalog()
    stamp = (store.catalog_path.stat().st_ino, store.catalog_path.stat().st_mtime_ns)
    store.write_partition("leaf_utilities", "L2", util_rows("L2", {"d1": 0.2, "d2": 0.3}))
    q = store.query("SELECT leaf_id, count(*) AS n FROM leaf_utilities GROUP BY leaf_id ORDER BY leaf_id")
    assert q.rows() == [("L1", 1), ("L2", 2)]
    assert (store.catalog_path.stat().st_ino, store.catalog_path.stat().st_mtime_ns) == stamp  # no rebuild


def test_query_rebuilds_a_missing_or_outdated_catalog(store: LineageStore) -> None:
    assert not store.catalog_path.exists()
    assert store.query("SELECT count(*) AS n FROM selections")["n"].to_list() == [0]  # built on demand
    store.append_run("selections", "s1", selection("s1", "tsds", [("e1", "L1", "P1", 0.1)], T0))
    # The table's first file: the empty typed view is replaced on the next query.
    assert store.query("SELECT example_id FROM selections")["example_id"].to_list() == ["e1"]
    store.delete_partition("selections", "s1")  # its last file: the glob view would find nothing
    assert store.query("SELECT count(*) AS n FROM selections")["n"].to_list() == [0]


def test_refresh_waits_for_the_lock_holder(store: LineageStore, tmp_path: Path) -> None:
    quick = store.model_copy(update={"lock_timeout_s": 0.3})
    lock = store.catalog_path.with_name("harp.duckdb.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="another process is refreshing"):
            quick.refresh_catalog()
        assert not store.catalog_path.exists()
    finally:
        os.close(fd)
    quick.refresh_catalog()
    assert store.catalog_path.exists()


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE x (a INTEGER)",
        "INSERT INTO harp_catalog VALUES ('x', 0, 'r', 'h', now())",
        "DROP VIEW examples",
        "COPY (SELECT 1) TO 'out.parquet'",
        "ATTACH 'other.duckdb'",
        "SELECT 1; DROP VIEW examples",
    ],
)
def test_query_is_read_only(store: LineageStore, sql: str) -> None:
    store.refresh_catalog()
    with pytest.raises(LineageError, match="one read-only SELECT"):
        store.query(sql)
    assert store.query("SELECT count(*) AS n FROM examples")["n"].to_list() == [0]


def test_catalog_connection_itself_is_read_only(store: LineageStore) -> None:
    store.refresh_catalog()
    with pytest.raises(duckdb.Error, match="read-only"):
        store._run_query("CREATE TABLE x (a INTEGER)", None)


# -- the example lineage queries --------------------------------------------------------------------------

SID1 = selection_id_for("harp_c", "run1", T1)
SID2 = selection_id_for("harp_c", "run2", T2)
RID = selection_id_for("random", "run3", T2)


@pytest.fixture
def populated(store: LineageStore) -> LineageStore:
    ex = [("e1", "L1", "P1", 0), ("e2", "L1", "P1", 1), ("e3", "L2", "P1", 0), ("e4", "L3", "P2", 0),
          ("e5", "L3", "P2", 1)]
    store.write_table("examples", frame("examples", [
        dict(example_id=e, prompt=f"q {e}", response=f"a {e}", source="pool.jsonl", pool_version="p1",
             leaf_id=leaf, parent_id=parent, region_id="R1", rank_in_leaf=r, added_at=T0)
        for e, leaf, parent, r in ex
    ]))
    store.write_table("leaves", frame("leaves", [
        dict(leaf_id="L1", parent_id="P1", region_id="R1", size=2, member_hash="h1", is_representative=True,
             pool_version="p1"),
        dict(leaf_id="L2", parent_id="P1", region_id="R1", size=1, member_hash="h2", is_representative=False,
             pool_version="p1"),
        dict(leaf_id="L3", parent_id="P2", region_id="R1", size=2, member_hash="h3", is_representative=True,
             pool_version="p1"),
    ]))
    store.write_partition("leaf_utilities", "L1", util_rows("L1", {"d1": 0.1, "d2": -0.05}))
    # L3 was measured after the posteriors were fitted: they still call it inferred.
    store.write_partition("leaf_utilities", "L3", util_rows("L3", {"d1": 0.2, "d2": 0.0}))
    post = [("L1", "d1", 0.08, 0.02, True), ("L1", "d2", -0.04, 0.02, True), ("L2", "d1", 0.05, 0.1, False),
            ("L2", "d2", 0.0, 0.1, False), ("L3", "d1", 0.1, 0.1, False), ("L3", "d2", 0.01, 0.1, False)]
    store.write_table("phi_posteriors", frame("phi_posteriors", [
        dict(leaf_id=g, domain=d, mean=m, sd=s, measured=meas, active_domain=d == "d1", pool_version="p1")
        for g, d, m, s, meas in post
    ]))
    store.append_run("selections", SID1, selection(SID1, "harp_c", [
        ("e1", "L1", "P1", 0.08), ("e3", "L2", "P1", 0.03), ("e2", "L1", "P1", 0.01)], T1))
    store.append_run("selections", SID2, selection(SID2, "harp_c", [
        ("e1", "L1", "P1", 0.08), ("e4", "L3", "P2", 0.05), ("e3", "L2", "P1", 0.02)], T2))
    store.append_run("selections", RID, selection(RID, "random", [
        ("e5", "L3", "P2", None), ("e1", "L1", "P1", None)], T2))
    for sid in (SID1, SID2, RID):  # each selection run finished: its manifest exists
        store.append_run("run_manifests", "run-" + sid, manifest("run-" + sid))
    store.refresh_catalog()
    return store


def test_why_was_this_example_selected(populated: LineageStore) -> None:
    cols = ["selection_id", "method", "rank", "gain", "leaf_id", "parent_id", "is_representative", "domain",
            "phi_mean", "phi_source", "phi_measured", "active_domain"]
    got = populated.query(EXAMPLE_QUERIES["why_selected"], {"example_id": "e1"}).select(cols).rows()
    # Newest first; the random and harp_c selections share a timestamp, so by selection_id descending.
    expected = []
    for sid, method, rank, gain in [(RID, "random", 1, None), (SID2, "harp_c", 0, 0.08), (SID1, "harp_c", 0, 0.08)]:
        expected += [
            (sid, method, rank, gain, "L1", "P1", True, "d1", 0.08, "measured", 0.1, True),
            (sid, method, rank, gain, "L1", "P1", True, "d2", -0.04, "measured", -0.05, False),
        ]
    assert got == expected
    got = populated.query(EXAMPLE_QUERIES["why_selected"], {"example_id": "e3"}).select(cols).rows()
    assert got == [
        (SID2, "harp_c", 2, 0.02, "L2", "P1", False, "d1", 0.05, "inferred", None, True),
        (SID2, "harp_c", 2, 0.02, "L2", "P1", False, "d2", 0.0, "inferred", None, False),
        (SID1, "harp_c", 1, 0.03, "L2", "P1", False, "d1", 0.05, "inferred", None, True),
        (SID1, "harp_c", 1, 0.03, "L2", "P1", False, "d2", 0.0, "inferred", None, False),
    ]
    assert populated.query(EXAMPLE_QUERIES["why_selected"], {"example_id": "nope"}).height == 0


def test_which_leaves_were_measured(populated: LineageStore) -> None:
    got = populated.query(EXAMPLE_QUERIES["measured_vs_inferred"]).select(
        "leaf_id", "parent_id", "is_representative", "domains_measured", "posterior_measured", "status"
    )
    assert got.rows() == [
        ("L1", "P1", True, 2, True, "measured"),
        ("L2", "P1", False, 0, False, "inferred"),
        ("L3", "P2", True, 2, False, "measured, not yet in posteriors"),
    ]


def test_what_changed_between_the_last_two_selections(populated: LineageStore) -> None:
    # SID1 took e1, e3, e2 (ranks 0-2); SID2 took e1, e4, e3.
    got = populated.query(EXAMPLE_QUERIES["selection_diff"], {"method": "harp_c"})
    assert got.rows() == [("added", "e4", "L3", "R1", 1, None, SID2, SID1),
                          ("kept", "e1", "L1", "R1", 0, 0, SID2, SID1), ("kept", "e3", "L2", "R1", 2, 1, SID2, SID1),
                          ("removed", "e2", "L1", "R1", None, 2, SID2, SID1)]
    got = populated.query(EXAMPLE_QUERIES["selection_diff"], {"method": "random"})
    assert got.rows() == [("added", "e1", "L1", "R1", 1, None, RID, None),
                          ("added", "e5", "L3", "R1", 0, None, RID, None)]
    got = populated.query(EXAMPLE_QUERIES["selection_diff_between"], {"older": SID2, "newer": RID})
    assert got.rows() == [("added", "e5", "L3", 0, None), ("kept", "e1", "L1", 1, 0),
                          ("removed", "e3", "L2", None, 2), ("removed", "e4", "L3", None, 1)]


def test_latest_selections_view(populated: LineageStore) -> None:
    got = populated.query("SELECT method, selection_id, example_id FROM latest_selections ORDER BY method, rank")
    assert got.rows() == [("harp_c", SID2, "e1"), ("harp_c", SID2, "e4"), ("harp_c", SID2, "e3"),
                          ("random", RID, "e5"), ("random", RID, "e1")]
    runs = populated.query("SELECT selection_id, n_examples FROM selection_runs ORDER BY selection_id")
    assert runs.rows() == sorted([(SID1, 3), (SID2, 3), (RID, 2)])


def test_latest_selections_skip_a_run_killed_before_its_manifest(populated: LineageStore) -> None:
    """A newer harp_c selection whose run never wrote its manifest (killed half-way) stays out of view."""
    sid3 = "harp_c-killed"
    populated.append_run("selections", sid3, selection(sid3, "harp_c", [("e5", "L3", "P2", 0.09)], T2
                                                        + dt.timedelta(hours=1)))
    got = populated.query("SELECT DISTINCT method, selection_id FROM latest_selections ORDER BY method")
    assert got.rows() == [("harp_c", SID2), ("random", RID)]
    committed = populated.query("SELECT selection_id, committed FROM selection_runs WHERE method = 'harp_c' "
                                "ORDER BY selection_id")
    assert dict(committed.rows()) == {SID1: True, SID2: True, sid3: False}
    populated.append_run("run_manifests", "run-" + sid3, manifest("run-" + sid3))  # the rerun finishes
    got = populated.query("SELECT DISTINCT method, selection_id FROM latest_selections ORDER BY method")
    assert got.rows() == [("harp_c", sid3), ("random", RID)]


# -- inside Dagster ---------------------------------------------------------------------------------------


def test_resource_inside_a_dagster_materialisation(store: LineageStore) -> None:
    leaves = dg.StaticPartitionsDefinition(["L1", "L2"])

    @dg.asset(partitions_def=leaves)
    def leaf_utility(context: dg.AssetExecutionContext, lineage: LineageResource) -> dg.MaterializeResult:
        key = context.partition_key
        path = lineage.write_partition("leaf_utilities", key, util_rows(key, {"d1": 0.4}, run_id=context.run.run_id))
        lineage.append_run("run_manifests", context.run.run_id, manifest(context.run.run_id))
        lineage.refresh_catalog()
        return dg.MaterializeResult(metadata={"path": str(path)})

    resource = LineageResource(**store.model_dump())  # the Dagster resource over the same folder
    result = dg.materialize([leaf_utility], partition_key="L2", resources={"lineage": resource})
    assert result.success
    assert store.query("SELECT leaf_id, run_id FROM leaf_utilities").rows() == [("L2", result.run_id)]
    assert store.query("SELECT run_id FROM run_manifests").rows() == [(result.run_id,)]


def test_leaf_drift_view_counts_members_by_hand(store: LineageStore) -> None:
    """Leaf A was measured on {a1, a2, a3}; now a3 is gone, a2 was edited and a4 joined: added {a2', a4},
    removed {a2, a3}, drift 4/3. Leaf B is unchanged (drift 0); leaf C was never measured (no row); leaf D
    was measured but is no longer a current leaf (no row)."""
    def ex(eid: str, leaf: str, content: str) -> dict:
        return dict(example_id=eid, prompt="p", response="r", source="s.jsonl", pool_version="p2", leaf_id=leaf,
                    parent_id="P0", region_id="R000", rank_in_leaf=0, added_at=T0, content_hash=content)

    store.write_table("examples", frame("examples", [
        ex("a1", "A", "h1"), ex("a2", "A", "h2-edited"), ex("a4", "A", "h4"), ex("b1", "B", "hb"), ex("c1", "C", "hc")]))
    store.write_table("leaves", frame("leaves", [
        dict(leaf_id=leaf, parent_id="P0", region_id="R000", size=size, member_hash=f"now-{leaf}",
             is_representative=leaf != "C", pool_version="p2") for leaf, size in (("A", 3), ("B", 1), ("C", 1))]))
    measured = {"A": [("a1", "h1"), ("a2", "h2"), ("a3", "h3")], "B": [("b1", "hb")], "D": [("d1", "hd")]}
    for leaf, members in measured.items():
        store.write_partition("measured_members", leaf, frame("measured_members", [
            dict(leaf_id=leaf, example_id=e, content_hash=h, data_version=f"dv-{leaf}") for e, h in members]))
        store.write_partition("leaf_utilities", leaf, util_rows(leaf, {"d1": 0.1}, version=f"dv-{leaf}")
                              .with_columns(pl.lit(f"then-{leaf}").alias("member_hash")))
    got = store.query("SELECT * FROM leaf_drift ORDER BY leaf_id")
    assert got["leaf_id"].to_list() == ["A", "B"]
    a, b = got.row(0, named=True), got.row(1, named=True)
    assert (a["measured_size"], a["current_size"], a["members_added"], a["members_removed"]) == (3, 3, 2, 2)
    assert a["drift"] == pytest.approx(4 / 3)
    assert (a["measured_member_hash"], a["current_member_hash"], a["data_version"]) == ("then-A", "now-A", "dv-A")
    assert (b["members_added"], b["members_removed"], b["drift"]) == (0, 0, 0.0)


def test_query_cannot_read_files_outside_the_lineage_folder(populated: LineageStore, tmp_path: Path) -> None:
    secret = tmp_path.parent / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    for sql in (f"SELECT * FROM read_csv('{secret}')", "SELECT * FROM read_text('/etc/hostname')",
                "SELECT * FROM glob('/etc/*')"):
        with pytest.raises(duckdb.Error, match="(?i)permission|external access|disabled"):
            populated.query(sql)
    assert populated.query("SELECT count(*) AS n FROM examples")["n"][0] == 5  # the views still read their files


def test_selection_explanations_by_hand(populated: LineageStore) -> None:
    """harp_c's newest selection took e1 (L1), e4 (L3), e3 (L2): leaves in greedy order L1, L3, L2."""
    got = populated.query("SELECT * FROM selection_explanations WHERE method = 'harp_c' AND domain = 'd1' "
                          "ORDER BY rank")
    assert got.select("example_id", "leaf_id", "region_id", "leaf_greedy_rank", "marginal_gain").rows() == [
        ("e1", "L1", "R1", 1, 0.08), ("e4", "L3", "R1", 2, 0.05), ("e3", "L2", "R1", 3, 0.02)]
    assert got.select("phi_mean", "phi_sd", "phi_source", "is_representative").rows() == [
        (0.08, 0.02, "measured", True), (0.1, 0.1, "inferred", True), (0.05, 0.1, "inferred", False)]
    assert populated.query("SELECT count(*) AS n FROM selection_explanations WHERE method = 'harp_c'")["n"][0] == 6
    rand = populated.query("SELECT DISTINCT example_id, leaf_greedy_rank, marginal_gain FROM selection_explanations "
                           "WHERE method = 'random' ORDER BY leaf_greedy_rank")
    assert rand.rows() == [("e5", 1, None), ("e1", 2, None)]
