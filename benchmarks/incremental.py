"""Incremental re-selection as the pool grows: leaves trained, wall time and validated accuracy of a re-run
against a from-scratch run on the same grown pool.

`python -m benchmarks.incremental` (what `make bench-incremental` runs). On the demo (default 20,000
examples): materialise the graph through `run_harp` on one instance; then, `--growths` times, add
`--fraction` of the current pool as a new pool file of the same world (`harp_demo.generator.growth_rows`),
re-run on the same instance (the incremental run), and run the whole graph from scratch on a fresh instance
over the same files (the reference). The scratch instance starts with the incremental one's embedding cache,
so its wall time leaves out embedding: the comparison is against the strictest full run (the incremental run
embeds its new examples itself). Each HARP selection (harp_c, harp_e) of both runs is then LoRA-finetuned
with the demo's validation recipe under each `--val-seeds` seed and scored on the held-out test split.

Validation results are cached under `<work>/cache/` by the exact selected ids and the seed, so an interrupted
benchmark resumes. The report goes to `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("harp.benchmark.incremental")

HARP_METHODS = ("harp_c", "harp_e")


class Home:
    """One Dagster instance with its own pool folder and lineage store, run through `run_harp`."""

    def __init__(self, root: Path, demo: Any) -> None:
        self.root = root
        self.pool_dir = root / "pool"
        self.demo = demo
        if root.exists():
            shutil.rmtree(root)
        self.pool_dir.mkdir(parents=True)

    def add_pool_file(self, name: str, frame: Any) -> None:
        frame.write_parquet(self.pool_dir / name)

    def run(self) -> dict[str, Any]:
        import dagster as dg

        from harp_assets import definitions
        from harp_assets.runner import run_harp
        from harp_resources import LineageResource, PoolSourceResource, default_resources

        os.environ["DAGSTER_HOME"] = str(self.root)
        resources = {
            **default_resources(),
            "pool_source": PoolSourceResource(pool_path=str(self.pool_dir), eval_path=str(self.demo.eval_set)),
            "lineage": LineageResource(root=str(self.root / "harp")),
        }
        defs = dg.Definitions(assets=definitions.defs.assets, asset_checks=definitions.defs.asset_checks,
                              jobs=definitions.defs.jobs, resources=resources)
        lineage = resources["lineage"]
        (self.root / "instance").mkdir(exist_ok=True)
        with dg.DagsterInstance.local_temp(tempdir=str(self.root / "instance")) as instance:
            t0 = time.perf_counter()
            results = run_harp(instance, defs)
            wall = time.perf_counter() - t0
        if not results.get("select") or not results["select"].success:
            raise RuntimeError(f"run_harp in {self.root} did not finish")
        events = [m for r in results["leaf_runs"] for m in r.asset_materializations_for_node("leaf_utilities")]
        trained = sorted(str(m.partition) for m in events if m.metadata["trained"].value)
        hier = {k: v.value for k, v in results["prepare"].asset_materializations_for_node(
            "leaf_hierarchy")[0].metadata.items()}
        sel = lineage.query("SELECT method, example_id FROM latest_selections ORDER BY method, rank")
        selections = {m: sel.filter(sel["method"] == m)["example_id"].to_list() for m in sel["method"].unique()}
        return {
            "wall_seconds": round(wall, 2),
            "stage_seconds": {k: round(v, 2) for k, v in results["seconds"].items()},
            "trained": trained,
            "n_trained": len(trained),
            "examples": int(hier["examples"]),
            "leaves": int(hier["leaves"]),
            "representatives": int(hier["representatives"]),
            "hierarchy": {k: v for k, v in hier.items() if isinstance(v, int | float | str)},
            "selections": selections,
        }

    def embedding_cache(self) -> Path:
        return self.root / "harp" / "artifacts" / "embedding_cache"


class Validator:
    """Test accuracy of the demo's validation recipe trained on a list of example ids, cached by ids and seed."""

    def __init__(self, demo: Any, cache: Path) -> None:
        from harp.contracts import load_eval_set
        from harp.models.device import Device
        from harp.models.evaluator import Evaluator
        from harp.models.finetuner import LoraFinetuner
        from harp_demo.build import VALIDATION_LORA

        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        self.test = load_eval_set(demo.test_set)
        self.finetuner = LoraFinetuner(base_model=str(demo.base_model), device=Device(), **VALIDATION_LORA)
        self.evaluator = Evaluator()
        self.rows: dict[str, tuple[str, str]] = {}

    def add_rows(self, frame: Any) -> None:
        for eid, p, r in frame.select("example_id", "prompt", "response").iter_rows():
            self.rows[eid] = (p, r)

    def accuracy(self, ids: list[str], seed: int) -> float:
        from harp import stages
        from harp.io import write_json

        key = hashlib.sha256(json.dumps([ids, seed]).encode()).hexdigest()[:20]
        path = self.cache / f"validation-{key}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["accuracy"])
        m = stages.validate_examples(self.finetuner, self.evaluator, [self.rows[i][0] for i in ids],
                                     [self.rows[i][1] for i in ids], self.test, seed=seed)
        acc = float(statistics.fmean(m.per_domain.values()))
        write_json(path, {"accuracy": acc, "seconds": m.seconds, "examples": len(ids), "seed": seed})
        log.info("validated %d examples, seed %d: test accuracy %.3f (%.0f s)", len(ids), seed, acc, m.seconds)
        return acc


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "values": [round(v, 4) for v in values]}


def _position(mean: float, spread: dict[str, float]) -> str:
    """Where the incremental run's mean accuracy falls against the scratch run's [min, max] over seeds."""
    return "below" if mean < spread["min"] else "above" if mean > spread["max"] else "within"


def run(pool_size: int, growths: int, fraction: float, val_seeds: list[int], work: Path) -> dict[str, Any]:
    import polars as pl

    from harp.config import demo_root
    from harp_demo.build import build_demo
    from harp_demo.generator import DemoDataConfig, growth_rows

    # The homes below each set DAGSTER_HOME; the demo stays where it was resolved first.
    os.environ["HARP_DEMO_DIR"] = str(demo_root())
    demo = build_demo(demo_root(), pool_size=pool_size, seed=0)
    base = pl.read_parquet(demo.pool)
    validator = Validator(demo, work / "cache")
    validator.add_rows(base)
    base_acc = validator.accuracy([], 0)
    inc = Home(work / "incremental", demo)
    inc.add_pool_file("part-000.parquet", base)
    log.info("full run on %d examples", base.height)
    full = inc.run()
    files = {"part-000.parquet": base}
    steps = []
    for k in range(1, growths + 1):
        n = round(fraction * sum(f.height for f in files.values()))
        rows, _ = growth_rows(DemoDataConfig(pool_size=pool_size, seed=0), n, batch=k)
        frame = pl.DataFrame(rows).select("example_id", "prompt", "response")
        name = f"growth-{k}.parquet"
        files[name] = frame
        validator.add_rows(frame)
        inc.add_pool_file(name, frame)
        log.info("growth %d: %d new examples; incremental re-run", k, n)
        incremental = inc.run()
        scratch_home = Home(work / f"scratch-{k}", demo)
        for fname, f in files.items():
            scratch_home.add_pool_file(fname, f)
        shutil.copytree(inc.embedding_cache(), scratch_home.embedding_cache())
        log.info("growth %d: from-scratch run on %d examples", k, incremental["examples"])
        scratch = scratch_home.run()
        accuracy = {
            run_name: {m: _spread([validator.accuracy(r["selections"].get(m, []), s) for s in val_seeds])
                       for m in HARP_METHODS}
            for run_name, r in (("incremental", incremental), ("scratch", scratch))
        }
        steps.append({
            "growth": k,
            "added": n,
            "pool": incremental["examples"],
            "incremental": {k2: v for k2, v in incremental.items() if k2 != "selections"},
            "scratch": {k2: v for k2, v in scratch.items() if k2 != "selections"},
            "selected": {run_name: {m: len(r["selections"].get(m, [])) for m in HARP_METHODS}
                         for run_name, r in (("incremental", incremental), ("scratch", scratch))},
            "overlap": {m: len(set(incremental["selections"].get(m, [])) & set(scratch["selections"].get(m, [])))
                        for m in HARP_METHODS},
            "trained_share_of_scratch": round(incremental["n_trained"] / max(scratch["n_trained"], 1), 4),
            "trained_share_of_full": round(incremental["n_trained"] / max(full["n_trained"], 1), 4),
            "wall_share_of_scratch": round(incremental["wall_seconds"] / scratch["wall_seconds"], 4),
            "wall_share_of_full": round(incremental["wall_seconds"] / full["wall_seconds"], 4),
            "accuracy": accuracy,
            "vs_scratch_spread": {m: _position(accuracy["incremental"][m]["mean"], accuracy["scratch"][m])
                                  for m in HARP_METHODS},
        })
    return {
        "config": {"pool_size": pool_size, "growths": growths, "fraction": fraction, "val_seeds": val_seeds},
        "base_test_accuracy": round(base_acc, 4),
        "full": {k: v for k, v in full.items() if k != "selections"},
        "steps": steps,
    }


def markdown(report: dict[str, Any]) -> str:
    cfg, full = report["config"], report["full"]
    lines = [
        "# Incremental re-selection as the pool grows",
        "",
        f"Regenerate: `make bench-incremental` (`python -m benchmarks.incremental`). Demo pool of "
        f"{cfg['pool_size']:,} examples, then {cfg['growths']} growths of {cfg['fraction']:.0%} of the pool each "
        f"(new pool files of the same world). Validation: the demo's validation recipe, seeds {cfg['val_seeds']}, "
        f"mean test accuracy over domains; the base model scores {report['base_test_accuracy']:.3f}.",
        "",
        f"Full run on {full['examples']:,} examples: {full['n_trained']} leaves trained of {full['leaves']}, "
        f"{full['wall_seconds']:.0f} s wall (embedding included).",
        "",
        "The scratch run of each step starts with the embedding cache, so its wall time leaves out embedding; the "
        "incremental run embeds its new examples itself.",
        "",
        "| growth | pool | incremental: leaves trained | scratch: leaves trained | trained share | incremental wall | "
        "scratch wall | wall share (vs scratch / vs full) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        i, c = s["incremental"], s["scratch"]
        lines.append(
            f"| {s['growth']} (+{s['added']:,}) | {s['pool']:,} | {i['n_trained']} | {c['n_trained']} | "
            f"{s['trained_share_of_scratch']:.1%} | {i['wall_seconds']:.0f} s | {c['wall_seconds']:.0f} s | "
            f"{s['wall_share_of_scratch']:.1%} / {s['wall_share_of_full']:.1%} |")
    lines += ["", "Validated test accuracy (mean over seeds, [min, max]):", "",
              "| growth | method | incremental | scratch | incremental mean vs scratch [min, max] | selected "
              "(incremental / scratch / shared) |", "|---|---|---|---|---|---|"]
    for s in report["steps"]:
        for m in HARP_METHODS:
            a, b = s["accuracy"]["incremental"][m], s["accuracy"]["scratch"][m]
            lines.append(
                f"| {s['growth']} | {m} | {a['mean']:.3f} [{a['min']:.3f}, {a['max']:.3f}] | {b['mean']:.3f} "
                f"[{b['min']:.3f}, {b['max']:.3f}] | {_position(a['mean'], b)} | "
                f"{s['selected']['incremental'][m]} / {s['selected']['scratch'][m]} / {s['overlap'][m]} |")
    lines += ["", "Hierarchy of each incremental run:", ""]
    for s in report["steps"]:
        h = s["incremental"]["hierarchy"]
        lines.append(
            f"- growth {s['growth']}: {h.get('how')}, {h.get('added_examples')} added, "
            f"{h.get('examples_deferred_to_delta_leaves')} of them deferred to {h.get('delta_leaves_opened')} new "
            f"delta leaves, {h.get('leaves_grown')} leaves grown, {h.get('leaves_split')} split, "
            f"{h.get('leaves')} leaves, {h.get('representatives')} representatives")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__.splitlines()[0])
    ap.add_argument("--pool-size", type=int, default=20_000)
    ap.add_argument("--growths", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--val-seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, default=Path("reports/incremental"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmark/incremental"),
                    help="report path without suffix (.json and .md are written)")
    ap.add_argument("--report-only", action="store_true", help="rewrite <out>.md from <out>.json; run nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        from harp.io import write_text

        report = json.loads(args.out.with_suffix(".json").read_text())
        write_text(args.out.with_suffix(".md"), markdown(report))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("alembic", "dagster"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seeds = [int(s) for s in args.val_seeds.split(",") if s.strip()]
    report = run(args.pool_size, args.growths, args.fraction, seeds, args.work.resolve())
    from harp.io import write_json, write_text

    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
