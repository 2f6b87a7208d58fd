"""What the 1M scale benchmark fixed: reading many leaf partitions lists their folder once (not once per
leaf), a write lists its folder without a Path per file, and growth's bookkeeping reads the same as before."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from harp import store
from harp.lineage import LineageStore
from harp.method.growth import grow_leaf_table, leaf_table_from_hierarchy
from harp.method.hierarchy import build_parent_leaf_hierarchy

NOW = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def lineage(tmp_path: Path) -> LineageStore:
    return LineageStore(root=str(tmp_path / "harp"), keep_superseded_s=0)


def _utilities(leaf: str, version: str) -> pl.DataFrame:
    return pl.DataFrame({
        "leaf_id": [leaf, leaf], "domain": ["a", "b"], "utility": [0.5, 0.6], "base": [0.4, 0.4],
        "phi": [0.1, 0.2], "bootstrap_sd": [0.01, 0.02], "n_eval": [4, 4], "data_version": [version, version],
        "measured_at": [NOW, NOW], "train_seconds": [1.0, 1.0], "eval_seconds": [1.0, 1.0], "examples": [3, 3],
        "run_id": ["r", "r"], "member_hash": ["h", "h"],
    }, schema_overrides={"n_eval": pl.Int32, "examples": pl.Int32, "measured_at": pl.Datetime("us", "UTC")})


def _measure(lineage: LineageStore, leaf: str, version: str) -> None:
    correct = pl.DataFrame({"example_id": ["q0", "q1"], "domain": ["a", "b"], "correct": [1.0, 0.0]},
                           schema_overrides={"correct": pl.Float32})
    members = pl.DataFrame({"leaf_id": [leaf], "example_id": [f"e-{leaf}"], "content_hash": ["c"],
                            "data_version": [version]})
    store.write_leaf_measurement(lineage, leaf, correct, members, _utilities(leaf, version))


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each lineage folder is listed."""
    counts: dict[str, int] = {}
    real = os.listdir

    def counting(path: str | os.PathLike = ".") -> list[str]:
        counts[Path(path).name] = counts.get(Path(path).name, 0) + 1
        return real(path)

    monkeypatch.setattr("harp.lineage.os.listdir", counting)
    return counts


def test_read_partitions_lists_the_folder_once(lineage: LineageStore, listings: dict[str, int]) -> None:
    for leaf in ("L0", "L1", "L2", "L3"):
        lineage.write_partition("leaf_utilities", leaf, _utilities(leaf, "v1"))
    lineage.write_partition("leaf_utilities", "L1", _utilities("L1", "v2"))  # a newer version of L1
    listings.clear()
    got = lineage.read_partitions("leaf_utilities", ["L1", "L3", "L9"])
    assert listings == {"leaf_utilities": 1}
    assert sorted(got) == ["L1", "L3"]  # L9 was never written
    assert got["L1"].equals(lineage.read_partition("leaf_utilities", "L1"))
    assert got["L1"]["data_version"].unique().to_list() == ["v2"]
    assert sorted(lineage.read_partitions("leaf_utilities")) == ["L0", "L1", "L2", "L3"]


def test_read_measurements_lists_once_and_matches_stored_version(lineage: LineageStore,
                                                                 listings: dict[str, int]) -> None:
    _measure(lineage, "A", "v-A")
    _measure(lineage, "B", "old")  # stale: the expected version below differs
    _measure(lineage, "C", "v-C")
    store.correctness_path(lineage, "C").unlink()  # no correctness file: counts as never measured
    versions = {"A": "v-A", "B": "v-B", "C": "v-C", "D": "v-D"}  # D: never measured
    listings.clear()
    fresh, stale = store.read_measurements(lineage, versions)
    assert listings.get("leaf_utilities") == 1
    assert sorted(fresh) == ["A"] and stale == ["B"]
    assert store.stored_versions(lineage, list(versions)) == {
        leaf: store.stored_version(lineage, leaf) for leaf in versions} == {"A": "v-A", "B": "old", "C": None,
                                                                             "D": None}


def test_a_write_still_prunes_every_superseded_key(lineage: LineageStore) -> None:
    lineage.write_partition("leaf_utilities", "L0", _utilities("L0", "v1"))
    lineage.model_copy(update={"keep_superseded_s": 3600}).write_partition(
        "leaf_utilities", "L0", _utilities("L0", "v2"))  # kept: its newer version is brand new
    folder = lineage.table_dir("leaf_utilities")
    assert len(list(folder.iterdir())) == 2
    lineage.write_partition("leaf_utilities", "L1", _utilities("L1", "v1"))  # another key's write prunes L0
    assert sorted(p.name.split("@")[0] for p in folder.iterdir()) == ["L0", "L1"]
    assert lineage.read_partition("leaf_utilities", "L0")["data_version"].unique().to_list() == ["v2"]
    assert lineage.delete_partition("leaf_utilities", "L0") and lineage.partition_keys("leaf_utilities") == ["L1"]


def test_growth_with_many_delta_leaves_reports_them_all() -> None:
    """Every parent's representatives are frozen, so arrivals open a delta leaf per parent; the result lists
    exactly those (and the splits), as it did when it rebuilt a set of ids per delta leaf."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((30, 8))
    X = (centers[rng.integers(0, 30, 3000)] + 0.3 * rng.standard_normal((3000, 8))).astype(np.float32)
    ids = np.asarray([f"e{i:05d}" for i in range(3000)])
    table = leaf_table_from_hierarchy(build_parent_leaf_hierarchy(X, leaf_size=30, leaves_per_parent=3,
                                                                 parents_per_region=4, use_gpu=False), ids)
    frozen = table.leaf_ids.tolist()  # every leaf measured: all arrivals go to delta leaves
    X_new = X[rng.integers(0, 3000, 600)] + 0.05 * rng.standard_normal((600, 8)).astype(np.float32)
    res = grow_leaf_table(table, np.vstack([X, X_new]), np.r_[ids, [f"n{i:04d}" for i in range(600)]],
                          max_leaf_size=40, frozen=frozen, use_gpu=False)
    assert res.deferred == 600 and len(res.delta) > 20
    opened = {leaf.split("s")[0] for leaf in res.table.leaf_ids.tolist() if "d" in leaf}
    assert set(res.delta) == opened
    assert set(res.split) <= set(res.delta) and not set(res.split) & set(table.leaf_ids.tolist())
    assert all(child in res.table.leaf_ids.tolist() for kids in res.split.values() for child in kids)
