"""Report writer of the HARP selection-quality benchmark.

The benchmark runs every selection method at several point budgets and seeds and records one result per
(method, budget, seed) (per active round for ``harp_active``). This module checks those records, aggregates
them over seeds (`summarise`, so the numbers can be tested) and writes the report folder (`write_report`):
``results.json`` (the raw records, so any figure can be recomputed), ``README.md`` (the tables) and four
PNG figures. Every file is written atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from harp.io import atomic_write

# Row order of every table: HARP first, then the oracle it is measured against, then the baselines.
METHODS: tuple[str, ...] = ("harp_c", "harp_e", "harp_active", "exhaustive", "less", "tsds", "random", "full")
HARP_VARIANTS: tuple[str, ...] = ("harp_c", "harp_e")
SERIES_REPRESENTATIVES = "representatives"
SERIES_ACTIVE = "representatives + active rounds"
SERIES_EXHAUSTIVE = "exhaustive"
SERIES: tuple[str, ...] = (SERIES_REPRESENTATIVES, SERIES_ACTIVE, SERIES_EXHAUSTIVE)
FIGURES: tuple[str, ...] = (
    "budget_sweep.png",
    "per_domain.png",
    "utility_vs_runs.png",
    "harmful_redundant.png",
)
# Per-record numbers aggregated over seeds, besides accuracy and gain.
COUNT_FIELDS: tuple[str, ...] = ("examples", "train_eval_runs")
SHARE_FIELDS: tuple[str, ...] = ("harmful_share", "redundant_share")

# (field, kind, low, high): kind "int" or "real"; bounds inclusive, None for open.
_FIELDS: tuple[tuple[str, str, float | None, float | None], ...] = (
    ("budget", "int", 1, None),
    ("budget_fraction", "real", None, 1.0),
    ("seed", "int", None, None),
    ("examples", "int", 0, None),
    ("test_accuracy", "real", 0.0, 1.0),
    ("base_accuracy", "real", 0.0, 1.0),
    ("harmful_share", "real", 0.0, 1.0),
    ("redundant_share", "real", 0.0, 1.0),
    ("train_eval_runs", "int", 0, None),
    ("seconds", "real", 0.0, None),
)
_BASE_TOLERANCE = 1e-9
_COLOURS = {
    "harp_c": "#1f77b4",
    "harp_e": "#17becf",
    "harp_active": "#9467bd",
    "exhaustive": "#d62728",
    "less": "#8c564b",
    "tsds": "#ff7f0e",
    "random": "#7f7f7f",
    "full": "#2ca02c",
}


# ----------------------------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    """A finite number (ints count; bools do not, a True accuracy is a bug upstream)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value))


def _round_of(record: Mapping[str, Any]) -> int | None:
    """The active round of a record: its ``round`` for harp_active (1 when absent), None otherwise."""
    if record["method"] != "harp_active":
        return None
    value = record.get("round")
    return 1 if value is None else int(value)


def _check_record(i: int, record: Any) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"record {i}: expected a dict, got {type(record).__name__}")
    if "method" not in record:
        raise ValueError(f"record {i}: missing field 'method'")
    method = record["method"]
    where = f"record {i} (method {method!r})"
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method; expected one of {', '.join(METHODS)}")
    for name, kind, low, high in _FIELDS:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
        value = record[name]
        if kind == "int" and not _is_int(value):
            raise ValueError(f"{where}: field {name!r} must be an int, got {value!r}")
        if kind == "real" and not _is_real(value):
            raise ValueError(f"{where}: field {name!r} must be a finite number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ValueError(f"{where}: field {name!r} = {value!r} is outside [{lo}, {hi}]")
    if not record["budget_fraction"] > 0:
        raise ValueError(f"{where}: field 'budget_fraction' = {record['budget_fraction']!r} must be > 0")
    if method == "full" and float(record["budget_fraction"]) != 1.0:
        raise ValueError(
            f"{where}: field 'budget_fraction' = {record['budget_fraction']!r}; the full pool has 1.0"
        )
    per_domain = record.get("per_domain")
    if per_domain is None:
        raise ValueError(f"{where}: missing field 'per_domain'")
    if not isinstance(per_domain, Mapping) or not per_domain:
        raise ValueError(f"{where}: field 'per_domain' must be a non-empty dict domain -> accuracy")
    for domain, value in per_domain.items():
        if not isinstance(domain, str):
            raise ValueError(f"{where}: field 'per_domain' has a non-string domain {domain!r}")
        if not _is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{where}: field 'per_domain' domain {domain!r} accuracy {value!r} is not in [0, 1]"
            )
    round_value = record.get("round")
    if round_value is not None:
        if method != "harp_active":
            raise ValueError(f"{where}: field 'round' = {round_value!r} is only meaningful for harp_active")
        if not _is_int(round_value) or round_value < 1:
            raise ValueError(f"{where}: field 'round' must be an int >= 1, got {round_value!r}")


def validate_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Reject records the report cannot aggregate honestly, naming the record index, method and field.

    Besides each field's type and range, two records may not describe the same (method, budget, seed, round)
    (seed means would count it twice), and all records of a seed must share one base accuracy (gains of one
    seed are measured against one base model).
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise ValueError(f"records: expected a list of dicts, got {type(records).__name__}")
    if not records:
        raise ValueError("records: the list is empty; there is nothing to report")
    seen: dict[tuple[Any, ...], int] = {}
    base_of_seed: dict[int, tuple[float, int]] = {}
    for i, record in enumerate(records):
        _check_record(i, record)
        method, budget, seed = record["method"], int(record["budget"]), int(record["seed"])
        where = f"record {i} (method {method!r})"
        key = (method, budget, seed, _round_of(record))
        if key in seen:
            round_text = "" if key[3] is None else f", round {key[3]}"
            raise ValueError(
                f"{where}: duplicates record {seen[key]} (budget {budget}, seed {seed}{round_text})"
            )
        seen[key] = i
        base = float(record["base_accuracy"])
        if seed in base_of_seed:
            first_base, first = base_of_seed[seed]
            if abs(base - first_base) > _BASE_TOLERANCE:
                raise ValueError(
                    f"{where}: field 'base_accuracy' = {base!r} differs from {first_base!r} "
                    f"in record {first} of the same seed {seed}"
                )
        else:
            base_of_seed[seed] = (base, i)


def _check_diagnostics(diagnostics: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(diagnostics, (str, bytes)) or not isinstance(diagnostics, Sequence):
        raise ValueError(f"diagnostics: expected a list of dicts, got {type(diagnostics).__name__}")
    for i, entry in enumerate(diagnostics):
        if not isinstance(entry, Mapping):
            raise ValueError(f"diagnostics {i}: expected a dict, got {type(entry).__name__}")
        if "seed" not in entry:
            raise ValueError(f"diagnostics {i}: missing field 'seed'")
        if not _is_int(entry["seed"]):
            raise ValueError(f"diagnostics {i}: field 'seed' must be an int, got {entry['seed']!r}")


# ---------------------------------------------------------------------------------------------- aggregation


def _fraction_key(value: float) -> float:
    """Group budget fractions that differ only by float noise (1428/20000 computed two ways)."""
    return round(float(value), 9)


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample sd over seeds; sd is 0.0 for one seed (no spread measured, not an unknown one)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "sd": sd, "n": int(arr.size)}


def _gain(record: Mapping[str, Any]) -> float:
    return float(record["test_accuracy"]) - float(record["base_accuracy"])


def _last_rounds(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """All records, with harp_active reduced to its last round per (budget, seed): what the tables show."""
    last: dict[tuple[int, int], Mapping[str, Any]] = {}
    out: list[Mapping[str, Any]] = []
    for record in records:
        if record["method"] != "harp_active":
            out.append(record)
            continue
        key = (int(record["budget"]), int(record["seed"]))
        if key not in last or _round_of(record) > _round_of(last[key]):  # type: ignore[operator]
            last[key] = record
    return out + list(last.values())


def _oracle_fraction(
    records: Sequence[Mapping[str, Any]], oracle: Mapping[tuple[int, int], Mapping[str, Any]]
) -> dict[str, Any]:
    """Mean over seeds of the method's gain over the oracle's gain at the same budget and seed.

    A seed whose oracle gain is <= 0 is skipped (the ratio is meaningless there) and counted; a record with
    no oracle run at its budget (the full pool) is counted as missing.
    """
    ratios: list[float] = []
    skipped = missing = 0
    for record in records:
        best = oracle.get((int(record["budget"]), int(record["seed"])))
        if best is None:
            missing += 1
            continue
        oracle_gain = _gain(best)
        if oracle_gain <= 0:
            skipped += 1
            continue
        ratios.append(_gain(record) / oracle_gain)
    return {**_stat(ratios), "skipped": skipped, "missing": missing}


def _group_stats(
    method: str,
    fraction: float,
    records: Sequence[Mapping[str, Any]],
    oracle: Mapping[tuple[int, int], Mapping[str, Any]],
) -> dict[str, Any]:
    records = sorted(records, key=lambda r: (int(r["seed"]), int(r["budget"])))
    domains = sorted({d for r in records for d in r["per_domain"]})
    group: dict[str, Any] = {
        "method": method,
        "budget_fraction": fraction,
        "budgets": sorted({int(r["budget"]) for r in records}),
        "seeds": [int(r["seed"]) for r in records],
        "n": len(records),
        "test_accuracy": _stat([float(r["test_accuracy"]) for r in records]),
        "gain": _stat([_gain(r) for r in records]),
        "per_domain": {
            d: _stat([float(r["per_domain"][d]) for r in records if d in r["per_domain"]]) for d in domains
        },
        "oracle_fraction": _oracle_fraction(records, oracle),
    }
    for name in (*COUNT_FIELDS, *SHARE_FIELDS, "seconds"):
        group[name] = _stat([float(r[name]) for r in records])
    return group


def _curve(records: Sequence[Mapping[str, Any]], *, by_round: bool) -> list[dict[str, Any]]:
    """Seed-averaged (train-eval runs, gain) points, one per budget fraction (and round when by_round)."""
    buckets: dict[tuple[float, int | None], list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        key = (_fraction_key(record["budget_fraction"]), _round_of(record) if by_round else None)
        buckets[key].append(record)
    points = []
    for (fraction, round_number), bucket in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        points.append(
            {
                "budget_fraction": fraction,
                "budgets": sorted({int(r["budget"]) for r in bucket}),
                "round": round_number,
                "n": len(bucket),
                "train_eval_runs": _stat([float(r["train_eval_runs"]) for r in bucket]),
                "gain": _stat([_gain(r) for r in bucket]),
            }
        )
    return points


def _main_fraction(fractions_by_method: Mapping[str, set[float]], requested: float | None) -> float:
    """The budget fraction present in the records nearest to the requested one (the full pool aside)."""
    candidates = sorted({f for m, fs in fractions_by_method.items() if m != "full" for f in fs})
    if not candidates:
        candidates = sorted({f for fs in fractions_by_method.values() for f in fs})
    if requested is None:
        return candidates[0]
    return min(candidates, key=lambda f: (abs(f - float(requested)), f))


def _diagnostic_stats(diagnostics: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and sd over seeds of every numeric diagnostic (non-finite values are left out and not counted)."""
    values: dict[str, list[float]] = {}
    integral: dict[str, bool] = {}
    for entry in diagnostics:
        for key, value in entry.items():
            if key == "seed" or not _is_real(value):
                continue
            values.setdefault(key, []).append(float(value))
            integral[key] = integral.get(key, True) and _is_int(value)
    return {key: {**_stat(vals), "integral": integral[key]} for key, vals in values.items()}


def summarise(
    records: Sequence[Mapping[str, Any]],
    diagnostics: Sequence[Mapping[str, Any]],
    *,
    main_budget_fraction: float | None = None,
) -> dict[str, Any]:
    """The numbers the README shows, aggregated over seeds, so that they can be checked on their own.

    Returns a dict with:
    - ``groups[method][budget_fraction]``: per group ``test_accuracy``, ``gain`` (accuracy minus base, as a
      fraction), ``examples``, ``harmful_share``, ``redundant_share``, ``train_eval_runs``, ``seconds`` (each
      ``{"mean", "sd", "n"}``), ``per_domain[domain]`` likewise, ``oracle_fraction`` (``mean``, ``sd``,
      ``n``, ``skipped``: seeds whose oracle gain was <= 0, ``missing``: seeds with no oracle run at that
      budget), and ``budgets``/``seeds``. harp_active counts its last round per (budget, seed) here.
    - ``main_budget_fraction``: the fraction present nearest to the requested one (the smallest when none
      is requested); ``main_rows[method]``: the fraction each table row uses (the full pool its own 1.0).
    - ``harp_variant``: harp_c or harp_e, whichever has the higher mean accuracy at the main budget (ties go
      to harp_c); None when neither ran.
    - ``utility_vs_runs[series]``: seed-averaged points (``budget_fraction``, ``round``,
      ``train_eval_runs``, ``gain``) for "representatives" (the chosen variant), "representatives + active
      rounds" (every harp_active round) and "exhaustive".
    - ``diagnostics[key]``: mean and sd of every numeric diagnostics key but ``seed``.
    - ``budget_fractions``, ``budgets`` (fraction -> budgets seen), ``seeds``, ``domains``, ``methods``
      (present, in table order) and ``base_accuracy`` (over seeds).
    """
    validate_records(records)
    _check_diagnostics(diagnostics)
    table_records = _last_rounds(records)
    buckets: dict[tuple[str, float], list[Mapping[str, Any]]] = defaultdict(list)
    for record in table_records:
        buckets[(record["method"], _fraction_key(record["budget_fraction"]))].append(record)
    oracle = {(int(r["budget"]), int(r["seed"])): r for r in records if r["method"] == "exhaustive"}
    methods = [m for m in METHODS if any(key[0] == m for key in buckets)]
    groups: dict[str, dict[float, dict[str, Any]]] = {}
    for method in methods:
        fractions = sorted(f for m, f in buckets if m == method)
        groups[method] = {f: _group_stats(method, f, buckets[(method, f)], oracle) for f in fractions}

    requested = None if main_budget_fraction is None else float(main_budget_fraction)
    main = _main_fraction({m: set(g) for m, g in groups.items()}, requested)
    main_rows: dict[str, float] = {}
    for method in methods:
        if main in groups[method]:
            main_rows[method] = main
        elif method == "full":
            main_rows[method] = max(groups[method])

    present = [v for v in HARP_VARIANTS if main in groups.get(v, {})]
    harp_variant = None
    if present:
        harp_variant = max(
            present, key=lambda v: (groups[v][main]["test_accuracy"]["mean"], -present.index(v))
        )
    utility = {
        SERIES_REPRESENTATIVES: {
            "method": harp_variant,
            "points": _curve([r for r in records if r["method"] == harp_variant], by_round=False),
        },
        SERIES_ACTIVE: {
            "method": "harp_active",
            "points": _curve([r for r in records if r["method"] == "harp_active"], by_round=True),
        },
        SERIES_EXHAUSTIVE: {
            "method": "exhaustive",
            "points": _curve([r for r in records if r["method"] == "exhaustive"], by_round=False),
        },
    }

    budgets: dict[float, set[int]] = defaultdict(set)
    for record in records:
        budgets[_fraction_key(record["budget_fraction"])].add(int(record["budget"]))
    base_by_seed = {int(r["seed"]): float(r["base_accuracy"]) for r in records}
    return {
        "methods": methods,
        "seeds": sorted(base_by_seed),
        "domains": sorted({d for r in records for d in r["per_domain"]}),
        "budget_fractions": sorted(budgets),
        "budgets": {f: sorted(b) for f, b in sorted(budgets.items())},
        "base_accuracy": _stat([base_by_seed[s] for s in sorted(base_by_seed)]),
        "requested_main_budget_fraction": requested,
        "main_budget_fraction": main,
        "main_rows": main_rows,
        "harp_variant": harp_variant,
        "groups": groups,
        "utility_vs_runs": utility,
        "diagnostics": _diagnostic_stats(diagnostics),
    }


# ----------------------------------------------------------------------------------------------- formatting


def _clean(value: float, digits: int) -> float:
    """Drop the sign of a value that rounds to zero, so tables never show -0.0."""
    return 0.0 if round(value, digits) == 0 else value


def _pm(stat: Mapping[str, Any] | None, digits: int, *, scale: float = 1.0, signed: bool = False) -> str:
    if stat is None or stat.get("mean") is None:
        return "—"
    mean = _clean(stat["mean"] * scale, digits)
    sd = _clean(stat["sd"] * scale, digits)
    head = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{head} ± {sd:.{digits}f}"


def _budget_text(budgets: Sequence[int]) -> str:
    return str(budgets[0]) if len(budgets) == 1 else f"{budgets[0]}–{budgets[-1]}"


def fraction_label(fraction: float, budgets: Sequence[int] = ()) -> str:
    """A budget fraction as "1/14", with its point budget when known: "1/14 (1428)"."""
    label = f"1/{round(1.0 / fraction)}"
    return f"{label} ({_budget_text(budgets)})" if budgets else label


def _oracle_cell(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "—"
    notes = []
    if stat["skipped"]:
        notes.append(f"{stat['skipped']} skipped")
    if stat["missing"]:
        notes.append(f"{stat['missing']} without oracle")
    return _pm(stat, 3) + (f" ({', '.join(notes)})" if notes else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _config_paragraph(config: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    full_budgets = sorted({b for f, bs in summary["budgets"].items() if f == 1.0 for b in bs})
    pool = config.get("pool_size", _budget_text(full_budgets) if full_budgets else "not recorded")
    seeds = config.get("seeds", summary["seeds"])
    budgets = config.get("budgets")
    if budgets is None:
        budgets = sorted({b for bs in summary["budgets"].values() for b in bs})
    seconds = config.get("total_seconds")
    wall = f"{float(seconds):.1f} s ({float(seconds) / 60:.1f} min)" if _is_real(seconds) else "not recorded"
    recipe = config.get("recipe")
    if isinstance(recipe, Mapping):
        recipe_text = ", ".join(f"{k}={v}" for k, v in sorted(recipe.items(), key=lambda kv: str(kv[0])))
    else:
        recipe_text = "not recorded" if recipe is None else str(recipe)
    main = summary["main_budget_fraction"]
    main_budgets = summary["budgets"].get(main, [])
    requested = summary["requested_main_budget_fraction"]
    requested_text = (
        "none was configured, so the smallest budget is used"
        if requested is None
        else f"configured {requested:g}, nearest present {main:g}"
    )
    return (
        f"Pool size {pool}; seeds {seeds}; point budgets {budgets}; wall time {wall}. "
        f"Finetuning recipe: {recipe_text}. Main budget {fraction_label(main, main_budgets)} "
        f"({requested_text}). Means ± sample sd over seeds; gains are test accuracy minus the base model's, "
        f"in points. The full config and every record are in `results.json`."
    )


def render_readme(summary: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The README text for a summary: config, main table, per-domain, sweep, utility-vs-runs, diagnostics."""
    groups = summary["groups"]
    main = summary["main_budget_fraction"]
    main_label = fraction_label(main, summary["budgets"].get(main, []))
    rows_at_main = [(m, groups[m][f]) for m, f in summary["main_rows"].items()]
    lines = [
        "# HARP selection-quality benchmark",
        "",
        _config_paragraph(config, summary),
        "",
        f"## 1. Main results at budget {main_label}",
        "",
        f"Base model test accuracy {_pm(summary['base_accuracy'], 3)}. The full pool is shown at its own size.",
        "",
    ]
    header = [
        "method",
        "examples",
        "test accuracy",
        "gain over base (points)",
        "fraction of oracle gain",
        "harmful share",
        "redundant share",
        "train-eval runs",
        "seconds",
    ]
    rows = [
        [
            m,
            _pm(g["examples"], 1),
            _pm(g["test_accuracy"], 3),
            _pm(g["gain"], 1, scale=100.0, signed=True),
            _oracle_cell(g["oracle_fraction"]),
            _pm(g["harmful_share"], 3),
            _pm(g["redundant_share"], 3),
            _pm(g["train_eval_runs"], 1),
            _pm(g["seconds"], 1),
        ]
        for m, g in rows_at_main
    ]
    lines += _table(header, rows)
    lines += [
        "",
        "Fraction of oracle gain: mean over seeds of (accuracy − base) / (exhaustive accuracy − base) at the "
        "same budget and seed; seeds where the exhaustive oracle gained nothing (<= 0) are skipped and counted. "
        "harp_active shows its last round.",
        "",
        f"## 2. Per-domain test accuracy at budget {main_label}",
        "",
    ]
    domains = summary["domains"]
    lines += _table(
        ["method", *domains],
        [[m, *(_pm(g["per_domain"].get(d), 3) for d in domains)] for m, g in rows_at_main],
    )
    fractions = summary["budget_fractions"]
    lines += ["", "## 3. Budget sweep: test accuracy", ""]
    lines += _table(
        ["method", *(fraction_label(f, summary["budgets"][f]) for f in fractions)],
        [
            [m, *(_pm(groups[m][f]["test_accuracy"], 3) if f in groups[m] else "—" for f in fractions)]
            for m in summary["methods"]
        ],
    )
    variant = summary["harp_variant"]
    lines += [
        "",
        "## 4. Utility versus train-evaluate runs",
        "",
        f"Representatives: {variant or 'no HARP variant ran'} (the HARP variant with the higher mean accuracy "
        f"at the main budget); active rounds: harp_active, one point per round. Each point is a seed mean.",
        "",
    ]
    curve_rows = []
    for series in SERIES:
        for p in summary["utility_vs_runs"][series]["points"]:
            curve_rows.append(
                [
                    series,
                    fraction_label(p["budget_fraction"], p["budgets"]),
                    "—" if p["round"] is None else str(p["round"]),
                    _pm(p["train_eval_runs"], 1),
                    _pm(p["gain"], 1, scale=100.0, signed=True),
                    str(p["n"]),
                ]
            )
    lines += _table(
        ["series", "budget", "round", "train-eval runs", "gain over base (points)", "seeds"], curve_rows
    )
    lines += ["", "## 5. Diagnostics", ""]
    diag = summary["diagnostics"]
    if diag:
        lines += _table(
            ["diagnostic", "mean ± sd", "seeds"],
            [[k, _pm(s, 1 if s["integral"] else 3), str(s["n"])] for k, s in diag.items()],
        )
    else:
        lines.append("No numeric diagnostics were recorded.")
    lines += ["", "## Figures", ""]
    titles = {
        "budget_sweep.png": "Budget sweep",
        "per_domain.png": "Per-domain accuracy",
        "utility_vs_runs.png": "Utility versus train-evaluate runs",
        "harmful_redundant.png": "Harmful and redundant share",
    }
    for name in FIGURES:
        lines += [f"![{titles[name]}]({name})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the records", ha="center", va="center", transform=ax.transAxes)


def _save_figure(fig: Any, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.tight_layout()
        _write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110, metadata={"Software": None}))
    finally:
        plt.close(fig)


def plot_budget_sweep(summary: Mapping[str, Any], path: Path) -> None:
    """Accuracy against budget fraction per method (error bars: sd), full pool and base model as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    groups = summary["groups"]
    ticks: set[float] = set()
    for method in summary["methods"]:
        if method == "full":
            continue
        fractions = sorted(groups[method])
        ticks.update(fractions)
        means = [groups[method][f]["test_accuracy"]["mean"] for f in fractions]
        sds = [groups[method][f]["test_accuracy"]["sd"] for f in fractions]
        ax.errorbar(fractions, means, yerr=sds, marker="o", capsize=3, label=method, color=_COLOURS[method])
    if "full" in groups:
        stat = groups["full"][max(groups["full"])]["test_accuracy"]
        ax.axhline(stat["mean"], color=_COLOURS["full"], label=f"full pool ({stat['mean']:.3f})")
        ax.axhspan(stat["mean"] - stat["sd"], stat["mean"] + stat["sd"], color=_COLOURS["full"], alpha=0.12)
    base = summary["base_accuracy"]["mean"]
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base model ({base:.3f})")
    if ticks:
        ax.set_xscale("log")
        ax.minorticks_off()
        ordered = sorted(ticks)
        ax.set_xticks(ordered)
        ax.set_xticklabels([fraction_label(f) for f in ordered])
    ax.set_xlabel("budget (fraction of the pool)")
    ax.set_ylabel("test accuracy (mean over domains)")
    ax.set_title("Budget sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save_figure(fig, path)


def plot_per_domain(summary: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: per-domain test accuracy of each method at the main budget (error bars: sd)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(summary["domains"]) + 3), 4.8))
    rows = [(m, summary["groups"][m][f]) for m, f in summary["main_rows"].items()]
    domains = summary["domains"]
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(domains))
    for k, (method, group) in enumerate(rows):
        stats = [group["per_domain"].get(d) for d in domains]
        means = [s["mean"] if s else np.nan for s in stats]
        sds = [s["sd"] if s else 0.0 for s in stats]
        ax.bar(
            x + (k - (len(rows) - 1) / 2) * width,
            means,
            width,
            yerr=sds,
            capsize=2,
            label=method,
            color=_COLOURS[method],
        )
    ax.axhline(
        summary["base_accuracy"]["mean"], color="black", linestyle="--", linewidth=1, label="base model"
    )
    ax.set_xticks(x)
    ax.set_xticklabels(domains)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Per-domain accuracy at budget {fraction_label(summary['main_budget_fraction'])}")
    ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)


def plot_utility_vs_runs(summary: Mapping[str, Any], path: Path) -> None:
    """Gain over base against train-evaluate runs for the three series; active rounds joined per budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    styles = {
        SERIES_REPRESENTATIVES: ("o", _COLOURS.get(summary["harp_variant"] or "harp_c", "#1f77b4")),
        SERIES_ACTIVE: ("s", _COLOURS["harp_active"]),
        SERIES_EXHAUSTIVE: ("^", _COLOURS["exhaustive"]),
    }
    xs: list[float] = []
    for series in SERIES:
        points = summary["utility_vs_runs"][series]["points"]
        marker, colour = styles[series]
        # Representatives and the oracle form one curve across budgets; active rounds one per budget.
        lines: dict[float | None, list[dict[str, Any]]] = defaultdict(list)
        for p in points:
            lines[p["budget_fraction"] if series == SERIES_ACTIVE else None].append(p)
        label: str | None = series
        for line in lines.values():
            line = sorted(line, key=lambda p: p["train_eval_runs"]["mean"])
            x = [p["train_eval_runs"]["mean"] for p in line]
            y = [100.0 * p["gain"]["mean"] for p in line]
            yerr = [100.0 * p["gain"]["sd"] for p in line]
            ax.errorbar(x, y, yerr=yerr, marker=marker, color=colour, capsize=3, label=label)
            label = None
            xs += x
            for p, xi, yi in zip(line, x, y, strict=True):
                text = fraction_label(p["budget_fraction"])
                if p["round"] is not None:
                    text += f" r{p['round']}"
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not xs:
        _no_data(ax, "train-evaluate runs")
    elif min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("train-evaluate runs used for selection")
    ax.set_ylabel("gain over base (points)")
    ax.set_title("Utility versus train-evaluate runs")
    ax.grid(alpha=0.3)
    if xs:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save_figure(fig, path)


def plot_harmful_redundant(summary: Mapping[str, Any], path: Path) -> None:
    """Grouped bars: harmful and redundant share of each method's selection at the main budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = [(m, summary["groups"][m][f]) for m, f in summary["main_rows"].items()]
    x = np.arange(len(rows))
    for k, (field, colour) in enumerate((("harmful_share", "#d62728"), ("redundant_share", "#ff7f0e"))):
        means = [g[field]["mean"] for _, g in rows]
        sds = [g[field]["sd"] for _, g in rows]
        ax.bar(
            x + (k - 0.5) * 0.38,
            means,
            0.38,
            yerr=sds,
            capsize=2,
            color=colour,
            label=field.replace("_", " "),
        )
    ax.set_xticks(x)
    ax.set_xticklabels([m for m, _ in rows])
    ax.set_ylim(bottom=0.0)
    ax.set_ylabel("share of the selected examples")
    ax.set_title(f"Harmful and redundant share at budget {fraction_label(summary['main_budget_fraction'])}")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- writing


def _write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Readers see the old report file or the new one, never half (`harp.io.atomic_write`)."""
    with atomic_write(path) as fh:
        write(fh)


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON values (numpy scalars and paths converted, non-finite floats as null); else a TypeError."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {k: _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"results.json: {where} is a {type(value).__name__} ({value!r}), which JSON cannot hold")


def write_report(
    out_dir: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    *,
    config: Mapping[str, Any],
    diagnostics: Sequence[Mapping[str, Any]],
) -> dict[str, Path]:
    """Validate, aggregate and write the report folder; returns the written paths by file name.

    Everything is computed before the first file is written, so bad input leaves the folder untouched; the
    figures go first and README.md last, so a README is only there with the files it links to.
    """
    validate_records(records)
    _check_diagnostics(diagnostics)
    if not isinstance(config, Mapping):
        raise ValueError(f"config: expected a dict, got {type(config).__name__}")
    payload = {
        "config": _jsonable(config, "config"),
        "diagnostics": _jsonable(list(diagnostics), "diagnostics"),
        "records": _jsonable(list(records), "records"),
    }
    results_text = json.dumps(payload, sort_keys=True, indent=2, allow_nan=False) + "\n"
    requested = config.get("main_budget_fraction")
    if requested is not None and not _is_real(requested):
        raise ValueError(f"config: 'main_budget_fraction' must be a number, got {requested!r}")
    summary = summarise(records, diagnostics, main_budget_fraction=requested)
    readme_text = render_readme(summary, config)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    plots = {
        "budget_sweep.png": plot_budget_sweep,
        "per_domain.png": plot_per_domain,
        "utility_vs_runs.png": plot_utility_vs_runs,
        "harmful_redundant.png": plot_harmful_redundant,
    }
    for name in FIGURES:
        paths[name] = out / name
        plots[name](summary, paths[name])
    for name, text in (("results.json", results_text), ("README.md", readme_text)):
        paths[name] = out / name
        data = text.encode("utf-8")
        _write_atomic(paths[name], lambda fh, data=data: fh.write(data))
    return paths
