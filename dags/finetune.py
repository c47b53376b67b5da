"""
### finetune: collect → validate → train → evaluate → register

Fine-tunes a pretrained transformer on a labelled text snapshot and registers it in MLflow.

| task | what it does | writes under `<artifact_root>/runs/<run_id>/` |
|---|---|---|
| `collect` | reads the `source` URIs into a content-addressed Parquet snapshot | `collect/` |
| `validate` | Great Expectations gate; a failure stops the run | `validate/` (Data Docs) |
| `train` | Hugging Face `Trainer` + DeepSpeed ZeRO over `num_processes` | `train/model/` |
| `evaluate` | accuracy, macro-F1, confusion matrix; compares with `champion` | `evaluate/` |
| `register` | MLflow model version, alias `challenger`, `champion` if it wins | `register/` |

Each task runs `finetune <step> --set ...` — the same argv a container would run — through the
launcher chosen by `FINETUNE_LAUNCHER` (default `local`; `kubernetes`: a pod per step;
`pytorchjob`: pods, and training as a multi-node Kubeflow PyTorchJob). Data moves as URIs; XCom carries only
each step's small result JSON. Bad input fails the task without retries; crashes are retried.
Extra settings go in the `overrides` Param as `step.key=value` strings.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, chain, dag, task

from pipeline.config import param_schema
from pipeline.steps import PARAM_KEYS, PIPELINE, STEPS, launcher_from_env, uses_pytorchjob

SCHEDULE = os.environ.get("FINETUNE_SCHEDULE", "@weekly")
LAUNCHER = launcher_from_env()  # read at parse time: it decides which operator each task is

PARAMS = {name: Param(**param_schema(key), title=name) for name, key in PARAM_KEYS.items()}
PARAMS["overrides"] = Param([], type="array", items={"type": "string"}, title="overrides",
                            description="More config overrides as step.key=value, e.g. train.max_seq_len=128.")


def cluster_overrides(step: str, context) -> list[str]:
    """The step's overrides on a cluster: the deployment's YAML (``FINETUNE_K8S_CONFIG``: images,
    namespace, Secret names...) first, so that a run's Params and ``overrides`` still win."""
    from pipeline import steps
    from pipeline.config import file_overrides, safe_run_id

    upstream = {source: context["ti"].xcom_pull(task_ids=source) for source, _ in STEPS[step].inputs.values()}
    path = os.environ.get("FINETUNE_K8S_CONFIG")
    return [*(file_overrides(path) if path else []),
            *steps.step_overrides(step, context["params"], upstream, safe_run_id(context["run_id"]))]


def step_task(step: str):
    """One Airflow task per row of ``pipeline.steps.STEPS``, run by the configured launcher."""
    if uses_pytorchjob(step, LAUNCHER):
        return pytorchjob_task(step)
    if LAUNCHER != "local":
        return pod_task(step)

    @task(task_id=step)
    def launch(**context):
        from airflow.exceptions import AirflowFailException

        from pipeline import steps
        from pipeline.config import safe_run_id
        from pipeline.errors import PipelineError

        upstream = {source: context["ti"].xcom_pull(task_ids=source)
                    for source, _ in STEPS[step].inputs.values()}
        try:
            overrides = steps.step_overrides(step, context["params"], upstream, safe_run_id(context["run_id"]))
            return steps.launch(step, overrides)
        except PipelineError as exc:
            if getattr(exc, "retryable", False):
                raise
            raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help

    return launch()


def pod_task(step: str):
    """The step as one pod. Its argv needs the upstream results, known only at run time, so the
    operator renders the whole pod in ``execute`` with the same ``steps.render`` that
    ``finetune render`` prints (one code path, no Jinja copy of ``step_overrides``), and bad
    input fails the task before anything is submitted."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from pipeline.k8s import RESTRICTED_CONTAINER

    class StepPodOperator(KubernetesPodOperator):
        def execute(self, context):
            from airflow.exceptions import AirflowFailException
            from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

            from pipeline import steps
            from pipeline.errors import PipelineError

            try:
                manifest = steps.render(step, cluster_overrides(step, context), LAUNCHER)
            except PipelineError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help
            self.full_pod_spec = PodGenerator.deserialize_model_dict(manifest)
            self.namespace = manifest["metadata"]["namespace"]
            return super().execute(context)

    # KPO's XCom sidecar must meet the same "restricted" policy as the step container.
    sidecar_security = dict(RESTRICTED_CONTAINER, runAsUser=65534, runAsGroup=65534)
    return StepPodOperator(task_id=step, name=f"finetune-{step}", do_xcom_push=True,
                           xcom_sidecar_container_security_context=sidecar_security,
                           on_finish_action="delete_pod")


def pytorchjob_task(step: str):
    """Training as a PyTorchJob: create it, watch it, delete it unless it succeeded (and on kill).
    Its result comes back as every step's does, from ``<step_uri>/result.json``."""
    from airflow.sdk import BaseOperator

    class PyTorchJobOperator(BaseOperator):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.manifest = None

        def api(self):
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

            return KubernetesHook().custom_object_client

        def execute(self, context):
            from airflow.exceptions import AirflowFailException

            from pipeline import k8s, steps, storage
            from pipeline.cli import step_error
            from pipeline.config import load_config
            from pipeline.errors import PipelineError

            try:
                overrides = cluster_overrides(step, context)
                self.manifest = steps.render(step, overrides, LAUNCHER)
                cfg = load_config(None, overrides)
            except PipelineError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help
            phase = k8s.run_pytorchjob(self.api(), self.manifest, cfg.k8s.job_poll_seconds,
                                       cfg.k8s.job_timeout_seconds, log=self.log.info)
            if phase != "Succeeded":
                error = step_error(cfg.step_uri(step))
                if error is not None:  # the step's own verdict on its input: not retried
                    raise AirflowFailException(f"step '{step}' failed: {error['error']}")
                raise RuntimeError(f"PyTorchJob {self.manifest['metadata']['name']} ended {phase}")
            return storage.read_json(storage.join(cfg.step_uri(step), "result.json"))

        def on_kill(self):
            from pipeline import k8s

            if self.manifest is not None:
                k8s.delete_pytorchjob(self.api(), self.manifest)

    return PyTorchJobOperator(task_id=step)


@dag(
    dag_id="finetune",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["finetune", "mlops", "training"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "owner": "ml-platform"},
    params=PARAMS,
    doc_md=__doc__,
)
def finetune():
    chain(*(step_task(step) for step in PIPELINE))


finetune()
