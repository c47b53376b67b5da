"""The operators of the cluster launchers: a step as one pod (``StepPodOperator``, every step
under ``kubernetes``, every step but training under ``pytorchjob`` and ``trainjob``) and training
as a Kubeflow job (``PyTorchJobOperator``, ``TrainJobOperator``). Each renders its manifest in
``execute`` with the same ``pipeline.steps.render`` that ``finetune render`` prints, and a failed
step is judged by the retry table from its own error.json (``task_exception``).

Not a DAG file (``.airflowignore``). It imports the cncf.kubernetes provider (most of a second),
so the task factory (``finetune_tasks.step_task``) imports it only for a cluster launcher; a DAG
under the ``local`` launcher never pays for it.

    python -c "import sys; sys.path.insert(0, 'dags'); import finetune_k8s_operators as o; print(o.TrainJobOperator(task_id='train', step='train').kind)"
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
from airflow.sdk import BaseOperator
from finetune_operators import run_overrides

from pipeline import k8s, steps, storage
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.steps import JOB_LAUNCHERS, STEPS

# The task_state_store key under which a job operator records the job it created (kind,
# namespace, name, uid) for the next try of its task instance. Renaming it strands in-flight retries.
JOB_STATE_KEY = "kubeflow_job"

# KPO's XCom sidecar must meet the same "restricted" policy as the step container.
XCOM_SIDECAR_SECURITY = dict(k8s.RESTRICTED_CONTAINER, runAsUser=65534, runAsGroup=65534)


def task_exception(
    step: str, launcher: str, cfg: PipelineConfig, exit_code: int | None, detail: str, oom: bool | None = None
) -> steps.StepFailed:
    """What the task raises for a step whose pod, PyTorchJob or TrainJob failed: the step's own
    error.json when it wrote one, else the exit code, classified by the retry table
    (``steps.classify_failure``) into a ``StepFailed`` that the DAGs' retry policy
    (``finetune_operators.RetryTable``) fails at once when retrying cannot help (bad input 2,
    failed gate 3, out of memory 137) and retries otherwise."""
    try:
        error = steps.step_error(cfg.step_uri(step))
    except PipelineError as exc:  # the artifact store is failing too: say so, and let it retry
        error, detail = None, f"{detail}; its error.json could not be read: {exc}"
    failure = steps.classify_failure(
        step, launcher, exit_code, error, memory=k8s.step_memory(cfg, STEPS[step]), detail=detail, oom=oom
    )
    return failure


def pod_exit(pod: Any) -> tuple[int | None, bool]:
    """The exit code of a finished pod's step container (``base``) and whether the kubelet killed
    it for memory (OOMKilled); ``TIMEOUT_EXIT_CODE`` when the pod ran past its activeDeadlineSeconds;
    None when it never ran to an end (image pull, eviction)."""
    if pod is None or pod.status is None:
        return None, False
    if pod.status.reason == "DeadlineExceeded":
        return steps.TIMEOUT_EXIT_CODE, False
    for status in pod.status.container_statuses or []:
        if status.name == "base" and status.state is not None and status.state.terminated is not None:
            terminated = status.state.terminated
            return terminated.exit_code, terminated.reason == "OOMKilled"
    return None, False


class StepPodOperator(KubernetesPodOperator):
    """Run one step as one pod and return its result JSON (the XCom sidecar's).

    The step's argv needs the upstream results, known only at run time, so ``execute`` renders
    the whole pod with ``steps.render`` (one code path, no Jinja copy of ``step_overrides``): bad
    input fails the task before anything is submitted. The pod runs at most ``timeouts.<step>`` of
    the deployment's config (``activeDeadlineSeconds``) and is deleted when it ends, and on kill
    (KubernetesPodOperator's ``on_finish_action`` and ``on_kill``). A failed pod is judged by its
    step container's exit code and the step's error.json (``task_exception``).

    :param step: the row of ``pipeline.steps.STEPS`` to run; the pod is named ``finetune-<step>``.
    :param launcher: the launcher the DAG was built for (``kubernetes``, ``pytorchjob`` or
        ``trainjob``): the one ``steps.render`` renders for.
    :param kwargs: ``KubernetesPodOperator``'s (``task_id``, ``execution_timeout``, callbacks, ...).
    """

    def __init__(self, *, step: str, launcher: str, **kwargs: Any) -> None:
        super().__init__(
            **{
                "name": f"finetune-{step}",
                "do_xcom_push": True,
                "xcom_sidecar_container_security_context": XCOM_SIDECAR_SECURITY,
                "on_finish_action": "delete_pod",
                # The provider's own reattach (Airflow 3.3+): the pod's identity goes to the try's
                # task_state_store, and a next try follows that pod while it runs.
                "durable": True,
                **kwargs,
            }
        )
        self.step = step
        self.launcher = launcher

    def execute(self, context):
        # Bad input fails here, before anything is submitted, not retried (the retry table).
        overrides = run_overrides(self.step, context)
        manifest = steps.render(
            self.step, overrides, self.launcher, deadline_s=steps.step_timeout(self.step, overrides.trusted)
        )
        cfg = steps.config_of(overrides)
        self.full_pod_spec = PodGenerator.deserialize_model_dict(manifest)
        self.namespace = manifest["metadata"]["namespace"]
        try:
            return super().execute(context)
        except Exception as exc:
            # Read the container, not the pod's phase: with the XCom sidecar the pod may still
            # be Running when the step container has ended.
            pod = getattr(self, "remote_pod", None)
            if pod is None:
                raise  # no pod came to be: KPO's own error (API, admission), retried
            exit_code, oom = pod_exit(pod)
            raise task_exception(self.step, self.launcher, cfg, exit_code, str(exc).splitlines()[0], oom=oom) from exc


class KubeflowJobOperator(BaseOperator):
    """Run the distributed step (training) as a Kubeflow job of the kind ``launcher`` submits
    (``steps.JOB_LAUNCHERS``) and return its result JSON, read as every step's is from
    ``<step_uri>/result.json``.

    ``execute`` renders the job with ``steps.render`` (bad input fails the task before anything is
    submitted), creates it, replacing one an earlier attempt left, and watches it with its rank-0
    pod's log in the task log (``k8s.run_job``) until it ends or ``timeouts.<step>`` of the
    deployment's config runs out. A job that did not succeed is deleted and judged by the step's
    error.json (``task_exception``); ``on_kill`` deletes the job ``execute`` created. A succeeded job
    is kept (its logs and status), until the next attempt of the same run replaces it.

    Retries reattach (``durable``, as the provider's KubernetesPodOperator does): the job's kind,
    namespace, name and uid go to the try's ``task_state_store`` before the watch, and a next try of
    the task instance whose try died mid-watch follows that job while it runs (its rank-0 log into
    the new try's log) or takes its result if it succeeded, instead of creating it again; one that
    failed or is gone is replaced, and a job of that name with another uid (someone recreated it)
    is not adopted: said in the log, and replaced. A try that saw its job to success drops the
    record, so a cleared task runs its job again.

    A subclass names its launcher; the class name is the task's type in the Airflow UI.

    :param step: the row of ``pipeline.steps.STEPS`` to run: a distributed one (``train``).
    :param durable: reattach a retry to the job an earlier try created (True), or always create
        the job anew (False, the behaviour before Airflow 3.3's task_state_store).
    :param kwargs: ``BaseOperator``'s (``task_id``, ``execution_timeout``, callbacks, ...).
    """

    launcher: ClassVar[str]

    def __init__(self, *, step: str, durable: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.durable = durable
        self.manifest: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """The kind of the job's manifest: ``PyTorchJob`` or ``TrainJob``."""
        return JOB_LAUNCHERS[self.launcher]

    @cached_property
    def hook(self) -> KubernetesHook:
        """The ``kubernetes_default`` connection; its clients are made when first asked for."""
        return KubernetesHook()

    def api(self):
        """The custom-objects client that creates, reads and deletes the job."""
        return self.hook.custom_object_client

    def core_api(self):
        """The core client that follows the rank-0 pod's log."""
        return self.hook.core_v1_client

    def execute(self, context):
        # Bad input fails here, before anything is submitted, not retried (the retry table).
        overrides = run_overrides(self.step, context)
        self.manifest = steps.render(
            self.step, overrides, self.launcher, deadline_s=steps.step_timeout(self.step, overrides.trusted)
        )
        cfg = steps.config_of(overrides)
        try:
            core = self.core_api()
        except Exception as exc:  # the job still runs and is judged; only its log is missing
            self.log.warning("the rank-0 pod's log will not be streamed: %s", exc)
            core = None
        store = context.get("task_state_store")
        phase = k8s.run_job(
            self.api(),
            self.manifest,
            cfg.k8s.job_poll_seconds,
            k8s.job_deadline_seconds(self.manifest),
            log=self.log.info,
            core=core,
            adopt=self.stored_uid(store),
            created=lambda uid: self.store_job(store, uid),
        )
        if phase != "Succeeded":
            name = self.manifest["metadata"]["name"]
            if phase == "Timeout":
                raise task_exception(
                    self.step,
                    self.launcher,
                    cfg,
                    steps.TIMEOUT_EXIT_CODE,
                    f"{self.kind} {name} ran past its deadline (timeouts.{self.step})",
                )
            raise task_exception(self.step, self.launcher, cfg, None, f"{self.kind} {name} ended {phase}")
        result = storage.read_json(storage.join(cfg.step_uri(self.step), steps.RESULT_FILE))
        if store is not None and self.durable:
            store.delete(JOB_STATE_KEY)  # seen to its end: a cleared task runs its job again
        return result

    def stored_uid(self, store: Any) -> str | None:
        """The uid of this task's job that an earlier try of this task instance created and did
        not see to its end, from the try's ``task_state_store``; None when there is none to adopt
        (no store, ``durable=False``, nothing stored, or another job's identity)."""
        if store is None or not self.durable:
            return None
        stored = store.get(JOB_STATE_KEY)
        if stored is None:
            return None
        meta = self.manifest["metadata"] if self.manifest is not None else {}
        wanted = {"kind": self.kind, "namespace": meta.get("namespace"), "name": meta.get("name")}
        if not isinstance(stored, dict) or not isinstance(stored.get("uid"), str):
            self.log.warning("not adopting the job stored by an earlier try: malformed %r", stored)
            return None
        if {key: stored.get(key) for key in wanted} != wanted:
            self.log.warning("not adopting %r stored by an earlier try: this try's job is %r", stored, wanted)
            return None
        return stored["uid"]

    def store_job(self, store: Any, uid: str) -> None:
        """Record the job this try created (kind, namespace, name, uid) in the try's
        ``task_state_store`` before the watch, so that a next try reattaches to it."""
        if store is None or not self.durable or self.manifest is None:
            return
        meta = self.manifest["metadata"]
        store.set(JOB_STATE_KEY, {"kind": self.kind, "namespace": meta["namespace"], "name": meta["name"], "uid": uid})

    def on_kill(self):
        if self.manifest is not None:
            k8s.delete_job(self.api(), self.manifest)


class PyTorchJobOperator(KubeflowJobOperator):
    """Training as a Kubeflow Training Operator v1 PyTorchJob (``FINETUNE_LAUNCHER=pytorchjob``)."""

    launcher = "pytorchjob"


class TrainJobOperator(KubeflowJobOperator):
    """Training as a Kubeflow Trainer v2 TrainJob (``FINETUNE_LAUNCHER=trainjob``)."""

    launcher = "trainjob"


# The job operator of each launcher that submits training as a Kubeflow job.
JOB_OPERATORS: dict[str, type[KubeflowJobOperator]] = {op.launcher: op for op in (PyTorchJobOperator, TrainJobOperator)}
