"""`harp()`: the whole HARP selection in one call, for use without Dagster.

It runs the same driver as the asset graph (`harp.driver`), in order: hierarchy over the features,
base-model scores, one train-and-evaluate cycle per representative leaf, bootstrap main effects,
empirical-Bayes posteriors for every leaf, optional active rounds, then the HARP-C and HARP-E selections
under one point budget.

    result = harp(
        X_feat=X_feat,                       # (n, d), one row per train example
        base_model_name="path/or/hub-name",  # loaded by LoraFinetuner (offline: must be local or cached)
        train_examples=train_examples,       # dicts (or a polars DataFrame) with prompt, response
        eval_examples=eval_examples,         # example_id, domain, prompt, choices + answer, or answer
        TOP_K_POINTS=10_000,
        lora_config={"r": 16, "lora_alpha": 32},
    )
    result.harp_c, result.harp_e             # selected train-example row indices (np.int64)
    result.info                              # diagnostics (see `harp`)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harp import driver, stages
from harp.backends import LeafExecution
from harp.config import HarpSettings
from harp.method import validate_embeddings
from harp.method.selection import HarpSelection
from harp.models.device import Device
from harp.models.evaluator import Evaluator, parse_eval_set
from harp.models.finetuner import LoraFinetuner
from harp.validate import check_int

__all__ = ["ENVELOPE_KEYS", "HarpResult", "harp"]

# Result keys of the two envelopes, as in `HarpResult` and `info`.
ENVELOPE_KEYS: dict[str, str] = driver.ENVELOPES
# LoraFinetuner fields that harp() sets from its own arguments.
_RESERVED_LORA = {"base_model": "base_model_name", "device": "device", "seed": "seed"}


@dataclass(frozen=True)
class HarpResult:
    """Selected train-example rows under both envelopes, and the diagnostics behind them."""

    harp_c: np.ndarray
    harp_e: np.ndarray
    info: dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------


def _train_rows(train_examples: Any) -> tuple[list[str], list[str]]:
    """(prompts, responses) from a list of dicts or a polars DataFrame; a bad row is named."""
    if hasattr(train_examples, "to_dicts") and hasattr(train_examples, "columns"):
        missing = [c for c in ("prompt", "response") if c not in train_examples.columns]
        if missing:
            raise ValueError(
                f"train_examples: missing column(s) {missing}; columns present: {train_examples.columns}"
            )
        cols = ["prompt", "response"] + (["example_id"] if "example_id" in train_examples.columns else [])
        rows: list[Any] = train_examples.select(cols).to_dicts()
    elif isinstance(train_examples, Mapping) or isinstance(train_examples, str):
        raise TypeError(
            "train_examples must be a list of dicts or a polars DataFrame, not a single dict or string"
        )
    elif isinstance(train_examples, Sequence):
        rows = list(train_examples)
    else:
        raise TypeError(
            "train_examples must be a list of dicts or a polars DataFrame, "
            f"got {type(train_examples).__name__}"
        )
    if not rows:
        raise ValueError("train_examples is empty")
    prompts: list[str] = []
    responses: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"train_examples row {i}: expected a dict, got {type(row).__name__}")
        where = f"train_examples row {i}" + (
            f" (example_id={row['example_id']!r})" if "example_id" in row else ""
        )
        for key in ("prompt", "response"):
            if key not in row:
                raise ValueError(f"{where}: missing field {key!r}")
            value = row[key]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
        prompts.append(row["prompt"])
        responses.append(row["response"])
    return prompts, responses


def _config(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of settings or None, got {type(value).__name__}")
    return dict(value)


def _resource_fields(cls: type, cfg: dict[str, Any], name: str, reserved: Mapping[str, str]) -> None:
    clash = sorted(set(cfg) & set(reserved))
    if clash:
        raise ValueError(
            f"{name} may not set {clash}: use harp()'s "
            + ", ".join(f"{reserved[k]!r}" for k in clash)
            + " argument instead"
        )
    valid = sorted(set(cls.model_fields) - set(reserved))
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"unknown {name} setting(s) {unknown}; valid settings are {valid}")


def _device(device: Any) -> Device:
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a Device, got {device!r}")
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return Device(device=device)


# --------------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------------


def _selection_info(sel: HarpSelection, domains: list[str]) -> dict[str, Any]:
    g = sel.greedy
    return {
        "indices": sel.example_rows,
        "envelope": sel.envelope,
        "n_selected": sel.n_selected,
        "leaf_order": g.order,
        "gains": g.gains,
        "running_gain": g.running,
        "cut_index": g.cut,
        "kept_leaves": g.kept,
        "empty_prefix_best": g.empty_prefix_best,
        "stop_reason": g.stop_reason,
        "objective": g.objective,
        "empty_objective": g.empty_objective,
        "predicted": dict(zip(domains, g.predicted.tolist(), strict=True)),
        "predicted_selected": dict(zip(domains, sel.predicted_rows.tolist(), strict=True)),
        "leaf_of_row": sel.leaf_of_row,
        "note": sel.note,
        "selection": sel,
    }


# --------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------


def harp(
    X_feat: Any,
    base_model_name: str,
    train_examples: Any,
    eval_examples: Any,
    *,
    TOP_K_POINTS: int | None,  # noqa: N803 - the public name of the point budget
    lora_config: Mapping[str, Any] | None = None,
    hierarchy_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | Device = "auto",
    evaluator_config: Mapping[str, Any] | None = None,
    n_boot: int = 200,
    z_active: float = 1.0,
    active_runs: int = 0,
    active_rounds: int = 0,
    tokenizer: Any = None,
    log: stages.LogTarget = None,
    execution: LeafExecution | None = None,
) -> HarpResult:
    """Select train examples with HARP-C and HARP-E under the point budget `TOP_K_POINTS` (None: no cap).

    `lora_config` sets `LoraFinetuner` fields (r, lora_alpha, learning_rate, epochs, batch_size, ...),
    `hierarchy_config` the sizing of `build_parent_leaf_hierarchy` (leaf_size, leaves_per_parent, ...),
    `evaluator_config` the `Evaluator` fields. `tokenizer`, when given, must match the base model's own
    (training and scoring always use the model's). `log` receives progress lines (a logger or a callable).
    `active_rounds` rounds of `active_runs` extra leaves each (default none) measure the unmeasured leaves
    most likely to change the expansive selection before it is made, as the asset graph's active round does.
    `execution` says where leaf cycles run: in this process (default) or on Ray actors (`harp.backends`).

    `info` keys: domains, base_scores, phi_hat / phi_var (measured leaves, rows in measured_leaves order),
    phi_mean / phi_sd (every leaf), measured_leaves, active_domains, inactive_domains, active_mask,
    hyperparameters, leaf_orders, cut_indices, hierarchy, leaf_measurements, n_train_eval_runs,
    train_examples_used, seconds (per stage and total), config, harp_c, harp_e (each: indices and the
    envelope's ranking, gains, cut, predicted y_d and the full `HarpSelection`).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    # -- validate everything before any model is loaded --------------------------------------------------
    if not isinstance(base_model_name, str) or not base_model_name.strip():
        raise ValueError(f"base_model_name must be a model directory or hub name, got {base_model_name!r}")
    seed = check_int(seed, "seed", minimum=0)
    top_k = None if TOP_K_POINTS is None else check_int(TOP_K_POINTS, "TOP_K_POINTS", minimum=0)
    n_boot = check_int(n_boot, "n_boot", minimum=2)
    active_runs = check_int(active_runs, "active_runs", minimum=0)
    active_rounds = check_int(active_rounds, "active_rounds", minimum=0)
    if (
        isinstance(z_active, bool)
        or not isinstance(z_active, int | float | np.number)
        or not (math.isfinite(z_active) and z_active >= 0)
    ):
        raise ValueError(f"z_active must be a finite number >= 0, got {z_active!r}")
    prompts, responses = _train_rows(train_examples)
    X = validate_embeddings(X_feat, name="X_feat")
    if X.shape[0] != len(prompts):
        raise ValueError(
            f"X_feat has {X.shape[0]} rows but train_examples has {len(prompts)} examples: "
            "X_feat needs one row per train example, in the same order"
        )
    eval_items = parse_eval_set(eval_examples)
    lora = _config(lora_config, "lora_config")
    hier_cfg = _config(hierarchy_config, "hierarchy_config")
    eval_cfg = _config(evaluator_config, "evaluator_config")
    _resource_fields(LoraFinetuner, lora, "lora_config", _RESERVED_LORA)
    _resource_fields(Evaluator, eval_cfg, "evaluator_config", {})
    # One separator joins prompt and answer in training and scoring; setting it on one side sets both.
    if "separator" in lora and "separator" not in eval_cfg:
        eval_cfg["separator"] = lora["separator"]
    elif "separator" in eval_cfg and "separator" not in lora:
        lora["separator"] = eval_cfg["separator"]
    elif lora.get("separator") != eval_cfg.get("separator"):
        raise ValueError(
            f"lora_config separator {lora['separator']!r} differs from evaluator_config separator "
            f"{eval_cfg['separator']!r}: training and scoring must join prompt and answer the same way"
        )
    dev = _device(device)
    finetuner = LoraFinetuner(base_model=base_model_name, device=dev, seed=seed, **lora)
    evaluator = Evaluator(**eval_cfg)
    evaluator.check_backend()
    seconds["validate"] = time.perf_counter() - t_start
    stages.emit(log, f"harp: {len(prompts)} train examples, {len(eval_items)} eval examples, budget {top_k}")

    # -- stage 1a: hierarchy ------------------------------------------------------------------------------
    t = time.perf_counter()
    hierarchy = stages.build_hierarchy(X, seed=seed, config=hier_cfg)
    seconds["hierarchy"] = time.perf_counter() - t
    stages.emit(
        log,
        f"harp: hierarchy of {hierarchy.n_regions} regions, {hierarchy.n_parents} parents, "
        f"{hierarchy.n_leaves} leaves, {hierarchy.representatives.size} representatives "
        f"({seconds['hierarchy']:.2f} s)",
    )

    # -- base model scores ------------------------------------------------------------------------------
    t = time.perf_counter()
    stages.check_tokenizer(finetuner, tokenizer)
    base = stages.score_base(finetuner, evaluator, eval_examples)
    domains = stages.eval_domains(base)
    b = stages.base_scores(base, domains)
    seconds["base_scores"] = time.perf_counter() - t
    stages.emit(
        log, "harp: base scores " + ", ".join(f"{d}={v:.3f}" for d, v in zip(domains, b, strict=True))
    )

    # -- stage 1b: measure leaves, main effects, posteriors (and active rounds) -------------------------
    measurements: dict[int, stages.LeafMeasurement] = {}
    fits: list[driver.Fit] = []
    plan = HarpSettings(seed=seed, n_boot=n_boot, z_active=float(z_active), top_k_points=top_k or hierarchy.n_examples,
                        active_runs=active_runs, active_rounds=active_rounds)

    def measure(leaves: list[int]) -> None:
        t = time.perf_counter()
        measurements.update(stages.measure_leaves(finetuner, evaluator, hierarchy, prompts, responses,
                                                  eval_examples, leaf_ids=leaves, seed=seed, log=log,
                                                  execution=execution))
        seconds["leaf_measurements"] = seconds.get("leaf_measurements", 0.0) + time.perf_counter() - t

    def refit(round_number: int) -> list[int]:
        fits.append(driver.fit_posteriors(hierarchy, measurements, base, domains, n_boot=n_boot, seed=seed))
        if round_number >= active_rounds or active_runs == 0:
            return []
        return driver.plan_active_round(fits[-1].posteriors, b, hierarchy, plan).leaves.tolist()

    driver.drive_rounds(hierarchy.representatives.tolist(), measure, refit, max_rounds=active_rounds)
    effects, post, measured = fits[-1].effects, fits[-1].posteriors, fits[-1].measured
    seconds["main_effects"] = float(sum(f.effects_seconds for f in fits))
    seconds["posteriors"] = float(sum(f.posterior_seconds for f in fits))

    # -- selection --------------------------------------------------------------------------------------
    t = time.perf_counter()
    selections = driver.select_envelopes(post, b, hierarchy, top_k_points=top_k, z_active=float(z_active))
    seconds["selection"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start

    active = selections["harp_c"].active
    hyper = post.hyper
    info: dict[str, Any] = {
        "domains": domains,
        "base_scores": dict(zip(domains, b.tolist(), strict=True)),
        "phi_hat": effects.phi_hat,
        "phi_var": effects.phi_var,
        "phi_mean": post.mean,
        "phi_sd": post.sd,
        "measured_leaves": measured,
        "active_domains": [d for d, a in zip(domains, active.tolist(), strict=True) if a],
        "inactive_domains": [d for d, a in zip(domains, active.tolist(), strict=True) if not a],
        "active_mask": active,
        "hyperparameters": {
            "mu": hyper.mu,
            "mu_sd": hyper.mu_sd,
            "tau_R2": hyper.tau_R2,
            "tau_P2": hyper.tau_P2,
            "tau_L2": hyper.tau_L2,
            "converged": hyper.converged,
            "notes": list(hyper.fallback),
        },
        "leaf_orders": {key: sel.greedy.order for key, sel in selections.items()},
        "cut_indices": {key: sel.greedy.cut for key, sel in selections.items()},
        "hierarchy": {
            "n_regions": hierarchy.n_regions,
            "n_parents": hierarchy.n_parents,
            "n_leaves": hierarchy.n_leaves,
            "representatives": hierarchy.representatives,
            "leaf_sizes": hierarchy.leaf_sizes,
            "leaf_of": hierarchy.leaf_of,
            "parent_of_leaf": hierarchy.parent_of_leaf,
        },
        "leaf_measurements": {g: m.summary() for g, m in measurements.items()},
        "n_train_eval_runs": len(measurements),
        "train_examples_used": int(sum(m.n_train for m in measurements.values())),
        "train_eval_seconds": float(sum(m.seconds for m in measurements.values())),
        "seconds": seconds,
        "config": {
            "TOP_K_POINTS": top_k,
            "seed": seed,
            "n_boot": int(n_boot),
            "z_active": float(z_active),
            "active_runs": active_runs,
            "active_rounds": active_rounds,
            "base_model_name": base_model_name,
            "lora": finetuner.model_dump(exclude={"device"}),
            "hierarchy": hier_cfg,
            "evaluator": evaluator.model_dump(),
            "device": str(finetuner.device_spec().device),
        },
    }
    for key, sel in selections.items():
        info[key] = _selection_info(sel, domains)
    stages.emit(
        log,
        f"harp: {len(measurements)} train-evaluate runs, HARP-C {selections['harp_c'].n_selected} rows, "
        f"HARP-E {selections['harp_e'].n_selected} rows, {seconds['total']:.1f} s in all",
    )
    return HarpResult(
        harp_c=np.asarray(selections["harp_c"].example_rows, dtype=np.int64),
        harp_e=np.asarray(selections["harp_e"].example_rows, dtype=np.int64),
        info=info,
    )
