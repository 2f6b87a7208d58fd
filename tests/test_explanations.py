"""Explanations, selection diffs and predicted utilities with their band: one catalog query per question.

The catalog tests build a lineage store by hand (leaves, posteriors, three committed selections and one a
killed run left behind) and check each view against answers worked out here from those rows. The library
tests check the band, the greedy trace and the empty-selection note against hand-computed values. The last
test re-selects on the materialised tiny pipeline and checks the diff metadata against the stored rows.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from statistics import NormalDist

import numpy as np
import polars as pl
import pytest

from harp import explain
from harp.lineage import EXAMPLE_QUERIES, SCHEMAS, LineageStore
from harp.method.selection import harp_select, prediction_band

UTC = dt.timezone.utc
T1, T2, T3, T4 = (dt.datetime(2025, 5, 1, h, tzinfo=UTC) for h in (10, 11, 12, 13))
OLD, NEW, KILLED, EMPTY = "harp_e-old", "harp_e-new", "harp_e-killed", "harp_e-empty"

LEAVES = {"L1": ("P1", "R1", True), "L2": ("P1", "R1", False), "L3": ("P2", "R2", True), "L4": ("P2", "R2", False)}
EXAMPLES = {"a1": "L1", "a2": "L1", "b1": "L2", "c1": "L3", "c2": "L3", "d1": "L4"}
# leaf -> domain -> (mean, sd); L1 and L3 measured, L2 and L4 inferred.
POST = {"L1": {"math": (0.30, 0.05), "code": (-0.02, 0.05)}, "L2": {"math": (0.10, 0.15), "code": (0.05, 0.15)},
        "L3": {"math": (0.00, 0.04), "code": (0.25, 0.04)}, "L4": {"math": (-0.05, 0.2), "code": (0.02, 0.2)}}
MEASURED = {"L1", "L3"}


def frame(name: str, rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMAS[name])


def write_selection(store: LineageStore, sid: str, at: dt.datetime, picks: list[str], trace: list[tuple],
                    cut: int, predicted: dict[str, tuple], *, committed: bool = True, note: str | None = None) -> None:
    """One harp_e selection: its rows, its greedy trace (leaf, gain, examples taken) and its predictions
    (domain -> predicted, low, high, unclipped)."""
    run = "run-" + sid
    if picks:
        store.append_run("selections", sid, frame("selections", [
            dict(selection_id=sid, method="harp_e", rank=i + 1, example_id=e, leaf_id=EXAMPLES[e],
                 parent_id=LEAVES[EXAMPLES[e]][0], gain=0.1, predicted_utility=0.9, budget=3, pool_version="p1",
                 created_at=at, run_id=run) for i, e in enumerate(picks)]))
    running = np.cumsum([g for _, g, _ in trace]).tolist()
    if trace:
        store.append_run("selection_traces", sid, frame("selection_traces", [
            dict(selection_id=sid, method="harp_e", greedy_rank=k + 1, leaf_id=leaf, parent_id=LEAVES[leaf][0],
                 gain=gain, running_gain=running[k], before_cut=k < cut, examples_selected=taken, leaf_size=2,
                 cut=cut, stop_reason="budget", created_at=at, run_id=run)
            for k, (leaf, gain, taken) in enumerate(trace)]))
    store.append_run("selection_predictions", sid, frame("selection_predictions", [
        dict(selection_id=sid, method="harp_e", domain=d, base=0.5, predicted=p, predicted_low=lo, predicted_high=hi,
             level=0.9, unclipped=raw, saturated=raw >= 1.0, active_domain=True, selected=len(picks), note=note,
             created_at=at, run_id=run) for d, (p, lo, hi, raw) in predicted.items()]))
    if committed:
        store.append_run("selection_commits", run, frame("selection_commits", [dict(run_id=run, committed_at=at)]))


@pytest.fixture
def catalog(tmp_path: Path) -> LineageStore:
    store = LineageStore(root=str(tmp_path / "harp"), duckdb_path=str(tmp_path / "harp.duckdb"), keep_superseded_s=0)
    store.write_table("leaves", frame("leaves", [
        dict(leaf_id=leaf, parent_id=p, region_id=r, size=2, member_hash="h", is_representative=rep, pool_version="p1")
        for leaf, (p, r, rep) in LEAVES.items()]))
    store.write_table("phi_posteriors", frame("phi_posteriors", [
        dict(leaf_id=leaf, domain=d, mean=m, sd=s, measured=leaf in MEASURED, active_domain=True, pool_version="p1")
        for leaf, doms in POST.items() for d, (m, s) in doms.items()]))
    # The older selection took L1 (both examples) and L2; the newer L3 (both) and one example of L1, ranked L2
    # third, past the cut; a killed run's newer selection never committed.
    write_selection(store, OLD, T1, ["a1", "a2", "b1"], [("L1", 0.28, 2), ("L2", 0.15, 1), ("L4", -0.03, 0)], 2,
                    {"math": (0.9, 0.8, 1.0, 0.9), "code": (0.6, 0.5, 0.7, 0.6)})
    write_selection(store, NEW, T2, ["c1", "c2", "a1"], [("L3", 0.25, 2), ("L1", 0.20, 1), ("L2", -0.01, 0)], 2,
                    {"math": (1.0, 0.95, 1.0, 1.3), "code": (0.85, 0.8, 0.9, 0.85)})
    write_selection(store, KILLED, T3, ["d1"], [("L4", 0.01, 1)], 1, {"math": (0.5, 0.4, 0.6, 0.5)}, committed=False)
    return store


def test_why_is_this_example_selected_in_one_query(catalog: LineageStore) -> None:
    got = catalog.query("SELECT * FROM selection_explanations WHERE method = 'harp_e' AND example_id = 'a1' "
                        "ORDER BY domain")
    cols = ["selection_id", "rank", "leaf_id", "parent_id", "region_id", "is_representative", "leaf_greedy_rank",
            "leaf_examples_selected", "marginal_gain", "running_gain", "before_cut", "cut", "domain", "phi_mean",
            "phi_sd", "phi_source", "predicted_utility", "predicted_low", "predicted_high", "saturated"]
    assert got.select(cols).rows() == [
        (NEW, 3, "L1", "P1", "R1", True, 2, 1, 0.20, 0.45, True, 2, "code", -0.02, 0.05, "measured", 0.85, 0.8, 0.9,
         False),
        (NEW, 3, "L1", "P1", "R1", True, 2, 1, 0.20, 0.45, True, 2, "math", 0.30, 0.05, "measured", 1.0, 0.95, 1.0,
         True),
    ]
    # Every example of the newest committed selection, two domains each; the killed run's d1 is not there.
    per_example = catalog.query("SELECT example_id, count(*) AS n FROM selection_explanations GROUP BY example_id "
                                "ORDER BY example_id")
    assert per_example.rows() == [("a1", 2), ("c1", 2), ("c2", 2)]


def test_leaves_past_the_cut_in_one_query(catalog: LineageStore) -> None:
    got = catalog.query(EXAMPLE_QUERIES["after_the_cut"], {"method": "harp_e"})
    assert got.rows() == [(3, "L2", "R1", "inferred", -0.01, pytest.approx(0.44), 2, "budget")]
    ranked = catalog.query("SELECT leaf_id, before_cut, examples_selected, leaf_source FROM selection_leaves "
                           "ORDER BY greedy_rank")
    assert ranked.rows() == [("L3", True, 2, "measured"), ("L1", True, 1, "measured"), ("L2", False, 0, "inferred")]


def test_diff_by_example_leaf_and_domain_one_query_each(catalog: LineageStore) -> None:
    by_example = catalog.query("SELECT change, example_id, leaf_id, newer_rank, older_rank, newer_selection_id, "
                               "older_selection_id FROM selection_diff ORDER BY change, example_id")
    assert by_example.rows() == [("added", "c1", "L3", 1, None, NEW, OLD), ("added", "c2", "L3", 2, None, NEW, OLD),
                                 ("kept", "a1", "L1", 3, 1, NEW, OLD), ("removed", "a2", "L1", None, 2, NEW, OLD),
                                 ("removed", "b1", "L2", None, 3, NEW, OLD)]
    by_leaf = catalog.query("SELECT leaf_id, region_id, examples_before, examples_after, examples_added, "
                            "examples_removed, examples_kept, change FROM selection_diff_by_leaf ORDER BY leaf_id")
    assert by_leaf.rows() == [("L1", "R1", 2, 1, 0, 1, 1, "kept"), ("L2", "R1", 1, 0, 0, 1, 0, "removed"),
                              ("L3", "R2", 0, 2, 2, 0, 0, "added")]
    by_domain = catalog.query("SELECT domain, predicted_before, predicted_after, predicted_change, saturated, "
                              "examples_added, examples_removed, phi_mean_added, phi_mean_removed "
                              "FROM selection_diff_by_domain ORDER BY domain").rows()
    # Added: c1, c2 (L3). Removed: a2 (L1), b1 (L2): their mean effect is the mean of L1's and L2's.
    assert by_domain == [
        ("code", 0.6, 0.85, pytest.approx(0.25), False, 2, 2, 0.25, pytest.approx((-0.02 + 0.05) / 2)),
        ("math", 0.9, 1.0, pytest.approx(0.1), True, 2, 2, 0.0, pytest.approx((0.30 + 0.10) / 2)),
    ]
    between = catalog.query(EXAMPLE_QUERIES["selection_diff_between"], {"older": NEW, "newer": KILLED})
    assert between.select("change", "example_id").rows() == [
        ("added", "d1"), ("removed", "a1"), ("removed", "c1"), ("removed", "c2")]


def test_an_empty_selection_is_the_newest_and_says_why(catalog: LineageStore) -> None:
    why = "no active domain: no leaf's effect is beyond 1.0 posterior sd of 0 on any domain"
    write_selection(catalog, EMPTY, T4, [], [], 0, {"math": (0.5, 0.5, 0.5, 0.5), "code": (0.5, 0.5, 0.5, 0.5)},
                    note=why)
    versions = catalog.query("SELECT selection_id, n_examples, committed FROM selection_versions "
                             "ORDER BY created_at").rows()
    assert versions == [(OLD, 3, True), (NEW, 3, True), (KILLED, 1, False), (EMPTY, 0, True)]
    assert catalog.query("SELECT DISTINCT note FROM selection_predictions WHERE selection_id = $s",
                         {"s": EMPTY}).rows() == [(why,)]
    diff = catalog.query("SELECT change, example_id, older_selection_id FROM selection_diff ORDER BY example_id")
    assert diff.rows() == [("removed", "a1", NEW), ("removed", "c1", NEW), ("removed", "c2", NEW)]
    assert catalog.query("SELECT count(*) AS n FROM selection_explanations")["n"][0] == 0


# -- the library: band, trace, empty note, diff, composition ------------------------------------------------


def test_prediction_band_by_hand() -> None:
    """Leaf 1 is half selected; z = 1 (level 68.27%): low/high move every effect by one sd together."""
    phi = np.array([[0.3, 0.0], [0.2, 0.1]])
    sd = np.array([[0.1, 0.0], [0.05, 0.2]])
    base, w = np.array([0.6, 0.5]), np.array([1.0, 0.5])
    level = 2 * NormalDist().cdf(1.0) - 1
    e = prediction_band(phi, sd, base, w, envelope="expansive", level=level)
    np.testing.assert_allclose(e.unclipped, [0.6 + 0.3 + 0.1, 0.55])
    np.testing.assert_allclose(e.predicted, [1.0, 0.55])
    np.testing.assert_allclose(e.low, [0.6 + 0.2 + 0.075, 0.45])
    np.testing.assert_allclose(e.high, [1.0, 0.65])
    assert e.saturated.tolist() == [True, False]
    c = prediction_band(phi, sd, base, w, envelope="conservative", level=level)
    np.testing.assert_allclose(c.predicted, [0.9, 0.55])  # only the strongest positive effect counts
    np.testing.assert_allclose(c.low, [0.8, 0.45])  # domain 1: no positive effect left, half of -0.1 harms
    np.testing.assert_allclose(c.high, [1.0, 0.65])
    assert c.saturated.tolist() == [False, False]
    with pytest.raises(ValueError, match="phi_sd shape"):
        prediction_band(phi, sd[:1], base, w, envelope="expansive")


def test_trace_marks_the_cut_and_what_the_cap_took() -> None:
    """Leaves A and B help (0.3 on d0, 0.2 on d1), C harms: ranked last (the full ranking, no early stop), it
    falls past the cut, and the cap takes A's and B's 4 examples, within the budget of 5."""
    phi = np.array([[0.3, 0.0], [0.0, 0.2], [-0.1, 0.0]])
    sel = harp_select(phi, np.full_like(phi, 0.01), np.array([0.5, 0.5]), np.arange(6), np.array([0, 2, 4, 6]),
                      envelope="conservative", top_k_points=5, z_active=1.0, early_stop=False)
    trace = explain.trace_frame(sel, ["A", "B", "C"], ["P", "P", "Q"], np.array([2, 2, 2]), selection_id="s",
                                method="harp_c", created_at=T1, run_id=None)
    assert trace.select("greedy_rank", "leaf_id", "parent_id", "before_cut", "examples_selected", "cut").rows() == [
        (1, "A", "P", True, 2, 2), (2, "B", "P", True, 2, 2), (3, "C", "Q", False, 0, 2)]
    assert trace["stop_reason"].unique().to_list() == ["complete"]
    np.testing.assert_allclose(trace["gain"].to_numpy(), [0.3, 0.2, -0.1])
    np.testing.assert_allclose(trace["running_gain"].to_numpy(), [0.3, 0.5, 0.4])
    preds = explain.prediction_frame(sel, ["d0", "d1"], [0.5, 0.5], selection_id="s", method="harp_c",
                                     created_at=T1, run_id=None)
    np.testing.assert_allclose(preds["predicted"].to_numpy(), [0.8, 0.7])  # 0.5 + 0.3, 0.5 + 0.2
    assert preds["selected"].to_list() == [4, 4] and preds["note"].to_list() == [None, None]


def test_every_credible_gain_negative_says_so() -> None:
    """Both leaves credibly harm the one domain: nothing is selected, and the note says so and why."""
    args = (np.array([[-0.2], [-0.1]]), np.array([[0.01], [0.01]]), np.array([0.5]), np.arange(4), np.array([0, 2, 4]))
    sel = harp_select(*args, envelope="conservative", top_k_points=4)  # the bound stops before any leaf is ranked
    assert sel.n_selected == 0
    reason = explain.empty_reason("harp_c", sel.n_selected, 4, sel.note)
    assert "on the 1 credible domain(s)" in reason and "every credible gain is <= 0" in reason
    assert "no leaf has a positive posterior mean" in reason
    full = harp_select(*args, envelope="conservative", top_k_points=4, early_stop=False)
    assert full.n_selected == 0 and "the best first leaf would change it by -0.1" in full.note
    assert explain.empty_reason("random", 0, 0, None) == "the budget (top_k_points) is 0"
    assert explain.empty_reason("random", 5, 10, None) == ""


def test_diff_composition_and_summary_line() -> None:
    diff = explain.diff_summary(["a1", "a2", "b1"], ["L1", "L1", "L2"], ["a1", "c1"], ["L1", "L3"],
                                previous_predicted={"math": 0.9, "code": 0.6}, predicted={"math": 1.0})
    assert (diff["examples_added"], diff["examples_removed"], diff["examples_kept"]) == (1, 2, 1)
    assert (diff["leaves_added"], diff["leaves_removed"], diff["leaves_kept"]) == (["L3"], ["L2"], 1)
    assert diff["predicted_change_by_domain"] == {"math": {"before": 0.9, "after": 1.0, "change": 0.1}}
    best = explain.best_domains(["L1", "L2", "L3"], ["code", "math"], [[-0.02, 0.3], [0.05, 0.1], [-0.1, -0.2]])
    assert best == {"L1": "math", "L2": "math", "L3": explain.NO_HELPFUL_DOMAIN}
    counts = explain.composition(["L1", "L1", "L2", "L3", "L9"], {"L1": "R1", "L2": "R1", "L3": "R2"}, best)
    assert counts == {"R1": {"math": 3}, "R2": {explain.NO_HELPFUL_DOMAIN: 1}, "(unknown)": {"(unknown)": 1}}
    line = explain.format_predictions({
        "math": {"predicted": 1.0, "low": 0.95, "high": 1.0, "unclipped": 1.85, "saturated": True, "active": True},
        "code": {"predicted": 0.6, "low": 0.5, "high": 0.7, "unclipped": 0.6, "saturated": False, "active": False}})
    assert line == ("math=1.000 [0.950, 1.000] SATURATED (sum 1.85 clipped to 1), "
                    "code=0.600 [0.500, 0.700] (not credible)  (90% band)")


# -- on the materialised tiny pipeline ----------------------------------------------------------------------


def _rows(lineage: LineageStore, sid: str) -> set[str]:
    got = lineage.read_partition("selections", sid)
    return set() if got is None else set(got["example_id"].to_list())


@pytest.mark.slow
def test_reselection_reports_its_diff_and_an_empty_one_says_why(tiny_pipeline, tmp_path: Path) -> None:
    """Re-select at budget 60 (the first run used 100), then with no credible domain (z_active huge)."""
    import base64

    from helpers import BUDGET, copy_of, metadata, pipeline_defs, pipeline_resources

    first = {m: metadata(tiny_pipeline.results["select"], f"{m}_selection") for m in ("harp_c", "harp_e", "random")}
    with copy_of(tiny_pipeline, tmp_path / "copy", settings={"top_k_points": 60}) as copy:
        lineage = copy.lineage
        again = copy.defs.resolve_job_def("harp_select_job").execute_in_process(instance=copy.instance)
        assert again.success
        for method, before in first.items():
            md = metadata(again, f"{method}_selection")
            old, new = _rows(lineage, before["selection_id"]), _rows(lineage, md["selection_id"])
            assert md["previous_selection_id"] == before["selection_id"]
            assert (md["examples_added"], md["examples_removed"], md["examples_kept"]) == (
                len(new - old), len(old - new), len(new & old))
            view = dict(lineage.query("SELECT change, count(*) AS n FROM selection_diff WHERE method = $m "
                                      "GROUP BY change", {"m": method}).rows())
            assert view == {k: v for k, v in (("added", len(new - old)), ("removed", len(old - new)),
                                              ("kept", len(new & old))) if v}
            assert sum(sum(r.values()) for r in md["composition_by_region"].values()) == md["selected"] == len(new)
            png = md["composition"].split("base64,", 1)[1].rstrip(")")
            assert base64.b64decode(png).startswith(b"\x89PNG")
        # Random draws one permutation per seed: the first 60 of the same 100.
        rnd = metadata(again, "random_selection")
        assert (rnd["examples_added"], rnd["examples_removed"], rnd["examples_kept"]) == (0, BUDGET - 60, 60)
        for method in ("harp_c", "harp_e"):
            md = metadata(again, f"{method}_selection")
            pred = md["predicted_per_domain"]
            assert all(p["low"] <= p["predicted"] <= p["high"] for p in pred.values())
            assert md["saturated_domains"] == [d for d, p in pred.items() if p["unclipped"] >= 1.0 - 1e-9]
            was = {d: p["predicted"] for d, p in first[method]["predicted_per_domain"].items()}
            assert md["predicted_change_by_domain"] == {  # each figure rounded to 4 places on its own
                d: {"before": was[d], "after": p["predicted"], "change": pytest.approx(p["predicted"] - was[d],
                                                                                         abs=1.5e-4)}
                for d, p in pred.items()}
            # One query: every selected example, with its leaf's path, posterior, greedy rank and the cut.
            ex = lineage.query("SELECT * FROM selection_explanations WHERE method = $m", {"m": method})
            assert set(ex["example_id"].to_list()) == _rows(lineage, md["selection_id"])
            assert ex["before_cut"].to_list() == [True] * ex.height and ex["region_id"].null_count() == 0
            assert set(ex["phi_source"].to_list()) <= {"measured", "inferred"}
            assert ex["leaf_greedy_rank"].max() <= md["cut_index"]
            leaves = lineage.query("SELECT count(*) FILTER (WHERE before_cut) AS kept, count(*) AS ranked "
                                   "FROM selection_leaves WHERE method = $m", {"m": method}).row(0)
            assert leaves == (md["cut_index"], md["leaves_ranked"])

        # No domain is credible at z = 1e9: HARP-C selects nothing, and says why.
        settings = {"top_k_points": 60, "z_active": 1e9}
        defs = pipeline_defs(pipeline_resources(copy.root, settings=settings))
        empty = defs.resolve_job_def("harp_select_job").execute_in_process(instance=copy.instance)
        assert empty.success
        md = metadata(empty, "harp_c_selection")
        assert md["selected"] == 0 and md["empty_selection"] is True and "no active domain" in md["empty_reason"]
        assert md["examples_removed"] == len(_rows(lineage, metadata(again, "harp_c_selection")["selection_id"]))
        newest = lineage.query("SELECT newer_selection_id AS s FROM selection_pairs WHERE method = 'harp_c'")
        assert newest["s"].to_list() == [md["selection_id"]]
        note = lineage.query("SELECT DISTINCT note FROM selection_predictions WHERE selection_id = $s",
                             {"s": md["selection_id"]})
        assert note["note"].to_list() == [md["empty_reason"]]
        assert lineage.query("SELECT count(*) AS n FROM selection_explanations WHERE method = 'harp_c'")["n"][0] == 0
