"""The contamination guard: near copies of eval items are flagged by hand-checkable rules and never selected."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from helpers import copy_of, metadata

from harp.method.contamination import embedding_matches, ngram_matches, words
from harp.method.posteriors import Posteriors
from harp.method.selection import without_rows

ITEM = " ".join(f"w{i}" for i in range(20))  # 20 words: 8 distinct 13-grams


def test_ngram_coverage_by_hand():
    pool = [
        "intro " + ITEM + " outro",                       # every 13-gram of the item: coverage 8/8
        " ".join(f"w{i}" for i in range(16)),              # words 0..15: 13-grams starting at 0..3, 4/8
        "boiler " + " ".join(f"w{i}" for i in range(13)),  # one shared 13-gram: 1/8
        "Q: the capital of France? A: Paris, said the clerk",  # the short item whole, inside
        "something else entirely",
    ]
    got = ngram_matches(pool, [ITEM, "The capital of France? Paris"], n=13, min_coverage=0.8)
    assert [(m.row, m.item, m.score) for m in got] == [(0, 0, 1.0)]
    # the short item (5 words < 13) is one gram: its whole word sequence; row 3 lacks "paris" right after
    assert words("The capital of France? Paris") == ["the", "capital", "of", "france", "paris"]
    got = ngram_matches(pool + ["the capital of france paris"], ["The capital of France? Paris"], n=13)
    assert [(m.row, m.score) for m in got] == [(5, 1.0)]
    # lowering the bar to half the item takes the 16-word prefix too, and still not the boilerplate row
    assert [m.row for m in ngram_matches(pool, [ITEM], n=13, min_coverage=0.5)] == [0, 1]


def test_embedding_cosine_by_hand():
    e = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    angle = np.arccos([0.99, 0.90, -1.0])
    pool = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)  # cosines to e[0]
    got = embedding_matches(pool, e, cosine=0.98)
    assert [(m.row, m.item) for m in got] == [(0, 0)] and got[0].score == pytest.approx(0.99, abs=1e-6)


def test_without_rows_renumbers_the_leaves_and_maps_back():
    order, offsets = np.array([2, 0, 4, 1, 3]), np.array([0, 2, 3, 5])  # leaves {2, 0}, {4}, {1, 3}
    o, off, back = without_rows(order, offsets, [0, 4])
    assert back.tolist() == [1, 2, 3] and off.tolist() == [0, 1, 1, 3]  # leaf 1 is left empty
    assert back[o].tolist() == [2, 1, 3]


def test_excluded_rows_are_never_selected_and_an_emptied_leaf_has_no_effect():
    from harp import stages
    from harp.method.hierarchy import Hierarchy

    # Three leaves of two rows; leaf 0 helps most, leaf 1 a little, leaf 2 hurts. Budget: 2 rows.
    order, offsets = np.array([0, 1, 2, 3, 4, 5]), np.array([0, 2, 4, 6])
    h = Hierarchy(leaf_of=np.repeat(np.arange(3, dtype=np.int32), 2), parent_of_leaf=np.zeros(3, np.int32),
                  region_of_parent=np.zeros(1, np.int32), leaf_centroids=np.eye(3, dtype=np.float32),
                  parent_centroids=np.ones((1, 3), np.float32) / np.sqrt(3),
                  region_centroids=np.ones((1, 3), np.float32) / np.sqrt(3), member_order=order,
                  leaf_offsets=offsets, representatives=np.array([0], np.int32))
    mean = np.array([[0.3], [0.1], [-0.2]])
    post = Posteriors(mean=mean, sd=np.full((3, 1), 0.01), measured=np.array([True, False, False]),
                      hyper=None, n_measured=1)  # type: ignore[arg-type]
    plain = stages.select_harp(post, [0.5], h, envelope="expansive", top_k_points=2, z_active=0.0)
    assert plain.example_rows.tolist() == [0, 1]
    # one row of leaf 0 out: the other fills the budget with it, then leaf 1's first row
    part = stages.select_harp(post, [0.5], h, envelope="expansive", top_k_points=2, z_active=0.0, exclude_rows=[0])
    assert part.example_rows.tolist() == [1, 2]
    # leaf 0 emptied: it counts as no effect, so leaf 1 is chosen first
    gone = stages.select_harp(post, [0.5], h, envelope="expansive", top_k_points=2, z_active=0.0,
                              exclude_rows=[0, 1])
    assert gone.example_rows.tolist() == [2, 3] and gone.leaf_of_row.tolist() == [1, 1]


@pytest.mark.slow
def test_planted_copies_of_eval_items_are_flagged_and_kept_out_of_every_selection(tiny_pipeline, tmp_path):
    from harp_assets.runner import run_harp

    with copy_of(tiny_pipeline, tmp_path / "copy") as copy:
        ev = pl.read_ndjson(copy.root / "demo" / "eval.jsonl").head(6)
        planted = pl.DataFrame({
            "example_id": [f"planted-{i}" for i in range(ev.height)],
            "prompt": ev["prompt"].to_list(),
            "response": [c[a] for c, a in zip(ev["choices"].to_list(), ev["answer"].to_list(), strict=True)],
        })
        original = pl.read_parquet(copy.root / "pool" / "part-000.parquet")
        planted.select(original.columns).write_parquet(copy.root / "pool" / "part-001.parquet")
        results = run_harp(copy.instance, copy.defs)
        assert results["select"].success
        found = copy.lineage.query("SELECT example_id, eval_set, kind, score FROM contamination")
        flagged = set(found["example_id"].to_list())
        assert {f"planted-{i}" for i in range(ev.height)} <= flagged
        assert found.filter(pl.col("example_id").str.starts_with("planted") & (pl.col("kind") == "ngram"))[
            "score"].min() == 1.0
        chosen = copy.lineage.query("SELECT method, example_id FROM latest_selections")
        assert chosen.height and not set(chosen["example_id"].to_list()) & flagged
        for method in ("harp_c", "harp_e", "tsds", "random"):
            md = metadata(results["select"], f"{method}_selection")
            assert md["contaminated_left_out"] == len(flagged) and md["contaminated_selected"] == 0
        assert metadata(results["prepare"], "pool_contamination")["reused"] is False
        # nothing changed: the next run reuses the flags instead of embedding the eval sets again
        again = run_harp(copy.instance, copy.defs)
        md = metadata(again["prepare"], "pool_contamination")
        assert md["reused"] is True and md["flagged_examples"] == len(flagged)
