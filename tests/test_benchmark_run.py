"""The benchmark runner end to end on a tiny demo: every method and budget validated, costs charged per method,
finished seeds cached, the report written."""

import json

import pytest

from benchmarks.quality import run as bench_run
from benchmarks.quality.run import BenchConfig, main, run_benchmark
from harp.config import HarpSettings
from harp.models.embedder import Embedder
from harp_demo.build import BaseModelConfig

pytestmark = pytest.mark.slow

TINY_BASE = BaseModelConfig(vocab_size=600, n_layer=2, n_head=2, n_embd=64, n_positions=128, steps=150, batch_size=16)
METHODS = {"harp_c", "harp_e", "harp_active", "exhaustive", "less", "tsds", "random", "full"}


@pytest.fixture(scope="module")
def report(tmp_path_factory, torch_one_thread_module):
    root = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(pool_size=300, seeds=(0,), denominators=(6, 3), main_denominator=3, active_runs=1,
                      active_rounds=1, envelope="expansive", validation_epochs=1, validation_seeds=2)
    settings = HarpSettings(leaf_size=30, leaves_per_parent=5, parents_per_region=2, n_representatives=1,
                            n_boot=30, tsds_K=10, tsds_K_kde=10)
    kw = dict(base_model=TINY_BASE, embedder=Embedder(device="cpu", max_length=32), threads=1,
              settings=settings)
    paths = run_benchmark(cfg, root / "demo", root / "out", **kw)
    return {"cfg": cfg, "root": root, "paths": paths, "kw": kw,
            "results": json.loads(paths["results.json"].read_text())}


@pytest.fixture(scope="module")
def torch_one_thread_module():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_method_and_budget_is_validated(report):
    recs = report["results"]["records"]
    assert {r["method"] for r in recs} == METHODS
    budgets = report["cfg"].budgets()
    for method in METHODS - {"full"}:
        assert sorted(r["budget"] for r in recs if r["method"] == method) == sorted(budgets)
    full = [r for r in recs if r["method"] == "full"]
    assert len(full) == 1 and full[0]["examples"] == 300 and full[0]["budget_fraction"] == 1.0
    for r in recs:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["examples"] <= r["budget"]
        assert set(r["per_domain"]) == set(report["results"]["config"]["domains"])
        assert 0.0 <= r["harmful_share"] <= 1.0 and 0.0 <= r["redundant_share"] <= 1.0
        assert r["validation_runs"] == 2 and r["validation_sd"] >= 0.0


def test_accuracy_is_the_mean_of_the_validation_seeds(report):
    """Each record's accuracy is the mean of its LoRA runs on seeds s and s + 1000 (cached one by one)."""
    cache = report["root"] / "out" / "cache"
    runs = {}
    for path in cache.glob("validation-seed*.json"):
        got = json.loads(path.read_text())
        runs.setdefault(path.name.split("-")[1], []).append(got["accuracy"])
    assert set(runs) == {"seed0", "seed1000"}
    full = next(r for r in report["results"]["records"] if r["method"] == "full")
    # the full pool's two runs are in the cache; their mean is its record
    means = {(a + b) / 2 for a in runs["seed0"] for b in runs["seed1000"]}
    assert any(abs(full["test_accuracy"] - m) < 1e-12 for m in means)


def test_costs_are_charged_per_method(report):
    recs = report["results"]["records"]
    diag = report["results"]["diagnostics"][0]
    reps, leaves = diag["representatives"], diag["leaves_total"]
    assert 0 < reps < leaves
    by = {(r["method"], r["budget"]): r for r in recs}
    b = report["cfg"].main_budget()
    assert by[("harp_c", b)]["train_eval_runs"] == by[("harp_e", b)]["train_eval_runs"] == reps
    assert by[("exhaustive", b)]["train_eval_runs"] == leaves
    assert by[("harp_active", b)]["train_eval_runs"] == reps + diag["active_leaves"]
    assert diag["active_leaves"] == 1
    assert by[("tsds", b)]["train_eval_runs"] == by[("random", b)]["train_eval_runs"] == 0
    assert by[("less", b)]["train_eval_runs"] == 1  # its warm-up
    # TSDS trains on its sampled multiset: exactly `budget` draws, duplicates included.
    assert by[("tsds", b)]["examples"] == b and by[("tsds", b)]["distinct"] <= b
    rho = diag["spearman_posterior_vs_exhaustive"]
    assert rho is None or -1.0 <= rho <= 1.0


def test_report_files_and_resume_from_cache(report, monkeypatch):
    paths = report["paths"]
    assert {"README.md", "results.json", "budget_sweep.png", "utility_vs_runs.png"} <= set(paths)
    assert "harp_active" in paths["README.md"].read_text()

    def no_training(self, seed):
        raise AssertionError(f"seed {seed} should come from the cache")

    monkeypatch.setattr(bench_run.Bench, "run_seed", no_training)
    again = run_benchmark(report["cfg"], report["root"] / "demo", report["root"] / "out", **report["kw"])
    assert json.loads(again["results.json"].read_text())["records"] == report["results"]["records"]


def test_cli_rejects_bad_budgets(capsys):
    assert main(["--budgets", "7,3", "--main", "14"]) == 2
    assert "--main among --budgets" in capsys.readouterr().err
    assert main(["--seeds", "a"]) == 2
