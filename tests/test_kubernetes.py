"""The Kubernetes side of `training.engine: ray`: the KubeRay RayCluster, the flow pod's work-pool
job template and the deployment that joins them. kubectl itself accepts them (a client-side dry
run against tests/kubeapi.py's discovery server: there is no cluster here), and the fields the
two sides rely on agree: the head service and client port the deployment dials, the token secret
both sides read, one image, GPUs for the workers."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.kubeapi import discovery_server

DEPLOYMENTS = ROOT / "deployments"
KUBECTL = shutil.which("kubectl")


def rendered_flow_job() -> dict:
    """The flow pool's Job as Prefect's Kubernetes worker fills the template in: its variables'
    defaults plus what a flow run adds (name, command, labels)."""
    from prefect.utilities.templating import apply_values

    template = json.loads((DEPLOYMENTS / "flow-pool-kubernetes.json").read_text())
    values = {name: spec["default"] for name, spec in
              template["variables"]["properties"].items() if "default" in spec}
    values.update(name="finetune-retrain-ray", labels={"prefect.io/flow-run-id": "x"},
                  command="prefect flow-run execute")
    return apply_values(template["job_configuration"], values)["job_manifest"]


def kubectl_dry_run(tmp_path, verb: str, *paths) -> subprocess.CompletedProcess:
    with discovery_server() as url:
        config = tmp_path / "kubeconfig"
        config.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "dry",
            "clusters": [{"name": "dry", "cluster": {"server": url}}],
            "users": [{"name": "dry", "user": {"token": "unused"}}],
            "contexts": [{"name": "dry", "context": {"cluster": "dry", "user": "dry",
                                                      "namespace": "default"}}],
        }))
        args = [a for p in paths for a in ("-f", str(p))]
        return subprocess.run(
            [KUBECTL, "--kubeconfig", str(config), verb, "--dry-run=client",
             "--validate=false", *args],
            capture_output=True, text=True, timeout=60,
        )


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_accepts_the_ray_cluster_and_the_flow_pods_job(tmp_path):
    job = tmp_path / "flow-job.json"
    job.write_text(json.dumps(rendered_flow_job()))
    done = kubectl_dry_run(tmp_path, "apply", DEPLOYMENTS / "kuberay-cluster.yaml")
    assert done.returncode == 0, done.stderr
    assert "raycluster.ray.io/squadtune-ray created (dry run)" in done.stdout
    # Prefect's worker creates the Job (a generated name, which `apply` cannot take).
    done = kubectl_dry_run(tmp_path, "create", job)
    assert done.returncode == 0, done.stderr
    assert "job.batch/<unknown> created (dry run)" in done.stdout  # named by the API server
    # The check has teeth: a kind the API does not serve is refused.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text((DEPLOYMENTS / "kuberay-cluster.yaml").read_text().replace(
        "kind: RayCluster", "kind: RayClustr"))
    refused = kubectl_dry_run(tmp_path, "apply", wrong)
    assert refused.returncode != 0 and "RayClustr" in refused.stderr


def test_the_flow_pod_and_the_ray_cluster_agree():
    cluster = yaml.safe_load((DEPLOYMENTS / "kuberay-cluster.yaml").read_text())
    spec = cluster["spec"]
    assert spec["rayVersion"] == importlib.metadata.version("ray"), "client and cluster match"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no training worker on the head"
    (head_container,) = head["template"]["spec"]["containers"]
    assert {"name": "client", "containerPort": 10001} in head_container["ports"]
    (gpu,) = spec["workerGroupSpecs"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] == gpu["replicas"] == gpu["maxReplicas"], "what preflight counts"

    job = rendered_flow_job()
    (flow,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in flow["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (token["name"], token["key"]) == (spec["authOptions"]["secretName"], "auth_token")
    assert flow["image"] == head_container["image"] == worker["image"]
    secrets = [e for e in flow["env"] if "valueFrom" in e]
    assert {e["name"] for e in secrets} >= {"MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"}
    assert all("value" not in e for e in secrets), "secrets come from Kubernetes secrets"


def test_the_ray_deployment_runs_the_retrain_preset_on_the_cluster(monkeypatch):
    from deployments.presets import preset

    prefect_file = yaml.safe_load((DEPLOYMENTS / "prefect-ray.yaml").read_text())
    (step,) = prefect_file["build"]
    arguments = step["deployments.presets.preset"]
    storage = "s3://team-bucket/squadtune"
    overrides = [o.replace("{{ $SQUADTUNE_RAY_STORAGE }}", storage)
                 for o in arguments["overrides"]]
    config = preset(arguments["config"], overrides)["config"]
    ray = config["training"]["ray"]
    cluster = yaml.safe_load((DEPLOYMENTS / "kuberay-cluster.yaml").read_text())
    name = cluster["metadata"]["name"]
    assert config["training"]["engine"] == "ray"
    assert ray["address"] == f"ray://{name}-head-svc:10001"  # KubeRay's head service
    assert ray["storage"] == storage and ray["use_gpu"] is True
    assert ray["num_workers"] <= cluster["spec"]["workerGroupSpecs"][0]["replicas"]
    (deployment,) = prefect_file["deployments"]
    assert deployment["work_pool"]["name"] == "flows-k8s"
    assert deployment["parameters"]["config"] == "{{ retrain-ray.config }}"
    assert os.path.basename(deployment["entrypoint"].split(":")[0]) == "finetune.py"
