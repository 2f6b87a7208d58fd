"""The stage functions on their own, over the tiny local model and a small templated pool."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest
from helpers import HIERARCHY, LORA, counting_base_loads, make_eval_set, make_pool

from harp import stages
from harp.method import Posteriors
from harp.models import finetuner as ftmod
from harp.models.device import Device
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CPU = Device(device="cpu")
def make_resources(model_dir, **lora) -> tuple[LoraFinetuner, Evaluator]:
    return LoraFinetuner(base_model=str(model_dir), device=CPU, **(LORA | lora)), Evaluator(batch_size=16)


@pytest.fixture(scope="module")
def pool():
    rows, X = make_pool()
    hierarchy = stages.build_hierarchy(X, seed=0, config=HIERARCHY)
    return rows, X, hierarchy


def _leaf_examples(rows, hierarchy, g):
    return stages.leaf_examples(hierarchy, [r["prompt"] for r in rows], [r["response"] for r in rows], g)


def test_leaf_examples_follow_the_member_order(pool):
    rows, _, hierarchy = pool
    g = int(hierarchy.leaf_of[0])
    prompts, responses = _leaf_examples(rows, hierarchy, g)
    members = hierarchy.members(g).tolist()
    assert 0 in members and prompts == [rows[r]["prompt"] for r in members]
    assert responses == [rows[r]["response"] for r in members]
    with pytest.raises(ValueError, match="covers 150 pool rows but 2 prompts"):
        stages.leaf_examples(hierarchy, ["a", "b"], ["c", "d"], g)
    with pytest.raises(IndexError, match="leaf id 999 out of range"):
        _leaf_examples(rows, hierarchy, 999)


# -- domains ---------------------------------------------------------------------------------------------


def test_domain_order_is_sorted_and_independent_of_row_order():
    ev = make_eval_set()
    assert stages.eval_domains(ev) == ["colors", "greek"]
    assert stages.eval_domains(list(reversed(ev))) == ["colors", "greek"]
    assert stages.eval_domains(pl.DataFrame(ev)) == ["colors", "greek"]
    idx = stages.domain_index([r["domain"] for r in ev], ["colors", "greek"])
    assert idx.dtype == np.int64
    assert idx.tolist() == [1 if r["domain"] == "greek" else 0 for r in ev]
    with pytest.raises(ValueError, match=r"eval row 1 \(example_id='b'\) has domain 'x'"):
        stages.domain_index(["greek", "x"], ["colors", "greek"], example_ids=["a", "b"])
    with pytest.raises(ValueError, match="repeats"):
        stages.domain_index(["greek"], ["greek", "greek"])
    with pytest.raises(TypeError, match="sequence of domain names"):
        stages.domain_index(["greek"], "greek")


def test_build_hierarchy_checks_config_and_is_deterministic(pool):
    _, X, hierarchy = pool
    again = stages.build_hierarchy(X, seed=0, config=HIERARCHY)
    assert np.array_equal(again.leaf_of, hierarchy.leaf_of)
    assert np.array_equal(again.representatives, hierarchy.representatives)
    assert hierarchy.n_examples == X.shape[0] and hierarchy.representatives.size >= 2
    with pytest.raises(ValueError, match=r"unknown hierarchy setting\(s\) \['leaf_sise'\]"):
        stages.build_hierarchy(X, config={"leaf_sise": 10})
    with pytest.raises(ValueError, match="the seed is its own argument"):
        stages.build_hierarchy(X, config={"seed": 3})


# -- base scores and one leaf ------------------------------------------------------------------------------


def test_score_base_is_the_adapter_free_model(tiny_model_dir, pool):
    rows, _, hierarchy = pool
    ft, ev = make_resources(tiny_model_dir)
    eval_set = make_eval_set()
    before = stages.score_base(ft, ev, eval_set)
    assert before.example_ids == [r["example_id"] for r in eval_set]
    # Training an adapter must not change what score_base sees.
    g = int(hierarchy.representatives[0])
    stages.measure_leaf(ft, ev, *_leaf_examples(rows, hierarchy, g), eval_set, seed=0)
    after = stages.score_base(ft, ev, eval_set)
    assert np.array_equal(before.correct, after.correct)
    np.testing.assert_allclose(
        np.array(before.choice_scores), np.array(after.choice_scores), rtol=0, atol=1e-6
    )
    b = stages.base_scores(before, ["colors", "greek"])
    assert b.tolist() == [before.per_domain["colors"], before.per_domain["greek"]]
    with pytest.raises(ValueError, match=r"no score for domain\(s\) \['music'\]"):
        stages.base_scores(before, ["colors", "music"])
    with pytest.raises(ValueError, match="separator"):
        stages.score_base(ft, Evaluator(separator=" :: "), eval_set)


def test_measure_leaf_aligns_correctness_with_eval_order(tiny_model_dir, pool):
    rows, _, hierarchy = pool
    ft, ev = make_resources(tiny_model_dir)
    eval_set = make_eval_set()
    # the leaf nearest the greek template's examples: its effect on the greek domain is positive
    greek_leaf = int(hierarchy.leaf_of[0])
    prompts, responses = _leaf_examples(rows, hierarchy, greek_leaf)
    base = stages.score_base(ft, ev, eval_set)
    m = stages.measure_leaf(ft, ev, prompts, responses, eval_set, seed=0)
    # the base model prefers the wrong greek answer; a leaf of greek examples teaches the right one
    assert m.per_domain["greek"] >= base.per_domain["greek"] + 0.5
    assert list(m.example_ids) == [r["example_id"] for r in eval_set]
    assert list(m.domains) == [r["domain"] for r in eval_set]
    assert m.correct.shape == (len(eval_set),) and set(np.unique(m.correct)) <= {0.0, 1.0}
    assert m.n_train == len(prompts) and m.train_steps == 2 * -(-len(prompts) // 8)
    assert m.seconds >= m.train_seconds > 0 and m.eval_seconds > 0
    for d in ("colors", "greek"):
        assert m.per_domain[d] == pytest.approx(m.correct[np.array(m.domains) == d].mean())
    # The adapter is still active: scoring the reversed eval set gives the reversed correctness.
    with ft.model_for_eval() as (model, tok):
        rev = ev.evaluate(model, tok, list(reversed(eval_set)))
    assert np.array_equal(rev.correct[::-1], m.correct)
    # Same seed, same examples: same result.
    again = stages.measure_leaf(ft, ev, prompts, responses, eval_set, seed=0)
    assert np.array_equal(again.correct, m.correct) and again.last_loss == m.last_loss
    # Persisting round trip.
    back = stages.LeafMeasurement.from_frame(m.to_frame(), m.summary())
    assert back.example_ids == m.example_ids and back.domains == m.domains
    assert np.array_equal(back.correct, m.correct) and back.summary() == m.summary()
    with pytest.raises(ValueError, match=r"summary lacks key\(s\) \['seed'\]"):
        stages.LeafMeasurement.from_frame(m.to_frame(), {k: v for k, v in m.summary().items() if k != "seed"})
    with pytest.raises(ValueError, match="at least one training example"):
        stages.measure_leaf(ft, ev, [], [], eval_set, seed=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        stages.measure_leaf(ft, ev, ["a b", "c d"], ["x"], eval_set, seed=0)


def test_leaf_loop_loads_the_base_once_and_reports_progress(tiny_model_dir, pool):
    rows, _, hierarchy = pool
    ftmod.clear_base_cache()
    ft, ev = make_resources(tiny_model_dir)
    eval_set = make_eval_set()
    lines: list[str] = []
    with counting_base_loads() as loads:
        base = stages.score_base(ft, ev, eval_set)
        out = stages.measure_leaves(
            ft,
            ev,
            hierarchy,
            [r["prompt"] for r in rows],
            [r["response"] for r in rows],
            eval_set,
            seed=0,
            log=lines.append,
        )
    assert len(loads) == 1
    reps = hierarchy.representatives.tolist()
    assert sorted(out) == reps
    assert all(out[g].n_train == hierarchy.leaf_sizes[g] for g in reps)
    assert all(list(m.example_ids) == base.example_ids for m in out.values())
    assert (
        lines[0]
        == f"measuring {len(reps)} leaves ({int(hierarchy.leaf_sizes[reps].sum())} training examples) "
        f"of {hierarchy.n_leaves}"
    )
    assert lines[1].startswith(f"leaf 1/{len(reps)} (id {reps[0]},") and "leaves/s" in lines[1]
    assert lines[-1].startswith(f"leaf {len(reps)}/{len(reps)} (id {reps[-1]},") and "examples/s" in lines[-1]
    # A chosen subset, in ascending order whatever order it is given in.
    sub = stages.measure_leaves(
        ft,
        ev,
        hierarchy,
        [r["prompt"] for r in rows],
        [r["response"] for r in rows],
        eval_set,
        leaf_ids=[reps[1], reps[0]],
        seed=0,
        log=logging.getLogger("test.stages"),
    )
    assert list(sub) == [reps[0], reps[1]]
    assert np.array_equal(sub[reps[0]].correct, out[reps[0]].correct)
    with pytest.raises(ValueError, match=r"leaf id\(s\) \[999\] outside"):
        stages.measure_leaves(
            ft,
            ev,
            hierarchy,
            [r["prompt"] for r in rows],
            [r["response"] for r in rows],
            eval_set,
            leaf_ids=[999],
            seed=0,
        )
    with pytest.raises(ValueError, match="covers 150 pool rows but 3 prompts"):
        stages.measure_leaves(ft, ev, hierarchy, ["a"] * 3, ["b"] * 3, eval_set, seed=0)


# -- main effects and posteriors ---------------------------------------------------------------------------


@pytest.fixture
def measured(tiny_model_dir, pool):
    rows, _, hierarchy = pool
    ft, ev = make_resources(tiny_model_dir)
    eval_set = make_eval_set()
    base = stages.score_base(ft, ev, eval_set)
    out = stages.measure_leaves(
        ft,
        ev,
        hierarchy,
        [r["prompt"] for r in rows],
        [r["response"] for r in rows],
        eval_set,
        seed=0,
        log=lambda _: None,
    )
    return base, out, hierarchy


def test_main_effects_match_per_domain_differences_and_realign(measured):
    base, out, _ = measured
    domains = ["colors", "greek"]
    eff = stages.main_effects(out, base, domains, n_boot=50, seed=3)
    keys = sorted(out)
    expected = np.array([[out[g].per_domain[d] - base.per_domain[d] for d in domains] for g in keys])
    np.testing.assert_allclose(eff.phi_hat, expected, atol=1e-12)
    assert eff.base_score.tolist() == stages.base_scores(base, domains).tolist()
    assert eff.n_eval.tolist() == [12, 12] and eff.phi_var.shape == (len(keys), 2)
    assert np.all(eff.phi_var > 0)
    # some representative is made of greek examples and teaches its answer; the filler ones do not
    assert eff.phi_hat[:, 1].max() >= 0.5 and np.abs(eff.phi_hat).min() == 0.0
    # A measurement stored in another row order is realigned by example id: identical effects.
    g0 = keys[0]
    m = out[g0]
    perm = np.random.default_rng(0).permutation(len(m.example_ids))
    shuffled = stages.LeafMeasurement.from_frame(m.to_frame()[perm.tolist()], m.summary())
    eff2 = stages.main_effects({**out, g0: shuffled}, base, domains, n_boot=50, seed=3)
    assert np.array_equal(eff2.phi_hat, eff.phi_hat) and np.array_equal(eff2.phi_var, eff.phi_var)
    # Aligned arrays give the same as the dict; so does the default domain list.
    arr = np.stack([out[g].correct for g in keys])
    eff3 = stages.main_effects(arr, base, None, n_boot=50, seed=3)
    assert np.array_equal(eff3.phi_hat, eff.phi_hat) and np.array_equal(eff3.phi_var, eff.phi_var)
    # Swapping the domain order swaps the columns.
    eff4 = stages.main_effects(out, base, ["greek", "colors"], n_boot=50, seed=3)
    np.testing.assert_allclose(eff4.phi_hat, eff.phi_hat[:, ::-1], atol=1e-12)


def test_main_effects_reject_bad_inputs(measured):
    base, out, _ = measured
    keys = sorted(out)
    with pytest.raises(ValueError, match="no leaf measurements"):
        stages.main_effects({}, base, n_boot=10)
    with pytest.raises(ValueError, match=r"domain\(s\) \['music'\] have no eval examples"):
        stages.main_effects(out, base, ["colors", "greek", "music"], n_boot=10)
    with pytest.raises(ValueError, match="which is not in the domain list"):
        stages.main_effects(out, base, ["colors"], n_boot=10)
    m = out[keys[0]]
    short = stages.LeafMeasurement.from_frame(m.to_frame().head(5), m.summary())
    with pytest.raises(ValueError, match=f"leaf {keys[0]}: its eval examples differ"):
        stages.main_effects({keys[0]: short}, base, n_boot=10)
    with pytest.raises(ValueError, match=r"leaf 7: correctness has shape \(3,\)"):
        stages.main_effects({7: np.zeros(3)}, base, n_boot=10)


def test_infer_posteriors_covers_every_leaf(measured):
    base, out, hierarchy = measured
    eff = stages.main_effects(out, base, n_boot=50, seed=0)
    ids = np.array(sorted(out))
    post = stages.infer_posteriors(hierarchy, eff, ids)
    assert isinstance(post, Posteriors)
    assert post.mean.shape == post.sd.shape == (hierarchy.n_leaves, 2)
    assert np.flatnonzero(post.measured).tolist() == ids.tolist()
    assert np.all(np.isfinite(post.mean)) and np.all(post.sd > 0)
    # fit keywords pass through
    assert stages.infer_posteriors(hierarchy, eff, ids, boundary_prior=False).hyper.boundary_prior is False
    with pytest.raises(ValueError, match="leaf_ids must be"):
        stages.infer_posteriors(hierarchy, eff, ids[:-1])


# -- selection ---------------------------------------------------------------------------------------------


def test_select_harp_respects_budget_and_shapes(measured):
    base, out, hierarchy = measured
    domains = stages.eval_domains(base)
    eff = stages.main_effects(out, base, domains, n_boot=50, seed=0)
    post = stages.infer_posteriors(hierarchy, eff, sorted(out))
    b = stages.base_scores(base, domains)
    for envelope in ("conservative", "expansive"):
        sel = stages.select_harp(post, b, hierarchy, envelope=envelope, top_k_points=17, z_active=1.0)
        rows = sel.example_rows
        assert rows.size <= 17 and np.unique(rows).size == rows.size
        assert rows.size == 0 or (rows.min() >= 0 and rows.max() < hierarchy.n_examples)
        assert np.array_equal(hierarchy.leaf_of[rows], sel.leaf_of_row)
    with pytest.raises(ValueError, match=r"base_scores has shape \(3,\)"):
        stages.select_harp(post, np.zeros(3), hierarchy, envelope="expansive", top_k_points=5)
    with pytest.raises(ValueError, match="unknown envelope"):
        stages.select_harp(post, b, hierarchy, envelope="greedy", top_k_points=5)


def test_select_tsds_and_random(pool):
    _, X, _ = pool
    queries = X[:10] + 0.01
    params = {"alpha": 0.5, "C": 5.0, "sigma": 0.0, "K": 15, "K_kde": 15}
    a = stages.select_tsds(X, queries, 20, seed=4, params=params)
    b = stages.select_tsds(X, queries, 20, seed=4, params=params)
    assert a.sample.size == 20 and np.array_equal(a.sample, b.sample)
    assert a.p.shape == (X.shape[0],) and a.p.sum() == pytest.approx(1.0)
    # the queries sit in the first template's cluster: TSDS draws from it
    assert a.sample.max() < 50
    r = stages.select_random(X.shape[0], 30, seed=2)
    assert r.n_selected == 30 and np.unique(r.example_rows).size == 30
    assert np.array_equal(r.example_rows, stages.select_random(X.shape[0], 30, seed=2).example_rows)
    assert stages.select_random(5, 30, seed=2).n_selected == 5
    with pytest.raises(ValueError, match="budget must be"):
        stages.select_random(5, -1, seed=0)


def test_emit_accepts_loggers_and_callables(caplog):
    got: list[str] = []
    stages.emit(got.append, "one")
    with caplog.at_level(logging.INFO, logger="test.emit"):
        stages.emit(logging.getLogger("test.emit"), "two")
    assert got == ["one"] and "two" in caplog.text
    with pytest.raises(TypeError, match="log must be"):
        stages.emit(42, "three")
