"""Leaf utilities: one dynamic partition per leaf, trained only when its content hash changed.

A leaf's data version hashes what its measurement depends on: its member set, the base model, the eval set,
the LoRA recipe and the seed. A partition whose stored rows carry that version is skipped, so
re-materialising with nothing changed trains no leaf. Every key of a partition range runs in one step,
so the base model loads once per run (`BackfillPolicy.single_run`).
"""


import datetime as dt
import time

import dagster as dg
import numpy as np
import polars as pl

from harp_assets import stages
from harp_assets.base_scores import load_base
from harp_assets.leaves import LEAVES_PARTITIONS, load_leaf_table
from harp_assets.method import LeafTable
from harp_assets.settings import (
    GROUP,
    HarpSettings,
    artifacts_dir,
    leaf_data_version,
    lora_recipe,
    read_parquet,
    sha16,
    write_parquet_atomic,
)
from harp_assets.sources import load_eval_artifact, load_pool_artifact
from harp_resources.evaluator import EvalResult, Evaluator
from harp_resources.finetuner import LoraFinetuner
from harp_resources.lineage_store import LineageStore

_TRAINED = 0


def trained_count() -> int:
    """Leaves this process has trained (tests use it to see that cached leaves are skipped)."""
    return _TRAINED


def correctness_path(lineage: LineageStore, leaf_id: str):
    return artifacts_dir(lineage) / "leaf_correct" / f"{leaf_id}.parquet"


def leaf_versions(lineage: LineageStore, finetuner: LoraFinetuner, settings: HarpSettings) -> dict[str, str]:
    """The data version every current leaf should carry, given the persisted upstream artifacts."""
    table = load_leaf_table(lineage)
    _, meta = load_base(lineage)
    recipe = lora_recipe(finetuner)
    hashes = table.member_hashes().tolist()
    return {
        leaf: leaf_data_version(hashes[g], meta["base_model_id"], meta["eval_hash"], recipe, settings.seed)
        for g, leaf in enumerate(table.leaf_ids.tolist())
    }


def stored_version(lineage: LineageStore, leaf_id: str) -> str | None:
    """The data version of the stored partition, or None when absent or its correctness file is missing."""
    rows = lineage.read_partition("leaf_utilities", leaf_id)
    if rows is None or rows.height == 0 or not correctness_path(lineage, leaf_id).is_file():
        return None
    versions = rows["data_version"].unique().to_list()
    return versions[0] if len(versions) == 1 else None


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    partitions_def=LEAVES_PARTITIONS,
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["leaf_hierarchy", "base_model_scores", "pool_examples", "proxy_eval_set"],
)
def leaf_utilities(
    context: dg.AssetExecutionContext,
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    settings: HarpSettings,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    """Per-domain utility U_d and phi = U_d - b_d of a LoRA adapter trained on one leaf; cached by content hash."""
    global _TRAINED
    t_start = time.perf_counter()
    keys = list(context.partition_keys)
    table = load_leaf_table(lineage)
    pool, _ = load_pool_artifact(lineage)
    eval_set, _ = load_eval_artifact(lineage)
    base, meta = load_base(lineage)
    domains = list(meta["domains"])
    b = stages.base_scores(base, domains)
    versions = leaf_versions(lineage, finetuner, settings)
    by_id = {eid: k for k, eid in enumerate(pool["example_id"].to_list())}
    missing = [e for e in table.example_ids.tolist() if e not in by_id]
    if missing:
        raise ValueError(f"the leaf table names {len(missing)} example(s) absent from the pool, e.g. {missing[:3]}")
    rows = [by_id[e] for e in table.example_ids.tolist()]
    prompts = pool["prompt"].gather(rows).to_list()
    responses = pool["response"].gather(rows).to_list()
    n_eval = {d: int(c) for d, c in zip(*np.unique(np.asarray(base.domains), return_counts=True), strict=True)}

    trained, skipped, seconds_train = [], [], 0.0
    for key in keys:
        try:
            g = table.index_of(key)
        except KeyError:
            raise ValueError(
                f"leaf partition {key!r} is not in the current leaf table (retired by a split?); "
                "materialise only current leaf ids"
            ) from None
        dv = versions[key]
        if stored_version(lineage, key) == dv:
            skipped.append(key)
            continue
        m = stages.measure_leaf(
            finetuner, evaluator, *stages.leaf_examples(table, prompts, responses, g), eval_set, seed=settings.seed
        )
        _TRAINED += 1
        seconds_train += m.seconds
        effects = stages.main_effects({0: m}, base, domains, n_boot=settings.n_boot, seed=settings.seed)
        now = dt.datetime.now(dt.timezone.utc)
        write_parquet_atomic(m.to_frame(), correctness_path(lineage, key))
        lineage.write_partition("leaf_utilities", key, pl.DataFrame({
            "leaf_id": [key] * len(domains),
            "domain": domains,
            "utility": [float(m.per_domain[d]) for d in domains],
            "base": b.tolist(),
            "phi": effects.phi_hat[0].tolist(),
            "bootstrap_sd": np.sqrt(effects.phi_var_raw[0]).tolist(),
            "n_eval": [n_eval[d] for d in domains],
            "data_version": [dv] * len(domains),
            "measured_at": [now] * len(domains),
            "train_seconds": [m.train_seconds] * len(domains),
            "eval_seconds": [m.eval_seconds] * len(domains),
            "examples": [m.n_train] * len(domains),
            "run_id": [context.run.run_id] * len(domains),
        }, schema_overrides={"n_eval": pl.Int32, "examples": pl.Int32, "measured_at": pl.Datetime("us", "UTC")}))
        trained.append(key)
        context.log.info(
            f"leaf {key}: {m.n_train} examples, loss {m.first_loss:.3f} -> {m.last_loss:.3f}, {m.seconds:.2f} s, "
            + ", ".join(f"phi[{d}]={v:+.3f}" for d, v in zip(domains, effects.phi_hat[0], strict=True))
        )
    wall = time.perf_counter() - t_start
    overhead = wall - seconds_train
    meta_out = {
        "partitions": len(keys),
        "trained": len(trained),
        "skipped_up_to_date": len(skipped),
        "train_eval_seconds": round(seconds_train, 3),
        "step_seconds": round(wall, 3),
        "step_overhead_seconds_per_partition": round(overhead / max(len(keys), 1), 4),
        "trained_leaves": dg.MetadataValue.json(trained[:200]),
    }
    dv_all = versions[keys[0]] if len(keys) == 1 else sha16([versions[k] for k in keys])
    return dg.MaterializeResult(metadata=meta_out, data_version=dg.DataVersion(dv_all))


def read_measurements(
    lineage: LineageStore, versions: dict[str, str]
) -> tuple[dict[str, pl.DataFrame], list[str]]:
    """Per-example correctness of every current leaf whose stored partition is up to date, and the stale ids.

    Leaves never measured are in neither: the posteriors infer them from their parent and region.
    """
    fresh: dict[str, pl.DataFrame] = {}
    stale: list[str] = []
    for leaf, dv in versions.items():
        sv = stored_version(lineage, leaf)
        if sv is None:
            continue
        if sv != dv:
            stale.append(leaf)
            continue
        fresh[leaf] = read_parquet(correctness_path(lineage, leaf), "leaf_utilities")
    return fresh, stale


def aligned_correctness(fresh: dict[str, pl.DataFrame], table: LeafTable, base: EvalResult) -> dict[int, np.ndarray]:
    """Stored per-example correctness of each leaf, keyed by leaf index, in the base evaluation's row order
    (what `stages.main_effects` pairs with the base scores)."""
    pos = {eid: i for i, eid in enumerate(base.example_ids)}
    out: dict[int, np.ndarray] = {}
    for leaf, frame in fresh.items():
        idx = [pos.get(e, -1) for e in frame["example_id"].to_list()]
        if not idx or min(idx) < 0 or len(set(idx)) != len(pos):
            raise ValueError(f"leaf {leaf}: its stored correctness does not cover the base evaluation's eval examples")
        corr = np.full(len(pos), np.nan)
        corr[idx] = frame["correct"].to_numpy()
        out[table.index_of(leaf)] = corr
    return out
