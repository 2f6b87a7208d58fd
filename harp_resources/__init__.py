"""Thin Dagster resources over the library's objects.

Each resource is the `harp` class itself, made configurable in the launchpad: it inherits every field and
method from the library and adds only Dagster's lifecycle (run logs, teardown) and nested resources. The
model code lives in `harp/`, which never imports this package or Dagster.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from pydantic import Field

from harp.config import HarpSettings, ValidationSettings, demo_root
from harp.lineage import LineageStore
from harp.models.ann import AnnSearch
from harp.models.device import Device
from harp.models.embedder import Embedder
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner
from harp.sources import PoolSource
from harp.versions import NOT_MEASUREMENT

__all__ = [
    "AnnResource",
    "DeviceResource",
    "EmbedderResource",
    "EvaluatorResource",
    "FinetunerResource",
    "LineageResource",
    "PoolSourceResource",
    "SettingsResource",
    "ValidationResource",
    "default_resources",
]


class DeviceResource(dg.ConfigurableResource, Device):
    """Where models run: CUDA (bf16 when supported) if torch sees a GPU, else the CPU."""


class EmbedderResource(dg.ConfigurableResource, Embedder):
    """Embedder: a Hugging Face encoder, mean-pooled and L2-normalised, run offline on the chosen device."""

    device: DeviceResource = Field(default_factory=DeviceResource, description="where the encoder runs")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.report_to(getattr(context, "log", None))  # progress also goes to the run's log in the UI

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release()


class FinetunerResource(dg.ConfigurableResource, LoraFinetuner):
    """Finetuner: trains a LoRA adapter on a set of examples over a shared, once-loaded base model."""

    device: DeviceResource | None = Field(
        default=None, description="where the model runs; None: auto", json_schema_extra=NOT_MEASUREMENT
    )


class EvaluatorResource(dg.ConfigurableResource, Evaluator):
    """Scores a model on the proxy eval set: log-likelihood multiple choice, greedy exact match."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check_backend()


class AnnResource(dg.ConfigurableResource, AnnSearch):
    """ANN: k-nearest-neighbour search with faiss, GPU when present else CPU."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.report_to(getattr(context, "log", None))


class SettingsResource(dg.ConfigurableResource, HarpSettings):
    """HARP selection settings: hierarchy sizes, budget, seeds and baseline parameters."""


class ValidationResource(dg.ConfigurableResource, ValidationSettings):
    """Where the validation group scores selections: a held-out test split never used for selection."""


class LineageResource(dg.ConfigurableResource, LineageStore):
    """Lineage store: typed Parquet tables under DAGSTER_HOME plus a DuckDB catalog of views over them."""


class PoolSourceResource(dg.ConfigurableResource, PoolSource):
    """The candidate pool (a JSONL/Parquet file or a folder of them) and the proxy eval set."""


def _env(name: str) -> Any:
    """`dg.EnvVar(name)` when the variable is set (the UI then shows the variable, not its value), else None."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def default_resources() -> dict[str, Any]:
    """The demo configuration; HARP_POOL, HARP_EVAL, HARP_BASE_MODEL, HARP_TEST, HARP_GROUND_TRUTH,
    HARP_CPU_THREADS and HARP_DEMO_DIR override it."""
    from harp_demo.build import DEMO_LORA, VALIDATION_LORA

    device = DeviceResource(cpu_threads=int(os.environ.get("HARP_CPU_THREADS", "0")))
    base_model = _env("HARP_BASE_MODEL") or str(demo_root() / "base_model")
    if os.environ.get("HARP_TEST"):
        validation = ValidationResource(test_path=dg.EnvVar("HARP_TEST"), ground_truth_path=_env("HARP_GROUND_TRUTH"))
    else:
        validation = ValidationResource.from_env_or_demo()
    return {
        "pool_source": PoolSourceResource(pool_path=_env("HARP_POOL"), eval_path=_env("HARP_EVAL")),
        "lineage": LineageResource(),
        "settings": SettingsResource(),
        "embedder": EmbedderResource(device=device),
        "finetuner": FinetunerResource(base_model=base_model, device=device, **DEMO_LORA),
        "evaluator": EvaluatorResource(),
        "validation_finetuner": FinetunerResource(base_model=base_model, device=device, **VALIDATION_LORA),
        "validation": validation,
    }
