"""Dagster resources that own models, devices and external systems.

Names are resolved lazily, so that `import harp_resources.data_contracts` does not load torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeviceResource": "harp_resources.device",
    "DeviceSpec": "harp_resources.device",
    "resolve_device": "harp_resources.device",
    "EmbedderResource": "harp_resources.embedder",
    "LoraFinetuner": "harp_resources.finetuner",
    "TrainStats": "harp_resources.finetuner",
    "train_and_evaluate": "harp_resources.finetuner",
    "Evaluator": "harp_resources.evaluator",
    "EvalResult": "harp_resources.evaluator",
    "AnnResource": "harp_resources.ann",
    "DataContractError": "harp_resources.data_contracts",
    "load_pool": "harp_resources.data_contracts",
    "load_eval_set": "harp_resources.data_contracts",
    "LineageStore": "harp_resources.lineage_store",
    "LineageError": "harp_resources.lineage_store",
    "EXAMPLE_QUERIES": "harp_resources.lineage_store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harp_resources' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
