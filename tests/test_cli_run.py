"""`harp-dagster run` on files of one's own: validation first, the graph through Dagster, exports and manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from harp.lineage import LineageStore

SCRIPT = Path(sys.executable).with_name("harp-dagster")


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    env.pop("DAGSTER_HOME", None)  # the command sets it from --home
    return subprocess.run([str(SCRIPT), "run", *args], capture_output=True, text=True, env=env, timeout=1200)


@pytest.fixture
def own_files(tiny_pipeline, tmp_path) -> dict[str, Path]:
    """The tiny demo's pool under other column names with an extra column, its eval set and base model."""
    pool = pl.read_parquet(tiny_pipeline.root / "pool" / "part-000.parquet")
    pool = pool.rename({"prompt": "instruction", "response": "output"}).with_columns(
        pl.format("topic-{}", pl.int_range(pl.len()) % 3).alias("topic"))
    (tmp_path / "data").mkdir()
    pool.write_parquet(tmp_path / "data" / "pool.parquet")
    return {"pool": tmp_path / "data" / "pool.parquet", "eval": tiny_pipeline.root / "demo" / "eval.jsonl",
            "model": tiny_pipeline.root / "demo" / "base_model", "home": tmp_path / "home", "out": tmp_path / "out"}


@pytest.mark.slow
def test_own_data_in_finetuning_ready_selections_out(own_files):
    f = own_files
    args = ["--pool", str(f["pool"]), "--eval", str(f["eval"]), "--base-model", str(f["model"]), "--budget", "100",
            "--home", str(f["home"]), "--out", str(f["out"]), "--pool-columns", "prompt=instruction,response=output",
            "--cpu-threads", "1"]
    got = _cli(*args)
    assert got.returncode == 0, got.stderr[-3000:]
    assert (f["home"] / "dagster.yaml").is_file()  # a new home gets the project's instance config
    # the console: one line per run (no terminal, so no bars) and never Dagster's raw event lines; those are in
    # the log file the summary names, under the home
    assert "DEBUG" not in got.stderr and "RUN_START" not in got.stderr, got.stderr[-3000:]
    assert any(line.startswith("prepare    done") for line in got.stderr.splitlines()), got.stderr[-3000:]
    log = Path(got.stdout.strip().splitlines()[-1].rsplit(" in ", 1)[1])
    # HARP's selections come with their prediction per domain and its band (saturation said, never a bare 1.0)
    out_lines = got.stdout.splitlines()
    for method in ("harp_c", "harp_e"):
        at = next(i for i, line in enumerate(out_lines) if line.strip().startswith(method))
        follow = out_lines[at + 1].strip()
        assert (follow.startswith("predicted ") and "[" in follow) or follow.startswith("empty: "), got.stdout
    assert log.parent == f["home"] / "logs" and log.read_text().count("RUN_START") >= 3
    # the runs are the code location's: the UI lists them under their jobs (tests/test_launch.py)
    import dagster as dg

    with dg.DagsterInstance.from_config(str(f["home"])) as instance:
        runs = instance.get_runs()
        assert {r.job_name for r in runs} == {"harp_prepare_job", "leaf_utilities_job", "harp_select_job"}
        assert all(r.remote_job_origin is not None for r in runs)
    manifest = json.loads((f["out"] / "manifest.json").read_text())
    assert set(manifest["methods"]) == {"harp_c", "harp_e", "tsds", "random"}
    assert manifest["budget"] == 100 and manifest["leaves_trained_this_call"] > 0
    lineage = LineageStore(root=str(f["home"] / "harp"))
    latest = lineage.query("SELECT method, example_id FROM latest_selections ORDER BY method, rank")
    source = pl.read_parquet(f["pool"])
    for method, info in manifest["methods"].items():
        want = latest.filter(pl.col("method") == method)["example_id"].to_list()
        exported = pl.read_parquet(f["out"] / info["parquet"])
        assert exported["example_id"].to_list() == want and info["examples"] == len(want) <= 100
        assert {"example_id", "prompt", "response", "topic"} <= set(exported.columns)
        lines = [json.loads(x) for x in (f["out"] / info["jsonl"]).read_text().splitlines()]
        assert [r["example_id"] for r in lines] == want
        # the original rows, unchanged: text under our names, extra columns kept
        orig = source.rename({"instruction": "prompt", "output": "response"}).select(
            "example_id", "prompt", "response", "topic")
        joined = exported.select("example_id", "prompt", "response", "topic").join(orig, on="example_id",
                                                                                   suffix="_orig")
        assert joined.height == len(want)
        assert (joined["prompt"] == joined["prompt_orig"]).all() and (joined["topic"] == joined["topic_orig"]).all()
        # loadable by `datasets` in one line, the selected rows in selection order
        import datasets

        loaded = datasets.load_dataset("parquet", data_files=str(f["out"] / info["parquet"]), split="train")
        assert loaded["example_id"] == want
    # a second call with nothing changed trains nothing and exports the same selections; where leaves would
    # train (here Ray) is not part of what a measurement is, so it changes nothing either
    again = _cli(*args, "--leaf-backend", "ray", "--ray-actors", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((f["out"] / "manifest.json").read_text())
    assert second["leaves_trained_this_call"] == 0
    assert {m: i["examples"] for m, i in second["methods"].items()} == {
        m: i["examples"] for m, i in manifest["methods"].items()}


@pytest.mark.slow
def test_bad_rows_are_named_before_any_model_loads(own_files):
    f = own_files
    bad = pl.read_parquet(f["pool"]).with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("a\u0000b")).otherwise(pl.col("output")).alias("output"))
    bad.write_parquet(f["pool"])
    got = _cli("--pool", str(f["pool"]), "--eval", str(f["eval"]), "--base-model", str(f["model"]), "--budget",
               "100", "--home", str(f["home"]), "--out", str(f["out"]), "--pool-columns",
               "prompt=instruction,response=output")
    assert got.returncode == 2
    last = got.stderr.strip().splitlines()[-1]
    assert last == f"error: {f['pool']}: 1 bad value(s): response contains a NUL character at pool.parquet row 5"
    assert not (f["home"] / "harp").exists() and not f["out"].exists()  # nothing ran
    # unknown options are refused just as plainly
    got = _cli("--pool", str(f["pool"]), "--eval", str(f["eval"]), "--base-model", str(f["model"]), "--budget",
               "100", "--home", str(f["home"]), "--out", str(f["out"]), "--methods", "harp_c,best")
    assert got.returncode == 2 and got.stderr.strip().splitlines()[-1] == (
        "error: --methods: unknown method(s) ['best']; choose from ['harp_c', 'harp_e', 'tsds', 'random']")
