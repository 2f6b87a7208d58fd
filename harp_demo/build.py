"""Build the offline demo benchmark into a folder: data files, ground truth, pretraining text, base model.

The folder is a cache keyed by a fingerprint of the whole configuration: a second build with the same
configuration reads `manifest.json` and returns at once. Every file is written atomically (temporary file,
then `os.replace`), and `manifest.json` last, so a folder with a matching manifest is always complete.

CLI: `python -m harp_demo.build --out DIR --pool-size N --seed S [--no-base-model] [--force]`.
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from harp.contracts import write_jsonl, write_parquet
from harp.io import file_lock, write_text
from harp_demo.generator import DOMAINS, KINDS, DemoData, DemoDataConfig, generate

log = logging.getLogger("harp.demo")

# Bumped whenever the generator or the file layout changes what a build writes for the same config.
DEMO_FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# The demo's LoRA recipe: tuned so one ~100-example clean leaf lifts its domain's proxy accuracy clearly
# on the demo base model within a few CPU seconds (see benchmarks/demo_leaf_effects.py).
DEMO_LORA: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16.0,
    "learning_rate": 3e-3,
    "epochs": 10,
    "batch_size": 16,
    "max_length": 96,
}

# The validation recipe: one fixed recipe for every selection and the full pool. Fewer epochs than a leaf
# measurement because selections are 10-60x larger; 4 epochs keep the full-pool run affordable on a CPU.
VALIDATION_LORA: dict[str, Any] = {**DEMO_LORA, "epochs": 4}

@dataclass(frozen=True)
class BaseModelConfig:
    """The demo base model: a small GPT-2 style LM pretrained here on the generated neutral text."""

    vocab_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    max_seconds: float | None = None


@dataclass(frozen=True)
class DemoPaths:
    """Where a built demo lives. `ground_truth` and `facts` are for benchmarks only, never for selection."""

    root: Path
    pool: Path
    eval_set: Path
    test_set: Path
    ground_truth: Path
    facts: Path
    pretrain_text: Path
    base_model: Path | None
    manifest: Path

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())


def _paths(root: Path, with_model: bool) -> DemoPaths:
    return DemoPaths(
        root=root,
        pool=root / "pool.parquet",
        eval_set=root / "eval.jsonl",
        test_set=root / "test.jsonl",
        ground_truth=root / "ground_truth.parquet",
        facts=root / "facts.parquet",
        pretrain_text=root / "pretrain.jsonl",
        base_model=(root / "base_model") if with_model else None,
        manifest=root / MANIFEST,
    )


def _generator_source_hash() -> str:
    """Hash of the generator's source: a changed generator must not be served from an old folder's cache.
    (Regenerating the data is cheap, and the base model has its own cache keyed by its pretraining text.)"""
    from harp_demo import generator

    return hashlib.sha256(Path(generator.__file__).read_bytes()).hexdigest()


def demo_fingerprint(data: DemoDataConfig, model: BaseModelConfig | None) -> str:
    """Hash of everything a build depends on."""
    desc = {
        "format": DEMO_FORMAT_VERSION,
        "generator": _generator_source_hash(),
        "data": data.to_dict(),
        "model": dataclasses.asdict(model) if model is not None else None,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached(paths: DemoPaths, fingerprint: str) -> bool:
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("fingerprint") != fingerprint:
        return False
    files = [paths.pool, paths.eval_set, paths.test_set, paths.ground_truth, paths.facts, paths.pretrain_text]
    if not all(p.is_file() for p in files):
        return False
    return paths.base_model is None or (paths.base_model / "config.json").is_file()


def build_demo(
    out_dir: str | os.PathLike,
    *,
    pool_size: int = 20_000,
    seed: int = 0,
    data: DemoDataConfig | None = None,
    model: BaseModelConfig | None = None,
    build_base_model: bool = True,
    force: bool = False,
) -> DemoPaths:
    """Build (or reuse) the demo benchmark in `out_dir` and return its paths.

    `pool_size` and `seed` override the same fields of `data`. With `build_base_model=False` no model is
    trained (for fast tests); `model` sets the base model's size and pretraining budget. The base model's
    own cache is keyed by its pretraining text, which does not depend on `pool_size`, so changing only the
    pool size reuses the trained model.
    """
    data = dataclasses.replace(data or DemoDataConfig(), pool_size=pool_size, seed=seed)
    data.validate()
    model_cfg = (model or BaseModelConfig()) if build_base_model else None
    root = Path(out_dir)
    paths = _paths(root, model_cfg is not None)
    fingerprint = demo_fingerprint(data, model_cfg)
    if not force and _cached(paths, fingerprint):
        log.info("demo in %s is up to date (fingerprint %s)", root, fingerprint[:12])
        return paths
    with file_lock(root / ".build.lock"):
        if not force and _cached(paths, fingerprint):
            return paths
        return _build(paths, data, model_cfg, fingerprint)


def _build(paths: DemoPaths, data: DemoDataConfig, model_cfg: BaseModelConfig | None, fingerprint: str) -> DemoPaths:
    t0 = time.perf_counter()
    demo = generate(data)
    t_gen = time.perf_counter() - t0
    _write_data(paths, demo)
    t_data = time.perf_counter() - t0
    model_info = None
    if model_cfg is not None and paths.base_model is not None:
        from harp_demo.base_model import read_build_info, train_small_causal_lm

        cfg = dataclasses.asdict(model_cfg)
        max_seconds = cfg.pop("max_seconds")
        train_small_causal_lm(demo.pretrain_text, paths.base_model, seed=data.seed, max_seconds=max_seconds, **cfg)
        model_info = read_build_info(paths.base_model)
    seconds = time.perf_counter() - t0
    kinds = Counter(g["kind"] for g in demo.ground_truth)
    manifest = {
        "fingerprint": fingerprint,
        "format_version": DEMO_FORMAT_VERSION,
        "config": {
            "data": data.to_dict(),
            "model": dataclasses.asdict(model_cfg) if model_cfg is not None else None,
            "lora": DEMO_LORA,
        },
        "domains": [d.name for d in DOMAINS],
        "counts": {
            "pool": len(demo.pool),
            "kinds": {k: kinds.get(k, 0) for k in KINDS},
            "eval": len(demo.eval_set),
            "test": len(demo.test_set),
            "pretrain_texts": len(demo.pretrain_text),
        },
        "files": {
            p.name: _sha256(p)
            for p in (paths.pool, paths.eval_set, paths.test_set, paths.ground_truth, paths.facts, paths.pretrain_text)
        },
        "base_model": None if model_info is None else {
            "path": paths.base_model.name if paths.base_model else None,
            "fingerprint": model_info.get("fingerprint"),
            "n_params": model_info.get("n_params"),
            "steps_done": model_info.get("steps_done"),
            "final_loss": model_info.get("final_loss"),
        },
        "seconds": {"generate": round(t_gen, 3), "data": round(t_data, 3), "total": round(seconds, 3)},
    }
    write_text(paths.manifest, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(paths.manifest, 0o644)
    log.info("built demo in %s in %.1f s (data %.1f s)", paths.root, seconds, t_data)
    return paths


def _write_data(paths: DemoPaths, demo: DemoData) -> None:
    pool = pl.DataFrame(demo.pool, schema={"example_id": pl.String, "prompt": pl.String, "response": pl.String})
    write_parquet(pool, paths.pool)
    truth = pl.DataFrame(
        demo.ground_truth,
        schema={"example_id": pl.String, "domain": pl.String, "kind": pl.String, "key": pl.String,
                "source": pl.String},
    )
    write_parquet(truth, paths.ground_truth)
    write_parquet(pl.DataFrame(demo.facts), paths.facts)
    eval_schema = {"example_id": pl.String, "domain": pl.String, "prompt": pl.String,
                   "choices": pl.List(pl.String), "answer": pl.Int64}
    for rows, path in ((demo.eval_set, paths.eval_set), (demo.test_set, paths.test_set)):
        df = pl.DataFrame([{k: r[k] for k in eval_schema} for r in rows], schema=eval_schema)
        write_jsonl(df, path)
    write_jsonl(pl.DataFrame({"text": demo.pretrain_text}, schema={"text": pl.String}), paths.pretrain_text)
    for p in (paths.pool, paths.ground_truth, paths.facts, paths.eval_set, paths.test_set, paths.pretrain_text):
        os.chmod(p, 0o644)  # the atomic writers create private temp files; these are shared data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harp_demo.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to build into (a cache: rebuilt only when the config changes)")
    ap.add_argument("--pool-size", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-base-model", action="store_true", help="write the data only; train no base model")
    ap.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    try:
        paths = build_demo(args.out, pool_size=args.pool_size, seed=args.seed,
                           build_base_model=not args.no_base_model, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = paths.read_manifest()
    print(json.dumps({
        "out": str(paths.root),
        "fingerprint": manifest["fingerprint"][:12],
        "counts": manifest["counts"],
        "base_model": str(paths.base_model) if paths.base_model else None,
        "seconds_this_call": round(time.perf_counter() - t0, 2),
        "seconds_when_built": manifest["seconds"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
