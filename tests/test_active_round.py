"""The active measuring round: its rule (`method.active`), the validation metrics, and the round in the Dagster graph."""

import math
import time

import dagster as dg
import numpy as np
import polars as pl
import pytest
from helpers import SETTINGS, copy_of, metadata, pipeline_defs, trained_leaves

from harp.method.active import active_round_scores, choose_active_leaves
from harp.metrics import kind_shares, load_ground_truth, oracle_fraction, spearman
from harp.store import harp_leaves, load_leaf_table, load_posteriors, planned_leaves, read_plan
from harp_assets.automation import BATCH_TAG, CHAIN_SENSORS, CHAIN_TAG, RANGE_END, RANGE_START
from harp_assets.runner import run_harp
from harp_resources import SettingsResource

# --------------------------------------------------------------------------------------------------------
# The rule: score[g] = sum over active d of sd[g, d] * max(mean[g, d] + z * sd[g, d], 0)
# --------------------------------------------------------------------------------------------------------

# Leaf 0 has the largest sd on domain 0 but is credibly harmful there (-5 + 2 < 0): no upside, score 0.
# Domain 1 is inactive in most cases below; leaf 3 would win on it if it counted.
MEAN = np.array([[-5.0, 0.0], [0.1, 0.0], [0.5, 0.0], [0.0, 3.0]])
SD = np.array([[2.0, 0.1], [0.5, 0.1], [0.3, 0.1], [0.1, 1.0]])
NONE_MEASURED = np.zeros(4, dtype=bool)
ONLY_D0 = np.array([True, False])


def test_scores_follow_the_rule_by_hand():
    scores, used = active_round_scores(MEAN, SD, NONE_MEASURED, ONLY_D0, z=1.0)
    # 2 * max(-3, 0); 0.5 * (0.1 + 0.5); 0.3 * (0.5 + 0.3); 0.1 * (0 + 0.1)
    np.testing.assert_allclose(scores, [0.0, 0.3, 0.24, 0.01], rtol=0, atol=1e-12)
    assert used.tolist() == [True, False]


def test_highest_sd_leaf_is_not_first_when_it_has_no_upside():
    assert int(np.argmax(SD[:, 0])) == 0  # the most uncertain leaf on the counted domain...
    pick = choose_active_leaves(MEAN, SD, NONE_MEASURED, 4, ONLY_D0, z=1.0)
    assert pick.leaves.tolist() == [1, 2, 3]  # ...is never picked: its optimistic effect is still < 0
    assert pick.leaves.dtype == np.int64
    assert pick.active.tolist() == [True, False]
    np.testing.assert_allclose(pick.scores, [0.0, 0.3, 0.24, 0.01], atol=1e-12)


def test_selected_unmeasured_leaves_are_verified_first():
    # The selection relies on leaves 0 and 3 (0 without any upside): both come before any upside pick,
    # the more uncertain first on the counted domain (sd 2.0 > 0.1); then the upside order 1, 2.
    pick = choose_active_leaves(MEAN, SD, NONE_MEASURED, 4, ONLY_D0, z=1.0, selected=[3, 0])
    assert pick.leaves.tolist() == [0, 3, 1, 2]
    # A measured selected leaf is not verified again, and n_runs caps the verification step too.
    measured = np.array([True, False, False, False])
    assert choose_active_leaves(MEAN, SD, measured, 1, ONLY_D0, selected=[0, 3]).leaves.tolist() == [3]
    assert choose_active_leaves(MEAN, SD, NONE_MEASURED, 1, ONLY_D0, selected=[3, 0]).leaves.tolist() == [0]
    with pytest.raises(ValueError, match="outside"):
        choose_active_leaves(MEAN, SD, NONE_MEASURED, 1, ONLY_D0, selected=[7])


def test_z_sets_the_optimism_and_can_reorder():
    # z = 0: the upside is the mean itself; 0.3 * 0.5 = 0.15 beats 0.5 * 0.1 = 0.05, and leaf 3 (mean 0) scores 0
    pick = choose_active_leaves(MEAN, SD, NONE_MEASURED, 4, ONLY_D0, z=0.0)
    assert pick.leaves.tolist() == [2, 1]
    np.testing.assert_allclose(pick.scores, [0.0, 0.05, 0.15, 0.0], atol=1e-12)
    # a larger z gives the harmful, very uncertain leaf 0 an upside: 2 * (-5 + 6) = 2 is then the top score
    wide = choose_active_leaves(MEAN, SD, NONE_MEASURED, 1, ONLY_D0, z=3.0)
    assert wide.leaves.tolist() == [0]
    assert wide.scores[0] == pytest.approx(2.0)


def test_no_active_domain_counts_every_domain():
    # every domain: leaf 3 gets 0.1 * 0.1 + 1.0 * (3 + 1) = 4.01 and comes first
    expected = [0.0 + 0.1 * 0.1, 0.3 + 0.1 * 0.1, 0.24 + 0.1 * 0.1, 0.01 + 4.0]
    for active in (None, np.array([False, False])):
        scores, used = active_round_scores(MEAN, SD, NONE_MEASURED, active, z=1.0)
        assert used.tolist() == [True, True]
        np.testing.assert_allclose(scores, expected, atol=1e-12)
        pick = choose_active_leaves(MEAN, SD, NONE_MEASURED, 2, active, z=1.0)
        assert pick.leaves.tolist() == [3, 1]
        assert pick.active.tolist() == [True, True]


def test_measured_leaves_are_never_picked_and_score_minus_inf():
    measured = np.array([False, True, False, True])
    pick = choose_active_leaves(MEAN, SD, measured, 4, ONLY_D0, z=1.0)
    assert pick.leaves.tolist() == [2]
    assert np.isneginf(pick.scores[[1, 3]]).all()
    assert pick.scores[2] == pytest.approx(0.24)
    everything = choose_active_leaves(MEAN, SD, np.ones(4, dtype=bool), 3, None)
    assert everything.leaves.size == 0 and np.isneginf(everything.scores).all()


def test_zero_score_leaves_are_never_picked():
    harmful = np.full((3, 2), -1.0)
    pick = choose_active_leaves(harmful, np.full((3, 2), 0.2), np.zeros(3, bool), 3, None, z=1.0)
    assert pick.leaves.size == 0
    assert (pick.scores == 0).all()
    # an sd of 0 leaves nothing to learn, however good the mean
    certain = choose_active_leaves(np.ones((2, 1)), np.array([[0.0], [0.5]]), np.zeros(2, bool), 2)
    assert certain.leaves.tolist() == [1]


def test_n_runs_caps_the_round():
    assert choose_active_leaves(MEAN, SD, NONE_MEASURED, 1, ONLY_D0).leaves.tolist() == [1]
    assert choose_active_leaves(MEAN, SD, NONE_MEASURED, 2, ONLY_D0).leaves.tolist() == [1, 2]
    assert choose_active_leaves(MEAN, SD, NONE_MEASURED, 0, ONLY_D0).leaves.size == 0
    assert choose_active_leaves(MEAN, SD, NONE_MEASURED, np.int64(100), ONLY_D0).leaves.tolist() == [1, 2, 3]


def test_ties_are_broken_by_leaf_index():
    mean, sd = np.zeros((5, 2)), np.ones((5, 2))  # every leaf scores 2.0
    measured = np.array([False, False, True, False, False])
    pick = choose_active_leaves(mean, sd, measured, 3)
    assert pick.leaves.tolist() == [0, 1, 3]
    # a tie between a later and an earlier leaf above a lower score
    mean2 = np.array([[0.0], [0.5], [0.0], [0.5]])
    sd2 = np.array([[1.0], [0.5], [1.0], [0.5]])  # scores 1.0, 0.5, 1.0, 0.5
    assert choose_active_leaves(mean2, sd2, np.zeros(4, bool), 4).leaves.tolist() == [0, 2, 1, 3]


def test_a_round_is_deterministic():
    rng = np.random.default_rng(3)
    mean, sd = rng.normal(size=(50, 4)), rng.uniform(0.0, 1.0, size=(50, 4))
    measured = rng.random(50) < 0.3
    a = choose_active_leaves(mean, sd, measured, 7)
    b = choose_active_leaves(mean.copy(), sd.copy(), measured.copy(), 7)
    assert a.leaves.tolist() == b.leaves.tolist()
    # the picks are the 7 best unmeasured leaves with a positive score, best first
    s = a.scores
    assert (np.diff(s[a.leaves]) <= 0).all()
    rest = np.setdiff1d(np.flatnonzero(~measured), a.leaves)
    assert s[rest].max() <= s[a.leaves].min()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(post_sd=np.ones((4, 3))), r"post_sd shape \(4, 3\) differs from post_mean shape \(4, 2\)"),
        (dict(post_sd=np.where(np.eye(4, 2, k=-1) > 0, -0.1, SD)), r"post_sd must be >= 0; leaf 1, domain 0"),
        (dict(post_mean=np.where(np.eye(4, 2, k=-2) > 0, np.nan, MEAN)), r"post_mean must be finite; leaf 2, domain 0"),
        (dict(post_sd=np.where(np.eye(4, 2) > 0, np.inf, SD)), r"post_sd must be finite; leaf 0, domain 0"),
        (dict(post_mean=MEAN[:, 0]), r"post_mean must be a \(leaves, domains\) matrix"),
        (dict(measured=np.zeros(3, bool)), r"measured must have one flag per leaf \(4\)"),
        (dict(active=np.ones(3, bool)), r"active must have one flag per domain \(2\)"),
        (dict(z=-1.0), r"z must be a finite number >= 0, got -1.0"),
        (dict(z=float("nan")), r"z must be a finite number >= 0"),
        (dict(n_runs=-1), r"n_runs must be a non-negative integer, got -1"),
        (dict(n_runs=1.5), r"n_runs must be a non-negative integer, got 1.5"),
        (dict(n_runs=True), r"n_runs must be a non-negative integer, got True"),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    args = dict(post_mean=MEAN, post_sd=SD, measured=NONE_MEASURED, n_runs=2, active=None, z=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        choose_active_leaves(**args)


# --------------------------------------------------------------------------------------------------------
# Metrics of the validation group
# --------------------------------------------------------------------------------------------------------


def test_spearman_by_hand_with_ties():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4. Centered: (-1.5, 0, 0, 1.5) and (-1.5, .5, -.5, 1.5):
    # 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert spearman([1, 3, 2, 4], [1, 2, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    # ties on both sides: x ranks 1.5, 1.5, 3 and y ranks 1, 2.5, 2.5; centered (-.5, -.5, 1) and (-1, .5, .5):
    # 0.75 / sqrt(1.5 * 1.5) = 0.5
    assert spearman([5.0, 5.0, 9.0], [0.0, 1.0, 1.0]) == pytest.approx(0.5, abs=1e-12)


def test_spearman_perfect_constant_and_shapes():
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [0.4, 0.3, 0.2, -5.0]) == pytest.approx(-1.0)
    assert spearman(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[10.0, 20.0], [30.0, 40.0]])) == pytest.approx(1.0)
    assert math.isnan(spearman([3, 3, 3], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="equally long inputs, got 3 and 2"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="must be finite"):
        spearman([1, np.nan, 3], [1, 2, 3])


def test_kind_shares():
    truth = {"a": "harmful", "b": "redundant", "c": "clean", "d": "harmful"}
    shares = kind_shares(["a", "b", "d"], truth, ("harmful", "redundant", "clean"))
    assert shares == pytest.approx({"harmful": 2 / 3, "redundant": 1 / 3, "clean": 0.0})
    assert kind_shares([], truth, ("harmful", "redundant")) == {"harmful": 0.0, "redundant": 0.0}
    with pytest.raises(ValueError, match=r"1 selected example\(s\) are not in the ground truth, e.g. \['zz'\]"):
        kind_shares(["a", "zz"], truth, ("harmful",))


def test_load_ground_truth(tmp_path):
    path = tmp_path / "truth.parquet"
    pl.DataFrame({"example_id": ["x", "y"], "kind": ["clean", "filler"], "domain": ["d1", "d2"]}).write_parquet(path)
    assert load_ground_truth(path) == {"x": "clean", "y": "filler"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ground_truth(tmp_path / "absent.parquet")
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"example_id": ["x"]}).write_parquet(bad)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['kind'\]"):
        load_ground_truth(bad)


def test_oracle_fraction():
    assert oracle_fraction(0.6, 0.7, 0.5) == pytest.approx(0.5)
    assert oracle_fraction(0.7, 0.7, 0.5) == pytest.approx(1.0)
    assert oracle_fraction(0.4, 0.7, 0.5) == pytest.approx(-0.5)
    assert math.isnan(oracle_fraction(0.6, 0.5, 0.5))  # the oracle gained nothing
    assert math.isnan(oracle_fraction(0.6, 0.4, 0.5))


# --------------------------------------------------------------------------------------------------------
# The round in the Dagster graph: run_harp measures the representatives, then one active round of 2 leaves
# --------------------------------------------------------------------------------------------------------

ACTIVE_RUNS = 2


@pytest.fixture
def active_env(tiny_pipeline, tmp_path):
    """A copy of the materialised tiny pipeline, run again with one active round of 2 leaves configured."""
    with copy_of(tiny_pipeline, tmp_path / "copy", settings=dict(active_runs=ACTIVE_RUNS, active_rounds=1)) as copy:
        t0 = time.perf_counter()
        results = run_harp(copy.instance, copy.defs)
        wall = time.perf_counter() - t0
        yield {"defs": copy.defs, "instance": copy.instance, "results": results, "resources": copy.resources,
               "trained": len(trained_leaves(results["leaf_runs"])), "lineage": copy.lineage, "wall": wall}


@pytest.mark.slow
def test_run_harp_measures_the_representatives_then_one_active_round(active_env):

    res, lineage = active_env["results"], active_env["lineage"]
    assert res["prepare"].success and all(r.success for r in res["leaf_runs"])
    assert all(r.success for r in res["select_runs"])
    table = load_leaf_table(lineage)
    reps = set(table.leaf_ids[table.representative].tolist())
    assert table.n_leaves >= len(reps) + ACTIVE_RUNS
    # the representatives were measured when the pipeline was first materialised: only the round trains
    assert active_env["trained"] == ACTIVE_RUNS
    # two selections: before the round (it plans the round) and after it (nothing more to plan)
    assert len(res["select_runs"]) == 2
    first_plan, last_plan = metadata(res["select_runs"][0], "active_round_plan"), metadata(res["select"], "active_round_plan")
    assert first_plan["new_round"] is True and first_plan["round"] == 1
    assert last_plan["new_round"] is False and last_plan["pending_leaves"] == 0

    rounds = read_plan(lineage)
    assert len(rounds) == 1 and rounds[0]["round"] == 1
    picked = rounds[0]["leaves"]
    assert len(picked) == ACTIVE_RUNS == len(set(picked))
    assert not set(picked) & reps
    assert first_plan["leaves"] == picked
    assert rounds[0]["scores"] == sorted(rounds[0]["scores"], reverse=True) and min(rounds[0]["scores"]) > 0
    assert planned_leaves(lineage) == sorted(picked)
    assert harp_leaves(lineage) == reps | set(picked)

    post, meta = load_posteriors(lineage)
    assert set(meta["measured_leaves"]) == reps | set(picked)
    assert int(post.measured.sum()) == len(reps) + ACTIVE_RUNS
    assert post.measured[[table.index_of(leaf) for leaf in picked]].all()
    assert metadata(res["select"], "phi_posteriors")["measured"] == len(reps) + ACTIVE_RUNS

    manifest = lineage.query("SELECT * FROM run_manifests ORDER BY created_at DESC LIMIT 1").row(0, named=True)
    assert (manifest["active_rounds"], manifest["active_leaves"]) == (1, ACTIVE_RUNS)
    assert manifest["leaves_measured"] == len(reps) + ACTIVE_RUNS
    table_rows = lineage.query("SELECT round, rank, leaf_id, score FROM active_rounds ORDER BY rank")
    assert table_rows.height == ACTIVE_RUNS
    assert table_rows["leaf_id"].to_list() == picked
    assert table_rows["round"].to_list() == [1] * ACTIVE_RUNS and table_rows["rank"].to_list() == [1, 2]
    np.testing.assert_allclose(table_rows["score"].to_numpy(), rounds[0]["scores"])
    print(f"\nrun_harp with one active round: {active_env['wall']:.1f} s, {active_env['trained']} leaves trained")


@pytest.mark.slow
def test_second_run_harp_trains_nothing_and_plans_no_round(active_env):

    lineage = active_env["lineage"]
    before_plan = read_plan(lineage)
    again = run_harp(active_env["instance"], active_env["defs"])
    assert again["select"].success and all(r.success for r in again["leaf_runs"])
    assert trained_leaves(again["leaf_runs"]) == []
    assert len(again["select_runs"]) == 1
    plan_md = metadata(again["select"], "active_round_plan")
    assert plan_md["new_round"] is False and plan_md["reason"] == "every configured round is planned"
    assert read_plan(lineage) == before_plan
    assert lineage.query("SELECT count(*) AS n FROM active_rounds")["n"][0] == ACTIVE_RUNS
    manifest = lineage.query("SELECT * FROM run_manifests ORDER BY created_at DESC LIMIT 1").row(0, named=True)
    assert (manifest["active_rounds"], manifest["active_leaves"]) == (1, ACTIVE_RUNS)


@pytest.mark.slow
def test_active_round_sensor_requests_the_planned_leaves_of_a_chained_selection(active_env):

    _, select_sensor, active_sensor = CHAIN_SENSORS
    instance, lineage = active_env["instance"], active_env["lineage"]
    # a second round is now allowed: the same resources with active_rounds=2
    resources = {**active_env["resources"],
                 "settings": SettingsResource(**SETTINGS, active_runs=ACTIVE_RUNS, active_rounds=2)}
    defs2 = pipeline_defs(resources)

    def tick(sensor, result):
        with dg.build_run_status_sensor_context(
            sensor_name=sensor.name, dagster_event=result.get_run_success_event(), dagster_instance=instance,
            dagster_run=result.dagster_run, resources=resources,
        ) as ctx:
            out = sensor(ctx)
        assert isinstance(out, dg.SensorResult)
        return out

    def execute(job, tags):
        result = defs2.resolve_job_def(job).execute_in_process(instance=instance, tags=tags)
        assert result.success
        return result

    # a selection run outside the chain (run_harp, the UI) is left alone
    plain = tick(active_sensor, active_env["results"]["select"])
    assert not plain.run_requests and "not chained" in plain.skip_reason.skip_message
    # a chained selection plans round 2, and the sensor asks for exactly its leaves
    chained = execute("harp_select_job", {CHAIN_TAG: "test"})
    rounds = read_plan(lineage)
    assert len(rounds) == 2
    second = rounds[1]["leaves"]
    assert len(second) == ACTIVE_RUNS and not set(second) & set(rounds[0]["leaves"])
    asked = tick(active_sensor, chained)
    assert asked.run_requests and all(r.job_name == "leaf_utilities_job" for r in asked.run_requests)
    registered = instance.get_dynamic_partitions("leaves")
    # the plan registered its picks behind HARP's earlier leaves: the registry is HARP's leaves only
    planned_table = load_leaf_table(lineage)
    reps = sorted(planned_table.leaf_ids[planned_table.representative].tolist())
    assert registered == reps + rounds[0]["leaves"] + second
    covered = {k for r in asked.run_requests
               for k in registered[registered.index(r.tags[RANGE_START]):registered.index(r.tags[RANGE_END]) + 1]}
    assert covered == set(second)
    batch = {r.tags[BATCH_TAG] for r in asked.run_requests}
    assert len(batch) == 1 and next(iter(batch)).startswith("active-")
    # the daemon's part: the leaf runs, then the selection the batch sensor asks for once they all succeeded
    leaf_runs = [execute(r.job_name, r.tags) for r in asked.run_requests]
    assert len(trained_leaves(leaf_runs)) == ACTIVE_RUNS
    selects = [r for run in leaf_runs for r in tick(select_sensor, run).run_requests]
    assert selects and {r.job_name for r in selects} == {"harp_select_job"}
    final = execute("harp_select_job", selects[-1].tags)
    _, meta = load_posteriors(lineage)
    assert set(second) <= set(meta["measured_leaves"])
    table = load_leaf_table(lineage)
    assert len(meta["measured_leaves"]) == int(table.representative.sum()) + 2 * ACTIVE_RUNS
    # nothing pending any more: the chain ends here
    done = tick(active_sensor, final)
    assert not done.run_requests and "no active-round leaf" in done.skip_reason.skip_message
    assert len(read_plan(lineage)) == 2
