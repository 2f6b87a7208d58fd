"""Offline evaluation harness: rank method variants from the quality benchmark's cache, with no training.

The benchmark measures every leaf once per seed (the exhaustive oracle's data) and, next to it, writes a
harness entry (`<out>/cache/harness-seed<seed>-<key>.npz`: the hierarchy, every leaf's per-question proxy
correctness and the base model's). A variant is a set of `HarpSettings` overrides (the method options of
docs/method.md). For each split of every domain's proxy questions into two halves, in both directions:

1. fit: main effects of the variant's representatives on the fit half only, its posteriors, and its active
   rounds replayed from the cache (a planned leaf's fit-half row is read, not trained);
2. select with the variant's envelope options under the point budget;
3. score: the envelope objective `F = sum_d y_d` of the selected rows with every leaf's effect measured on
   the other half, against the same for the exhaustive oracle (every leaf measured on the fit half,
   reference settings): `share = (F(variant) - F(empty)) / (F(oracle) - F(empty))`.

`python -m benchmarks.quality.harness --cache reports/benchmark/cache` prints the ranking (mean share of
the oracle's gain over seeds and splits) as a Markdown table; `--json` writes every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harp.config import HarpSettings
from harp.io import write_json, write_npz, write_text
from harp.method.hierarchy import Hierarchy, choose_representatives
from harp.method.posteriors import bootstrap_main_effects

ENTRY_GLOB = "harness-seed*.npz"

# Variants: name -> HarpSettings overrides. "reference" is the default configuration; active_* variants
# add the harness's active rounds (--active-runs x --active-rounds), the others measure representatives only.
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {},
    "kernel_prior": {"posterior_prior": "kernel"},
    "risk_expected": {"envelope_risk": "expected"},
    "risk_lcb": {"envelope_risk": "lcb"},
    "central_farthest": {"representative_rule": "central_farthest"},
    "regions_min4": {"min_measured_regions": 4},
    "kernel+expected": {"posterior_prior": "kernel", "envelope_risk": "expected"},
    "active_verify": {"active_rule": "verify_upside"},
    "active_thompson": {"active_rule": "thompson"},
    "active_kg": {"active_rule": "knowledge_gradient"},
}
ACTIVE_VARIANTS = frozenset({"active_verify", "active_thompson", "active_kg"})


@dataclass(frozen=True, eq=False)
class CacheEntry:
    """One seed's exhaustive measurements: what a replay needs, read back from a harness entry file."""

    path: Path
    hierarchy: Hierarchy
    correct: np.ndarray  # (G, n_eval) per-question proxy correctness of every leaf's adapter
    base_correct: np.ndarray  # (n_eval,) the base model's
    eval_domain: np.ndarray  # (n_eval,) domain index of each proxy question
    domains: list[str]
    settings: HarpSettings  # the benchmark's settings (hierarchy sizes, n_boot, z_active, seed)
    seed: int


def write_cache_entry(path: Path, hierarchy: Hierarchy, correct: Any, base_correct: Any, eval_domain: Any,
                      domains: Sequence[str], settings: HarpSettings, seed: int) -> None:
    """Write one seed's harness entry atomically (the hierarchy's arrays plus the correctness tables)."""
    arrays = {k: getattr(hierarchy, k) for k in Hierarchy._ARRAYS}
    write_npz(path, **arrays, seed=np.int64(hierarchy.seed), device=np.str_(hierarchy.device),
              correct=np.asarray(correct, dtype=np.float32), base_correct=np.asarray(base_correct, dtype=np.float32),
              eval_domain=np.asarray(eval_domain, dtype=np.int64), domains=np.asarray(list(domains), dtype=np.str_),
              settings=np.str_(settings.as_json()), bench_seed=np.int64(seed))


def load_cache_entry(path: Path) -> CacheEntry:
    """Read and check a harness entry; every error names the file and the offending leaf or question."""
    path = Path(path)
    h = Hierarchy.load_npz(path)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("correct", "base_correct", "eval_domain", "domains", "settings", "bench_seed")
                   if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a harness entry, missing arrays {missing}")
        correct = np.asarray(z["correct"], dtype=np.float64)
        base = np.asarray(z["base_correct"], dtype=np.float64)
        dom = np.asarray(z["eval_domain"], dtype=np.int64)
        domains = [str(d) for d in z["domains"].tolist()]
        settings = HarpSettings(**json.loads(str(z["settings"])))
        seed = int(z["bench_seed"])
    n = base.shape[0]
    if correct.shape != (h.n_leaves, n):
        raise ValueError(f"{path}: correct has shape {correct.shape}, expected ({h.n_leaves} leaves, {n} questions)")
    if dom.shape != (n,):
        raise ValueError(f"{path}: eval_domain has shape {dom.shape}, expected ({n},)")
    bad = (dom < 0) | (dom >= len(domains))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: question {i} has domain index {int(dom[i])}, outside [0, {len(domains)})")
    for name, arr in (("correct", correct), ("base_correct", base)):
        bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
        if bad.any():
            pos = tuple(int(x) for x in np.argwhere(bad)[0])
            where = f"leaf {pos[0]}, question {pos[1]}" if len(pos) == 2 else f"question {pos[0]}"
            raise ValueError(f"{path}: {name} at {where} is {float(arr[pos])!r}; scores must be in [0, 1]")
    counts = np.bincount(dom, minlength=len(domains))
    if (counts < 2).any():
        d = int(np.flatnonzero(counts < 2)[0])
        raise ValueError(f"{path}: domain {domains[d]!r} has {int(counts[d])} question(s); splitting needs >= 2")
    return CacheEntry(path=path, hierarchy=h, correct=correct, base_correct=base, eval_domain=dom,
                      domains=domains, settings=settings, seed=seed)


def split_halves(eval_domain: Any, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``2 * n_splits`` (fit, score) index pairs: each split halves every domain's questions at random
    (seeded), and is used in both directions."""
    dom = np.asarray(eval_domain, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(n_splits)):
        first = np.zeros(dom.size, dtype=bool)
        for d in np.unique(dom).tolist():
            idx = rng.permutation(np.flatnonzero(dom == d))
            first[idx[: idx.size // 2]] = True
        a, b = np.flatnonzero(first), np.flatnonzero(~first)
        out += [(a, b), (b, a)]
    return out


class _Replay:
    """One entry on one split: fits, selections and scores from the cached rows, never training."""

    def __init__(self, entry: CacheEntry, fit_idx: np.ndarray, score_idx: np.ndarray) -> None:
        self.e, self.fit_idx = entry, fit_idx
        D = len(entry.domains)
        self.b_fit = self._per_domain(entry.base_correct[None, fit_idx], entry.eval_domain[fit_idx], D)[0]
        score_dom = entry.eval_domain[score_idx]
        self.b_score = self._per_domain(entry.base_correct[None, score_idx], score_dom, D)[0]
        self.phi_score = self._per_domain(entry.correct[:, score_idx], score_dom, D) - self.b_score

    @staticmethod
    def _per_domain(rows: np.ndarray, dom: np.ndarray, D: int) -> np.ndarray:
        sums = np.stack([np.bincount(dom, weights=r, minlength=D) for r in rows])
        return sums / np.bincount(dom, minlength=D)

    def fit(self, leaves: Sequence[int], settings: HarpSettings) -> Any:
        from harp import driver

        measured = np.unique(np.asarray(leaves, dtype=np.int64))
        e = self.e
        effects = bootstrap_main_effects(e.correct[measured][:, self.fit_idx], e.base_correct[self.fit_idx],
                                         e.eval_domain[self.fit_idx], n_domains=len(e.domains),
                                         n_boot=settings.n_boot, seed=settings.seed)
        return driver.posterior_fit(e.hierarchy, effects, measured, settings.posterior_options())

    def select(self, post: Any, settings: HarpSettings, envelope: str) -> np.ndarray:
        from harp import stages

        sel = stages.select_harp(post, self.b_fit, self.e.hierarchy, envelope=envelope,
                                 top_k_points=settings.top_k_points, z_active=settings.z_active,
                                 **settings.selection_options())
        return sel.example_rows

    def score(self, rows: np.ndarray, envelope: str) -> float:
        from harp.method.selection import predicted_utility

        h = self.e.hierarchy
        f, _, _ = predicted_utility(rows, self.phi_score, self.b_score, h.member_order, h.leaf_offsets,
                                    envelope=envelope)
        return f - float(np.clip(self.b_score, 0.0, 1.0).sum())


def evaluate(
    entries: Sequence[CacheEntry],
    variants: Mapping[str, Mapping[str, Any]],
    *,
    n_splits: int = 3,
    budget_denominator: int = 7,
    envelopes: Sequence[str] = ("expansive", "conservative"),
    active_runs: int = 4,
    active_rounds: int = 2,
    split_seed: int = 0,
) -> list[dict]:
    """One row per (entry, split, variant, envelope): the variant's objective gain on the score half, the
    oracle's, their ratio ``share``, the leaves the variant measured and the seconds the replay took."""
    from harp import driver

    rows: list[dict] = []
    for entry in entries:
        h = entry.hierarchy
        budget = max(1, round(h.n_examples / int(budget_denominator)))
        base = entry.settings.model_copy(update={"top_k_points": budget, "seed": entry.seed})
        for split, (fit_idx, score_idx) in enumerate(split_halves(entry.eval_domain, n_splits, split_seed)):
            rp = _Replay(entry, fit_idx, score_idx)
            oracle_post = rp.fit(range(h.n_leaves), base)
            oracle = {env: rp.score(rp.select(oracle_post, base, env), env) for env in envelopes}
            for name, overrides in variants.items():
                t0 = time.perf_counter()
                s = HarpSettings(**{**base.model_dump(), **dict(overrides)})
                measured = choose_representatives(h.leaf_centroids, h.parent_centroids, h.parent_of_leaf,
                                                  s.n_representatives, s.representative_rule).tolist()
                post = rp.fit(measured, s)
                if name in ACTIVE_VARIANTS or overrides.get("active_rule") not in (None, "verify_upside"):
                    for _ in range(int(active_rounds)):
                        plan = driver.plan_active_round(post, rp.b_fit, h, s, runs=int(active_runs))
                        if not plan.leaves.size:
                            break
                        measured += plan.leaves.tolist()
                        post = rp.fit(measured, s)
                fit_seconds = time.perf_counter() - t0
                for env in envelopes:
                    t1 = time.perf_counter()
                    gain = rp.score(rp.select(post, s, env), env)
                    rows.append({
                        "entry": entry.path.name, "seed": entry.seed, "split": split, "variant": name,
                        "envelope": env, "gain": gain, "oracle_gain": oracle[env],
                        "share": gain / oracle[env] if oracle[env] > 0 else float("nan"),
                        "runs": len(set(measured)), "leaves": h.n_leaves,
                        "seconds": fit_seconds + time.perf_counter() - t1,
                    })
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Per (variant, envelope): mean and sd of the share over entries and splits (splits where the oracle
    gained nothing have no share), mean gains and runs; best first."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["envelope"]), []).append(r)
    out = []
    for (variant, env), rs in groups.items():
        share = np.array([r["share"] for r in rs], dtype=np.float64)
        share = share[np.isfinite(share)]
        out.append({
            "variant": variant, "envelope": env, "n": len(rs),
            "share_mean": float(share.mean()) if share.size else float("nan"),
            "share_sd": float(share.std(ddof=1)) if share.size > 1 else float("nan"),
            "gain_mean": float(np.mean([r["gain"] for r in rs])),
            "oracle_gain_mean": float(np.mean([r["oracle_gain"] for r in rs])),
            "runs_mean": float(np.mean([r["runs"] for r in rs])),
            "leaves": float(np.mean([r["leaves"] for r in rs])),
            "seconds": float(np.sum([r["seconds"] for r in rs])),
        })
    # Best first by share; where the oracle gained nothing (share undefined) by the raw gain.
    return sorted(out, key=lambda r: (r["envelope"], -np.nan_to_num(r["share_mean"], nan=-np.inf),
                                      -r["gain_mean"], r["variant"]))


def markdown(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table."""
    lines = ["| envelope | variant | share of oracle gain | gain (F points) | oracle gain | leaves measured | s |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['envelope']} | {r['variant']} | {r['share_mean']:.3f} ± {r['share_sd']:.3f} | "
                     f"{r['gain_mean']:+.3f} | {r['oracle_gain_mean']:+.3f} | "
                     f"{r['runs_mean']:.1f} / {r['leaves']:.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.harness", description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="reports/benchmark/cache", help="the benchmark's cache folder (default %(default)s)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--splits", type=int, default=3, help="random halvings per entry, each used both ways (default %(default)s)")
    ap.add_argument("--budget", type=int, default=7, help="budget denominator: 7 means 1/7 of the pool (default %(default)s)")
    ap.add_argument("--envelopes", default="expansive,conservative", help="(default %(default)s)")
    ap.add_argument("--active-runs", type=int, default=4, help="leaves per replayed active round (default %(default)s)")
    ap.add_argument("--active-rounds", type=int, default=2, help="replayed active rounds (default %(default)s)")
    ap.add_argument("--json", default=None, help="also write every row and the summary to this file")
    ap.add_argument("--markdown", default=None, help="also write the ranking table, with how it was made, to this file")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    if args.splits < 1 or args.budget < 1 or args.active_runs < 0 or args.active_rounds < 0:
        print("error: --splits and --budget must be >= 1, --active-runs/--active-rounds >= 0", file=sys.stderr)
        return 2
    files = sorted(Path(args.cache).glob(ENTRY_GLOB))
    if not files:
        print(f"error: no harness entries ({ENTRY_GLOB}) under {args.cache}; run the benchmark first", file=sys.stderr)
        return 2
    entries = [load_cache_entry(f) for f in files]
    rows = evaluate(entries, {v: VARIANTS[v] for v in names}, n_splits=args.splits, budget_denominator=args.budget,
                    envelopes=[e for e in args.envelopes.split(",") if e], active_runs=args.active_runs,
                    active_rounds=args.active_rounds)
    summary = summarise(rows)
    table = markdown(summary)
    print(table)
    if args.markdown:
        cmd = " ".join(["python -m benchmarks.quality.harness", *(argv if argv is not None else sys.argv[1:])])
        write_text(Path(args.markdown), f"# Offline harness ranking\n\nMade by `{cmd}` over {len(files)} "
                   f"entries ({', '.join(f.name for f in files)}); how to read it: "
                   "[../benchmark.md](../benchmark.md#offline-harness).\n\n" + table.rstrip() + "\n")
    if args.json:
        write_json(Path(args.json), {"rows": rows, "summary": summary, "entries": [str(f) for f in files]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
