"""The task factory the DAG files share, and the snapshot Asset that links the collect and
finetune DAGs.

``step_task`` builds one Airflow task per row of ``pipeline.steps.STEPS``, run by the configured
launcher (``local`` subprocess, ``kubernetes`` pod, ``pytorchjob``); ``announce_task`` turns a
new snapshot into an event on the model's snapshot Asset. Not a DAG file: ``.airflowignore``
keeps the DAG processor from parsing it, and Airflow puts the DAG bundle's folder on ``sys.path``,
so the DAG files import it as ``finetune_tasks``.

    python -c "import sys; sys.path.insert(0, 'dags'); import finetune_tasks as t; print(t.snapshot_asset('support-intents'))"
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param, task

from pipeline import k8s, steps, storage
from pipeline.config import PipelineConfig, load_config, param_schema, safe_run_id
from pipeline.errors import ConfigError, PipelineError
from pipeline.steps import DAG_PARAMS, STEPS, uses_pytorchjob

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
    form shows as defaults. Read when a DAG file is parsed: local files, no network."""
    return load_config(None, steps.deployment_overrides())


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
    "num_processes": "Training processes", "version": "Version or alias to promote",
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
    return steps.aws_env(connection.login, connection.password, connection.extra_dejson)


def step_task(step: str, launcher: str):
    """One Airflow task per row of ``pipeline.steps.STEPS``, run by ``launcher``."""
    if uses_pytorchjob(step, launcher):
        return pytorchjob_task(step, launcher)
    if launcher != "local":
        return pod_task(step, launcher)

    @task(task_id=step)
    def launch(**context):
        from airflow.sdk.exceptions import AirflowFailException

        try:
            overrides = run_overrides(step, context)  # a refused trigger key fails here, before any work
            return steps.launch(step, overrides, env=aws_connection_env())
        except PipelineError as exc:
            if getattr(exc, "retryable", False):
                raise
            raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help

    return launch()


def pod_task(step: str, launcher: str):
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
                manifest = steps.render(step, run_overrides(step, context), launcher)
            except PipelineError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help
            self.full_pod_spec = PodGenerator.deserialize_model_dict(manifest)
            self.namespace = manifest["metadata"]["namespace"]
            return super().execute(context)

    # KPO's XCom sidecar must meet the same "restricted" policy as the step container.
    sidecar_security = dict(k8s.RESTRICTED_CONTAINER, runAsUser=65534, runAsGroup=65534)
    return StepPodOperator(task_id=step, name=f"finetune-{step}", do_xcom_push=True,
                           xcom_sidecar_container_security_context=sidecar_security,
                           on_finish_action="delete_pod")


def pytorchjob_task(step: str, launcher: str):
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
            from airflow.sdk.exceptions import AirflowFailException

            try:
                overrides = run_overrides(step, context)
                self.manifest = steps.render(step, overrides, launcher)
                cfg = load_config(None, overrides)
            except PipelineError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help
            phase = k8s.run_pytorchjob(self.api(), self.manifest, cfg.k8s.job_poll_seconds,
                                       cfg.k8s.job_timeout_seconds, log=self.log.info)
            if phase != "Succeeded":
                error = steps.step_error(cfg.step_uri(step))
                if error is not None:  # the step's own verdict on its input: not retried
                    raise AirflowFailException(f"step '{step}' failed: {error['error']}")
                raise RuntimeError(f"PyTorchJob {self.manifest['metadata']['name']} ended {phase}")
            return storage.read_json(storage.join(cfg.step_uri(step), steps.RESULT_FILE))

        def on_kill(self):
            if self.manifest is not None:
                k8s.delete_pytorchjob(self.api(), self.manifest)

    return PyTorchJobOperator(task_id=step)


def announce_task():
    """Announce the collect task's snapshot on ``<model_name>-snapshot`` unless it is the one last
    announced there through ``SNAPSHOTS``: unchanged data emits no event, so nothing retrains."""

    @task(task_id="announce", inlets=[SNAPSHOTS], outlets=[SNAPSHOTS])
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
