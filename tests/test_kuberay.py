"""deploy/kuberay/rayjob.yaml: it parses, uses only fields KubeRay's RayJob CRD (ray.io/v1) has,
its entrypoint is a valid `orchestrator launch` that continues the run when the job is
re-submitted (run.resume=auto), and the config it mounts loads with our own loader.

The field names are those of KubeRay's Go types (ray-operator/apis/ray/v1: RayJobSpec,
RayClusterSpec, HeadGroupSpec, WorkerGroupSpec); no Kubernetes cluster is needed."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.config import ResumeMode, load_config

REPO = Path(__file__).resolve().parent.parent
RAYJOB = REPO / "deploy" / "kuberay" / "rayjob.yaml"

RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend", "managedBy", "upgradeStrategy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy", "idleTimeoutSeconds", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    loaded = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert len(by_kind) == len(loaded), "one document per kind"
    return by_kind


def unknown(section: dict, allowed: set[str]) -> set[str]:
    assert isinstance(section, dict) and section, section
    return set(section) - allowed


def test_the_rayjob_uses_only_fields_of_kuberays_crd(docs):
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert not unknown(spec, RAYJOB_SPEC), unknown(spec, RAYJOB_SPEC)
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1  # re-submission is the point
    assert isinstance(spec["shutdownAfterJobFinishes"], bool) and isinstance(spec["ttlSecondsAfterFinished"], int)
    assert all(isinstance(v, str) for v in spec["metadata"].values())  # map[string]string
    cluster = spec["rayClusterSpec"]
    assert not unknown(cluster, RAYCLUSTER_SPEC), unknown(cluster, RAYCLUSTER_SPEC)
    head = cluster["headGroupSpec"]
    assert not unknown(head, HEAD_GROUP), unknown(head, HEAD_GROUP)
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert not unknown(group, WORKER_GROUP), unknown(group, WORKER_GROUP)
        assert group["groupName"] and group["template"]["spec"]["containers"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(v, str) for v in params.values()), params  # KubeRay wants strings here
    assert head["rayStartParams"]["num-cpus"] == "0"  # ranks go to the worker pods, not next to the driver


def test_the_entrypoint_is_a_launch_that_continues_a_resubmitted_run(docs, tmp_path):
    job, config_map = docs["RayJob"], docs["ConfigMap"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "orchestrator", argv  # the console script (pyproject's [project.scripts])
    args = cli.parse(argv[1:])
    assert args.command == "launch" and args.config and not args.detach
    assert "run.resume=auto" in args.overrides or args.resume_if_exists

    # the config path is the ConfigMap, mounted into the head pod (where the driver runs)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head["volumes"]}
    config_path = Path(args.config)
    (volume,) = [name for name, path in mounts.items() if Path(path) == config_path.parent]
    assert volumes[volume]["configMap"]["name"] == config_map["metadata"]["name"]
    text = config_map["data"][config_path.name]

    # ... and it is a config our loader accepts, with the entrypoint's overrides
    local = tmp_path / config_path.name
    local.write_text(text)
    cfg = load_config(local, args.overrides)
    assert cfg.run.resume is ResumeMode.AUTO and cfg.run.name == job["spec"]["metadata"]["orchestrator_run_name"]
    # what a re-submitted driver on a new cluster must find again: nothing on the old cluster's disks
    assert cfg.checkpoint.uri.startswith("s3://") and cfg.data.uri.startswith("s3://")
    assert cfg.tracking.uri.startswith(("postgresql://", "http://", "https://"))
    rest = cfg.tracking.uri.split("//", 1)[1]
    userinfo = rest.split("@", 1)[0] if "@" in rest else ""
    assert ":" not in userinfo, cfg.tracking.uri  # no password in it: PGPASSWORD comes from the Secret
