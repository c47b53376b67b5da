"""The task factory the DAG files share, their shared ``default_args``, and the snapshot Asset
that links the collect and finetune DAGs.

``step_task`` builds one Airflow task per row of ``pipeline.steps.STEPS``, run by the configured
launcher: ``local`` a subprocess (``finetune_operators.LocalStepOperator``), ``kubernetes`` a pod,
``pytorchjob`` or ``trainjob`` pods and training as a Kubeflow job (``finetune_k8s_operators``);
``announce_task`` turns a new snapshot into an event on the model's snapshot Asset. Not a DAG
file: ``.airflowignore`` keeps the DAG processor from parsing it, and Airflow puts the DAG
bundle's folder on ``sys.path``, so the DAG files import it as ``finetune_tasks``.

    python -c "import sys; sys.path.insert(0, 'dags'); import finetune_tasks as t; print(t.snapshot_asset('support-intents'))"
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, BaseOperator, Param, task
from finetune_alerts import ON_FAILURE, ON_PROMOTION
from finetune_approval import APPROVAL_TASK, ApprovalTask
from finetune_events import ON_ALIAS_MOVES
from finetune_operators import RETRY_TABLE, LocalStepOperator, deployment_config, step_timeout_s

from pipeline.config import param_schema
from pipeline.errors import ConfigError
from pipeline.steps import DAG_PARAMS, job_kind, result_keys

# Every snapshot announcement goes through this alias, so the asset can follow the run's
# `model_name` Param (an Asset in `outlets` is fixed when the file is parsed).
SNAPSHOTS = AssetAlias(name="finetune-snapshots")

# What every task of the three DAGs gets unless its DAG says otherwise (promote waits less between
# tries). Retried: transient faults (exit 75), crashes, timeouts, with back-off; bad input (2), a
# failed gate (3) and out of memory (137) fail at once (pipeline/steps.py, the retry table, applied
# by Airflow's retry_policy: the decision and its cause are in the task log and the UI).
DEFAULT_ARGS = {
    "retries": 2,
    "retry_policy": RETRY_TABLE,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "owner": "ml-platform",
    "on_failure_callback": ON_FAILURE,
}


def snapshot_asset(model_name: str) -> Asset:
    """The Asset whose events announce ``model_name``'s new snapshots. Its URI names the stream,
    not a file (each snapshot lives at its own content-addressed URI, given in the event's extra),
    so it uses a private ``x-`` scheme, which Airflow accepts as is."""
    return Asset(name=f"{model_name}-snapshot", uri=f"x-finetune://snapshots/{model_name}")


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
    "source": "Data sources",
    "model_name": "Registered model name",
    "task": "Task family",
    "base_model": "Base model",
    "epochs": "Epochs",
    "learning_rate": "Learning rate",
    "batch_size": "Batch size per process",
    "zero_stage": "DeepSpeed ZeRO stage",
    "num_processes": "Training processes",
    "trainer_args": "More Trainer settings (TrainingArguments fields)",
    "promote": "Promote (off: register as challenger only, champion untouched)",
    "version": "Version or alias to promote",
    "target_alias": "Alias to move",
    "reason": "Reason (recorded; required with force)",
    "force": "Force (override the gate)",
    "overrides": "More settings (one key=value per line)",
}


def step_params(
    dag_id: str, names: Iterable[str] | None = None, overrides: bool = True, **form: Mapping[str, Any]
) -> dict[str, Param]:
    """The Params of ``dag_id`` (``pipeline.steps.DAG_PARAMS``), or the ``names`` among them, bound
    to config keys: type, bounds and help come from the config field, the default from the
    deployment's config; ``form`` changes a Param's schema where the trigger form needs another
    default (e.g. ``version={"default": ...}``). ``overrides`` adds the free-form ``overrides`` Param.
    A Param left at its default sends nothing: the deployment's value stands."""
    keys, defaults = DAG_PARAMS[dag_id], deployment_config()
    params = {
        name: Param(**{**param_schema(keys[name], defaults), **form.get(name, {})}, title=TITLES[name])
        for name in (names or keys)
    }
    if overrides:
        params["overrides"] = Param(
            [],
            type="array",
            items={"type": "string"},
            title=TITLES["overrides"],
            description="More config overrides as step.key=value, e.g. train.max_seq_len=128; "
            "only keys the deployment's trigger_keys allow.",
        )
    return params


# Room past a step's own timeout before Airflow's execution_timeout ends the task: the launcher
# (or the kubelet) stops the step first and says why; scheduling a pod and pulling its image
# happen before activeDeadlineSeconds starts counting.
LAUNCH_MARGIN_S = 300
ANNOUNCE_TIMEOUT = timedelta(minutes=5)


def execution_timeout(step: str) -> timedelta:
    """The Airflow task's ``execution_timeout``: the step's own timeout, the grace its processes
    get to stop, and ``LAUNCH_MARGIN_S``."""
    return timedelta(seconds=step_timeout_s(step) + deployment_config().timeouts.kill_grace_s + LAUNCH_MARGIN_S)


def run_deadline(step_names: Iterable[str], extra: timedelta = timedelta(0)) -> timedelta:
    """How long after it was queued a run of these steps is late: one attempt of each at its
    execution_timeout (the DAG's DeadlineAlert then sends an alert; nothing is stopped)."""
    return sum((execution_timeout(step) for step in step_names), extra)


# Steps whose success may move an alias: a new champion is announced, each move sent as an event.
PROMOTING_STEPS = ("register", "promote")


def step_task(step: str, launcher: str) -> BaseOperator:
    """One Airflow task per row of ``pipeline.steps.STEPS``, run by ``launcher``, with the step's
    ``execution_timeout``; register and promote announce a new champion (``finetune_alerts``) and
    send an event for each alias they moved (``finetune_events``)."""
    settings = {"task_id": step, "step": step, "execution_timeout": execution_timeout(step)}
    if step in PROMOTING_STEPS:
        settings["on_success_callback"] = [ON_PROMOTION, ON_ALIAS_MOVES]
    if launcher == "local":
        return LocalStepOperator(**settings)
    # The cluster launchers' operators import the cncf.kubernetes provider (most of a second of
    # parse time): only a DAG built for one of them imports it.
    import finetune_k8s_operators

    if job_kind(step, launcher):
        return finetune_k8s_operators.JOB_OPERATORS[launcher](**settings)
    return finetune_k8s_operators.StepPodOperator(launcher=launcher, **settings)


def approval_timeout() -> timedelta:
    """How long the approval waits for an answer: ``promote.approval_timeout`` of the deployment's config."""
    return timedelta(seconds=deployment_config().promote.approval_timeout)


def approval_task() -> BaseOperator:
    """The approval between ``register`` and ``promote`` (``promote.require_approval``): a person
    answers in Airflow's Required actions; who may, and for how long, are the deployment's
    (``promote.approvers``, ``promote.approval_timeout``)."""
    return ApprovalTask(
        task_id=APPROVAL_TASK, approvers=deployment_config().promote.approvers, timeout=approval_timeout()
    )


# What an announcement carries of the collect task's result (fields of its result dataclass).
ANNOUNCED = result_keys("collect", "snapshot_uri", "sha256", "rows")


def announce_task():
    """Announce the collect task's snapshot on ``<model_name>-snapshot`` unless it is the one last
    announced there through ``SNAPSHOTS``: unchanged data emits no event, so nothing retrains."""

    @task(task_id="announce", inlets=[SNAPSHOTS], outlets=[SNAPSHOTS], execution_timeout=ANNOUNCE_TIMEOUT)
    def announce(**context):  # no return annotation: a dict one would split the XCom per key
        collected = context["ti"].xcom_pull(task_ids="collect")
        asset = snapshot_asset(context["params"]["model_name"])
        last = next(
            (event for event in context["inlet_events"][SNAPSHOTS].ascending(False) if event.asset.name == asset.name),
            None,
        )
        extra = {key: collected[key] for key in ANNOUNCED}
        if last is not None and (last.extra or {}).get("sha256") == collected["sha256"]:
            print(f"announce: {asset.name} last announced this snapshot ({collected['sha256'][:12]}); no event")
            return {"asset": asset.name, "announced": False, **extra}
        context["outlet_events"][SNAPSHOTS].add(asset, extra=extra)
        print(f"announce: {asset.name} <- {collected['snapshot_uri']}")
        return {"asset": asset.name, "announced": True, **extra}

    return announce()
