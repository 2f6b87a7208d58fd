"""`harp()` end to end on the tiny local model, and its input checks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from helpers import HIERARCHY, LORA, counting_base_loads, make_eval_set, make_pool

from harp.entry import HarpResult, harp
from harp.models.device import Device

pytestmark = pytest.mark.usefixtures("torch_one_thread")

INFO_KEYS = {
    "domains",
    "base_scores",
    "phi_hat",
    "phi_var",
    "phi_mean",
    "phi_sd",
    "measured_leaves",
    "active_domains",
    "inactive_domains",
    "active_mask",
    "hyperparameters",
    "leaf_orders",
    "cut_indices",
    "hierarchy",
    "leaf_measurements",
    "n_train_eval_runs",
    "train_examples_used",
    "train_eval_seconds",
    "seconds",
    "config",
    "harp_c",
    "harp_e",
}
SELECTION_KEYS = {
    "indices",
    "envelope",
    "leaf_order",
    "gains",
    "cut_index",
    "kept_leaves",
    "predicted",
    "note",
    "selection",
}


def _run(model_dir, train=None, X=None, eval_set=None, **kw) -> HarpResult:
    rows, feats = make_pool()
    args = dict(
        X_feat=feats if X is None else X,
        base_model_name=str(model_dir),
        train_examples=rows if train is None else train,
        eval_examples=make_eval_set() if eval_set is None else eval_set,
        TOP_K_POINTS=40,
        lora_config=dict(LORA),
        hierarchy_config=dict(HIERARCHY),
        seed=0,
        device=Device(device="cpu"),
        n_boot=50,
    )
    return harp(**(args | kw))


def test_harp_end_to_end_is_deterministic_and_documented(tiny_model_dir):
    lines: list[str] = []
    with counting_base_loads() as loads:
        first = _run(tiny_model_dir, log=lines.append)
        second = _run(tiny_model_dir, train=pl.DataFrame(make_pool()[0]), device="cpu")
    assert len(loads) <= 1  # both calls share one loaded base model
    info = first.info
    assert INFO_KEYS <= set(info)
    n = len(make_pool()[0])
    for key in ("harp_c", "harp_e"):
        rows = getattr(first, key)
        assert rows.dtype == np.int64 and 0 < rows.size <= 40
        assert np.unique(rows).size == rows.size and rows.min() >= 0 and rows.max() < n
        assert SELECTION_KEYS <= set(info[key])
        assert np.array_equal(info[key]["indices"], rows)
        assert info["cut_indices"][key] == info[key]["cut_index"]
        assert np.array_equal(info["leaf_orders"][key], info[key]["leaf_order"])
        # every selected row lies in a kept leaf
        kept = set(info[key]["kept_leaves"].tolist())
        assert set(info["hierarchy"]["leaf_of"][rows].tolist()) <= kept
        # the pool's off-task filler (rows 100..149) teaches no eval domain and is never selected
        assert rows.max() < 100
        # same seed, same data (as a DataFrame this time): the identical selection
        assert np.array_equal(getattr(second, key), rows)
    reps = info["hierarchy"]["representatives"]
    assert info["n_train_eval_runs"] == reps.size == len(info["leaf_measurements"])
    assert info["measured_leaves"].tolist() == reps.tolist()
    assert info["train_examples_used"] == int(info["hierarchy"]["leaf_sizes"][reps].sum())
    assert info["domains"] == ["colors", "greek"] and set(info["base_scores"]) == {"colors", "greek"}
    G = info["hierarchy"]["n_leaves"]
    assert info["phi_mean"].shape == info["phi_sd"].shape == (G, 2)
    assert info["phi_hat"].shape == (reps.size, 2)
    assert np.array_equal(first.info["phi_mean"], second.info["phi_mean"])
    assert np.array_equal(first.info["phi_hat"], second.info["phi_hat"])
    assert set(info["active_domains"]) | set(info["inactive_domains"]) == {"colors", "greek"}
    assert {
        "hierarchy",
        "base_scores",
        "leaf_measurements",
        "main_effects",
        "posteriors",
        "selection",
        "total",
    } <= set(info["seconds"])
    assert info["config"]["lora"]["r"] == LORA["r"] and info["config"]["TOP_K_POINTS"] == 40
    assert any(line.startswith(f"leaf {reps.size}/{reps.size}") for line in lines)
    assert lines[-1].startswith(f"harp: {reps.size} train-evaluate runs")


def test_harp_budget_zero_and_matching_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    res = _run(tiny_model_dir, TOP_K_POINTS=0, tokenizer=tok)
    assert res.harp_c.size == 0 and res.harp_e.size == 0
    assert "top_k_points is 0" in res.info["harp_c"]["note"]


def test_harp_rejects_a_different_tokenizer(tiny_model_dir):
    from harp_demo.base_model import train_tokenizer

    other = train_tokenizer(["one two three four five six"] * 20, vocab_size=270)
    with pytest.raises(ValueError, match="does not match the tokenizer of base model"):
        _run(tiny_model_dir, tokenizer=other)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"X": np.zeros((3, 4))}, ValueError, r"all zeros and cannot be normalised: rows \[0, 1, 2\]"),
        ({"X": np.ones((149, 16))}, ValueError, "X_feat has 149 rows but train_examples has 150 examples"),
        (
            {"train": [{"example_id": "a", "prompt": "x y", "response": " "}]},
            ValueError,
            r"train_examples row 0 \(example_id='a'\): response must be a non-empty string",
        ),
        ({"train": [{"prompt": "x y"}]}, ValueError, "train_examples row 0: missing field 'response'"),
        ({"train": pl.DataFrame({"prompt": ["x"]})}, ValueError, r"missing column\(s\) \['response'\]"),
        ({"train": {"prompt": "x", "response": "y"}}, TypeError, "not a single dict"),
        ({"train": []}, ValueError, "train_examples is empty"),
        (
            {"eval_set": [{"example_id": "q", "prompt": "p", "answer": "a"}]},
            ValueError,
            r"eval_set row 0: missing field\(s\) \['domain'\]",
        ),
        ({"TOP_K_POINTS": -1}, ValueError, "TOP_K_POINTS must be an integer >= 0"),
        ({"n_boot": 1}, ValueError, "n_boot must be an integer >= 2"),
        ({"z_active": float("nan")}, ValueError, "z_active must be a finite number >= 0"),
        ({"seed": -2}, ValueError, "seed must be an integer >= 0"),
        ({"base_model_name": ""}, ValueError, "base_model_name must be"),
        ({"lora_config": {"rank": 4}}, ValueError, r"unknown lora_config setting\(s\) \['rank'\]"),
        ({"lora_config": {"base_model": "x"}}, ValueError, "use harp\\(\\)'s 'base_model_name' argument"),
        (
            {"evaluator_config": {"batch": 4}},
            ValueError,
            r"unknown evaluator_config setting\(s\) \['batch'\]",
        ),
        ({"evaluator_config": {"backend": "onnx"}}, ValueError, "Evaluator.backend='onnx'"),
        (
            {"hierarchy_config": {"leaves": 2}},
            ValueError,
            r"unknown hierarchy setting\(s\) \['leaves'\]",
        ),
        ({"hierarchy_config": {"leaf_size": 0}}, ValueError, "leaf_size must be an integer >= 1"),
        (
            {"lora_config": {"separator": "\n"}, "evaluator_config": {"separator": " | "}},
            ValueError,
            "lora_config separator",
        ),
        ({"device": "gpu"}, ValueError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_harp_rejects_bad_inputs_before_loading_a_model(tiny_model_dir, change, error, message):
    with counting_base_loads() as loads, pytest.raises(error, match=message):
        _run(tiny_model_dir, **change)
    assert loads == []


NO_DAGSTER = r'''
import importlib.abc, json, sys

class NoDagster(importlib.abc.MetaPathFinder):
    """This process has no Dagster: any import of it (or of the packages built on it) fails."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"dagster", "dagster_graphql", "dagster_webserver", "harp_assets", "harp_resources"}:
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoDagster())
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from helpers import HIERARCHY, LORA, make_eval_set, make_pool
from harp import harp
rows, feats = make_pool()
result = harp(feats, sys.argv[1], rows, make_eval_set(), TOP_K_POINTS=40, lora_config=dict(LORA),
              hierarchy_config=dict(HIERARCHY), seed=0, device="cpu", n_boot=50)
assert not [m for m in sys.modules if m.split(".")[0] == "dagster"]
print(json.dumps({"harp_c": result.harp_c.tolist(), "harp_e": result.harp_e.tolist()}))
'''


def test_harp_runs_where_dagster_cannot_be_imported(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "no_dagster.py"
    script.write_text(NO_DAGSTER)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    here = _run(tiny_model_dir)
    assert got == {"harp_c": here.harp_c.tolist(), "harp_e": here.harp_e.tolist()}


def test_harp_active_rounds_measure_more_leaves_through_the_same_driver(tiny_model_dir):
    plain = _run(tiny_model_dir)
    active = _run(tiny_model_dir, active_runs=2, active_rounds=1)
    reps = plain.info["n_train_eval_runs"]
    assert active.info["n_train_eval_runs"] == reps + 2
    assert set(plain.info["measured_leaves"].tolist()) < set(active.info["measured_leaves"].tolist())
    assert active.info["config"]["active_runs"] == 2 and active.info["config"]["active_rounds"] == 1
