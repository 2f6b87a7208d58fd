"""A leaf's data version covers every setting that shapes its measurement, by construction.

The key is built from all fields of the finetuner and the evaluator (`harp.versions.measurement_key`) plus the
dtype; a field that does not shape a measurement says so where it is declared (`NOT_MEASUREMENT`). Here every
such field is changed in turn: the version moves and, in a real Dagster run, every measured leaf is retrained;
changing a log setting retrains nothing.
"""

from __future__ import annotations

import dagster as dg
import pytest
from helpers import PIPELINE_LORA, copy_of, pipeline_defs, pipeline_resources, trained_leaves

from harp import driver, store
from harp.models.device import Device
from harp.models.evaluator import Evaluator
from harp.models.finetuner import LoraFinetuner
from harp.versions import (
    NOT_MEASUREMENT,
    base_scores_key,
    leaf_data_version,
    measurement_config,
    measurement_key,
)
from harp_assets.runner import run_leaf_ranges
from harp_resources import DeviceResource, EvaluatorResource, FinetunerResource

# A different, valid value for every measurement field of the tiny pipeline's models. The separator joins
# prompt and answer on both sides, so it changes on both at once.
FINETUNER_CHANGES = {
    "trust_remote_code": True, "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "target_modules": ["c_attn"],
    "learning_rate": 5e-3, "weight_decay": 0.01, "max_grad_norm": 0.5, "epochs": 2, "batch_size": 4,
    "max_length": 64, "group_by_length": True, "seed": 1, "separator": " => ",
}
EVALUATOR_CHANGES = {"batch_size": 16, "length_normalize": True, "max_new_tokens": 8, "max_length": 96,
                     "backend": "vllm", "separator": " => "}
# Settings that do not change a measurement: changing them must keep every stored leaf.
IRRELEVANT = ({"log_every_steps": 1}, {"vllm_gpu_memory_utilization": 0.9, "vllm_max_lora_rank": 8})


def _measurement_fields(cls: type) -> set[str]:
    return {n for n, f in cls.model_fields.items() if f.json_schema_extra != NOT_MEASUREMENT}


def _key(lora: dict | None = None, evaluator: dict | None = None, dtype: str = "auto") -> dict:
    ft = LoraFinetuner(base_model="unused", device=Device(device="cpu", dtype=dtype), **(lora or {}))
    return measurement_key(ft, Evaluator(**(evaluator or {})))


def test_every_measurement_field_has_a_change_here():
    # a field added to either model without a decision shows up here, not as a silently reused leaf
    assert _measurement_fields(LoraFinetuner) == set(FINETUNER_CHANGES)
    assert _measurement_fields(Evaluator) == set(EVALUATOR_CHANGES)
    assert _measurement_fields(LoraFinetuner) | {"base_model", "device", "log_every_steps"} == set(
        LoraFinetuner.model_fields)


@pytest.mark.parametrize("field", sorted(FINETUNER_CHANGES))
def test_a_finetuner_field_changes_the_leaf_version(field):
    base = _key()
    other = _key(lora={field: FINETUNER_CHANGES[field]})
    assert other != base
    assert leaf_data_version("m", "b", "e", other, 0) != leaf_data_version("m", "b", "e", base, 0)


@pytest.mark.parametrize("field", sorted(EVALUATOR_CHANGES))
def test_an_evaluator_field_changes_the_leaf_version_and_the_base_scores_key(field):
    ft = LoraFinetuner(base_model="unused", device=Device(device="cpu"))
    changed = Evaluator(**{field: EVALUATOR_CHANGES[field]})
    assert _key(evaluator={field: EVALUATOR_CHANGES[field]}) != _key()
    assert base_scores_key(ft, changed) != base_scores_key(ft, Evaluator())


def test_the_dtype_changes_the_key_and_irrelevant_fields_do_not():
    assert _key(dtype="bfloat16") != _key(dtype="float32") == _key()  # auto is float32 on a CPU
    assert _key(lora=IRRELEVANT[0], evaluator=IRRELEVANT[1]) == _key()
    ft = LoraFinetuner(base_model="/somewhere/else", device=Device(device="cpu", cpu_threads=1))
    assert measurement_config(ft) == measurement_config(LoraFinetuner(base_model="unused"))


def test_the_resources_key_like_the_library():
    lib = measurement_key(LoraFinetuner(base_model="m", device=Device(device="cpu"), r=4), Evaluator(batch_size=3))
    res = measurement_key(FinetunerResource(base_model="m", device=DeviceResource(device="cpu"), r=4),
                          EvaluatorResource(batch_size=3))
    assert lib == res


@pytest.mark.slow
def test_changing_each_field_retrains_every_measured_leaf_and_a_log_setting_none(tiny_pipeline, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("HARP_TRUST_REMOTE_CODE", "1")  # the deployment allows trust_remote_code to be changed
    with copy_of(tiny_pipeline, tmp_path / "copy") as copy:
        table = store.load_leaf_table(copy.lineage)
        reps = set(table.leaf_ids[table.representative].tolist())

        def rerun(**overrides) -> tuple[list[str], list[str]]:
            """(stale representatives before, leaves trained) after base scores + leaf runs with `overrides`."""
            resources = pipeline_resources(copy.root, **overrides)
            r = resources
            stale = driver.stale_harp_leaves(copy.lineage, r["finetuner"], r["evaluator"], r["settings"])
            defs = pipeline_defs(resources)
            # the base scores first (the evaluator or dtype may have changed them), then HARP's leaves
            base = defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=copy.instance, asset_selection=[dg.AssetKey("base_model_scores")])
            assert base.success
            runs = run_leaf_ranges(copy.instance, defs, reps)
            assert all(run.success for run in runs)
            return stale, trained_leaves(runs)

        assert rerun(lora=IRRELEVANT[0], evaluator=IRRELEVANT[1]) == ([], [])
        changes = [{"lora": {f: v}} for f, v in FINETUNER_CHANGES.items() if f != "separator"]
        changes += [{"evaluator": {f: v}} for f, v in EVALUATOR_CHANGES.items() if f not in ("separator", "backend")]
        changes += [{"lora": {"separator": " => "}, "evaluator": {"separator": " => "}},
                    {"device": {"dtype": "bfloat16"}}]
        for change in changes:
            stale, trained = rerun(**change)
            assert sorted(stale) == sorted(trained) == sorted(reps), change
        # vLLM is not installed here: its key still makes every leaf stale, before anything would run
        r = pipeline_resources(copy.root, evaluator={"backend": "vllm"})
        assert sorted(driver.stale_harp_leaves(copy.lineage, r["finetuner"], r["evaluator"], r["settings"])) == sorted(reps)
        # back to the first recipe: its leaves are measured again (the stored ones carry the last change)
        assert rerun()[1] and rerun() == ([], [])


@pytest.mark.slow
def test_another_base_model_or_eval_set_makes_every_measured_leaf_stale(tiny_pipeline, tmp_path):
    """After growth kept every measured leaf, a new base model or an edited eval set still stales them all."""
    import json
    import shutil

    with copy_of(tiny_pipeline, tmp_path / "copy") as copy:
        measured = set(copy.lineage.partition_keys("leaf_utilities"))
        copy.grow()

        def stale_after_prepare(resources: dict) -> list[str]:
            prep = pipeline_defs(resources).resolve_job_def("harp_prepare_job").execute_in_process(
                instance=copy.instance)
            assert prep.success
            r = resources
            return driver.stale_harp_leaves(copy.lineage, r["finetuner"], r["evaluator"], r["settings"])

        assert stale_after_prepare(pipeline_resources(copy.root)) == []  # growth alone: nothing stale
        # another base model: the same weights under another build fingerprint
        other = copy.root / "other_model"
        shutil.copytree(copy.root / "demo" / "base_model", other)
        info = json.loads((other / "harp_build.json").read_text())
        (other / "harp_build.json").write_text(json.dumps({**info, "fingerprint": "another-build"}))
        resources = pipeline_resources(copy.root)
        resources["finetuner"] = FinetunerResource(base_model=str(other), device=DeviceResource(
            device="cpu", cpu_threads=1), **PIPELINE_LORA)
        assert sorted(stale_after_prepare(resources)) == sorted(measured)
        # back to the first model: its leaves are current again; then one eval question edited
        assert stale_after_prepare(pipeline_resources(copy.root)) == []
        eval_path = copy.root / "demo" / "eval.jsonl"
        rows = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
        rows[0]["prompt"] = rows[0]["prompt"] + " (edited)"
        eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert sorted(stale_after_prepare(pipeline_resources(copy.root))) == sorted(measured)
