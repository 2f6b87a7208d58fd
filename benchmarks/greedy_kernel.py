"""Seconds per greedy step: the compiled kernel against the numpy reference and the machine's bandwidth.

A greedy step reads the (active domains x remaining leaves) float64 matrix once and keeps an argmax, so
its floor is the time to stream that matrix from memory. For each size (default G = 20,000 and 100,000
leaves x D = 57 domains, the benchmark's synthetic effects from ``greedy_speed.py``) and each envelope this
script times ``greedy_taskaware(..., early_stop=False, max_steps=S)`` with ``kernel="numba"`` and
``kernel="numpy"``, best of ``--repeats``, and takes one step's cost as ``(t(S) - t(0)) / S``: ``t(0)``
is the fixed part (checks, the working-matrix copy, the final objective). ``S`` stays below G/2 so no
compaction happens and every timed step scans all G columns (the script checks ``rows_scanned``).

Reported per case: seconds per step, input bytes per step (what the implementation must read: the kernel
reads phi once, G x D x 8 B, for both envelopes; numpy reads phi and, for HARP-C, its stored negative part,
and also writes and re-reads a scratch buffer several times, which is not counted), achieved input
bytes/s, that as a fraction of the single-thread read bandwidth measured first, and the kernel's speed-up
over numpy. Targets (issue #13): fraction >= 0.5 and speed-up >= 5. A 20,000 x 57 matrix (9 MB) may sit
in the last-level cache, so its fraction can exceed 1. The timed numpy and kernel rankings are compared
(order, and gains bit for bit) and the script fails if they differ.

It also times the kernel's first call in fresh processes: once with an empty numba cache (compilation)
and once more (loading the cached machine code).

    .venv/bin/python benchmarks/greedy_kernel.py [--json PATH] [--markdown PATH] [--sizes 20000,100000]
        [--domains 57] [--bw-gib 1] [--repeats 3] [--quick]

``--quick`` runs small sizes only, to check that the script works; its figures are not the benchmark's.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.greedy_speed import measure_bandwidth, synthetic_effects  # noqa: E402
from harp.io import write_json  # noqa: E402
from harp.method.envelopes import ENVELOPES, greedy_taskaware  # noqa: E402

TARGET_FRACTION = 0.5
TARGET_SPEEDUP = 5.0
_NUMPY_ARRAYS_READ = {"conservative": 2, "expansive": 1}

_FIRST_CALL = """
import time, numpy as np
t0 = time.perf_counter()
from harp.method.envelopes import greedy_taskaware
t1 = time.perf_counter()
greedy_taskaware(np.array([[0.1, -0.2], [0.3, 0.0]]), np.array([0.5, 0.5]), "conservative")
t2 = time.perf_counter()
greedy_taskaware(np.array([[0.1, -0.2], [0.3, 0.0]]), np.array([0.5, 0.5]), "expansive")
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def first_call_seconds() -> dict[str, float]:
    """The kernel's first call in a fresh process: with an empty numba cache, then with the cache filled."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold_compile", "cached"):
            proc = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL], cwd=ROOT, env=env, capture_output=True, text=True, check=True
            )
            imp, first, second = (float(x) for x in proc.stdout.split())
            out[f"{label}_first_call_seconds"] = first
            out[f"{label}_second_call_seconds"] = second
        out["import_seconds"] = imp
    return out


def _best_time(phi, base, envelope, kernel, steps, repeats):
    best = float("inf")
    res = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = greedy_taskaware(phi, base, envelope, early_stop=False, max_steps=steps, kernel=kernel)
        best = min(best, time.perf_counter() - t0)
    return best, res


def time_steps(phi, base, envelope, kernel, steps, repeats) -> tuple[dict, object]:
    """Per-step seconds of one implementation as ``(t(steps) - t(0)) / steps``."""
    G, D = phi.shape
    if not 0 < steps <= G // 2:
        raise ValueError(f"steps must be in [1, G/2] so that no compaction happens, got {steps} for G={G}")
    fixed, _ = _best_time(phi, base, envelope, kernel, 0, repeats)
    total, res = _best_time(phi, base, envelope, kernel, steps, repeats)
    if res.rows_scanned != steps * G:
        raise AssertionError(f"{kernel}: expected {steps * G} rows scanned, got {res.rows_scanned}")
    per_step = max(total - fixed, 1e-12) / steps
    arrays = 1 if kernel == "numba" else _NUMPY_ARRAYS_READ[envelope]
    input_bytes = float(G * D * 8 * arrays)
    return {
        "kernel": kernel,
        "steps": steps,
        "seconds_total": total,
        "seconds_fixed": fixed,
        "seconds_per_step": per_step,
        "input_bytes_per_step": input_bytes,
        "input_bytes_per_s": input_bytes / per_step,
    }, res


def run_case(G, D, envelope, seed, steps_numba, steps_numpy, repeats, read_bw) -> dict:
    phi, base = synthetic_effects(G, D, seed)
    nb, res_nb = time_steps(phi, base, envelope, "numba", min(steps_numba, G // 2), repeats)
    npy, res_np = time_steps(phi, base, envelope, "numpy", min(steps_numpy, G // 2), repeats)
    k = min(res_nb.order.size, res_np.order.size)
    same = bool(
        np.array_equal(res_nb.order[:k], res_np.order[:k])
        and np.array_equal(res_nb.gains[:k].view(np.int64), res_np.gains[:k].view(np.int64))
    )
    if not same:
        raise AssertionError(f"kernel and numpy rankings differ at G={G}, {envelope}")
    for r in (nb, npy):
        r["fraction_of_read_bandwidth"] = r["input_bytes_per_s"] / read_bw
    speedup = npy["seconds_per_step"] / nb["seconds_per_step"]
    return {
        "G": G,
        "D": D,
        "envelope": envelope,
        "numba": nb,
        "numpy": npy,
        "speedup": speedup,
        "identical_steps_compared": k,
        "meets_fraction_target": nb["fraction_of_read_bandwidth"] >= TARGET_FRACTION,
        "meets_speedup_target": speedup >= TARGET_SPEEDUP,
    }


def markdown(payload: dict) -> str:
    bw = payload["bandwidth"]
    m = payload["machine"]
    c = payload["compile"]
    lines = [
        "# Greedy step: compiled kernel against numpy",
        "",
        f"Generated by `{payload['command']}` (`make bench-method`); see docs/performance.md.",
        "",
    ]
    if payload["quick"]:
        lines += ["**Quick run (`--quick`): small sizes to check the script, not the benchmark's figures.**", ""]
    lines += [
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}, numpy {m['numpy']}, "
        f"numba {m['numba']}. Single-thread read bandwidth ({payload['bw_gib']:g} GiB float64, `a.sum()`): "
        f"{bw['read_bytes_per_s'] / 1e9:.2f} GB/s; copy {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s.",
        "",
        "One step = `(t(S) - t(0)) / S` with `early_stop=False`, every step scanning all G leaves. Input bytes "
        "per step: the kernel reads phi once (G x D x 8 B); numpy reads phi (and HARP-C's stored negative "
        "part), plus scratch traffic that is not counted.",
        "",
        "| G x D | envelope | numpy ms/step | kernel ms/step | speed-up | kernel MB/step | kernel GB/s "
        "| x read bandwidth | targets (>= 0.5 of bandwidth, >= 5x) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["runs"]:
        nb, npy = r["numba"], r["numpy"]
        ok = ("yes" if r["meets_fraction_target"] else "no") + " / " + ("yes" if r["meets_speedup_target"] else "no")
        lines.append(
            f"| {r['G']:,} x {r['D']} | {r['envelope']} | {1e3 * npy['seconds_per_step']:.3f} "
            f"| {1e3 * nb['seconds_per_step']:.3f} | {r['speedup']:.1f}x | {nb['input_bytes_per_step'] / 1e6:.1f} "
            f"| {nb['input_bytes_per_s'] / 1e9:.2f} | {nb['fraction_of_read_bandwidth']:.2f} | {ok} |"
        )
    lines += [
        "",
        "Orders and gains of the timed rankings were identical (gains bit for bit) in every case.",
        "",
        f"First call of the kernel in a fresh process: {c['cold_compile_first_call_seconds']:.1f} s with an "
        f"empty numba cache (compilation), {c['cached_first_call_seconds']:.2f} s once the cache is filled "
        f"(numba import and cache load); importing `harp.method.envelopes` takes {c['import_seconds']:.2f} s "
        "and does not import numba.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--markdown", type=Path, default=None, help="also write a markdown report here")
    ap.add_argument("--sizes", default="20000,100000", help="comma-separated leaf counts G")
    ap.add_argument("--domains", type=int, default=57)
    ap.add_argument("--bw-gib", type=float, default=1.0, help="array size for the bandwidth test (GiB)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--steps-numba", type=int, default=400, help="timed steps of the kernel (capped at G/2)")
    ap.add_argument("--steps-numpy", type=int, default=30, help="timed steps of numpy (capped at G/2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script works")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.bw_gib, args.repeats = "2000,5000", min(args.bw_gib, 0.125), min(args.repeats, 2)
        args.steps_numba, args.steps_numpy = min(args.steps_numba, 100), min(args.steps_numpy, 10)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.repeats < 1 or args.bw_gib <= 0 or not sizes or min(sizes) < 2 or args.domains < 1:
        ap.error("--repeats >= 1, --bw-gib > 0, sizes >= 2 and --domains >= 1 are required")
    if args.steps_numba < 1 or args.steps_numpy < 1:
        ap.error("--steps-numba and --steps-numpy must be >= 1")

    import numba

    compile_times = first_call_seconds()
    print(
        f"first call in a fresh process: {compile_times['cold_compile_first_call_seconds']:.2f} s cold "
        f"(compiling), {compile_times['cached_first_call_seconds']:.2f} s with the numba cache"
    )
    bw = measure_bandwidth(args.bw_gib, args.repeats)
    read_bw = bw["read_bytes_per_s"]
    print(f"bandwidth ({args.bw_gib:g} GiB float64): read {read_bw / 1e9:.2f} GB/s, copy {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s")

    greedy_taskaware(np.ones((2, 2)), np.zeros(2), "expansive")  # compile or load before timing
    runs = []
    print(f"{'G':>7} {'envelope':<12} {'numpy ms':>9} {'kernel ms':>9} {'speed-up':>8} {'MB/step':>8} "
          f"{'GB/s':>7} {'x bw':>6}")
    for G in sizes:
        for i, envelope in enumerate(ENVELOPES):
            r = run_case(G, args.domains, envelope, args.seed + i, args.steps_numba, args.steps_numpy,
                         args.repeats, read_bw)
            runs.append(r)
            nb = r["numba"]
            print(
                f"{G:>7} {envelope:<12} {1e3 * r['numpy']['seconds_per_step']:>9.3f} "
                f"{1e3 * nb['seconds_per_step']:>9.3f} {r['speedup']:>7.1f}x {nb['input_bytes_per_step'] / 1e6:>8.2f} "
                f"{nb['input_bytes_per_s'] / 1e9:>7.2f} {nb['fraction_of_read_bandwidth']:>6.2f}",
                flush=True,
            )
    payload = {
        "command": "benchmarks/greedy_kernel.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
                    "numba": numba.__version__, "cpu_count": os.cpu_count()},
        "bw_gib": args.bw_gib,
        "bandwidth": bw,
        "compile": compile_times,
        "targets": {"fraction_of_read_bandwidth": TARGET_FRACTION, "speedup": TARGET_SPEEDUP},
        "runs": runs,
        "dtype": "float64",
    }
    if args.json is not None:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(payload), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
