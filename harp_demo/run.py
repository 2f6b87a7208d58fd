"""The one-command demo: build (or reuse) the demo benchmark, materialise the whole graph, print a summary.

`python -m harp_demo.run [--pool-size N] [--seed S]` (what `make demo` runs). The demo goes to the
definitions' default location (`HARP_DEMO_DIR`, else `$DAGSTER_HOME/demo`), is rebuilt only when its
configuration changes, and the graph runs through `run_harp` on the `DAGSTER_HOME` instance, so a second
call with nothing changed trains no leaf. The graph runs as `harp-dagster run` on the demo's files (the same
code path: input checks, runs under the code location's jobs, progress bars, exports into
`$DAGSTER_HOME/exports`). The summary is read back from the run results and the lineage tables, never
recomputed here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_POOL_SIZE = 20_000


def _metadata(result: Any, node: str) -> dict[str, Any]:
    """The metadata values of the first materialisation of `node` in an in-process run result."""
    mats = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mats[0].metadata.items()} if mats else {}


def _leaf_events(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The metadata of every leaf partition materialised by the leaf runs of one `run_harp` call."""
    return [{k: v.value for k, v in m.metadata.items()}
            for r in results.get("leaf_runs", []) for m in r.asset_materializations_for_node("leaf_utilities")]


def step_seconds(instance: Any, results: dict[str, Any]) -> dict[str, float]:
    """Wall seconds of every step (one per stage) in the runs of one `run_harp` call, from Dagster's step stats."""
    from harp_assets.jobs import ALL_ASSETS

    stages = [a.key.to_user_string() for a in ALL_ASSETS]
    runs = [results["prepare"], *results.get("leaf_runs", []), *results.get("select_runs", [results["select"]])]
    out: dict[str, float] = {}
    for run in runs:
        for stat in instance.get_run_step_stats(run.run_id):
            if stat.start_time is not None and stat.end_time is not None:
                key = stat.step_key if stat.step_key in stages else "asset_checks"
                out[key] = out.get(key, 0.0) + stat.end_time - stat.start_time
    return {k: out[k] for k in [*stages, "asset_checks"] if k in out}


def dagster_overhead(instance: Any, results: dict[str, Any]) -> dict[str, float] | None:
    """What Dagster adds around the leaf train-evaluate cycles: the leaf runs' wall time (run start to end,
    from the instance) minus the cycles' own seconds, per trained partition and as a share of the cycles."""
    runs = results.get("leaf_runs", [])
    events = _leaf_events(results)
    trained = sum(bool(m["trained"]) for m in events)
    cycles = sum(float(m["train_eval_seconds"]) for m in events)
    if not trained or cycles <= 0:
        return None
    wall = 0.0
    for r in runs:
        stats = instance.get_run_stats(r.run_id)
        wall += float(stats.end_time - stats.start_time)
    extra = max(wall - cycles, 0.0)
    return {
        "leaf_run_seconds": round(wall, 3),
        "train_eval_seconds": round(cycles, 3),
        "per_partition_seconds": round(extra / trained, 4),
        "percent_of_train_eval": round(100.0 * extra / cycles, 2),
    }


def summarise(results: dict[str, Any], lineage: Any, instance: Any) -> dict[str, Any]:
    """The demo's figures from `run_harp`'s results, the runs' step stats and the newest run manifest."""
    leaf_md = _leaf_events(results)
    select = results["select"]
    from harp_assets.selections import METHODS, newest_selection

    sizes = {m: len(got[1]) for m in METHODS if (got := newest_selection(instance, lineage, m)) is not None}
    manifest = lineage.query("SELECT * FROM run_manifests ORDER BY created_at DESC LIMIT 1")
    if manifest.height == 0:
        raise RuntimeError(f"no run manifest in {lineage.catalog_path}: the lineage_catalog asset did not run")
    row = manifest.row(0, named=True)
    hier = _metadata(results["prepare"], "leaf_hierarchy")
    return {
        "selection_sizes": sizes,
        "predicted_per_domain": {
            method: _metadata(select, f"{method}_selection").get("predicted_per_domain", {})
            for method in ("harp_c", "harp_e")
        },
        # The prediction with its band and saturated domains, and why a selection came out empty.
        "predicted_summary": {
            method: _metadata(select, f"{method}_selection").get("predicted_summary", "(none)")
            for method in ("harp_c", "harp_e")
        },
        "empty_reasons": {
            method: why for method in METHODS if (why := _metadata(select, f"{method}_selection").get("empty_reason"))
        },
        "train_eval_runs_this_call": sum(bool(m["trained"]) for m in leaf_md),
        "leaves_skipped_up_to_date": sum(not m["trained"] for m in leaf_md),
        "train_eval_runs_stored": int(row["leaves_stored"]),
        "leaves_measured_current": int(row["leaves_measured"]),
        "leaves_total": int(row["leaves_total"]),
        "representatives": hier.get("representatives"),
        "examples": int(row["examples"]),
        "pool_version": row["pool_version"],
        "stage_seconds": {k: round(v, 2) for k, v in step_seconds(instance, results).items()},
        "stage_seconds_in_manifest": json.loads(row["seconds_json"]),
        "job_seconds": {k: round(v, 2) for k, v in results["seconds"].items()},
        "dagster_overhead": dagster_overhead(instance, results),
        "duckdb": str(lineage.catalog_path),
        "run_id": row["run_id"],
    }


def _print_summary(s: dict[str, Any], demo_seconds: float, total_seconds: float) -> None:
    print("\nHARP demo: summary")
    print(f"  examples in pool        {s['examples']}  (pool version {s['pool_version']})")
    print("  selection sizes         " + ", ".join(f"{m}={n}" for m, n in s["selection_sizes"].items()))
    for method, line in s["predicted_summary"].items():
        print(f"  predicted utility {method:<7}{line}")
    for method, why in s["empty_reasons"].items():
        print(f"  empty selection {method:<9}{why}")
    print(f"  train-evaluate runs     {s['train_eval_runs_this_call']} this call "
          f"({s['leaves_skipped_up_to_date']} leaves skipped, up to date); {s['train_eval_runs_stored']} stored "
          f"for {s['leaves_total']} leaves in the hierarchy ({s['representatives']} representatives, "
          f"{s['leaves_measured_current']} measured and current)")
    print("  wall time per stage (s) " + ", ".join(f"{k}={v:.2f}" for k, v in s["stage_seconds"].items()))
    print("  wall time per job (s)   " + ", ".join(f"{k}={v:.2f}" for k, v in s["job_seconds"].items())
          + f", demo build={demo_seconds:.2f}, total={total_seconds:.2f}")
    if s.get("dagster_overhead"):
        o = s["dagster_overhead"]
        print(f"  Dagster overhead        {o['per_partition_seconds']:.3f} s per leaf partition, "
              f"{o['percent_of_train_eval']:.2f}% of the {o['train_eval_seconds']:.1f} s of train-evaluate cycles")
    print(f"  DuckDB catalog          {s['duckdb']}  (open read-only: duckdb -readonly {s['duckdb']})")
    if s.get("event_log"):
        print(f"  event log               {s['event_log']}  (Dagster's DEBUG lines of this call)")


def _print_validation(vres: dict[str, Any], lineage: Any) -> dict[str, Any]:
    """The validation table (newest validation run) and the exhaustive oracle's agreement figures."""
    ex = _metadata(vres["validate"], "exhaustive_selection")
    val = _metadata(vres["validate"], "selection_validation")
    rows = lineage.query(
        "SELECT method, any_value(examples) AS examples, avg(accuracy) AS accuracy, avg(base_accuracy) AS base, "
        "any_value(harmful_share) AS harmful, any_value(redundant_share) AS redundant FROM validation_results "
        "WHERE validation_id = $vid GROUP BY method ORDER BY accuracy DESC", {"vid": val["validation_id"]})
    print("\nHARP demo: validation on the held-out test split")
    for r in rows.iter_rows(named=True):
        shares = (f", harmful {r['harmful']:.2f}, redundant {r['redundant']:.2f}" if r["harmful"] is not None else "")
        print(f"  {r['method']:<11} {r['examples']:>6} examples  test accuracy {r['accuracy']:.3f} "
              f"({100 * (r['accuracy'] - r['base']):+.1f} points){shares}")
    print(f"  exhaustive oracle: {ex.get('train_eval_runs')} leaves measured; Spearman(HARP posterior, measured "
          f"effect) = {ex.get('spearman_posterior_vs_exhaustive')}, on inferred leaves "
          f"{ex.get('spearman_inferred_leaves')}")
    return {"results": rows.to_dicts(), "exhaustive": ex, "seconds": vres["seconds"]}


def demo_command(home: Path, demo_dir: Path) -> list[str]:
    """`harp-dagster run`'s arguments on the demo's files (or HARP_POOL, HARP_EVAL, HARP_BASE_MODEL), with the
    default settings' budget and seed, into the instance `home`; the exports go to `home/exports`."""
    from harp.config import HarpSettings
    from harp.sources import PoolSource

    source = PoolSource.from_env_or_demo(demo_dir)
    settings = HarpSettings()
    return ["run", "--pool", str(source.resolved_pool_path()), "--eval", str(source.resolved_eval_path()),
            "--base-model", os.environ.get("HARP_BASE_MODEL") or str(demo_dir / "base_model"),
            "--budget", str(settings.top_k_points), "--seed", str(settings.seed), "--home", str(home),
            "--out", str(home / "exports"), "--cpu-threads", os.environ.get("HARP_CPU_THREADS") or "0"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harp_demo.run", description=__doc__.splitlines()[0])
    ap.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE, help="demo pool size (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="demo data and base-model seed (default %(default)s)")
    ap.add_argument("--no-build", action="store_true",
                    help="build nothing: use the data already configured (an existing demo folder, or HARP_POOL, "
                    "HARP_EVAL and HARP_BASE_MODEL)")
    ap.add_argument("--json", action="store_true", help="also print the summary as one JSON object")
    ap.add_argument("--validate", action="store_true",
                    help="then run the validation group: measure every leaf (the exhaustive oracle) and score each "
                    "selection and the full pool on the held-out test split")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    t_start = time.perf_counter()
    try:
        from harp.config import dagster_home, demo_root
        from harp.io import check_writable

        home = dagster_home()
        home.mkdir(parents=True, exist_ok=True)
        check_writable(home)  # a read-only or full home fails here, naming it, not deep inside sqlite
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from harp_demo.build import build_demo

    demo_dir = demo_root()
    t0 = time.perf_counter()
    if not args.no_build:
        print(f"demo data: {demo_dir} (pool {args.pool_size}, seed {args.seed}; reused when already built)")
        try:
            build_demo(demo_dir, pool_size=args.pool_size, seed=args.seed)
        except (ValueError, OSError) as exc:
            print(f"error: building the demo in {demo_dir} failed: {exc}", file=sys.stderr)
            return 1
    demo_seconds = time.perf_counter() - t0

    import dagster as dg

    from harp_assets import cli
    from harp_assets.console import RunConsole
    from harp_assets.runner import root_cause

    argv = demo_command(home, demo_dir)
    print("materialising the HARP graph: harp-dagster " + shlex.join(argv))
    try:
        selected = cli.execute(cli.parser().parse_args(argv))
    except cli.UsageError as exc:  # bad demo inputs: the contract error the check raised, by its own name
        shown = root_cause(exc.__context__) if exc.__context__ is not None else str(exc)
        print(f"error: the HARP pipeline failed: {shown}", file=sys.stderr)
        return 1
    except Exception as exc:  # a failing step raises out of the run
        print(f"error: the HARP pipeline failed: {root_cause(exc)}", file=sys.stderr)
        return 1
    lineage = selected.definitions.resources["lineage"]
    with dg.DagsterInstance.get() as instance:
        summary = summarise(selected.results, lineage, instance)
        summary["event_log"] = str(selected.log_file)
        _print_summary(summary, demo_seconds, time.perf_counter() - t_start)
        if args.validate:
            from harp_assets.runner import run_validation

            print("validation: measuring every leaf (exhaustive oracle), then each selection on the test split")
            try:
                with RunConsole(home) as console:
                    vres = run_validation(instance, selected.definitions, events=console.events)
            except Exception as exc:
                print(f"error: the validation group failed: {root_cause(exc)}", file=sys.stderr)
                return 1
            if not vres.get("validate") or not vres["validate"].success:
                print("error: the validation group did not finish; see the run in `make ui`", file=sys.stderr)
                return 1
            summary["validation"] = _print_validation(vres, lineage)
            print(f"  event log               {console.path}")
    if args.json:
        print(json.dumps({**summary, "demo_seconds": round(demo_seconds, 2)}, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
