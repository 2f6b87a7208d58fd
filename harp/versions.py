"""Content hashes and cache keys: what a stored result was computed from, so a change can never go unseen.

A leaf measurement is exactly reproducible from its members, the base model, the eval set, the seed and the
full configuration of the finetuner and the evaluator (plus the dtype the device runs in). The key is built
from every field of those models by construction: a field that does not shape a measurement (a log
setting, the vLLM memory share) says so where it is declared, with `json_schema_extra=NOT_MEASUREMENT`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    import polars as pl

# Marks a model field that does not change what a measurement is (kept out of every cache key).
NOT_MEASUREMENT: dict[str, Any] = {"measurement": False}


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


def content_hashes(prompts: list[str], responses: list[str]) -> list[str]:
    """Per-example content hash (prompt and response): an edited example gets another, so its leaf's
    member hash, and with it the leaf's data version, changes."""
    return [
        hashlib.sha256(f"{p}\x1f{r}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
        for p, r in zip(prompts, responses, strict=True)
    ]


def eval_set_hash(eval_set: pl.DataFrame) -> str:
    """Content hash of the proxy eval set, independent of row order."""
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in eval_set.to_dicts())
    return sha16(rows)


def measurement_config(model: BaseModel) -> dict[str, Any]:
    """Every field of `model` that shapes a measurement, by name (nested models as dicts)."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("measurement") is False:
            continue
        value = getattr(model, name)
        out[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def base_scores_key(finetuner: Any, evaluator: BaseModel) -> dict[str, Any]:
    """What the base model's proxy scores depend on besides the model and the eval set."""
    return {
        "evaluator": measurement_config(evaluator),
        "dtype": str(finetuner.device_spec().dtype),
        "trust_remote_code": bool(getattr(finetuner, "trust_remote_code", False)),
    }


def measurement_key(finetuner: BaseModel, evaluator: BaseModel) -> dict[str, Any]:
    """What every leaf measurement depends on besides its members, the model files, the eval set and seed."""
    return {
        "finetuner": measurement_config(finetuner),
        "evaluator": measurement_config(evaluator),
        "dtype": str(finetuner.device_spec().dtype),  # type: ignore[attr-defined]
    }


def leaf_data_version(member_hash: str, base_id: str, eval_hash: str, key: dict[str, Any], seed: int) -> str:
    """A leaf partition's content hash: it changes exactly when its measurement would."""
    return sha16(member_hash, base_id, eval_hash, key, int(seed))
