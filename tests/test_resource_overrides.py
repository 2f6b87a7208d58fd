"""Run config that sets one field of a resource keeps every other configured value (the launchpad case)."""

import dagster as dg
import pytest

from harp.versions import measurement_config
from harp_demo.build import DEMO_LORA
from harp_resources import FinetunerResource, PoolSourceResource, configured, default_resources


@dg.asset
def recipe(finetuner: FinetunerResource, pool_source: PoolSourceResource) -> dict:
    return {**measurement_config(finetuner), "base_model": finetuner.base_model, "pool_path": pool_source.pool_path}


def _run(resources: dict, run_config: dict | None = None) -> dict:
    job = dg.define_asset_job("recipe_job", selection=[recipe])
    defs = dg.Definitions(assets=[recipe], jobs=[job],
                          resources={k: resources[k] for k in ("finetuner", "pool_source")})
    return defs.resolve_job_def("recipe_job").execute_in_process(run_config=run_config or {}).output_for_node("recipe")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("HARP_BASE_MODEL", str(tmp_path / "my_model"))
    monkeypatch.setenv("HARP_POOL", str(tmp_path / "pool"))
    monkeypatch.delenv("HARP_EVAL", raising=False)
    return tmp_path


def test_an_override_changes_only_the_fields_it_names(env):
    resources = default_resources()
    plain = _run(resources)
    assert {k: plain[k] for k in DEMO_LORA} == DEMO_LORA
    assert plain["base_model"] == str(env / "my_model") and plain["pool_path"] == str(env / "pool")
    over = _run(resources, {"resources": {"finetuner": {"config": {"epochs": 3}},
                                          "pool_source": {"config": {"eval_path": "/data/eval.jsonl"}}}})
    assert over == {**plain, "epochs": 3}  # recipe, base model (from HARP_BASE_MODEL) and pool path all kept


def test_configured_keeps_field_metadata_and_values():
    r = configured(FinetunerResource, base_model="m", **DEMO_LORA)
    plain = FinetunerResource(base_model="m", **DEMO_LORA)
    assert measurement_config(r) == measurement_config(plain)  # NOT_MEASUREMENT markers survive the subclass
    assert isinstance(r, FinetunerResource) and type(r).__name__ == "FinetunerResource"


def test_trust_remote_code_cannot_be_turned_on_from_run_config(env, monkeypatch):
    resources = default_resources()
    on = {"resources": {"finetuner": {"config": {"trust_remote_code": True}}}}
    with pytest.raises(dg.DagsterResourceFunctionError) as info:
        _run(resources, on)
    assert isinstance(info.value.__cause__, PermissionError) and "HARP_TRUST_REMOTE_CODE=1" in str(info.value.__cause__)
    monkeypatch.setenv("HARP_TRUST_REMOTE_CODE", "1")  # the deployment opts in
    assert _run(resources, on)["trust_remote_code"] is True
