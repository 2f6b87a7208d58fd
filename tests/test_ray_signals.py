"""A pool that starts its own local Ray cluster gives the process its signal handlers back when it ends, so a
child started later (a step process, a waiter) never inherits a SIGTERM that Ray's native code ignored."""

from __future__ import annotations

import signal

import pytest
from helpers import tiny_corpus

from harp.backends import LeafExecution, LeafJob, RayLeafPool, _restore_signals, _signal_dispositions
from harp.models.device import Device
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (it is part of the test set)")


def test_saved_dispositions_come_back():
    def mine(*_):
        return None

    before = signal.signal(signal.SIGTERM, mine)
    try:
        saved = _signal_dispositions()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _restore_signals(saved)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
def test_a_pool_that_started_the_cluster_restores_the_handlers(tiny_model_dir, torch_one_thread):
    assert not ray.is_initialized()

    def mine(*_):
        return None

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, mine)
    try:
        finetuner = LoraFinetuner(base_model=str(tiny_model_dir), r=4, epochs=1, batch_size=8, max_length=32,
                                  device=Device(device="cpu", cpu_threads=1))
        lines = [t.split("\n") for t in tiny_corpus(20, seed=1)]
        eval_set = [{"example_id": f"e{i}", "domain": "a", "prompt": p, "choices": [r, "cat"], "answer": 0}
                    for i, (p, r) in enumerate(lines[:6])]
        job = LeafJob("L0", [p for p, _ in lines], [r for _, r in lines])
        with RayLeafPool(LeafExecution(backend="ray", actors=1, threads_per_actor=1), finetuner, Evaluator(),
                         eval_set) as pool:
            assert [k for k, _ in pool.run([job], seed=0)] == ["L0"]
        assert not ray.is_initialized()
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for s, h in before.items():
            signal.signal(s, h)
