"""A pool of up to 1,000,000 examples through every HARP stage that does not train: seconds and peak memory
per stage, and how each grows with the pool size.

`python -m benchmarks.scale_pool` (what `make bench-scale` runs). Each size in `--sizes` (default 100,000,
300,000 and 1,000,000) runs in a fresh subprocess, which builds a synthetic pool (ids, short texts, clustered
unit-norm embeddings written to an .npy file under `--work`) and runs, through the library's own functions
(the ones the assets call; where a stage's glue exists only in an asset, the same calls are made here):

- the supplied embeddings file imported as the pipeline's embeddings artifact, and loaded back;
- the hierarchy and its leaf table with stable ids (`stages.update_leaf_table`, first build), saved and
  loaded; then a 1% growth through `update_leaf_table` with the representatives frozen (as if measured);
- simulated measurements of the representatives (correctness on D domains, with region, parent and leaf
  effects), main effects and posteriors over every leaf (`driver.fit_posteriors`);
- both envelopes (`driver.select_envelopes`, one per call as the assets run them) under a point budget of
  1/7 of the pool, TSDS with its IVF index (`stages.select_tsds`, `exact=False`) and random selection;
- the lineage tables written through `LineageStore` as the assets write them (leaves, examples, one
  measurement partition per representative, phi_posteriors, the four selections and the run manifest), the
  posteriors asset's read of the stored measurements, the catalog refresh, and one query per catalog view
  and example query.

Memory: before each stage the kernel's resident-memory high-water mark (VmHWM) is reset by writing 5 to
/proc/self/clear_refs, and read after it, so a stage's peak is exact and its own even though the stages share
a process (what earlier stages still hold is in it: `rss_start` shows how much). Where that file cannot be
written, a thread samples the resident size every 5 ms instead (the report says which).

Growth: for each stage the least-squares slope of log(seconds) on log(pool size) is its time exponent (1 is
linear, 2 quadratic); the same is taken of the CPU seconds and of the memory a stage adds over its starting
resident size. A pipeline stage whose exponent exceeds `--threshold` (1.3) is flagged, when it takes long
enough (or adds enough memory) at the largest size to be measured, and so is any stage whose peak exceeds
`--mem-limit-gib` (16). The report goes to `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (100_000, 300_000, 1_000_000)
# Stages that build the synthetic inputs; timed for the record but never flagged.
SETUP = "setup"
PIPELINE = "pipeline"
_MODEL_ID = "synthetic-embedder"
_BASE_ID = "synthetic-base"
_PROGRESS_EVERY_S = 10.0

log = logging.getLogger("harp.benchmark.scale")


@dataclass(frozen=True)
class ScaleConfig:
    """What one size runs with: data shape, proxy-set shape, budget share and growth."""

    dim: int = 384
    domains: int = 57
    eval_per_domain: int = 40
    budget_divisor: int = 7
    growth: float = 0.01
    seed: int = 0
    n_boot: int = 200
    keep_data: bool = False
    tsds: tuple[str, ...] = ("exact", "ivf")
    leaf_size: int | None = None  # None: the project's default (HarpSettings)


# --------------------------------------------------------------------------------------------------------
# Per-stage time and peak memory
# --------------------------------------------------------------------------------------------------------


def _status_mib(field_name: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024.0 if m else None


def _rss_mib() -> float:
    now = _status_mib("VmRSS")
    if now is not None:
        return now
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """Peak resident memory over a window: the kernel's high-water mark reset at the window's start, or,
    where that is not allowed, a thread sampling the resident size every 5 ms."""

    def __init__(self) -> None:
        self.method = "vmhwm" if self._reset() else "sampled"
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return _status_mib("VmHWM") is not None

    def start(self) -> None:
        if self.method == "vmhwm":
            self._reset()
            return
        self._peak = _rss_mib()
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, _rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        if self.method == "vmhwm":
            return float(_status_mib("VmHWM") or 0.0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, _rss_mib())


@dataclass
class StageRecord:
    """One stage of one size: wall and CPU seconds, peak and starting resident memory, and what it made."""

    stage: str
    kind: str
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    rss_start_mib: float
    rss_end_mib: float
    info: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Times stages one after another in this process and prints a line as each starts and ends."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self.memory = PeakMemory()
        self.records: list[StageRecord] = []
        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))

    @contextlib.contextmanager
    def stage(self, name: str, kind: str = PIPELINE) -> Iterator[dict[str, Any]]:
        """Yields the stage's info dict, to fill with what the stage produced."""
        info: dict[str, Any] = {}
        gc.collect()
        rss0 = _rss_mib()
        self.echo(f"  {name} ...")
        self.memory.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        yield info
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        peak = self.memory.stop()
        rec = StageRecord(name, kind, round(seconds, 3), round(cpu, 3), round(peak, 1), round(rss0, 1),
                          round(_rss_mib(), 1), info)
        self.records.append(rec)
        self.echo(f"  {name}: {seconds:.2f} s (cpu {cpu:.2f} s), peak {peak:.0f} MiB (start {rss0:.0f} MiB)")


# --------------------------------------------------------------------------------------------------------
# Growth exponents and flags
# --------------------------------------------------------------------------------------------------------


def slope(ns: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(n): 1 is linear, 2 quadratic; None without two positive points."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if n > 0 and v > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    xc = xs - xs.mean()
    return float((xc * (ys - ys.mean())).sum() / (xc * xc).sum())


def growth_table(
    runs: list[dict[str, Any]], *, threshold: float = 1.3, min_seconds: float = 0.5, min_mib: float = 64.0,
    mem_limit_gib: float = 16.0,
) -> list[dict[str, Any]]:
    """Per stage: time, CPU and memory exponents over the sizes, the time ratio largest/smallest, and flags.

    A pipeline stage is flagged `time` when its wall-time exponent exceeds `threshold` and it takes at least
    `min_seconds` at the largest size (shorter ones are mostly fixed cost and timer noise), `memory` when the
    memory it adds over its starting resident size grows faster than `threshold` and reaches `min_mib`, and
    `over <limit>` when its peak exceeds `mem_limit_gib` at any size.
    """
    runs = sorted(runs, key=lambda r: r["n"])
    stages: list[str] = []
    for r in runs:
        stages += [s["stage"] for s in r["stages"] if s["stage"] not in stages]
    out = []
    for name in stages:
        rows = [(r["n"], next((s for s in r["stages"] if s["stage"] == name), None)) for r in runs]
        rows = [(n, s) for n, s in rows if s is not None]
        ns = [float(n) for n, _ in rows]
        secs = [s["seconds"] for _, s in rows]
        added = [max(s["peak_rss_mib"] - s["rss_start_mib"], 0.0) for _, s in rows]
        kind = rows[-1][1]["kind"]
        t_exp = slope(ns, secs)
        m_exp = slope(ns, added)
        flags = []
        if kind == PIPELINE and t_exp is not None and t_exp > threshold and secs[-1] >= min_seconds:
            flags.append("time")
        if kind == PIPELINE and m_exp is not None and m_exp > threshold and added[-1] >= min_mib:
            flags.append("memory")
        if max(s["peak_rss_mib"] for _, s in rows) > mem_limit_gib * 1024:
            flags.append(f"over {mem_limit_gib:g} GiB")
        out.append({
            "stage": name,
            "kind": kind,
            "sizes": [int(n) for n in ns],
            "time_exponent": None if t_exp is None else round(t_exp, 2),
            "cpu_exponent": None if (e := slope(ns, [s["cpu_seconds"] for _, s in rows])) is None else round(e, 2),
            "memory_exponent": None if m_exp is None else round(m_exp, 2),
            "time_ratio": round(secs[-1] / secs[0], 1) if len(rows) > 1 and secs[0] > 0 else None,
            "size_ratio": round(ns[-1] / ns[0], 1) if len(rows) > 1 else None,
            "flags": flags,
        })
    return out


# --------------------------------------------------------------------------------------------------------
# Synthetic pool
# --------------------------------------------------------------------------------------------------------


class Mixture:
    """Unit-norm rows from a Gaussian mixture with uneven weights (the shape sentence embeddings have); one
    component per 2,000 pool rows, so a larger pool has more topics, as a real one would."""

    def __init__(self, n: int, dim: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        self.k = max(10, n // 2000)
        self.dim = dim
        self.centers = rng.standard_normal((self.k, dim), dtype=np.float32)
        self.weights = rng.dirichlet(np.full(self.k, 0.5))
        self.spread = rng.uniform(0.3, 1.0, self.k).astype(np.float32)
        self.seed = seed

    def rows(self, n: int, stream: int, components: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 unit rows and each row's component; `components` restricts the draw to those."""
        rng = np.random.default_rng([self.seed, stream])
        X = np.empty((n, self.dim), dtype=np.float32)
        comp_all = np.empty(n, dtype=np.int64)
        if components is None:
            choices, p = np.arange(self.k), self.weights
        else:
            choices, p = components, None
        for start in range(0, n, 65536):
            m = min(65536, n - start)
            comp = rng.choice(choices, size=m, p=p)
            block = self.centers[comp] + self.spread[comp, None] * rng.standard_normal((m, self.dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            X[start : start + m] = block
            comp_all[start : start + m] = comp
        return X, comp_all


def pool_frame(first: int, n: int, comp: np.ndarray) -> Any:
    """The pool's rows (example_id, prompt, response, source) as the pool asset stores them; short texts."""
    import polars as pl

    idx = np.arange(first, first + n)
    return pl.DataFrame({
        "example_id": [f"ex{i:08d}" for i in idx.tolist()],
        "prompt": [f"Question {i} on topic {c}: what holds here?" for i, c in zip(idx.tolist(), comp.tolist(), strict=True)],
        "response": [f"Answer {i}: it depends on topic {c}." for i, c in zip(idx.tolist(), comp.tolist(), strict=True)],
        "source": ["synthetic"] * n,
    })


# --------------------------------------------------------------------------------------------------------
# One size through every stage that does not train
# --------------------------------------------------------------------------------------------------------


def _progress(echo: Callable[[str], None], what: str, total: int) -> Callable[[int], None]:
    t0 = last = time.perf_counter()

    def step(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done == total or now - last >= _PROGRESS_EVERY_S:
            rate = done / max(now - t0, 1e-9)
            echo(f"    {what} {done}/{total}, {rate:.1f}/s, about {(total - done) / max(rate, 1e-9):.0f} s left")
            last = now

    return step


def simulate_measurements(
    table: Any, cfg: ScaleConfig, rng: np.random.Generator
) -> tuple[Any, list[str], dict[int, np.ndarray]]:
    """Base correctness and each representative's correctness on D domains, paired per eval example.

    A leaf's true effect on domain d is a region, a parent and a leaf term; it flips wrong base answers to
    right (or right to wrong) with the probability that moves the domain's expected score by that effect, so
    leaf and base disagree on few examples, as a real adapter and its base model do.
    """
    from harp.models.evaluator import EvalResult

    D, E = cfg.domains, cfg.eval_per_domain
    domains = [f"domain{d:02d}" for d in range(D)]
    dom = np.repeat(np.arange(D), E)
    b = rng.uniform(0.2, 0.7, D)
    base_correct = (rng.random(D * E) < b[dom]).astype(np.float32)
    base = EvalResult(
        example_ids=[f"q{i:05d}" for i in range(D * E)], domains=[domains[d] for d in dom.tolist()],
        correct=base_correct, per_domain={domains[d]: float(base_correct[dom == d].mean()) for d in range(D)},
        seconds=0.0,
    )
    n_regions = int(table.region_of_parent.max()) + 1
    u = rng.normal(0.0, 0.05, (n_regions, D))
    v = rng.normal(0.0, 0.04, (table.n_parents, D))
    reps = np.flatnonzero(table.representative)
    parent = table.parent_of_leaf[reps]
    theta = u[table.region_of_parent[parent]] + v[parent] + rng.normal(0.0, 0.03, (reps.size, D))
    eff = theta[:, dom]  # (R, n_eval)
    bd = b[dom][None, :]
    up = np.clip(eff / (1.0 - bd), 0.0, 1.0)  # wrong -> right
    down = np.clip(-eff / bd, 0.0, 1.0)  # right -> wrong
    draw = rng.random(eff.shape)
    correct = np.where(base_correct[None, :] > 0, draw >= down, draw < up).astype(np.float64)
    return base, domains, {int(g): correct[i] for i, g in enumerate(reps.tolist())}


def run_size(n: int, cfg: ScaleConfig, work: Path, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every non-training stage on an n-example pool; returns the stage records and what each produced."""
    import polars as pl

    from harp import driver, stages, store
    from harp.config import HarpSettings
    from harp.io import atomic_write
    from harp.lineage import EXAMPLE_QUERIES, LineageStore, selection_id_for
    from harp.method import LeafTable
    from harp.method.ann import default_nlist, default_nprobe
    from harp.versions import content_hashes, leaf_data_version, sha16

    rec = Recorder(echo)
    echo = rec.echo
    load0 = os.getloadavg()[0]
    settings = HarpSettings(n_boot=cfg.n_boot, seed=cfg.seed,
                            **({"leaf_size": cfg.leaf_size} if cfg.leaf_size is not None else {}))
    budget = max(1, n // cfg.budget_divisor)
    n_new = max(1, round(cfg.growth * n))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    lineage = LineageStore(root=str(work / "harp"), keep_superseded_s=0.0)
    rng = np.random.default_rng([cfg.seed, n])
    echo(f"n={n:,}: budget {budget:,} points, growth {n_new:,} examples, work {work}")

    # -- the synthetic pool: texts, and embeddings supplied as a file ------------------------------------
    with rec.stage("generate_pool", SETUP) as info:
        mix = Mixture(n, cfg.dim, cfg.seed)
        X, comp = mix.rows(n, 1)
        emb_path = work / "embeddings.npy"
        with atomic_write(emb_path) as fh:  # fsynced, so its writeback does not spill into the next stages
            np.save(fh, X)
        X_new, comp_new = mix.rows(n_new, 2)
        pool = pool_frame(0, n, comp)
        arrivals = pool_frame(n, n_new, comp_new)
        # Proxy-set prompts (TSDS's queries): each domain asks about three topics of the pool.
        topics = np.random.default_rng([cfg.seed, 3]).choice(mix.k, size=(cfg.domains, 3))
        Q = np.concatenate([mix.rows(cfg.eval_per_domain, 10 + d, topics[d])[0] for d in range(cfg.domains)])
        info.update(components=mix.k, file_mib=round(emb_path.stat().st_size / 2**20, 1), queries=int(Q.shape[0]))
        del X, comp, comp_new
    version = sha16("scale", n, cfg.seed)

    # -- embeddings --------------------------------------------------------------------------------------
    with rec.stage("embeddings_import") as info:
        X = np.load(emb_path)
        store.write_embeddings(lineage, pool["example_id"].to_list(), X, _MODEL_ID, version)
        info.update(rows=int(X.shape[0]), dim=int(X.shape[1]))
        del X
    with rec.stage("embeddings_load") as info:
        ids, X, _ = store.load_embeddings(lineage)
        info.update(rows=int(X.shape[0]))

    # -- hierarchy and leaf table ------------------------------------------------------------------------
    with rec.stage("content_hashes"):
        content = content_hashes(pool["prompt"].to_list(), pool["response"].to_list())
    config = settings.hierarchy_config()
    with rec.stage("hierarchy_leaf_table") as info:
        update = stages.update_leaf_table(None, X, ids.tolist(), content, seed=settings.seed, config=config,
                                          max_leaf_size=settings.max_leaf_size)
        built = update.table
        sizes = built.leaf_sizes
        info.update(how=update.how, regions=int(np.unique(built.region_of_parent).size), parents=built.n_parents,
                    leaves=built.n_leaves, representatives=int(built.representative.sum()),
                    leaf_size_min_median_max=[int(sizes.min()), int(np.median(sizes)), int(sizes.max())])
    with rec.stage("leaf_table_save_load") as info:
        built.to_npz(store.leaf_table_path(lineage))
        table = LeafTable.from_npz(store.leaf_table_path(lineage))
        info.update(file_mib=round(store.leaf_table_path(lineage).stat().st_size / 2**20, 1))
    del built, update

    # -- growth: 1% new examples; measured leaves (the representatives) are frozen ---------------------
    reps = sorted(table.leaf_ids[table.representative].tolist())
    X_all = np.concatenate([X, X_new])
    ids_all = ids.tolist() + arrivals["example_id"].to_list()
    content_all = content + content_hashes(arrivals["prompt"].to_list(), arrivals["response"].to_list())
    with rec.stage("growth_1pct") as info:
        grown = stages.update_leaf_table(table, X_all, ids_all, content_all, seed=settings.seed, config=config,
                                         max_leaf_size=settings.max_leaf_size, frozen=reps, known_leaf_ids=reps)
        g = grown.growth
        info.update(how=grown.how, added=g.n_added, leaves_before=table.n_leaves, leaves_after=grown.table.n_leaves,
                    unchanged=len(g.unchanged), grown=len(g.grown), split=len(g.split), delta_leaves=len(g.delta),
                    deferred_to_delta=g.deferred)
    # Stable ids: every leaf id not split survives, and no frozen leaf's member set moved.
    after = grown.table
    kept_ids = set(after.leaf_ids.tolist())
    lost = [x for x in table.leaf_ids.tolist() if x not in kept_ids and x not in g.split]
    hashes_before = dict(zip(table.leaf_ids.tolist(), table.member_hashes().tolist(), strict=True))
    moved = [r for r in reps if after.member_hash(after.index_of(r)) != hashes_before[r]]
    if lost or moved or grown.how != "grown":
        raise RuntimeError(f"growth broke leaf identity: how={grown.how}, lost ids {lost[:5]}, moved frozen {moved[:5]}")
    rec.records[-1].info.update(ids_stable=True, frozen_unchanged=len(reps))
    del grown, after, g, X_all, ids_all, content_all, X_new, hashes_before

    # -- measurements (simulated), main effects and posteriors -----------------------------------------
    with rec.stage("warm_up_greedy", SETUP):
        # A compiled greedy kernel is built (or loaded from its on-disk cache) on first use in a process: a
        # fixed cost, kept out of the envelope stages so their growth with the pool shows.
        from harp.method.envelopes import ENVELOPES, greedy_taskaware

        toy = np.random.default_rng(0).normal(0.0, 0.05, (64, cfg.domains))
        for envelope in ENVELOPES:
            greedy_taskaware(toy, np.full(cfg.domains, 0.5), envelope)
    with rec.stage("simulate_measurements", SETUP) as info:
        base, domains, measurements = simulate_measurements(table, cfg, rng)
        b = stages.base_scores(base, domains)
        info.update(measured=len(measurements), domains=len(domains), eval_rows=len(base.example_ids))
    with rec.stage("posteriors") as info:
        fit = driver.fit_posteriors(table, measurements, base, domains, n_boot=settings.n_boot, seed=settings.seed)
        post = fit.posteriors
        info.update(leaves=int(post.mean.shape[0]), domains=int(post.mean.shape[1]), measured=int(post.n_measured),
                    effects_seconds=round(fit.effects_seconds, 3), posterior_seconds=round(fit.posterior_seconds, 3))

    # -- selections --------------------------------------------------------------------------------------
    chosen: dict[str, list[str]] = {}
    gains: dict[str, list[float] | None] = {}
    for method in driver.ENVELOPES:
        with rec.stage(f"envelope_{method}") as info:
            sel = driver.select_envelopes(post, b, table, top_k_points=budget, z_active=settings.z_active,
                                          methods=(method,))[method]
            chosen[method] = table.example_ids[sel.example_rows].tolist()
            gains[method] = np.asarray(sel.row_gain, dtype=np.float64).tolist()
            info.update(selected=sel.n_selected, leaves_ranked=int(np.asarray(sel.greedy.order).size),
                        stop_reason=sel.greedy.stop_reason, budget=budget)
    nlist = default_nlist(n)
    for variant in cfg.tsds:  # exact: what the tsds_selection asset runs; ivf: the approximate index
        with rec.stage(f"tsds_{variant}") as info:
            params = {**settings.tsds_params(), **({"exact": False} if variant == "ivf" else {})}
            tsel = stages.select_tsds(X, Q, budget, seed=settings.seed, params=params)
            counts = np.asarray(tsel.counts)
            picked = np.flatnonzero(counts > 0)
            order = picked[np.lexsort((picked, -counts[picked]))]  # most drawn first, as the asset orders them
            if "tsds" not in chosen:
                chosen["tsds"], gains["tsds"] = ids[order].tolist(), None
            info.update(queries=int(Q.shape[0]), distinct=int(order.size), stopped=bool(tsel.result.stopped),
                        K=tsel.result.K, kde_candidates=int(np.unique(tsel.result.neighbor_ids).size))
            if variant == "ivf":
                info.update(nlist=nlist, nprobe=default_nprobe(nlist))
        del tsel, counts, picked, order
    with rec.stage("random") as info:
        rsel = stages.select_random(n, budget, seed=settings.seed)
        chosen["random"], gains["random"] = ids[rsel.example_rows].tolist(), None
        info.update(selected=rsel.n_selected)
    del X

    # -- lineage tables, as the assets write them --------------------------------------------------------
    with rec.stage("lineage_leaves_examples") as info:  # the leaf_hierarchy asset's two tables
        cols = table.leaf_columns()
        lineage.write_table("leaves", pl.DataFrame({
            "leaf_id": cols["leaf_id"].tolist(),
            "parent_id": cols["parent_id"].tolist(),
            "region_id": [f"R{int(r):03d}" for r in cols["region"].tolist()],
            "size": cols["size"].astype(np.int32),
            "member_hash": cols["member_hash"].tolist(),
            "is_representative": cols["representative"].astype(bool),
            "pool_version": [version] * table.n_leaves,
        }))
        rank = np.empty(table.n_examples, dtype=np.int32)
        sizes = table.leaf_sizes
        for gi in range(table.n_leaves):
            rank[table.members(gi)] = np.arange(sizes[gi], dtype=np.int32)
        g_of = table.leaf_index_of_row
        now = dt.datetime.now(dt.timezone.utc)
        before = lineage.read_table("examples").select("example_id", "added_at")
        examples = (
            pl.DataFrame({
                "example_id": table.example_ids.tolist(),
                "leaf_id": table.leaf_ids[g_of].tolist(),
                "parent_id": table.parent_ids[table.parent_of_leaf[g_of]].tolist(),
                "region_id": [f"R{int(r):03d}" for r in table.region_of_parent[table.parent_of_leaf[g_of]].tolist()],
                "rank_in_leaf": rank,
            })
            .join(pool, on="example_id", how="left")
            .join(before, on="example_id", how="left")
            .with_columns(pl.lit(version).alias("pool_version"),
                          pl.col("added_at").fill_null(pl.lit(now).cast(pl.Datetime("us", "UTC"))))
            .join(pl.DataFrame({"example_id": table.example_ids.tolist(),
                                "content_hash": table.example_content.tolist()}), on="example_id", how="left")
        )
        lineage.write_table("examples", examples)
        info.update(leaves=table.n_leaves, examples=examples.height)
        del examples, before, rank

    key = {"benchmark": "scale_pool"}
    eval_hash = sha16(list(base.example_ids))
    hashes = table.member_hashes().tolist()
    versions = {leaf: leaf_data_version(hashes[gi], _BASE_ID, eval_hash, key, settings.seed)
                for gi, leaf in enumerate(table.leaf_ids.tolist())}
    run_id = f"scale-{n}-{cfg.seed}"
    D = len(domains)
    n_eval = {d: cfg.eval_per_domain for d in domains}
    with rec.stage("lineage_leaf_measurements") as info:  # per representative, as measure_leaf_partitions writes
        step = _progress(echo, "leaf partitions", len(measurements))
        now = dt.datetime.now(dt.timezone.utc)
        for i, gi in enumerate(fit.measured.tolist()):
            leaf = str(table.leaf_ids[gi])
            dv = versions[leaf]
            members = table.members(gi)
            store.write_leaf_measurement(
                lineage, leaf,
                pl.DataFrame({"example_id": base.example_ids, "domain": base.domains,
                              "correct": measurements[gi].astype(np.float32)}),
                pl.DataFrame({"leaf_id": [leaf] * members.size, "example_id": table.example_ids[members].tolist(),
                              "content_hash": table.example_content[members].tolist(),
                              "data_version": [dv] * members.size}),
                pl.DataFrame({
                    "leaf_id": [leaf] * D, "domain": domains,
                    "utility": fit.effects.leaf_score[i].tolist(), "base": b.tolist(),
                    "phi": fit.effects.phi_hat[i].tolist(),
                    "bootstrap_sd": np.sqrt(fit.effects.phi_var_raw[i]).tolist(),
                    "n_eval": [n_eval[x] for x in domains], "data_version": [dv] * D, "measured_at": [now] * D,
                    "train_seconds": [0.0] * D, "eval_seconds": [0.0] * D, "examples": [int(members.size)] * D,
                    "run_id": [run_id] * D, "member_hash": [hashes[gi]] * D,
                }, schema_overrides={"n_eval": pl.Int32, "examples": pl.Int32, "measured_at": pl.Datetime("us", "UTC")}),
            )
            step(i + 1)
        info.update(partitions=len(measurements), files=3 * len(measurements))
    with rec.stage("measurements_read") as info:  # what the phi_posteriors asset reads before fitting
        fresh, stale = store.read_measurements(lineage, versions)
        aligned = store.aligned_correctness(fresh, table, base)
        if sorted(aligned) != sorted(measurements) or stale:
            raise RuntimeError(f"stored measurements read back wrong: {len(aligned)} fresh, {len(stale)} stale")
        info.update(leaves_checked=len(versions), fresh=len(fresh))
        del fresh, aligned
    with rec.stage("lineage_phi_posteriors") as info:  # the phi_posteriors asset's table and artifact
        from harp.method import active_domains

        active = active_domains(post.mean, post.sd, z=settings.z_active)
        G = post.mean.shape[0]
        leaf_ids = table.leaf_ids.tolist()
        lineage.write_table("phi_posteriors", pl.DataFrame({
            "leaf_id": np.repeat(leaf_ids, D).tolist(), "domain": domains * G, "mean": post.mean.ravel().tolist(),
            "sd": post.sd.ravel().tolist(), "measured": np.repeat(post.measured, D).tolist(),
            "active_domain": np.tile(active, G).tolist(), "pool_version": [version] * (G * D),
        }))
        store.write_posteriors(lineage, post, leaf_ids, {"domains": domains, "measured_leaves": reps,
                                                          "stale_leaves": [], "active": active.tolist(),
                                                          "pool_version": version})
        info.update(rows=G * D)
    with rec.stage("lineage_selections") as info:  # record_selection for each method, then the run manifest
        for method, example_ids in chosen.items():
            row = {e: r for r, e in enumerate(table.example_ids.tolist())}
            gl = table.leaf_index_of_row[[row[e] for e in example_ids]] if example_ids else np.zeros(0, np.int32)
            now = dt.datetime.now(dt.timezone.utc)
            sid = selection_id_for(method, run_id, now)
            k = len(example_ids)
            df = pl.DataFrame({
                "selection_id": [sid] * k, "method": [method] * k, "rank": np.arange(1, k + 1, dtype=np.int32),
                "example_id": example_ids, "leaf_id": table.leaf_ids[gl].tolist(),
                "parent_id": table.parent_ids[table.parent_of_leaf[gl]].tolist(),
                "gain": gains[method] if gains[method] is not None else [None] * k,
                "predicted_utility": [None] * k, "budget": [budget] * k, "pool_version": [version] * k,
                "created_at": [now] * k, "run_id": [run_id] * k,
            }, schema_overrides={"gain": pl.Float64, "predicted_utility": pl.Float64, "budget": pl.Int32,
                                 "created_at": pl.Datetime("us", "UTC")})
            lineage.query("SELECT selection_id, example_id, leaf_id FROM latest_selections WHERE method = $m",
                          {"m": method})
            lineage.append_run("selections", sid, df, exist_ok=True)
        lineage.append_run("run_manifests", run_id, pl.DataFrame({
            "run_id": [run_id], "created_at": [dt.datetime.now(dt.timezone.utc)], "pool_version": [version],
            "embedder": [_MODEL_ID], "base_model": [_BASE_ID], "config_json": [settings.as_json()],
            "seed": [settings.seed], "train_eval_runs": [len(measurements)], "leaves_total": [table.n_leaves],
            "leaves_measured": [len(measurements)], "examples": [n], "seconds_json": ["{}"], "active_rounds": [0],
            "active_leaves": [0], "leaves_stored": [len(measurements)], "trained_since": [None],
        }, schema_overrides={"created_at": pl.Datetime("us", "UTC"), "train_eval_runs": pl.Int32,
                             "leaves_total": pl.Int32, "leaves_measured": pl.Int32, "active_rounds": pl.Int32,
                             "active_leaves": pl.Int32, "leaves_stored": pl.Int32,
                             "trained_since": pl.Datetime("us", "UTC")}), exist_ok=True)
        info.update({f"{m}_rows": len(v) for m, v in chosen.items()})
    with rec.stage("catalog_refresh") as info:
        info.update(files=lineage.refresh_catalog())

    # -- one query per catalog view and example query ---------------------------------------------------
    probe = chosen["harp_e"][0] if chosen["harp_e"] else chosen["random"][0]
    queries: list[tuple[str, str, dict[str, Any] | None]] = [
        ("selection_runs", "SELECT method, n_examples, committed FROM selection_runs", None),
        ("latest_selections", "SELECT method, count(*) AS n FROM latest_selections GROUP BY method", None),
        ("selection_explanations_all",
         "SELECT method, count(*) AS n, count(DISTINCT example_id) AS examples FROM selection_explanations "
         "GROUP BY method", None),
        ("selection_explanations_one", "SELECT * FROM selection_explanations WHERE example_id = $e", {"e": probe}),
        ("leaf_drift", "SELECT * FROM leaf_drift", None),  # what the leaf_hierarchy asset reads
        ("why_selected", EXAMPLE_QUERIES["why_selected"], {"example_id": probe}),
        ("measured_vs_inferred", EXAMPLE_QUERIES["measured_vs_inferred"], None),
        ("selection_diff", EXAMPLE_QUERIES["selection_diff"], {"method": "random"}),
    ]
    for name, sql, params in queries:
        with rec.stage(f"query_{name}") as info:
            out = lineage.query(sql, params)
            info.update(rows=out.height)
            if name == "selection_explanations_all":
                info.update(view_rows=int(out["n"].sum()))
            if name == "leaf_drift":
                info.update(drifted=int((out["drift"] > 0).sum()))

    if not cfg.keep_data:
        shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "memory_method": rec.memory.method, "settings": settings.model_dump(),
            "loadavg_1min_at_start": round(load0, 2),
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2), "stages": [asdict(r) for r in rec.records]}


# --------------------------------------------------------------------------------------------------------
# Machine facts, the driver and the report
# --------------------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: cores, memory, library versions, load when the run started."""
    import duckdb
    import faiss
    import polars as pl
    import psutil

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "numpy": np.__version__,
        "polars": pl.__version__,
        "duckdb": duckdb.__version__,
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


def _fmt_s(s: float) -> str:
    return f"{s:.2f}" if s < 10 else f"{s:.1f}" if s < 100 else f"{s:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """The committed page: machine facts, seconds and peak memory per stage and size, exponents and flags."""
    m, cfg = report["machine"], report["config"]
    runs = sorted(report["runs"], key=lambda r: r["n"])
    sizes = [r["n"] for r in runs]
    by_size = {r["n"]: {s["stage"]: s for s in r["stages"]} for r in runs}
    growth = {g["stage"]: g for g in report["growth"]}
    hs = runs[-1]["settings"] if runs else {}
    lines = [
        "# A pool of up to 1,000,000 examples through every stage that does not train",
        "",
        "Regenerate: `make bench-scale` (`python -m benchmarks.scale_pool`), on a machine doing nothing else. "
        f"Run {report['created_at']}.",
        "",
        f"Machine: {m['cpu_count_logical']} logical cores ({m['cpu_count_physical']} physical), {m['ram_gib']} GiB "
        f"RAM, {m['platform']}; Python {m['python']}, faiss {m['faiss']} ({m['faiss_threads']} threads), numpy "
        f"{m['numpy']}, polars {m['polars']}, duckdb {m['duckdb']}. Load average (1 min) at the start: "
        f"{m['loadavg_1min_at_start']}; per size: "
        + ", ".join(f"{r['n']:,}: {r['loadavg_1min_at_start']} -> {r['loadavg_1min_at_end']}" for r in runs) + ".",
        "",
        f"Pool: synthetic, {cfg['dim']}-dimensional unit-norm embeddings from a Gaussian mixture (one component per "
        f"2,000 rows) supplied as an .npy file; {cfg['domains']} domains x {cfg['eval_per_domain']} proxy "
        f"examples (the TSDS queries); hierarchy leaf size {hs['leaf_size']}, {hs['leaves_per_parent']} leaves per "
        f"parent, {hs['parents_per_region']} parents per region, {hs['n_representatives']} representatives per "
        f"parent, max leaf size {hs['max_leaf_size']} (the project's defaults unless `--leaf-size` was given), "
        f"{cfg['n_boot']} bootstrap resamples; point budget 1/{cfg['budget_divisor']} of the pool; growth "
        f"{cfg['growth']:.0%} of the pool "
        "with the representatives frozen. TSDS runs as the `tsds_selection` asset runs it (`tsds_exact`: flat "
        "indexes) and with its IVF index (`tsds_ivf`: `exact=False`, default nlist ~ 4 sqrt(n) and nprobe).",
        "",
        "Each size runs in a fresh process, stages one after another. Seconds are wall time (CPU seconds of the "
        "whole process in the JSON). Peak is the process's resident-memory high-water mark during the stage ("
        + ("reset before each stage through /proc/self/clear_refs" if runs and runs[0]["memory_method"] == "vmhwm"
           else "sampled every 5 ms")
        + "); it includes what earlier stages still hold, so the memory a stage adds is peak minus its starting "
        "resident size (in brackets).",
        "",
    ]
    head = "| stage | " + " | ".join(f"{n:,}: s | {n:,}: peak MiB (+added)" for n in sizes)
    head += " | time exponent | cpu exponent | memory exponent | flags |"
    lines += [head, "|---|" + "---|---|" * len(sizes) + "---|---|---|---|"]
    order = [s["stage"] for s in runs[-1]["stages"]] if runs else []
    for name in order:
        cells = []
        for n in sizes:
            s = by_size[n].get(name)
            if s is None:
                cells += ["", ""]
                continue
            added = max(s["peak_rss_mib"] - s["rss_start_mib"], 0.0)
            cells += [_fmt_s(s["seconds"]), f"{s['peak_rss_mib']:,.0f} (+{added:,.0f})"]
        g = growth.get(name, {})
        label = name + (" (setup)" if g.get("kind") == SETUP else "")

        def ex(v: float | None) -> str:
            return "" if v is None else f"{v:.2f}"

        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ex(g.get('time_exponent'))} | "
                     f"{ex(g.get('cpu_exponent'))} | {ex(g.get('memory_exponent'))} | "
                     f"{', '.join(g.get('flags', [])) or ''} |")
    totals = [sum(s["seconds"] for s in by_size[n].values() if s["kind"] == PIPELINE) for n in sizes]
    peaks = [max(s["peak_rss_mib"] for s in by_size[n].values()) for n in sizes]
    lines += [
        "",
        "Pipeline stages in all (setup excluded): " + ", ".join(
            f"{n:,}: {_fmt_s(t)} s, peak {p / 1024:.2f} GiB" for n, t, p in zip(sizes, totals, peaks, strict=True)) + ".",
        "",
        f"Exponent: least-squares slope of log(value) on log(pool size) over the sizes (1 linear, 2 quadratic). A "
        f"pipeline stage is flagged `time` above {report['threshold']} when it takes at least "
        f"{report['min_seconds']} s at the largest size, `memory` when the memory it adds grows that fast and "
        f"reaches {report['min_mib']:g} MiB, and `over {report['mem_limit_gib']:g} GiB` past that peak.",
        "",
    ]
    flagged = [g for g in report["growth"] if g["flags"]]
    if flagged:
        lines.append("Flagged: " + "; ".join(f"{g['stage']} ({', '.join(g['flags'])}; time x{g['time_ratio']} for "
                                             f"size x{g['size_ratio']})" for g in flagged) + ".")
    else:
        lines.append("Nothing flagged: no stage grows faster than the threshold.")
    lines.append("")
    lines.append("What each stage made at the largest size:")
    lines.append("")
    for name in order:
        info = by_size[sizes[-1]][name]["info"]
        if info:
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return "\n".join(lines) + "\n"


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in value.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {value!r}") from exc
    if not sizes or min(sizes) < 100:
        raise argparse.ArgumentTypeError(f"--sizes wants integers >= 100, got {value!r}")
    return sorted(set(sizes))


def _tsds(value: str) -> tuple[str, ...]:
    out = tuple(v.strip() for v in value.split(",") if v.strip())
    if not out or set(out) - {"exact", "ivf"} or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"--tsds wants exact, ivf or exact,ivf; got {value!r}")
    return out


def build_report(runs: list[dict[str, Any]], cfg: ScaleConfig, machine: dict[str, Any], *, threshold: float,
                 min_seconds: float, min_mib: float, mem_limit_gib: float) -> dict[str, Any]:
    """The JSON report: configuration, machine, every run's stages, and the growth table."""
    return {
        "benchmark": "scale_pool",
        "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": asdict(cfg),
        "machine": machine,
        "threshold": threshold,
        "min_seconds": min_seconds,
        "min_mib": min_mib,
        "mem_limit_gib": mem_limit_gib,
        "runs": sorted(runs, key=lambda r: r["n"]),
        "growth": growth_table(runs, threshold=threshold, min_seconds=min_seconds, min_mib=min_mib,
                               mem_limit_gib=mem_limit_gib),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="comma-separated pool sizes")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--domains", type=int, default=57)
    ap.add_argument("--eval-per-domain", type=int, default=40)
    ap.add_argument("--budget-divisor", type=int, default=7, help="point budget = pool size // this")
    ap.add_argument("--growth", type=float, default=0.01, help="share of the pool added in the growth stage")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leaf-size", type=int, default=None, help="hierarchy leaf size (default: the project's)")
    ap.add_argument("--tsds", type=_tsds, default=("exact", "ivf"),
                    help="TSDS variants: exact (what the asset runs), ivf, or both (exact,ivf)")
    ap.add_argument("--threshold", type=float, default=1.3, help="flag stages growing faster than n^threshold")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="shorter stages (at the largest size) are not flagged")
    ap.add_argument("--min-mib", type=float, default=64.0)
    ap.add_argument("--mem-limit-gib", type=float, default=16.0)
    ap.add_argument("--work", type=Path, default=ROOT / "reports" / "scale", help="working files (removed after)")
    ap.add_argument("--keep-data", action="store_true", help="keep the embeddings file and lineage store")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark" / "scale",
                    help="report path without suffix (.json and .md are written)")
    ap.add_argument("--report-only", action="store_true", help="rewrite <out>.md from <out>.json; run nothing")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from harp.io import write_json, write_text

    logging.basicConfig(level=logging.INFO, format="    %(name)s: %(message)s", stream=sys.stderr)
    cfg = ScaleConfig(dim=args.dim, domains=args.domains, eval_per_domain=args.eval_per_domain,
                      budget_divisor=args.budget_divisor, growth=args.growth, seed=args.seed, n_boot=args.n_boot,
                      keep_data=args.keep_data, tsds=args.tsds, leaf_size=args.leaf_size)
    if args.worker is not None:
        write_json(args.result, run_size(args.worker, cfg, args.work / f"n{args.worker}"))
        return 0
    if args.report_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        write_text(args.out.with_suffix(".md"), markdown(report))
        return 0

    machine = machine_facts()
    runs = []
    for n in args.sizes:
        result_path = args.work / f"result-{n}.json"
        cmd = [sys.executable, "-m", "benchmarks.scale_pool", f"--worker={n}", f"--result={result_path}",
               f"--dim={args.dim}", f"--domains={args.domains}", f"--eval-per-domain={args.eval_per_domain}",
               f"--budget-divisor={args.budget_divisor}", f"--growth={args.growth}", f"--n-boot={args.n_boot}",
               f"--seed={args.seed}", f"--tsds={','.join(args.tsds)}", f"--work={args.work}",
               *([f"--leaf-size={args.leaf_size}"] if args.leaf_size is not None else []), *(["--keep-data"] if args.keep_data else [])]
        print(f"size {n:,}: worker starting", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            print(f"size {n:,}: worker failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode or 1
        runs.append(json.loads(result_path.read_text()))
        print(f"size {n:,}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    report = build_report(runs, cfg, machine, threshold=args.threshold, min_seconds=args.min_seconds,
                          min_mib=args.min_mib, mem_limit_gib=args.mem_limit_gib)
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
