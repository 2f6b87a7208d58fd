"""The scale benchmark (`benchmarks/scale_pool.py`) on a tiny pool: every stage that does not train runs end
to end through the library, the report renders, and the growth exponents flag a quadratic stage."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.scale_pool import (
    PIPELINE,
    SETUP,
    Recorder,
    ScaleConfig,
    build_report,
    growth_table,
    machine_facts,
    markdown,
    run_size,
    slope,
)

TINY = ScaleConfig(dim=16, domains=3, eval_per_domain=8, n_boot=10, growth=0.02, keep_data=True)
PIPELINE_STAGES = {
    "embeddings_import", "embeddings_load", "content_hashes", "hierarchy_leaf_table", "leaf_table_save_load",
    "growth_1pct", "posteriors", "envelope_harp_c", "envelope_harp_e", "tsds_exact", "tsds_ivf", "random",
    "lineage_leaves_examples", "lineage_leaf_measurements", "measurements_read", "lineage_phi_posteriors",
    "lineage_selections", "catalog_refresh", "query_selection_runs", "query_latest_selections",
    "query_selection_explanations_all", "query_selection_explanations_one", "query_leaf_drift",
    "query_why_selected", "query_measured_vs_inferred", "query_selection_diff",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_size(3000, TINY, tmp_path_factory.mktemp("scale") / "n3000", echo=lambda _: None)


def test_every_stage_runs_on_a_tiny_pool(tiny_run: dict) -> None:
    by = {s["stage"]: s for s in tiny_run["stages"]}
    assert PIPELINE_STAGES <= set(by)
    assert {by[s]["kind"] for s in PIPELINE_STAGES} == {PIPELINE}
    assert by["generate_pool"]["kind"] == SETUP
    for s in tiny_run["stages"]:
        assert s["seconds"] >= 0 and s["cpu_seconds"] >= 0 and s["peak_rss_mib"] > 0
    assert by["hierarchy_leaf_table"]["info"]["how"] == "built"
    growth = by["growth_1pct"]["info"]
    assert growth["how"] == "grown" and growth["added"] == 60 and growth["ids_stable"]
    assert growth["frozen_unchanged"] == by["hierarchy_leaf_table"]["info"]["representatives"]
    assert by["posteriors"]["info"]["leaves"] == by["hierarchy_leaf_table"]["info"]["leaves"]
    assert by["posteriors"]["info"]["domains"] == 3
    budget = 3000 // 7
    assert by["envelope_harp_e"]["info"]["selected"] <= budget and by["random"]["info"]["selected"] == budget
    assert by["measurements_read"]["info"]["fresh"] == by["lineage_leaf_measurements"]["info"]["partitions"]
    explained = by["query_selection_explanations_all"]["info"]
    selected = sum(v for k, v in by["lineage_selections"]["info"].items() if k.endswith("_rows"))
    assert explained["view_rows"] == 3 * selected  # one row per (selected example, domain), every method
    assert by["query_leaf_drift"]["info"]["rows"] == by["lineage_leaf_measurements"]["info"]["partitions"]
    assert by["query_leaf_drift"]["info"]["drifted"] == 0  # measured leaves were frozen through the growth


def test_the_report_renders_every_stage(tiny_run: dict, tmp_path: Path) -> None:
    report = build_report([tiny_run], TINY, machine_facts(), threshold=1.3, min_seconds=0.5, min_mib=64.0,
                          mem_limit_gib=16.0)
    json.dumps(report)  # the JSON report is plain data
    text = markdown(report)
    assert "make bench-scale" in text and "logical cores" in text
    for stage in PIPELINE_STAGES:
        assert f"| {stage} |" in text
    assert all(g["time_exponent"] is None for g in report["growth"])  # one size: no exponent


def _linear(n: int) -> None:
    sum(range(n * 1500))


def _quadratic(n: int) -> None:
    sum(i ^ j for i in range(n) for j in range(n))


def test_the_exponents_flag_a_quadratic_stage() -> None:
    runs = []
    for n in (400, 800, 1600):
        rec = Recorder(echo=lambda _: None)
        with rec.stage("linear_toy"):
            _linear(n)
        with rec.stage("quadratic_toy"):
            _quadratic(n)
        runs.append({"n": n, "memory_method": rec.memory.method, "stages": [asdict(r) for r in rec.records]})
    table = {g["stage"]: g for g in growth_table(runs, threshold=1.3, min_seconds=0.0)}
    quad, lin = table["quadratic_toy"], table["linear_toy"]
    assert "time" in quad["flags"] and quad["time_exponent"] > 1.6
    assert quad["time_exponent"] > lin["time_exponent"] + 0.5
    assert quad["size_ratio"] == 4.0


def _fake(n: int, stage: str, seconds: float, peak: float, start: float = 100.0, kind: str = PIPELINE) -> dict:
    return {"n": n, "memory_method": "vmhwm", "stages": [{
        "stage": stage, "kind": kind, "seconds": seconds, "cpu_seconds": seconds, "peak_rss_mib": peak,
        "rss_start_mib": start, "rss_end_mib": start, "info": {}}]}


def test_flags_follow_the_thresholds() -> None:
    assert slope([1.0, 10.0, 100.0], [3.0, 300.0, 30000.0]) == pytest.approx(2.0)
    assert slope([10.0], [1.0]) is None

    def flags(stage_runs: list[dict], **kw) -> list[str]:
        return growth_table(stage_runs, **kw)[0]["flags"]

    ns = (100_000, 300_000, 1_000_000)
    linear = [_fake(n, "s", n / 1e5, 100 + n / 1e4) for n in ns]
    assert flags(linear) == []
    quadratic = [_fake(n, "s", (n / 1e5) ** 2, 200.0) for n in ns]
    assert flags(quadratic) == ["time"]
    assert flags([_fake(n, "s", (n / 1e5) ** 2 / 1e3, 200.0) for n in ns]) == []  # 0.1 s at most: too short
    assert flags([_fake(n, "s", (n / 1e5) ** 2, 200.0, kind=SETUP) for n in ns]) == []  # setup is never flagged
    memory = [_fake(n, "s", 1.0, 100 + (n / 1e5) ** 2 * 10) for n in ns]
    assert flags(memory) == ["memory"]
    assert flags([_fake(n, "s", 1.0, 17 * 1024.0) for n in ns]) == ["over 16 GiB"]
