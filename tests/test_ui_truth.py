"""What the Dagster UI shows about leaf partitions and run manifests is what HARP does.

On a fresh instance over the tiny demo, driven the way the UI drives it: the prepare job, then "Materialize
all" on `leaf_utilities` (one run over every registered partition, as the single-run backfill policy makes
it), the selection job (which plans one active round of 2 leaves), "Materialize all" again, and the selection
job twice more (the last one on its own).
"""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest
from helpers import TinyPipeline, copy_of, leaf_events, metadata, trained_leaves

from harp import store
from harp_assets.hierarchy import register_leaf_partitions
from harp_assets.runner import RANGE_END, RANGE_START

pytestmark = pytest.mark.slow

ACTIVE_RUNS = 2
LEAF_KEY = dg.AssetKey("leaf_utilities")


def _materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """What "Materialize all" on `leaf_utilities` launches: one run over the first..last registered key."""
    keys = instance.get_dynamic_partitions("leaves")
    return _leaf_run(defs, instance, keys[0], keys[-1])


def _leaf_run(defs: dg.Definitions, instance: dg.DagsterInstance, a: str, b: str) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def("leaf_utilities_job").execute_in_process(
        instance=instance, tags={RANGE_START: a, RANGE_END: b})
    assert result.success
    return result


def _job(defs: dg.Definitions, instance: dg.DagsterInstance, name: str) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(name).execute_in_process(instance=instance)
    assert result.success
    return result


@pytest.fixture(scope="module")
def walked_template(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    """The walk of the module docstring on a fresh instance, kept as a folder each test copies."""
    root = tmp_path_factory.mktemp("ui_truth")
    settings = dict(active_runs=ACTIVE_RUNS, active_rounds=1)
    with copy_of(tiny_pipeline, root, fresh_instance=True, settings=settings) as copy:
        defs, inst = copy.defs, copy.instance
        out: dict = {"prepare": _job(defs, inst, "harp_prepare_job")}
        out["registered_after_prepare"] = inst.get_dynamic_partitions("leaves")
        out["all_1"] = _materialize_all(defs, inst)
        out["select_1"] = _job(defs, inst, "harp_select_job")
        out["registered_after_plan"] = inst.get_dynamic_partitions("leaves")
        out["all_2"] = _materialize_all(defs, inst)
        out["select_2"] = _job(defs, inst, "harp_select_job")
        out["select_only"] = _job(defs, inst, "harp_select_job")
    return TinyPipeline(root=root, results=out, wall=0.0)


@pytest.fixture
def walked(walked_template, tmp_path):
    """This test's own copy of the walked instance."""
    with copy_of(walked_template, tmp_path / "copy",
                 settings=dict(active_runs=ACTIVE_RUNS, active_rounds=1)) as copy:
        table = store.load_leaf_table(copy.lineage)
        plan = store.read_plan(copy.lineage)
        yield {**walked_template.results, "copy": copy, "instance": copy.instance, "lineage": copy.lineage,
               "defs": copy.defs, "table": table,
               "reps": sorted(table.leaf_ids[table.representative].tolist()),
               "picks": plan[0]["leaves"] if plan else []}


def test_partitions_are_the_leaves_harp_means_to_measure(walked):
    reps, picks, table = walked["reps"], walked["picks"], walked["table"]
    assert 2 <= len(reps) < table.n_leaves - ACTIVE_RUNS  # some leaves are neither: never registered
    # the prepare job registers the representatives only; the plan adds its round's picks behind them
    assert walked["registered_after_prepare"] == reps
    assert len(picks) == ACTIVE_RUNS and not set(picks) & set(reps)
    assert walked["registered_after_plan"] == reps + picks
    assert walked["instance"].get_dynamic_partitions("leaves") == reps + picks
    assert set(reps + picks) == store.harp_leaves(walked["lineage"])
    hier = metadata(walked["prepare"], "leaf_hierarchy")
    assert (hier["registered_partitions"], hier["new_partitions"]) == (len(reps), len(reps))
    assert hier["representative_ids"] == reps
    assert metadata(walked["select_1"], "active_round_plan")["new_partitions"] == ACTIVE_RUNS
    # a partition not measured yet already says why it is there: its registration observation
    why = {leaf: "representative" for leaf in reps} | {leaf: "active round 1" for leaf in picks}
    for leaf, reason in why.items():
        obs = walked["instance"].fetch_observations(
            dg.AssetRecordsFilter(asset_key=LEAF_KEY, asset_partitions=[leaf]), limit=1).records
        assert len(obs) == 1, leaf
        md = obs[0].asset_observation.metadata
        assert md["registered_because"].value == reason
        assert md["is_representative"].value is (reason == "representative")


def test_materialize_all_trains_exactly_harps_leaves(walked):
    reps, picks = walked["reps"], walked["picks"]
    assert sorted(trained_leaves([walked["all_1"]])) == reps
    # the second "Materialize all" covers every registered leaf, and trains only the round's new picks
    covered = [e["partition"] for e in leaf_events([walked["all_2"]])]
    assert covered[:len(reps)] == reps and sorted(covered[len(reps):]) == sorted(picks)
    assert sorted(trained_leaves([walked["all_2"]])) == sorted(picks)
    # with HARP done, no partition is missing, and no leaf outside HARP's was ever measured
    inst, lineage = walked["instance"], walked["lineage"]
    assert inst.get_materialized_partitions(LEAF_KEY) == set(reps + picks)
    assert walked["lineage"].partition_keys("leaf_utilities") == sorted(reps + picks)
    _, meta = store.load_posteriors(lineage)
    assert sorted(meta["measured_leaves"]) == sorted(reps + picks)


def test_each_partition_shows_its_own_leaf(walked):
    """The latest materialization of each partition (what its page shows) holds that leaf's stored values,
    also when the leaf was up to date in that run and not retrained."""
    inst, lineage, reps, picks = walked["instance"], walked["lineage"], walked["reps"], walked["picks"]
    trained_in = {leaf: walked["all_1"].run_id for leaf in reps} | {leaf: walked["all_2"].run_id for leaf in picks}
    versions = set()
    for leaf in reps + picks:
        record = inst.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=LEAF_KEY, asset_partitions=[leaf]), limit=1).records[0]
        assert record.run_id == walked["all_2"].run_id  # the latest is the second "Materialize all" for all
        mat = record.asset_materialization
        md = {k: v.value for k, v in mat.metadata.items()}
        rows = lineage.read_partition("leaf_utilities", leaf).sort("domain")
        domains = rows["domain"].to_list()
        for field, col in (("utility", "utility"), ("base", "base"), ("phi", "phi")):
            assert list(md[field]) == domains, (leaf, field)
            assert md[field] == pytest.approx({d: round(v, 4) for d, v in zip(domains, rows[col], strict=True)})
        assert md["phi"] == pytest.approx({d: md["utility"][d] - md["base"][d] for d in domains}, abs=2e-4)
        dv = rows["data_version"][0]
        assert md["data_version"] == mat.tags["dagster/data_version"] == dv
        versions.add(dv)
        assert md["trained"] is (leaf in picks)
        assert md["measured_in_run"] == trained_in[leaf] == rows["run_id"][0]
        assert md["is_representative"] is (leaf in reps)
        assert md["measured_because"] == ("representative" if leaf in reps else "active round 1")
    assert len(versions) == len(reps) + len(picks)  # every page shows its own leaf's version


def test_manifests_count_what_was_trained_apart_from_what_is_stored(walked):
    reps, picks, lineage = walked["reps"], walked["picks"], walked["lineage"]
    rows = lineage.query("SELECT * FROM run_manifests ORDER BY created_at").to_dicts()
    assert [r["run_id"] for r in rows] == [walked[k].run_id for k in ("select_1", "select_2", "select_only")]
    first, second, alone = rows
    assert (first["train_eval_runs"], first["leaves_stored"], first["trained_since"]) == (len(reps), len(reps), None)
    assert (second["train_eval_runs"], second["leaves_stored"]) == (ACTIVE_RUNS, len(reps) + ACTIVE_RUNS)
    assert second["trained_since"] == first["created_at"]
    # a selection run on its own trained nothing; what is stored has not changed
    assert (alone["train_eval_runs"], alone["leaves_stored"]) == (0, len(reps) + len(picks))
    assert alone["trained_since"] == second["created_at"]
    md = metadata(walked["select_only"], "lineage_catalog")
    assert (md["leaves_trained_since_previous_manifest"], md["leaves_stored"]) == (0, len(reps) + len(picks))
    # a manifest written before the split reads its new columns as nulls
    folder = lineage.root_path / "run_manifests"
    old = lineage.read_partition("run_manifests", walked["select_1"].run_id).drop("leaves_stored", "trained_since")
    old.with_columns(pl.lit("old-run").alias("run_id")).write_parquet(folder / "old-run@0000000000000000000-old.parquet")
    lineage.refresh_catalog()
    got = lineage.query("SELECT leaves_stored, trained_since FROM run_manifests WHERE run_id = 'old-run'")
    assert got.rows() == [(None, None)]


def test_a_partition_with_stored_measurements_is_never_removed(walked):
    """Leaves registered beyond HARP's (as the exhaustive mode does): the one measured keeps its partition at
    the next prepare run, the one never measured loses it, so "Materialize all" is HARP's work again."""
    inst, defs, lineage = walked["instance"], walked["defs"], walked["lineage"]
    harp = walked["reps"] + walked["picks"]
    kept, dropped = sorted(set(walked["table"].leaf_ids.tolist()) - set(harp))[:2]
    assert register_leaf_partitions(inst, [kept, dropped]) == [kept, dropped]
    assert register_leaf_partitions(inst, [kept]) == []  # registering twice adds nothing
    assert trained_leaves([_leaf_run(defs, inst, kept, kept)]) == [kept]
    last = inst.get_latest_materialization_event(LEAF_KEY).asset_materialization
    assert last.metadata["measured_because"].value == "exhaustive"
    assert last.metadata["is_representative"].value is False
    prepare = _job(defs, inst, "harp_prepare_job")
    assert inst.get_dynamic_partitions("leaves") == harp + [kept]
    hier = metadata(prepare, "leaf_hierarchy")
    assert (hier["unplanned_partitions_removed"], hier["new_partitions"], hier["retired_partitions"]) == (1, 0, 0)
    assert kept in lineage.partition_keys("leaf_utilities")
    # "Materialize all" now covers HARP's leaves and the kept one, all up to date: it trains nothing
    again = _materialize_all(defs, inst)
    assert [e["partition"] for e in leaf_events([again])] == harp + [kept]
    assert trained_leaves([again]) == []
