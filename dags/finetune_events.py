"""Alias events: when ``register`` or ``promote`` moves ``champion``, ``challenger`` or
``previous_champion``, one signed JSON event per moved alias is POSTed to the deployment's Airflow
connection ``finetune_events``. The events are built from the step's result (its ``alias_moves``,
``gate``, ``mlflow_run_id``), which every launcher returns the same way, so a local process, a pod
and a Kubeflow job send the same events. No such connection: nothing is sent and nothing fails.

Each body is signed with HMAC-SHA256 under the connection's password (or its extra ``secret``),
sent as ``X-Finetune-Signature: sha256=<hex>`` (GitHub's form), beside ``X-Finetune-Delivery`` (the
body's ``delivery_id``, the same on every try of one event) and ``X-Finetune-Event: alias.moved``.
A 5xx answer, a refused connection or a timeout is tried again, ``TRIES`` times in all with
``BACKOFF_S`` between tries; anything else (a 4xx, a redirect) fails at once. A failed delivery
is logged and alerted through ``finetune_alerts``; it never fails the task, and the alias move
stands. Not a DAG file (``.airflowignore``); the task factory imports it as ``finetune_events``.

    AIRFLOW_CONN_FINETUNE_EVENTS='{"conn_type": "http", "host": "https://deploy.example.com/hooks/finetune", "password": "<secret>"}'
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import BaseNotifier
from finetune_alerts import connection_url, send_alert

from pipeline import steps

EVENTS_CONN_ID = "finetune_events"
SCHEMA = "finetune.alias_moved/1"
SIGNATURE_HEADER = "X-Finetune-Signature"
DELIVERY_HEADER = "X-Finetune-Delivery"
EVENT_HEADER = "X-Finetune-Event"
TRIES = 3
BACKOFF_S = (1.0, 2.0)  # before the second and the third try
TIMEOUT_S = 5.0  # per try: a dead receiver costs at most TRIES * TIMEOUT_S + sum(BACKOFF_S), 18 s
DELIVERY_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "x-finetune://alias-events")

# The result fields the events read (checked against each step's result dataclass).
REGISTER_KEYS = steps.result_keys("register", "model_name", "alias_moves", "gate", "mlflow_run_id")
PROMOTE_KEYS = steps.result_keys("promote", "model_name", "alias_moves", "gate", "mlflow_run_id", "requested_by")


@dataclass(frozen=True)
class Target:
    """Where the events go: the connection's URL and the secret their signatures are made with."""

    url: str
    secret: str


class DeliveryFailed(Exception):
    """An event was not accepted: the receiver refused it, or every try failed."""

    def __init__(self, message: str, tries: int):
        super().__init__(message)
        self.tries = tries


def events_target(conn_id: str = EVENTS_CONN_ID) -> Target | None:
    """The URL and secret of the Airflow connection ``conn_id``; None when there is none."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    url = connection_url(connection)
    if url is None:
        return None
    return Target(url, connection.password or str((connection.extra_dejson or {}).get("secret") or ""))


def who(dag_run: Any) -> str:
    """Who started the Airflow run: its triggering user, else what kind of run it is (the scheduler's, an asset's)."""
    user = getattr(dag_run, "triggering_user_name", None)
    if user:
        return str(user)
    run_type = getattr(dag_run, "run_type", None)
    return f"airflow:{getattr(run_type, 'value', run_type)}" if run_type else "unknown"


def airflow_run(context: Mapping[str, Any]) -> dict[str, Any]:
    """The Airflow task, run and user an event names."""
    ti = context["ti"]
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "log_url": ti.log_url,
        "triggered_by": who(context.get("dag_run")),
    }


def alias_events(result: Mapping[str, Any], airflow: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One event per alias the step's ``result`` says it moved, in the order it moved them."""
    model = result["model_name"]
    events = []
    for move in result.get("alias_moves") or []:
        audit_run_id = move.get("audit_run_id") or ""
        identity = [model, move["alias"], move["previous_version"], move["version"], audit_run_id]
        identity += [str(airflow["dag_id"]), str(airflow["run_id"]), str(airflow["task_id"])]
        events.append(
            {
                "schema": SCHEMA,
                "delivery_id": str(uuid.uuid5(DELIVERY_IDS, "/".join(identity))),
                "model": model,
                "alias": move["alias"],
                "version": move["version"],
                "previous_version": move["previous_version"] or None,
                "moved_at": move.get("at") or None,
                "metrics": move.get("metrics") or {},
                "gate": result.get("gate") or {},
                "requested_by": result.get("requested_by") or airflow["triggered_by"],
                "reason": move["why"],
                "airflow": dict(airflow),
                "mlflow": {
                    "run_id": result.get("mlflow_run_id") or None,
                    "audit_run_id": audit_run_id or None,
                    "model_uri": f"models:/{model}/{move['version']}",
                },
            }
        )
    return events


def body(event: Mapping[str, Any]) -> bytes:
    """The bytes sent and signed: compact UTF-8 JSON, keys sorted."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, payload: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the raw body under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A signed event goes where the connection says, never where a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(_NoRedirects)


def where(url: str) -> str:
    """``url`` for a log line or an alert: no user, password or query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def deliver(
    target: Target,
    event: Mapping[str, Any],
    tries: int = TRIES,
    backoff_s: Sequence[float] = BACKOFF_S,
    timeout_s: float = TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """POST ``event``, signed, to ``target``; how many tries it took. ``DeliveryFailed`` at once
    for an answer that is not 2xx or 5xx, or after ``tries`` 5xx answers, refusals or timeouts."""
    if not target.secret:
        raise DeliveryFailed(
            f"connection {EVENTS_CONN_ID} has no secret (its password or extra 'secret'): events are never sent unsigned",
            0,
        )
    payload = body(event)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "finetune-pipeline",
        SIGNATURE_HEADER: signature(target.secret, payload),
        DELIVERY_HEADER: str(event["delivery_id"]),
        EVENT_HEADER: "alias.moved",
    }
    error = ""
    for attempt in range(1, tries + 1):
        request = urllib.request.Request(target.url, data=payload, method="POST", headers=headers)
        try:
            with OPENER.open(request, timeout=timeout_s) as response:
                response.read()
            return attempt
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 500:
                raise DeliveryFailed(f"HTTP {exc.code} {exc.reason} (not retried)", attempt) from exc
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if not isinstance(reason, ConnectionError | TimeoutError):
                raise DeliveryFailed(f"{reason} (not retried)", attempt) from exc
            error = f"{type(reason).__name__}: {reason}"
        if attempt < tries:
            sleep(backoff_s[min(attempt, len(backoff_s)) - 1])
    raise DeliveryFailed(f"{error} ({tries} tries)", tries)


def moves_text(events: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{e['model']} {e['alias']} {e['previous_version'] or '(none)'} -> {e['version']}" for e in events)


def failed_text(target: Target, events: Sequence[Mapping[str, Any]], error: DeliveryFailed) -> str:
    airflow = events[0]["airflow"]
    return (
        f"finetune-pipeline: {len(events)} alias event(s) not delivered to connection `{EVENTS_CONN_ID}` "
        f"({where(target.url)}): {error}; the alias move(s) stand: {moves_text(events)} (DAG `{airflow['dag_id']}`, "
        f"run `{airflow['run_id']}`, task `{airflow['task_id']}`; delivery ids "
        f"{', '.join(str(e['delivery_id']) for e in events)})\nlog: {airflow['log_url']}"
    )


class AliasEventNotifier(BaseNotifier):
    """Sends the alias events of a finished ``register`` or ``promote`` task to the connection
    ``conn_id``: a task's ``on_success_callback``. Whatever happens, the task's outcome stands."""

    def __init__(self, conn_id: str = EVENTS_CONN_ID, context: Any = None):
        super().__init__(context)
        self.conn_id = conn_id

    def notify(self, context: Any) -> None:
        try:
            self.send(context)
        except Exception as exc:  # an event must never change the outcome of the move it reports
            self.log.warning("alias events: not sent: %s", exc)

    def send(self, context: Any) -> None:
        ti = context["ti"]
        events = alias_events(ti.xcom_pull(task_ids=ti.task_id) or {}, airflow_run(context))
        if not events:
            return
        target = events_target(self.conn_id)
        if target is None:
            self.log.info("alias events: no Airflow connection %s, nothing sent: %s", self.conn_id, moves_text(events))
            return
        for sent, event in enumerate(events):
            try:
                tries = deliver(target, event)
            except DeliveryFailed as exc:  # the receiver is down or refuses: the rest would fare no better
                text = failed_text(target, events[sent:], exc)
                self.log.error("alias events: %s", text)
                try:
                    send_alert(text)
                except Exception as alert_error:  # logged above already; the move stands either way
                    self.log.warning("alias events: the alert about it was not sent either: %s", alert_error)
                return
            self.log.info(
                "alias events: %s delivered to %s (delivery %s, %d tries)",
                moves_text([event]),
                where(target.url),
                event["delivery_id"],
                tries,
            )


ON_ALIAS_MOVES = AliasEventNotifier()
