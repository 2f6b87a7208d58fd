"""The bad-input matrix: every case is refused before any model loads, naming the file, the line or row, and
the reason; `make demo`'s command ends on that message, not on a parser's raw error."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from harp.contracts import DataContractError, load_eval_set, load_pool

GOOD = {"example_id": "a", "prompt": "What is 2+2?", "response": "4"}
EVAL = {"example_id": "q1", "domain": "math", "prompt": "2+2?", "choices": ["3", "4"], "answer": 1}


def _lines(*records: str) -> str:
    return "".join(r + "\n" for r in records)


def _row(**changes) -> str:
    return json.dumps({**GOOD, **changes})


# (name, file name, raw text, loader, what the message must name)
JSONL_CASES = [
    ("empty file", "pool.jsonl", "", load_pool, ["holds no records"]),
    ("only blank lines", "pool.jsonl", "\n  \n\n", load_pool, ["holds no records"]),
    ("NaN literal", "pool.jsonl", _lines(_row(), '{"example_id": "b", "prompt": "p", "response": "r", "w": NaN}'),
     load_pool, ["line 2 is not valid JSON", "NaN is not a JSON value"]),
    ("Infinity literal", "pool.jsonl", _lines('{"example_id": "b", "prompt": "p", "response": Infinity}'),
     load_pool, ["line 1 is not valid JSON", "Infinity"]),
    ("broken JSON", "pool.jsonl", _lines(_row(), '{"example_id": "b", "prompt": '), load_pool,
     ["line 2 is not valid JSON"]),
    ("a JSON array line", "pool.jsonl", _lines("[1, 2]"), load_pool, ["line 1 is a JSON array, not an object"]),
    ("bool id", "pool.jsonl", _lines(_row(example_id=1), _row(example_id=True)), load_pool,
     ["line 2: example_id is a JSON bool"]),
    ("number prompt", "pool.jsonl", _lines(_row(), _row(example_id="b", prompt=3)), load_pool,
     ["line 2: prompt is a JSON int (3), not a string"]),
    ("object response", "pool.jsonl", _lines(_row(response={"text": "4"})), load_pool,
     ["line 1: response is a JSON object"]),
    ("float response", "pool.jsonl", _lines(_row(response=4.0)), load_pool, ["line 1: response is a JSON float"]),
    ("lone surrogate", "pool.jsonl", _lines('{"example_id": "a", "prompt": "p\\ud800x", "response": "r"}'),
     load_pool, ["line 1: prompt contains a lone UTF-16 surrogate"]),
    ("NUL in id", "pool.jsonl", _lines(_row(example_id="a\u0000b")), load_pool,
     ["line 1: example_id contains a NUL character"]),
    ("NUL in response", "pool.jsonl", _lines(_row(response="4\u0000")), load_pool,
     ["line 1: response contains a NUL character"]),
    ("id with trailing space", "pool.jsonl", _lines(_row(), _row(example_id="a ")), load_pool,
     ["line 2: example_id has leading or trailing whitespace ('a ')"]),
    ("not UTF-8", "pool.jsonl", None, load_pool, ["not UTF-8 text"]),
    ("integer choices", "eval.jsonl", _lines(json.dumps({**EVAL, "choices": [3, 4]})), load_eval_set,
     ["line 1: choices must be strings, found [3, 4]"]),
    ("mixed choices", "eval.jsonl", _lines(json.dumps({**EVAL, "choices": ["3", 4]})), load_eval_set,
     ["line 1: choices must be strings, found [4]"]),
    ("repeated choices", "eval.jsonl", _lines(json.dumps({**EVAL, "choices": ["4", "4", "5"]})), load_eval_set,
     ["line 1: choices repeat ['4']"]),
    ("bool answer index", "eval.jsonl", _lines(json.dumps(EVAL), json.dumps({**EVAL, "example_id": "q2",
                                                                              "answer": True})),
     load_eval_set, ["column 'answer' mixes JSON types: int at line 1, bool at line 2"]),
    ("number domain", "eval.jsonl", _lines(json.dumps({**EVAL, "domain": 7})), load_eval_set,
     ["line 1: domain is a JSON int (7), not a string"]),
]


@pytest.mark.parametrize(("name", "file", "text", "loader", "needles"), JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_bad_jsonl_input_is_named(tmp_path: Path, name, file, text, loader, needles) -> None:
    path = tmp_path / file
    if text is None:
        path.write_bytes(b'{"example_id": "a", "prompt": "caf\xe9", "response": "r"}\n')
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(DataContractError) as info:
        loader(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


PARQUET_CASES = [
    ("NUL in prompt", {"example_id": ["a", "b"], "prompt": ["p", "p\u0000"], "response": ["r", "r"]}, load_pool,
     ["prompt contains a NUL character at pool.parquet row 1"]),
    ("id with leading space", {"example_id": ["a", " a"], "prompt": ["p", "p"], "response": ["r", "r"]}, load_pool,
     ["example_id ' a' has leading or trailing whitespace at pool.parquet row 1"]),
    ("number response column", {"example_id": ["a"], "prompt": ["p"], "response": [4]}, load_pool,
     ["column 'response' must hold strings, found type Int64"]),
    ("repeated choices", {"example_id": ["q1"], "domain": ["math"], "prompt": ["2+2?"], "choices": [["4", "4"]],
                          "answer": [0]}, load_eval_set, ["repeated choices", "id 'q1' at pool.parquet row 0"]),
]


@pytest.mark.parametrize(("name", "columns", "loader", "needles"), PARQUET_CASES, ids=[c[0] for c in PARQUET_CASES])
def test_bad_parquet_input_is_named(tmp_path: Path, name, columns, loader, needles) -> None:
    path = tmp_path / "pool.parquet"
    pl.DataFrame(columns).write_parquet(path)
    with pytest.raises(DataContractError) as info:
        loader(path)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_blank_lines_between_records_are_skipped_and_lines_still_named(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text(_lines(_row(), "", "   ", _row(example_id="b"), _row(example_id="c", prompt="")))
    with pytest.raises(DataContractError, match=r"id 'c' at pool.jsonl row 2 \(line 5\)"):
        load_pool(path)
    path.write_text(_lines(_row(), "", _row(example_id="b")))
    assert load_pool(path)["example_id"].to_list() == ["a", "b"]


@pytest.mark.slow
def test_the_demo_command_ends_on_the_contract_message(tmp_path: Path, tiny_pipeline) -> None:
    """A pool the parser cannot read: the command's last line names the file and line, not polars' ComputeError."""
    import os
    import subprocess
    import sys

    pool = tmp_path / "pool.jsonl"
    pool.write_text(_lines(_row(), '{"example_id": "b", "prompt": "p", "response": NaN}'))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "HARP_POOL": str(pool),
           "HARP_DEMO_DIR": str(tiny_pipeline.root / "demo"), "HARP_CPU_THREADS": "1"}
    got = subprocess.run([sys.executable, "-m", "harp_demo.run", "--no-build"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 1
    last = got.stderr.strip().splitlines()[-1]
    assert last == (f"error: the HARP pipeline failed: DataContractError: {pool}: 1 bad record(s): line 2 is not "
                    "valid JSON (NaN is not a JSON value)")


class _FlakyEmbedder:
    """Stands in for the embedder: NaN for texts containing BAD, a fixed unit vector otherwise."""

    model_id = "flaky-test-embedder"

    def embed(self, texts, on_progress=None):
        import numpy as np

        out = np.zeros((len(texts), 4), dtype=np.float32)
        out[:, 0] = 1.0
        out[[i for i, t in enumerate(texts) if "BAD" in t], 0] = np.nan
        return out


def test_bad_embeddings_never_enter_the_cache(tmp_path: Path, monkeypatch) -> None:
    import dagster as dg
    import numpy as np

    from harp import store
    from harp_assets.embeddings import example_embeddings
    from harp_assets.sources import pool_examples
    from harp_resources import FinetunerResource, LineageResource, PoolSourceResource

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    pool = tmp_path / "pool.jsonl"
    others = [_row(example_id=f"e{i}", prompt=f"question {i}") for i in range(9)]
    pool.write_text(_lines(_row(example_id="b", prompt="BAD text"), *others))
    lineage = LineageResource(root=str(tmp_path / "harp"))
    resources = {"pool_source": PoolSourceResource(pool_path=str(pool), eval_path=str(pool)),
                 "lineage": lineage, "embedder": dg.ResourceDefinition.hardcoded_resource(_FlakyEmbedder()),
                 # no chat rows: the base model's tokenizer is never loaded
                 "finetuner": FinetunerResource(base_model=str(tmp_path / "no-model"))}
    result = dg.materialize([pool_examples, example_embeddings], resources=resources, raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    error = failure.step_failure_data.error
    assert "NaN, inf or all-zero vectors for 1 example(s), e.g. ['b']" in (error.cause or error).message
    with np.load(store.embedding_cache_path(lineage, _FlakyEmbedder.model_id)) as z:
        assert sorted(z["example_ids"].tolist()) == [f"e{i}" for i in range(9)] and np.isfinite(z["X"]).all()
    # the example fixed at its source: the rerun embeds only it and succeeds
    pool.write_text(_lines(_row(example_id="b", prompt="good text"), *others))
    again = dg.materialize([pool_examples, example_embeddings], resources=resources)
    emb = again.asset_materializations_for_node("example_embeddings")[0].metadata
    assert (emb["embedded_new"].value, emb["cached"].value) == (1, 9)


def test_a_pool_too_small_for_every_method_is_refused_up_front(tmp_path: Path) -> None:
    from harp.sources import MIN_POOL, PoolSource

    pool = tmp_path / "pool.jsonl"
    pool.write_text(_lines(*[_row(example_id=f"e{i}") for i in range(MIN_POOL - 1)]))
    with pytest.raises(DataContractError, match=rf"{pool}: the pool holds {MIN_POOL - 1} example\(s\); a selection "
                       rf"run needs at least {MIN_POOL}"):
        PoolSource(pool_path=str(pool)).load_pool()
    pool.write_text(_lines(*[_row(example_id=f"e{i}") for i in range(MIN_POOL)]))
    assert PoolSource(pool_path=str(pool)).load_pool().height == MIN_POOL
