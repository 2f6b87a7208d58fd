"""The benchmark report on a small hand-made record table whose aggregates are worked out by hand below."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks.quality import report
from benchmarks.quality.report import summarise, validate_records, write_report

POOL = 20
BASE = {0: 0.40, 1: 0.50}
# method, budget, seed, alpha, beta, harmful, redundant, runs, examples, seconds, round
ROWS = [
    ("harp_c", 2, 0, 0.6, 0.4, 0.0, 0.0, 6, 2, 1.0, None),
    ("harp_c", 2, 1, 0.7, 0.5, 0.5, 0.0, 8, 1, 2.0, None),
    ("harp_e", 2, 0, 0.5, 0.4, 0.0, 0.5, 6, 2, 1.0, None),
    ("harp_e", 2, 1, 0.6, 0.5, 0.0, 0.5, 8, 2, 1.0, None),
    # Round 2 listed before round 1: the tables must take the last round by number, not by position.
    ("harp_active", 2, 0, 0.7, 0.5, 0.0, 0.0, 14, 2, 3.0, 2),
    ("harp_active", 2, 0, 0.6, 0.4, 0.0, 0.0, 10, 2, 2.0, 1),
    ("harp_active", 2, 1, 0.7, 0.5, 0.0, 0.0, 11, 2, 2.0, 1),
    ("harp_active", 2, 1, 0.8, 0.6, 0.0, 0.0, 15, 2, 3.0, 2),
    ("exhaustive", 2, 0, 0.8, 0.4, 0.0, 0.0, 40, 2, 9.0, None),
    ("exhaustive", 2, 1, 0.5, 0.5, 0.0, 0.0, 40, 2, 9.0, None),  # oracle gain 0: skipped in fractions
    ("less", 2, 0, 0.5, 0.4, 0.0, 0.5, 1, 2, 4.0, None),
    ("less", 2, 1, 0.6, 0.5, 0.0, 0.5, 1, 2, 4.0, None),
    ("tsds", 2, 0, 0.4, 0.4, 0.5, 0.5, 0, 2, 0.5, None),
    ("tsds", 2, 1, 0.6, 0.4, 0.5, 0.0, 0, 2, 0.5, None),
    ("random", 2, 0, 0.5, 0.3, 0.0, 0.0, 0, 2, 0.1, None),
    ("random", 2, 1, 0.5, 0.5, 0.5, 0.5, 0, 2, 0.1, None),
    ("harp_c", 5, 0, 0.6, 0.5, 0.0, 0.0, 6, 5, 1.0, None),
    ("harp_c", 5, 1, 0.7, 0.6, 0.0, 0.2, 8, 4, 1.0, None),
    ("harp_e", 5, 0, 0.7, 0.5, 0.0, 0.0, 6, 5, 1.0, None),
    ("harp_e", 5, 1, 0.8, 0.6, 0.0, 0.0, 8, 5, 1.0, None),
    ("harp_active", 5, 0, 0.6, 0.6, 0.0, 0.0, 10, 5, 2.0, 1),
    ("harp_active", 5, 0, 0.7, 0.7, 0.0, 0.0, 14, 5, 3.0, 2),
    ("harp_active", 5, 1, 0.7, 0.7, 0.0, 0.0, 10, 5, 2.0, 1),
    ("harp_active", 5, 1, 0.8, 0.7, 0.0, 0.0, 14, 5, 3.0, 2),
    ("exhaustive", 5, 0, 0.8, 0.6, 0.0, 0.0, 100, 5, 20.0, None),
    ("exhaustive", 5, 1, 0.8, 0.6, 0.0, 0.0, 100, 5, 20.0, None),
    ("less", 5, 0, 0.6, 0.5, 0.0, 0.2, 1, 5, 4.0, None),
    ("less", 5, 1, 0.6, 0.6, 0.0, 0.2, 1, 5, 4.0, None),
    ("tsds", 5, 0, 0.5, 0.4, 0.2, 0.2, 0, 5, 0.5, None),
    ("tsds", 5, 1, 0.6, 0.5, 0.2, 0.2, 0, 5, 0.5, None),
    ("random", 5, 0, 0.4, 0.4, 0.2, 0.2, 0, 5, 0.1, None),
    ("random", 5, 1, 0.5, 0.5, 0.2, 0.2, 0, 5, 0.1, None),
    ("full", POOL, 0, 0.5, 0.5, 0.2, 0.15, 0, POOL, 0.0, None),
    ("full", POOL, 1, 0.6, 0.6, 0.2, 0.15, 0, POOL, 0.0, None),
]
DIAGNOSTICS = [
    {
        "seed": 0,
        "leaves_total": 40,
        "representatives": 12,
        "spearman_posterior_vs_exhaustive": 0.5,
        "note": "x",
    },
    {"seed": 1, "leaves_total": 44, "representatives": 14, "spearman_posterior_vs_exhaustive": 0.7},
]
CONFIG = {
    "pool_size": POOL,
    "budgets": [2, 5],
    "seeds": [0, 1],
    "recipe": {"r": 8, "epochs": 10},
    "main_budget_fraction": 0.12,
    "total_seconds": 321.5,
}
SD_01 = 0.07071067811865477  # sample sd of two values 0.1 apart


def make_records() -> list[dict]:
    records = []
    for method, budget, seed, alpha, beta, harmful, redundant, runs, examples, seconds, rnd in ROWS:
        record = {
            "method": method,
            "budget": budget,
            "budget_fraction": budget / POOL,
            "seed": seed,
            "examples": examples,
            "test_accuracy": (alpha + beta) / 2,
            "base_accuracy": BASE[seed],
            "per_domain": {"alpha": alpha, "beta": beta},
            "harmful_share": harmful,
            "redundant_share": redundant,
            "train_eval_runs": runs,
            "seconds": seconds,
        }
        if rnd is not None:
            record["round"] = rnd
        records.append(record)
    return records


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], list[dict]]:
    out = tmp_path_factory.mktemp("bench") / "report"  # not there yet: write_report creates it
    records = make_records()
    paths = write_report(out, records, config=CONFIG, diagnostics=DIAGNOSTICS)
    return out, paths, records


def test_summarise_means_sds_and_oracle_fraction() -> None:
    s = summarise(make_records(), DIAGNOSTICS, main_budget_fraction=0.12)
    assert s["methods"] == list(report.METHODS)
    assert s["main_budget_fraction"] == pytest.approx(0.1)
    assert s["budget_fractions"] == pytest.approx([0.1, 0.25, 1.0])
    assert s["base_accuracy"]["mean"] == pytest.approx(0.45)
    g = s["groups"]["harp_c"][0.1]
    assert g["seeds"] == [0, 1] and g["budgets"] == [2]
    assert g["test_accuracy"]["mean"] == pytest.approx(0.55)
    assert g["test_accuracy"]["sd"] == pytest.approx(SD_01)
    assert g["gain"]["mean"] == pytest.approx(0.10)
    assert g["gain"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert g["examples"]["mean"] == pytest.approx(1.5) and g["examples"]["sd"] == pytest.approx(
        0.7071067811865476
    )
    assert g["harmful_share"]["mean"] == pytest.approx(0.25)
    assert g["harmful_share"]["sd"] == pytest.approx(0.3535533905932738)
    assert g["redundant_share"]["mean"] == pytest.approx(0.0) and g["redundant_share"]["sd"] == 0.0
    assert g["train_eval_runs"]["mean"] == pytest.approx(7.0)
    assert g["train_eval_runs"]["sd"] == pytest.approx(1.4142135623730951)
    assert g["seconds"]["mean"] == pytest.approx(1.5)
    assert g["per_domain"]["alpha"]["mean"] == pytest.approx(0.65)
    assert g["per_domain"]["beta"]["mean"] == pytest.approx(0.45)
    assert g["per_domain"]["beta"]["sd"] == pytest.approx(SD_01)
    # Oracle fraction at budget 2: seed 0 gives 0.1 / 0.2; seed 1's oracle gained nothing and is skipped.
    assert g["oracle_fraction"] == {"mean": pytest.approx(0.5), "sd": 0.0, "n": 1, "skipped": 1, "missing": 0}
    # At budget 5: harp_c 0.15/0.3 and 0.15/0.2; harp_e 0.2/0.3 and 0.2/0.2.
    frac_c = s["groups"]["harp_c"][0.25]["oracle_fraction"]
    assert frac_c["mean"] == pytest.approx(0.625) and frac_c["sd"] == pytest.approx(0.17677669529663687)
    frac_e = s["groups"]["harp_e"][0.25]["oracle_fraction"]
    assert frac_e["mean"] == pytest.approx(5 / 6) and frac_e["sd"] == pytest.approx(0.23570226039551584)
    assert s["groups"]["exhaustive"][0.25]["oracle_fraction"]["mean"] == pytest.approx(1.0)
    full = s["groups"]["full"][1.0]
    assert full["test_accuracy"]["mean"] == pytest.approx(0.55) and full["budgets"] == [POOL]
    assert full["oracle_fraction"]["mean"] is None and full["oracle_fraction"]["missing"] == 2
    assert s["main_rows"]["full"] == 1.0 and s["main_rows"]["tsds"] == pytest.approx(0.1)


def test_harp_active_uses_last_round_in_tables_and_all_rounds_in_the_curve() -> None:
    s = summarise(make_records(), DIAGNOSTICS, main_budget_fraction=0.12)
    active = s["groups"]["harp_active"][0.1]
    assert active["n"] == 2
    assert active["test_accuracy"]["mean"] == pytest.approx(0.65)
    assert active["test_accuracy"]["sd"] == pytest.approx(SD_01)
    assert active["train_eval_runs"]["mean"] == pytest.approx(14.5)
    assert (
        active["oracle_fraction"]["mean"] == pytest.approx(1.0) and active["oracle_fraction"]["skipped"] == 1
    )
    points = s["utility_vs_runs"]["representatives + active rounds"]["points"]
    assert [(p["budget_fraction"], p["round"]) for p in points] == [(0.1, 1), (0.1, 2), (0.25, 1), (0.25, 2)]
    assert points[0]["train_eval_runs"]["mean"] == pytest.approx(10.5)
    assert points[0]["train_eval_runs"]["sd"] == pytest.approx(SD_01 * 10)
    assert points[0]["gain"]["mean"] == pytest.approx(0.10)
    assert points[1]["gain"]["mean"] == pytest.approx(0.20)
    assert points[3]["gain"]["mean"] == pytest.approx(0.275)


def test_representatives_series_follows_the_better_harp_variant_at_the_main_budget() -> None:
    records = make_records()
    at_small = summarise(records, DIAGNOSTICS, main_budget_fraction=0.12)  # harp_c 0.55 > harp_e 0.50
    assert at_small["harp_variant"] == "harp_c"
    reps = at_small["utility_vs_runs"]["representatives"]
    assert reps["method"] == "harp_c"
    assert [p["train_eval_runs"]["mean"] for p in reps["points"]] == pytest.approx([7.0, 7.0])
    assert [p["gain"]["mean"] for p in reps["points"]] == pytest.approx([0.10, 0.15])
    at_large = summarise(records, DIAGNOSTICS, main_budget_fraction=0.3)  # harp_e 0.65 > harp_c 0.60
    assert at_large["main_budget_fraction"] == pytest.approx(0.25)
    assert at_large["harp_variant"] == "harp_e"
    oracle = at_large["utility_vs_runs"]["exhaustive"]["points"]
    assert [p["gain"]["mean"] for p in oracle] == pytest.approx([0.10, 0.25])


def test_summarise_diagnostics() -> None:
    diag = summarise(make_records(), DIAGNOSTICS)["diagnostics"]
    assert set(diag) == {"leaves_total", "representatives", "spearman_posterior_vs_exhaustive"}
    assert diag["leaves_total"]["mean"] == pytest.approx(42.0)
    assert diag["leaves_total"]["sd"] == pytest.approx(2.8284271247461903)
    assert diag["spearman_posterior_vs_exhaustive"]["mean"] == pytest.approx(0.6)
    assert diag["spearman_posterior_vs_exhaustive"]["sd"] == pytest.approx(0.1414213562373095)


def test_one_seed_has_sd_zero() -> None:
    records = [r for r in make_records() if r["seed"] == 1]
    g = summarise(records, [])["groups"]["tsds"][0.25]
    assert g["test_accuracy"] == {"mean": pytest.approx(0.55), "sd": 0.0, "n": 1}


@pytest.mark.parametrize(
    ("index", "change", "needles"),
    [
        (3, {"test_accuracy": 1.5}, ["record 3", "'harp_e'", "test_accuracy"]),
        (7, {"method": "oracle"}, ["record 7", "'oracle'", "unknown method"]),
        (14, {"seed": 1.0}, ["record 14", "'random'", "seed", "int"]),
        (0, {"examples": -1}, ["record 0", "'harp_c'", "examples"]),
        (9, {"train_eval_runs": -3}, ["record 9", "train_eval_runs"]),
        (10, {"harmful_share": float("nan")}, ["record 10", "harmful_share"]),
        (1, {"per_domain": {"alpha": 1.2}}, ["record 1", "per_domain", "'alpha'"]),
        (2, {"round": 2}, ["record 2", "round", "harp_active"]),
        (4, {"round": 0}, ["record 4", "round"]),
        (32, {"budget_fraction": 0.5}, ["record 32", "'full'", "budget_fraction"]),
        (11, {"base_accuracy": 0.9}, ["record 11", "base_accuracy", "seed 1"]),
        (5, {"round": 2}, ["record 5", "duplicates record 4"]),
    ],
)
def test_validate_records_names_index_and_field(index: int, change: dict, needles: list[str]) -> None:
    records = copy.deepcopy(make_records())
    records[index].update(change)
    with pytest.raises(ValueError) as err:
        validate_records(records)
    for needle in needles:
        assert needle in str(err.value)


def test_validate_records_missing_field_and_good_table() -> None:
    validate_records(make_records())
    records = make_records()
    del records[6]["seconds"]
    with pytest.raises(ValueError, match=r"record 6 \(method 'harp_active'\): missing field 'seconds'"):
        validate_records(records)
    with pytest.raises(ValueError, match="empty"):
        validate_records([])


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    records = make_records()
    records[2]["budget"] = 0
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="record 2"):
        write_report(out, records, config=CONFIG, diagnostics=DIAGNOSTICS)
    assert not out.exists()


def test_write_report_files(written: tuple[Path, dict[str, Path], list[dict]]) -> None:
    out, paths, records = written
    expected = {"results.json", "README.md", *report.FIGURES}
    assert set(paths) == expected
    assert {p.name for p in out.iterdir()} == expected  # no temp files left behind
    for name in report.FIGURES:
        data = paths[name].read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, name
    saved = json.loads(paths["results.json"].read_text())
    assert saved["records"] == records
    assert saved["diagnostics"] == DIAGNOSTICS
    assert saved["config"] == CONFIG


def _section(readme: str, number: str) -> list[str]:
    body = readme.split(f"\n## {number}. ", 1)[1].split("\n## ", 1)[0]
    return body.splitlines()


def _row(lines: list[str], method: str) -> list[str]:
    [line] = [line for line in lines if line.startswith(f"| {method} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_readme_cells(written: tuple[Path, dict[str, Path], list[dict]]) -> None:
    readme = written[1]["README.md"].read_text()
    assert readme.startswith("# HARP selection-quality benchmark\n")
    assert "Pool size 20; seeds [0, 1]; point budgets [2, 5]; wall time 321.5 s" in readme
    main = _section(readme, "1")
    assert main[0] == "Main results at budget 1/10 (2)"
    assert _row(main, "harp_c") == [
        "harp_c",
        "1.5 ± 0.7",
        "0.550 ± 0.071",
        "+10.0 ± 0.0",
        "0.500 ± 0.000 (1 skipped)",
        "0.250 ± 0.354",
        "0.000 ± 0.000",
        "7.0 ± 1.4",
        "1.5 ± 0.7",
    ]
    assert _row(main, "harp_active")[2:5] == ["0.650 ± 0.071", "+20.0 ± 0.0", "1.000 ± 0.000 (1 skipped)"]
    assert _row(main, "full")[1:5] == ["20.0 ± 0.0", "0.550 ± 0.071", "+10.0 ± 0.0", "—"]
    methods = [line.split("|")[1].strip() for line in main if line.startswith("| ") and "---" not in line][1:]
    assert methods == list(report.METHODS)
    assert _row(_section(readme, "2"), "random")[1:] == ["0.500 ± 0.000", "0.400 ± 0.141"]
    sweep = _section(readme, "3")
    assert "| method | 1/10 (2) | 1/4 (5) | 1/1 (20) |" in sweep
    assert _row(sweep, "harp_e") == ["harp_e", "0.500 ± 0.071", "0.650 ± 0.071", "—"]
    assert _row(sweep, "full") == ["full", "—", "—", "0.550 ± 0.071"]
    curve = _section(readme, "4")
    assert "| representatives + active rounds | 1/10 (2) | 2 | 14.5 ± 0.7 | +20.0 ± 0.0 | 2 |" in curve
    assert "| exhaustive | 1/4 (5) | — | 100.0 ± 0.0 | +25.0 ± 7.1 | 2 |" in curve
    assert any(line.startswith("Representatives: harp_c (") for line in curve)
    diag = _section(readme, "5")
    assert "| leaves_total | 42.0 ± 2.8 | 2 |" in diag
    assert "| spearman_posterior_vs_exhaustive | 0.600 ± 0.141 | 2 |" in diag
    for name in report.FIGURES:
        assert f"]({name})" in readme


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report._write_atomic(target, lambda fh: fh.write(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert target.read_text() == "old"
