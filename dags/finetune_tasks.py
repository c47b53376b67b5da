"""The task factory the DAG files share, and the snapshot Asset that links the collect and
finetune DAGs.

``step_task`` builds one Airflow task per row of ``pipeline.steps.STEPS``, run by the configured
launcher (``local`` subprocess, ``kubernetes`` pod, ``pytorchjob`` or ``trainjob`` for training);
``announce_task`` turns a
new snapshot into an event on the model's snapshot Asset. Not a DAG file: ``.airflowignore``
keeps the DAG processor from parsing it, and Airflow puts the DAG bundle's folder on ``sys.path``,
so the DAG files import it as ``finetune_tasks``.

    python -c "import sys; sys.path.insert(0, 'dags'); import finetune_tasks as t; print(t.snapshot_asset('support-intents'))"
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, BaseOperator, Param, task
from finetune_alerts import ON_PROMOTION

from pipeline import k8s, local, steps, storage
from pipeline.config import PipelineConfig, load_config, param_schema, safe_run_id
from pipeline.errors import ConfigError, PipelineError
from pipeline.steps import DAG_PARAMS, STEPS, job_kind

AWS_CONN_ID = "aws_default"
# Every snapshot announcement goes through this alias, so the asset can follow the run's
# `model_name` Param (an Asset in `outlets` is fixed when the file is parsed).
SNAPSHOTS = AssetAlias(name="finetune-snapshots")


def snapshot_asset(model_name: str) -> Asset:
    """The Asset whose events announce ``model_name``'s new snapshots. Its URI names the stream,
    not a file (each snapshot lives at its own content-addressed URI, given in the event's extra),
    so it uses a private ``x-`` scheme, which Airflow accepts as is."""
    return Asset(name=f"{model_name}-snapshot", uri=f"x-finetune://snapshots/{model_name}")


def deployment_config() -> PipelineConfig:
    """The deployment's effective config (its config files over the defaults): what the trigger
    form shows as defaults. Read when a DAG file is parsed: local files, no network.

    Built once per distinct input: a DAG file asks for it for every task's timeout and for the
    Params (22 times for finetune.py), and each build checks every field (4 ms; BENCHMARKS.md,
    DAG parse). The key is all a build reads: the config files' overrides, the environment
    (FINETUNE_HOME, FINETUNE_ARTIFACT_ROOT, ...) and the working directory (the default home)."""
    return _deployment_config(tuple(steps.deployment_overrides()), tuple(sorted(os.environ.items())), os.getcwd())


@functools.lru_cache(maxsize=4)
def _deployment_config(overrides: tuple[str, ...], environ: tuple[tuple[str, str], ...], cwd: str) -> PipelineConfig:
    return load_config(None, overrides)


def default_model_name() -> str:
    return deployment_config().model_name


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


# What the trigger form calls each Param; the description under it is the config field's help.
TITLES = {
    "source": "Data sources", "model_name": "Registered model name", "task": "Task family",
    "base_model": "Base model", "epochs": "Epochs", "learning_rate": "Learning rate",
    "batch_size": "Batch size per process", "zero_stage": "DeepSpeed ZeRO stage",
    "num_processes": "Training processes", "trainer_args": "More Trainer settings (TrainingArguments fields)",
    "version": "Version or alias to promote",
    "target_alias": "Alias to move", "reason": "Reason (recorded; required with force)",
    "force": "Force (override the gate)", "overrides": "More settings (one key=value per line)",
}


def step_params(dag_id: str, names: Iterable[str] | None = None, overrides: bool = True,
                **form: Mapping[str, Any]) -> dict[str, Param]:
    """The Params of ``dag_id`` (``pipeline.steps.DAG_PARAMS``), or the ``names`` among them, bound
    to config keys: type, bounds and help come from the config field, the default from the
    deployment's config; ``form`` changes a Param's schema where the trigger form needs another
    default (e.g. ``version={"default": ...}``). ``overrides`` adds the free-form ``overrides`` Param.
    A Param left at its default sends nothing: the deployment's value stands."""
    keys, defaults = DAG_PARAMS[dag_id], deployment_config()
    params = {name: Param(**{**param_schema(keys[name], defaults), **form.get(name, {})}, title=TITLES[name])
              for name in (names or keys)}
    if overrides:
        params["overrides"] = Param([], type="array", items={"type": "string"}, title=TITLES["overrides"],
                                    description="More config overrides as step.key=value, e.g. train.max_seq_len=128; "
                                                "only keys the deployment's trigger_keys allow.")
    return params


def triggered_snapshot(context) -> str | None:
    """The ``snapshot_uri`` of the latest asset event that triggered this run; None for a run
    started by the clock or by hand, or when that event names no snapshot (then the run's
    ``source`` Param is collected)."""
    triggering = context.get("triggering_asset_events") or {}
    events = [event for key in triggering for event in triggering[key]]
    if not events:
        return None
    latest = max(events, key=lambda event: event.timestamp)
    snapshot_uri = (latest.extra or {}).get("snapshot_uri")
    if not snapshot_uri:
        print(f"collect: triggering event on {latest.asset.name} names no snapshot_uri; collecting the source Param")
    return snapshot_uri


def run_overrides(step: str, context) -> list[str]:
    """The step's overrides in this run: the deployment's config files, what the trigger sent
    (checked against the deployment's trigger_keys), who triggered it, upstream results, and for
    ``collect`` in an asset-triggered run the announced snapshot as its only source."""
    upstream = {source: context["ti"].xcom_pull(task_ids=source) for source, _ in STEPS[step].inputs.values()}
    dag_run = context.get("dag_run")
    user = getattr(dag_run, "triggering_user_name", None) or "unknown"
    run_after = getattr(dag_run, "run_after", None)  # a cleared task of an old run keeps its old date
    sets = steps.step_overrides(step, context["params"], upstream, safe_run_id(context["run_id"]), requested_by=user,
                                deployment=steps.deployment_overrides(),
                                run_date=run_after.isoformat() if run_after else "")
    if step == "collect" and (snapshot_uri := triggered_snapshot(context)):
        sets.append(f"collect.sources={json.dumps([snapshot_uri])}")
    return sets


def aws_connection_env() -> dict[str, str]:
    """AWS settings for a local step from the Airflow connection ``aws_default``, read when the
    task runs (never at parse time). No such connection: nothing, and boto3 in the step uses the
    standard AWS chain (environment, profile, instance or IRSA role)."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = Connection.get(AWS_CONN_ID)
    except AirflowNotFoundException:
        return {}
    return local.aws_env(connection.login, connection.password, connection.extra_dejson)


# Room past a step's own timeout before Airflow's execution_timeout ends the task: the launcher
# (or the kubelet) stops the step first and says why; scheduling a pod and pulling its image
# happen before activeDeadlineSeconds starts counting.
LAUNCH_MARGIN_S = 300
ANNOUNCE_TIMEOUT = timedelta(minutes=5)


def step_timeout_s(step: str) -> int:
    """``timeouts.<step>`` of the deployment's config (its file, FINETUNE_CONFIG), never a run's:
    a trigger cannot lift it."""
    return steps.step_timeout(step, deployment_config())


def execution_timeout(step: str) -> timedelta:
    """The Airflow task's ``execution_timeout``: the step's own timeout, the grace its processes
    get to stop, and ``LAUNCH_MARGIN_S``."""
    return timedelta(seconds=step_timeout_s(step) + deployment_config().timeouts.kill_grace_s + LAUNCH_MARGIN_S)


class LocalStepOperator(BaseOperator):
    """The step as a local subprocess (``local.launch_local``) in a process group of its own: its
    timeout, Airflow's execution_timeout and a kill of the task (``on_kill``) all stop every
    process it started, torchrun's workers included."""

    def __init__(self, *, step: str, **kwargs):
        super().__init__(**kwargs)
        self.step = step
        self.process: local.StepProcess | None = None

    def execute(self, context):
        from airflow.sdk.exceptions import AirflowFailException

        def started(process: local.StepProcess) -> None:
            self.process = process

        try:
            overrides = run_overrides(self.step, context)  # a refused trigger key fails here, before any work
            return local.launch(self.step, overrides, env=aws_connection_env(), timeout_s=step_timeout_s(self.step),
                                grace_s=deployment_config().timeouts.kill_grace_s, started=started)
        except PipelineError as exc:
            if getattr(exc, "retryable", False):
                raise
            raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help

    def on_kill(self):
        if self.process is not None:
            self.process.stop(deployment_config().timeouts.kill_grace_s)


def step_failed(step: str, launcher: str, cfg: PipelineConfig, exit_code: int | None, detail: str,
                oom: bool | None = None) -> Exception:
    """A failed pod's, PyTorchJob's or TrainJob's step, as the retry table in ``pipeline.steps`` says: its own
    error.json when it wrote one, else the exit code. An AirflowFailException when retrying cannot
    help (bad input 2, failed gate 3, out of memory 137), else a retryable ``StepFailed``."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        error = steps.step_error(cfg.step_uri(step))
    except PipelineError as exc:  # the artifact store is failing too: say so, and let it retry
        error, detail = None, f"{detail}; its error.json could not be read: {exc}"
    failure = steps.classify_failure(step, launcher, exit_code, error, memory=k8s.step_memory(cfg, STEPS[step]),
                                     detail=detail, oom=oom)
    return failure if failure.retryable else AirflowFailException(str(failure))


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


def run_deadline(step_names: Iterable[str], extra: timedelta = timedelta(0)) -> timedelta:
    """How long after it was queued a run of these steps is late: one attempt of each at its
    execution_timeout (the DAG's DeadlineAlert then sends an alert; nothing is stopped)."""
    return sum((execution_timeout(step) for step in step_names), extra)


# Steps whose success may crown a new champion: their result is checked and announced.
PROMOTING_STEPS = ("register", "promote")


def step_task(step: str, launcher: str):
    """One Airflow task per row of ``pipeline.steps.STEPS``, run by ``launcher``, with the step's
    ``execution_timeout``; register and promote announce a new champion (``finetune_alerts``)."""
    callbacks = {"on_success_callback": ON_PROMOTION} if step in PROMOTING_STEPS else {}
    if job_kind(step, launcher):
        return job_task(step, launcher, **callbacks)
    if launcher != "local":
        return pod_task(step, launcher, **callbacks)
    return LocalStepOperator(task_id=step, step=step, execution_timeout=execution_timeout(step), **callbacks)


def pod_task(step: str, launcher: str, **callbacks):
    """The step as one pod. Its argv needs the upstream results, known only at run time, so the
    operator renders the whole pod in ``execute`` with the same ``steps.render`` that
    ``finetune render`` prints (one code path, no Jinja copy of ``step_overrides``), and bad
    input fails the task before anything is submitted."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class StepPodOperator(KubernetesPodOperator):
        def execute(self, context):
            from airflow.sdk.exceptions import AirflowFailException
            from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

            try:
                overrides = run_overrides(step, context)
                manifest = steps.render(step, overrides, launcher, deadline_s=step_timeout_s(step))
                cfg = load_config(None, overrides)
            except PipelineError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help
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
                raise step_failed(step, launcher, cfg, exit_code, str(exc).splitlines()[0], oom=oom) from exc

    # KPO's XCom sidecar must meet the same "restricted" policy as the step container.
    sidecar_security = dict(k8s.RESTRICTED_CONTAINER, runAsUser=65534, runAsGroup=65534)
    return StepPodOperator(task_id=step, name=f"finetune-{step}", do_xcom_push=True,
                           xcom_sidecar_container_security_context=sidecar_security,
                           on_finish_action="delete_pod", execution_timeout=execution_timeout(step), **callbacks)


def job_task(step: str, launcher: str, **callbacks):
    """Training as a PyTorchJob or a TrainJob (``steps.job_kind``): create it, watch it with its
    rank-0 pod's log in the task log, delete it unless it succeeded (and on kill). Its result
    comes back as every step's does, from ``<step_uri>/result.json``; a failed job is read by the
    retry table from the step's error.json."""
    from airflow.sdk import BaseOperator

    kind = job_kind(step, launcher)

    class JobOperator(BaseOperator):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.manifest = None

        def api(self):
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

            return KubernetesHook().custom_object_client

        def core_api(self):
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

            return KubernetesHook().core_v1_client

        def execute(self, context):
            from airflow.sdk.exceptions import AirflowFailException

            try:
                overrides = run_overrides(step, context)
                self.manifest = steps.render(step, overrides, launcher, deadline_s=step_timeout_s(step))
                cfg = load_config(None, overrides)
            except PipelineError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help
            try:
                core = self.core_api()
            except Exception as exc:  # the job still runs and is judged; only its log is missing
                self.log.warning("the rank-0 pod's log will not be streamed: %s", exc)
                core = None
            phase = k8s.run_job(self.api(), self.manifest, cfg.k8s.job_poll_seconds,
                                k8s.job_deadline_seconds(self.manifest), log=self.log.info, core=core)
            if phase != "Succeeded":
                name = self.manifest["metadata"]["name"]
                if phase == "Timeout":
                    raise step_failed(step, launcher, cfg, steps.TIMEOUT_EXIT_CODE,
                                      f"{kind} {name} ran past its deadline (timeouts.{step})")
                raise step_failed(step, launcher, cfg, None, f"{kind} {name} ended {phase}")
            return storage.read_json(storage.join(cfg.step_uri(step), steps.RESULT_FILE))

        def on_kill(self):
            if self.manifest is not None:
                k8s.delete_job(self.api(), self.manifest)

    JobOperator.__name__ = JobOperator.__qualname__ = f"{kind}Operator"  # what the graph and logs show
    return JobOperator(task_id=step, execution_timeout=execution_timeout(step), **callbacks)


pytorchjob_task = job_task  # its earlier name (tests/dags/test_retries_by_cause.py)


def announce_task():
    """Announce the collect task's snapshot on ``<model_name>-snapshot`` unless it is the one last
    announced there through ``SNAPSHOTS``: unchanged data emits no event, so nothing retrains."""

    @task(task_id="announce", inlets=[SNAPSHOTS], outlets=[SNAPSHOTS], execution_timeout=ANNOUNCE_TIMEOUT)
    def announce(**context):  # no return annotation: a dict one would split the XCom per key
        collected = context["ti"].xcom_pull(task_ids="collect")
        asset = snapshot_asset(context["params"]["model_name"])
        last = next((event for event in context["inlet_events"][SNAPSHOTS].ascending(False)
                     if event.asset.name == asset.name), None)
        extra = {"snapshot_uri": collected["snapshot_uri"], "sha256": collected["sha256"], "rows": collected["rows"]}
        if last is not None and (last.extra or {}).get("sha256") == collected["sha256"]:
            print(f"announce: {asset.name} last announced this snapshot ({collected['sha256'][:12]}); no event")
            return {"asset": asset.name, "announced": False, **extra}
        context["outlet_events"][SNAPSHOTS].add(asset, extra=extra)
        print(f"announce: {asset.name} <- {collected['snapshot_uri']}")
        return {"asset": asset.name, "announced": True, **extra}

    return announce()
