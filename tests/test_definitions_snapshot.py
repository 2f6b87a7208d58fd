"""A snapshot of the code location: every asset spec, job, sensor, schedule and check, so graph drift shows in
review. After an intended change, regenerate it with `HARP_UPDATE_SNAPSHOTS=1 make test-fast` and commit the
diff of `tests/snapshots/definitions.json` with the change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from harp_assets.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def _describe(definitions: dg.Definitions) -> dict:
    graph = definitions.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        spec = node.to_asset_spec() if hasattr(node, "to_asset_spec") else None
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": getattr(partitions, "name", None) or (type(partitions).__name__ if partitions else None),
            "kinds": sorted(node.kinds),
            "pools": sorted(getattr(node, "pools", None) or []),
            "backfill_policy": str(node.backfill_policy.policy_type) if node.backfill_policy else None,
            "description": (spec.description if spec is not None else node.description or "").split("\n")[0],
        }
    jobs = {}
    for job in definitions.resolve_all_job_defs():
        if job.name.startswith("__"):
            continue
        jobs[job.name] = sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys)
    sensors = {}
    for sensor in definitions.sensors or []:
        sensors[sensor.name] = {
            "type": type(sensor).__name__,
            "default_status": str(sensor.default_status),
            "targets": sorted(t.job_name for t in sensor.targets) if sensor.targets else [],
            # run-status sensors keep the jobs they watch privately in 1.13; read, never set
            "monitored": sorted(getattr(j, "name", str(j)) for j in getattr(sensor, "_monitored_jobs", None) or []),
            "resources": sorted(sensor.required_resource_keys),
        }
    schedules = {s.name: {"job": s.job_name, "default_status": str(s.default_status),
                          "resources": sorted(s.required_resource_keys)} for s in definitions.schedules or []}
    checks = sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys)
    resources = sorted(definitions.resources or {})
    return {"assets": assets, "jobs": dict(sorted(jobs.items())), "sensors": dict(sorted(sensors.items())),
            "schedules": schedules, "checks": checks, "resources": resources}


def test_definitions_match_the_snapshot():
    got = _describe(defs)
    text = json.dumps(got, indent=2, sort_keys=True) + "\n"
    if os.environ.get("HARP_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.is_file(), f"{SNAPSHOT} is missing: run with HARP_UPDATE_SNAPSHOTS=1 to write it"
    want = json.loads(SNAPSHOT.read_text())
    for part in want:
        assert got[part] == want[part], f"the definitions' {part} differ from {SNAPSHOT.name}"
    assert set(got) == set(want)


def test_every_asset_has_a_group_kinds_and_a_description():
    for name, spec in _describe(defs)["assets"].items():
        assert spec["group"] in {"prepare", "measure", "select", "validation"}, name
        assert spec["kinds"], name
        assert spec["description"], name
