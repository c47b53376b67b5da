"""Kubernetes manifests for the steps: one Pod per step, or a Kubeflow PyTorchJob for training.

Pure functions from a ``PipelineConfig`` (its ``k8s`` section) and a row of the step table
(``steps.STEPS``: name, resources, whether it is distributed) to plain dicts, so that
``finetune render`` prints exactly what the DAG submits and tests validate it against the
Kubernetes and Kubeflow schemas without a cluster. Secrets are only ever referenced by name
(``envFrom``); no value is rendered.

    finetune render --step train --launcher pytorchjob --set k8s.num_nodes=2

Launching layer, below ``steps``: never imports Airflow; the ``kubernetes`` client is only touched
by ``run_pytorchjob``, which gets an API object from its caller (the DAG task, through the
provider's hook).
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.config import QUANTITY, PipelineConfig, node_selector, tolerations
from pipeline.errors import ConfigError

GPU_RESOURCE = "nvidia.com/gpu"
XCOM_RESULT_FILE = "/airflow/xcom/return.json"  # KubernetesPodOperator reads it through its sidecar
HF_CACHE = "/var/cache/huggingface"
UID = 10001  # the non-root user the step images create

# Pod Security Standards "restricted": what the container runtime must enforce for every container.
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


TORCHRUN_SHUTDOWN_S = 30  # torch.distributed.run: SIGTERM to its workers, SIGKILL 30 s later


def object_name(prefix: str, run_id: str) -> str:
    """A DNS-1123 name unique per run: run ids hold '_' and upper case, and may be long."""
    readable = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:30].strip("-")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{prefix}-{readable}-{digest}" if readable else f"{prefix}-{digest}"


def step_memory(cfg: PipelineConfig, step: Any) -> str:
    """The memory of ``step``'s pods: its entry in ``k8s.memory`` (``step=quantity``), else the
    step table's."""
    memory = step.memory
    for item in cfg.k8s.memory:
        name, sep, quantity = item.partition("=")
        if not sep or not re.fullmatch(QUANTITY, quantity.strip()):
            raise ConfigError(f"k8s.memory: {item!r} is not step=quantity, e.g. 'train=16Gi'")
        if name.strip() == step.name:
            memory = quantity.strip()
    return memory


def container(cfg: PipelineConfig, step: Any, name: str, command: list[str], args: list[str]) -> dict[str, Any]:
    """The one step container spec, shared by the Pod and every PyTorchJob replica."""
    k = cfg.k8s
    gpus = k.gpus_per_node if step.gpus else 0
    memory = step_memory(cfg, step)
    resources: dict[str, Any] = {"requests": {"cpu": step.cpu, "memory": memory},
                                 "limits": {"cpu": step.cpu, "memory": memory}}
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


def deadline_seconds(cfg: PipelineConfig, step: Any, deadline_s: int | None = None) -> int:
    """How long the step's pod or job may run: ``deadline_s`` (the DAG passes the deployment's
    ``timeouts.<step>``), else ``timeouts.<step>`` of ``cfg``."""
    return int(deadline_s if deadline_s is not None else getattr(cfg.timeouts, step.name))


def pod_spec(cfg: PipelineConfig, step: Any, main: dict[str, Any], restart_policy: str = "Never",
             deadline_s: int | None = None) -> dict[str, Any]:
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
    if deadline_s is not None:  # the kubelet kills the pod past it, wherever the Airflow task is
        spec["activeDeadlineSeconds"] = deadline_s
    if step.gpus:
        spec["nodeSelector"] = node_selector(k.gpu_node_selector)
        spec["tolerations"] = tolerations(k.gpu_tolerations)
    if step.distributed:
        spec["priorityClassName"] = k.training_priority_class
        # SIGTERM to SIGKILL: long enough for train's checkpoint on eviction (train.term_grace_s,
        # within torch.distributed.run's own 30 s for its workers), over Kubernetes' default 30 s.
        spec["terminationGracePeriodSeconds"] = TORCHRUN_SHUTDOWN_S + 15
    return spec


def labels(step: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "finetune", "app.kubernetes.io/component": step,
            "app.kubernetes.io/part-of": "finetune-pipeline"}


def pod_manifest(cfg: PipelineConfig, step: Any, step_args: Sequence[str], deadline_s: int | None = None
                 ) -> dict[str, Any]:
    """One Pod running ``step``; ``step_args`` is ``steps.step_argv`` without the program name. It
    runs at most ``deadline_seconds`` (``activeDeadlineSeconds``).

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
        "spec": pod_spec(cfg, step, container(cfg, step, "base", command, args),  # KPO's name for it
                         deadline_s=deadline_seconds(cfg, step, deadline_s)),
    }


def pytorchjob_manifest(cfg: PipelineConfig, step: Any, step_args: Sequence[str], deadline_s: int | None = None
                        ) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: 1 Master and ``num_nodes - 1`` Workers, ``gpus_per_node`` each.
    The job runs at most the step's ``deadline_seconds`` and ``k8s.job_timeout_seconds``, the smaller.

    The Training Operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT and
    PET_NPROC_PER_NODE, which torch.distributed.run reads; the step argv is the local one. Rank 0
    writes the result to ``<artifact_root>/runs/<run_id>/train/result.json`` as it always does.
    """
    k = cfg.k8s
    main = container(cfg, step, "pytorch", ["python", "-m", "torch.distributed.run"],
                     ["-m", "pipeline", *step_args])  # the operator requires the name 'pytorch'

    def replica(count: int) -> dict[str, Any]:
        # ExitCode: the operator restarts a pod killed by a signal (exit 128+: preemption, eviction)
        # and leaves exit codes 1-127 -- the step's own verdicts -- to Airflow's retry table.
        return {"replicas": count, "restartPolicy": "ExitCode",
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
            # Restarts of killed pods are the operator's (k8s.job_restarts); every other retry is
            # Airflow's, which tells bad input from a crash.
            "runPolicy": {"backoffLimit": k.job_restarts, "cleanPodPolicy": "Running",
                          "activeDeadlineSeconds": min(k.job_timeout_seconds, deadline_seconds(cfg, step, deadline_s)),
                          "ttlSecondsAfterFinished": 86400},
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


def _exists(api: Any, meta: Mapping[str, Any]) -> bool:
    try:
        api.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])
        return True
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return False
        raise


def run_pytorchjob(api: Any, manifest: Mapping[str, Any], poll_seconds: float, timeout_seconds: float,
                   sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print) -> str:
    """Create the job with a ``CustomObjectsApi``, poll until it ends and return its final phase.

    Anything but success (a Failed job, a timeout, an interruption) deletes the job, so no GPU
    stays reserved by a run Airflow has given up on.
    """
    meta = manifest["metadata"]
    deadline = time.monotonic() + timeout_seconds
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, dict(manifest))
    except Exception as exc:
        if getattr(exc, "status", None) != 409:
            raise
        # An earlier attempt of this task left its job (a succeeded job is kept a day; a cleared
        # task runs again): replace it rather than fail on the name.
        log(f"replacing PyTorchJob {meta['namespace']}/{meta['name']} left by an earlier attempt")
        delete_pytorchjob(api, manifest)
        while _exists(api, meta):
            if time.monotonic() > deadline:
                return "Timeout"
            sleep(poll_seconds)
        api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, dict(manifest))
    log(f"created PyTorchJob {meta['namespace']}/{meta['name']}")
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

