"""Kubernetes manifests for the steps: one Pod per step, or a Kubeflow PyTorchJob for training.

Pure functions from a ``PipelineConfig`` (its ``k8s`` section) and a step's ``--set`` overrides
to plain dicts, so that ``finetune render`` prints exactly what the DAG submits and tests validate
it against the Kubernetes and Kubeflow schemas without a cluster. Secrets are only ever referenced
by name (``envFrom``); no value is rendered.

    finetune render --step train --launcher pytorchjob --set k8s.num_nodes=2

Never imports Airflow; the ``kubernetes`` client is only touched by ``run_pytorchjob``, which
gets an API object from its caller (the DAG task, through the provider's hook).
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import check_fields, option
from pipeline.errors import ConfigError

PULL_POLICIES = ("IfNotPresent", "Always", "Never")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
GPU_RESOURCE = "nvidia.com/gpu"
XCOM_RESULT_FILE = "/airflow/xcom/return.json"  # KubernetesPodOperator reads it through its sidecar
HF_CACHE = "/var/cache/huggingface"
UID = 10001  # the non-root user the step images create
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
QUANTITY = r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?"

# Pod Security Standards "restricted": what the container runtime must enforce for every container.
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class K8sConfig:
    namespace: str = option("finetune", "Namespace the step pods and PyTorchJobs run in.", pattern=DNS_LABEL)
    image: str = option("registry.example.com/finetune/step-cpu:0.1.0",
                        "Image of the CPU steps (docker/step-cpu.Dockerfile); a pinned tag or digest.")
    gpu_image: str = option("registry.example.com/finetune/step-cuda:0.1.0",
                            "Image of the GPU steps (docker/step-cuda.Dockerfile); a pinned tag or digest.")
    image_pull_policy: str = option("IfNotPresent", "Image pull policy of every step container.",
                                    choices=PULL_POLICIES)
    service_account: str = option("finetune-step", "Service account of the step pods (k8s/rbac.yaml); "
                                  "it has no API permissions.", pattern=DNS_SUBDOMAIN)
    settings_configmap: str = option("finetune-settings", "ConfigMap with non-secret settings as env vars "
                                     "(FINETUNE_ARTIFACT_ROOT, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).",
                                     pattern=DNS_SUBDOMAIN)
    aws_secret: str = option("finetune-aws", "Secret with the S3 credentials as env vars "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).", pattern=DNS_SUBDOMAIN)
    mlflow_secret: str = option("finetune-mlflow", "Secret with MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME "
                                "and MLFLOW_TRACKING_PASSWORD.", pattern=DNS_SUBDOMAIN)
    gpu_node_selector: list[str] = option(["nvidia.com/gpu.present=true"],
                                          "Node labels (key=value) a GPU pod must land on.")
    gpu_tolerations: list[str] = option(["nvidia.com/gpu:NoSchedule"],
                                        "Taints GPU pods tolerate: key:Effect or key=value:Effect.")
    gpus_per_node: int = option(1, "GPUs each training pod requests; torchrun starts one process per GPU.",
                                minimum=1, maximum=16)
    max_gpus_per_node: int = option(8, "GPUs on one node of the GPU pool: more per pod can never schedule.",
                                    minimum=1, maximum=16)
    num_nodes: int = option(2, "Training pods of a PyTorchJob (1 Master + num_nodes-1 Workers).",
                            minimum=1, maximum=64)
    training_priority_class: str = option("finetune-training", "PriorityClass of training pods (k8s/).",
                                          pattern=DNS_SUBDOMAIN)
    scratch_size: str = option("20Gi", "Size limit of the /tmp emptyDir (model downloads, staging).",
                               pattern=QUANTITY)
    hf_cache_size: str = option("20Gi", "Size limit of the Hugging Face cache emptyDir.", pattern=QUANTITY)
    job_poll_seconds: int = option(30, "How often the DAG task polls a PyTorchJob's status.", minimum=1, maximum=600)
    job_timeout_seconds: int = option(86400, "A PyTorchJob still running after this is deleted and failed.",
                                      minimum=60, maximum=7 * 86400)

    def __post_init__(self) -> None:
        # Before check_fields: an empty name would otherwise fail with a bare regex message.
        for name in ("aws_secret", "mlflow_secret", "settings_configmap", "service_account"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise ConfigError(f"k8s.{name}: a name is required (the pods read their settings from it)")
        check_fields(self, "k8s.")
        for name in ("image", "gpu_image"):
            check_image(f"k8s.{name}", getattr(self, name))
        if self.gpus_per_node > self.max_gpus_per_node:
            raise ConfigError(f"k8s.gpus_per_node: {self.gpus_per_node} GPUs per pod cannot be scheduled on a "
                              f"node pool of {self.max_gpus_per_node} GPUs per node (k8s.max_gpus_per_node)")
        node_selector(self.gpu_node_selector)
        tolerations(self.gpu_tolerations)


def check_image(name: str, image: str) -> None:
    """An image must be pinned: ``repo:tag`` (not ``latest``) or ``repo@sha256:...``."""
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or not last.split(":", 1)[1]:
        raise ConfigError(f"{name}: {image!r} has no tag; pin a version (name:1.2.3 or name@sha256:...)")
    if last.split(":", 1)[1] == "latest":
        raise ConfigError(f"{name}: {image!r} is tagged ':latest'; pin a version (name:1.2.3 or name@sha256:...)")


def node_selector(items: Sequence[str]) -> dict[str, str]:
    selector = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"k8s.gpu_node_selector: {item!r} is not key=value")
        selector[key] = value
    return selector


def tolerations(items: Sequence[str]) -> list[dict[str, str]]:
    out = []
    for item in items:
        taint, _, effect = item.rpartition(":")
        key, sep, value = taint.partition("=")
        if not key or effect not in TAINT_EFFECTS:
            raise ConfigError(f"k8s.gpu_tolerations: {item!r} is not key[=value]:Effect "
                              f"with Effect one of {list(TAINT_EFFECTS)}")
        toleration = {"key": key, "operator": "Equal" if sep else "Exists", "effect": effect}
        if sep:
            toleration["value"] = value
        out.append(toleration)
    return out


def object_name(prefix: str, run_id: str) -> str:
    """A DNS-1123 name unique per run: run ids hold '_' and upper case, and may be long."""
    readable = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:30].strip("-")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{prefix}-{readable}-{digest}" if readable else f"{prefix}-{digest}"


def container(cfg: Any, step: Any, name: str, command: list[str], args: list[str]) -> dict[str, Any]:
    """The one step container spec, shared by the Pod and every PyTorchJob replica."""
    k = cfg.k8s
    gpus = k.gpus_per_node if step.gpus else 0
    resources: dict[str, Any] = {"requests": {"cpu": step.cpu, "memory": step.memory},
                                 "limits": {"cpu": step.cpu, "memory": step.memory}}
    if gpus:
        resources["requests"][GPU_RESOURCE] = resources["limits"][GPU_RESOURCE] = str(gpus)
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "hf-cache", "mountPath": HF_CACHE}]
    if step.distributed:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})  # NCCL and dataloaders need more than 64Mi
    return {
        "name": name,
        "image": k.gpu_image if gpus else k.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": command,
        "args": args,
        "env": [{"name": "HF_HOME", "value": HF_CACHE}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
        # Settings and credentials by reference only: the manifest never holds a value.
        "envFrom": [{"configMapRef": {"name": k.settings_configmap}},
                    {"secretRef": {"name": k.aws_secret}},
                    {"secretRef": {"name": k.mlflow_secret}}],
        "resources": resources,
        "securityContext": dict(RESTRICTED_CONTAINER, runAsUser=UID, runAsGroup=UID),
        "volumeMounts": mounts,
    }


def pod_spec(cfg: Any, step: Any, main: dict[str, Any], restart_policy: str = "Never") -> dict[str, Any]:
    k = cfg.k8s
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": k.scratch_size}},
               {"name": "hf-cache", "emptyDir": {"sizeLimit": k.hf_cache_size}}]
    if step.distributed:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    spec: dict[str, Any] = {
        "serviceAccountName": k.service_account,
        "automountServiceAccountToken": False,  # steps never talk to the Kubernetes API
        "restartPolicy": restart_policy,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [main],
        "volumes": volumes,
    }
    if step.gpus:
        spec["nodeSelector"] = node_selector(k.gpu_node_selector)
        spec["tolerations"] = tolerations(k.gpu_tolerations)
    if step.distributed:
        spec["priorityClassName"] = k.training_priority_class
    return spec


def labels(step: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "finetune", "app.kubernetes.io/component": step,
            "app.kubernetes.io/part-of": "finetune-pipeline"}


def pod_manifest(cfg: Any, step: Any, step_args: Sequence[str]) -> dict[str, Any]:
    """One Pod running ``step``; ``step_args`` is ``steps.step_argv`` without the program name.

    The step writes its result to ``/airflow/xcom/return.json``; KubernetesPodOperator adds the
    ``xcom`` volume there and its sidecar when it submits the pod.
    """
    args = [*step_args, "--result-file", XCOM_RESULT_FILE]
    if step.distributed:  # as the local launcher, one process per GPU, under torch.distributed.run
        command = ["python", "-m", "torch.distributed.run"]
        args = ["--standalone", f"--nproc_per_node={cfg.k8s.gpus_per_node}", "-m", "pipeline", *args]
    else:
        command = ["finetune"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"finetune-{step.name}", "namespace": cfg.k8s.namespace, "labels": labels(step.name)},
        "spec": pod_spec(cfg, step, container(cfg, step, "base", command, args)),  # KPO's name for it
    }


def pytorchjob_manifest(cfg: Any, step: Any, step_args: Sequence[str]) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: 1 Master and ``num_nodes - 1`` Workers, ``gpus_per_node`` each.

    The Training Operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT and
    PET_NPROC_PER_NODE, which torch.distributed.run reads; the step argv is the local one. Rank 0
    writes the result to ``<artifact_root>/runs/<run_id>/train/result.json`` as it always does.
    """
    k = cfg.k8s
    main = container(cfg, step, "pytorch", ["python", "-m", "torch.distributed.run"],
                     ["-m", "pipeline", *step_args])  # the operator requires the name 'pytorch'

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": labels(step.name)},
                             "spec": pod_spec(cfg, step, copy.deepcopy(main))}}

    replicas = {"Master": replica(1)}
    if k.num_nodes > 1:
        replicas["Worker"] = replica(k.num_nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": object_name(f"finetune-{step.name}", cfg.run_id), "namespace": k.namespace,
                     "labels": labels(step.name)},
        "spec": {
            "nprocPerNode": str(k.gpus_per_node),
            # Retrying is Airflow's job (it counts attempts and tells bad input from crashes).
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "Running",
                          "activeDeadlineSeconds": k.job_timeout_seconds, "ttlSecondsAfterFinished": 86400},
            "pytorchReplicaSpecs": replicas,
        },
    }


# --- submitting a PyTorchJob: create, watch until it ends, delete it when it did not succeed ---

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def job_phase(job: Mapping[str, Any]) -> str | None:
    """'Succeeded' or 'Failed' once the job ended (its last true terminal condition), else None."""
    for condition in reversed(job.get("status", {}).get("conditions") or []):
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"]
    return None


def delete_pytorchjob(api: Any, manifest: Mapping[str, Any]) -> None:
    meta = manifest["metadata"]
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"],
                                            body={"propagationPolicy": "Foreground"})
    except Exception as exc:  # already gone: nothing to clean up
        if getattr(exc, "status", None) != 404:
            raise


def run_pytorchjob(api: Any, manifest: Mapping[str, Any], poll_seconds: float, timeout_seconds: float,
                   sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print) -> str:
    """Create the job with a ``CustomObjectsApi``, poll until it ends and return its final phase.

    Anything but success (a Failed job, a timeout, an interruption) deletes the job, so no GPU
    stays reserved by a run Airflow has given up on.
    """
    meta = manifest["metadata"]
    api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, dict(manifest))
    log(f"created PyTorchJob {meta['namespace']}/{meta['name']}")
    deadline = time.monotonic() + timeout_seconds
    phase = None
    try:
        while phase is None:
            job = api.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])
            phase = job_phase(job)
            if phase is None:
                if time.monotonic() > deadline:
                    phase = "Timeout"
                    break
                sleep(poll_seconds)
        log(f"PyTorchJob {meta['name']}: {phase}")
        return phase
    finally:
        if phase != "Succeeded":
            delete_pytorchjob(api, manifest)


def render_main(argv: Sequence[str] | None) -> int:
    """``finetune render --step S --launcher L [--config F] [--set k=v ...]``: print the manifest as YAML."""
    import argparse
    import sys

    import yaml

    from pipeline import steps

    parser = argparse.ArgumentParser(prog="finetune render", description=render_main.__doc__)
    parser.add_argument("--step", required=True, choices=list(steps.STEPS))
    parser.add_argument("--launcher", required=True, help=f"one of {[n for n in steps.LAUNCHERS if n != 'local']}")
    parser.add_argument("--config", help="YAML config file (sections per step, and k8s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. k8s.num_nodes=4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        from pipeline.config import file_overrides

        overrides = [*(file_overrides(args.config) if args.config else []), *args.overrides]
        manifest = steps.render(args.step, overrides, args.launcher)
    except ConfigError as exc:
        print(f"error: render: {exc}", file=sys.stderr)
        return exc.exit_code
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0
