"""HARP: pick the finetuning data that improves a model on the domains you care about.

The library needs no Dagster: `harp()` runs the whole selection in one call, and every stage, model and
data contract it uses is importable on its own. Names load lazily, so `import harp` stays cheap and the
method core (numpy, faiss) is usable without importing torch.

    from harp import harp, HarpResult, build_parent_leaf_hierarchy, greedy_taskaware
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "harp": "harp.entry",
    "HarpResult": "harp.entry",
    "HarpSettings": "harp.config",
    "ValidationSettings": "harp.config",
    "build_parent_leaf_hierarchy": "harp.method",
    "greedy_taskaware": "harp.method",
    "harp_select": "harp.method",
    "fit_posteriors": "harp.method",
    "bootstrap_main_effects": "harp.method",
    "tsds_select": "harp.method",
    "Hierarchy": "harp.method",
    "Posteriors": "harp.method",
    "HarpSelection": "harp.method",
    "LeafExecution": "harp.backends",
    "Device": "harp.models.device",
    "Embedder": "harp.models.embedder",
    "LoraFinetuner": "harp.models.finetuner",
    "Evaluator": "harp.models.evaluator",
    "EvalResult": "harp.models.evaluator",
    "AnnSearch": "harp.models.ann",
    "LineageStore": "harp.lineage",
    "PoolSource": "harp.sources",
    "DataContractError": "harp.contracts",
    "load_pool": "harp.contracts",
    "load_eval_set": "harp.contracts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
