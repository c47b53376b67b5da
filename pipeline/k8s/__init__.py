"""Kubernetes for the steps: their manifests, one Pod per step or training as a Kubeflow PyTorchJob
(Training Operator v1) or TrainJob (Kubeflow Trainer v2, on the ClusterTrainingRuntime in k8s/),
and the watch of a submitted job.

    finetune render --step train --launcher trainjob --set k8s.num_nodes=2

``manifests`` builds them: pure functions from a ``PipelineConfig`` (its ``k8s`` section) and a row
of the step table to plain dicts, so that ``finetune render`` prints exactly what the DAG submits.
``jobs`` submits a PyTorchJob or TrainJob, watches it until it ends and follows its rank-0 pod's
log (``run_job``, ``MasterLog``, ``JOB_APIS``). This module re-exports what the step table and the
DAG's operators use.

Launching layer, below ``steps``: never imports Airflow; the ``kubernetes`` client is only touched
by ``run_job`` and ``MasterLog``, which get API objects from their caller (the DAG task, through
the provider's hook).
"""

from __future__ import annotations

from pipeline.k8s.jobs import JOB_APIS, JobApi, MasterLog, delete_job, job_deadline_seconds, job_phase, run_job
from pipeline.k8s.manifests import (
    RESTRICTED_CONTAINER,
    TRAINER_CONTAINER,
    TRAINER_NODE,
    pod_manifest,
    pytorchjob_manifest,
    step_memory,
    training_runtime_manifest,
    trainjob_manifest,
)

__all__ = [
    "JOB_APIS",
    "RESTRICTED_CONTAINER",
    "TRAINER_CONTAINER",
    "TRAINER_NODE",
    "JobApi",
    "MasterLog",
    "delete_job",
    "job_deadline_seconds",
    "job_phase",
    "pod_manifest",
    "pytorchjob_manifest",
    "run_job",
    "step_memory",
    "training_runtime_manifest",
    "trainjob_manifest",
]
