"""The selection-quality and cost benchmark: HARP-C / HARP-E (with and without active rounds) against TSDS,
random, the full pool and the exhaustive oracle, on the demo benchmark, over several seeds and budgets.

`python -m benchmarks.quality.run` (what `make bench` runs). Per seed: the hierarchy is built, EVERY leaf
is measured once (the exhaustive oracle's data; HARP's representatives and active-round picks are subsets
of it, so their measurements are the same cycles, and each method is charged only for the leaves it uses),
the selections are made at each budget through the same driver the Dagster assets and `harp()` use
(`harp.driver`: fit, plan active rounds, select), and every
selection and the full pool is LoRA-finetuned with one fixed recipe and scored on the held-out test split.
The seed varies the clustering, the LoRA initialisation and batch order, the bootstrap, the baselines'
sampling and the validation runs; the demo world (data, proxy and test sets, base model) is the seed-0 one.

Finished seeds are cached under `<out>/cache/`, keyed by the whole configuration, so an interrupted run
resumes where it stopped. The report (README.md, PNG plots, results.json) is written by `report.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harp.io import write_json, write_npz

log = logging.getLogger("harp.benchmark")

DEFAULT_POOL = 10_000
DEFAULT_VALIDATION_SEEDS = 3
LESS_WARMUP = 0.05  # the share of the pool LESS warms its adapter up on, as its reference does
LESS_DIM = 1024  # LESS's gradient sketch dimension
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_DENOMINATORS = (14, 7, 3)  # budgets of about 1/14, 1/7 and 1/3 of the pool
MAIN_DENOMINATOR = 7


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark result depends on (its hash keys the per-seed cache)."""

    pool_size: int = DEFAULT_POOL
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    denominators: tuple[int, ...] = DEFAULT_DENOMINATORS
    main_denominator: int = MAIN_DENOMINATOR
    active_runs: int = 4
    active_rounds: int = 2
    envelope: str = "expansive"  # of harp_active and the exhaustive oracle
    validation_epochs: int | None = None  # None: the recipe in demo.build.VALIDATION_LORA
    demo_seed: int = 0
    # LoRA validation runs per selection (seeds seed, seed + 1000, ...): their mean is the record's accuracy.
    validation_seeds: int = DEFAULT_VALIDATION_SEEDS
    # The HARP method options of HARP-C / HARP-E / active rounds (a name of benchmarks.quality.harness.VARIANTS);
    # the exhaustive oracle stays on the reference model.
    variant: str = "reference"

    def budgets(self) -> list[int]:
        return [max(1, round(self.pool_size / d)) for d in self.denominators]

    def main_budget(self) -> int:
        return max(1, round(self.pool_size / self.main_denominator))


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Bench:
    """The shared, seed-independent part: demo files, embeddings, models, base scores."""

    def __init__(self, cfg: BenchConfig, demo_dir: Path, out: Path, *, base_model: Any = None,
                 embedder: Any = None, threads: int = 0, settings: Any = None, cache: Path | None = None) -> None:
        from harp import stages
        from harp.config import HarpSettings
        from harp.contracts import load_eval_set, load_pool
        from harp.metrics import load_ground_truth
        from harp.models.device import Device
        from harp.models.embedder import Embedder
        from harp.models.evaluator import Evaluator
        from harp.models.finetuner import LoraFinetuner
        from harp.stages import embed_text
        from harp_demo.build import DEMO_LORA, VALIDATION_LORA, build_demo

        self.cfg = cfg
        self.out = out
        # Leaf measurements, validation runs and LESS scores are keyed by what they depend on, so runs with
        # other selection settings (a --variant) can share one cache folder and train only what differs.
        self.cache = cache if cache is not None else out / "cache"
        t0 = time.perf_counter()
        paths = build_demo(demo_dir, pool_size=cfg.pool_size, seed=cfg.demo_seed, model=base_model)
        self.demo_seconds = time.perf_counter() - t0
        self.paths = paths
        self.demo_fingerprint = paths.read_manifest()["fingerprint"]
        pool = load_pool(paths.pool)
        self.ids = pool["example_id"].to_list()
        self.prompts = pool["prompt"].to_list()
        self.responses = pool["response"].to_list()
        self.eval_set = load_eval_set(paths.eval_set)
        self.test_set = load_eval_set(paths.test_set)
        self.truth = load_ground_truth(paths.ground_truth)
        if settings is None:
            from benchmarks.quality.harness import VARIANTS

            if cfg.variant not in VARIANTS:
                raise ValueError(f"unknown variant {cfg.variant!r}; one of {', '.join(VARIANTS)}")
            settings = HarpSettings(**VARIANTS[cfg.variant])
        self.settings = settings
        val_recipe = dict(VALIDATION_LORA)
        if cfg.validation_epochs is not None:
            val_recipe["epochs"] = cfg.validation_epochs
        self.recipe = {"leaf": dict(DEMO_LORA), "validation": val_recipe}
        device = Device(cpu_threads=threads)
        self.finetuner = LoraFinetuner(base_model=str(paths.base_model), device=device, **DEMO_LORA)
        self.val_finetuner = LoraFinetuner(base_model=str(paths.base_model), device=device, **val_recipe)
        self.evaluator = Evaluator()
        embedder = embedder or Embedder(device=device)
        texts = [embed_text(p, r) for p, r in zip(self.prompts, self.responses, strict=True)]
        # TSDS's queries are embedded as candidates are: prompt plus the correct answer.
        queries = stages.eval_item_texts(self.eval_set)
        key = _fingerprint([embedder.model_id, self.ids, texts, queries])
        cache = self.cache / f"embeddings-{key}.npz"
        t0 = time.perf_counter()
        if cache.is_file():
            with np.load(cache) as z:
                self.X, self.Q = z["X"], z["Q"]
        else:
            log.info("embedding %d pool examples and %d proxy prompts", len(texts), self.eval_set.height)
            self.X = embedder.embed(texts)
            self.Q = embedder.embed(queries)
            write_npz(cache, X=self.X, Q=self.Q)
        self.embed_seconds = time.perf_counter() - t0
        self.base_proxy = stages.score_base(self.finetuner, self.evaluator, self.eval_set)
        self.domains = stages.eval_domains(self.base_proxy)
        self.b = stages.base_scores(self.base_proxy, self.domains)
        base_test = stages.validate_examples(self.val_finetuner, self.evaluator, [], [], self.test_set, seed=0)
        self.base_test = float(np.mean([base_test.per_domain[d] for d in self.domains]))

    # -- one seed ------------------------------------------------------------------------------------------

    def _cache_file(self, kind: str, seed: int, *parts: Any) -> Path:
        key = _fingerprint([self.demo_fingerprint, self.recipe, seed, *parts])
        return self.cache / f"{kind}-seed{seed}-{key}"

    def validate(self, rows: list[int], seed: int) -> tuple[dict[str, float], float, float]:
        """(per-domain test accuracy, mean, seconds) of an adapter trained on `rows` with the fixed recipe.

        Cached by the exact rows: a method whose selection did not change is not trained again when only
        another method's settings changed (the cached seconds are those of the run that trained it)."""
        from harp import stages

        path = self._cache_file("validation", seed, [self.ids[r] for r in rows]).with_suffix(".json")
        if path.is_file():
            got = json.loads(path.read_text())
            return got["per_domain"], got["accuracy"], got["seconds"]
        m = stages.validate_examples(self.val_finetuner, self.evaluator, [self.prompts[r] for r in rows],
                                     [self.responses[r] for r in rows], self.test_set, seed=seed)
        per = {d: float(m.per_domain[d]) for d in self.domains}
        acc = float(np.mean(list(per.values())))
        write_json(path, {"per_domain": per, "accuracy": acc, "seconds": m.seconds})
        return per, acc, m.seconds

    def measure_all(self, h: Any, seed: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Every leaf's proxy correctness (aligned with the base evaluation) and cycle seconds; cached by the
        leaves' members, the recipe and the seed, so changing selection settings never retrains a leaf."""
        from harp import stages

        members = [[self.ids[r] for r in h.members(g).tolist()] for g in range(h.n_leaves)]
        path = self._cache_file("leaves", seed, members).with_suffix(".npz")
        if path.is_file():
            with np.load(path) as z:
                return {g: z["correct"][g] for g in range(h.n_leaves)}, z["seconds"]
        got = stages.measure_leaves(self.finetuner, self.evaluator, h, self.prompts, self.responses,
                                    self.eval_set, leaf_ids=np.arange(h.n_leaves), seed=seed, log=log)
        base_ids = list(self.base_proxy.example_ids)
        for g, m in got.items():
            if list(m.example_ids) != base_ids:
                raise ValueError(f"leaf {g} was scored on eval rows in another order than the base model")
        correct = np.stack([np.asarray(got[g].correct, dtype=np.float64) for g in range(h.n_leaves)])
        seconds = np.array([got[g].seconds for g in range(h.n_leaves)])
        write_npz(path, correct=correct, seconds=seconds)
        return {g: correct[g] for g in range(h.n_leaves)}, seconds

    def less(self, seed: int) -> tuple[np.ndarray, float]:
        """LESS's per-row scores and seconds (warm-up plus gradients), cached per seed like the leaves."""
        from harp import stages

        path = self._cache_file("less", seed, self.ids, LESS_WARMUP, LESS_DIM).with_suffix(".npz")
        if path.is_file():
            with np.load(path) as z:
                return z["score"], float(z["seconds"])
        log.info("seed %d: LESS warm-up on %.0f%% of the pool, then %d gradients", seed, 100 * LESS_WARMUP,
                 len(self.ids) + self.eval_set.height)
        f = stages.less_features(self.finetuner, self.prompts, self.responses, self.eval_set, seed=seed,
                                 warmup_fraction=LESS_WARMUP, dim=LESS_DIM, log=log)
        seconds = f.warmup_seconds + f.gradient_seconds
        write_npz(path, score=f.scores.score, seconds=np.float64(seconds))
        return f.scores.score, seconds

    # --- offline harness input (benchmarks/quality/harness.py) ---------------------------------------------
    def write_harness_entry(self, h: Any, seed: int, all_m: dict[int, np.ndarray]) -> Path:
        """The hierarchy, every leaf's per-question proxy correctness and the base model's, for the harness."""
        from benchmarks.quality.harness import write_cache_entry
        from harp import stages

        path = self._cache_file("harness", seed, self.settings.model_dump()).with_suffix(".npz")
        write_cache_entry(path, h, np.stack([all_m[g] for g in range(h.n_leaves)]),
                          np.asarray(self.base_proxy.correct), stages.domain_index(self.base_proxy.domains,
                          self.domains), self.domains, self.settings, seed)
        return path
    # --- end of the harness input ----------------------------------------------------------------------------

    def shares(self, rows: list[int]) -> dict[str, float]:
        from harp.metrics import kind_shares

        return kind_shares([self.ids[r] for r in rows], self.truth, ("harmful", "redundant"))

    def measure_seed(self, seed: int) -> tuple[Any, tuple[dict[int, np.ndarray], np.ndarray], Path | None]:
        """The seed's hierarchy, every leaf measured (cached), and the offline harness's entry for it."""
        from harp import stages

        h = stages.build_hierarchy(self.X, seed=seed, config=self.settings.hierarchy_config())
        log.info("seed %d: %d leaves, %d representatives; measuring every leaf (the exhaustive oracle)",
                 seed, h.n_leaves, len(h.representatives))
        measured = self.measure_all(h, seed)
        # Offline harness input (harness.py), from reference runs only: the harness applies variants itself,
        # and one entry per seed keeps its glob from counting a seed twice.
        entry = self.write_harness_entry(h, seed, measured[0]) if self.cfg.variant == "reference" else None
        return h, measured, entry

    def run_seed(self, seed: int) -> tuple[list[dict], dict]:
        from harp import driver, stages
        from harp.method.envelopes import active_domains
        from harp.method.less import less_select
        from harp.metrics import spearman

        cfg, s = self.cfg, self.settings
        t_seed = time.perf_counter()
        h, (all_m, cycle), _ = self.measure_seed(seed)
        G = h.n_leaves
        reps = np.asarray(h.representatives, dtype=np.int64)

        def fit(leaves: np.ndarray, options: Any = None):
            leaves = np.unique(np.asarray(leaves, dtype=np.int64))
            f = driver.fit_posteriors(h, {int(g): all_m[int(g)] for g in leaves}, self.base_proxy, self.domains,
                                      n_boot=s.n_boot, seed=seed, options=options)
            return f.posteriors, f.effects, float(cycle[leaves].sum()) + f.seconds

        post_all, eff_all, cost_all = fit(np.arange(G))  # the oracle: every leaf, the reference model
        # Representatives, then active rounds, through the one round driver; every leaf is already measured
        # (the oracle's data), so `measure` only records what each round adds and charges its cycles.
        plan = s.model_copy(update={"active_runs": cfg.active_runs, "active_rounds": cfg.active_rounds,
                                    "primary_envelope": cfg.envelope, "top_k_points": cfg.main_budget()})
        measured: list[int] = []
        fitted: list[tuple] = []

        def measure(leaves: list[int]) -> None:
            measured.extend(int(g) for g in leaves)

        def refit(_round: int) -> list[int]:
            fitted.append(fit(np.asarray(measured), s.posterior_options()))
            if _round >= cfg.active_rounds:
                return []
            return driver.plan_active_round(fitted[-1][0], self.b, h, plan).leaves.tolist()

        done = driver.drive_rounds(reps.tolist(), measure, refit, max_rounds=cfg.active_rounds)
        post_rep, _, cost_rep = fitted[0]
        rounds = [{"round": r.number, "picked": list(r.leaves), "post": fitted[r.number][0],
                   "runs": int(np.unique(measured[: sum(len(x.leaves) for x in done[: r.number + 1])]).size),
                   "cost": fitted[r.number][2]} for r in done[1:]]
        act_any = active_domains(post_rep.mean, post_rep.sd, z=s.z_active) | active_domains(
            post_all.mean, post_all.sd, z=s.z_active)
        inferred = ~post_rep.measured
        phi_all = eff_all.phi_hat  # rows = leaves 0..G-1
        rho = spearman(post_rep.mean[:, act_any], phi_all[:, act_any]) if act_any.any() else float("nan")
        rho_inf = (spearman(post_rep.mean[inferred][:, act_any], phi_all[inferred][:, act_any])
                   if act_any.any() and inferred.any() else float("nan"))
        rho_active = float("nan")
        if rounds:
            inf2 = ~rounds[-1]["post"].measured
            if act_any.any() and inf2.any():
                rho_active = spearman(rounds[-1]["post"].mean[inf2][:, act_any], phi_all[inf2][:, act_any])

        records: list[dict] = []

        def add(method: str, budget: int, rows: list[int], runs: int, select_seconds: float, **extra: Any) -> None:
            runs_v = [self.validate(rows, seed + 1000 * k) for k in range(cfg.validation_seeds)]
            per = {d: float(np.mean([r[0][d] for r in runs_v])) for d in self.domains}
            accs = [r[1] for r in runs_v]
            acc, secs = float(np.mean(accs)), float(sum(r[2] for r in runs_v))
            extra = {**extra, "validation_runs": len(accs),
                     "validation_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
            sh = self.shares(rows)
            records.append({
                "method": method, "budget": int(budget), "budget_fraction": budget / len(self.ids),
                "seed": int(seed), "examples": len(rows), "test_accuracy": acc, "base_accuracy": self.base_test,
                "per_domain": per, "harmful_share": sh["harmful"], "redundant_share": sh["redundant"],
                "train_eval_runs": int(runs), "seconds": round(select_seconds + secs, 3), **extra,
            })
            log.info("seed %d %-12s budget %5d: %5d examples, test accuracy %.3f (base %.3f), harmful %.2f, "
                     "redundant %.2f, %d runs", seed, method + (f"/r{extra['round']}" if "round" in extra else ""),
                     budget, len(rows), acc, self.base_test, sh["harmful"], sh["redundant"], runs)

        def harp_rows(p: Any, envelope: str, budget: int, oracle: bool = False) -> tuple[list[int], float]:
            t = time.perf_counter()
            risk = {} if oracle else s.selection_options()
            sel = stages.select_harp(p, self.b, h, envelope=envelope, top_k_points=budget, z_active=s.z_active,
                                     **risk)
            return sel.example_rows.tolist(), time.perf_counter() - t

        for budget in cfg.budgets():
            main = budget == cfg.main_budget()
            for method, envelope in (("harp_c", "conservative"), ("harp_e", "expansive")):
                rows, t = harp_rows(post_rep, envelope, budget)
                add(method, budget, rows, reps.size, cost_rep + t)
            for rd in rounds:
                if rd is rounds[-1] or main:
                    rows, t = harp_rows(rd["post"], cfg.envelope, budget)
                    add("harp_active", budget, rows, rd["runs"], rd["cost"] + t, round=rd["round"])
            rows, t = harp_rows(post_all, cfg.envelope, budget, oracle=True)
            add("exhaustive", budget, rows, G, cost_all + t)
            t = time.perf_counter()
            ts = stages.select_tsds(self.X, self.Q, budget, seed=seed, params=s.tsds_params())
            counts = np.asarray(ts.counts)
            picked = np.flatnonzero(counts > 0)
            order = picked[np.lexsort((picked, -counts[picked]))]
            # TSDS trains on its sampled multiset, duplicates included, as its reference does.
            rows = np.repeat(order, counts[order]).tolist()
            add("tsds", budget, rows, 0, time.perf_counter() - t, distinct=int(order.size))
            less_score, less_seconds = self.less(seed)
            t = time.perf_counter()
            rows = less_select(less_score, budget).tolist()
            # One training run (the warm-up) and no evaluation: charged as one train-evaluate run.
            add("less", budget, rows, 1, less_seconds + time.perf_counter() - t)
            t = time.perf_counter()
            rows = stages.select_random(len(self.ids), budget, seed=seed).example_rows.tolist()
            add("random", budget, rows, 0, time.perf_counter() - t)
        add("full", len(self.ids), list(range(len(self.ids))), 0, 0.0)
        diag = {
            "seed": int(seed), "leaves_total": int(G), "representatives": int(reps.size),
            "active_leaves": int(sum(len(rd["picked"]) for rd in rounds)),
            "representative_share": reps.size / G,
            "spearman_posterior_vs_exhaustive": rho, "spearman_inferred_leaves": rho_inf,
            "spearman_inferred_after_active": rho_active,
            "leaf_cycle_seconds_mean": float(cycle.mean()), "seed_seconds": time.perf_counter() - t_seed,
        }
        return records, diag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.splitlines()[0])
    ap.add_argument("--pool-size", type=int, default=DEFAULT_POOL, help="demo pool size (default %(default)s)")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated (default %(default)s)")
    ap.add_argument("--budgets", default=",".join(map(str, DEFAULT_DENOMINATORS)),
                    help="budget denominators: 14 means 1/14 of the pool (default %(default)s)")
    ap.add_argument("--main", type=int, default=MAIN_DENOMINATOR, help="main budget denominator (default %(default)s)")
    ap.add_argument("--active-runs", type=int, default=4, help="leaf runs per active round (default %(default)s)")
    ap.add_argument("--active-rounds", type=int, default=2, help="active rounds (default %(default)s)")
    ap.add_argument("--envelope", default="expansive", choices=("conservative", "expansive"),
                    help="envelope of harp_active and the exhaustive oracle (default %(default)s)")
    ap.add_argument("--validation-epochs", type=int, default=None, help="override the validation recipe's epochs")
    ap.add_argument("--validation-seeds", type=int, default=DEFAULT_VALIDATION_SEEDS,
                    help="LoRA validation runs per selection, averaged (default %(default)s)")
    ap.add_argument("--variant", default="reference",
                    help="HARP method options for harp_c/harp_e/harp_active, by name from "
                         "benchmarks.quality.harness.VARIANTS (default %(default)s)")
    ap.add_argument("--demo-dir", default=None, help="demo folder (default demo_data/bench; the base model is reused across pool sizes)")
    ap.add_argument("--out", default="reports/benchmark", help="report folder (default %(default)s)")
    ap.add_argument("--cache", default=None, help="cache folder (default OUT/cache); variants can share one")
    ap.add_argument("--measure-only", action="store_true",
                    help="only measure every leaf and write the offline harness's entries (no selection, no "
                         "validation): the input of benchmarks/quality/harness.py")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = BenchConfig(
            pool_size=args.pool_size, seeds=tuple(int(x) for x in args.seeds.split(",") if x.strip()),
            denominators=tuple(int(x) for x in args.budgets.split(",") if x.strip()), main_denominator=args.main,
            active_runs=args.active_runs, active_rounds=args.active_rounds, envelope=args.envelope,
            validation_epochs=args.validation_epochs, validation_seeds=args.validation_seeds,
            variant=args.variant)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (not cfg.seeds or not cfg.denominators or min(cfg.denominators) < 1 or cfg.validation_seeds < 1
            or cfg.main_denominator not in cfg.denominators):
        print("error: give at least one seed, validation seed and budget denominator (each >= 1), and --main "
              "among --budgets",
              file=sys.stderr)
        return 2
    if args.measure_only:
        bench = Bench(cfg, Path(args.demo_dir or "demo_data/bench"), Path(args.out),
                      cache=Path(args.cache) if args.cache else None)
        for seed in cfg.seeds:
            print(f"harness entry: {bench.measure_seed(seed)[2]}")
        return 0
    paths = run_benchmark(cfg, Path(args.demo_dir or "demo_data/bench"), Path(args.out),
                          cache=Path(args.cache) if args.cache else None)
    print(f"benchmark report: {paths['README.md']}")
    return 0


def run_benchmark(cfg: BenchConfig, demo_dir: Path, out: Path, **bench_kw: Any) -> dict[str, Path]:
    """Every seed (cached ones reused), then the report; returns the report's files by name."""
    t_all = time.perf_counter()
    bench = Bench(cfg, demo_dir, out, **bench_kw)
    key = _fingerprint([dataclasses.asdict(cfg), bench.recipe, bench.demo_fingerprint,
                        bench.settings.model_dump()])
    records: list[dict] = []
    diagnostics: list[dict] = []
    for seed in cfg.seeds:
        cache = bench.cache / f"seed-{seed}-{key}.json"
        if cache.is_file():
            got = json.loads(cache.read_text())
            log.info("seed %d: reusing %s", seed, cache)
        else:
            recs, diag = bench.run_seed(seed)
            got = {"records": recs, "diagnostics": diag}
            write_json(cache, got)
        records.extend(got["records"])
        diagnostics.append(got["diagnostics"])
    from benchmarks.quality.report import write_report

    config = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "budgets": cfg.budgets(), "main_budget_fraction": cfg.main_budget() / cfg.pool_size,
        "recipe": {f"validation.{k}": v for k, v in bench.recipe["validation"].items()}
        | {f"leaf.{k}": v for k, v in bench.recipe["leaf"].items()},
        "harp_settings": bench.settings.model_dump(),
        "base_test_accuracy": bench.base_test, "domains": bench.domains,
        "demo_build_seconds": round(bench.demo_seconds, 1), "embed_seconds": round(bench.embed_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_all, 1), "cache_key": key,
    }
    log.info("benchmark: %d records, %.0f s", len(records), config["total_seconds"])
    return write_report(out, records, config=config, diagnostics=diagnostics)


if __name__ == "__main__":
    raise SystemExit(main())
