"""Leaves per minute in process and on Ray actors, and what Ray adds to each leaf.

`python -m benchmarks.ray_leaves` (what `make bench-ray` runs). On the demo (built by `make demo-data` if
absent), `--leaves` leaves of `--leaf-size` pool rows each (consecutive slices of the pool: this measures
throughput, not selection, and a demo leaf holds about 100 examples) are measured with the demo's LoRA recipe:

- `local`, 1 thread: the in-process loop on one torch thread (the reference the actors must equal);
- `local`, 2 threads: the in-process loop as a step runs it on this 2-core machine by default;
- `ray`, 1 actor and 2 actors of 1 thread each, on a local Ray cluster this script starts per configuration.

Per configuration: the cluster start and actor start-up (each actor loads the base model once), the wall
time of the leaves alone, leaves per minute (with and without the start), the summed train-evaluate seconds
the cycles themselves measured, and Ray's overhead per leaf: actor-seconds spent on the leaves minus the
cycles' own seconds, divided by the number of leaves (actor-seconds = wall x actors). Every configuration's
correctness vectors are compared with the 1-thread local run's (1-thread Ray actors must equal it exactly).
Run it alone: two torch processes on two cores slow each other down.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harp.backends import LeafExecution, LeafJob, RayLeafPool, run_leaves  # noqa: E402
from harp.io import write_json, write_text  # noqa: E402


def _demo(root: Path, pool_size: int) -> Any:
    from harp_demo.build import build_demo

    return build_demo(root, pool_size=pool_size, seed=0)


def _jobs(pool: Any, leaves: int, size: int) -> list[LeafJob]:
    if leaves * size > pool.height:
        raise ValueError(f"{leaves} leaves of {size} rows need {leaves * size} pool rows; the pool has {pool.height}")
    return [LeafJob(f"slice{k:03d}", pool["prompt"][k * size:(k + 1) * size].to_list(),
                    pool["response"][k * size:(k + 1) * size].to_list()) for k in range(leaves)]


def _measure(name: str, execution: LeafExecution, finetuner: Any, evaluator: Any, jobs: list[LeafJob],
             eval_set: Any, actors: int) -> tuple[dict[str, Any], dict[str, Any]]:
    t0 = time.perf_counter()
    if execution.backend == "local":
        start = 0.0
        t1 = time.perf_counter()
        got = dict(run_leaves(execution, finetuner, evaluator, jobs, eval_set, seed=0))
    else:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            with RayLeafPool(execution, finetuner, evaluator, eval_set, n_jobs=len(jobs)) as pool:
                t1 = time.perf_counter()
                start = t1 - t0
                got = dict(pool.run(jobs, seed=0))
        finally:
            ray.shutdown()
    wall = time.perf_counter() - t1
    cycles = sum(m.seconds for m in got.values())
    n = len(jobs)
    row = {
        "config": name,
        "leaves": n,
        "actors": actors,
        "start_seconds": round(start, 2),
        "leaves_wall_seconds": round(wall, 2),
        "leaves_per_minute": round(60 * n / wall, 2),
        "leaves_per_minute_with_start": round(60 * n / (wall + start), 2),
        "cycle_seconds_per_leaf": round(cycles / n, 3),
        "overhead_seconds_per_leaf": round((wall * actors - cycles) / n, 3),
        "overhead_share_of_cycle": round((wall * actors - cycles) / cycles, 4),
    }
    print(f"{name}: {row}", flush=True)
    return row, got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/benchmark/ray"), help="report path without suffix")
    ap.add_argument("--demo-dir", type=Path, default=None, help="default: $HARP_DEMO_DIR or dagster_home/demo")
    ap.add_argument("--pool-size", type=int, default=20000)
    ap.add_argument("--leaves", type=int, default=8)
    ap.add_argument("--leaf-size", type=int, default=100)
    args = ap.parse_args(argv)

    import polars as pl
    import torch

    from harp.config import demo_root
    from harp.models.device import Device
    from harp.models.evaluator import Evaluator
    from harp.models.finetuner import LoraFinetuner, clear_base_cache
    from harp_demo.build import DEMO_LORA

    demo = _demo(args.demo_dir or demo_root(), args.pool_size)
    pool = pl.read_parquet(demo.pool)
    eval_set = [row for row in pl.read_ndjson(demo.eval_set).iter_rows(named=True)]
    jobs = _jobs(pool, args.leaves, args.leaf_size)
    evaluator = Evaluator()

    def finetuner(threads: int) -> LoraFinetuner:
        return LoraFinetuner(base_model=str(demo.base_model), device=Device(device="cpu", cpu_threads=threads),
                             **DEMO_LORA)

    rows, results = [], {}
    configs = [
        ("local, 1 thread", LeafExecution(), 1, 1),
        ("local, 2 threads", LeafExecution(), 2, 1),
        ("ray, 1 actor x 1 thread", LeafExecution(backend="ray", actors=1, threads_per_actor=1), 1, 1),
        ("ray, 2 actors x 1 thread", LeafExecution(backend="ray", actors=2, threads_per_actor=1), 1, 2),
    ]
    for name, execution, threads, actors in configs:
        clear_base_cache()
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ft = finetuner(threads)
            ft.tokenizer  # noqa: B018 - load the base model before the clock, as the actors do in their start
            row, got = _measure(name, execution, ft, evaluator, jobs, eval_set, actors)
        finally:
            torch.set_num_threads(before)
        rows.append(row)
        results[name] = got
    ref = results["local, 1 thread"]
    for row in rows:
        got = results[row["config"]]
        row["correct_equal_to_local_1_thread"] = all(np.array_equal(got[k].correct, ref[k].correct) for k in ref)

    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
               "platform": platform.platform()}
    try:
        import ray

        machine["ray"] = ray.__version__
    except ImportError:
        pass
    report = {"machine": machine, "leaves": args.leaves, "leaf_size": args.leaf_size, "pool_size": args.pool_size,
              "recipe": DEMO_LORA, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), _markdown(report))
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Leaf training on Ray actors against the in-process loop",
        "",
        f"Generated by `make bench-ray` (`python -m benchmarks.ray_leaves`) on {m['cpus']} CPU(s), Python "
        f"{m['python']}, torch {m['torch']}, Ray {m.get('ray', '?')}: {report['leaves']} leaves of "
        f"{report['leaf_size']} demo pool rows, the demo LoRA recipe, run alone.",
        "",
        "| configuration | start (s) | leaves wall (s) | leaves/min | leaves/min with start | cycle s/leaf "
        "| Ray overhead s/leaf | overhead / cycle | scores equal to local 1 thread |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['start_seconds']:.1f} | {r['leaves_wall_seconds']:.1f} | {r['leaves_per_minute']:.2f} "
            f"| {r['leaves_per_minute_with_start']:.2f} | {r['cycle_seconds_per_leaf']:.2f} "
            f"| {r['overhead_seconds_per_leaf']:.3f} | {100 * r['overhead_share_of_cycle']:.1f}% "
            f"| {'yes' if r['correct_equal_to_local_1_thread'] else 'no'} |"
        )
    lines += [
        "",
        "- *start*: Ray cluster start plus the actors' start-up (each loads the base model once); 0 for local.",
        "- *Ray overhead per leaf*: (wall of the leaves x actors - the cycles' own train+evaluate seconds) / leaves:",
        "  scheduling, moving the rows and the result, and any actor idling at the end. For local runs it is the",
        "  loop's own bookkeeping.",
        "- The cycles of 1-thread configurations must score identically (same seeds, same arithmetic); a 2-thread",
        "  run may differ in the last bits of its float sums, which can flip a near-tie.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
