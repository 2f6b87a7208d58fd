"""The one driver of a HARP run: which leaves to measure, effects -> posteriors -> selections, active rounds.

Every caller runs the same sequence through these functions: `harp()` in one process, the Dagster assets
step by step (the asset graph and `harp_assets.runner.run_harp`), the sensors that chain the jobs, and the
quality benchmark. What differs between them is only how a leaf gets measured (in process, as Dagster leaf
partitions, or from a benchmark's cache), which `drive_rounds` takes as a function.

    measure(representatives) -> fit -> [plan a round -> measure its leaves -> fit] x rounds -> select
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from harp import backends, stages, store
from harp.backends import LeafExecution
from harp.config import HarpSettings
from harp.lineage import LineageStore
from harp.method import (
    ActiveRound,
    HarpSelection,
    Hierarchy,
    MainEffects,
    Posteriors,
    active_domains,
    choose_active_leaves,
)
from harp.method.active import choose_decision_leaves
from harp.method.posteriors import fit_kernel_posteriors
from harp.versions import base_scores_key

# Envelope names of the two HARP selections, by method key.
ENVELOPES: dict[str, str] = {"harp_c": "conservative", "harp_e": "expansive"}


# --------------------------------------------------------------------------------------------------------
# Fit and select: effects -> posteriors -> selections
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Main effects of the measured leaves and the posteriors of every leaf, fitted from them."""

    effects: MainEffects
    posteriors: Posteriors
    measured: np.ndarray  # leaf indices, ascending; row i of `effects` is leaf measured[i]
    effects_seconds: float  # the bootstrap of main effects
    posterior_seconds: float  # the empirical-Bayes fit

    @property
    def seconds(self) -> float:
        return self.effects_seconds + self.posterior_seconds


def fit_posteriors(
    hierarchy: Hierarchy,
    measurements: Mapping[int, Any],
    base: Any,
    domains: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    options: Mapping[str, Any] | None = None,
) -> Fit:
    """Bootstrap main effects of the measured leaves, then empirical-Bayes posteriors of every leaf.

    `measurements`: leaf index -> `LeafMeasurement` or correctness aligned with the base evaluation.
    `options`: the posterior model's options, `HarpSettings.posterior_options()` (none: the reference tree).
    """
    t0 = time.perf_counter()
    if not measurements:
        raise ValueError("no leaf measurements: measure at least one leaf before fitting posteriors")
    measured = np.array(sorted(measurements), dtype=np.int64)
    effects = stages.main_effects(measurements, base, domains, n_boot=n_boot, seed=seed)
    t1 = time.perf_counter()
    post = posterior_fit(hierarchy, effects, measured, options)
    if not (np.isfinite(post.mean).all() and np.isfinite(post.sd).all()):
        raise ValueError("posteriors are not finite: check the leaf measurements")
    return Fit(effects=effects, posteriors=post, measured=measured, effects_seconds=t1 - t0,
               posterior_seconds=time.perf_counter() - t1)


def posterior_fit(hierarchy: Any, effects: MainEffects, measured: Any,
                  options: Mapping[str, Any] | None = None) -> Posteriors:
    """The posteriors of every leaf from measured effects, with the model `options` name
    (`prior`: "tree" or "kernel"; `min_measured_regions`)."""
    opts = dict(options or {})
    prior = opts.pop("prior", "tree")
    if prior == "tree":
        return stages.infer_posteriors(hierarchy, effects, measured, **opts)
    if prior != "kernel":
        raise ValueError(f"unknown posterior prior {prior!r}; valid priors are ['tree', 'kernel']")
    phi, var, flags = effects.to_leaves(np.asarray(measured), hierarchy.n_leaves)
    return fit_kernel_posteriors(phi, var, flags, hierarchy.parent_of_leaf, hierarchy.region_of_parent,
                                 hierarchy.leaf_centroids, **opts)


def select_envelopes(
    post: Posteriors,
    base_scores: Any,
    hierarchy: Hierarchy,
    *,
    top_k_points: int | None,
    z_active: float,
    methods: Sequence[str] = tuple(ENVELOPES),
    exclude_rows: Any = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, HarpSelection]:
    """The HARP selections (`harp_c`, `harp_e`) from one set of posteriors, under one point budget;
    `exclude_rows` (pool rows the contamination guard flagged) are never selected; `options` are the
    risk-aware envelope's, `HarpSettings.selection_options()` (none: plug-in means)."""
    return {
        m: stages.select_harp(post, base_scores, hierarchy, envelope=ENVELOPES[m], top_k_points=top_k_points,
                              z_active=z_active, exclude_rows=exclude_rows, **dict(options or {}))
        for m in methods
    }


def plan_active_round(
    post: Posteriors, base_scores: Any, hierarchy: Hierarchy, settings: HarpSettings, *, runs: int | None = None
) -> ActiveRound:
    """The next round's leaf indices: unmeasured leaves the primary envelope's selection relies on first,
    then those with the largest posterior sd times possible gain (`method.active`); with
    `settings.active_rule` "thompson" or "knowledge_gradient", the leaves whose measurement can change the
    selection (`method.active.decision_scores`, seeded by `settings.seed` and the number measured)."""
    n = settings.active_runs if runs is None else runs
    active = active_domains(post.mean, post.sd, z=settings.z_active)
    if settings.active_rule != "verify_upside":
        return choose_decision_leaves(
            post.mean, post.sd, post.measured, n, np.asarray(base_scores, dtype=np.float64),
            np.diff(np.asarray(hierarchy.leaf_offsets)), envelope=settings.primary_envelope,
            top_k_points=settings.top_k_points, rule=settings.active_rule, active=active,
            n_samples=settings.active_samples, seed=settings.seed + int(post.n_measured))
    current = stages.select_harp(post, base_scores, hierarchy, envelope=settings.primary_envelope,
                                 top_k_points=settings.top_k_points, z_active=settings.z_active,
                                 **settings.selection_options())
    selected = np.unique(np.asarray(current.leaf_of_row, dtype=np.int64))
    return choose_active_leaves(post.mean, post.sd, post.measured, n, active, z=settings.active_z, selected=selected)


@dataclass(frozen=True)
class Round:
    """One measuring round: the leaves it measured (round 0: the representatives) and its wall seconds."""

    number: int
    leaves: list[Any]
    seconds: float


def drive_rounds(
    first: Sequence[Any],
    measure: Callable[[Sequence[Any]], None],
    refit: Callable[[int], Sequence[Any]],
    *,
    max_rounds: int,
) -> list[Round]:
    """Measure `first`, refit, then measure each round's leaves that `refit` returns, up to `max_rounds` rounds.

    `refit(round_number)` fits the posteriors on everything measured so far and returns the next round's
    leaves (empty: stop). Returns the rounds in order; the last fit is the one a caller selects from.
    """
    rounds: list[Round] = []
    leaves = list(first)
    while True:
        t0 = time.perf_counter()
        measure(leaves)
        nxt = list(refit(len(rounds)))
        rounds.append(Round(number=len(rounds), leaves=leaves, seconds=time.perf_counter() - t0))
        if not nxt or len(rounds) > max_rounds:
            return rounds
        leaves = nxt


# --------------------------------------------------------------------------------------------------------
# Leaf partitions on the artifact store: what is current, stale or pending, and measuring them
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeafOutcome:
    """What happened to one requested leaf partition: trained now, or already up to date."""

    leaf_id: str
    trained: bool
    data_version: str
    examples: int
    seconds: float
    member_hash: str = ""
    phi: dict[str, float] = field(default_factory=dict)


def measure_leaf_partitions(
    lineage: LineageStore,
    finetuner: Any,
    evaluator: Any,
    settings: HarpSettings,
    keys: Sequence[str],
    *,
    run_id: str,
    execution: LeafExecution | None = None,
    log: Any = None,
) -> Iterator[LeafOutcome]:
    """Measure each requested leaf whose stored data version is not the expected one, writing its
    correctness and lineage rows; yields one outcome per key as soon as it is done (the up-to-date ones
    first, then the trained ones in the order they finish).

    `execution` says where the cycles run (default: in this process; `harp.backends`). A leaf that fails
    every attempt raises `LeafExecutionError` naming it, after every other leaf was written.
    """
    table = store.load_leaf_table(lineage)
    pool, _ = store.load_pool_artifact(lineage)
    eval_set, _ = store.load_eval_artifact(lineage)
    base, meta = store.load_base(lineage, base_scores_key(finetuner, evaluator))
    domains = list(meta["domains"])
    b = stages.base_scores(base, domains)
    versions = store.leaf_versions(lineage, finetuner, evaluator, settings.seed)
    by_id = {eid: k for k, eid in enumerate(pool["example_id"].to_list())}
    missing = [e for e in table.example_ids.tolist() if e not in by_id]
    if missing:
        raise ValueError(f"the leaf table names {len(missing)} example(s) absent from the pool, e.g. {missing[:3]}")
    rows = [by_id[e] for e in table.example_ids.tolist()]
    prompts = pool["prompt"].gather(rows).to_list()
    responses = pool["response"].gather(rows).to_list()
    n_eval = {d: int(c) for d, c in zip(*np.unique(np.asarray(base.domains), return_counts=True), strict=True)}
    index: dict[str, int] = {}
    for key in keys:
        try:
            index[key] = table.index_of(key)
        except KeyError:
            raise ValueError(
                f"leaf partition {key!r} is not in the current leaf table (retired by a split?); "
                "materialise only current leaf ids"
            ) from None
    jobs = []
    stored = store.stored_versions(lineage, list(index))
    for key, g in index.items():
        if stored[key] == versions[key]:
            yield LeafOutcome(leaf_id=key, trained=False, data_version=versions[key],
                              examples=int(table.leaf_sizes[g]), seconds=0.0, member_hash=table.member_hash(g))
        else:
            jobs.append(backends.LeafJob(key, *stages.leaf_examples(table, prompts, responses, g)))
    for key, m in backends.run_leaves(execution, finetuner, evaluator, jobs, eval_set, seed=settings.seed, log=log):
        g, dv = index[key], versions[key]
        effects = stages.main_effects({0: m}, base, domains, n_boot=settings.n_boot, seed=settings.seed)
        now = dt.datetime.now(dt.timezone.utc)
        d = len(domains)
        members = table.members(g)
        member_frame = pl.DataFrame({
            "leaf_id": [key] * members.size,
            "example_id": table.example_ids[members].tolist(),
            "content_hash": table.example_content[members].tolist(),
            "data_version": [dv] * members.size,
        })
        store.write_leaf_measurement(lineage, key, m.to_frame(), member_frame, pl.DataFrame({
            "leaf_id": [key] * d,
            "domain": domains,
            "utility": [float(m.per_domain[x]) for x in domains],
            "base": b.tolist(),
            "phi": effects.phi_hat[0].tolist(),
            "bootstrap_sd": np.sqrt(effects.phi_var_raw[0]).tolist(),
            "n_eval": [n_eval[x] for x in domains],
            "data_version": [dv] * d,
            "measured_at": [now] * d,
            "train_seconds": [m.train_seconds] * d,
            "eval_seconds": [m.eval_seconds] * d,
            "examples": [m.n_train] * d,
            "run_id": [run_id] * d,
            "member_hash": [table.member_hash(g)] * d,
        }, schema_overrides={"n_eval": pl.Int32, "examples": pl.Int32, "measured_at": pl.Datetime("us", "UTC")}))
        yield LeafOutcome(leaf_id=key, trained=True, data_version=dv, examples=m.n_train, seconds=m.seconds,
                          member_hash=table.member_hash(g), phi=dict(zip(domains, effects.phi_hat[0].tolist(), strict=True)))


def stale_harp_leaves(lineage: LineageStore, finetuner: Any, evaluator: Any, settings: HarpSettings) -> list[str]:
    """HARP's leaves (representatives and active-round picks) never measured or with a stale data version."""
    versions = store.leaf_versions(lineage, finetuner, evaluator, settings.seed)
    leaves = sorted(store.harp_leaves(lineage))
    stored = store.stored_versions(lineage, leaves)
    return [leaf for leaf in leaves if stored[leaf] != versions[leaf]]


def pending_active_leaves(lineage: LineageStore, finetuner: Any, evaluator: Any, settings: HarpSettings) -> list[str]:
    """Leaves an active round planned that have no up-to-date measurement yet."""
    versions = store.leaf_versions(lineage, finetuner, evaluator, settings.seed)
    planned = store.planned_leaves(lineage)
    stored = store.stored_versions(lineage, list(planned))
    return [leaf for leaf in planned if stored[leaf] != versions[leaf]]


def posteriors_current(lineage: LineageStore, finetuner: Any, evaluator: Any, settings: HarpSettings) -> bool:
    """Whether the stored posteriors were fitted on the current leaves, pool and up-to-date measurements."""
    meta = store.posteriors_meta(lineage)
    if meta is None:
        return False
    versions = store.leaf_versions(lineage, finetuner, evaluator, settings.seed)
    wanted = store.harp_leaves(lineage)
    candidates = [leaf for leaf in versions if leaf in wanted]
    stored = store.stored_versions(lineage, candidates)
    fresh = sorted(leaf for leaf in candidates if stored[leaf] == versions[leaf])
    return meta.get("pool_version") == store.stored_pool_version(lineage) and sorted(
        meta.get("measured_leaves", [])) == fresh


def partition_ranges(registered: Sequence[str], wanted: set[str]) -> list[tuple[str, str]]:
    """Contiguous runs of `wanted` keys in the registered partition order, as (start, end) pairs."""
    ranges: list[tuple[str, str]] = []
    start = prev = None
    for key in registered:
        if key in wanted:
            start = key if start is None else start
            prev = key
        elif start is not None:
            ranges.append((start, prev))  # type: ignore[arg-type]
            start = None
    if start is not None:
        ranges.append((start, prev))  # type: ignore[arg-type]
    return ranges
