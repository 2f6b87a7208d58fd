"""Thin Dagster resources over the library's objects.

Each resource is the `harp` class itself, made configurable in the launchpad: it inherits every field and
method from the library and adds only Dagster's lifecycle (run logs, teardown) and nested resources. The
model code lives in `harp/`, which never imports this package or Dagster.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import dagster as dg
from pydantic import Field, create_model
from pydantic.fields import FieldInfo

from harp.backends import LeafExecution
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
    "LeafExecutionResource",
    "LineageResource",
    "PoolSourceResource",
    "SettingsResource",
    "ValidationResource",
    "configured",
    "default_resources",
    "process_tags",
    "tag_run_worker",
]


TRUST_REMOTE_CODE_ENV = "HARP_TRUST_REMOTE_CODE"

# Tags naming the process that executes a run (its run worker), so a run that process left in progress when
# it died can be told from a live one (`harp_assets.recovery`).
HOST_TAG = "harp/host"
PID_TAG = "harp/pid"
PID_STARTED_TAG = "harp/pid_started"  # the process's start time, so a reused pid is not taken for it


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming process `pid` (default: this one) on this host."""
    import socket

    import psutil

    pid = os.getpid() if pid is None else pid
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid),
            PID_STARTED_TAG: f"{psutil.Process(pid).create_time():.2f}"}


def tag_run_worker(context: dg.InitResourceContext) -> None:
    """Tag the run with its run worker's process when nothing tagged it yet (runs the daemon, the UI or
    `dagster job execute` launched): the worker is this process, or the parent of a step subprocess."""
    import multiprocessing

    run, instance = getattr(context, "run", None), getattr(context, "instance", None)
    if run is None or instance is None or PID_TAG in run.tags:
        return
    parent = multiprocessing.parent_process()
    try:
        instance.add_run_tags(run.run_id, process_tags(parent.pid if parent is not None else None))
    except Exception:  # a vanished parent, or storage that refuses tags: recovery then leaves this run alone
        return


def _refuse_remote_code(resource: Any) -> None:
    """Model code shipped with weights runs as the pipeline's user; the UI has no authentication, so only the
    deployment (its environment) may allow it, never run config."""
    if getattr(resource, "trust_remote_code", False) and os.environ.get(TRUST_REMOTE_CODE_ENV) != "1":
        raise PermissionError(
            f"{type(resource).__name__}: trust_remote_code cannot be turned on from run config or the UI; the "
            f"deployment allows it by setting {TRUST_REMOTE_CODE_ENV}=1 in the environment of the code location"
        )


def die_with_parent() -> None:
    """In a step subprocess, ask Linux to SIGTERM this process when its parent exits.

    A step that holds a model runs in a subprocess of the run worker (`dagster job execute`, the daemon's
    launches); when the worker is killed, the step would otherwise train to the end, holding the device. A
    main process (an in-process run, `make demo`, the CLI, a nohup'd benchmark) is left alone: its lifetime is
    its user's. No-op where `prctl` is missing (macOS).
    """
    import ctypes
    import multiprocessing
    import signal
    import sys

    if not sys.platform.startswith("linux") or multiprocessing.parent_process() is None:
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class DeviceResource(dg.ConfigurableResource, Device):
    """Where models run: CUDA (bf16 when supported) if torch sees a GPU, else the CPU."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        die_with_parent()  # every step that runs a model has a device: it dies with its run worker
        tag_run_worker(context)


class EmbedderResource(dg.ConfigurableResource, Embedder):
    """Embedder: a Hugging Face encoder, mean-pooled and L2-normalised, run offline on the chosen device."""

    device: DeviceResource = Field(default_factory=DeviceResource, description="where the encoder runs")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        _refuse_remote_code(self)
        self.report_to(getattr(context, "log", None))  # progress also goes to the run's log in the UI

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release()


class FinetunerResource(dg.ConfigurableResource, LoraFinetuner):
    """Finetuner: trains a LoRA adapter on a set of examples over a shared, once-loaded base model."""

    device: DeviceResource | None = Field(
        default=None, description="where the model runs; None: auto", json_schema_extra=NOT_MEASUREMENT
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        _refuse_remote_code(self)


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

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        tag_run_worker(context)  # every asset writes lineage: every run can be recovered if its worker dies


class LeafExecutionResource(dg.ConfigurableResource, LeafExecution):
    """Where leaf cycles run: in the step's process (`local`) or on a pool of Ray actors (`ray`)."""


class PoolSourceResource(dg.ConfigurableResource, PoolSource):
    """The candidate pool (a JSONL/Parquet file or a folder of them) and the proxy eval set."""


def configured(cls: type[dg.ConfigurableResource], **values: Any) -> dg.ConfigurableResource:
    """`cls(**values)`, where the given values are also the defaults of the resource's config schema.

    When run config (the launchpad) sets any field of a resource, Dagster rebuilds the resource from that
    config alone, so every other field would fall back to the class default: overriding `epochs` would reset
    the whole LoRA recipe and make every stored leaf stale. A subclass whose field defaults are these values
    keeps them under an override. An `EnvVar` stays an explicit value (the UI shows the variable's name) and
    its value at load time becomes the default; nested resources stay explicit.
    """
    fields: dict[str, Any] = {}
    explicit: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dg.ConfigurableResource) or value is None:
            explicit[name] = value
            continue
        default = value
        if isinstance(value, dg.EnvVar):
            explicit[name] = value
            default = os.environ.get(value.env_var_name)
            if default is None:
                continue
        info = cls.model_fields[name]
        if info.default_factory is not None:  # a mutable default (a mapping, a list): a fresh copy per instance
            merged = FieldInfo.merge_field_infos(info, default_factory=lambda v=default: copy.deepcopy(v))
        else:
            merged = FieldInfo.merge_field_infos(info, default=default)
        fields[name] = (info.annotation, merged)
    sub = create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **fields)
    return sub(**explicit)


def _env(name: str) -> Any:
    """`dg.EnvVar(name)` when the variable is set (the UI then shows the variable, not its value), else None."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def default_resources() -> dict[str, Any]:
    """The demo configuration; HARP_POOL, HARP_EVAL, HARP_BASE_MODEL, HARP_TEST, HARP_GROUND_TRUTH,
    HARP_CPU_THREADS and HARP_DEMO_DIR override it, and HARP_LEAF_BACKEND, HARP_RAY_ADDRESS, HARP_RAY_ACTORS
    and HARP_RAY_GPUS_PER_ACTOR choose where leaves train (docs/scale-out.md)."""
    from harp_demo.build import DEMO_LORA, VALIDATION_LORA

    device = DeviceResource(cpu_threads=int(os.environ.get("HARP_CPU_THREADS", "0")))
    base_model = _env("HARP_BASE_MODEL") or str(demo_root() / "base_model")
    if os.environ.get("HARP_TEST"):
        validation = ValidationResource(test_path=dg.EnvVar("HARP_TEST"), ground_truth_path=_env("HARP_GROUND_TRUTH"))
    else:
        validation = ValidationResource.from_env_or_demo()
    return {
        "pool_source": configured(PoolSourceResource, pool_path=_env("HARP_POOL"), eval_path=_env("HARP_EVAL")),
        "lineage": LineageResource(),
        "settings": SettingsResource(),
        "embedder": EmbedderResource(device=device),
        "finetuner": configured(FinetunerResource, base_model=base_model, device=device, **DEMO_LORA),
        "evaluator": EvaluatorResource(),
        "validation_finetuner": configured(FinetunerResource, base_model=base_model, device=device,
                                           **VALIDATION_LORA),
        "validation": validation,
        "leaf_execution": leaf_execution_from_env(),
    }


def leaf_execution_from_env() -> LeafExecutionResource:
    """`LeafExecutionResource` from HARP_LEAF_BACKEND (local|ray), HARP_RAY_ADDRESS, HARP_RAY_ACTORS and
    HARP_RAY_GPUS_PER_ACTOR; unset variables keep the defaults (local, in the step's process)."""
    values: dict[str, Any] = {"backend": _env("HARP_LEAF_BACKEND"), "ray_address": _env("HARP_RAY_ADDRESS")}
    numbers = {"actors": ("HARP_RAY_ACTORS", int), "gpus_per_actor": ("HARP_RAY_GPUS_PER_ACTOR", float)}
    for name, (var, kind) in numbers.items():
        raw = os.environ.get(var)
        if raw:
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
    return configured(LeafExecutionResource, **{k: v for k, v in values.items() if v is not None})
