"""Time and peak memory of the Stage 1a hierarchy on clustered synthetic embeddings.

Each size runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own.
The data is a Gaussian mixture with uneven component weights, the shape real sentence embeddings have.

    .venv/bin/python benchmarks/hierarchy_speed.py --sizes 100000,1000000 --json /tmp/hierarchy.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from harp.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def make_mixture(n: int, dim: int, seed: int):
    """Float32 Gaussian mixture, generated in blocks so only the result is held in memory."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_components = max(10, n // 2000)
    centers = rng.standard_normal((n_components, dim), dtype=np.float32)
    weights = rng.dirichlet(np.full(n_components, 0.5))
    spread = rng.uniform(0.3, 1.0, n_components).astype(np.float32)
    X = np.empty((n, dim), dtype=np.float32)
    block = 65536
    for start in range(0, n, block):
        m = min(block, n - start)
        comp = rng.choice(n_components, size=m, p=weights)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        X[start : start + m] = centers[comp] + spread[comp, None] * noise
    return X


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import faiss
    import numpy as np

    from harp.method.hierarchy import build_parent_leaf_hierarchy

    rss_start = _rss_mib()
    t0 = time.perf_counter()
    X = make_mixture(args.worker, args.dim, args.seed)
    gen_s = time.perf_counter() - t0
    rss_data = _rss_mib()
    t0 = time.perf_counter()
    h = build_parent_leaf_hierarchy(
        X,
        leaf_size=args.leaf_size,
        leaves_per_parent=args.leaves_per_parent,
        parents_per_region=args.parents_per_region,
        seed=args.seed,
        use_gpu=args.use_gpu,
    )
    build_s = time.perf_counter() - t0
    sizes = h.leaf_sizes
    return {
        "n": int(X.shape[0]),
        "dim": int(X.shape[1]),
        "build_seconds": round(build_s, 2),
        "generate_seconds": round(gen_s, 2),
        "peak_rss_mib": round(_rss_mib(), 1),
        "rss_after_data_mib": round(rss_data, 1),
        "rss_at_start_mib": round(rss_start, 1),
        "data_mib": round(X.nbytes / 2**20, 1),
        "n_regions": h.n_regions,
        "n_parents": h.n_parents,
        "n_leaves": h.n_leaves,
        "n_representatives": int(h.representatives.size),
        "leaf_size_min_median_max": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
        "device": h.device,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_version": faiss.__version__,
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }




def _use_gpu(value: str) -> bool | str:
    table = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in table:
        raise argparse.ArgumentTypeError("use 'auto', 'true' or 'false'")
    return table[value.lower()]


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in value.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {value!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants positive integers, got {value!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_sizes, default=[100_000, 1_000_000], help="comma-separated row counts")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leaf-size", type=int, default=100)
    ap.add_argument("--leaves-per-parent", type=int, default=8)
    ap.add_argument("--parents-per-region", type=int, default=8)
    ap.add_argument("--use-gpu", type=_use_gpu, default="auto", help="auto, true or false")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0

    results = []
    passthrough = [
        f"--dim={args.dim}",
        f"--seed={args.seed}",
        f"--leaf-size={args.leaf_size}",
        f"--leaves-per-parent={args.leaves_per_parent}",
        f"--parents-per-region={args.parents_per_region}",
        f"--use-gpu={str(args.use_gpu).lower()}",
    ]
    print(f"{'n':>10} {'dim':>4} {'build s':>8} {'peak MiB':>9} {'data MiB':>9} {'regions':>7} "
          f"{'parents':>7} {'leaves':>7}  leaf sizes min/med/max")
    for n in args.sizes:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), f"--worker={n}", *passthrough],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            print(f"size {n}: worker failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode or 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        lo, med, hi = r["leaf_size_min_median_max"]
        print(f"{r['n']:>10} {r['dim']:>4} {r['build_seconds']:>8.2f} {r['peak_rss_mib']:>9.0f} "
              f"{r['data_mib']:>9.0f} {r['n_regions']:>7} {r['n_parents']:>7} {r['n_leaves']:>7}  "
              f"{lo}/{med}/{hi}  ({r['device']}, {r['faiss_threads']} threads, "
              f"load {r['loadavg_1min_at_start']})", flush=True)
    if args.json is not None:
        write_json(args.json, {"benchmark": "hierarchy_speed", "results": results})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
