"""Checks of Kubernetes manifests that the k8s and DAG tests share: schema validation against
real Kubernetes versions, Pod Security "restricted", pinned images; and a custom-objects API in memory."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

K8S_VERSIONS = ("1.31", kubernetes_validate.latest_version())  # oldest cluster we target, newest shipped
RUN = ["run_id=scheduled__2026-01-05T00_00_00_00_00", 'train.snapshot_uri="s3://b/snap/data.parquet"']
SAFE_VOLUME_KINDS = {
    "emptyDir",
    "secret",
    "configMap",
    "projected",
    "downwardAPI",
    "persistentVolumeClaim",
    "ephemeral",
    "csi",
}


def manifests_in(directory: Path) -> list[dict]:
    return [
        doc
        for path in sorted(directory.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def validate_core(obj: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def pod_specs(obj: dict) -> list[dict]:
    """Every pod spec an object would create."""
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    if obj["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return []


def restricted_violations(spec: dict) -> list[str]:
    """The Pod Security Standards "restricted" profile (v1.31), checked field by field."""
    bad = []
    pod_sc = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad.append(flag)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= SAFE_VOLUME_KINDS:
            bad.append(f"volume {volume['name']}: {kinds}")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad.append(f"{c['name']}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{c['name']}: runAsUser 0")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{c['name']}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']}: adds capabilities")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{c['name']}: seccompProfile {seccomp}")
        if c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
            bad.append(f"{c['name']}: hostPort")
    return bad


def images(spec: dict) -> list[str]:
    return [c["image"] for c in spec.get("initContainers", []) + spec["containers"]]


# --- a cluster's custom-objects API in memory, for the PyTorchJob loop and its DAG task ---


class ApiError(Exception):
    """The kubernetes client's ApiException as the loop reads it: a ``status``."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


class InMemoryCustomObjects:
    """The four CustomObjectsApi calls the loop makes, over a dict; the job's conditions are
    scripted per poll, as the Training Operator would set them."""

    def __init__(self, conditions_per_poll):
        self.objects, self.polls, self.deleted = {}, list(conditions_per_poll), []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if (namespace, body["metadata"]["name"]) in self.objects:
            raise ApiError(409, "AlreadyExists")  # what the API server answers for a taken name
        self.objects[(namespace, body["metadata"]["name"])] = body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if (namespace, name) not in self.objects:
            raise ApiError(404, "NotFound")
        job = self.objects[(namespace, name)]
        job["status"] = {"conditions": self.polls.pop(0) if self.polls else []}
        return job

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.deleted.append(name)
        del self.objects[(namespace, name)]
