"""Leaf cycles on a real local Ray cluster (2 actors, 1 torch thread each) against the in-process loop.

The two backends run the same `measure_leaf` on the same inputs with the same thread count, so their
correctness vectors and losses must be equal, bit for bit; a killed actor must cost exactly one retry of the
leaf it held; a leaf that fails every attempt must be named after all others were handed back.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import copy_of, tiny_corpus

from harp import backends
from harp.backends import LeafExecution, LeafExecutionError, LeafJob, RayLeafPool, run_leaves
from harp.models.device import Device
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner
from harp_assets.runner import run_harp

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (it is part of the test set)")

pytestmark = pytest.mark.slow

RAY2 = LeafExecution(backend="ray", actors=2, threads_per_actor=1)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local cluster of 2 CPU slots for the module; pools join it and leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def models(tiny_model_dir, torch_one_thread) -> tuple[LoraFinetuner, Evaluator, list[dict]]:
    finetuner = LoraFinetuner(base_model=str(tiny_model_dir), r=4, lora_alpha=8, learning_rate=1e-2, epochs=2,
                              batch_size=8, max_length=32, device=Device(device="cpu", cpu_threads=1))
    lines = [t.split("\n") for t in tiny_corpus(60, seed=5)]
    eval_set = [{"example_id": f"e{i}", "domain": "ab"[i % 2], "prompt": p, "choices": [r, "cat"], "answer": 0}
                for i, (p, r) in enumerate(lines) if r != "cat"]
    return finetuner, Evaluator(batch_size=16), eval_set


def _jobs(sizes: list[int]) -> list[LeafJob]:
    jobs = []
    for k, n in enumerate(sizes):
        lines = [t.split("\n") for t in tiny_corpus(n, seed=100 + k)]
        jobs.append(LeafJob(f"L{k}", [p for p, _ in lines], [r for _, r in lines]))
    return jobs


def _same(a: backends.LeafMeasurement, b: backends.LeafMeasurement) -> None:
    assert a.example_ids == b.example_ids
    np.testing.assert_array_equal(a.correct, b.correct)
    assert (a.n_train, a.train_steps, a.first_loss, a.last_loss) == (b.n_train, b.train_steps, b.first_loss,
                                                                     b.last_loss)


def test_local_backend_names_the_leaf_that_failed_twice_after_the_others(models):
    finetuner, evaluator, eval_set = models
    jobs = _jobs([8, 8])
    bad = LeafJob("broken", [], [])  # no example: measure_leaf refuses it on every attempt
    got, messages = {}, []
    with pytest.raises(LeafExecutionError, match=r"failed 2 time\(s\): broken") as err:
        for key, m in run_leaves(None, finetuner, evaluator, [jobs[0], bad, jobs[1]], eval_set, seed=0,
                                 log=messages.append):
            got[key] = m
    assert set(got) == {"L0", "L1"}  # the leaf after the broken one was still measured and handed back
    assert list(err.value.failures) == ["broken"]
    assert sum("attempt" in line for line in messages) == 2


def test_ray_actors_equal_the_in_process_loop_and_a_killed_actor_costs_one_retry(ray_cluster, models):
    finetuner, evaluator, eval_set = models
    # L0 is tiny and finishes first; the other actor is then deep inside the large L1, which gets killed.
    jobs = _jobs([4, 400, 16, 24])
    local = dict(run_leaves(None, finetuner, evaluator, jobs, eval_set, seed=3))
    killed: dict[str, int] = {}
    got = {}
    with RayLeafPool(RAY2, finetuner, evaluator, eval_set) as pool:
        first_pids = list(pool.pids)
        assert len(set(first_pids)) == 2 and os.getpid() not in first_pids
        for key, m in pool.run(jobs, seed=3):
            got[key] = m
            if not killed:
                assert key == "L0"
                (victim, pid), = pool.in_flight.items()  # the one other leaf being trained right now
                killed[victim] = pid
                os.kill(pid, signal.SIGKILL)
        attempts, replaced, pids = dict(pool.attempts), pool.replaced, list(pool.pids)
    assert killed == {"L1": first_pids[1]}
    assert attempts == {"L0": 1, "L1": 2, "L2": 1, "L3": 1}  # only the leaf the dead actor held ran again
    assert replaced == 1 and pids[0] == first_pids[0] and pids[1] != first_pids[1]
    assert set(got) == set(local)
    for key in local:
        _same(got[key], local[key])


def test_ray_leaf_that_fails_twice_fails_after_every_other_result(ray_cluster, models):
    finetuner, evaluator, eval_set = models
    jobs = _jobs([8, 8, 8])
    got = []
    with pytest.raises(LeafExecutionError, match="broken") as err:
        for key, _ in run_leaves(RAY2, finetuner, evaluator, [jobs[0], LeafJob("broken", [], []), *jobs[1:]],
                                 eval_set, seed=0):
            got.append(key)
    assert sorted(got) == ["L0", "L1", "L2"]
    assert "at least one training example" in err.value.failures["broken"]
    assert ray.is_initialized()  # a pool that joined a running cluster leaves it running


def test_a_bad_base_model_fails_before_any_leaf_with_a_clear_error(ray_cluster, models, tmp_path):
    finetuner, evaluator, eval_set = models
    broken = finetuner.model_copy(update={"base_model": str(tmp_path / "no-such-model")})
    with pytest.raises(RuntimeError, match="failed to start"):
        list(run_leaves(RAY2, broken, evaluator, _jobs([4]), eval_set, seed=0))


def test_the_pipeline_on_ray_stores_what_the_in_process_run_stored(tiny_pipeline, tmp_path, ray_cluster):
    """The code location with `leaf_execution` on Ray: same leaf scores, same selections as in process."""
    query_leaves = "SELECT leaf_id, domain, utility, phi FROM leaf_utilities ORDER BY leaf_id, domain"
    query_sel = "SELECT method, rank, example_id FROM latest_selections ORDER BY method, rank"
    with copy_of(tiny_pipeline, tmp_path / "first") as first:
        want_leaves, want_sel = first.lineage.query(query_leaves), first.lineage.query(query_sel)
    with copy_of(tiny_pipeline, tmp_path / "ray", fresh_instance=True,
                 leaf_execution={"backend": "ray", "actors": 2, "threads_per_actor": 1}) as copy:
        results = run_harp(copy.instance, copy.defs)
        trained = [m.partition for r in results["leaf_runs"] for m in r.asset_materializations_for_node(
            "leaf_utilities") if m.metadata["trained"].value]
        assert sorted(trained) == sorted(want_leaves["leaf_id"].unique().to_list())
        logs = [e.user_message for r in results["leaf_runs"] for e in copy.instance.all_logs(r.run_id)]
        assert any("ray: 2 actor(s) ready" in line for line in logs)  # the cycles did run on the actors
        assert copy.lineage.query(query_leaves).equals(want_leaves)
        assert copy.lineage.query(query_sel).equals(want_sel)
