"""The operator that runs a step on the Airflow worker (``LocalStepOperator``), and what every
step's operator reads when its task runs: the deployment's config, the run's overrides, the AWS
connection. The cluster launchers' operators are in ``finetune_k8s_operators``.

Not a DAG file: ``.airflowignore`` keeps the DAG processor from parsing it, and Airflow puts the
DAG bundle's folder on ``sys.path``, so the task factory (``finetune_tasks``) imports it as
``finetune_operators``. Imported when a DAG file is parsed: nothing heavy, no network.

    python -c "import sys; sys.path.insert(0, 'dags'); import finetune_operators as o; print(o.step_timeout_s('train'))"
"""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import BaseOperator, Connection, RetryDecision, RetryPolicy
from airflow.sdk.exceptions import AirflowNotFoundException
from finetune_approval import APPROVAL_TASK, approval_overrides

from pipeline import local, steps
from pipeline.config import safe_run_id, scope
from pipeline.errors import PipelineError
from pipeline.steps import STEPS, deployment_config

AWS_CONN_ID = "aws_default"


def step_timeout_s(step: str) -> int:
    """``timeouts.<step>`` of the deployment's config (its file, FINETUNE_CONFIG), never a run's:
    a trigger cannot lift it."""
    return steps.step_timeout(step, deployment_config())


def latest_triggering_event(context):
    """The latest asset event that triggered this run; None for a run started by the clock or by hand."""
    triggering = context.get("triggering_asset_events") or {}
    events = [event for key in triggering for event in triggering[key]]
    return max(events, key=lambda event: event.timestamp) if events else None


def triggered_snapshot(context) -> str | None:
    """The ``snapshot_uri`` of the latest asset event that triggered this run; None for a run
    started by the clock or by hand, or when that event names no snapshot (then the run's
    ``source`` Param is collected)."""
    latest = latest_triggering_event(context)
    snapshot_uri = None if latest is None else (latest.extra or {}).get("snapshot_uri")
    if latest is not None and not snapshot_uri:
        _no_snapshot(latest)
    return snapshot_uri


def _no_snapshot(event) -> None:
    print(f"collect: triggering event on {event.asset.name} names no snapshot_uri; collecting the source Param")


def run_overrides(step: str, context) -> steps.StepOverrides:
    """The step's overrides in this run, with their config (built and checked once): the
    deployment's config files, what the trigger sent (checked against the deployment's
    trigger_keys), who triggered it, upstream results, for ``collect`` in an asset-triggered
    run the announced snapshot as its only source, and for ``promote`` after an approval
    (``finetune_approval``) the version, who answered, their comment and the answer."""
    upstream = {source: context["ti"].xcom_pull(task_ids=source) for source, _ in STEPS[step].inputs.values()}
    dag_run = context.get("dag_run")
    user = getattr(dag_run, "triggering_user_name", None) or "unknown"
    run_after = getattr(dag_run, "run_after", None)  # a cleared task of an old run keeps its old date
    latest = latest_triggering_event(context) if step == "collect" else None
    snapshot_uri = None if latest is None else (latest.extra or {}).get("snapshot_uri")
    deployment = steps.deployment_overrides()
    trusted = deployment_config(deployment)
    extra = [f"collect.sources={json.dumps([snapshot_uri])}"] if snapshot_uri else []
    if step == "promote" and APPROVAL_TASK in getattr(context.get("task"), "upstream_task_ids", ()):
        answer, registered = (context["ti"].xcom_pull(task_ids=task) for task in (APPROVAL_TASK, "register"))
        extra += approval_overrides(answer, registered, trusted.promote.approval_timeout)
    if snapshot_uri:
        scope.check_announced(
            snapshot_uri, trusted.artifact_root, trusted.collect.allowed_sources, f"asset event on {latest.asset.name}"
        )
    sets = steps.step_overrides(
        step,
        context["params"],
        upstream,
        safe_run_id(context["run_id"]),
        requested_by=user,
        deployment=deployment,
        run_date=run_after.isoformat() if run_after else "",
        trusted=trusted,
        extra=extra,
    )
    if latest is not None and not snapshot_uri:
        _no_snapshot(latest)  # said once the overrides stand, as before
    return sets


class RetryTable(RetryPolicy):
    """Airflow's retry decision for a step's task by the one retry table (``pipeline.steps``,
    ``NOT_RETRIED`` and ``StepFailed.retryable``): a step that failed on bad input (2), a failed
    gate (3) or out of memory (137) fails at once; a transient fault (75), a timeout (124) or a
    crash is retried, within the task's ``retries`` and with its back-off. The decision's reason,
    the exit code and its cause, is in the task log and, for a retry, on the task instance (the
    UI's retry reason). An error that is not a step's (Airflow's own, the cluster API's, the
    task's ``execution_timeout``) gets the task's standard retries.

    ``ExceptionRetryPolicy`` cannot express the table: it matches exception classes, and a failed
    step is one class (``StepFailed``) whose exit code, read from its error.json or its
    container, is the cause."""

    def evaluate(self, exception, try_number, max_tries, context=None) -> RetryDecision:
        if isinstance(exception, steps.StepFailed):
            code, retried = exception.returncode, exception.retryable
        elif isinstance(exception, PipelineError):  # raised by the task itself: bad input, before any work
            code = exception.exit_code
            retried = code not in steps.NOT_RETRIED
        else:
            return RetryDecision.default()
        said = str(exception).splitlines()[0] if str(exception) else type(exception).__name__
        if retried:
            return RetryDecision.retry(reason=f"exit code {code}, retried: {said}")
        return RetryDecision.fail(
            reason=f"exit code {code}, {steps.NOT_RETRIED.get(code, 'not retryable')}: not retried: {said}"
        )

    def serialize(self) -> dict[str, Any]:
        return {"__type": type(self).__name__}


RETRY_TABLE = RetryTable()


def aws_connection_env() -> dict[str, str]:
    """AWS settings for a local step from the Airflow connection ``aws_default``, read when the
    task runs (never at parse time). No such connection: nothing, and boto3 in the step uses the
    standard AWS chain (environment, profile, instance or IRSA role)."""
    try:
        connection = Connection.get(AWS_CONN_ID)
    except AirflowNotFoundException:
        return {}
    return local.aws_env(connection.login, connection.password, connection.extra_dejson)


class LocalStepOperator(BaseOperator):
    """Run one step as a local subprocess of the Airflow worker (``pipeline.local.launch``), in a
    process group of its own, and return its result JSON (the task's XCom).

    The step's timeout (``timeouts.<step>`` of the deployment's config), Airflow's
    ``execution_timeout`` and a kill of the task (``on_kill``) all stop every process it started,
    torchrun's workers included. A failed step is raised as a ``StepFailed``, judged by the retry
    table through the DAGs' ``retry_policy`` (``RetryTable``): bad input, a failed gate and out of
    memory fail the task without retries; a transient fault or a crash is retried.

    :param step: the row of ``pipeline.steps.STEPS`` to run; its overrides come from the run's
        Params, its upstream tasks' results (XCom) and the deployment's config files.
    :param kwargs: ``BaseOperator``'s (``task_id``, ``execution_timeout``, callbacks, ...).
    """

    def __init__(self, *, step: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.process: local.StepProcess | None = None

    def execute(self, context):
        def started(process: local.StepProcess) -> None:
            self.process = process

        overrides = run_overrides(self.step, context)  # a refused trigger key fails here, before any work
        return local.launch(
            self.step,
            overrides,
            env=aws_connection_env(),
            timeout_s=steps.step_timeout(self.step, overrides.trusted),
            grace_s=overrides.trusted.timeouts.kill_grace_s,
            started=started,
        )

    def on_kill(self):
        if self.process is not None:
            self.process.stop(deployment_config().timeouts.kill_grace_s)
