"""The validation group on a tiny demo: the exhaustive oracle and every selection scored on the held-out test split."""

import math
import time

import dagster as dg
import polars as pl
import pytest
from conftest import tiny_dagster_env, tiny_pipeline_setup

from harp.config import HarpSettings, ValidationSettings
from harp.lineage import LineageStore
from harp.metrics import kind_shares, load_ground_truth
from harp.models.device import DeviceResource
from harp.models.finetuner import LoraFinetuner
from harp_assets import leaf_utilities as lu
from harp_assets.definitions import (
    ALL_ASSETS,
    VALIDATION_ASSETS,
    harp_prepare_job,
    harp_select_job,
    harp_validation_job,
    leaf_utilities_job,
    run_harp,
    run_validation,
)
from harp_assets.hierarchy import load_leaf_table
from harp_assets.leaf_utilities import leaf_versions, stored_version
from harp_demo.build import BaseModelConfig

pytestmark = pytest.mark.slow

# Pretrained long enough (unlike the pipeline tests' 150 steps) for LoRA on a leaf to move proxy accuracy, so
# HARP's selections are not empty and every validated method has examples.
TINY_BASE = BaseModelConfig(vocab_size=600, n_layer=2, n_head=2, n_embd=64, n_positions=128, steps=800, batch_size=16)
BUDGET = 100
POOL = 300
METHODS = {"harp_c", "harp_e", "tsds", "random", "exhaustive", "full"}


def _md(result, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def _newest_selection(instance: dg.DagsterInstance, method: str) -> tuple[str, int]:
    """(selection id, size) of a method's newest selection, from its asset's latest materialisation."""
    md = instance.get_latest_materialization_event(dg.AssetKey(f"{method}_selection")).asset_materialization.metadata
    return md["selection_id"].value, md["selected"].value


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory):
    """run_harp, the validation job once before the exhaustive leaves are measured (it must fail), then
    run_validation; all on one tiny demo in a temporary DAGSTER_HOME."""
    with tiny_dagster_env(tmp_path_factory, "validation") as (root, instance):
        _, full, resources = tiny_pipeline_setup(
            root, pool=POOL, growth=0, base=TINY_BASE,
            settings=dict(leaf_size=50, leaves_per_parent=4, parents_per_region=2, n_representatives=1,
                          top_k_points=BUDGET, n_boot=50, tsds_K=10, tsds_K_kde=10, z_active=0.0, max_leaf_size=80),
            lora=dict(r=8, epochs=6, batch_size=16, max_length=96, learning_rate=1e-2),
        )
        demo = root / "demo"
        resources = {
            **resources,
            "validation": ValidationSettings(test_path=str(demo / "test.jsonl"),
                                             ground_truth_path=str(demo / "ground_truth.parquet")),
            "validation_finetuner": LoraFinetuner(
                base_model=resources["finetuner"].base_model, device=DeviceResource(device="cpu", cpu_threads=1),
                r=8, epochs=1, batch_size=16, max_length=96, learning_rate=1e-2),
        }
        test_defs = dg.Definitions(
            assets=[*ALL_ASSETS, *VALIDATION_ASSETS], resources=resources,
            jobs=[harp_prepare_job, leaf_utilities_job, harp_select_job, harp_validation_job],
        )
        harp = run_harp(instance, test_defs)
        lineage: LineageStore = resources["lineage"]
        measured_by_harp = set(lineage.partition_keys("leaf_utilities"))
        early = test_defs.resolve_job_def("harp_validation_job").execute_in_process(
            instance=instance, raise_on_error=False)
        n0 = lu.trained_count()
        t0 = time.perf_counter()
        validation = run_validation(instance, test_defs)
        wall = time.perf_counter() - t0
        yield {"defs": test_defs, "instance": instance, "harp": harp, "early": early, "validation": validation,
               "trained": lu.trained_count() - n0, "measured_by_harp": measured_by_harp, "lineage": lineage,
               "resources": resources, "pool": full.head(POOL), "demo": demo, "wall": wall}


def test_exhaustive_selection_before_the_leaves_are_measured_names_them(validated):
    early = validated["early"]
    assert not early.success
    assert early.is_node_failed("exhaustive_selection")
    table = load_leaf_table(validated["lineage"])
    unmeasured = sorted(set(table.leaf_ids.tolist()) - validated["measured_by_harp"])
    assert unmeasured
    message = early.failure_data_for_node("exhaustive_selection").error.cause.message
    assert f"{len(unmeasured)} of {table.n_leaves} are not" in message
    assert unmeasured[0] in message and "make validate" in message
    # nothing was validated by the failed run
    assert not early.asset_materializations_for_node("selection_validation")


def test_exhaustive_mode_trains_only_the_unmeasured_leaves(validated):
    res, lineage = validated["validation"], validated["lineage"]
    assert all(r.success for r in res["leaf_runs"]) and res["validate"].success
    table = load_leaf_table(lineage)
    reps = int(table.representative.sum())
    assert validated["measured_by_harp"] == set(table.leaf_ids[table.representative].tolist())
    assert validated["trained"] == table.n_leaves - reps > 0
    trained = [leaf for r in res["leaf_runs"] for leaf in _md(r, "leaf_utilities")["trained_leaves"]]
    assert sorted(trained) == sorted(set(table.leaf_ids.tolist()) - validated["measured_by_harp"])
    versions = leaf_versions(lineage, validated["resources"]["finetuner"], validated["resources"]["settings"])
    assert all(stored_version(lineage, leaf) == versions[leaf] for leaf in table.leaf_ids.tolist())
    md = _md(res["validate"], "exhaustive_selection")
    assert md["train_eval_runs"] == table.n_leaves
    assert md["harp_leaves_measured"] == reps
    assert 0 <= md["selected"] <= BUDGET
    for key in ("spearman_posterior_vs_exhaustive", "spearman_inferred_leaves"):
        rho = md[key]
        assert isinstance(rho, float)
        assert math.isnan(rho) or -1.0 <= rho <= 1.0, (key, rho)
    print(f"\nexhaustive mode + validation: {validated['wall']:.1f} s, {validated['trained']} leaves trained, "
          f"Spearman(posterior, exhaustive) = {md['spearman_posterior_vs_exhaustive']}")


def test_validation_results_cover_every_method_and_domain(validated):
    lineage = validated["lineage"]
    res = validated["validation"]["validate"]
    rows = lineage.query("SELECT * FROM validation_results")
    assert rows["validation_id"].n_unique() == 1
    domains = sorted(rows["domain"].unique().to_list())
    test_domains = sorted(pl.read_ndjson(validated["demo"] / "test.jsonl")["domain"].unique().to_list())
    assert domains == test_domains
    assert set(rows["method"].to_list()) == METHODS
    assert rows.height == len(METHODS) * len(domains)
    assert rows.select(["method", "domain"]).n_unique() == rows.height
    assert rows["accuracy"].is_between(0.0, 1.0).all() and rows["base_accuracy"].is_between(0.0, 1.0).all()

    latest = lineage.query("SELECT method, selection_id, example_id FROM latest_selections")
    truth = load_ground_truth(validated["demo"] / "ground_truth.parquet")
    pool_ids = validated["pool"]["example_id"].to_list()
    for method in sorted(METHODS):
        got = rows.filter(pl.col("method") == method)
        if method == "full":
            ids, sid = pool_ids, None
        else:
            mine = latest.filter(pl.col("method") == method)
            ids, sid = mine["example_id"].to_list(), mine["selection_id"][0]
            # the newest selection in the catalog is the one the selection asset last recorded
            assert _newest_selection(validated["instance"], method) == (sid, len(ids)) and ids, method
        assert got["examples"].unique().to_list() == [len(ids)], method
        assert got["selection_id"].unique().to_list() == [sid], method
        shares = kind_shares(ids, truth, ("harmful", "redundant"))
        assert got["harmful_share"].unique().to_list() == [pytest.approx(shares["harmful"])], method
        assert got["redundant_share"].unique().to_list() == [pytest.approx(shares["redundant"])], method
    assert rows.filter(pl.col("method") == "full")["examples"][0] == POOL
    md = _md(res, "selection_validation")
    assert set(md["accuracy"]) == METHODS
    assert md["test_examples"] == pl.read_ndjson(validated["demo"] / "test.jsonl").height
    assert 0.0 <= md["base_accuracy"] <= 1.0


def test_posteriors_after_the_exhaustive_mode_use_only_harp_leaves(validated):
    lineage = validated["lineage"]
    select = validated["defs"].resolve_job_def("harp_select_job").execute_in_process(instance=validated["instance"])
    assert select.success
    table = load_leaf_table(lineage)
    reps = int(table.representative.sum())
    md = _md(select, "phi_posteriors")
    assert md["measured"] == reps
    assert md["measured_outside_harp"] == table.n_leaves - reps > 0
    assert lineage.query("SELECT count(DISTINCT leaf_id) AS n FROM phi_posteriors WHERE measured")["n"][0] == reps


def test_an_empty_newest_harp_selection_is_validated_as_empty(validated):
    lineage: LineageStore = validated["lineage"]
    instance = validated["instance"]
    base = validated["resources"]
    # no domain can be active at this z, so both HARP envelopes (and the oracle) select nothing
    resources = {**base, "settings": HarpSettings(**{**base["settings"].model_dump(), "z_active": 1e6}),
                 "validation": ValidationSettings(**{**base["validation"].model_dump(), "include_full_pool": False})}
    defs = dg.Definitions(assets=[*ALL_ASSETS, *VALIDATION_ASSETS], resources=resources,
                          jobs=[harp_select_job, harp_validation_job])
    select = defs.resolve_job_def("harp_select_job").execute_in_process(instance=instance)
    assert select.success
    newest = {m: _md(select, f"{m}_selection") for m in ("harp_c", "harp_e")}
    assert [md["selected"] for md in newest.values()] == [0, 0]
    run = defs.resolve_job_def("harp_validation_job").execute_in_process(instance=instance, raise_on_error=False)
    assert run.success, "an empty HARP selection is a valid result: its adapter is the base model"
    vid = _md(run, "selection_validation")["validation_id"]
    rows = lineage.query(f"SELECT method, selection_id, examples FROM validation_results WHERE validation_id = '{vid}'")
    for method, md in newest.items():
        got = rows.filter(pl.col("method") == method)
        assert got["selection_id"].unique().to_list() == [md["selection_id"]], method
        assert got["examples"].unique().to_list() == [0], method
