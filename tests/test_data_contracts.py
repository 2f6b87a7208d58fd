"""Data contracts: bad files raise DataContractError naming the file and the offending ids/rows."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from harp.contracts import (
    DataContractError,
    load_eval_set,
    load_pool,
    write_parquet,
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pool_rows(ids: list[str]) -> list[dict]:
    return [{"example_id": i, "prompt": f"question {i}", "response": f"answer {i}"} for i in ids]


def _raises(path: Path, *needles: str, **kw) -> str:
    loader = kw.pop("loader", load_pool)
    with pytest.raises(DataContractError) as info:
        loader(path, **kw)
    msg = str(info.value)
    assert path.name in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ---- pool ------------------------------------------------------------------------------------------------
def test_pool_jsonl_round_trip_keeps_extra_columns(tmp_path):
    rows = [dict(r, source="web", score=i) for i, r in enumerate(_pool_rows(["a", "b", "c"]))]
    df = load_pool(_jsonl(tmp_path / "pool.jsonl", rows))
    assert df.columns == ["example_id", "prompt", "response", "source", "score"]
    assert df["example_id"].to_list() == ["a", "b", "c"]
    assert df["score"].to_list() == [0, 1, 2]
    out = write_parquet(df, tmp_path / "out" / "pool.parquet")
    assert load_pool(out).equals(df)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_pool_parquet_and_integer_ids(tmp_path):
    df = pl.DataFrame({"example_id": [7, 8], "prompt": ["p", "q"], "response": ["r", "s"]})
    df.write_parquet(tmp_path / "pool.parquet")
    got = load_pool(tmp_path / "pool.parquet")
    assert got.schema["example_id"] == pl.String
    assert got["example_id"].to_list() == ["7", "8"]


def test_pool_folder_mixed_formats_sorted_by_name(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    pl.DataFrame(_pool_rows(["c", "d"])).with_columns(pl.lit(1.5).alias("weight")).write_parquet(
        folder / "b_part.parquet"
    )
    _jsonl(folder / "a_part.jsonl", _pool_rows(["a", "b"]))
    (folder / "notes.txt").write_text("not data")
    (folder / ".hidden.jsonl").write_text("garbage")
    df = load_pool(folder)
    assert df["example_id"].to_list() == ["a", "b", "c", "d"]
    assert df["weight"].to_list() == [None, None, 1.5, 1.5]


def test_pool_duplicate_ids_across_files_named_with_locations(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    _jsonl(folder / "one.jsonl", _pool_rows(["x", "dup1", "y"]))
    pl.DataFrame(_pool_rows(["dup1", "z"])).write_parquet(folder / "two.parquet")
    msg = _raises(folder, "dup1", "one.jsonl row 1 (line 2)", "two.parquet row 0")
    assert "'x'" not in msg


def test_pool_missing_column_lists_present_columns(tmp_path):
    p = _jsonl(tmp_path / "pool.jsonl", [{"example_id": "a", "prompt": "p", "answer": "r"}])
    _raises(p, "'response'", "columns present", "'answer'")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_pool_empty_text_names_id_and_row(tmp_path, value):
    rows = _pool_rows(["a", "b", "c"])
    rows[2]["response"] = value
    p = _jsonl(tmp_path / "pool.jsonl", rows)
    msg = _raises(p, "response", "'c'", "row 2 (line 3)")
    assert "'a'" not in msg


def test_pool_empty_id_named_by_row(tmp_path):
    rows = _pool_rows(["a", "", "c"])
    _raises(_jsonl(tmp_path / "pool.jsonl", rows), "example_id", "row 1")


def test_pool_unreadable_and_unsupported(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(_pool_rows(["a"])[0]) + "\n" + '{"example_id": "b", "prompt":\n')
    _raises(bad, "line 2", "not valid JSON")
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('["a", "b"]\n')
    _raises(notobj, "line 1")
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"this is not parquet")
    _raises(fake, "unreadable Parquet")
    csv = tmp_path / "pool.csv"
    csv.write_text("example_id,prompt,response\na,p,r\n")
    _raises(csv, "unsupported file suffix", ".csv")
    _raises(tmp_path / "missing.jsonl", "no such file")


def test_pool_wrong_type_column(tmp_path):
    p = _jsonl(tmp_path / "pool.jsonl", [{"example_id": "a", "prompt": 3, "response": "r"}])
    _raises(p, "line 1: prompt", "not a string")


# ---- eval set --------------------------------------------------------------------------------------------
def _eval_rows() -> list[dict]:
    return [
        {"example_id": "m1", "domain": "math", "prompt": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
        {"example_id": "m2", "domain": "math", "prompt": "3+3?", "choices": ["6", "7"], "answer": 0},
        {"example_id": "g1", "domain": "geo", "prompt": "Capital of France?", "answer": "Paris", "src": "x"},
    ]


def test_eval_mixed_kinds_round_trip(tmp_path):
    p = _jsonl(tmp_path / "eval.jsonl", _eval_rows())
    df = load_eval_set(p, domains=["math", "geo"])
    assert df.columns[:7] == [
        "example_id",
        "domain",
        "prompt",
        "kind",
        "choices",
        "answer_index",
        "answer_text",
    ]
    assert "src" in df.columns
    assert df["kind"].to_list() == ["choice", "choice", "exact"]
    assert df["answer_index"].to_list() == [1, 0, None]
    assert df["answer_text"].to_list() == ["4", "6", "Paris"]
    assert df["choices"].to_list()[2] is None
    # The same rows as Parquet, where one column cannot mix ints and strings: indices given as "1", "0".
    as_text = [dict(r, answer=str(r["answer"])) for r in _eval_rows()]
    pq = write_parquet(pl.DataFrame(as_text), tmp_path / "eval.parquet")
    assert load_eval_set(pq).equals(df)


def test_eval_written_without_answer_is_rejected(tmp_path):
    p = _jsonl(tmp_path / "eval.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in _eval_rows()])
    _raises(p, "'answer'", "columns present", loader=load_eval_set)


def test_eval_parquet_all_choice(tmp_path):
    df = pl.DataFrame(
        {
            "example_id": ["a", "b"],
            "domain": ["d", "d"],
            "prompt": ["p", "q"],
            "choices": [["x", "y"], ["u", "v", "w"]],
            "answer": [1, 2],
        }
    )
    df.write_parquet(tmp_path / "eval.parquet")
    got = load_eval_set(tmp_path / "eval.parquet", domains=["d"])
    assert got["answer_text"].to_list() == ["y", "w"]
    assert set(got["kind"]) == {"choice"}


def test_eval_answer_out_of_range_names_id_and_range(tmp_path):
    rows = _eval_rows()
    rows[1]["answer"] = 2
    p = _jsonl(tmp_path / "eval.jsonl", rows)
    _raises(p, "'m2'", "out of range", "0..1", "row 1", loader=load_eval_set)


def test_eval_too_few_choices(tmp_path):
    rows = _eval_rows()
    rows[0]["choices"] = ["only"]
    rows[0]["answer"] = 0
    _raises(_jsonl(tmp_path / "eval.jsonl", rows), "'m1'", "fewer than 2", loader=load_eval_set)


def test_eval_empty_prompt_duplicate_id_and_bad_answers(tmp_path):
    rows = _eval_rows()
    rows[2]["prompt"] = " "
    _raises(_jsonl(tmp_path / "e1.jsonl", rows), "prompt", "'g1'", loader=load_eval_set)
    rows = _eval_rows() + [dict(_eval_rows()[0])]
    _raises(_jsonl(tmp_path / "e2.jsonl", rows), "duplicate", "'m1'", "row 3", loader=load_eval_set)
    rows = _eval_rows()
    rows[2]["answer"] = ""
    _raises(_jsonl(tmp_path / "e3.jsonl", rows), "'g1'", "empty answer", loader=load_eval_set)
    rows = [dict(r, answer=3) for r in _eval_rows() if r["domain"] == "geo"]
    _raises(
        _jsonl(tmp_path / "e4.jsonl", rows), "'g1'", "numeric answer but no choices", loader=load_eval_set
    )
    rows = _eval_rows()
    rows[0]["answer"] = "B"
    _raises(_jsonl(tmp_path / "e5.jsonl", rows), "'m1'", "not an integer index", loader=load_eval_set)


def test_eval_domains_expected_and_unexpected(tmp_path):
    p = _jsonl(tmp_path / "eval.jsonl", _eval_rows())
    _raises(p, "'code'", "no examples", loader=load_eval_set, domains=["math", "geo", "code"])
    msg = _raises(p, "'geo'", "not in the expected list", "'g1'", loader=load_eval_set, domains=["math"])
    assert "'m1'" not in msg
