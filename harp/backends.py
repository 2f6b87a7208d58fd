"""Where leaves train: in this process (`local`, the default) or on a pool of Ray actors (`ray`).

A leaf measurement is one train-and-evaluate cycle (`measure_leaf`). Both backends run the same function on
the same inputs, so they store the same scores for the same thread settings; they differ only in where the
cycle runs. With `ray`, each actor loads the base model once (the finetuner's per-process base cache) and
keeps it across the leaves it is given; results come back to the caller, which writes them exactly as for
`local`, so caching, lineage and the UI do not change.

Failures: a leaf whose cycle raises, or whose actor dies under it (killed, out of memory, node lost), is
tried again, on a fresh actor where its actor died; a leaf that fails `max_attempts` times is reported in
one `LeafExecutionError` naming its id, raised only after every other leaf's result has been handed back.

Ray is reached through `ray.init(address=...)` directly rather than dagster-ray's resources, because this
module belongs to the Dagster-free library: `harp()`, the Dagster assets and the benchmarks share it
(docs/scale-out.md).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from harp.models.device import Device
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner, train_and_evaluate
from harp.progress import LogTarget, emit

__all__ = [
    "LeafExecution",
    "LeafExecutionError",
    "LeafJob",
    "LeafMeasurement",
    "RayLeafPool",
    "measure_leaf",
    "run_leaves",
]


@dataclass(frozen=True, eq=False)
class LeafMeasurement:
    """One train-and-evaluate cycle: correctness aligned with the eval set's row order, and its cost."""

    example_ids: tuple[str, ...]  # eval example ids, eval-set order
    domains: tuple[str, ...]  # domain of each eval row
    correct: np.ndarray  # (n_eval,) float32 in {0, 1}
    per_domain: dict[str, float]  # mean correctness per domain name (U_d of the leaf)
    n_train: int
    train_steps: int
    train_tokens: int
    first_loss: float
    last_loss: float
    train_seconds: float
    eval_seconds: float
    seconds: float  # the whole cycle, wall clock
    seed: int

    def __post_init__(self) -> None:
        if self.correct.shape != (len(self.example_ids),) or len(self.domains) != len(self.example_ids):
            raise ValueError(
                f"LeafMeasurement: {len(self.example_ids)} example ids, {len(self.domains)} domains and "
                f"correct of shape {self.correct.shape} must align"
            )
        self.correct.flags.writeable = False

    def summary(self) -> dict[str, Any]:
        """Scalars for metadata (and, with `to_frame`, all that `from_frame` needs)."""
        return {
            "n_train": self.n_train,
            "train_steps": self.train_steps,
            "train_tokens": self.train_tokens,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "seconds": self.seconds,
            "seed": self.seed,
            "per_domain": dict(self.per_domain),
        }

    def to_frame(self) -> pl.DataFrame:
        """Per-example correctness, one row per eval example in eval-set order."""
        return pl.DataFrame(
            {
                "example_id": list(self.example_ids),
                "domain": list(self.domains),
                "correct": self.correct.astype(np.float32),
            },
            schema={"example_id": pl.String, "domain": pl.String, "correct": pl.Float32},
        )

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, summary: Mapping[str, Any]) -> LeafMeasurement:
        """Rebuild a measurement from `to_frame()` and `summary()` (e.g. after persisting them)."""
        missing = [c for c in ("example_id", "domain", "correct") if c not in frame.columns]
        if missing:
            raise ValueError(f"leaf measurement frame lacks column(s) {missing}; it has {frame.columns}")
        need = (
            "n_train",
            "train_steps",
            "train_tokens",
            "first_loss",
            "last_loss",
            "train_seconds",
            "eval_seconds",
            "seconds",
            "seed",
        )
        absent = [k for k in need if k not in summary]
        if absent:
            raise ValueError(f"leaf measurement summary lacks key(s) {absent}")
        correct = frame["correct"].to_numpy().astype(np.float32)
        domains = tuple(frame["domain"].to_list())
        per_domain = summary.get("per_domain") or {
            d: float(correct[np.asarray(domains) == d].mean()) for d in sorted(set(domains))
        }
        return cls(
            example_ids=tuple(frame["example_id"].to_list()),
            domains=domains,
            correct=correct,
            per_domain={str(k): float(v) for k, v in per_domain.items()},
            n_train=int(summary["n_train"]),
            train_steps=int(summary["train_steps"]),
            train_tokens=int(summary["train_tokens"]),
            first_loss=float(summary["first_loss"]),
            last_loss=float(summary["last_loss"]),
            train_seconds=float(summary["train_seconds"]),
            eval_seconds=float(summary["eval_seconds"]),
            seconds=float(summary["seconds"]),
            seed=int(summary["seed"]),
        )


def measure_leaf(
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    prompts: Sequence[str],
    responses: Sequence[str],
    eval_set: Any,
    *,
    seed: int,
) -> LeafMeasurement:
    """Train the adapter from its seeded start on one leaf's examples and score it on the proxy set."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if len(prompts) == 0:
        raise ValueError("a leaf needs at least one training example")
    t0 = time.perf_counter()
    stats, result = train_and_evaluate(finetuner, evaluator, prompts, responses, eval_set, seed=seed)
    return LeafMeasurement(
        example_ids=tuple(result.example_ids),
        domains=tuple(result.domains),
        correct=np.asarray(result.correct, dtype=np.float32).copy(),
        per_domain=dict(result.per_domain),
        n_train=stats.examples,
        train_steps=stats.steps,
        train_tokens=stats.tokens,
        first_loss=stats.first_loss,
        last_loss=stats.last_loss,
        train_seconds=stats.seconds,
        eval_seconds=result.seconds,
        seconds=time.perf_counter() - t0,
        seed=int(seed),
    )


# --------------------------------------------------------------------------------------------------------
# What to run and where
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeafJob:
    """One leaf to measure: its key (a leaf id or index) and its training rows, nearest the centroid first."""

    key: Any
    prompts: Sequence[str]
    responses: Sequence[str]


class LeafExecution(BaseModel):
    """Where leaf cycles run. `local` trains in this process, one leaf after another; `ray` hands the leaves
    to a pool of Ray actors, one per GPU (or per CPU slot on a CPU cluster), each keeping its base model."""

    backend: Literal["local", "ray"] = Field(default="local", description="local or ray")
    ray_address: str = Field(
        default="",
        description='"" starts a local Ray cluster for the call; "auto" joins the cluster running on this node; '
                    '"ray://<head>:10001" connects through Ray Client (e.g. a KubeRay head service)',
    )
    actors: int = Field(default=0, ge=0, description="0: one per GPU in the cluster, else one per CPU slot")
    gpus_per_actor: float = Field(default=-1.0, description="-1: 1 when the cluster has GPUs, else 0")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    threads_per_actor: int = Field(default=1, ge=0, description="torch threads in each CPU actor; 0: torch's default")
    max_attempts: int = Field(default=2, ge=1, description="tries per leaf before it fails the step")
    actor_start_timeout_s: float = Field(default=600.0, gt=0, description="wait for actors to load their model")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env for a remote cluster (env_vars, pip, working_dir)"
    )


class LeafExecutionError(RuntimeError):
    """Leaves that failed every attempt, by key, with their last error; all other leaves were handed back."""

    def __init__(self, failures: Mapping[Any, str], attempts: int) -> None:
        self.failures = dict(failures)
        keys = ", ".join(str(k) for k in self.failures)
        detail = "; ".join(f"{k}: {v}" for k, v in self.failures.items())
        super().__init__(f"{len(self.failures)} leaf/leaves failed {attempts} time(s): {keys} ({detail})")


def run_leaves(
    execution: LeafExecution | None,
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    jobs: Sequence[LeafJob],
    eval_set: Any,
    *,
    seed: int,
    log: LogTarget = None,
) -> Iterator[tuple[Any, LeafMeasurement]]:
    """Measure every job, yielding `(key, measurement)` as each finishes (in job order for `local`, in
    completion order for `ray`); raises `LeafExecutionError` at the end if some leaf failed every attempt."""
    execution = execution or LeafExecution()
    if not jobs:
        return
    if execution.backend == "local":
        yield from _run_local(execution, finetuner, evaluator, jobs, eval_set, seed=seed, log=log)
        return
    with RayLeafPool(execution, finetuner, evaluator, eval_set, n_jobs=len(jobs), log=log) as pool:
        yield from pool.run(jobs, seed=seed)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


def _run_local(
    execution: LeafExecution,
    finetuner: LoraFinetuner,
    evaluator: Evaluator,
    jobs: Sequence[LeafJob],
    eval_set: Any,
    *,
    seed: int,
    log: LogTarget,
) -> Iterator[tuple[Any, LeafMeasurement]]:
    failures: dict[Any, str] = {}
    for job in jobs:
        for attempt in range(1, execution.max_attempts + 1):
            try:
                m = measure_leaf(finetuner, evaluator, job.prompts, job.responses, eval_set, seed=seed)
            except Exception as exc:  # noqa: BLE001 - a leaf's failure must not lose the others' results
                emit(log, f"leaf {job.key}: attempt {attempt}/{execution.max_attempts} failed: {_short(exc)}")
                if attempt == execution.max_attempts:
                    failures[job.key] = _short(exc)
                continue
            yield job.key, m
            break
    if failures:
        raise LeafExecutionError(failures, execution.max_attempts)


# --------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------


def _plain(model: BaseModel, cls: type[BaseModel]) -> dict[str, Any]:
    """The library-class fields of `model` (a Dagster resource is a subclass), as plain values for pickling."""
    out: dict[str, Any] = {}
    for name in cls.model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            value = {k: getattr(value, k) for k in type(value).model_fields if k in Device.model_fields}
        out[name] = value
    return out


class LeafWorker:
    """A Ray actor's state: its own finetuner and evaluator over a base model loaded once, and the eval set."""

    def __init__(self, finetuner: dict[str, Any], evaluator: dict[str, Any], eval_set: Any, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.finetuner = LoraFinetuner.model_validate(finetuner)
        self.evaluator = Evaluator.model_validate(evaluator)
        self.eval_set = eval_set
        self.finetuner.tokenizer  # noqa: B018 - load the base model now, not inside the first leaf

    def pid(self) -> int:
        return os.getpid()

    def measure(self, prompts: Sequence[str], responses: Sequence[str], seed: int) -> LeafMeasurement:
        return measure_leaf(self.finetuner, self.evaluator, prompts, responses, self.eval_set, seed=seed)


_KEPT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def _signal_dispositions() -> dict[int, Any]:
    """The process's signal handlers, so a local Ray cluster's native code cannot leave them changed (it can
    leave SIGTERM ignored, and children would inherit that). Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {int(getattr(signal, n)): signal.getsignal(getattr(signal, n)) for n in _KEPT_SIGNALS
            if hasattr(signal, n)}


def _restore_signals(saved: dict[int, Any]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in saved.items():
        if handler is not None:  # None: set from outside Python; nothing we can put back
            signal.signal(sig, handler)


class RayLeafPool:
    """A pool of `LeafWorker` actors on a Ray cluster, for the duration of a `with` block.

    `attempts` counts the tries of each leaf key, `in_flight` maps each leaf being trained to the pid of the
    actor holding it, `replaced` counts actors started again after dying. When the block started a local
    cluster (`ray_address=""` and no connection yet), the cluster is shut down on exit.
    """

    def __init__(self, execution: LeafExecution, finetuner: LoraFinetuner, evaluator: Evaluator, eval_set: Any,
                 *, n_jobs: int | None = None, log: LogTarget = None) -> None:
        self.execution, self.log, self.n_jobs = execution, log, n_jobs
        device = finetuner.device
        self._finetuner = _plain(finetuner, LoraFinetuner)
        # Each actor runs on the device Ray gave it ("auto": the GPU it was assigned, else the CPU), with its
        # own thread count; an explicit "cpu" stays on the CPU.
        self._finetuner["device"] = {
            "device": "cpu" if device is not None and device.device == "cpu" else "auto",
            "cpu_threads": execution.threads_per_actor,
            "dtype": device.dtype if device is not None else "auto",
        }
        self._evaluator = _plain(evaluator, Evaluator)
        self._eval_set = eval_set
        self._started_cluster = False
        self.actors: list[Any] = []
        self.pids: list[int] = []
        self.attempts: collections.Counter = collections.Counter()
        self.in_flight: dict[Any, int] = {}
        self.replaced = 0
        self.start_seconds = 0.0
        self._saved_signals: dict[int, Any] = {}

    # -- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> RayLeafPool:
        import ray

        t0 = time.perf_counter()
        ex = self.execution
        if not ray.is_initialized():
            self._saved_signals = _signal_dispositions()
            kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False,
                                      "log_to_driver": True}
            if ex.runtime_env:
                kwargs["runtime_env"] = ex.runtime_env
            ray.init(address=ex.ray_address or None, **kwargs)
            self._started_cluster = not ex.ray_address
        try:
            self._ref_eval = ray.put(self._eval_set)
            self._options = self._actor_options()
            n = self._actor_count()
            emit(self.log, f"ray: starting {n} leaf actor(s) ({self._options}) on {self._cluster_text()}")
            self.actors = [self._new_actor() for _ in range(n)]
            self.pids = self._ready(self.actors)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.start_seconds = time.perf_counter() - t0
        emit(self.log, f"ray: {n} actor(s) ready in {self.start_seconds:.1f} s (pids {self.pids})")
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started_cluster and ray.is_initialized():
            ray.shutdown()
            self._started_cluster = False
            _restore_signals(self._saved_signals)
            self._saved_signals = {}

    # -- actors --------------------------------------------------------------------------------------------

    def _cluster_text(self) -> str:
        import ray

        res = ray.cluster_resources()
        return f"a cluster with {res.get('CPU', 0):g} CPU(s) and {res.get('GPU', 0):g} GPU(s)"

    def _actor_options(self) -> dict[str, Any]:
        import ray

        ex = self.execution
        gpus = ray.cluster_resources().get("GPU", 0.0)
        per_gpu = ex.gpus_per_actor if ex.gpus_per_actor >= 0 else (1.0 if gpus >= 1 else 0.0)
        # Ray retries nothing itself: a dead actor is replaced and its leaf counted here, so attempts are exact.
        return {"num_cpus": ex.cpus_per_actor, "num_gpus": per_gpu, "max_restarts": 0, "max_task_retries": 0}

    def _actor_count(self) -> int:
        import ray

        ex, opt = self.execution, self._options
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        if ex.actors:
            n = ex.actors
        elif opt["num_gpus"] > 0:
            n = int(gpus // opt["num_gpus"])
        else:
            n = int(cpus // opt["num_cpus"])
        n = max(1, min(n, self.n_jobs or n))
        fits = n * opt["num_cpus"] <= cpus and n * opt["num_gpus"] <= gpus
        if not fits and not self.execution.ray_address:
            raise ValueError(
                f"{n} leaf actor(s) of {opt['num_cpus']:g} CPU and {opt['num_gpus']:g} GPU each do not fit the "
                f"local Ray cluster ({cpus:g} CPU, {gpus:g} GPU); lower `actors`, `cpus_per_actor` or `gpus_per_actor`"
            )
        return n

    def _new_actor(self) -> Any:
        import ray

        cls = ray.remote(LeafWorker).options(**self._options)
        return cls.remote(self._finetuner, dict(self._evaluator), self._ref_eval, self.execution.threads_per_actor)

    def _ready(self, actors: Sequence[Any]) -> list[int]:
        import ray

        try:
            return list(ray.get([a.pid.remote() for a in actors], timeout=self.execution.actor_start_timeout_s))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"ray: leaf actors did not start within {self.execution.actor_start_timeout_s:g} s; the cluster "
                f"may lack the resources they ask for ({self._options})"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"ray: a leaf actor failed to start (loading the base model): {_short(exc)}") from exc

    def _replace(self, slot: int) -> None:
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.actors[slot] = self._new_actor()
        self.pids[slot] = self._ready([self.actors[slot]])[0]
        self.replaced += 1
        emit(self.log, f"ray: actor {slot} started again (pid {self.pids[slot]})")

    # -- the leaves ----------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[LeafJob], *, seed: int) -> Iterator[tuple[Any, LeafMeasurement]]:
        """Measure every job on the actors, yielding results as they finish; see `run_leaves`."""
        import ray

        if not self.actors:
            raise RuntimeError("RayLeafPool.run needs the pool started: use it in a `with` block")
        pending = collections.deque(jobs)
        idle = collections.deque(range(len(self.actors)))
        running: dict[Any, tuple[int, LeafJob]] = {}
        failures: dict[Any, str] = {}
        limit = self.execution.max_attempts
        while pending or running:
            while pending and idle:
                slot, job = idle.popleft(), pending.popleft()
                self.attempts[job.key] += 1
                ref = self.actors[slot].measure.remote(list(job.prompts), list(job.responses), int(seed))
                running[ref] = (slot, job)
                self.in_flight[job.key] = self.pids[slot]
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, job = running.pop(ref)
            self.in_flight.pop(job.key, None)
            try:
                m = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the cycle raised; the actor lives on
                error = _short(exc.cause if getattr(exc, "cause", None) is not None else exc)
            except ray.exceptions.RayActorError as exc:  # the actor died under the leaf
                error = f"its actor (pid {self.pids[slot]}) died: {_short(exc)}"
                self._replace(slot)
            else:
                idle.append(slot)
                yield job.key, m
                continue
            idle.append(slot)
            emit(self.log, f"leaf {job.key}: attempt {self.attempts[job.key]}/{limit} failed: {error}")
            if self.attempts[job.key] < limit:
                pending.appendleft(job)
            else:
                failures[job.key] = error
        # A caller that stops early leaves cycles running: the pool's exit kills the actors.
        if failures:
            raise LeafExecutionError(failures, limit)
