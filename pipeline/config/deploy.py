"""The deployment's settings: how steps are submitted to Kubernetes (``k8s``, rendered by
pipeline/k8s.py), how long each step may run (``timeouts``), and which keys a trigger may set
(``TRIGGER_KEYS``, ``check_trigger``; the values of ``SCOPED_KEYS`` are checked in ``scope``).

    finetune render --step train --launcher pytorchjob --set k8s.num_nodes=2

Foundation layer (the ``config`` package): imports nothing of ours but ``fields`` and ``errors``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

PULL_POLICIES = ("IfNotPresent", "Always", "Never")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
QUANTITY = r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?"
CPU = r"[0-9]+(\.[0-9]+)?m?"


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
            raise ConfigError(
                f"k8s.gpu_tolerations: {item!r} is not key[=value]:Effect with Effect one of {list(TAINT_EFFECTS)}"
            )
        toleration = {"key": key, "operator": "Equal" if sep else "Exists", "effect": effect}
        if sep:
            toleration["value"] = value
        out.append(toleration)
    return out


@dataclass(frozen=True)
class K8sConfig:
    """How steps are submitted to Kubernetes (``k8s.*``): images, names, node placement, pod sizes and
    the training job's shape. None of them is a ``TrainingArguments`` field: torch.distributed.run
    starts ``train.num_processes`` processes per training pod, one per GPU (``k8s.gpus_per_node``
    may repeat that number, never contradict it; ``k8s.num_nodes`` pods for a PyTorchJob or
    TrainJob), and train checks that ``TrainingArguments.world_size`` counts the same."""

    namespace: str = option("finetune", "Namespace the step pods and PyTorchJobs run in.", pattern=DNS_LABEL)
    image: str = option(
        "registry.example.com/finetune/step-cpu:0.1.0",
        "Image of the CPU steps (docker/step-cpu.Dockerfile); a pinned tag or digest.",
    )
    gpu_image: str = option(
        "registry.example.com/finetune/step-cuda:0.1.0",
        "Image of the GPU steps (docker/step-cuda.Dockerfile); a pinned tag or digest.",
    )
    image_pull_policy: str = option("IfNotPresent", "Image pull policy of every step container.", choices=PULL_POLICIES)
    service_account: str = option(
        "finetune-step",
        "Service account of the step pods (k8s/rbac.yaml); it has no API permissions.",
        pattern=DNS_SUBDOMAIN,
    )
    settings_configmap: str = option(
        "finetune-settings",
        "ConfigMap with non-secret settings as env vars "
        "(FINETUNE_ARTIFACT_ROOT, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).",
        pattern=DNS_SUBDOMAIN,
    )
    aws_secret: str = option(
        "finetune-aws",
        "Secret with the S3 credentials as env vars (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).",
        pattern=DNS_SUBDOMAIN,
    )
    mlflow_secret: str = option(
        "finetune-mlflow",
        "Secret with MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.",
        pattern=DNS_SUBDOMAIN,
    )
    hf_secret: str = option(
        "finetune-hf",
        "Secret with HF_TOKEN (gated or private hub models); optional: pods start without it.",
        pattern=DNS_SUBDOMAIN,
    )
    gpu_node_selector: list[str] = option(
        ["nvidia.com/gpu.present=true"], "Node labels (key=value) a GPU pod must land on."
    )
    gpu_tolerations: list[str] = option(
        ["nvidia.com/gpu:NoSchedule"], "Taints GPU pods tolerate: key:Effect or key=value:Effect."
    )
    gpus_per_node: int = option(
        0,
        "GPUs each training pod requests, one process each: train.num_processes, which this may "
        "repeat but not contradict (0: follow it).",
        minimum=0,
        maximum=16,
    )
    max_gpus_per_node: int = option(
        8, "GPUs on one node of the GPU pool: more per pod can never schedule.", minimum=1, maximum=16
    )
    num_nodes: int = option(2, "Training pods of a PyTorchJob (1 Master + num_nodes-1 Workers).", minimum=1, maximum=64)
    training_priority_class: str = option(
        "finetune-training", "PriorityClass of training pods (k8s/).", pattern=DNS_SUBDOMAIN
    )
    scratch_size: str = option("20Gi", "Size limit of the /tmp emptyDir (model downloads, staging).", pattern=QUANTITY)
    model_cache_claim: str = option(
        "finetune-model-cache",
        "PersistentVolumeClaim (ReadWriteMany, k8s/model-cache.yaml) every step pod mounts at HF_HOME, so "
        "a hub model is downloaded once, not per pod; '' gives each pod an emptyDir (k8s.hf_cache_size).",
        pattern=f"(?:{DNS_SUBDOMAIN})?",
    )
    hf_cache_size: str = option(
        "20Gi", "Size limit of the Hugging Face cache emptyDir (k8s.model_cache_claim='').", pattern=QUANTITY
    )
    job_poll_seconds: int = option(
        30,
        "How often the DAG task polls a PyTorchJob's or TrainJob's status and "
        "passes on its rank-0 pod's new log lines.",
        minimum=1,
        maximum=600,
    )
    job_timeout_seconds: int = option(
        86400,
        "A PyTorchJob or TrainJob still running after this is deleted and "
        "failed (a TrainJob's runtime stops its pods then too).",
        minimum=60,
        maximum=7 * 86400,
    )
    trainjob_runtime: str = option(
        "finetune-torch-distributed",
        "ClusterTrainingRuntime a TrainJob runs on (k8s/trainingruntime.yaml; launcher trainjob).",
        pattern=DNS_SUBDOMAIN,
    )
    job_restarts: int = option(
        3,
        "Times a PyTorchJob's or TrainJob's pods that were killed are restarted "
        "(a preempted or evicted node: exit code 128 and up); a step's own verdict "
        "(exit 1-127) is never restarted there, Airflow's retries decide.",
        minimum=0,
        maximum=100,
    )
    memory: list[str] = option(
        [],
        "Deprecated and refused when set: a step's memory is "
        "k8s.resources.<step>.memory, e.g. {train: {memory: 16Gi}}.",
    )
    resources: dict[str, Any] = option(
        {},
        "Per step: cpu, memory, gpus, node_selector (['key=value']) and "
        "tolerations (['key:Effect']) of its pods, e.g. {evaluate: {gpus: 1, "
        "memory: 16Gi}}; a step not listed gets the step table's. train's GPUs "
        "per pod are train.num_processes.",
    )

    def __post_init__(self) -> None:
        # Before check_fields: an empty name would otherwise fail with a bare regex message.
        for name in ("aws_secret", "mlflow_secret", "hf_secret", "settings_configmap", "service_account"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise ConfigError(f"k8s.{name}: a name is required (the pods read their settings from it)")
        check_fields(self, "k8s.")
        for name in ("image", "gpu_image"):
            check_image(f"k8s.{name}", getattr(self, name))
        if self.gpus_per_node > self.max_gpus_per_node:
            raise ConfigError(
                f"k8s.gpus_per_node: {self.gpus_per_node} GPUs per pod cannot be scheduled on a "
                f"node pool of {self.max_gpus_per_node} GPUs per node (k8s.max_gpus_per_node)"
            )
        node_selector(self.gpu_node_selector)
        tolerations(self.gpu_tolerations)
        refuse_memory_list(self.memory)
        check_step_resources(self.resources, self.max_gpus_per_node)


RESOURCE_KEYS = ("cpu", "memory", "gpus", "node_selector", "tolerations")


def refuse_memory_list(memory: Sequence[str]) -> None:
    """``k8s.memory`` (``['train=16Gi']``) was a second knob for ``k8s.resources.<step>.memory``:
    refused, naming the keys to set instead and the ``k8s.resources`` value that sets them."""
    if not memory:
        return
    wanted = {}
    for item in memory:
        step, sep, quantity = str(item).partition("=")
        if sep and step.strip() and quantity.strip():
            wanted[step.strip()] = {"memory": quantity.strip()}
    wanted = wanted or {"train": {"memory": "16Gi"}}
    keys = ", ".join(f"k8s.resources.{step}.memory" for step in wanted)
    raise ConfigError(
        f"k8s.memory is replaced by k8s.resources: set {keys} instead, e.g. "
        f"k8s.resources={json.dumps(wanted)} (with any other steps' k8s.resources entries)"
    )


def check_step_resources(resources: Mapping[str, Any], max_gpus: int) -> None:
    """``k8s.resources``: known steps and keys, Kubernetes quantities, GPUs a node of the pool can hold."""
    for step, own in resources.items():
        where = f"k8s.resources.{step}"
        if step not in STEP_NAMES:
            raise ConfigError(f"{where}: no step '{step}'; steps are {list(STEP_NAMES)}")
        if not isinstance(own, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {list(RESOURCE_KEYS)}, got {own!r}")
        for key, value in own.items():
            if key not in RESOURCE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown; a step's resources are {list(RESOURCE_KEYS)}")
            if key in ("cpu", "memory") and not re.fullmatch(CPU if key == "cpu" else QUANTITY, str(value)):
                raise ConfigError(
                    f"{where}.{key}: {value!r} is not a Kubernetes quantity (e.g. "
                    f"{'2 or 500m' if key == 'cpu' else '16Gi'})"
                )
        gpus = own.get("gpus", 0)
        if step == "train" and "gpus" in own:
            raise ConfigError(
                f"{where}.gpus: train's GPUs per pod are train.num_processes (torchrun starts one "
                "process per GPU); set that instead"
            )
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ConfigError(f"{where}.gpus: {gpus!r} is not a whole number of GPUs")
        if gpus > max_gpus:
            raise ConfigError(
                f"{where}.gpus: {gpus} GPUs per pod cannot be scheduled on a node pool of {max_gpus} "
                "GPUs per node (k8s.max_gpus_per_node)"
            )
        node_selector(own.get("node_selector", []))
        tolerations(own.get("tolerations", []))


# --- timeouts ---------------------------------------------------------------------------------


# How long one attempt of each step may run, the deployment's setting (its config file,
# FINETUNE_CONFIG): the Airflow task's execution_timeout, the local launcher's kill of the step's
# process group and the pod's activeDeadlineSeconds all come from it. Not in TRIGGER_KEYS, and the
# DAG reads it from the deployment's config alone, so a trigger can never lift it.
@dataclass(frozen=True)
class TimeoutsConfig:
    """Seconds one attempt of each step may run (``timeouts.*``). None of them is a
    ``TrainingArguments`` field."""

    collect: int = option(
        1800, "Seconds one attempt of collect may run before it is killed.", minimum=10, maximum=7 * 86400
    )
    validate: int = option(
        1800, "Seconds one attempt of validate may run before it is killed.", minimum=10, maximum=7 * 86400
    )
    train: int = option(
        6 * 3600,
        "Seconds one attempt of train may run before it is killed (all its processes).",
        minimum=10,
        maximum=7 * 86400,
    )
    evaluate: int = option(
        3600, "Seconds one attempt of evaluate may run before it is killed.", minimum=10, maximum=7 * 86400
    )
    register: int = option(
        1800, "Seconds one attempt of register may run before it is killed.", minimum=10, maximum=7 * 86400
    )
    promote: int = option(
        900,
        "Seconds one attempt of promote may run before it is killed (it waits up to "
        "promote.lock_wait_s for the registry lock).",
        minimum=10,
        maximum=7 * 86400,
    )
    aliases: int = option(
        300, "Seconds one attempt of aliases (the check of the registry's aliases) may run.", minimum=10, maximum=86400
    )
    kill_grace_s: int = option(
        30,
        "Seconds a step killed for its timeout or by Airflow gets between SIGTERM and "
        "SIGKILL of its whole process group.",
        minimum=1,
        maximum=600,
    )

    def __post_init__(self) -> None:
        check_fields(self, "timeouts.")


# The steps: one field of the timeouts section each, in the step table's order. The step table
# (pipeline/steps.py, above this layer) checks at import that its rows are these steps, so a new
# step is its row there and its timeout here; k8s.resources and timeouts.<step> then know it.
NOT_STEPS = ("kill_grace_s",)
STEP_NAMES = tuple(item.name for item in dataclasses.fields(TimeoutsConfig) if item.name not in NOT_STEPS)


# --- what a trigger may set -------------------------------------------------------------------

# What a trigger sends (the trigger form's Params, the REST API's conf, the `overrides` Param,
# `finetune run --set`) is untrusted; what the deployment configures (its environment, the config
# file FINETUNE_CONFIG names, `finetune run --config FILE`) is trusted and says, in trigger_keys,
# which keys a trigger may set. The default: data and training choices. Never a key that moves
# the promotion gate or where artifacts and images come from (k8s.*, artifact_root,
# evaluate.gate_metric / metric_direction / thresholds / promotion_margin), nor the data gate's
# settings (validate.*): those belong to whoever runs the deployment. Which sources and which
# registered model a trigger may name is scoped by value instead (SCOPED_KEYS below).
TRIGGER_KEYS = (
    "task",
    "base_model",
    "seed",
    "collect.text_column",
    "collect.label_column",
    "train.epochs",
    "train.learning_rate",
    "train.batch_size",
    "train.gradient_accumulation_steps",
    "train.max_seq_len",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.zero_stage",
    "train.num_processes",
    "train.logging_steps",
    "train.precision",
    "train.offload_optimizer",
    "train.offload_params",
    "train.chat_template",
    "train.overlong",
    "train.packing",
    "train.lora_*",
    "train.eval_steps",
    "train.early_stopping_patience",
    "train.trainer_args",
    "train.model_kwargs",
    "train.extend_vocab*",
    "evaluate.batch_size",
    "evaluate.max_seq_len",
    "evaluate.generate_rows",
    "evaluate.max_new_tokens",
    "promote.version",
    "promote.target_alias",
    "promote.reason",
    "promote.force",
)
# Keys a trigger may always set, but only to values the deployment's key beside them scopes
# (pipeline/config/scope.py): the sources collect reads, the registered model a run aims at.
SCOPED_KEYS = {"collect.sources": "collect.allowed_sources", "model_name": "allowed_model_names"}
# Keys a trigger may always set, whatever trigger_keys say, but only to turn something off:
# `evaluate.promote=false` (`finetune run --no-promote`, the finetune DAG's `promote` Param) makes
# a smoke run that never moves champion. Turning one on where the deployment's config turned it
# off is refused: a trigger can keep a version from champion, never push one there.
OFF_ONLY_KEYS = ("evaluate.promote",)
# Set by the deployment alone, even where its trigger_keys would match them (`collect.*`).
NEVER_FROM_A_TRIGGER = (
    "trigger_keys",
    "allowed_model_names",
    "collect.allowed_sources",
    "collect.allowed_hosts",
    "evaluate.reference_sets",  # the deployment's own rows, and its bars on them (pipeline/evaluate/reference.py)
    "evaluate.reference_thresholds",
    "evaluate.max_reference_regression",
    # The approval gate (pipeline/config/registry.py): whether a person is asked, who, for how long,
    # and the answer itself, which the finetune DAG's promote task sets from the approval task alone.
    "promote.require_approval",
    "promote.approvers",
    "promote.approval_timeout",
    "promote.approval",
)


def check_trigger(
    overrides: Sequence[str],
    allowed: Sequence[str],
    origin: str = "DAG run conf",
    sent: Any = None,
    deployment: Any = None,
) -> None:
    """Refuse any ``key=value`` of ``overrides`` (what a trigger sent) whose key no pattern of
    ``allowed`` (the deployment's ``trigger_keys``) matches, naming the key and the setting. A key
    of ``SCOPED_KEYS`` passes here: its value is checked against the deployment's scope. A key of
    ``OFF_ONLY_KEYS`` passes unless the trigger turns on what the deployment's config (``deployment``)
    turned off, judged by its value in the config built with the trigger's overrides (``sent``);
    without those two configs it is held to ``allowed`` like any key."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in SCOPED_KEYS:
            continue
        if key in OFF_ONLY_KEYS and sent is not None and deployment is not None:
            if _value(sent, key) and not _value(deployment, key):
                raise ConfigError(
                    f"{origin}: '{key}' is false in the deployment's config; a trigger may turn it off, never on"
                )
            continue
        if key in NEVER_FROM_A_TRIGGER or not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed):
            raise ConfigError(
                f"{origin}: '{key}' may not be set by a trigger (the trigger form, the REST API, the overrides Param "
                f"or `finetune run --set`); the deployment allows it by adding it to trigger_keys in its config "
                f"file (FINETUNE_CONFIG, or `finetune run --config FILE`)"
            )


def _value(cfg: Any, key: str) -> Any:
    """The value of a dotted ``section.name`` key of a ``PipelineConfig``."""
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)
