"""Cluster launcher YAMLs (Ray's own schema) and KubeRay manifests (required fields)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_yaml_validates_against_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(cfg))  # raises on any schema violation
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no training or decoding
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert len(workers) == 2 and all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    assert any("pip install" in c for c in cfg["setup_commands"])


def test_cluster_yaml_schema_catches_mistakes():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    cfg["available_node_types"]["gpu.train"]["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(cfg))


def _containers(spec):
    return spec["template"]["spec"]["containers"]


def _check_cluster_spec(spec):
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard not exposed
    assert _containers(head)[0]["image"].startswith("rayproject/ray:2.60.0-py311")
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-train"}
    gpu = _containers(groups["gpu-train"])[0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "8"
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_kuberay_manifests_have_required_fields():
    rc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_cluster_spec(rc["spec"])
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    s = job["spec"]
    assert s["entrypoint"] == "python ray_jobs/train.py --config bioclip2_clap"
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(s["runtimeEnvYAML"])
    assert "working_dir" in env and any(p.startswith("deepspeed==") for p in env["pip"])
    _check_cluster_spec(s["rayClusterSpec"])


def test_rayservice_manifest_is_a_valid_serve_config():
    """The RayService's serveConfigV2 passes Serve's own schema, and its args build a
    ServeConfig (an unknown key would fail at deploy time on the cluster)."""
    from ray.serve.schema import ServeDeploySchema

    from biovita.serve.app import ServeConfig
    from biovita.structured import build

    svc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    app = serve_cfg.applications[0]
    assert app.import_path == "biovita.serve.app:app_builder"
    cfg = build(ServeConfig, app.args)
    assert cfg.autoscaling.max_replicas == 8 and cfg.gpus_per_replica == 1
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups[0]["minReplicas"] <= groups[0]["replicas"] <= groups[0]["maxReplicas"]
