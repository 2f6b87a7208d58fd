"""The HARP asset graph end to end on the tiny demo, through Dagster's APIs, in a temporary DAGSTER_HOME."""

import os
import time
from pathlib import Path

import dagster as dg
import pytest
from helpers import BUDGET, GROWTH, POOL, copy_of, leaf_events, metadata, trained_leaves

from harp.driver import partition_ranges
from harp.store import harp_leaves
from harp_assets.definitions import defs
from harp_assets.runner import run_harp

pytestmark = pytest.mark.slow


@pytest.fixture
def pipeline(tiny_pipeline, tmp_path):
    """This test's own copy of the session's materialised tiny pipeline."""
    with copy_of(tiny_pipeline, tmp_path / "copy") as env:
        yield env


def test_default_definitions_load_without_building_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    dg.Definitions.validate_loadable(defs)
    assert not any(tmp_path.iterdir())  # loading wrote nothing
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"pool_examples", "proxy_eval_set", "example_embeddings", "leaf_hierarchy", "base_model_scores",
            "leaf_utilities", "phi_posteriors", "harp_c_selection", "harp_e_selection", "tsds_selection",
            "random_selection", "lineage_catalog"} <= keys
    assert Path("workspace.yaml").read_text().count("harp_assets.definitions") == 1


def test_partition_ranges_group_contiguous_keys():
    assert partition_ranges(["a", "b", "c", "d", "e"], {"a", "b", "d"}) == [("a", "b"), ("d", "d")]
    assert partition_ranges(["a", "b"], set()) == []


def test_whole_graph_materialises_and_is_queryable(pipeline):
    res = pipeline.first.results
    assert res["prepare"].success and res["select"].success and all(r.success for r in res["leaf_runs"])
    lineage, inst = pipeline.lineage, pipeline.instance
    hier = metadata(res["prepare"], "leaf_hierarchy")
    reps = hier["representatives"]
    assert hier["leaves"] > reps >= 2
    # leaf partitions: HARP's leaves only (the representatives here: no active round); one run covers them all
    keys = inst.get_dynamic_partitions("leaves")
    assert len(keys) == reps == hier["registered_partitions"]
    assert len(res["leaf_runs"]) == 1
    events = leaf_events(res["leaf_runs"])
    assert len(trained_leaves(res["leaf_runs"])) == reps == len(events)
    assert [e["partition"] for e in events] == keys[:reps]  # representatives come first in the registry
    # each partition carries its own data version, in Dagster's tag and in our lineage table
    versions = {e["partition"]: e["data_version"] for e in events}
    assert len(set(versions.values())) == reps
    for leaf, dv in versions.items():
        record = inst.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("leaf_utilities"), asset_partitions=[leaf]), limit=1
        ).records[0]
        assert record.asset_materialization.tags["dagster/data_version"] == dv
        assert set(lineage.read_partition("leaf_utilities", leaf)["data_version"].to_list()) == {dv}
    # Dagster's cost per partition: the leaf run's wall time beyond the train-evaluate cycles
    run_s = res["seconds"]["leaf_runs"]
    train_s = sum(e["train_eval_seconds"] for e in events)
    print(f"\nleaf run: {reps} partitions, {run_s:.2f} s wall, {train_s:.2f} s train+eval, "
          f"{(run_s - train_s) / reps:.3f} s overhead per partition "
          f"({events[-1]['step_overhead_seconds_per_partition']:.3f} s of it inside the step)")

    counts = lineage.query(
        "SELECT (SELECT count(*) FROM examples) AS ex, (SELECT count(*) FROM leaves) AS lv, "
        "(SELECT count(DISTINCT leaf_id) FROM leaf_utilities) AS lu, "
        "(SELECT count(*) FROM phi_posteriors WHERE measured) AS pm, "
        "(SELECT count(*) FROM run_manifests) AS rm"
    ).row(0, named=True)
    n_dom = lineage.query("SELECT count(DISTINCT domain) AS d FROM phi_posteriors")["d"][0]
    assert counts == {"ex": POOL, "lv": hier["leaves"], "lu": reps, "pm": reps * n_dom, "rm": 1}
    # every example in exactly one leaf
    assert lineage.query("SELECT count(DISTINCT example_id) AS n FROM examples")["n"][0] == POOL
    sel = lineage.query(
        "SELECT method, count(*) AS n, count(DISTINCT example_id) AS d, "
        "sum(CASE WHEN e.example_id IS NULL THEN 1 ELSE 0 END) AS outside "
        "FROM latest_selections s LEFT JOIN examples e USING (example_id) GROUP BY method ORDER BY method"
    )
    selected = {m: metadata(res["select"], f"{m}_selection")["selected"] for m in ("harp_c", "harp_e", "random", "tsds")}
    assert sel["method"].to_list() == sorted(m for m, n in selected.items() if n > 0)
    assert dict(zip(sel["method"], sel["n"], strict=True)) == {m: n for m, n in selected.items() if n > 0}
    assert all(0 < n <= BUDGET for n in sel["n"].to_list())
    assert sel["n"].to_list() == sel["d"].to_list() and sum(sel["outside"].to_list()) == 0
    assert selected["random"] == BUDGET
    seconds = lineage.query("SELECT seconds_json FROM run_manifests")["seconds_json"][0]
    assert '"leaf_hierarchy"' in seconds and '"tsds_selection"' in seconds
    why = lineage.query("SELECT * FROM selections WHERE method = 'random' LIMIT 1")
    assert why["leaf_id"][0] in set(lineage.read_table("leaves")["leaf_id"].to_list())


def test_harp_selects_helpful_leaves_and_no_harmful_example(pipeline):
    """The tiny demo plants its effects: clean facts help, wrong facts hurt (ground truth kept apart)."""
    import polars as pl

    truth = pl.read_parquet(pipeline.root / "demo" / "ground_truth.parquet").select("example_id", "kind")
    kinds = pipeline.lineage.query("SELECT method, example_id FROM latest_selections").join(truth, on="example_id")
    for method in ("harp_c", "harp_e"):
        mine = kinds.filter(pl.col("method") == method)
        assert mine.height > 0, f"{method} selected nothing"
        assert mine.filter(pl.col("kind") == "harmful").height == 0, f"{method} selected harmful examples"


def test_second_run_with_nothing_changed_trains_no_leaf(pipeline):
    t0 = time.perf_counter()
    again = run_harp(pipeline.instance, pipeline.defs)
    assert all(r.success for r in again["leaf_runs"])
    events = leaf_events(again["leaf_runs"])
    assert events and trained_leaves(again["leaf_runs"]) == []
    # an up-to-date partition keeps the data version it was measured with
    first = {e["partition"]: e["data_version"] for e in leaf_events(pipeline.first.results["leaf_runs"])}
    assert {e["partition"]: e["data_version"] for e in events} == first
    lineage = pipeline.lineage
    print(f"\nfirst run {pipeline.first.wall:.1f} s, cached rerun {time.perf_counter() - t0:.1f} s")
    n_sel = lineage.query("SELECT count(DISTINCT selection_id) AS n FROM selections")["n"][0]
    n_methods = lineage.query("SELECT count(DISTINCT method) AS n FROM selections")["n"][0]
    assert n_methods >= 2 and n_sel == 2 * n_methods  # two runs x each non-empty method, history kept
    assert os.path.isfile(lineage.catalog_path)
    # each selection says what changed against the previous one: nothing, as nothing changed
    for method in ("harp_c", "harp_e", "tsds", "random"):
        first, second = metadata(pipeline.first.results["select"], f"{method}_selection"), metadata(
            again["select"], f"{method}_selection")
        assert first["previous_selection_id"] == "" and first["examples_added"] == first["selected"]
        assert second["previous_selection_id"] == first["selection_id"]
        assert (second["examples_added"], second["examples_removed"], second["examples_kept"]) == (
            0, 0, second["selected"])
        assert second["leaves_added"] == second["leaves_removed"] == []


def test_pool_growth_keeps_measured_leaves_exact_and_trains_none(pipeline):
    lineage = pipeline.lineage
    before = {r["leaf_id"]: r["member_hash"] for r in lineage.read_table("leaves").iter_rows(named=True)}
    measured = set(lineage.partition_keys("leaf_utilities"))
    assert measured
    pipeline.grow()
    res = run_harp(pipeline.instance, pipeline.defs)
    assert res["select"].success
    emb = metadata(res["prepare"], "example_embeddings")
    assert (emb["embedded_new"], emb["cached"]) == (GROWTH, POOL)
    hier = metadata(res["prepare"], "leaf_hierarchy")
    assert hier["how"] == "grown" and hier["added_examples"] == GROWTH
    after = {r["leaf_id"]: r["member_hash"] for r in lineage.read_table("leaves").iter_rows(named=True)}
    # every measured leaf keeps its exact member set, so nothing trains; arrivals near them wait in delta leaves
    assert {leaf: after[leaf] for leaf in measured} == {leaf: before[leaf] for leaf in measured}
    assert trained_leaves(res["leaf_runs"]) == []
    assert hier["examples_deferred_to_delta_leaves"] > 0 and hier["delta_leaves_opened"] >= 1
    deltas = [leaf for leaf in after if "d" in leaf[1:]]
    assert len(deltas) >= hier["delta_leaves_opened"]
    print(f"\ngrowth: {hier['leaves']} leaves, {hier['delta_leaves_opened']} delta leaves opened for "
          f"{hier['examples_deferred_to_delta_leaves']} of {GROWTH} new examples, 0 leaves retrained")
    drift = lineage.query("SELECT * FROM leaf_drift")
    assert sorted(drift["leaf_id"].to_list()) == sorted(measured)
    assert drift["drift"].to_list() == [0.0] * len(measured)
    assert drift["measured_member_hash"].to_list() == drift["current_member_hash"].to_list()
    # delta leaves are inferred, not measured, in the new posteriors
    post = lineage.query("SELECT leaf_id, bool_or(measured) AS m FROM phi_posteriors GROUP BY leaf_id")
    inferred = dict(zip(post["leaf_id"].to_list(), post["m"].to_list(), strict=True))
    assert all(inferred[d] is False for d in deltas)
    # the partitions stay HARP's leaves (the measured ones among them): the delta leaves are not registered
    registered = set(pipeline.instance.get_dynamic_partitions("leaves"))
    assert registered == harp_leaves(lineage) | (measured & set(after)) and not registered & set(deltas)
    assert lineage.query("SELECT count(*) AS n FROM examples")["n"][0] == POOL + GROWTH
    assert lineage.query("SELECT count(*) AS n FROM phi_posteriors WHERE NOT isfinite(mean)")["n"][0] == 0


def test_edited_and_removed_examples_retrain_exactly_their_leaves(pipeline):
    """Planted edits: one example of one measured leaf gets another response, one of another measured leaf
    leaves the pool. Exactly those two leaves are stale and retrain; their drift shows on their partitions."""
    import polars as pl

    lineage = pipeline.lineage
    examples = lineage.read_table("examples")
    measured = sorted(lineage.partition_keys("leaf_utilities"))
    edited_leaf, shrunk_leaf = measured[0], measured[1]
    edit_id = examples.filter(pl.col("leaf_id") == edited_leaf)["example_id"][0]
    drop_id = examples.filter(pl.col("leaf_id") == shrunk_leaf)["example_id"][0]
    part = pipeline.root / "pool" / "part-000.parquet"
    pool = pl.read_parquet(part)
    pool = pool.filter(pl.col("example_id") != drop_id).with_columns(
        pl.when(pl.col("example_id") == edit_id).then(pl.lit("an edited answer")).otherwise(pl.col("response"))
        .alias("response"))
    pool.write_parquet(part)
    res = run_harp(pipeline.instance, pipeline.defs)
    assert res["select"].success
    hier = metadata(res["prepare"], "leaf_hierarchy")
    assert (hier["how"], hier["edited_examples"], hier["removed_examples"]) == ("updated", 1, 1)
    assert sorted(trained_leaves(res["leaf_runs"])) == sorted([edited_leaf, shrunk_leaf])
    # the drift seen by the prepare run, on each leaf's partition
    obs = {e.event_specific_data.asset_observation.partition: e.event_specific_data.asset_observation.metadata
           for e in res["prepare"].get_asset_observation_events()}
    assert set(obs) == {edited_leaf, shrunk_leaf}
    for leaf in (edited_leaf, shrunk_leaf):
        assert obs[leaf]["members_removed"].value == 1 and obs[leaf]["measurement_stale"].value is True
        assert obs[leaf]["drift"].value > 0
    # after retraining, each measurement is exact again, made on the member set now in the leaf
    drift = lineage.query("SELECT * FROM leaf_drift")
    assert drift["drift"].to_list() == [0.0] * drift.height
    members = lineage.query("SELECT example_id FROM measured_members WHERE leaf_id = $leaf", {"leaf": shrunk_leaf})
    assert drop_id not in members["example_id"].to_list()
