"""The HARP code location: every stage an asset, with the demo benchmark as the default configuration.

Three jobs split the graph where leaf partitions are created: `harp_prepare_job` (pool, eval set,
embeddings, hierarchy, base scores; it registers the leaf partitions), `leaf_utilities_job` (one run per
contiguous range of requested leaf partitions; the base model loads once per run), and `harp_select_job`
(posteriors, the four selections, the catalog). `run_harp` runs the three in order, asking the leaf job
for the representative leaves only; already-measured, unchanged leaves are skipped inside the run.

Importing this module builds nothing and loads no model: paths resolve when an asset runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from harp_assets.active_round import active_round_plan, read_plan
from harp_assets.base_scores import base_model_scores
from harp_assets.checks import CHECKS
from harp_assets.demo.build import DEMO_LORA, VALIDATION_LORA
from harp_assets.embeddings import example_embeddings
from harp_assets.leaf_utilities import leaf_utilities
from harp_assets.leaves import LEAVES_PARTITIONS, leaf_hierarchy, load_leaf_table
from harp_assets.posteriors import phi_posteriors
from harp_assets.selections import (
    harp_c_selection,
    harp_e_selection,
    lineage_catalog,
    random_selection,
    tsds_selection,
)
from harp_assets.sensors import chain_sensors, daily_reselection, pending_active_leaves, pool_growth_sensor
from harp_assets.settings import HarpSettings, ValidationSettings, demo_root
from harp_assets.sources import pool_examples, proxy_eval_set
from harp_assets.validation import exhaustive_leaf_ids, exhaustive_selection, selection_validation
from harp_resources.device import DeviceResource
from harp_resources.embedder import EmbedderResource
from harp_resources.evaluator import Evaluator
from harp_resources.finetuner import LoraFinetuner
from harp_resources.lineage_store import LineageStore
from harp_resources.pool_source import PoolSource

PREPARE_ASSETS = [pool_examples, proxy_eval_set, example_embeddings, leaf_hierarchy, base_model_scores]
SELECT_ASSETS = [
    phi_posteriors, harp_c_selection, harp_e_selection, tsds_selection, random_selection, active_round_plan,
    lineage_catalog,
]
ALL_ASSETS = [*PREPARE_ASSETS, leaf_utilities, *SELECT_ASSETS]
VALIDATION_ASSETS = [exhaustive_selection, selection_validation]

harp_prepare_job = dg.define_asset_job(
    "harp_prepare_job", selection=[a.key for a in PREPARE_ASSETS],
    description="Pool, eval set, embeddings, leaf hierarchy (registers leaf partitions) and base scores.",
)
leaf_utilities_job = dg.define_asset_job(
    "leaf_utilities_job", selection=[leaf_utilities.key],
    description="Measure leaf partitions; a partition range runs in one step with the base model loaded once.",
)
harp_select_job = dg.define_asset_job(
    "harp_select_job", selection=[a.key for a in SELECT_ASSETS],
    description="Posteriors from HARP's measured leaves, the four selections, the next active round's plan, the "
    "run manifest and the DuckDB catalog.",
)

harp_validation_job = dg.define_asset_job(
    "harp_validation_job", selection=[a.key for a in VALIDATION_ASSETS],
    description="The exhaustive oracle (every leaf must be measured) and every selection validated on the "
    "held-out test split; `make validate` measures the leaves and runs it.",
)


def default_resources() -> dict[str, Any]:
    """The demo configuration; HARP_BASE_MODEL, HARP_POOL, HARP_EVAL and HARP_DEMO_DIR override it."""
    device = DeviceResource(cpu_threads=int(os.environ.get("HARP_CPU_THREADS", "0")))
    base_model = os.environ.get("HARP_BASE_MODEL") or str(demo_root() / "base_model")
    return {
        "pool_source": PoolSource.from_env_or_demo(),
        "lineage": LineageStore(),
        "settings": HarpSettings(),
        "embedder": EmbedderResource(device=device),
        "finetuner": LoraFinetuner(base_model=base_model, device=device, **DEMO_LORA),
        "evaluator": Evaluator(),
        "validation_finetuner": LoraFinetuner(base_model=base_model, device=device, **VALIDATION_LORA),
        "validation": ValidationSettings.from_env_or_demo(),
    }


defs = dg.Definitions(
    assets=[*ALL_ASSETS, *VALIDATION_ASSETS],
    resources=default_resources(),
    jobs=[harp_prepare_job, leaf_utilities_job, harp_select_job, harp_validation_job],
    asset_checks=CHECKS,
    sensors=[pool_growth_sensor, *chain_sensors(harp_prepare_job, leaf_utilities_job, harp_select_job)],
    schedules=[daily_reselection],
)


def partition_ranges(registered: list[str], wanted: set[str]) -> list[tuple[str, str]]:
    """Contiguous runs of `wanted` keys in the registered partition order, as (start, end) pairs."""
    ranges: list[tuple[str, str]] = []
    start = prev = None
    for key in registered:
        if key in wanted:
            start = key if start is None else start
            prev = key
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return ranges


def run_leaf_ranges(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions,
    wanted: set[str],
    tags: Mapping[str, str] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """One `leaf_utilities_job` run per contiguous range of `wanted` keys in the registered partition order
    (each range is one step, so the base model loads once per range)."""
    registered = instance.get_dynamic_partitions(LEAVES_PARTITIONS.name)
    return [
        definitions.resolve_job_def("leaf_utilities_job").execute_in_process(
            instance=instance,
            tags={**dict(tags or {}), "dagster/asset_partition_range_start": a, "dagster/asset_partition_range_end": b},
        )
        for a, b in partition_ranges(registered, wanted)
    ]


def run_harp(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions = defs,
    *,
    leaf_ids: list[str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Materialise the whole graph in order: prepare, the representative leaves (or `leaf_ids`), select,
    then each planned active round (its leaves, then select again).

    Returns the stages' Dagster results (`leaf_runs` is a list: one run per partition range, active rounds
    included; `select` is the last selection run, `select_runs` all of them) and their wall `seconds`; it
    stops after a stage whose run failed. Each leaf range runs as one step, so the base model loads once
    per range.
    """
    results: dict[str, Any] = {"seconds": {}}
    t0 = time.perf_counter()
    results["prepare"] = definitions.resolve_job_def("harp_prepare_job").execute_in_process(
        instance=instance, tags=dict(tags or {}))
    results["seconds"]["prepare"] = time.perf_counter() - t0
    if not results["prepare"].success:
        return results
    lineage = (definitions.resources or {}).get("lineage") or LineageStore()
    table = load_leaf_table(lineage)
    wanted = set(leaf_ids) if leaf_ids is not None else set(table.leaf_ids[table.representative].tolist())
    t0 = time.perf_counter()
    results["leaf_runs"] = run_leaf_ranges(instance, definitions, wanted, tags)
    results["seconds"]["leaf_runs"] = time.perf_counter() - t0
    if not all(r.success for r in results["leaf_runs"]):
        return results
    resources = definitions.resources or {}
    finetuner, settings = resources.get("finetuner"), resources.get("settings") or HarpSettings()
    results["select_runs"] = []
    results["seconds"]["select"] = 0.0
    while True:
        t0 = time.perf_counter()
        results["select"] = definitions.resolve_job_def("harp_select_job").execute_in_process(
            instance=instance, tags=dict(tags or {}))
        results["select_runs"].append(results["select"])
        results["seconds"]["select"] += time.perf_counter() - t0
        if not results["select"].success or finetuner is None:
            return results
        pending = set(pending_active_leaves(lineage, finetuner, settings))
        if not pending:
            return results
        t0 = time.perf_counter()
        runs = run_leaf_ranges(instance, definitions, pending,
                               {**dict(tags or {}), "harp/active_round": str(len(read_plan(lineage)))})
        results["leaf_runs"].extend(runs)
        results["seconds"]["active_leaf_runs"] = results["seconds"].get("active_leaf_runs", 0.0) + (
            time.perf_counter() - t0)
        if not all(r.success for r in runs):
            return results


def run_validation(
    instance: dg.DagsterInstance,
    definitions: dg.Definitions = defs,
    *,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The exhaustive mode and the validation group, after `run_harp`: measure every leaf not yet measured
    (HARP's own leaves are cached partitions), then run `harp_validation_job`."""
    lineage = (definitions.resources or {}).get("lineage") or LineageStore()
    results: dict[str, Any] = {"seconds": {}}
    t0 = time.perf_counter()
    results["leaf_runs"] = run_leaf_ranges(instance, definitions, set(exhaustive_leaf_ids(lineage)),
                                           {**dict(tags or {}), "harp/exhaustive": "true"})
    results["seconds"]["exhaustive_leaf_runs"] = time.perf_counter() - t0
    if not all(r.success for r in results["leaf_runs"]):
        return results
    t0 = time.perf_counter()
    results["validate"] = definitions.resolve_job_def("harp_validation_job").execute_in_process(
        instance=instance, tags=dict(tags or {}))
    results["seconds"]["validate"] = time.perf_counter() - t0
    return results
