"""The validation group on a tiny demo: the exhaustive oracle and every selection scored on the held-out test split."""

import math
import time

import dagster as dg
import polars as pl
import pytest
from helpers import BUDGET, POOL, TinyPipeline, copy_of, metadata, pipeline_defs, trained_leaves

from harp import store
from harp.metrics import kind_shares, load_ground_truth
from harp_assets.runner import run_validation
from harp_assets.validation import exhaustive_leaf_ids
from harp_resources import SettingsResource, ValidationResource

pytestmark = pytest.mark.slow

METHODS = {"harp_c", "harp_e", "tsds", "random", "exhaustive", "full"}
_md = metadata


def _newest_selection(instance: dg.DagsterInstance, method: str) -> tuple[str, int]:
    """(selection id, size) of a method's newest selection, from its asset's latest materialisation."""
    md = instance.get_latest_materialization_event(dg.AssetKey(f"{method}_selection")).asset_materialization.metadata
    return md["selection_id"].value, md["selected"].value


@pytest.fixture(scope="module")
def validated_template(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    """The materialised tiny pipeline, then the validation job once before the exhaustive leaves are measured
    (it must fail), then run_validation; kept as a folder each test copies."""
    root = tmp_path_factory.mktemp("validated")
    with copy_of(tiny_pipeline, root) as copy:
        measured_by_harp = set(copy.lineage.partition_keys("leaf_utilities"))
        early = copy.defs.resolve_job_def("harp_validation_job").execute_in_process(
            instance=copy.instance, raise_on_error=False)
        t0 = time.perf_counter()
        validation = run_validation(copy.instance, copy.defs)
        wall = time.perf_counter() - t0
    return TinyPipeline(root=root, wall=wall, results={
        "early": early, "validation": validation, "measured_by_harp": measured_by_harp,
        "trained": len(trained_leaves(validation["leaf_runs"]))})


@pytest.fixture
def validated(validated_template, tmp_path):
    """This test's own copy of the validated pipeline."""
    with copy_of(validated_template, tmp_path / "copy") as copy:
        yield {**validated_template.results, "defs": copy.defs, "instance": copy.instance, "lineage": copy.lineage,
               "resources": copy.resources, "demo": copy.root / "demo", "wall": validated_template.wall,
               "pool": pl.read_parquet(copy.root / "pool" / "part-000.parquet")}


def test_exhaustive_selection_before_the_leaves_are_measured_names_them(validated):
    early = validated["early"]
    assert not early.success
    assert early.is_node_failed("exhaustive_selection")
    table = store.load_leaf_table(validated["lineage"])
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
    table = store.load_leaf_table(lineage)
    reps = int(table.representative.sum())
    assert validated["measured_by_harp"] == set(table.leaf_ids[table.representative].tolist())
    assert validated["trained"] == table.n_leaves - reps > 0
    trained = trained_leaves(res["leaf_runs"])
    assert sorted(trained) == sorted(set(table.leaf_ids.tolist()) - validated["measured_by_harp"])
    r = validated["resources"]
    versions = store.leaf_versions(lineage, r["finetuner"], r["evaluator"], r["settings"].seed)
    assert all(store.stored_version(lineage, leaf) == versions[leaf] for leaf in table.leaf_ids.tolist())
    # only the exhaustive mode registers the leaves beyond HARP's: every leaf is a partition now, HARP's first,
    # and each of the others' pages says the exhaustive mode measured it
    registered = validated["instance"].get_dynamic_partitions("leaves")
    assert registered == exhaustive_leaf_ids(lineage) and sorted(registered) == sorted(table.leaf_ids.tolist())
    assert set(registered[:reps]) == validated["measured_by_harp"]
    for leaf in trained:
        mat = validated["instance"].fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("leaf_utilities"), asset_partitions=[leaf]), limit=1
        ).records[0].asset_materialization
        assert mat.metadata["measured_because"].value == "exhaustive" and mat.metadata["trained"].value is True
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
    table = store.load_leaf_table(lineage)
    reps = int(table.representative.sum())
    md = _md(select, "phi_posteriors")
    assert md["measured"] == reps
    assert md["measured_outside_harp"] == table.n_leaves - reps > 0
    assert lineage.query("SELECT count(DISTINCT leaf_id) AS n FROM phi_posteriors WHERE measured")["n"][0] == reps


def test_an_empty_newest_harp_selection_is_validated_as_empty(validated):
    lineage = validated["lineage"]
    instance = validated["instance"]
    base = validated["resources"]
    # no domain can be active at this z, so both HARP envelopes (and the oracle) select nothing
    resources = {**base, "settings": SettingsResource(**{**base["settings"].model_dump(), "z_active": 1e6}),
                 "validation": ValidationResource(**{**base["validation"].model_dump(), "include_full_pool": False})}
    defs = pipeline_defs(resources)
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
