"""scripts/gpu_check: its comparisons catch what they must, and on a machine without CUDA the script runs every
CPU variant and prints the GPU-only check as skipped, never as passed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _module()
CUDA = torch.cuda.is_available()


def _two_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal([1, 0, 0], 0.05, (50, 3)), rng.normal([0, 1, 0], 0.05, (50, 3))])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, np.repeat([0, 1], 50)


def test_partitions_equal_up_to_renaming():
    X, labels = _two_clusters()
    diff = gc.partition_diff(X, labels, 1 - labels)
    assert diff.same_up_to_ties and diff.disagree == 0


def test_a_row_moved_across_a_clear_boundary_is_a_difference():
    X, labels = _two_clusters()
    moved = labels.copy()
    moved[3] = 1
    diff = gc.partition_diff(X, labels, moved)
    assert diff.disagree == 1 and diff.ties == 0 and not diff.same_up_to_ties


def test_a_row_on_the_boundary_may_go_either_way():
    # Two tight clusters on e1 and e2 and two rows on the bisector, one in each: each bisector row is equally
    # close to both centroids, so swapping their clusters is a tie, not a difference.
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    mid = (e1 + e2) / np.sqrt(2)
    X = np.stack([e1] * 20 + [e2] * 20 + [mid, mid])
    a = np.array([0] * 20 + [1] * 20 + [0, 1])
    b = np.array([0] * 20 + [1] * 20 + [1, 0])
    diff = gc.partition_diff(X, a, b)
    assert diff.disagree == 2 and diff.ties == 2 and diff.same_up_to_ties
    off = X.copy()
    off[-2:] = (0.8 * e1 + 0.6 * e2, 0.6 * e1 + 0.8 * e2)  # no longer on the boundary
    assert not gc.partition_diff(off, a, b).same_up_to_ties


def test_merged_clusters_do_not_match():
    X, labels = _two_clusters()
    assert not gc.partition_diff(X, labels, np.zeros_like(labels)).matched


def test_knn_agreement_up_to_ties():
    d = np.array([[0.1, 0.2, 0.2, 0.5]], dtype=np.float32)
    i = np.array([[4, 7, 9, 1]])
    assert gc.knn_diff(d, i, d.copy(), i.copy()) is None
    assert gc.knn_diff(d, i, d.copy(), np.array([[4, 9, 7, 1]])) is None  # a tie in order
    boundary = np.array([[0.1, 0.2, 0.2, 0.5]], dtype=np.float32)
    assert gc.knn_diff(boundary, i, boundary, np.array([[4, 7, 9, 3]])) is None  # the k-th is a tie with id 3
    assert "other neighbours" in gc.knn_diff(d, i, d.copy(), np.array([[5, 7, 9, 1]]))
    assert "distances differ" in gc.knn_diff(d, i, d + np.float32(1e-3), i)


def test_domain_gaps_need_the_same_domains():
    assert gc.domain_gaps({"a": 0.5, "b": 1.0}, {"a": 0.25, "b": 1.0}) == {"a": 0.25, "b": 0.0}
    with pytest.raises(ValueError, match="domains differ"):
        gc.domain_gaps({"a": 1.0}, {"b": 1.0})


def test_tasks_follow_their_rule_and_the_eval_set_is_balanced():
    rows = gc.eval_set()
    assert {r["domain"] for r in rows} == {"a", "b"} and len(rows) == 2 * gc.PER_DOMAIN
    for r in rows:
        hit = r["prompt"].split()[-1] in gc.TRIGGER
        assert r["answer"] == {("a", True): "cat", ("a", False): "dog", ("b", True): "moon",
                               ("b", False): "sun"}[(r["domain"], hit)]
    assert sum(r["prompt"].split()[-1] in gc.TRIGGER for r in rows) == gc.PER_DOMAIN
    prompts, responses = gc.leaf("b", n=20)
    assert len(prompts) == 20 and set(responses) <= {"moon", "sun"}


def test_a_check_that_raises_is_a_failure_and_the_exit_status_says_so(monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("kaput")

    monkeypatch.setitem(gc.CHECKS, "device", broken)
    assert gc.main(["--only", "device"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL device \[(cpu|cuda)\]: RuntimeError: kaput", out, re.M)
    assert "FAIL 1" in out


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA path")
def test_require_gpu_without_cuda_exits_2(capsys):
    assert gc.main(["--require-gpu", "--only", "device"]) == 2
    assert "FAIL gpu_check: --require-gpu, but torch sees no CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_the_script_runs_every_check_and_skips_only_what_needs_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--workdir", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"^(PASS|FAIL|SKIP) ", ln)]
    by_check = {ln.split()[1].rstrip(":"): ln for ln in lines}
    assert list(by_check) == list(gc.CHECKS), proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0 and not [ln for ln in lines if ln.startswith("FAIL")], proc.stdout
    if CUDA:
        return
    assert by_check["vllm"].startswith("SKIP vllm: no CUDA")
    for name in ("device", "train", "faiss", "ray"):
        assert re.match(rf"^PASS {name} \[cpu[\],]", by_check[name]), by_check[name]
    assert "[cuda" not in proc.stdout
    assert "train [cpu, float32]" in by_check["train"]
    assert "CPU: must be identical" in by_check["ray"]


class _StandInEngine:
    """Greedy generation with transformers behind vLLM's interface, so the vLLM check's plumbing runs on a
    CPU: with `apply_adapter=False` it ignores the adapter, as a vLLM that served stale weights would."""

    def __init__(self, base_model: str, apply_adapter: bool):
        from harp.models.device import Device
        from harp.models.finetuner import LoraFinetuner

        self.ft = LoraFinetuner(base_model=base_model, device=Device(device="cpu"), r=8, lora_alpha=16)
        self.apply_adapter = apply_adapter

    def generate(self, prompt_token_ids, *, max_new_tokens, adapter_path=None):
        if self.apply_adapter and adapter_path is not None:
            self.ft.load_adapter(adapter_path)
            view = self.ft.model_for_eval()
        else:
            view = self.ft.base_for_eval()
        out = []
        with view as (model, tok):
            for ids in prompt_token_ids:
                x = torch.tensor([list(ids)])
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                out.append(gen[0, x.shape[1]:].tolist())
        return out


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_check")


@pytest.mark.slow
@pytest.mark.parametrize("apply_adapter", [True, False], ids=["serves-adapters", "ignores-adapters"])
def test_vllm_check_compares_per_domain_and_needs_the_adapters_applied(apply_adapter, check_dir, monkeypatch):
    from harp.models import vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_backend, "get_vllm_generator",
                        lambda base, **kw: _StandInEngine(base, apply_adapter))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = gc.check_vllm(gc.Context(workdir=check_dir, cuda=True))  # CUDA claimed, models on the CPU
    finally:
        torch.set_num_threads(before)
    if apply_adapter:
        assert result.status == "PASS", result.line()
        assert "predictions agree on 128/128" in result.detail
    else:  # adapter a's domain-a score collapses to the base model's
        assert result.status == "FAIL" and "largest gap" in result.detail, result.line()
