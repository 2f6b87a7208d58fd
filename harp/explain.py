"""Explanations of a selection: the greedy trace and the per-domain prediction as lineage rows, the change
against the previous selection, the composition by region and domain, and the one-line prediction summary.

The Dagster assets write what these functions return (`harp_assets/selections.py`); the catalog's views
(`harp/lineage.py`: `selection_leaves`, `selection_explanations`, `selection_diff*`) read it back.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from harp.lineage import SCHEMAS, validate
from harp.method.selection import HarpSelection

NO_HELPFUL_DOMAIN = "(no helpful domain)"


def trace_frame(
    sel: HarpSelection,
    leaf_ids: Sequence[str],
    leaf_parent_ids: Sequence[str],
    leaf_sizes: Any,
    *,
    selection_id: str,
    method: str,
    created_at: dt.datetime,
    run_id: str | None,
) -> pl.DataFrame:
    """`selection_traces` rows: every leaf the greedy ranked, in its order, with its step gain, the running
    gain, whether it fell before the best-prefix cut and how many of its examples the point cap took.

    `leaf_ids`, `leaf_parent_ids` and `leaf_sizes` are per leaf index (sizes as the selection saw them, i.e.
    without excluded rows)."""
    g = sel.greedy
    order = np.asarray(g.order, dtype=np.int64)
    n_leaves = len(leaf_ids)
    if len(leaf_parent_ids) != n_leaves or np.asarray(leaf_sizes).shape != (n_leaves,):
        raise ValueError(f"leaf_ids, leaf_parent_ids and leaf_sizes must all have one entry per leaf ({n_leaves})")
    if order.size and int(order.max()) >= n_leaves:
        raise ValueError(f"the greedy ranked leaf index {int(order.max())}, but only {n_leaves} leaves were given")
    taken = np.bincount(np.asarray(sel.leaf_of_row, dtype=np.int64), minlength=n_leaves)
    k = order.size
    ids = np.asarray(leaf_ids, dtype=object)
    parents = np.asarray(leaf_parent_ids, dtype=object)
    df = pl.DataFrame(
        {
            "selection_id": [selection_id] * k,
            "method": [method] * k,
            "greedy_rank": np.arange(1, k + 1, dtype=np.int32),
            "leaf_id": ids[order].tolist(),
            "parent_id": parents[order].tolist(),
            "gain": np.asarray(g.gains, dtype=np.float64),
            "running_gain": np.asarray(g.running, dtype=np.float64),
            "before_cut": np.arange(k) < int(g.cut),
            "examples_selected": taken[order].astype(np.int32),
            "leaf_size": np.asarray(leaf_sizes, dtype=np.int32)[order],
            "cut": np.full(k, int(g.cut), dtype=np.int32),
            "stop_reason": [g.stop_reason] * k,
            "created_at": [created_at] * k,
            "run_id": [run_id] * k,
        },
        schema=SCHEMAS["selection_traces"],
    )
    return validate("selection_traces", df)


def prediction_frame(
    sel: HarpSelection,
    domains: Sequence[str],
    base: Any,
    *,
    selection_id: str,
    method: str,
    created_at: dt.datetime,
    run_id: str | None,
) -> pl.DataFrame:
    """`selection_predictions` rows: per domain, what the selected rows predict, its credible band, the value
    before the clip, whether it saturates, and (every row) the note saying why a selection is empty."""
    band = sel.band
    d = len(domains)
    if band.predicted.shape != (d,):
        raise ValueError(f"the selection predicts {band.predicted.shape[0]} domains, {d} domain names were given")
    df = pl.DataFrame(
        {
            "selection_id": [selection_id] * d,
            "method": [method] * d,
            "domain": list(domains),
            "base": np.asarray(base, dtype=np.float64),
            "predicted": band.predicted,
            "predicted_low": band.low,
            "predicted_high": band.high,
            "level": np.full(d, band.level),
            "unclipped": band.unclipped,
            "saturated": np.asarray(band.saturated, dtype=bool),
            "active_domain": np.asarray(sel.active, dtype=bool),
            "selected": np.full(d, sel.n_selected, dtype=np.int32),
            "note": [sel.note] * d,
            "created_at": [created_at] * d,
            "run_id": [run_id] * d,
        },
        schema=SCHEMAS["selection_predictions"],
    )
    return validate("selection_predictions", df)


def per_domain(sel: HarpSelection, domains: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Domain -> predicted, low, high, unclipped, saturated, active (rounded for metadata and summaries)."""
    b = sel.band
    return {
        name: {
            "predicted": round(float(b.predicted[i]), 4),
            "low": round(float(b.low[i]), 4),
            "high": round(float(b.high[i]), 4),
            "unclipped": round(float(b.unclipped[i]), 4),
            "saturated": bool(b.saturated[i]),
            "active": bool(sel.active[i]),
        }
        for i, name in enumerate(domains)
    }


def format_predictions(predictions: Mapping[str, Mapping[str, Any]], level: float = 0.9) -> str:
    """One line: each domain's predicted utility with its credible band, saturated domains named as such.

    A saturated domain reads `1.000 SATURATED (sum 1.85 clipped to 1)`: the envelope hit its clip, which says
    the selected leaves' effects add up past 1, not that the model will be 100% accurate there."""
    if not predictions:
        return "(no prediction)"
    parts = []
    for name, p in predictions.items():
        text = f"{name}={p['predicted']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"
        if p.get("saturated"):
            text += f" SATURATED (sum {p['unclipped']:.2f} clipped to 1)"
        if p.get("active") is False:
            text += " (not credible)"
        parts.append(text)
    return ", ".join(parts) + f"  ({round(100 * level)}% band)"


def empty_reason(method: str, selected: int, budget: int, note: str | None) -> str:
    """Why a selection is empty ('' when it is not): the selection's own note, else the budget or the pool."""
    if selected:
        return ""
    if note:
        return note
    if budget == 0:
        return "the budget (top_k_points) is 0"
    return f"{method} found no candidate example (the pool is empty, or every example was left out)"


def diff_summary(
    previous_ids: Sequence[str],
    previous_leaves: Sequence[str],
    ids: Sequence[str],
    leaves: Sequence[str],
    *,
    previous_predicted: Mapping[str, float] | None = None,
    predicted: Mapping[str, float] | None = None,
    list_limit: int = 50,
) -> dict[str, Any]:
    """What changed against the previous selection: examples and leaves added, removed and kept, and the
    predicted utility per domain before and after (domains predicted by both)."""
    old_ex, new_ex = set(previous_ids), set(ids)
    old_leaves, new_leaves = set(previous_leaves), set(leaves)
    by_domain = {}
    if previous_predicted is not None and predicted is not None:
        for d in sorted(set(previous_predicted) & set(predicted)):
            before, after = float(previous_predicted[d]), float(predicted[d])
            by_domain[d] = {"before": round(before, 4), "after": round(after, 4), "change": round(after - before, 4)}
    return {
        "examples_added": len(new_ex - old_ex),
        "examples_removed": len(old_ex - new_ex),
        "examples_kept": len(new_ex & old_ex),
        "leaves_added": sorted(new_leaves - old_leaves)[:list_limit],
        "leaves_removed": sorted(old_leaves - new_leaves)[:list_limit],
        "leaves_kept": len(new_leaves & old_leaves),
        "predicted_change_by_domain": by_domain,
    }


def best_domains(leaf_ids: Sequence[str], domains: Sequence[str], phi_mean: Any) -> dict[str, str]:
    """Each leaf's most helped domain: the one with its largest posterior mean, if that mean is positive."""
    mean = np.asarray(phi_mean, dtype=np.float64)
    if mean.shape != (len(leaf_ids), len(domains)):
        raise ValueError(f"phi_mean has shape {mean.shape}; expected ({len(leaf_ids)}, {len(domains)})")
    if not len(domains):
        return dict.fromkeys(leaf_ids, NO_HELPFUL_DOMAIN)
    top = mean.argmax(axis=1)
    best = mean[np.arange(mean.shape[0]), top]
    return {leaf: (domains[t] if b > 0 else NO_HELPFUL_DOMAIN)
            for leaf, t, b in zip(leaf_ids, top.tolist(), best.tolist(), strict=True)}


def composition(
    leaves: Sequence[str], region_of_leaf: Mapping[str, str], best_domain: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """Selected examples counted by region, then by their leaf's most helped domain (`best_domains`).

    `leaves` holds the leaf of each selected example; a leaf missing from a mapping counts as '(unknown)'."""
    out: dict[str, dict[str, int]] = {}
    for leaf in leaves:
        region = region_of_leaf.get(leaf, "(unknown)")
        dom = best_domain.get(leaf, "(unknown)")
        row = out.setdefault(region, {})
        row[dom] = row.get(dom, 0) + 1
    return {r: dict(sorted(out[r].items())) for r in sorted(out)}
