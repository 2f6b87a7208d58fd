"""HARP's pipeline stages as plain typed functions, shared by the Dagster assets and the `harp()` entry point.

Each stage does one step and returns a small result (numpy arrays, polars frames, plain dicts) that is easy
to persist, so the asset graph and the one-call entry point run the same code. Nothing here imports Dagster:
resources are taken as plain objects (a `LoraFinetuner`, an `Evaluator`).

Domain indexing: a domain's index is its position in the sorted list of the eval set's distinct domain
names (`eval_domains`). Sorting makes the mapping independent of eval-row order, so every stage (and every
persisted array with a domain axis) agrees on it.

Leaf measurements use the same training seed for every leaf: the adapter starts from the same weights and
sees batches in the same seeded order, so differences between leaves come from their data, not from noise
in the initialisation (common random numbers).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from harp.backends import LeafExecution, LeafJob, LeafMeasurement, measure_leaf, run_leaves
from harp.method import (
    GrowthResult,
    HarpSelection,
    Hierarchy,
    LeafTable,
    MainEffects,
    Posteriors,
    TsdsSelection,
    bootstrap_main_effects,
    build_parent_leaf_hierarchy,
    embedding_matches,
    fit_posteriors,
    grow_leaf_table,
    harp_select,
    leaf_table_from_hierarchy,
    ngram_matches,
    random_selection,
    tree_generation,
    tsds_select,
    without_rows,
)
from harp.method.less import CountSketch, LessScores, adam_direction, less_scores, less_select
from harp.models.evaluator import EvalResult, Evaluator, parse_eval_set
from harp.models.finetuner import LoraFinetuner
from harp.progress import LogTarget, Progress, emit

__all__ = [
    "HIERARCHY_KEYS",
    "LeafMeasurement",
    "LogTarget",
    "RandomSelection",
    "base_scores",
    "build_hierarchy",
    "check_tokenizer",
    "domain_index",
    "emit",
    "eval_domains",
    "infer_posteriors",
    "leaf_examples",
    "main_effects",
    "measure_leaf",
    "measure_leaves",
    "score_base",
    "select_harp",
    "select_random",
    "select_tsds",
    "validate_examples",
]

logger = logging.getLogger("harp.stages")


# Keyword arguments of build_parent_leaf_hierarchy that a hierarchy config may set (the seed comes apart).
HIERARCHY_KEYS: tuple[str, ...] = (
    "leaf_size",
    "leaves_per_parent",
    "parents_per_region",
    "n_representatives",
    "min_leaf_size",
    "niter",
    "use_gpu",
    "representative_rule",
)


# --------------------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------------------


def eval_domains(source: Any) -> list[str]:
    """The ordered domain list: sorted distinct domain names of an eval set, `EvalResult` or name list."""
    if isinstance(source, EvalResult):
        names = source.domains
    elif (
        isinstance(source, Sequence)
        and not isinstance(source, str)
        and all(isinstance(d, str) for d in source)
    ):
        names = list(source)
    else:
        names = [item.domain for item in parse_eval_set(source)]
    if not names:
        raise ValueError("no domains: the eval set is empty")
    return sorted(set(names))


def _check_domains(domains: Sequence[str]) -> list[str]:
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise TypeError(f"domains must be a sequence of domain names, got {type(domains).__name__}")
    out = list(domains)
    if not out:
        raise ValueError("domains is empty: need at least one domain")
    bad = [d for d in out if not isinstance(d, str) or not d]
    if bad:
        raise ValueError(f"domains must be non-empty strings, got {bad[:5]!r}")
    dups = sorted(d for d, c in Counter(out).items() if c > 1)
    if dups:
        raise ValueError(f"domains repeats {dups[:5]!r}: each domain must appear once")
    return out


def domain_index(
    row_domains: Sequence[str], domains: Sequence[str], *, example_ids: Sequence[str] | None = None
) -> np.ndarray:
    """Index into `domains` of each eval row's domain (int64); an unknown domain names its row."""
    domains = _check_domains(domains)
    pos = {d: i for i, d in enumerate(domains)}
    out = np.empty(len(row_domains), dtype=np.int64)
    for i, d in enumerate(row_domains):
        j = pos.get(d)
        if j is None:
            who = f" (example_id={example_ids[i]!r})" if example_ids is not None else ""
            raise ValueError(
                f"eval row {i}{who} has domain {d!r}, which is not in the domain list {domains!r}"
            )
        out[i] = j
    return out


def base_scores(base: EvalResult, domains: Sequence[str]) -> np.ndarray:
    """`b_d` in `domains` order, from the base model's evaluation."""
    domains = _check_domains(domains)
    missing = [d for d in domains if d not in base.per_domain]
    if missing:
        raise ValueError(
            f"the base evaluation has no score for domain(s) {missing!r}; "
            f"it covers {sorted(base.per_domain)!r}"
        )
    return np.array([base.per_domain[d] for d in domains], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# Stage 1a: hierarchy
# --------------------------------------------------------------------------------------------------------


def build_hierarchy(X_feat: Any, *, seed: int = 0, config: Mapping[str, Any] | None = None) -> Hierarchy:
    """Large -> parent -> leaf hierarchy over the pool embeddings; `config` holds the sizing keywords."""
    cfg = dict(config or {})
    unknown = sorted(set(cfg) - set(HIERARCHY_KEYS))
    if unknown:
        hint = " (the seed is its own argument)" if "seed" in unknown else ""
        raise ValueError(
            f"unknown hierarchy setting(s) {unknown}{hint}; valid settings are {list(HIERARCHY_KEYS)}"
        )
    return build_parent_leaf_hierarchy(X_feat, seed=seed, **cfg)


@dataclass(frozen=True)
class LeafTableUpdate:
    """The leaf table for the current pool and how it came about.

    `how`: built (first time), unchanged, grown (examples only added), updated (some removed or edited:
    `growth` says which leaves), or rebuilt (`reason` says why; every cached measurement goes stale).
    """

    table: LeafTable
    how: str
    growth: GrowthResult | None = None
    reason: str | None = None


def update_leaf_table(
    previous: LeafTable | None,
    X: np.ndarray,
    example_ids: Sequence[str],
    content: Sequence[str],
    *,
    seed: int,
    config: Mapping[str, Any],
    max_leaf_size: int,
    frozen: Sequence[str] = (),
    known_leaf_ids: Sequence[str] = (),
    rebuild_reason: str | None = None,
) -> LeafTableUpdate:
    """The leaf table for a pool that may have changed since `previous` was made.

    Measured leaves (`frozen`) keep their member sets exactly: examples that arrive near them gather in
    delta leaves (`harp.method.growth`), so a pool that grows retrains nothing it already measured, and a
    removed or edited example makes only its own leaf stale. Only another embedding dimension (or a
    `rebuild_reason` from the caller, such as an unreadable table) builds the tree again, under ids of a new
    generation (`known_leaf_ids`: every leaf id with a stored measurement, so none is reused).
    """
    ids = np.asarray(list(example_ids), dtype=str)
    hashes = np.asarray(list(content), dtype=str)
    # Leaf ids seen before (the previous tree's, and any with a stored measurement): a rebuild names its
    # leaves in a new generation, so a stored measurement never meets another member set under its id.
    seen = [*(previous.leaf_ids.tolist() if previous is not None else []), *known_leaf_ids]

    def build(how: str, reason: str | None) -> LeafTableUpdate:
        h = build_hierarchy(X, seed=seed, config=config)
        generation = 1 + max(map(tree_generation, seen)) if seen else 0
        return LeafTableUpdate(leaf_table_from_hierarchy(h, ids, hashes, generation), how, None, reason)

    if previous is None:
        return build("rebuilt", rebuild_reason) if rebuild_reason else build("built", None)
    if previous.dim != X.shape[1]:
        return build("rebuilt", f"the embedding dimension changed ({previous.dim} -> {X.shape[1]})")
    before = set(zip(previous.example_ids.tolist(), previous.example_content.tolist(), strict=True))
    now = set(zip(ids.tolist(), hashes.tolist(), strict=True))
    if before == now:
        return LeafTableUpdate(previous, "unchanged")
    if not before & now:
        return build("rebuilt", "no example of the previous pool is left unchanged")
    live = set(previous.leaf_ids.tolist())
    growth = grow_leaf_table(
        previous, X, ids, content_all=hashes, frozen=[f for f in frozen if f in live],
        max_leaf_size=max_leaf_size, n_representatives=int(config.get("n_representatives", 1)), seed=seed,
    )
    how = "grown" if growth.n_removed == growth.n_edited == 0 else "updated"
    return LeafTableUpdate(growth.table, how, growth)


# --------------------------------------------------------------------------------------------------------
# Base model score and leaf measurements
# --------------------------------------------------------------------------------------------------------


def _check_pair(finetuner: LoraFinetuner, evaluator: Evaluator) -> None:
    if finetuner.separator != evaluator.separator:
        raise ValueError(
            f"finetuner.separator={finetuner.separator!r} differs from evaluator.separator="
            f"{evaluator.separator!r}: training and scoring would see different prompts"
        )


def check_tokenizer(finetuner: LoraFinetuner, tokenizer: Any) -> None:
    """Fail when a caller's tokenizer would encode differently from the base model's own tokenizer.

    Training and scoring always use the tokenizer saved with the base model; a different one handed in
    alongside it signals a mismatch between the caller's features and the model, caught here early.
    """
    if tokenizer is None:
        return
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    own = finetuner.tokenizer
    if tokenizer.get_vocab() != own.get_vocab():
        raise ValueError(
            f"the given tokenizer ({len(tokenizer.get_vocab())} tokens) does not match the tokenizer of "
            f"base model {finetuner.base_model!r} ({len(own.get_vocab())} tokens); pass the model's own "
            "tokenizer or none"
        )


def score_base(finetuner: LoraFinetuner, evaluator: Evaluator, eval_set: Any) -> EvalResult:
    """The null scores `b_d`: the base model with every adapter disabled, on the proxy set.

    It goes through the finetuner so the base loaded here is the one the leaf loop then reuses.
    """
    _check_pair(finetuner, evaluator)
    evaluator.check_backend()
    with finetuner.base_for_eval() as (model, tok):
        if evaluator.backend == "vllm":
            return evaluator.evaluate(
                model, tok, eval_set, base_model_path=finetuner.base_model, adapter_path=None
            )
        return evaluator.evaluate(model, tok, eval_set)


def validate_examples(
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    prompts: Sequence[str],
    responses: Sequence[str],
    test_set: Any,
    *,
    seed: int,
) -> LeafMeasurement:
    """A selection's validated utility: train a fresh adapter on it and score the held-out test split.

    The same cycle as a leaf measurement, with the validation recipe and the test split in place of the
    proxy set. An empty selection (HARP may rightly pick nothing) is the base model itself, with no training.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if len(prompts):
        return measure_leaf(finetuner, evaluator, prompts, responses, test_set, seed=seed)
    t0 = time.perf_counter()
    result = score_base(finetuner, evaluator, test_set)
    return LeafMeasurement(
        example_ids=tuple(result.example_ids),
        domains=tuple(result.domains),
        correct=np.asarray(result.correct, dtype=np.float32).copy(),
        per_domain=dict(result.per_domain),
        n_train=0,
        train_steps=0,
        train_tokens=0,
        first_loss=float("nan"),
        last_loss=float("nan"),
        train_seconds=0.0,
        eval_seconds=result.seconds,
        seconds=time.perf_counter() - t0,
        seed=int(seed),
    )


def leaf_examples(
    hierarchy: Hierarchy, prompts: Sequence[str], responses: Sequence[str], leaf_id: int
) -> tuple[list[str], list[str]]:
    """A leaf's (prompts, responses) from the whole pool, nearest the leaf centroid first.

    The one place that decides which rows, in which order, a leaf trains on, so that a leaf measured
    alone (one Dagster partition) and in the loop below sees the same batches.
    """
    if len(prompts) != hierarchy.n_examples or len(responses) != hierarchy.n_examples:
        raise ValueError(
            f"the hierarchy covers {hierarchy.n_examples} pool rows but {len(prompts)} prompts and "
            f"{len(responses)} responses were given"
        )
    rows = hierarchy.members(int(leaf_id)).tolist()
    return [prompts[r] for r in rows], [responses[r] for r in rows]


def embed_text(prompt: str, response: str) -> str:
    """What a pool example is embedded as: the prompt and its response, so leaves group by both."""
    return f"{prompt}\n{response}"


def eval_item_texts(eval_set: pl.DataFrame) -> list[str]:
    """Eval items embedded the way pool examples are: the prompt and its correct answer.

    TSDS's queries and the contamination guard compare these with pool embeddings; a prompt-only query would
    sit in another part of the space than the (prompt, response) candidates it is matched against.
    """
    return [embed_text(p, a) for p, a in zip(eval_set["prompt"].to_list(), eval_set["answer_text"].to_list(),
                                             strict=True)]


def measure_leaves(
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    hierarchy: Hierarchy,
    prompts: Sequence[str],
    responses: Sequence[str],
    eval_set: Any,
    *,
    leaf_ids: Any = None,
    seed: int,
    log: LogTarget = None,
    execution: LeafExecution | None = None,
) -> dict[int, LeafMeasurement]:
    """Measure each leaf in `leaf_ids` (default: the representatives), in ascending id order.

    `prompts`/`responses` are the whole pool, indexed by the hierarchy's rows; a leaf trains on its
    members nearest-the-centroid first. `execution` says where the cycles run (default: in this process;
    `harp.backends`). Reports counts, rates and the time left as it goes.
    """
    n_pool = hierarchy.n_examples
    if len(prompts) != n_pool or len(responses) != n_pool:
        raise ValueError(
            f"the hierarchy covers {n_pool} pool rows but {len(prompts)} prompts and "
            f"{len(responses)} responses were given"
        )
    ids = hierarchy.representatives if leaf_ids is None else np.atleast_1d(np.asarray(leaf_ids))
    if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"leaf_ids must be a 1-D sequence of integer leaf ids, got {ids.dtype}{ids.shape}")
    ids = np.unique(ids.astype(np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= hierarchy.n_leaves):
        bad = ids[(ids < 0) | (ids >= hierarchy.n_leaves)]
        raise ValueError(f"leaf id(s) {bad[:10].tolist()} outside [0, {hierarchy.n_leaves})")
    total = int(ids.size)
    total_rows = int(hierarchy.leaf_sizes[ids].sum()) if total else 0
    emit(log, f"measuring {total} leaves ({total_rows} training examples) of {hierarchy.n_leaves}")
    out: dict[int, LeafMeasurement] = {}
    progress = Progress(total, log, total_weight=total_rows, weight_unit="examples")
    jobs = [LeafJob(g, *leaf_examples(hierarchy, prompts, responses, g)) for g in ids.tolist()]
    for g, m in run_leaves(execution, finetuner, evaluator, jobs, eval_set, seed=seed, log=log):
        out[g] = m
        progress.step(f"id {g}, {m.n_train} examples, loss {m.first_loss:.3f} -> {m.last_loss:.3f}, "
                      f"{m.seconds:.2f} s", weight=m.n_train)
    return {g: out[g] for g in sorted(out)}


# --------------------------------------------------------------------------------------------------------
# Stage 1b: main effects and posteriors
# --------------------------------------------------------------------------------------------------------


def _aligned_correct(m: Any, key: Any, base_ids: Sequence[str], n: int) -> np.ndarray:
    """A measurement's correctness in the base evaluation's row order."""
    if isinstance(m, LeafMeasurement):
        if list(m.example_ids) == list(base_ids):
            return np.asarray(m.correct, dtype=np.float64)
        pos = {eid: i for i, eid in enumerate(m.example_ids)}
        missing = [eid for eid in base_ids if eid not in pos]
        extra = sorted(set(m.example_ids) - set(base_ids))
        if missing or extra or len(pos) != len(m.example_ids):
            raise ValueError(
                f"leaf {key}: its eval examples differ from the base evaluation's "
                f"(missing {missing[:5]!r}, extra {extra[:5]!r}); both must be scored on the same eval set"
            )
        return np.asarray(m.correct, dtype=np.float64)[[pos[eid] for eid in base_ids]]
    arr = np.asarray(m, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(
            f"leaf {key}: correctness has shape {arr.shape}, expected ({n},) aligned with the base evaluation"
        )
    return arr


def main_effects(
    measurements: Mapping[int, Any] | Any,
    base: EvalResult,
    domains: Sequence[str] | None = None,
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> MainEffects:
    """`phi_hat = U_d(leaf) - b_d` with paired-bootstrap variances, domains in `domains` order.

    `measurements`: a dict leaf id -> `LeafMeasurement` (realigned to the base evaluation's rows by
    example id) or -> correctness array aligned with them; rows of the result follow ascending leaf id.
    A 2-D (R, n_eval) array is taken as aligned, rows in the caller's order. `domains` defaults to
    `eval_domains(base)`; every domain in it needs eval examples and every eval row's domain must be in it.
    """
    domains = eval_domains(base) if domains is None else _check_domains(domains)
    base_ids = list(base.example_ids)
    n = len(base_ids)
    base_correct = np.asarray(base.correct, dtype=np.float64)
    if base_correct.shape != (n,):
        raise ValueError(f"the base evaluation has {n} example ids but correct of shape {base_correct.shape}")
    dom = domain_index(base.domains, domains, example_ids=base_ids)
    empty = [d for i, d in enumerate(domains) if not np.any(dom == i)]
    if empty:
        raise ValueError(f"domain(s) {empty!r} have no eval examples; drop them from the domain list")
    if isinstance(measurements, Mapping):
        if not measurements:
            raise ValueError("no leaf measurements: measure at least one leaf")
        keys = sorted(measurements)
        leaf = np.stack([_aligned_correct(measurements[k], k, base_ids, n) for k in keys])
    else:
        leaf = np.asarray(measurements, dtype=np.float64)
        if leaf.ndim != 2 or leaf.shape[1] != n:
            raise ValueError(
                f"measurements must be (n_leaves, {n}) aligned with the base evaluation, got {leaf.shape}"
            )
    return bootstrap_main_effects(leaf, base_correct, dom, n_domains=len(domains), n_boot=n_boot, seed=seed)


def infer_posteriors(
    hierarchy: Hierarchy, effects: MainEffects, measured_leaf_ids: Any, **fit_kw: Any
) -> Posteriors:
    """Empirical-Bayes posteriors for every leaf; row i of `effects` is leaf `measured_leaf_ids[i]`."""
    phi, var, measured = effects.to_leaves(np.asarray(measured_leaf_ids), hierarchy.n_leaves)
    return fit_posteriors(phi, var, measured, hierarchy.parent_of_leaf, hierarchy.region_of_parent, **fit_kw)


# --------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------


def select_harp(
    post: Posteriors,
    base_scores: Any,
    hierarchy: Hierarchy,
    *,
    envelope: str,
    top_k_points: int | None,
    z_active: float = 1.0,
    exclude_rows: Any = None,
    **risk: Any,
) -> HarpSelection:
    """One envelope's ranking, best-prefix cut and point cap over the hierarchy's leaves.

    `exclude_rows` (pool rows, e.g. the contamination guard's) are never selected: the ranking and the cap run
    over the remaining rows, and a leaf left with none counts as having no effect (phi = 0), so the greedy
    never spends a step on it. `example_rows` are pool rows either way. `risk` holds the risk-aware envelope
    options of `harp_select` (`HarpSettings.selection_options()`; none: plug-in means).
    """
    b = np.asarray(base_scores, dtype=np.float64)
    if post.mean.shape[0] != hierarchy.n_leaves:
        raise ValueError(
            f"posteriors cover {post.mean.shape[0]} leaves but the hierarchy has {hierarchy.n_leaves}"
        )
    if b.shape != (post.mean.shape[1],):
        raise ValueError(f"base_scores has shape {b.shape}; the posteriors have {post.mean.shape[1]} domains")
    order, offsets, back = hierarchy.member_order, hierarchy.leaf_offsets, None
    mean = post.mean
    if exclude_rows is not None and np.asarray(exclude_rows).size:
        order, offsets, back = without_rows(order, offsets, exclude_rows)
        empty = np.diff(offsets) == 0
        if empty.any():
            mean = np.where(empty[:, None], 0.0, post.mean)
    sel = harp_select(mean, post.sd, b, order, offsets, envelope=envelope, top_k_points=top_k_points,
                      z_active=z_active, **risk)
    if back is None:
        return sel
    return dataclasses.replace(sel, example_rows=back[sel.example_rows])


def select_tsds(
    X_pool: Any, X_queries: Any, budget: int, *, seed: int = 0, params: Mapping[str, Any] | None = None
) -> TsdsSelection:
    """The train-free TSDS baseline: `budget` pool rows drawn (with replacement) towards the queries."""
    return tsds_select(X_pool, X_queries, budget, seed=seed, **dict(params or {}))


@dataclass(frozen=True)
class LessFeatures:
    """What LESS computes once per pool and seed; `select_less_rows` cuts it at any budget."""

    scores: LessScores
    warmup_rows: np.ndarray  # the random subset the adapter was warmed up on
    warmup_seconds: float
    gradient_seconds: float


def less_features(
    finetuner: LoraFinetuner,
    prompts: Sequence[str],
    responses: Sequence[str],
    eval_set: pl.DataFrame,
    *,
    seed: int = 0,
    warmup_fraction: float = 0.05,
    dim: int = 1024,
    log: LogTarget = None,
) -> LessFeatures:
    """LESS's scores for every pool row (harp/method/less.py): warm up on a random `warmup_fraction` of the
    pool, then sketch each example's Adam-preconditioned gradient and each proxy item's gradient (on its
    correct answer), and score by the best domain's mean cosine. The adapter is reset by the next training."""
    if not 0.0 < warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must lie in (0, 1], got {warmup_fraction!r}")
    n = len(prompts)
    if n != len(responses) or n == 0:
        raise ValueError(f"LESS needs a non-empty pool with one response per prompt; got {n} and {len(responses)}")
    missing = [c for c in ("prompt", "answer_text", "domain") if c not in eval_set.columns]
    if missing:
        raise ValueError(f"LESS needs the eval set as harp.contracts.load_eval_set returns it; missing {missing}")
    rng = np.random.default_rng([seed, 7])
    warm = np.sort(rng.choice(n, size=max(1, round(n * warmup_fraction)), replace=False))
    t0 = time.perf_counter()
    stats = finetuner.train([prompts[r] for r in warm], [responses[r] for r in warm], seed=seed, reset=True,
                            keep_moments=True)
    warmup_seconds = time.perf_counter() - t0
    mom = stats.moments
    assert mom is not None
    sketch = CountSketch.make(mom.exp_avg.size, dim, seed)
    t0 = time.perf_counter()
    progress = Progress(n + eval_set.height, log, what="LESS gradient", plural="gradients")
    train_parts = []
    for block in finetuner.example_gradients(prompts, responses):
        pre = adam_direction(block, mom.exp_avg, mom.exp_avg_sq, beta1=mom.beta1, beta2=mom.beta2, eps=mom.eps)
        train_parts.append(sketch.apply(pre))
        for _ in range(block.shape[0]):
            progress.step()
    proxy_parts = []
    for block in finetuner.example_gradients(eval_set["prompt"].to_list(), eval_set["answer_text"].to_list()):
        proxy_parts.append(sketch.apply(block))
        for _ in range(block.shape[0]):
            progress.step()
    scores = less_scores(np.vstack(train_parts), np.vstack(proxy_parts), eval_set["domain"].to_list())
    return LessFeatures(scores=scores, warmup_rows=warm, warmup_seconds=warmup_seconds,
                        gradient_seconds=time.perf_counter() - t0)


def select_less_rows(features: LessFeatures, budget: int) -> np.ndarray:
    """The LESS selection at `budget`: the highest-scoring pool rows, best first."""
    return less_select(features.scores.score, budget)


@dataclass(frozen=True)
class RandomSelection:
    """The random baseline: distinct pool rows in draw order."""

    example_rows: np.ndarray
    n_pool: int
    budget: int
    seed: int

    @property
    def n_selected(self) -> int:
        return int(self.example_rows.size)


def select_random(n: int, budget: int, *, seed: int) -> RandomSelection:
    """`min(budget, n)` distinct rows drawn uniformly for `seed`."""
    rows = random_selection(n, budget, seed=seed)
    return RandomSelection(example_rows=rows, n_pool=int(n), budget=int(budget), seed=int(seed))


# --------------------------------------------------------------------------------------------------------
# The contamination guard
# --------------------------------------------------------------------------------------------------------


def find_contamination(
    pool_ids: Sequence[str],
    pool_texts: Sequence[str],
    X_pool: Any,
    eval_sets: Mapping[str, tuple[Sequence[str], Sequence[str], Any]],
    *,
    ngram: int = 13,
    min_coverage: float = 0.8,
    cosine: float = 0.98,
) -> pl.DataFrame:
    """Every (pool example, eval item, signal) where the example nearly duplicates the item.

    `eval_sets` maps a name ("proxy", "test") to (item ids, item texts, item embeddings); texts and
    embeddings are made as the pool's are (`embed_text(prompt, answer)`). Columns: example_id, eval_set,
    eval_example_id, kind ("ngram" or "embedding"), score (coverage or cosine).
    """
    rows: dict[str, list] = {"example_id": [], "eval_set": [], "eval_example_id": [], "kind": [], "score": []}
    for name, (ids, texts, X_eval) in eval_sets.items():
        found = ngram_matches(pool_texts, texts, n=ngram, min_coverage=min_coverage)
        found += embedding_matches(X_pool, X_eval, cosine=cosine)
        for m in found:
            rows["example_id"].append(pool_ids[m.row])
            rows["eval_set"].append(name)
            rows["eval_example_id"].append(ids[m.item])
            rows["kind"].append(m.kind)
            rows["score"].append(m.score)
    return pl.DataFrame(rows, schema={"example_id": pl.String, "eval_set": pl.String, "eval_example_id": pl.String,
                                      "kind": pl.String, "score": pl.Float64})
