"""The `selection_exports` asset: the newest selections as finetuning-ready files inside DAGSTER_HOME."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers import copy_of


@pytest.mark.slow
def test_every_selection_is_exported_with_its_rows_in_order(tiny_pipeline, tmp_path):
    datasets = pytest.importorskip("datasets")
    from harp_assets.exports import EXPORT_METHODS, exports_dir

    with copy_of(tiny_pipeline, tmp_path / "copy") as copy:
        out = exports_dir(copy.lineage)
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest["methods"]) == set(EXPORT_METHODS) and manifest["budget"] == 100
        latest = copy.lineage.query("SELECT method, example_id FROM latest_selections ORDER BY method, rank")
        source = pl.read_parquet(copy.root / "pool" / "part-000.parquet")
        for method, info in manifest["methods"].items():
            want = latest.filter(pl.col("method") == method)["example_id"].to_list()
            exported = pl.read_parquet(out / info["parquet"])
            assert exported["example_id"].to_list() == want and info["examples"] == len(want)
            # the pool's own rows, unchanged
            assert exported.select(source.columns).equals(
                source.join(exported.select("example_id"), on="example_id", how="semi")
                .join(exported.select("example_id").with_row_index("i"), on="example_id").sort("i")
                .select(source.columns))
            loaded = datasets.load_dataset("parquet", data_files=str(out / info["parquet"]), split="train")
            assert loaded["example_id"] == want
            lines = [json.loads(x) for x in (out / info["jsonl"]).read_text().splitlines()]
            assert [r["example_id"] for r in lines] == want
