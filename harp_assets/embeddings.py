"""Pool embeddings, with a cache keyed by example id and embedder so a grown pool embeds only its new rows."""


import hashlib
import time

import dagster as dg
import numpy as np

from harp import store
from harp.io import write_npz
from harp.progress import Progress
from harp.stages import embed_text
from harp_assets.groups import PREPARE
from harp_assets.sources import pool_examples
from harp_resources import EmbedderResource, LineageResource


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dg.asset(group_name=PREPARE, kinds={"pytorch", "numpy"}, deps=[pool_examples])
def example_embeddings(
    context: dg.AssetExecutionContext, embedder: EmbedderResource, lineage: LineageResource
) -> dg.MaterializeResult:
    """Unit-norm embeddings of every pool example; cached per (example id, text) for this embedder."""
    pool, version = store.load_pool_artifact(lineage)
    ids = pool["example_id"].to_list()
    texts = [embed_text(p, r) for p, r in zip(pool["prompt"].to_list(), pool["response"].to_list(), strict=True)]
    hashes = [_text_hash(t) for t in texts]
    model_id = embedder.model_id
    cpath = store.embedding_cache_path(lineage, model_id)
    cached: dict[tuple[str, str], int] = {}
    C = None
    if cpath.is_file():
        with np.load(cpath, allow_pickle=False) as z:
            C = z["X"]
            cached = {(i, h): k for k, (i, h) in enumerate(zip(z["example_ids"].tolist(), z["text_hashes"].tolist(), strict=True))}
    missing = [k for k, key in enumerate(zip(ids, hashes, strict=True)) if key not in cached]
    t0 = time.perf_counter()
    loop = Progress(len(missing), context.log, what="embedded text", plural="texts")
    new = embedder.embed([texts[k] for k in missing], on_progress=lambda p: loop.advance(p.done - loop.count)) \
        if missing else None
    seconds = time.perf_counter() - t0
    ok = np.ones(len(ids), dtype=bool)
    if new is not None:  # a vector that is not finite or is all zeros never enters the cache
        bad = ~np.isfinite(new).all(axis=1) | ~np.any(new != 0, axis=1)
        if bad.any():
            ok[[missing[k] for k in np.flatnonzero(bad)]] = False
            good = np.flatnonzero(~bad)
            missing, new = [missing[k] for k in good], new[good]
    bad_ids = [ids[k] for k in np.flatnonzero(~ok)]
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
        rows = np.flatnonzero(ok)
        all_ids = [ids[k] for k in rows] + [k[0] for k in old_ids]
        all_h = [hashes[k] for k in rows] + [k[1] for k in old_ids]
        all_X = np.concatenate([X[rows], C[keep]]) if keep else X[rows]
        write_npz(cpath, example_ids=np.asarray(all_ids, dtype=str), text_hashes=np.asarray(all_h, dtype=str), X=all_X)
    if bad_ids:
        raise ValueError(
            f"the embedder {model_id} returned NaN, inf or all-zero vectors for {len(bad_ids)} example(s), e.g. "
            f"{bad_ids[:10]}: their texts were not cached (the {len(missing)} good new vectors were); fix or "
            "drop these examples, or check the embedder, then materialise again")
    store.write_embeddings(lineage, ids, X, model_id, version)
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
