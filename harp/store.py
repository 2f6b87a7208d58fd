"""The artifact store: every file one pipeline step writes and a later one reads, named in one place.

Artifacts live under `<lineage root>/artifacts/` beside the lineage tables. Each step freezes what it read
(the pool, the eval set) or computed (embeddings, the leaf table, base scores, per-leaf correctness,
posteriors, the active-round plan), so every later step of a run sees the same inputs even when the source
changes meanwhile. A missing artifact names the asset to materialise first. Writes are atomic (`harp.io`).

The derived reads at the end (which leaves are current, stale or planned) are what the assets, the
sensors and the runner all decide on, so they are written once here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from harp.io import read_json, read_parquet, write_json, write_npz, write_parquet
from harp.lineage import LineageStore
from harp.method import Hyperparameters, LeafTable, Posteriors
from harp.models.evaluator import EvalResult
from harp.versions import leaf_data_version, measurement_key

POOL_FILE, POOL_META = "pool.parquet", "pool.json"
EVAL_FILE, EVAL_META = "eval_set.parquet", "eval_set.json"
EMBEDDINGS_FILE, EMBEDDINGS_META = "embeddings.npz", "embeddings.json"
LEAF_TABLE_FILE, HIERARCHY_META = "leaf_table.npz", "leaf_hierarchy.json"
BASE_FILE, BASE_META = "base_eval.parquet", "base_eval.json"
POSTERIORS_FILE, POSTERIORS_META = "posteriors.npz", "posteriors.json"
ACTIVE_PLAN = "active_rounds.json"


def artifacts_dir(lineage: LineageStore) -> Path:
    """Binary artifacts (npz, parquet, json) live beside the lineage tables, under `<root>/artifacts/`."""
    path = lineage.root_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- pool and eval set ---------------------------------------------------------------------------------


def write_pool(lineage: LineageStore, pool: pl.DataFrame, version: str, files: list[str]) -> None:
    out = artifacts_dir(lineage)
    write_parquet(pool, out / POOL_FILE)
    write_json(out / POOL_META, {"pool_version": version, "n_examples": pool.height, "files": files})


def load_pool_artifact(lineage: LineageStore) -> tuple[pl.DataFrame, str]:
    out = artifacts_dir(lineage)
    return read_parquet(out / POOL_FILE, "pool_examples"), read_json(out / POOL_META, "pool_examples")["pool_version"]


def stored_pool_version(lineage: LineageStore) -> str | None:
    """The version of the last prepared pool, or None before the first prepare run."""
    path = artifacts_dir(lineage) / POOL_META
    return read_json(path, "pool_examples")["pool_version"] if path.is_file() else None


def write_eval(lineage: LineageStore, eval_set: pl.DataFrame, digest: str) -> None:
    out = artifacts_dir(lineage)
    write_parquet(eval_set, out / EVAL_FILE)
    write_json(out / EVAL_META, {"eval_hash": digest, "n_examples": eval_set.height})


def load_eval_artifact(lineage: LineageStore) -> tuple[pl.DataFrame, str]:
    out = artifacts_dir(lineage)
    return read_parquet(out / EVAL_FILE, "proxy_eval_set"), read_json(out / EVAL_META, "proxy_eval_set")["eval_hash"]


# -- embeddings ----------------------------------------------------------------------------------------


def embedding_cache_path(lineage: LineageStore, model_id: str) -> Path:
    return artifacts_dir(lineage) / "embedding_cache" / f"{model_id}.npz"


def write_embeddings(lineage: LineageStore, ids: list[str], X: np.ndarray, model_id: str, version: str) -> None:
    out = artifacts_dir(lineage)
    write_npz(out / EMBEDDINGS_FILE, example_ids=np.asarray(ids, dtype=str), X=X, model_id=np.str_(model_id))
    write_json(out / EMBEDDINGS_META, {"model_id": model_id, "pool_version": version, "dim": int(X.shape[1])})


def load_embeddings(lineage: LineageStore) -> tuple[np.ndarray, np.ndarray, str]:
    """(example ids, float32 unit rows, embedder model id) of the current pool, in pool order."""
    path = artifacts_dir(lineage) / EMBEDDINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialise the example_embeddings asset first")
    with np.load(path, allow_pickle=False) as z:
        return z["example_ids"], z["X"], str(z["model_id"])


# -- hierarchy -----------------------------------------------------------------------------------------


def leaf_table_path(lineage: LineageStore) -> Path:
    return artifacts_dir(lineage) / LEAF_TABLE_FILE


def load_leaf_table(lineage: LineageStore) -> LeafTable:
    path = leaf_table_path(lineage)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialise the leaf_hierarchy asset first")
    return LeafTable.from_npz(path)


def write_hierarchy_meta(lineage: LineageStore, meta: dict[str, Any]) -> None:
    write_json(artifacts_dir(lineage) / HIERARCHY_META, meta)


# -- base scores ---------------------------------------------------------------------------------------


def write_base(lineage: LineageStore, base: EvalResult, meta: dict[str, Any]) -> None:
    out = artifacts_dir(lineage)
    frame = pl.DataFrame(
        {"example_id": base.example_ids, "domain": base.domains, "correct": np.asarray(base.correct, np.float32)}
    )
    write_parquet(frame, out / BASE_FILE)
    write_json(out / BASE_META, meta)


def load_base(lineage: LineageStore, scoring: dict[str, Any] | None = None) -> tuple[EvalResult, dict]:
    """The persisted base evaluation (per-example correctness) and its metadata (model id, eval hash, key).

    With `scoring` (`harp.versions.base_scores_key` of the models in use), base scores made under another
    evaluator configuration or dtype are refused: effects would subtract scores of two different scorers.
    """
    out = artifacts_dir(lineage)
    df = read_parquet(out / BASE_FILE, "base_model_scores")
    meta = read_json(out / BASE_META, "base_model_scores")
    if scoring is not None and meta.get("scoring") != scoring:
        raise ValueError(
            f"the stored base_model_scores were computed with scoring settings {meta.get('scoring')}, but the "
            f"models in use score with {scoring}: materialise base_model_scores again"
        )
    result = EvalResult(
        example_ids=df["example_id"].to_list(),
        domains=df["domain"].to_list(),
        correct=df["correct"].to_numpy().astype(np.float32),
        per_domain={str(k): float(v) for k, v in meta["per_domain"].items()},
        seconds=float(meta["seconds"]),
    )
    return result, meta


# -- leaf measurements ---------------------------------------------------------------------------------


def correctness_path(lineage: LineageStore, leaf_id: str) -> Path:
    return artifacts_dir(lineage) / "leaf_correct" / f"{leaf_id}.parquet"


def write_leaf_measurement(
    lineage: LineageStore, leaf_id: str, correct: pl.DataFrame, members: pl.DataFrame, rows: pl.DataFrame
) -> None:
    """Per-example correctness and the member set first, then the partition's lineage rows (whose data
    version marks it done)."""
    write_parquet(correct, correctness_path(lineage, leaf_id))
    lineage.write_partition("measured_members", leaf_id, members)
    lineage.write_partition("leaf_utilities", leaf_id, rows)


def measured_leaf_ids(lineage: LineageStore) -> set[str]:
    """Leaf ids with a stored measurement (current or stale): growth keeps their member sets frozen."""
    return set(lineage.partition_keys("leaf_utilities"))


def leaf_drift(lineage: LineageStore) -> pl.DataFrame:
    """The catalog's `leaf_drift` view: each measured current leaf's measured member set against its members
    now (written by the hierarchy step), with drift = (added + removed) / measured size."""
    return lineage.query("SELECT * FROM leaf_drift")


def leaf_versions(lineage: LineageStore, finetuner: Any, evaluator: Any, seed: int) -> dict[str, str]:
    """The data version every current leaf should carry, given the persisted upstream artifacts.

    It covers the leaf's members, the base model's files, the eval set, the seed and every measurement
    field of the finetuner and the evaluator plus the dtype (`harp.versions.measurement_key`).
    """
    table = load_leaf_table(lineage)
    _, meta = load_base(lineage)
    key = measurement_key(finetuner, evaluator)
    hashes = table.member_hashes().tolist()
    return {
        leaf: leaf_data_version(hashes[g], meta["base_model_id"], meta["eval_hash"], key, seed)
        for g, leaf in enumerate(table.leaf_ids.tolist())
    }


def stored_version(lineage: LineageStore, leaf_id: str) -> str | None:
    """The data version of the stored partition, or None when absent or its correctness file is missing."""
    return _version_of(lineage.read_partition("leaf_utilities", leaf_id), lineage, leaf_id)


def _version_of(rows: pl.DataFrame | None, lineage: LineageStore, leaf_id: str) -> str | None:
    if rows is None or rows.height == 0 or not correctness_path(lineage, leaf_id).is_file():
        return None
    versions = rows["data_version"].unique().to_list()
    return versions[0] if len(versions) == 1 else None


def stored_versions(lineage: LineageStore, leaf_ids: list[str]) -> dict[str, str | None]:
    """`stored_version` of many leaves after one listing of the partition folder, not one per leaf (which,
    over every leaf of a large pool, costs leaves x stored partitions)."""
    rows = lineage.read_partitions("leaf_utilities", leaf_ids)
    return {leaf: _version_of(rows.get(leaf), lineage, leaf) for leaf in leaf_ids}


def read_measurements(
    lineage: LineageStore, versions: dict[str, str]
) -> tuple[dict[str, pl.DataFrame], list[str]]:
    """Per-example correctness of every current leaf whose stored partition is up to date, and the stale ids.

    Leaves never measured are in neither: the posteriors infer them from their parent and region.
    """
    fresh: dict[str, pl.DataFrame] = {}
    stale: list[str] = []
    stored = stored_versions(lineage, list(versions))
    for leaf, dv in versions.items():
        sv = stored[leaf]
        if sv is None:
            continue
        if sv != dv:
            stale.append(leaf)
            continue
        fresh[leaf] = read_parquet(correctness_path(lineage, leaf), "leaf_utilities")
    return fresh, stale


def leaves_measured_since(lineage: LineageStore, since: dt.datetime | None) -> list[str]:
    """Leaf ids whose stored measurement was made after `since` (all stored ones when None): the
    train-evaluate cycles a pipeline call ran, counted from the lineage rows rather than from a run."""
    rows = lineage.read_partitions("leaf_utilities")
    return sorted(leaf for leaf, df in rows.items()
                  if df.height and (since is None or df["measured_at"].max() > since))


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


# -- posteriors ----------------------------------------------------------------------------------------


def write_posteriors(lineage: LineageStore, post: Posteriors, leaf_ids: list[str], meta: dict[str, Any]) -> None:
    out = artifacts_dir(lineage)
    write_npz(out / POSTERIORS_FILE, mean=post.mean, sd=post.sd, measured=post.measured,
              leaf_ids=np.asarray(leaf_ids, dtype=str))
    hyper = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(post.hyper).items()}
    write_json(out / POSTERIORS_META, {**meta, "hyper": hyper})


def _from_json(name: str, value: object) -> object:
    if name == "fallback":
        return tuple(value)  # type: ignore[arg-type]
    return np.asarray(value) if isinstance(value, list) else value


def load_posteriors(lineage: LineageStore) -> tuple[Posteriors, dict]:
    """The persisted posteriors (rows in the leaf table's order) and their metadata."""
    out = artifacts_dir(lineage)
    meta = read_json(out / POSTERIORS_META, "phi_posteriors")
    with np.load(out / POSTERIORS_FILE, allow_pickle=False) as z:
        mean, sd, measured = z["mean"], z["sd"], z["measured"]
        leaf_ids = z["leaf_ids"].tolist()
    h = meta["hyper"]
    hyper = Hyperparameters(**{f.name: _from_json(f.name, h[f.name]) for f in dataclasses.fields(Hyperparameters)})
    meta["leaf_ids"] = leaf_ids
    return Posteriors(mean=mean, sd=sd, measured=measured, hyper=hyper, n_measured=int(measured.sum())), meta


def posteriors_meta(lineage: LineageStore) -> dict | None:
    """The stored posteriors' metadata, or None before the first fit."""
    path = artifacts_dir(lineage) / POSTERIORS_META
    return read_json(path, "phi_posteriors") if path.is_file() else None


# -- active rounds -------------------------------------------------------------------------------------


def read_plan(lineage: LineageStore) -> list[dict]:
    """The planned rounds, oldest first: `{"round", "leaves", "scores", "created_at", "run_id"}` each."""
    path = artifacts_dir(lineage) / ACTIVE_PLAN
    return read_json(path, "active_round_plan")["rounds"] if path.is_file() else []


def write_plan(lineage: LineageStore, rounds: list[dict]) -> None:
    write_json(artifacts_dir(lineage) / ACTIVE_PLAN, {"rounds": rounds})


def planned_leaves(lineage: LineageStore) -> list[str]:
    """Every leaf some active round asked for that is still in the current leaf table."""
    current = set(load_leaf_table(lineage).leaf_ids.tolist())
    return sorted({leaf for r in read_plan(lineage) for leaf in r["leaves"] if leaf in current})


def harp_leaves(lineage: LineageStore) -> set[str]:
    """The leaves HARP measures: the representatives and the active rounds' picks."""
    table = load_leaf_table(lineage)
    return set(table.leaf_ids[table.representative].tolist()) | set(planned_leaves(lineage))


def write_contamination(lineage: LineageStore, frame: pl.DataFrame) -> None:
    """Replace the contamination table: every flagged (pool example, eval item, signal) of the current pool."""
    lineage.write_table("contamination", frame)


def contaminated_ids(lineage: LineageStore) -> set[str]:
    """Pool examples flagged as near copies of an eval or test item (none before the guard has run)."""
    frame = lineage.read_table("contamination")
    return set() if frame is None or frame.height == 0 else set(frame["example_id"].to_list())
