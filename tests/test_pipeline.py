"""The HARP asset graph end to end on a tiny demo, through Dagster's APIs, in a temporary DAGSTER_HOME."""

import os
import time
from pathlib import Path

import dagster as dg
import pytest
from conftest import tiny_dagster_env, tiny_pipeline_setup

from harp.lineage import LineageStore
from harp_assets import leaf_utilities as lu
from harp_assets.definitions import (
    ALL_ASSETS,
    defs,
    harp_prepare_job,
    harp_select_job,
    leaf_utilities_job,
    partition_ranges,
    run_harp,
)
from harp_demo.build import BaseModelConfig

pytestmark = pytest.mark.slow

TINY_BASE = BaseModelConfig(vocab_size=600, n_layer=2, n_head=2, n_embd=64, n_positions=128, steps=150, batch_size=16)
BUDGET = 100
POOL = 400
GROWTH = 40


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    """A tiny demo, a temporary DAGSTER_HOME and the whole graph materialised once."""
    with tiny_dagster_env(tmp_path_factory, "pipeline") as (root, instance):
        pool_dir, full, resources = tiny_pipeline_setup(
            root, pool=POOL, growth=GROWTH, base=TINY_BASE,
            settings=dict(leaf_size=50, leaves_per_parent=4, parents_per_region=2, n_representatives=1, top_k_points=BUDGET, n_boot=50, tsds_K=10, tsds_K_kde=10, z_active=0.0, max_leaf_size=80),
            lora=dict(r=8, epochs=4, batch_size=16, max_length=96, learning_rate=1e-2),
        )
        test_defs = dg.Definitions(assets=ALL_ASSETS, resources=resources,
                                   jobs=[harp_prepare_job, leaf_utilities_job, harp_select_job])
        before = lu.trained_count()
        t0 = time.perf_counter()
        results = run_harp(instance, test_defs)
        wall = time.perf_counter() - t0
        yield {"defs": test_defs, "instance": instance, "results": results, "trained": lu.trained_count() - before,
               "lineage": resources["lineage"], "wall": wall, "pool_dir": pool_dir, "extra": full.slice(POOL)}


def _md(result, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


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
    res = pipeline["results"]
    assert res["prepare"].success and res["select"].success and all(r.success for r in res["leaf_runs"])
    lineage: LineageStore = pipeline["lineage"]
    inst = pipeline["instance"]
    hier = _md(res["prepare"], "leaf_hierarchy")
    reps = hier["representatives"]
    assert hier["leaves"] > reps >= 2
    # leaf partitions: registered for every leaf, representatives first; one run covers them all
    keys = inst.get_dynamic_partitions("leaves")
    assert len(keys) == hier["leaves"]
    assert len(res["leaf_runs"]) == 1
    assert pipeline["trained"] == reps
    leaf_md = _md(res["leaf_runs"][0], "leaf_utilities")
    assert leaf_md["trained"] == reps and leaf_md["skipped_up_to_date"] == 0
    # Dagster's cost per partition: the leaf run's wall time beyond the train-evaluate cycles
    run_s = pipeline["results"]["seconds"]["leaf_runs"]
    train_s = leaf_md["train_eval_seconds"]
    print(f"\nleaf run: {reps} partitions, {run_s:.2f} s wall, {train_s:.2f} s train+eval, "
          f"{(run_s - train_s) / reps:.3f} s overhead per partition ({leaf_md['step_overhead_seconds_per_partition']:.3f} s "
          "of it inside the step)")

    counts = lineage.query(
        "SELECT (SELECT count(*) FROM examples) AS ex, (SELECT count(*) FROM leaves) AS lv, "
        "(SELECT count(DISTINCT leaf_id) FROM leaf_utilities) AS lu, "
        "(SELECT count(*) FROM phi_posteriors WHERE measured) AS pm, "
        "(SELECT count(*) FROM run_manifests) AS rm"
    ).row(0, named=True)
    n_dom = lineage.query("SELECT count(DISTINCT domain) AS d FROM phi_posteriors")["d"][0]
    assert counts == {"ex": 400, "lv": hier["leaves"], "lu": reps, "pm": reps * n_dom, "rm": 1}
    # every example in exactly one leaf
    assert lineage.query("SELECT count(DISTINCT example_id) AS n FROM examples")["n"][0] == 400
    sel = lineage.query(
        "SELECT method, count(*) AS n, count(DISTINCT example_id) AS d, "
        "sum(CASE WHEN e.example_id IS NULL THEN 1 ELSE 0 END) AS outside "
        "FROM latest_selections s LEFT JOIN examples e USING (example_id) GROUP BY method ORDER BY method"
    )
    # HARP selects nothing when no leaf is predicted to help (the tiny demo model barely learns, so that can
    # happen here); each asset's metadata says how many it selected, and the table must agree with it.
    selected = {m: _md(res["select"], f"{m}_selection")["selected"] for m in ("harp_c", "harp_e", "random", "tsds")}
    nonempty = sorted(m for m, n in selected.items() if n > 0)
    assert {"random", "tsds"} <= set(nonempty)
    assert sel["method"].to_list() == nonempty
    assert dict(zip(sel["method"], sel["n"], strict=True)) == {m: selected[m] for m in nonempty}
    assert all(0 < n <= BUDGET for n in sel["n"].to_list())
    assert sel["n"].to_list() == sel["d"].to_list() and sum(sel["outside"].to_list()) == 0
    assert dict(zip(sel["method"], sel["n"], strict=True))["random"] == BUDGET
    seconds = lineage.query("SELECT seconds_json FROM run_manifests")["seconds_json"][0]
    assert '"leaf_hierarchy"' in seconds and '"tsds_selection"' in seconds
    why = lineage.query(f"SELECT * FROM selections WHERE method = '{nonempty[0]}' LIMIT 1")
    assert why["leaf_id"][0] in keys


def test_second_run_with_nothing_changed_trains_no_leaf(pipeline):
    inst, test_defs = pipeline["instance"], pipeline["defs"]
    before = lu.trained_count()
    t0 = time.perf_counter()
    again = run_harp(inst, test_defs)
    assert all(r.success for r in again["leaf_runs"])
    assert lu.trained_count() == before
    md = _md(again["leaf_runs"][0], "leaf_utilities")
    assert md["trained"] == 0 and md["skipped_up_to_date"] == md["partitions"] > 0
    # a changed LoRA recipe makes every measured leaf stale
    lineage: LineageStore = pipeline["lineage"]
    print(f"\nfirst run {pipeline['wall']:.1f} s, cached rerun {time.perf_counter() - t0:.1f} s")
    n_sel = lineage.query("SELECT count(DISTINCT selection_id) AS n FROM selections")["n"][0]
    n_methods = lineage.query("SELECT count(DISTINCT method) AS n FROM selections")["n"][0]
    assert n_methods >= 2 and n_sel == 2 * n_methods  # two runs x each non-empty method, history kept
    assert os.path.isfile(lineage.catalog_path)


def test_pool_growth_trains_only_new_or_changed_representatives(pipeline):
    inst, test_defs = pipeline["instance"], pipeline["defs"]
    lineage: LineageStore = pipeline["lineage"]
    before = {(r["leaf_id"], r["member_hash"]) for r in lineage.read_table("leaves").iter_rows(named=True)}
    pipeline["extra"].write_parquet(pipeline["pool_dir"] / "part-001.parquet")
    n0 = lu.trained_count()
    res = run_harp(inst, test_defs)
    assert res["select"].success
    emb = _md(res["prepare"], "example_embeddings")
    assert (emb["embedded_new"], emb["cached"]) == (GROWTH, POOL)
    hier = _md(res["prepare"], "leaf_hierarchy")
    assert hier["how"] == "grown" and hier["added_examples"] == GROWTH
    after = lineage.read_table("leaves")
    changed_reps = [r["leaf_id"] for r in after.iter_rows(named=True)
                    if r["is_representative"] and (r["leaf_id"], r["member_hash"]) not in before]
    assert lu.trained_count() - n0 == len(changed_reps)
    print(f"\ngrowth: {hier['leaves']} leaves, {hier.get('leaves_split')} split, {len(changed_reps)} of "
          f"{hier['representatives']} representatives retrained")
    assert set(inst.get_dynamic_partitions("leaves")) == set(after["leaf_id"].to_list())
    assert hier["retired_partitions"] == hier["leaves_split"]
    assert lineage.query("SELECT count(*) AS n FROM examples")["n"][0] == POOL + GROWTH
    assert lineage.query("SELECT count(*) AS n FROM phi_posteriors WHERE NOT isfinite(mean)")["n"][0] == 0
