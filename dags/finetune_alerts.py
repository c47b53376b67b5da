"""Alerts: a Slack-compatible message (``{"text": ...}``) to the webhook of the Airflow connection
``finetune_alerts`` when a task of ``finetune``, ``collect`` or ``promote`` fails (after its last
try), when a run is past its deadline, and when a new champion is promoted. No such connection:
nothing is sent and nothing fails. An alert that cannot be sent is logged; it never changes a
run's outcome.

The webhook URL is the connection's extra ``webhook_url``, else its host when that is a whole URL,
else ``<conn_type>://<host>[:<port>]/<schema>`` (what ``AIRFLOW_CONN_FINETUNE_ALERTS=https://hooks.example.com/services/T/B/X``
gives). Not a DAG file (``.airflowignore``); the DAG files import it as ``finetune_alerts``.

    AIRFLOW_CONN_FINETUNE_ALERTS='{"conn_type": "http", "extra": {"webhook_url": "https://hooks.slack.com/services/..."}}'
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.request
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseNotifier, DeadlineAlert, DeadlineReference, SyncCallback

from pipeline import steps
from pipeline.config import CHAMPION, safe_run_id
from pipeline.errors import ConfigError

ALERTS_CONN_ID = "finetune_alerts"
SEND_TIMEOUT_S = 10
log = logging.getLogger(__name__)


def webhook_url(conn_id: str = ALERTS_CONN_ID) -> str | None:
    """The webhook URL of the Airflow connection ``conn_id``, or None when there is none."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    return connection_url(connection)


def connection_url(connection: Any) -> str | None:
    """An Airflow connection's URL: its extra ``webhook_url``, else its host when that is a whole
    URL, else ``<conn_type>://<host>[:<port>]/<schema>``; None without a host."""
    extra = connection.extra_dejson or {}
    host = connection.host or ""
    if extra.get("webhook_url"):
        return str(extra["webhook_url"])
    if host.startswith(("http://", "https://")):
        return host
    if not host:
        return None
    scheme = connection.conn_type if connection.conn_type in ("http", "https") else "https"
    port = f":{connection.port}" if connection.port else ""
    return f"{scheme}://{host}{port}/{(connection.schema or '').lstrip('/')}"


def send_alert(text: str, conn_id: str = ALERTS_CONN_ID) -> None:
    """Post ``text`` to the webhook of the connection ``conn_id``; without one, only log it."""
    url = webhook_url(conn_id)
    if url is None:
        log.info("alert: no Airflow connection %s, nothing sent: %s", conn_id, text)
        return
    post(url, text)


def post(url: str, text: str) -> None:
    request = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:
        response.read()


def step_error_text(dag_run_id: str, task_id: str) -> str | None:
    """The error the step recorded in its error.json for this run, when it is a step and wrote one
    (the artifact root is the deployment's: a trigger cannot point this elsewhere)."""
    if task_id not in steps.STEPS:
        return None
    # The deployment's config this process built already (the DAG's parse, the task's execute),
    # with this run's id: a copy, not another build.
    cfg = dataclasses.replace(steps.deployment_config(), run_id=safe_run_id(dag_run_id))
    error = steps.step_error(cfg.step_uri(task_id))
    if error is None:
        return None
    summary = str(error["error"]).partition("\n")[0]  # the details are in the task log the alert links to
    return f"{summary} (exit code {error['exit_code']})"


def failure_text(context: Mapping[str, Any]) -> str:
    ti = context["ti"]
    error = None
    try:
        error = step_error_text(ti.run_id, ti.task_id)
    except Exception as exc:  # the artifact store is down too: the task's own exception still says why
        log.warning("alert: cannot read the step's error.json: %s", exc)
    error = error or str(context.get("exception") or "unknown error")
    return (
        f"finetune-pipeline: task `{ti.task_id}` of DAG `{ti.dag_id}` failed in run `{ti.run_id}` "
        f"(try {ti.try_number})\nerror: {error}\nlog: {ti.log_url}"
    )


# The result fields a promotion message reads (checked against each step's result dataclass).
REGISTER_KEYS = steps.result_keys("register", "promoted", "model_name", "version", "reason", "metrics", "outside_moves")
PROMOTE_KEYS = steps.result_keys(
    "promote", "outcome", "target_alias", "previous_version", "model_name", "version", "reason"
)


def promotion_text(context: Mapping[str, Any]) -> str | None:
    """A message when the task's result says a new champion was promoted, else None."""
    ti = context["ti"]
    result = ti.xcom_pull(task_ids=ti.task_id) or {}
    moved = "".join(
        f"\nmoved outside the pipeline: {result['model_name']} {move}" for move in result.get("outside_moves") or []
    )
    if ti.task_id == "register" and result.get("promoted"):
        return (
            f"finetune-pipeline: {result['model_name']} version {result['version']} is the new {CHAMPION} "
            f"(DAG `{ti.dag_id}`, run `{ti.run_id}`): {result.get('reason', '')}; metrics {result.get('metrics')}"
            f"{moved}\nlog: {ti.log_url}"
        )
    if ti.task_id == "register" and moved:
        return (
            f"finetune-pipeline: register of {result['model_name']} version {result['version']} (DAG `{ti.dag_id}`, "
            f"run `{ti.run_id}`) found aliases not where the pipeline left them:{moved}\nlog: {ti.log_url}"
        )
    if ti.task_id == "promote" and result.get("outcome") == "promoted" and result.get("target_alias") == CHAMPION:
        previous = result.get("previous_version") or "none"
        return (
            f"finetune-pipeline: {result['model_name']} version {result['version']} is the new {CHAMPION} "
            f"(was {previous}; DAG `{ti.dag_id}`, run `{ti.run_id}`): {result.get('reason', '')}\n"
            f"log: {ti.log_url}"
        )
    return None


def deadline_text(context: Mapping[str, Any]) -> str:
    run = context.get("dag_run") or {}
    deadline = (context.get("deadline") or {}).get("deadline_time", "its deadline")
    return (
        f"finetune-pipeline: run `{run.get('run_id', '?')}` of DAG `{run.get('dag_id', '?')}` is past its "
        f"deadline ({deadline}), state {run.get('state', '?')}"
    )


class WebhookNotifier(BaseNotifier):
    """Sends the ``event`` ('failure', 'promotion' or 'deadline') of a task or run to the webhook
    of the connection ``conn_id``; a task's ``on_failure_callback`` / ``on_success_callback`` or a
    DeadlineAlert's callback."""

    def __init__(self, event: str = "failure", conn_id: str = ALERTS_CONN_ID, context: Any = None):
        super().__init__(context)
        self.event, self.conn_id = event, conn_id

    def notify(self, context: Any) -> None:
        try:
            text = {"failure": failure_text, "promotion": promotion_text, "deadline": deadline_text}[self.event](
                context
            )
            if text is None:
                return
            send_alert(text, self.conn_id)
        except Exception as exc:  # an alert must never change the outcome of what it reports
            self.log.warning("alert: %s not sent to the webhook of connection %s: %s", self.event, self.conn_id, exc)


def deadline_alerts_on() -> bool:
    """``FINETUNE_DEADLINE_ALERTS`` (default false). Off by default because Airflow 3.3.2's
    ``dag.test()`` -- so ``airflow dags test`` and ``finetune run`` -- fails on a DAG with a
    ``deadline`` (its in-memory DAG looks the alerts up by an id they only get once stored); the
    scheduler handles them. Turn it on where the scheduler runs the DAGs."""
    value = os.environ.get("FINETUNE_DEADLINE_ALERTS", "false").strip().lower()
    if value not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        raise ConfigError(f"FINETUNE_DEADLINE_ALERTS: expected true or false, got {value!r}")
    return value in ("true", "1", "yes", "on")


def deadline_alert(interval: timedelta) -> DeadlineAlert | None:
    """An alert when a run is still going ``interval`` after it was queued (None while
    ``deadline_alerts_on`` is false). A SyncCallback: the executor runs it with the DAG bundle on
    its path, so it finds this module."""
    if not deadline_alerts_on():
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=interval,
        callback=SyncCallback(WebhookNotifier, kwargs={"event": "deadline"}),
    )


ON_FAILURE = WebhookNotifier("failure")
ON_PROMOTION = WebhookNotifier("promotion")
