"""Pools and eval sets in the layouts Hugging Face users have: `save_to_disk` folders and hub-style shards.

The folders are written by the real `datasets` library, then read by our loader with no `datasets` import.
"""

from __future__ import annotations

import os

import polars as pl
import pytest

from harp.contracts import DataContractError, data_files, load_eval_set, load_pool

datasets = pytest.importorskip("datasets", reason="the test set installs `datasets`")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rows(n: int, start: int = 0) -> dict[str, list[str]]:
    return {"example_id": [f"x{i}" for i in range(start, start + n)],
            "prompt": [f"question {i}" for i in range(start, start + n)],
            "response": [f"answer {i}" for i in range(start, start + n)]}


def test_a_saved_dataset_reads_its_shards_in_order(tmp_path):
    ds = datasets.Dataset.from_dict(_rows(50))
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    files = data_files(tmp_path / "ds")
    assert [f.suffix for f in files] == [".arrow"] * 3
    pool = load_pool(tmp_path / "ds")
    assert pool["example_id"].to_list() == ds["example_id"]


def test_a_saved_dataset_dict_reads_its_train_split_or_names_the_splits(tmp_path):
    train, test = datasets.Dataset.from_dict(_rows(8)), datasets.Dataset.from_dict(_rows(3, start=100))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load_pool(tmp_path / "dd")["example_id"].to_list() == train["example_id"]
    assert load_pool(tmp_path / "dd" / "test")["example_id"].to_list() == test["example_id"]
    datasets.DatasetDict({"dev": test}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataContractError, match=r"no `train` split.*no_train/dev"):
        load_pool(tmp_path / "no_train")


def test_hub_style_parquet_shards_take_the_train_split(tmp_path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    pl.DataFrame(_rows(5)).write_parquet(data / "train-00000-of-00002.parquet")
    pl.DataFrame(_rows(5, start=5)).write_parquet(data / "train-00001-of-00002.parquet")
    pl.DataFrame(_rows(4, start=50)).write_parquet(data / "test-00000-of-00001.parquet")
    (tmp_path / "repo" / "README.md").write_text("a dataset card\n")
    pool = load_pool(tmp_path / "repo")
    assert pool["example_id"].to_list() == [f"x{i}" for i in range(10)]
    # The dataset as `datasets` itself reads those shards: the same rows in the same order.
    ref = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in data.glob("train-*")), split="train")
    assert ref["example_id"] == pool["example_id"].to_list()


def test_a_bad_row_in_an_arrow_shard_is_named_with_its_file(tmp_path):
    rows = _rows(6)
    rows["example_id"][4] = "x1"  # a duplicate id
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    with pytest.raises(DataContractError, match=r"x1") as err:
        load_pool(tmp_path / "ds")
    assert ".arrow" in str(err.value)


def test_an_eval_set_can_be_a_saved_dataset(tmp_path):
    rows = {"example_id": ["q0", "q1"], "domain": ["a", "b"], "prompt": ["p0", "p1"],
            "choices": [["yes", "no"], ["up", "down"]], "answer": [0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "eval"))
    ev = load_eval_set(tmp_path / "eval")
    assert ev["example_id"].to_list() == ["q0", "q1"] and ev["choices"].to_list() == rows["choices"]
