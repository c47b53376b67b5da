"""The manifests: one Pod per step, or training as a Kubeflow PyTorchJob (Training Operator v1)
or TrainJob (Kubeflow Trainer v2, on the ClusterTrainingRuntime in k8s/), with their containers,
resources, labels and deadlines.

Pure functions from a ``PipelineConfig`` (its ``k8s`` section) and a row of the step table
(``steps.STEPS``: name, resources, whether it is distributed) to plain dicts, so that
``finetune render`` prints exactly what the DAG submits and tests validate it against the
Kubernetes and Kubeflow schemas without a cluster. Secrets are only ever referenced by name
(``envFrom``), or by name and key on a TrainJob (``secretKeyRef``); no value is rendered.

    finetune render --step train --launcher trainjob --set k8s.num_nodes=2
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from pipeline.config import PipelineConfig, node_selector, tolerations
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
    """The memory of ``step``'s pods: ``k8s.resources.<step>.memory``, else the step table's."""
    return str(cfg.k8s.resources.get(step.name, {}).get("memory", step.memory))


def processes_per_node(cfg: PipelineConfig) -> int:
    """Training processes in each training pod, one per GPU: ``train.num_processes``, as on the
    local launcher (the trigger form's "Training processes"). ``k8s.gpus_per_node`` may repeat it,
    never contradict it; a node of the GPU pool must hold that many GPUs."""
    k, wanted = cfg.k8s, cfg.train.num_processes
    if k.gpus_per_node and k.gpus_per_node != wanted:
        raise ConfigError(
            f"k8s.gpus_per_node={k.gpus_per_node} disagrees with train.num_processes={wanted}: a "
            "training pod runs one process per GPU; set train.num_processes (k8s.gpus_per_node=0 "
            "follows it)"
        )
    if wanted > k.max_gpus_per_node:
        raise ConfigError(
            f"train.num_processes={wanted}: {wanted} GPUs per training pod cannot be scheduled on a "
            f"node pool of {k.max_gpus_per_node} GPUs per node (k8s.max_gpus_per_node)"
        )
    return wanted


def step_resources(cfg: PipelineConfig, step: Any) -> dict[str, Any]:
    """``step``'s pod resources: its entry in ``k8s.resources`` over the step table's; training's
    GPUs are its processes per node (``processes_per_node``)."""
    own = cfg.k8s.resources.get(step.name, {})
    return {
        "cpu": str(own.get("cpu", step.cpu)),
        "memory": step_memory(cfg, step),
        "gpus": processes_per_node(cfg) if step.gpus else int(own.get("gpus", 0)),
        "node_selector": list(own.get("node_selector", [])),
        "tolerations": list(own.get("tolerations", [])),
    }


def container(cfg: PipelineConfig, step: Any, name: str, command: list[str], args: list[str]) -> dict[str, Any]:
    """The one step container spec, shared by the Pod and every PyTorchJob replica."""
    k = cfg.k8s
    wanted = step_resources(cfg, step)
    gpus, memory = wanted["gpus"], wanted["memory"]
    resources: dict[str, Any] = {
        "requests": {"cpu": wanted["cpu"], "memory": memory},
        "limits": {"cpu": wanted["cpu"], "memory": memory},
    }
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
        # Settings and credentials by reference only: the manifest never holds a value. HF_TOKEN's
        # Secret is optional: only gated or private hub models need it.
        "envFrom": [
            {"configMapRef": {"name": k.settings_configmap}},
            {"secretRef": {"name": k.aws_secret}},
            {"secretRef": {"name": k.mlflow_secret}},
            {"secretRef": {"name": k.hf_secret, "optional": True}},
        ],
        "resources": resources,
        "securityContext": dict(RESTRICTED_CONTAINER, runAsUser=UID, runAsGroup=UID),
        "volumeMounts": mounts,
    }


def deadline_seconds(cfg: PipelineConfig, step: Any, deadline_s: int | None = None) -> int:
    """How long the step's pod or job may run: ``deadline_s`` (the DAG passes the deployment's
    ``timeouts.<step>``), else ``timeouts.<step>`` of ``cfg``."""
    return int(deadline_s if deadline_s is not None else getattr(cfg.timeouts, step.name))


def pod_spec(
    cfg: PipelineConfig, step: Any, main: dict[str, Any], restart_policy: str = "Never", deadline_s: int | None = None
) -> dict[str, Any]:
    k = cfg.k8s
    # HF_HOME on the shared model cache (a ReadWriteMany claim), so a hub model is downloaded once
    # for every pod and run, not by each pod into its own emptyDir.
    hf_cache = (
        {"persistentVolumeClaim": {"claimName": k.model_cache_claim}}
        if k.model_cache_claim
        else {"emptyDir": {"sizeLimit": k.hf_cache_size}}
    )
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": k.scratch_size}}, {"name": "hf-cache", **hf_cache}]
    if step.distributed:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    spec: dict[str, Any] = {
        "serviceAccountName": k.service_account,
        "automountServiceAccountToken": False,  # steps never talk to the Kubernetes API
        "restartPolicy": restart_policy,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [main],
        "volumes": volumes,
    }
    if deadline_s is not None:  # the kubelet kills the pod past it, wherever the Airflow task is
        spec["activeDeadlineSeconds"] = deadline_s
    wanted = step_resources(cfg, step)
    selector = [*(k.gpu_node_selector if wanted["gpus"] else []), *wanted["node_selector"]]
    tolerated = [*(k.gpu_tolerations if wanted["gpus"] else []), *wanted["tolerations"]]
    if selector:
        spec["nodeSelector"] = node_selector(selector)
    if tolerated:
        spec["tolerations"] = tolerations(tolerated)
    if step.distributed:
        spec["priorityClassName"] = k.training_priority_class
        # SIGTERM to SIGKILL: long enough for train's checkpoint on eviction (train.term_grace_s,
        # within torch.distributed.run's own 30 s for its workers), over Kubernetes' default 30 s.
        spec["terminationGracePeriodSeconds"] = TORCHRUN_SHUTDOWN_S + 15
    return spec


def labels(step: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune",
        "app.kubernetes.io/component": step,
        "app.kubernetes.io/part-of": "finetune-pipeline",
    }


def pod_manifest(
    cfg: PipelineConfig, step: Any, step_args: Sequence[str], deadline_s: int | None = None
) -> dict[str, Any]:
    """One Pod running ``step``; ``step_args`` is ``steps.step_argv`` without the program name. It
    runs at most ``deadline_seconds`` (``activeDeadlineSeconds``).

    The step writes its result to ``/airflow/xcom/return.json``; KubernetesPodOperator adds the
    ``xcom`` volume there and its sidecar when it submits the pod.
    """
    args = [*step_args, "--result-file", XCOM_RESULT_FILE]
    if step.distributed:  # as the local launcher, one process per GPU, under torch.distributed.run
        command = ["python", "-m", "torch.distributed.run"]
        args = ["--standalone", f"--nproc_per_node={processes_per_node(cfg)}", "-m", "pipeline", *args]
    else:
        command = ["finetune"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"finetune-{step.name}", "namespace": cfg.k8s.namespace, "labels": labels(step.name)},
        "spec": pod_spec(
            cfg,
            step,
            container(cfg, step, "base", command, args),  # KPO's name for it
            deadline_s=deadline_seconds(cfg, step, deadline_s),
        ),
    }


def torchrun_container(cfg: PipelineConfig, step: Any, name: str, step_args: Sequence[str]) -> dict[str, Any]:
    """The step under torch.distributed.run, which reads PET_NNODES, PET_NODE_RANK,
    PET_MASTER_ADDR/PORT and PET_NPROC_PER_NODE from the operator: a PyTorchJob replica's and a
    TrainJob node's container."""
    return container(cfg, step, name, ["python", "-m", "torch.distributed.run"], ["-m", "pipeline", *step_args])


def job_deadline(cfg: PipelineConfig, step: Any, deadline_s: int | None = None) -> int:
    """How long a PyTorchJob or TrainJob may run: the step's ``deadline_seconds`` and
    ``k8s.job_timeout_seconds``, the smaller."""
    return min(cfg.k8s.job_timeout_seconds, deadline_seconds(cfg, step, deadline_s))


def pytorchjob_manifest(
    cfg: PipelineConfig, step: Any, step_args: Sequence[str], deadline_s: int | None = None
) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob: 1 Master and ``num_nodes - 1`` Workers, ``processes_per_node`` GPUs each.
    The job runs at most the step's ``deadline_seconds`` and ``k8s.job_timeout_seconds``, the smaller.

    The Training Operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT and
    PET_NPROC_PER_NODE, which torch.distributed.run reads; the step argv is the local one. Rank 0
    writes the result to ``<artifact_root>/runs/<run_id>/train/result.json`` as it always does.
    """
    k = cfg.k8s
    main = torchrun_container(cfg, step, "pytorch", step_args)  # the operator requires the name 'pytorch'

    def replica(count: int) -> dict[str, Any]:
        # ExitCode: the operator restarts a pod killed by a signal (exit 128+: preemption, eviction)
        # and leaves exit codes 1-127 -- the step's own verdicts -- to Airflow's retry table.
        return {
            "replicas": count,
            "restartPolicy": "ExitCode",
            "template": {"metadata": {"labels": labels(step.name)}, "spec": pod_spec(cfg, step, copy.deepcopy(main))},
        }

    replicas = {"Master": replica(1)}
    if k.num_nodes > 1:
        replicas["Worker"] = replica(k.num_nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": object_name(f"finetune-{step.name}", cfg.run_id),
            "namespace": k.namespace,
            "labels": labels(step.name),
        },
        "spec": {
            "nprocPerNode": str(processes_per_node(cfg)),
            # Restarts of killed pods are the operator's (k8s.job_restarts); every other retry is
            # Airflow's, which tells bad input from a crash.
            "runPolicy": {
                "backoffLimit": k.job_restarts,
                "cleanPodPolicy": "Running",
                "activeDeadlineSeconds": job_deadline(cfg, step, deadline_s),
                "ttlSecondsAfterFinished": 86400,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


# --- Kubeflow Trainer v2: a TrainJob on the ClusterTrainingRuntime in k8s/trainingruntime.yaml ---

TRAINER_GROUP, TRAINER_VERSION = "trainer.kubeflow.org", "v1alpha1"
# The replicated job and container Trainer's torch plugin fills in (PET_* env, numNodes, the
# TrainJob's image, command, args, env and resources): Trainer v2 names both 'node' and finds the
# job by its ancestor label (kubeflow/trainer pkg/constants, v2.3.0).
TRAINER_NODE, TRAINER_CONTAINER = "node", "node"
TRAINER_ANCESTOR = {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
# Our one entry of the TrainJob's runtimePatches (Trainer v2.2+): patches are keyed by manager.
PATCH_MANAGER = "finetune-pipeline"
# The keys of the deployment's Secrets (k8s/README.md), each referenced on the TrainJob's
# spec.trainer.env: Trainer forbids env (and has no envFrom) in a runtime patch of the 'node'
# container, so a job cannot swap the runtime's envFrom for its deployment's Secret names.
SECRET_KEYS = {
    "aws_secret": (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False)),
    "mlflow_secret": (
        ("MLFLOW_TRACKING_URI", False),
        ("MLFLOW_TRACKING_USERNAME", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
    ),
    "hf_secret": (("HF_TOKEN", True),),
}  # key -> optional (a server without auth, a public base model)


def secret_env(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The deployment's credentials as env by reference (``secretKeyRef``): never a value."""
    return [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {
                    "name": getattr(cfg.k8s, setting),
                    "key": key,
                    **({"optional": True} if optional else {}),
                }
            },
        }
        for setting, keys in SECRET_KEYS.items()
        for key, optional in keys
    ]


def training_runtime_manifest(cfg: PipelineConfig, step: Any) -> dict[str, Any]:
    """The ClusterTrainingRuntime TrainJobs run on (k8s/trainingruntime.yaml is this with the
    shipped defaults; a test keeps them equal): one Indexed Job of ``numNodes`` pods whose pod
    template is a PyTorchJob replica's, restricted, with the deployment's Secrets by name.

    Restarts mirror the PyTorchJob's ``restartPolicy: ExitCode``: a pod that exits 1-127 (the
    step's own verdict) fails the Job at once and Airflow's retry table decides; a pod killed by a
    signal (128 and up: preemption, eviction) is replaced, up to ``k8s.job_restarts`` times.
    Processes per node are each TrainJob's ``spec.trainer.numProcPerNode`` (Trainer v2.2 removed
    the runtime's ``mlPolicy.torch.numProcPerNode``).
    """
    k = cfg.k8s
    trainer = torchrun_container(cfg, step, TRAINER_CONTAINER, [step.name])  # each TrainJob sets its own argv
    node_job = {
        "completionMode": "Indexed",  # PET_NODE_RANK is the pod's completion index
        "backoffLimit": k.job_restarts,
        "activeDeadlineSeconds": k.job_timeout_seconds,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(range(1, 128)),
                    },
                },
            ]
        },
        "template": {"metadata": {"labels": labels(step.name)}, "spec": pod_spec(cfg, step, trainer)},
    }
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "ClusterTrainingRuntime",
        "metadata": {
            "name": k.trainjob_runtime,
            "labels": {**labels(step.name), "trainer.kubeflow.org/framework": "torch"},
        },
        "spec": {
            "mlPolicy": {"numNodes": k.num_nodes, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": {"maxRestarts": 0},  # restarts are the Job's (above), never the step's verdicts
                    "replicatedJobs": [
                        {
                            "name": TRAINER_NODE,
                            "replicas": 1,
                            "template": {
                                "metadata": {"labels": {**labels(step.name), **TRAINER_ANCESTOR}},
                                "spec": node_job,
                            },
                        }
                    ],
                }
            },
        },
    }


def trainjob_manifest(
    cfg: PipelineConfig, step: Any, step_args: Sequence[str], deadline_s: int | None = None
) -> dict[str, Any]:
    """A trainer.kubeflow.org/v1alpha1 TrainJob (Kubeflow Trainer v2.2+) on ``k8s.trainjob_runtime``:
    ``num_nodes`` nodes of ``processes_per_node`` processes each, the step's image, argv, env (the
    deployment's Secrets by key) and resources per node; ``job_deadline`` as its
    ``activeDeadlineSeconds``; the Service account, GPU node labels and taints and our labels as
    one ``runtimePatches`` entry (manager ``PATCH_MANAGER``)."""
    k = cfg.k8s
    main = torchrun_container(cfg, step, TRAINER_CONTAINER, step_args)
    pod = pod_spec(cfg, step, main)
    pod_patch: dict[str, Any] = {"serviceAccountName": pod["serviceAccountName"]}
    if step.gpus:
        pod_patch.update(nodeSelector=pod["nodeSelector"], tolerations=pod["tolerations"])
    meta = {"labels": labels(step.name)}
    node_patch = {
        "name": TRAINER_NODE,
        "template": {"metadata": meta, "spec": {"template": {"metadata": meta, "spec": pod_patch}}},
    }
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": object_name(f"finetune-{step.name}", cfg.run_id),
            "namespace": k.namespace,
            "labels": labels(step.name),
        },
        "spec": {
            "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": "ClusterTrainingRuntime", "name": k.trainjob_runtime},
            "activeDeadlineSeconds": job_deadline(cfg, step, deadline_s),
            "trainer": {
                "image": main["image"],
                "command": main["command"],
                "args": main["args"],
                "env": [*main["env"], *secret_env(cfg)],
                "numNodes": k.num_nodes,
                "numProcPerNode": processes_per_node(cfg),
                "resourcesPerNode": main["resources"],
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"metadata": meta, "spec": {"replicatedJobs": [node_patch]}}},
                }
            ],
        },
    }
