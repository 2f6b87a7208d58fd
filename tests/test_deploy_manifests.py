"""Every YAML file under deploy/ is validated here, with schemas that come from packages, not from this repo.

- Kubernetes objects (the RayCluster's pod templates, the Job the K8s run launcher renders for a run):
  Kubernetes' own JSON schemas, strict (unknown fields are errors), via `kubernetes-validate`.
- The RayCluster as a whole: Ray's KubeRay autoscaler reads it (`ray.autoscaler._private.kuberay`), which
  also checks the result against Ray's autoscaler schema. The KubeRay CRD itself is not available from a
  package registry, so the RayCluster-only fields are not schema-checked (docs/scale-out.md says so).
- Dagster instance configs: Dagster's instance schema, then each configured class's own config schema
  (QueuedRunCoordinator, K8sRunLauncher from dagster-k8s, the Postgres storage).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
# Instance config -> (GPUs each run pod asks for, HARP_LEAF_BACKEND, the `gpu` pool limit).
INSTANCE_CONFIGS = {
    DEPLOY / "k8s" / "dagster.yaml": ("1", "local", 4),
    DEPLOY / "kuberay" / "dagster.yaml": (None, "ray", 1),
}
# The oldest Kubernetes the manifests claim (docs/scale-out.md) and the newest schema the package carries.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _k8s_valid(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _pod_templates(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: group["template"] for name, group in groups.items()}


def _as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    """A RayCluster group's template is a core/v1 PodTemplateSpec: validate it as a PodTemplate object."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def test_every_deploy_file_is_validated_here():
    shipped = set(DEPLOY.rglob("*.yaml")) | set(DEPLOY.rglob("*.yml"))
    assert shipped == {RAYCLUSTER, *INSTANCE_CONFIGS}, "a YAML file under deploy/ that no test validates"


# -- KubeRay ------------------------------------------------------------------------------------------------


def test_raycluster_pod_templates_match_the_kubernetes_schema():
    cluster = _load(RAYCLUSTER)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    templates = _pod_templates(cluster)
    assert set(templates) == {"head", "gpu"}
    for name, template in templates.items():
        _k8s_valid(_as_pod_template(name, template))


def test_the_schema_check_catches_a_misspelled_pod_field():
    template = copy.deepcopy(_pod_templates(_load(RAYCLUSTER))["gpu"])
    container = template["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_valid(_as_pod_template("gpu", template))


def test_ray_reads_the_raycluster_as_gpu_workers_and_a_head_without_actors():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = _load(RAYCLUSTER)
    config = _derive_autoscaling_config_from_ray_cr(cluster)
    types = config["available_node_types"]
    worker = cluster["spec"]["workerGroupSpecs"][0]
    head_type = config["head_node_type"]
    assert set(types) == {head_type, "gpu"}
    assert types[head_type]["resources"]["CPU"] == 0 and types[head_type]["resources"].get("GPU", 0) == 0
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["CPU"] == 8
    assert types["gpu"]["min_workers"] == types["gpu"]["max_workers"] == worker["replicas"]
    # What the CRD types say and Ray's parser does not check: string-valued rayStartParams, one image
    # everywhere (the Dagster run pods connect with Ray Client, which needs the same Ray and Python).
    for group in [cluster["spec"]["headGroupSpec"], worker]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    images = {c["image"] for t in _pod_templates(cluster).values() for c in t["spec"]["containers"]}
    assert len(images) == 1
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001} in head["ports"]


# -- Dagster instance configs ------------------------------------------------------------------------------------


def _process_class(section: dict[str, Any]) -> dict[str, Any]:
    """The configured class's own config schema applied to its `config` (what the instance does on load)."""
    from dagster._config import process_config
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._serdes import class_from_code_pointer

    cls = class_from_code_pointer(section["module"], section["class"])
    result = process_config(cls.config_type(), section.get("config") or {})
    if not result.success:
        raise DagsterInvalidConfigError(f"{section['class']} config", result.errors, section.get("config"))
    return result.value


def _validate_instance(path: Path) -> dict[str, Any]:
    from dagster._core.instance.config import dagster_instance_config
    from dagster_postgres import DagsterPostgresStorage

    config, _ = dagster_instance_config(str(path.parent), path.name)
    _process_class(config["run_coordinator"])
    _process_class(config["run_launcher"])
    _process_class({"module": DagsterPostgresStorage.__module__, "class": "DagsterPostgresStorage",
                    "config": config["storage"]["postgres"]})
    return config


@pytest.mark.parametrize("path", list(INSTANCE_CONFIGS), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_instance_config_matches_dagster_schemas(path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused")
    _, _, limit = INSTANCE_CONFIGS[path]
    config = _validate_instance(path)
    assert config["concurrency"]["pools"] == {"default_limit": limit, "granularity": "run"}
    assert config["run_launcher"]["class"] == "K8sRunLauncher"


def test_the_instance_check_catches_a_bad_launcher_field(tmp_path, monkeypatch):
    from dagster._core.errors import DagsterInvalidConfigError

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused")
    config = _load(DEPLOY / "k8s" / "dagster.yaml")
    config["run_launcher"]["config"]["run_k8s_config"]["container_conf"] = {}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DagsterInvalidConfigError):
        _validate_instance(tmp_path / "dagster.yaml")


def _rendered_run_job(path: Path, tmp_path: Path) -> dict[str, Any]:
    """The Kubernetes Job the K8s run launcher of `path` creates for a leaf run, as the API would get it."""
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.job import construct_dagster_k8s_job, get_job_name_from_run_id
    from kubernetes.client import ApiClient

    # A kubeconfig that is read but never used: the launcher loads one at start, and nothing is sent.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "users": [{"name": "none", "user": {}}],
    }))
    settings = _process_class(_load(path)["run_launcher"])
    settings.update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    launcher = K8sRunLauncher(**settings, k8s_client_batch_api=object(), k8s_client_core_api=object())
    run = DagsterRun(job_name="leaf_utilities_job", run_id="0123456789abcdef0123456789abcdef")
    context = launcher.get_container_context_for_run(run)
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image="registry.example.com/harp-dagster:0.1.0",
                                              run_launcher=launcher),
        args=["dagster", "api", "execute_run", "{}"],
        job_name=get_job_name_from_run_id(run.run_id),
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": run.job_name, "dagster/run-id": run.run_id},
    )
    return ApiClient().sanitize_for_serialization(job)


@pytest.mark.parametrize("path", list(INSTANCE_CONFIGS), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_run_worker_job_matches_the_kubernetes_schema(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused")
    gpus, backend, _ = INSTANCE_CONFIGS[path]
    job = _rendered_run_job(path, tmp_path)
    _k8s_valid(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HARP_LEAF_BACKEND"] == backend and env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/opt/dagster/dagster_home", "/models", "/data"} <= mounts
    if backend == "ray":
        assert env["HARP_RAY_ADDRESS"].startswith("ray://harp-ray-head-svc.")
