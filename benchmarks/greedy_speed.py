"""Speed of the HARP greedy ranking against this machine's memory bandwidth.

Each greedy step reads the (active domains x remaining leaves) float64 matrix, so a step should run near
memory (or last-level cache) speed. The script measures the bandwidth first (single-threaded, like the
greedy), then times ``greedy_taskaware`` with ``--kernel`` (default ``numba``, the compiled loop that
``harp_select`` runs; ``numpy`` is the reference of a few elementwise passes per step):

1. G=2,000 leaves x D=57 domains ranked to the full order (``early_stop=False``), both envelopes;
2. G=20,000 x 57 with ~100-row leaves until a 20% point budget is reached, both envelopes, once without
   the early stop (steady-state cost per step) and once with it (as ``harp_select`` runs; with dense
   noisy effects the bound often ends the ranking long before the budget, HARP-C after a few leaves
   because every further leaf brings harms on about half the domains).

"Input bytes per step" counts the float64 arrays a step must read once over the columns still in the
working matrix: the kernel reads phi only; numpy reads phi (HARP-E) or phi and its stored negative part
(HARP-C), and its passes also read and write a scratch buffer, so its real traffic is 3-5x (E) or 8-10x (C)
that. The matrices here (at most 20,000 x 57 x 8 B = 9 MB each) may sit in the last-level cache, in which
case the achieved rate can exceed DRAM bandwidth. ``benchmarks/greedy_kernel.py`` compares the two
implementations per step at 20,000 and 100,000 leaves.

Effects are synthetic: posterior means ~ N(domain offset, 0.03) with offsets ~ N(0, 0.01), bases uniform
in [0.05, 0.95], so some domains saturate and the clip is exercised.

    .venv/bin/python benchmarks/greedy_speed.py [--json PATH] [--bw-gib 1.0] [--repeats 3] [--kernel numba]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harp.io import write_json
from harp.method.envelopes import ENVELOPES, GREEDY_KERNELS, greedy_taskaware  # noqa: E402

# float64 arrays of the working matrix's size that one step reads, per kernel and envelope.
_ARRAYS_READ = {
    "numba": {"conservative": 1, "expansive": 1},
    "numpy": {"conservative": 2, "expansive": 1},
}


def measure_bandwidth(gib: float, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` read (sum) and copy bandwidth over a ``gib`` GiB float64 array, bytes/s."""
    n = int(gib * 2**30) // 8
    a = np.ones(n)
    b = np.empty_like(a)
    b.fill(0.0)  # touch the pages so the copy does not time page faults
    read_best = copy_best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        read_best = min(read_best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(b, a)
        copy_best = min(copy_best, time.perf_counter() - t0)
    nbytes = float(a.nbytes)
    return {
        "array_bytes": nbytes,
        "read_bytes_per_s": nbytes / read_best,
        "copy_bytes_per_s": 2.0 * nbytes / copy_best,  # one read + one write per element
    }


def synthetic_effects(G: int, D: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 0.01, size=D)
    phi = offsets + rng.normal(0.0, 0.03, size=(G, D))
    base = rng.uniform(0.05, 0.95, size=D)
    return phi, base


def time_greedy(phi, base, envelope, repeats, kernel="numba", **kwargs) -> dict[str, float | int | str]:
    best = float("inf")
    res = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = greedy_taskaware(phi, base, envelope, kernel=kernel, **kwargs)
        best = min(best, time.perf_counter() - t0)
    steps = int(res.order.size)
    input_bytes = float(res.rows_scanned) * phi.shape[1] * 8 * _ARRAYS_READ[kernel][envelope]
    sec_per_step = best / max(steps, 1)
    return {
        "envelope": envelope,
        "kernel": kernel,
        "G": int(phi.shape[0]),
        "D": int(phi.shape[1]),
        "seconds": best,
        "steps": steps,
        "seconds_per_step": sec_per_step,
        "stop_reason": res.stop_reason,
        "cut": int(res.cut),
        "input_bytes_per_step": input_bytes / max(steps, 1),
        "achieved_input_bytes_per_s": input_bytes / best,
    }




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--bw-gib", type=float, default=1.0, help="array size for the bandwidth test (GiB)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs (bandwidth, G=2,000 case)")
    ap.add_argument("--domains", type=int, default=57)
    ap.add_argument("--g-full", type=int, default=2_000)
    ap.add_argument("--g-budget", type=int, default=20_000)
    ap.add_argument("--budget-frac", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel", choices=GREEDY_KERNELS, default="numba", help="greedy implementation to time")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.bw_gib <= 0 or not 0 < args.budget_frac <= 1:
        ap.error("--repeats must be >= 1, --bw-gib > 0, --budget-frac in (0, 1]")

    bw = measure_bandwidth(args.bw_gib, args.repeats)
    print(
        f"bandwidth ({args.bw_gib:g} GiB float64, best of {args.repeats}): "
        f"read {bw['read_bytes_per_s'] / 1e9:.2f} GB/s, copy {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s; "
        f"greedy kernel: {args.kernel}"
    )

    greedy_taskaware(np.ones((2, 2)), np.zeros(2), "expansive", kernel=args.kernel)  # compile before timing
    runs = []
    kern = args.kernel
    phi, base = synthetic_effects(args.g_full, args.domains, args.seed)
    for envelope in ENVELOPES:
        runs.append({"case": "full_order", **time_greedy(phi, base, envelope, args.repeats, kern, early_stop=False)})

    phi, base = synthetic_effects(args.g_budget, args.domains, args.seed + 1)
    sizes = np.random.default_rng(args.seed + 2).integers(50, 151, size=args.g_budget)
    budget = int(args.budget_frac * sizes.sum())
    for envelope in ENVELOPES:
        # Without the early stop the ranking runs to the budget: the steady-state cost per step.
        full = time_greedy(phi, base, envelope, 1, kern, leaf_sizes=sizes, budget_points=budget, early_stop=False)
        # With it (as harp_select runs): the bound may end the ranking first; the cut must agree.
        fast = time_greedy(phi, base, envelope, 1, kern, leaf_sizes=sizes, budget_points=budget, early_stop=True)
        for case, r in (("budget", full), ("budget+bound", fast)):
            runs.append(
                {"case": case, "budget_points": budget, "total_points": int(sizes.sum()),
                 "cut_matches_no_early_stop": r["cut"] == full["cut"], **r}
            )

    print(f"{'case':<13} {'envelope':<12} {'G':>6} {'steps':>6} {'seconds':>8} {'ms/step':>8} "
          f"{'MB/step':>8} {'GB/s in':>8} {'x read bw':>9} stop")
    for r in runs:
        print(
            f"{r['case']:<13} {r['envelope']:<12} {r['G']:>6} {r['steps']:>6} {r['seconds']:>8.3f} "
            f"{1e3 * r['seconds_per_step']:>8.3f} {r['input_bytes_per_step'] / 1e6:>8.2f} "
            f"{r['achieved_input_bytes_per_s'] / 1e9:>8.2f} "
            f"{r['achieved_input_bytes_per_s'] / bw['read_bytes_per_s']:>9.2f} {r['stop_reason']} (cut {r['cut']})"
        )
    if args.json is not None:
        payload = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "numpy": np.__version__, "cpu_count": os.cpu_count()},
            "bandwidth": bw,
            "runs": runs,
            "dtype": "float64",
            "kernel": args.kernel,
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
