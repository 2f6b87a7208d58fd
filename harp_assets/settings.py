"""The settings every HARP stage shares, as one Dagster resource so the UI's launchpad can change them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field


def dagster_home() -> Path:
    """The instance folder; assets persist under it, so it must be an absolute, existing path."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise RuntimeError("DAGSTER_HOME is not set: point it at an absolute folder (the Makefile uses dagster_home/)")
    path = Path(home)
    if not path.is_absolute():
        raise RuntimeError(f"DAGSTER_HOME must be an absolute path, got {home!r}")
    return path


class HarpSettings(dg.ConfigurableResource):
    """HARP selection settings: hierarchy sizes, budget, seeds and baseline parameters."""

    seed: int = Field(default=0, description="one seed for clustering, LoRA, bootstrap and sampling")
    leaf_size: int = Field(default=100, description="target examples per leaf")
    leaves_per_parent: int = Field(
        default=12, description="target leaves per parent; with 2 representatives ~1/6 of leaves are trained")
    parents_per_region: int = 8
    n_representatives: int = Field(default=2, description="leaves measured per parent")
    max_leaf_size: int = Field(default=400, description="a leaf grown past this splits when the pool grows")
    top_k_points: int = Field(default=2000, description="point budget shared by every selection")
    n_boot: int = Field(default=200, description="bootstrap resamples of the proxy set per domain")
    z_active: float = Field(default=1.0, description="a domain is active when some leaf is this many sds from 0")
    active_runs: int = Field(default=0, ge=0, description="extra leaf runs per active round (0: none)")
    active_rounds: int = Field(default=1, ge=0, description="active measuring rounds after the representatives")
    active_z: float = Field(default=1.0, ge=0, description="optimism of an unmeasured leaf's possible gain")
    primary_envelope: str = Field(
        default="expansive",
        description="envelope the active round verifies and the exhaustive oracle selects with")
    tsds_alpha: float = 0.5
    tsds_C: float = 5.0
    tsds_sigma: float = 0.75
    tsds_K: int = 100
    tsds_K_kde: int = 100

    def hierarchy_config(self) -> dict:
        return {
            "leaf_size": self.leaf_size,
            "leaves_per_parent": self.leaves_per_parent,
            "parents_per_region": self.parents_per_region,
            "n_representatives": self.n_representatives,
        }

    def tsds_params(self) -> dict:
        return {
            "alpha": self.tsds_alpha,
            "C": self.tsds_C,
            "sigma": self.tsds_sigma,
            "K": self.tsds_K,
            "K_kde": self.tsds_K_kde,
        }

    def as_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


class ValidationSettings(dg.ConfigurableResource):
    """Where the validation group scores selections: a held-out test split never used for selection."""

    test_path: str = Field(description="held-out test split (eval-set format: JSONL or Parquet)")
    ground_truth_path: str | None = Field(
        default=None, description="optional example_id -> kind file (the demo's); gives harmful/redundant shares")
    seed: int = Field(default=0, description="training seed of the validation adapters")
    include_full_pool: bool = Field(default=True, description="also train on the whole pool (the costliest run)")

    @classmethod
    def from_env_or_demo(cls) -> ValidationSettings:
        """`HARP_TEST` (and `HARP_GROUND_TRUTH`) when set, else the demo's test split and ground truth."""
        test = os.environ.get("HARP_TEST")
        if test:
            return cls(test_path=test, ground_truth_path=os.environ.get("HARP_GROUND_TRUTH") or None)
        root = demo_root()
        return cls(test_path=str(root / "test.jsonl"), ground_truth_path=str(root / "ground_truth.parquet"))


# --------------------------------------------------------------------------------------------------------
# Shared helpers of the asset modules: artifact files, content hashes, the demo's defaults
# --------------------------------------------------------------------------------------------------------

GROUP = "harp"

# The demo's LoRA recipe for leaf measurements (kept in step with harp_assets/demo/build.py's DEMO_LORA).
DEMO_LORA_FIELDS: tuple[str, ...] = ("r", "lora_alpha", "learning_rate", "epochs", "batch_size", "max_length")
# LoraFinetuner fields that change what a trained adapter is, and so a leaf's data version.
RECIPE_FIELDS: tuple[str, ...] = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "epochs",
    "batch_size",
    "max_length",
    "group_by_length",
    "separator",
)


def artifacts_dir(store: Any) -> Path:
    """Binary artifacts (npz, parquet) live beside the lineage tables, under `<store root>/artifacts/`."""
    path = store.root_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str) -> Any:
    """A JSON artifact an upstream asset wrote; a missing one names the asset to materialise."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: materialise the {what} asset first") from None


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            df.write_parquet(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_parquet(path: Path, what: str) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialise the {what} asset first")
    with open(path, "rb") as fh:  # one handle, so a concurrent os.replace cannot mix two versions
        return pl.read_parquet(fh)


def write_npz_atomic(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha16(*parts: Any) -> str:
    """First 16 hex digits of sha256 over the parts (JSON-encoded, unit-separated)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def base_model_id(model_dir: str | os.PathLike) -> str:
    """Identity of a base model for cache keys: its build fingerprint when recorded, else config + sizes.

    Hashing every weight byte of a large model on each run would cost minutes; the config plus the weight
    files' names and sizes changes whenever a different checkpoint is put in the folder.
    """
    root = Path(model_dir)
    if not root.is_dir():
        return sha16("hub", str(model_dir))
    build = root / "harp_build.json"
    if build.is_file():
        info = json.loads(build.read_text())
        if info.get("fingerprint"):
            return sha16("build", info["fingerprint"])
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"base model folder {root} has no config.json")
    weights = sorted(
        (f.name, f.stat().st_size)
        for f in root.iterdir()
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".gguf")
    )
    return sha16("dir", config.read_text(), weights)


def eval_set_hash(eval_set: pl.DataFrame) -> str:
    """Content hash of the proxy eval set, independent of row order."""
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in eval_set.to_dicts())
    return sha16(rows)


def lora_recipe(finetuner: Any) -> dict:
    """The finetuner settings that define a leaf's adapter (the base model and seed are hashed apart)."""
    return {k: getattr(finetuner, k) for k in RECIPE_FIELDS}


def leaf_data_version(member_hash: str, base_id: str, eval_hash: str, recipe: dict, seed: int) -> str:
    """A leaf partition's content hash: it changes exactly when its measurement would."""
    return sha16(member_hash, base_id, eval_hash, recipe, int(seed))


def demo_root() -> Path:
    """The demo benchmark's folder: `HARP_DEMO_DIR`, else `$DAGSTER_HOME/demo`, else the repo's own.

    Never raises, so Definitions load (and the UI starts) before DAGSTER_HOME or the demo exist.
    """
    env = os.environ.get("HARP_DEMO_DIR")
    if env:
        return Path(env).expanduser().resolve()
    home = os.environ.get("DAGSTER_HOME")
    if home and Path(home).is_absolute():
        return Path(home) / "demo"
    return Path(__file__).resolve().parents[1] / "dagster_home" / "demo"
