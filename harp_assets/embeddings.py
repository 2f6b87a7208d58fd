"""Pool embeddings, with a cache keyed by example id and embedder so a grown pool embeds only its new rows."""


import hashlib
import time
from pathlib import Path

import dagster as dg
import numpy as np

from harp_assets.settings import GROUP, artifacts_dir, write_json_atomic, write_npz_atomic
from harp_assets.sources import load_pool_artifact
from harp_resources.embedder import EmbedderResource
from harp_resources.lineage_store import LineageStore

EMBEDDINGS_FILE = "embeddings.npz"


def embed_text(prompt: str, response: str) -> str:
    """What a pool example is embedded as: the prompt and its response, so leaves group by both."""
    return f"{prompt}\n{response}"


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(lineage: LineageStore, model_id: str) -> Path:
    return artifacts_dir(lineage) / "embedding_cache" / f"{model_id}.npz"


def load_embeddings(lineage: LineageStore) -> tuple[np.ndarray, np.ndarray, str]:
    """(example ids, float32 unit rows, embedder model id) of the current pool, in pool order."""
    path = artifacts_dir(lineage) / EMBEDDINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialise the example_embeddings asset first")
    with np.load(path, allow_pickle=False) as z:
        return z["example_ids"], z["X"], str(z["model_id"])


@dg.asset(group_name=GROUP, kinds={"pytorch", "numpy"}, deps=["pool_examples"])
def example_embeddings(
    context: dg.AssetExecutionContext, embedder: EmbedderResource, lineage: LineageStore
) -> dg.MaterializeResult:
    """Unit-norm embeddings of every pool example; cached per (example id, text) for this embedder."""
    pool, version = load_pool_artifact(lineage)
    ids = pool["example_id"].to_list()
    texts = [embed_text(p, r) for p, r in zip(pool["prompt"].to_list(), pool["response"].to_list(), strict=True)]
    hashes = [_text_hash(t) for t in texts]
    model_id = embedder.model_id
    cpath = cache_path(lineage, model_id)
    cached: dict[tuple[str, str], int] = {}
    C = None
    if cpath.is_file():
        with np.load(cpath, allow_pickle=False) as z:
            C = z["X"]
            cached = {(i, h): k for k, (i, h) in enumerate(zip(z["example_ids"].tolist(), z["text_hashes"].tolist(), strict=True))}
    missing = [k for k, key in enumerate(zip(ids, hashes, strict=True)) if key not in cached]
    t0 = time.perf_counter()
    new = embedder.embed([texts[k] for k in missing]) if missing else None
    seconds = time.perf_counter() - t0
    dim = new.shape[1] if new is not None else C.shape[1]
    X = np.empty((len(ids), dim), dtype=np.float32)
    if new is not None:
        X[missing] = new
    hit = [k for k in range(len(ids)) if (ids[k], hashes[k]) in cached]
    if hit:
        X[hit] = C[[cached[(ids[k], hashes[k])] for k in hit]]
    if missing:  # the cache keeps old rows too, so a source that drops and re-adds examples stays cheap
        current = set(ids)
        old_ids = [key for key in cached if key[0] not in current]
        keep = [cached[k] for k in old_ids]
        all_ids = ids + [k[0] for k in old_ids]
        all_h = hashes + [k[1] for k in old_ids]
        all_X = np.concatenate([X, C[keep]]) if keep else X
        write_npz_atomic(cpath, example_ids=np.asarray(all_ids, dtype=str), text_hashes=np.asarray(all_h, dtype=str), X=all_X)
    out = artifacts_dir(lineage)
    write_npz_atomic(out / EMBEDDINGS_FILE, example_ids=np.asarray(ids, dtype=str), X=X, model_id=np.str_(model_id))
    write_json_atomic(out / "embeddings.json", {"model_id": model_id, "pool_version": version, "dim": int(dim)})
    context.log.info(f"embeddings: {len(missing)} new, {len(hit)} cached ({model_id})")
    return dg.MaterializeResult(
        metadata={
            "examples": len(ids),
            "embedded_new": len(missing),
            "cached": len(hit),
            "dim": int(dim),
            "embedder": model_id,
            "embed_seconds": round(seconds, 3),
            "texts_per_s": round(len(missing) / seconds, 1) if missing and seconds > 0 else 0.0,
        },
        data_version=dg.DataVersion(f"{version}-{model_id}"),
    )
