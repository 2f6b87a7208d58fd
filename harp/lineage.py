"""Lineage store: every HARP output as typed Parquet, with one DuckDB catalog of views for SQL access.

DuckDB admits one writing process per database file, while leaf partitions run in parallel processes. So
no pipeline step writes DuckDB: each writes Parquet files, one per whole table, per leaf partition or per
run, and a single writer (under an exclusive `fcntl.flock` lock) rebuilds a small DuckDB file that only
holds views over them. The views glob each table's folder, so a partition written after the last refresh
is visible at once.

Files are immutable. A write goes to a hidden temp file, is fsynced, and is renamed to a new name
`<key>@<stamp>.parquet` (stamp: nanosecond time plus a random suffix, sortable); readers take the newest
stamp per key. Rewriting one path in place with `os.replace` is not enough: DuckDB (and polars reading by
path) open a file more than once per query, and a replace in between pairs one version's footer with
another's data, giving parse errors or silently wrong rows. Superseded versions are deleted once the newest
is `keep_superseded_s` old, so a reader that listed the folder just before a rewrite still finds its files.

Layout (defaults; `root` and `duckdb_path` are configurable)::

    $DAGSTER_HOME/harp/<table>/<table>@<stamp>.parquet       whole tables: examples, leaves, phi_posteriors
    $DAGSTER_HOME/harp/leaf_utilities/<leaf_id>@<stamp>.parquet      one file per leaf partition
    $DAGSTER_HOME/harp/measured_members/<leaf_id>@<stamp>.parquet    the member set each measurement used
    $DAGSTER_HOME/harp/selections/<selection_id>@<stamp>.parquet     history: one file per selection run
    $DAGSTER_HOME/harp/run_manifests/<run_id>@<stamp>.parquet        history: one file per pipeline run
    $DAGSTER_HOME/harp.duckdb       the catalog (views only): next to root, named after it
    $DAGSTER_HOME/harp.duckdb.lock  lock file of the catalog's single writer (kept; never delete it)

The catalog cannot be rewritten atomically in place either, so `refresh_catalog` builds a fresh DuckDB file
beside it and `os.replace`s it: a reader opens either the old or the new catalog, never a half-written one
(DuckDB reads a database file through one handle). Open it read-only (`duckdb -readonly harp.duckdb`);
anything created in it is lost at the next refresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from pydantic import BaseModel, Field

from harp.io import FILE_MODE, atomic_write, file_lock, fsync_dir, remove_stale_temps, temp_prefix

UTC_US = pl.Datetime("us", "UTC")

SCHEMAS: dict[str, pl.Schema] = {
    "examples": pl.Schema(
        {
            "example_id": pl.String,
            "prompt": pl.String,
            "response": pl.String,
            "source": pl.String,
            "pool_version": pl.String,
            "leaf_id": pl.String,
            "parent_id": pl.String,
            "region_id": pl.String,
            "rank_in_leaf": pl.Int32,
            "added_at": UTC_US,
            "content_hash": pl.String,
        }
    ),
    # Pool examples that nearly duplicate a proxy-eval or test item (harp/method/contamination.py).
    "contamination": pl.Schema(
        {
            "example_id": pl.String,
            "eval_set": pl.String,
            "eval_example_id": pl.String,
            "kind": pl.String,
            "score": pl.Float64,
            "pool_version": pl.String,
        }
    ),
    "leaves": pl.Schema(
        {
            "leaf_id": pl.String,
            "parent_id": pl.String,
            "region_id": pl.String,
            "size": pl.Int32,
            "member_hash": pl.String,
            "is_representative": pl.Boolean,
            "pool_version": pl.String,
        }
    ),
    "leaf_utilities": pl.Schema(
        {
            "leaf_id": pl.String,
            "domain": pl.String,
            "utility": pl.Float64,
            "base": pl.Float64,
            "phi": pl.Float64,
            "bootstrap_sd": pl.Float64,
            "n_eval": pl.Int32,
            "data_version": pl.String,
            "measured_at": UTC_US,
            "train_seconds": pl.Float64,
            "eval_seconds": pl.Float64,
            "examples": pl.Int32,
            "run_id": pl.String,
            "member_hash": pl.String,
        }
    ),
    "measured_members": pl.Schema(
        {
            "leaf_id": pl.String,
            "example_id": pl.String,
            "content_hash": pl.String,
            "data_version": pl.String,
        }
    ),
    "phi_posteriors": pl.Schema(
        {
            "leaf_id": pl.String,
            "domain": pl.String,
            "mean": pl.Float64,
            "sd": pl.Float64,
            "measured": pl.Boolean,
            "active_domain": pl.Boolean,
            "pool_version": pl.String,
        }
    ),
    "selections": pl.Schema(
        {
            "selection_id": pl.String,
            "method": pl.String,
            "rank": pl.Int32,
            "example_id": pl.String,
            "leaf_id": pl.String,
            "parent_id": pl.String,
            "gain": pl.Float64,
            "predicted_utility": pl.Float64,
            "budget": pl.Int32,
            "pool_version": pl.String,
            "created_at": UTC_US,
            "run_id": pl.String,
        }
    ),
    "selection_commits": pl.Schema(
        {
            "run_id": pl.String,
            "committed_at": UTC_US,
        }
    ),
    # The greedy's ranking behind one HARP selection, one row per ranked leaf in greedy order, past the cut too.
    "selection_traces": pl.Schema(
        {
            "selection_id": pl.String,
            "method": pl.String,
            "greedy_rank": pl.Int32,
            "leaf_id": pl.String,
            "parent_id": pl.String,
            "gain": pl.Float64,
            "running_gain": pl.Float64,
            "before_cut": pl.Boolean,
            "examples_selected": pl.Int32,
            "leaf_size": pl.Int32,
            "cut": pl.Int32,
            "stop_reason": pl.String,
            "created_at": UTC_US,
            "run_id": pl.String,
        }
    ),
    # What one HARP selection predicts per domain, with its credible band; written for an empty selection too,
    # with the note that says why it is empty.
    "selection_predictions": pl.Schema(
        {
            "selection_id": pl.String,
            "method": pl.String,
            "domain": pl.String,
            "base": pl.Float64,
            "predicted": pl.Float64,
            "predicted_low": pl.Float64,
            "predicted_high": pl.Float64,
            "level": pl.Float64,
            "unclipped": pl.Float64,
            "saturated": pl.Boolean,
            "active_domain": pl.Boolean,
            "selected": pl.Int32,
            "note": pl.String,
            "created_at": UTC_US,
            "run_id": pl.String,
        }
    ),
    "run_manifests": pl.Schema(
        {
            "run_id": pl.String,
            "created_at": UTC_US,
            "pool_version": pl.String,
            "embedder": pl.String,
            "base_model": pl.String,
            "config_json": pl.String,
            "seed": pl.Int64,
            "train_eval_runs": pl.Int32,
            "leaves_total": pl.Int32,
            "leaves_measured": pl.Int32,
            "examples": pl.Int64,
            "seconds_json": pl.String,
            "active_rounds": pl.Int32,
            "active_leaves": pl.Int32,
            "leaves_stored": pl.Int32,
            "trained_since": UTC_US,
        }
    ),
    "active_rounds": pl.Schema(
        {
            "round_id": pl.String,
            "round": pl.Int32,
            "rank": pl.Int32,
            "leaf_id": pl.String,
            "score": pl.Float64,
            "created_at": UTC_US,
            "run_id": pl.String,
        }
    ),
    "validation_results": pl.Schema(
        {
            "validation_id": pl.String,
            "method": pl.String,
            "selection_id": pl.String,
            "domain": pl.String,
            "accuracy": pl.Float64,
            "base_accuracy": pl.Float64,
            "examples": pl.Int32,
            "harmful_share": pl.Float64,
            "redundant_share": pl.Float64,
            "train_seconds": pl.Float64,
            "seed": pl.Int64,
            "created_at": UTC_US,
            "run_id": pl.String,
        }
    ),
}

# How each table is stored: "table" = one file replaced whole, "partition" = one file per key (rewritten
# when the partition is rematerialised), "history" = one file per run, earlier runs kept.
TABLE_KINDS: dict[str, str] = {
    "examples": "table",
    "contamination": "table",
    "leaves": "table",
    "phi_posteriors": "table",
    "leaf_utilities": "partition",
    "measured_members": "partition",
    "selections": "history",
    "run_manifests": "history",
    "selection_commits": "history",
    "selection_traces": "history",
    "selection_predictions": "history",
    "active_rounds": "history",
    "validation_results": "history",
}

# The column whose value a keyed file's rows must all carry, so a file name never disagrees with its rows.
KEY_COLUMNS: dict[str, str] = {
    "leaf_utilities": "leaf_id",
    "measured_members": "leaf_id",
    "selections": "selection_id",
    "run_manifests": "run_id",
    "selection_commits": "run_id",
    "selection_traces": "selection_id",
    "selection_predictions": "selection_id",
    "active_rounds": "round_id",
    "validation_results": "validation_id",
}

# Columns that may hold nulls; every other column must be filled.
NULLABLE: dict[str, frozenset[str]] = {
    # Tables written before content hashing have no content hash.
    "examples": frozenset({"content_hash"}),
    "leaves": frozenset(),
    "contamination": frozenset(),
    # Timings and the Dagster run id are unknown when a measurement is imported or run outside Dagster;
    # measurements stored before member sets were recorded have no member hash.
    "leaf_utilities": frozenset({"bootstrap_sd", "train_seconds", "eval_seconds", "run_id", "member_hash"}),
    "measured_members": frozenset(),
    "phi_posteriors": frozenset(),
    # Random selection has no gain; a baseline without a utility model predicts nothing.
    "selections": frozenset({"gain", "predicted_utility", "run_id"}),
    # Manifests written before active rounds existed read these as null; so do those written before stored
    # and trained leaves were counted apart (their train_eval_runs counted the stored measurements);
    # trained_since is null on the first manifest (train_eval_runs then counts every stored measurement).
    "run_manifests": frozenset({"active_rounds", "active_leaves", "leaves_stored", "trained_since"}),
    "selection_commits": frozenset(),
    "selection_traces": frozenset({"run_id"}),
    # The note is null when the selection is not empty or degenerate.
    "selection_predictions": frozenset({"note", "run_id"}),
    "active_rounds": frozenset({"run_id"}),
    # Without a ground-truth file the harmful/redundant shares are unknown; the full pool has no selection.
    "validation_results": frozenset({"harmful_share", "redundant_share", "selection_id", "run_id"}),
}

# Rows that must be unique within one write (a file), so joins in the catalog do not fan out.
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "examples": ("example_id",),
    "contamination": ("example_id", "eval_set", "eval_example_id", "kind"),
    "leaves": ("leaf_id",),
    "leaf_utilities": ("leaf_id", "domain"),
    "measured_members": ("leaf_id", "example_id"),
    "phi_posteriors": ("leaf_id", "domain"),
    "selections": ("selection_id", "example_id"),
    "run_manifests": ("run_id",),
    "selection_commits": ("run_id",),
    "selection_traces": ("selection_id", "greedy_rank"),
    "selection_predictions": ("selection_id", "domain"),
    "active_rounds": ("round_id", "leaf_id"),
    "validation_results": ("validation_id", "method", "domain"),
}

_DUCKDB_TYPES: dict[Any, str] = {
    pl.String: "VARCHAR",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.Float64: "DOUBLE",
    pl.Boolean: "BOOLEAN",
}

_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_MAX_KEY_LEN = 200
_CATALOG_TABLE = "harp_catalog"
_STAMP_SEP = "@"  # never in a key, so `<key>@<stamp>` parses back
_QUERY_ATTEMPTS = 4
_CATALOG_LAYOUT = "versioned-files-1"  # part of the catalog's schema hash: a layout change forces a rebuild

EXAMPLE_QUERIES: dict[str, str] = {
    # Parameter: $example_id. One row per (selection that picked the example, domain of its leaf's posterior).
    "why_selected": """
SELECT s.selection_id, s.method, s.created_at, s.rank, s.gain,
       s.example_id, e.source, e.rank_in_leaf,
       s.leaf_id, s.parent_id, l.region_id, l.is_representative,
       p.domain, p.mean AS phi_mean, p.sd AS phi_sd,
       CASE WHEN p.measured THEN 'measured' WHEN p.measured IS NULL THEN NULL ELSE 'inferred' END
           AS phi_source,
       u.phi AS phi_measured, p.active_domain, p.pool_version AS posterior_pool_version
FROM selections AS s
LEFT JOIN examples AS e ON e.example_id = s.example_id
LEFT JOIN leaves AS l ON l.leaf_id = s.leaf_id
LEFT JOIN phi_posteriors AS p ON p.leaf_id = s.leaf_id
LEFT JOIN leaf_utilities AS u ON u.leaf_id = s.leaf_id AND u.domain = p.domain
WHERE s.example_id = $example_id
ORDER BY s.created_at DESC, s.selection_id DESC, p.domain
""".strip(),
    # One row per leaf: measured (has utilities and the posteriors used them), measured after the last
    # posterior fit, or inferred from its parent.
    "measured_vs_inferred": """
WITH u AS (
    SELECT leaf_id, count(*) AS domains_measured, max(measured_at) AS measured_at
    FROM leaf_utilities GROUP BY leaf_id
), p AS (
    SELECT leaf_id, bool_or(measured) AS posterior_measured FROM phi_posteriors GROUP BY leaf_id
)
SELECT l.leaf_id, l.parent_id, l.region_id, l.size, l.is_representative,
       coalesce(u.domains_measured, 0) AS domains_measured, u.measured_at,
       coalesce(p.posterior_measured, false) AS posterior_measured,
       CASE WHEN p.posterior_measured THEN 'measured'
            WHEN u.leaf_id IS NOT NULL THEN 'measured, not yet in posteriors'
            ELSE 'inferred' END AS status
FROM leaves AS l
LEFT JOIN u ON u.leaf_id = l.leaf_id
LEFT JOIN p ON p.leaf_id = l.leaf_id
ORDER BY l.region_id, l.parent_id, l.leaf_id
""".strip(),
    # Parameter: $method. Every example of its newest or previous committed selection: added, removed or kept
    # (the `selection_diff` view, for one method).
    "selection_diff": """
SELECT change, example_id, leaf_id, region_id, newer_rank, older_rank, newer_selection_id, older_selection_id
FROM selection_diff WHERE method = $method
ORDER BY change, example_id
""".strip(),
    # Parameters: $older, $newer (two selection ids, any methods). Every example of either: added, removed, kept.
    "selection_diff_between": """
WITH n AS (SELECT * FROM selections WHERE selection_id = $newer),
o AS (SELECT * FROM selections WHERE selection_id = $older)
SELECT CASE WHEN o.example_id IS NULL THEN 'added' WHEN n.example_id IS NULL THEN 'removed' ELSE 'kept' END
           AS change,
       coalesce(n.example_id, o.example_id) AS example_id, coalesce(n.leaf_id, o.leaf_id) AS leaf_id,
       n.rank AS newer_rank, o.rank AS older_rank
FROM n FULL OUTER JOIN o ON n.example_id = o.example_id
ORDER BY change, example_id
""".strip(),
    # Parameter: $method. The leaves its newest HARP selection ranked but did not take (after the best-prefix cut).
    "after_the_cut": """
SELECT greedy_rank, leaf_id, region_id, leaf_source, gain, running_gain, cut, stop_reason
FROM selection_leaves WHERE method = $method AND NOT before_cut
ORDER BY greedy_rank
""".strip(),
}

# Extra views in the catalog, built from the table views (in this order: a view may use the ones before it).
CONVENIENCE_VIEWS: dict[str, str] = {
    # One row per current leaf with a stored measurement: the member set the measurement was made on (its
    # hash and data version) against the leaf's members now, over (example id, content hash) pairs.
    # drift = (members added + members removed) / measured size; 0 means the measurement is exact.
    "leaf_drift": """
WITH m AS (
    SELECT leaf_id, example_id, content_hash FROM measured_members
    WHERE leaf_id IN (SELECT leaf_id FROM leaves)
), c AS (
    SELECT leaf_id, example_id, coalesce(content_hash, '') AS content_hash FROM examples
    WHERE leaf_id IN (SELECT leaf_id FROM m)
), j AS (
    SELECT coalesce(m.leaf_id, c.leaf_id) AS leaf_id, m.example_id IS NOT NULL AS in_measured,
           c.example_id IS NOT NULL AS in_current
    FROM m FULL OUTER JOIN c
      ON m.leaf_id = c.leaf_id AND m.example_id = c.example_id AND m.content_hash = c.content_hash
), d AS (
    SELECT leaf_id, count(*) FILTER (WHERE in_measured) AS measured_size,
           count(*) FILTER (WHERE in_current AND NOT in_measured) AS members_added,
           count(*) FILTER (WHERE in_measured AND NOT in_current) AS members_removed
    FROM j GROUP BY leaf_id
), u AS (
    SELECT leaf_id, any_value(member_hash) AS measured_member_hash, any_value(data_version) AS data_version,
           max(measured_at) AS measured_at
    FROM leaf_utilities GROUP BY leaf_id
)
SELECT l.leaf_id, l.parent_id, l.is_representative, l.member_hash AS current_member_hash,
       u.measured_member_hash, u.data_version, u.measured_at, d.measured_size, l.size AS current_size,
       d.members_added, d.members_removed,
       (d.members_added + d.members_removed) / d.measured_size::DOUBLE AS drift
FROM d JOIN leaves AS l ON l.leaf_id = d.leaf_id LEFT JOIN u ON u.leaf_id = d.leaf_id
ORDER BY l.leaf_id
""".strip(),
    # One row per selection run.
    # `committed`: its run finished writing every selection it makes (the select job's manifest, written after
    # all of them, exists, or a `selection_commits` row of a job that selects one method), or it was written
    # outside Dagster (no run id). A run killed half-way is never committed.
    "selection_runs": """
SELECT selection_id, method, min(created_at) AS created_at, any_value(pool_version) AS pool_version,
       any_value(budget) AS budget, count(*) AS n_examples, max(predicted_utility) AS predicted_utility,
       any_value(run_id) AS run_id,
       any_value(run_id) IS NULL OR any_value(run_id) IN (SELECT run_id FROM run_manifests)
           OR any_value(run_id) IN (SELECT run_id FROM selection_commits) AS committed
FROM selections GROUP BY selection_id, method
""".strip(),
    # The rows of each method's newest committed selection (newest created_at; ties broken by selection_id),
    # so a reader never sees a mix of a finished run and one killed half-way.
    "latest_selections": """
SELECT s.* FROM selections AS s
JOIN (
    SELECT method, selection_id FROM selection_runs WHERE committed
    QUALIFY row_number() OVER (PARTITION BY method ORDER BY created_at DESC, selection_id DESC) = 1
) AS latest ON latest.method = s.method AND latest.selection_id = s.selection_id
""".strip(),
    # Every selection, empty ones included (a HARP selection that picks nothing still writes its predictions),
    # with its size and whether its run committed (as in `selection_runs`).
    "selection_versions": """
WITH ids AS (
    SELECT selection_id, method, created_at, run_id FROM selections
    UNION ALL
    SELECT selection_id, method, created_at, run_id FROM selection_predictions
), v AS (
    SELECT selection_id, any_value(method) AS method, min(created_at) AS created_at, any_value(run_id) AS run_id
    FROM ids GROUP BY selection_id
)
SELECT v.selection_id, v.method, v.created_at, v.run_id, coalesce(n.n_examples, 0) AS n_examples,
       v.run_id IS NULL OR v.run_id IN (SELECT run_id FROM run_manifests)
           OR v.run_id IN (SELECT run_id FROM selection_commits) AS committed
FROM v LEFT JOIN (SELECT selection_id, count(*) AS n_examples FROM selections GROUP BY selection_id) AS n
    ON n.selection_id = v.selection_id
""".strip(),
    # One row per method: its newest committed selection (empty ones count) and the committed one before it
    # (null when there is none).
    "selection_pairs": """
SELECT method, newer_selection_id, older_selection_id FROM (
    SELECT method, selection_id AS newer_selection_id,
           lead(selection_id) OVER w AS older_selection_id, row_number() OVER w AS k
    FROM selection_versions WHERE committed
    WINDOW w AS (PARTITION BY method ORDER BY created_at DESC, selection_id DESC)
) WHERE k = 1
""".strip(),
    # The greedy's ranking behind each method's newest HARP selection: one row per ranked leaf, in greedy order,
    # the leaves past the cut included, with whether the leaf was measured or inferred.
    "selection_leaves": """
WITH src AS (SELECT leaf_id, bool_or(measured) AS measured FROM phi_posteriors GROUP BY leaf_id)
SELECT t.method, t.selection_id, t.greedy_rank, t.leaf_id, t.parent_id, l.region_id, l.is_representative,
       CASE WHEN src.measured THEN 'measured' WHEN src.measured IS NULL THEN NULL ELSE 'inferred' END
           AS leaf_source,
       t.gain, t.running_gain, t.before_cut, t.cut, t.examples_selected, t.leaf_size, t.stop_reason
FROM selection_traces AS t
JOIN selection_pairs AS p ON p.newer_selection_id = t.selection_id
LEFT JOIN leaves AS l ON l.leaf_id = t.leaf_id
LEFT JOIN src ON src.leaf_id = t.leaf_id
ORDER BY t.method, t.greedy_rank
""".strip(),
    # Why each example of each method's newest committed selection is there: one row per (example, domain) with
    # example -> leaf -> parent -> region, the leaf's per-domain posterior mean and sd (measured or inferred),
    # the leaf's greedy rank, step gain and running gain, whether it fell before the cut, and what the
    # selection predicts on the domain with its band. A baseline has no greedy trace: its leaf rank is the
    # order in which it first took its leaves, and before_cut is null.
    "selection_explanations": """
WITH newest AS (
    SELECT s.* FROM selections AS s JOIN selection_pairs AS p ON p.newer_selection_id = s.selection_id
), by_leaf AS (
    SELECT selection_id, leaf_id, min(rank) AS first_rank, count(*) AS leaf_examples_selected
    FROM newest GROUP BY selection_id, leaf_id
), ranked AS (
    SELECT *, dense_rank() OVER (PARTITION BY selection_id ORDER BY first_rank) AS taken_rank FROM by_leaf
)
SELECT s.method, s.selection_id, s.rank, s.example_id, s.leaf_id, s.parent_id, l.region_id,
       l.is_representative, coalesce(t.greedy_rank, r.taken_rank) AS leaf_greedy_rank,
       r.leaf_examples_selected, coalesce(t.gain, s.gain) AS marginal_gain, t.running_gain, t.before_cut, t.cut,
       p.domain, p.mean AS phi_mean, p.sd AS phi_sd,
       CASE WHEN p.measured THEN 'measured' WHEN p.measured IS NULL THEN NULL ELSE 'inferred' END AS phi_source,
       p.active_domain, y.predicted AS predicted_utility, y.predicted_low, y.predicted_high, y.saturated
FROM newest AS s
LEFT JOIN leaves AS l ON l.leaf_id = s.leaf_id
LEFT JOIN ranked AS r ON r.selection_id = s.selection_id AND r.leaf_id = s.leaf_id
LEFT JOIN selection_traces AS t ON t.selection_id = s.selection_id AND t.leaf_id = s.leaf_id
LEFT JOIN phi_posteriors AS p ON p.leaf_id = s.leaf_id
LEFT JOIN selection_predictions AS y ON y.selection_id = s.selection_id AND y.domain = p.domain
ORDER BY s.method, s.rank, p.domain
""".strip(),
    # Each method's newest committed selection against the committed one before it: one row per example of
    # either, added, removed or kept (with no earlier selection everything is added).
    "selection_diff": """
WITH n AS (
    SELECT s.* FROM selections AS s JOIN selection_pairs AS p ON p.newer_selection_id = s.selection_id
), o AS (
    SELECT s.* FROM selections AS s JOIN selection_pairs AS p ON p.older_selection_id = s.selection_id
), j AS (
    SELECT coalesce(n.method, o.method) AS method,
           CASE WHEN o.example_id IS NULL THEN 'added' WHEN n.example_id IS NULL THEN 'removed' ELSE 'kept' END
               AS change,
           coalesce(n.example_id, o.example_id) AS example_id, coalesce(n.leaf_id, o.leaf_id) AS leaf_id,
           coalesce(n.parent_id, o.parent_id) AS parent_id, n.rank AS newer_rank, o.rank AS older_rank
    FROM n FULL OUTER JOIN o ON n.method = o.method AND n.example_id = o.example_id
)
SELECT j.method, j.change, j.example_id, j.leaf_id, j.parent_id, l.region_id, j.newer_rank, j.older_rank,
       p.newer_selection_id, p.older_selection_id
FROM j JOIN selection_pairs AS p ON p.method = j.method
LEFT JOIN leaves AS l ON l.leaf_id = j.leaf_id
""".strip(),
    # The same by leaf: examples before and after, added, removed and kept, and the leaf's own change.
    "selection_diff_by_leaf": """
WITH c AS (
    SELECT method, newer_selection_id, older_selection_id, leaf_id, any_value(parent_id) AS parent_id,
           any_value(region_id) AS region_id,
           count(*) FILTER (WHERE change <> 'added') AS examples_before,
           count(*) FILTER (WHERE change <> 'removed') AS examples_after,
           count(*) FILTER (WHERE change = 'added') AS examples_added,
           count(*) FILTER (WHERE change = 'removed') AS examples_removed,
           count(*) FILTER (WHERE change = 'kept') AS examples_kept
    FROM selection_diff GROUP BY method, newer_selection_id, older_selection_id, leaf_id
)
SELECT *, CASE WHEN examples_before = 0 THEN 'added' WHEN examples_after = 0 THEN 'removed' ELSE 'kept' END
              AS change
FROM c
""".strip(),
    # The same by domain: what each selection predicts on it (HARP only) and the change, the examples added
    # and removed, and the mean posterior effect on the domain of their leaves (the current posteriors).
    "selection_diff_by_domain": """
WITH d AS (
    SELECT domain FROM phi_posteriors UNION SELECT domain FROM selection_predictions
), pd AS (
    SELECT p.*, d.domain FROM selection_pairs AS p CROSS JOIN d
), ch AS (
    SELECT x.method, d.domain,
           count(*) FILTER (WHERE x.change = 'added') AS examples_added,
           count(*) FILTER (WHERE x.change = 'removed') AS examples_removed,
           avg(ph.mean) FILTER (WHERE x.change = 'added') AS phi_mean_added,
           avg(ph.mean) FILTER (WHERE x.change = 'removed') AS phi_mean_removed
    FROM selection_diff AS x CROSS JOIN d
    LEFT JOIN phi_posteriors AS ph ON ph.leaf_id = x.leaf_id AND ph.domain = d.domain
    GROUP BY x.method, d.domain
)
SELECT pd.method, pd.domain, o.predicted AS predicted_before, n.predicted AS predicted_after,
       n.predicted - o.predicted AS predicted_change, n.predicted_low, n.predicted_high, n.saturated,
       coalesce(ch.examples_added, 0) AS examples_added, coalesce(ch.examples_removed, 0) AS examples_removed,
       ch.phi_mean_added, ch.phi_mean_removed, pd.newer_selection_id, pd.older_selection_id
FROM pd
LEFT JOIN selection_predictions AS n ON n.selection_id = pd.newer_selection_id AND n.domain = pd.domain
LEFT JOIN selection_predictions AS o ON o.selection_id = pd.older_selection_id AND o.domain = pd.domain
LEFT JOIN ch ON ch.method = pd.method AND ch.domain = pd.domain
""".strip(),
}


class LineageError(ValueError):
    """A frame, key or table name that the lineage store refuses, with what is wrong."""


def validate(name: str, df: pl.DataFrame) -> pl.DataFrame:
    """Check `df` against table `name`'s schema; return it in schema column order.

    Columns of dtype Null (all-None columns built without a schema) are cast to the schema's dtype; any
    other dtype mismatch, a missing or extra column, a null in a required column or a duplicated primary
    key raises `LineageError` naming the table and the column.
    """
    schema = _schema(name)
    if not isinstance(df, pl.DataFrame):
        raise LineageError(f"table {name!r}: expected a polars DataFrame, got {type(df).__name__}")
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise LineageError(f"table {name!r}: missing column(s) {missing}; expected columns {list(schema)}")
    extra = [c for c in df.columns if c not in schema]
    if extra:
        raise LineageError(f"table {name!r}: unexpected column(s) {extra}; expected columns {list(schema)}")
    casts = []
    for col, want in schema.items():
        got = df.schema[col]
        if got == pl.Null:
            casts.append(pl.col(col).cast(want))
        elif got != want:
            hint = " (timestamps must be UTC: .dt.replace_time_zone('UTC'))" if want == UTC_US else ""
            raise LineageError(f"table {name!r}: column {col!r} has dtype {got}, expected {want}{hint}")
    out = df.with_columns(casts) if casts else df
    out = out.select(list(schema))
    nullable = NULLABLE[name]
    for col in schema:
        if col in nullable:
            continue
        n_null = out[col].null_count()
        if n_null:
            row = int(out.with_row_index("_row").filter(pl.col(col).is_null())["_row"][0])
            raise LineageError(
                f"table {name!r}: column {col!r} must not be null; {n_null} null value(s), first at row {row}"
            )
    pk = list(PRIMARY_KEYS[name])
    if out.height and out.select(pk).is_duplicated().any():
        dup = out.filter(out.select(pk).is_duplicated()).select(pk).row(0)
        raise LineageError(f"table {name!r}: duplicate primary key {dict(zip(pk, dup, strict=True))}")
    return out


def check_key(key: str) -> str:
    """Refuse keys that are not plain, visible file names (they become `<key>@<stamp>.parquet`)."""
    if not isinstance(key, str) or not key:
        raise LineageError(f"key must be a non-empty string, got {key!r}")
    if len(key) > _MAX_KEY_LEN:
        raise LineageError(f"key {key[:40]!r}... is {len(key)} characters long; at most {_MAX_KEY_LEN}")
    if not _KEY_RE.fullmatch(key):
        bad = sorted({ch for ch in key if not _KEY_RE.fullmatch(ch)})
        raise LineageError(
            f"key {key!r} has character(s) {bad}; keys may use letters, digits, '-', '_' and '.' only"
        )
    if key.startswith("."):
        raise LineageError(f"key {key!r} must not start with '.' (hidden and temporary files start so)")
    return key


def selection_id_for(method: str, run_id: str | None = None, created_at: dt.datetime | None = None) -> str:
    """A selection id that sorts by time within a method: `<method>-<UTC timestamp>-<run id prefix>`."""
    check_key(method)
    when = (created_at or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    suffix = re.sub(r"[^A-Za-z0-9]", "", run_id or "")[:8] or uuid.uuid4().hex[:8]
    return check_key(f"{method}-{when:%Y%m%dT%H%M%S.%fZ}-{suffix}")


def empty_frame(name: str) -> pl.DataFrame:
    """A zero-row frame with table `name`'s schema."""
    return pl.DataFrame(schema=_schema(name))


def _schema(name: str) -> pl.Schema:
    if name not in SCHEMAS:
        raise LineageError(f"unknown lineage table {name!r}; tables are {sorted(SCHEMAS)}")
    return SCHEMAS[name]


def _duckdb_type(dtype: Any) -> str:
    if dtype == UTC_US:
        return "TIMESTAMPTZ"
    for pl_type, sql in _DUCKDB_TYPES.items():
        if dtype == pl_type:
            return sql
    raise LineageError(f"no DuckDB type for polars dtype {dtype}")


def _schema_hash() -> str:
    text = repr([(t, [(c, str(d)) for c, d in s.items()]) for t, s in sorted(SCHEMAS.items())])
    text += repr(sorted(CONVENIENCE_VIEWS.items())) + _CATALOG_LAYOUT
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _temp_name(target: Path) -> Path:
    # Hidden and not ending in .parquet, so neither the views' glob nor any listing here ever sees it; named
    # by `harp.io.temp_prefix`, so the next start removes it if this writer dies.
    return target.with_name(f"{temp_prefix(target)}{uuid.uuid4().hex}.tmp")


def _new_stamp() -> str:
    return f"{time.time_ns():019d}-{uuid.uuid4().hex[:8]}"


def _parse_file_name(file_name: str) -> str | None:
    """The key of a stored version `<key>@<stamp>.parquet`, or None for anything else."""
    if file_name.startswith(".") or not file_name.endswith(".parquet"):
        return None
    key, sep, _stamp = file_name[: -len(".parquet")].rpartition(_STAMP_SEP)
    return key if sep and key else None


def _conform(name: str, df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Bring one stored file to the current schema: columns added later read as nulls."""
    schema = SCHEMAS[name]
    try:
        return df.select(
            [
                pl.col(c).cast(d) if c in df.columns else pl.lit(None, dtype=d).alias(c)
                for c, d in schema.items()
            ]
        )
    except pl.exceptions.PolarsError as exc:
        raise LineageError(f"table {name!r}: file {path} does not match the schema: {exc}") from exc


class LineageStore(BaseModel):
    """Lineage store: typed Parquet tables under DAGSTER_HOME plus a DuckDB catalog of views over them."""

    root: str | None = Field(
        default=None,
        description="folder of the Parquet tables; default $DAGSTER_HOME/harp",
    )
    duckdb_path: str | None = Field(
        default=None,
        description="the DuckDB catalog file; default next to root, named <root name>.duckdb "
        "($DAGSTER_HOME/harp.duckdb with the default root)",
    )
    keep_superseded_s: float = Field(
        default=300.0,
        description="seconds a rewritten file's old version is kept for readers already under way",
    )
    lock_timeout_s: float = Field(
        default=600.0, description="how long refresh_catalog waits for another refresh to finish"
    )

    # -- paths --------------------------------------------------------------------------------------

    @property
    def root_path(self) -> Path:
        """The resolved table folder (resolved at use, so Definitions load without DAGSTER_HOME)."""
        if self.root:
            return Path(self.root).expanduser().resolve()
        home = os.environ.get("DAGSTER_HOME")
        if not home:
            raise LineageError(
                "LineageStore has no folder: set DAGSTER_HOME to an absolute path "
                "(the tables then go to $DAGSTER_HOME/harp) or pass root=... to LineageStore"
            )
        return (Path(home).expanduser() / "harp").resolve()

    @property
    def catalog_path(self) -> Path:
        """The resolved DuckDB catalog file."""
        if self.duckdb_path:
            return Path(self.duckdb_path).expanduser().resolve()
        root = self.root_path
        return root.with_name(root.name + ".duckdb")

    def table_dir(self, name: str) -> Path:
        """Folder holding table `name`'s Parquet files."""
        _schema(name)
        return self.root_path / name

    def _check_kind(self, name: str, verb: str, kinds: Sequence[str]) -> None:
        _schema(name)
        if TABLE_KINDS[name] not in kinds:
            how = {
                "table": "replaced whole: use write_table(name, df)",
                "partition": "stored one file per partition: use write_partition(name, key, df)",
                "history": "kept as history, one file per run: use append_run(name, key, df)",
            }[TABLE_KINDS[name]]
            raise LineageError(f"{verb} does not apply to table {name!r}, which is {how}")

    def _version_names(self, name: str) -> tuple[Path, dict[str, list[str]]]:
        """The table's folder and the file name of every stored version of every key, oldest first.

        Names stay plain strings: a partitioned table holds one file per leaf (thousands on a large pool) and
        every write lists it, so a Path per file made each write cost O(files) in slow object creation.
        """
        folder = self.table_dir(name)
        out: dict[str, list[str]] = {}
        try:
            listing = os.listdir(folder)
        except FileNotFoundError:
            return folder, out
        for file_name in listing:
            key = _parse_file_name(file_name)
            if key is not None:
                out.setdefault(key, []).append(file_name)
        for names in out.values():
            names.sort()
        return folder, dict(sorted(out.items()))

    def _versions(self, name: str) -> dict[str, list[Path]]:
        """Every stored version of every key of a table, oldest first."""
        folder, names = self._version_names(name)
        return {key: [folder / n for n in versions] for key, versions in names.items()}

    def files(self, name: str) -> dict[str, Path]:
        """The current file of each key of a table (whole tables have one key: the table's name)."""
        folder, names = self._version_names(name)
        return {key: folder / versions[-1] for key, versions in names.items()}

    def _current_file(self, name: str, key: str) -> Path | None:
        folder, names = self._version_names(name)
        versions = names.get(key)
        return folder / versions[-1] if versions else None

    # -- writes ---------------------------------------------------------------------------------------

    def _write_version(self, name: str, key: str, df: pl.DataFrame) -> Path:
        target = self.table_dir(name) / f"{key}{_STAMP_SEP}{_new_stamp()}.parquet"
        with atomic_write(target) as fh:  # hidden temp name: neither the views' glob nor a listing sees it
            df.write_parquet(fh)
        self._prune(name)
        return target

    def write_table(self, name: str, df: pl.DataFrame) -> Path:
        """Replace a whole table (examples, leaves, phi_posteriors) atomically; returns the new file."""
        self._check_kind(name, "write_table", ("table",))
        return self._write_version(name, name, validate(name, df))

    def _check_key_column(self, name: str, key: str, df: pl.DataFrame) -> None:
        col = KEY_COLUMNS[name]
        wrong = df.filter(pl.col(col) != key)
        if wrong.height:
            raise LineageError(
                f"table {name!r}, key {key!r}: column {col!r} must equal the key in every row; "
                f"found {wrong[col].unique().sort().to_list()[:5]}"
            )

    def write_partition(self, name: str, key: str, df: pl.DataFrame) -> Path:
        """Write (or rewrite) one partition atomically; safe against parallel writers of any key."""
        self._check_kind(name, "write_partition", ("partition",))
        check_key(key)
        out = validate(name, df)
        self._check_key_column(name, key, out)
        return self._write_version(name, key, out)

    def append_run(self, name: str, key: str, df: pl.DataFrame, *, exist_ok: bool = False) -> Path:
        """Add one run's file to a history table (selections, run_manifests); earlier runs are kept.

        An existing key is refused (history is not rewritten) unless `exist_ok`, which lets a retried
        Dagster step rewrite its own run's file. The check is not a lock: keys are unique by construction
        (run ids, timestamps), so two processes never append one key at the same moment.
        """
        self._check_kind(name, "append_run", ("history",))
        check_key(key)
        out = validate(name, df)
        self._check_key_column(name, key, out)
        if not exist_ok and key in self._version_names(name)[1]:
            raise LineageError(
                f"table {name!r} already holds run {key!r}; history is kept, pick a new key "
                "or pass exist_ok=True to rewrite it"
            )
        return self._write_version(name, key, out)

    def delete_partition(self, name: str, key: str) -> bool:
        """Remove every version of one partition or run; returns whether any existed."""
        self._check_kind(name, "delete_partition", ("partition", "history"))
        check_key(key)
        folder, names = self._version_names(name)
        paths = [folder / n for n in names.get(key, [])]
        for path in reversed(paths):  # newest first, so an older version never becomes current
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if paths:
            fsync_dir(paths[0].parent)
        return bool(paths)

    def _prune(self, name: str) -> None:
        now = time.time()
        folder, names = self._version_names(name)
        for versions in names.values():
            if len(versions) < 2:
                continue
            paths = [folder / n for n in versions]
            try:
                newest_age = now - paths[-1].stat().st_mtime
            except FileNotFoundError:
                continue
            if newest_age >= self.keep_superseded_s:
                for old in paths[:-1]:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()

    def vacuum(self) -> None:
        """Delete superseded versions past `keep_superseded_s`, and the temp files of our writers that died."""
        for name in SCHEMAS:
            self._prune(name)
        for folder in [self.table_dir(n) for n in SCHEMAS] + [self.catalog_path.parent]:
            remove_stale_temps(folder, recursive=False)

    # -- reads ----------------------------------------------------------------------------------------

    def _read_file(self, name: str, path: Path) -> pl.DataFrame:
        # One open handle for the whole read: polars reading by path may open the file twice.
        with open(path, "rb") as fh:
            return _conform(name, pl.read_parquet(fh), path)

    def _read_key(self, name: str, key: str, path: Path | None) -> pl.DataFrame | None:
        for _ in range(5):
            if path is None:
                return None
            try:
                return self._read_file(name, path)
            except FileNotFoundError:  # superseded and pruned, or deleted, since the listing
                path = self._current_file(name, key)
        raise LineageError(f"table {name!r}, key {key!r}: file kept vanishing while being read")

    def read_table(self, name: str) -> pl.DataFrame:
        """All of a table's current files as one typed frame (in key order); empty typed frame when none."""
        frames = [self._read_key(name, key, path) for key, path in self.files(name).items()]
        frames = [f for f in frames if f is not None]
        return pl.concat(frames, how="vertical") if frames else empty_frame(name)

    def read_partition(self, name: str, key: str) -> pl.DataFrame | None:
        """One partition or run as a typed frame, or None when it does not exist."""
        self._check_kind(name, "read_partition", ("partition", "history"))
        check_key(key)
        return self._read_key(name, key, self._current_file(name, key))

    def read_partitions(self, name: str, keys: Sequence[str] | None = None) -> dict[str, pl.DataFrame]:
        """Many partitions or runs (all, or those of `keys` that exist) as typed frames, by key.

        One folder listing for them all: `read_partition` lists the folder on every call, so reading each of
        a table's k partitions that way costs k listings of k files.
        """
        self._check_kind(name, "read_partitions", ("partition", "history"))
        files = self.files(name)
        wanted = list(files) if keys is None else [check_key(k) for k in keys]
        out = {}
        for key in wanted:
            df = self._read_key(name, key, files.get(key))
            if df is not None:
                out[key] = df
        return out

    def partition_keys(self, name: str) -> list[str]:
        """Keys of a partitioned or history table, sorted."""
        self._check_kind(name, "partition_keys", ("partition", "history"))
        return list(self.files(name))

    # -- catalog --------------------------------------------------------------------------------------

    def _catalog_lock(self) -> contextlib.AbstractContextManager[None]:
        lock_path = self.catalog_path.with_name(self.catalog_path.name + ".lock")
        return file_lock(
            lock_path, timeout_s=self.lock_timeout_s, holder="another process is refreshing the lineage catalog"
        )

    def _view_sql(self, con: duckdb.DuckDBPyConnection, name: str, has_files: bool) -> str:
        schema = SCHEMAS[name]
        if not has_files:
            cols = ", ".join(f'CAST(NULL AS {_duckdb_type(d)}) AS "{c}"' for c, d in schema.items())
            return f"SELECT {cols} WHERE false"
        glob = _sql_str(str(self.table_dir(name) / f"*{_STAMP_SEP}*.parquet"))
        source = f"read_parquet({glob}, union_by_name = true, filename = true)"
        # Columns absent from every file (added to the schema later) read as typed nulls.
        present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        cols = ", ".join(
            f'CAST("{c}" AS {_duckdb_type(d)}) AS "{c}"'
            if c in present
            else f'CAST(NULL AS {_duckdb_type(d)}) AS "{c}"'
            for c, d in schema.items()
        )
        # Newest version per key only: the glob also matches superseded versions not yet pruned.
        key = f"split_part(parse_filename(filename), '{_STAMP_SEP}', 1)"
        return f"SELECT {cols} FROM {source} QUALIFY filename = max(filename) OVER (PARTITION BY {key})"

    def refresh_catalog(self) -> dict[str, int]:
        """Rebuild the DuckDB catalog's views (single writer, atomic swap); returns current files per table."""
        target = self.catalog_path
        with self._catalog_lock():
            self.vacuum()
            counts = {name: len(self.files(name)) for name in SCHEMAS}
            tmp = _temp_name(target)
            try:
                con = duckdb.connect(str(tmp))
                try:
                    for name in SCHEMAS:
                        con.execute(
                            f"CREATE OR REPLACE VIEW {name} AS {self._view_sql(con, name, counts[name] > 0)}"
                        )
                    for name, sql in CONVENIENCE_VIEWS.items():
                        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
                    con.execute(
                        f"CREATE TABLE {_CATALOG_TABLE} (table_name VARCHAR, files INTEGER, root VARCHAR, "
                        "schema_hash VARCHAR, refreshed_at TIMESTAMPTZ)"
                    )
                    now = dt.datetime.now(dt.timezone.utc)
                    con.executemany(
                        f"INSERT INTO {_CATALOG_TABLE} VALUES (?, ?, ?, ?, ?)",
                        [(n, c, str(self.root_path), _schema_hash(), now) for n, c in counts.items()],
                    )
                    con.execute("CHECKPOINT")
                finally:
                    con.close()
                os.chmod(tmp, FILE_MODE)
                wal = tmp.with_name(tmp.name + ".wal")
                if wal.exists():
                    raise RuntimeError(f"DuckDB left a write-ahead log {wal} after checkpoint; catalog not swapped")
                # A WAL left by someone who opened the old catalog read-write would be replayed onto the new
                # file; the catalog holds only views rebuilt here, so it is dropped.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target.with_name(target.name + ".wal"))
                os.replace(tmp, target)
            except BaseException:
                for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                raise
            fsync_dir(target.parent)
        return counts

    def _catalog_is_current(self) -> bool:
        target = self.catalog_path
        if not target.exists():
            return False
        try:
            con = duckdb.connect(str(target), read_only=True)
        except duckdb.Error:
            return False
        try:
            rows = con.execute(f"SELECT table_name, files > 0, root, schema_hash FROM {_CATALOG_TABLE}").fetchall()
        except duckdb.Error:
            return False
        finally:
            con.close()
        state = {r[0]: (bool(r[1]), r[2], r[3]) for r in rows}
        want = {n: (bool(self.files(n)), str(self.root_path), _schema_hash()) for n in SCHEMAS}
        return state == want

    def query(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pl.DataFrame:
        """Run one read-only SELECT against the catalog; `$name` or `?` parameters come from `params`.

        The catalog is rebuilt first when it is missing or out of date (a table gained its first file or
        lost its last, the schema or root changed); partitions added to a table that already had files are
        visible without a rebuild. A file deleted while the query ran (a partition deleted, or a superseded
        version pruned) makes DuckDB fail, never return wrong rows: the query is then retried. Timestamps
        come back in UTC.
        """
        con = duckdb.connect()  # parse only: refuse writes before touching the catalog
        try:
            statements = con.extract_statements(sql)
        finally:
            con.close()
        kinds = [s.type for s in statements]
        if len(kinds) != 1 or kinds[0] not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
            raise LineageError(
                f"query() runs one read-only SELECT statement; got {[k.name for k in kinds]} in {sql[:80]!r}"
            )
        for attempt in range(_QUERY_ATTEMPTS):
            if not self._catalog_is_current():
                self.refresh_catalog()
            try:
                return self._run_query(sql, params)
            except duckdb.IOException as exc:
                vanished = "No files found" in str(exc) or "No such file" in str(exc)
                if not vanished or attempt == _QUERY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _run_query(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None) -> pl.DataFrame:
        con = duckdb.connect(str(self.catalog_path), read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            # The views read only the lineage folder; a query may not read any other file (read_csv('/etc/...'),
            # glob, ATTACH) nor turn this back on.
            con.execute(f"SET allowed_directories = [{_sql_str(str(self.root_path) + os.sep)}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            return pl.DataFrame(con.sql(sql, params=params))
        finally:
            con.close()
