"""Alias events through the Airflow connection ``finetune_events`` to real loopback receivers: the
success callback of a promote task, fed the result of a real promotion against the MLflow store,
POSTs one event per alias moved, signed with HMAC-SHA256 over the raw body; a 503 is tried again
once; a dead receiver leaves the move standing and raises an alert; a 4xx is not retried; no
connection sends nothing. The promote DAG's roll-back test sends them through Airflow's task runner
(tests/dags/test_promote_dag.py)."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time

import pytest

from pipeline import promote
from pipeline.config import load_config
from pipeline.tracking import client
from tests.faults import SignedReceiver, closed_port, signed_receiver, webhook_receiver
from tests.helpers import MODEL_NAME, aliases, promotion_audit, register_version


class FinishedTask:
    """What the success callback reads of a finished task instance: ids, log link, its result."""

    def __init__(self, task_id: str, result: dict, dag_id: str = "promote"):
        self.task_id, self.dag_id, self.run_id, self.try_number = task_id, dag_id, "manual__events", 1
        self.log_url = f"http://localhost:8080/dags/{dag_id}/runs/manual__events/tasks/{task_id}"
        self.result = result

    def xcom_pull(self, task_ids):
        assert task_ids == self.task_id
        return self.result


def promoted(version: str, *sets: str) -> dict:
    """A real promotion of ``version`` to champion, as its task's XCom carries it (the result JSON)."""
    result = promote.run(load_config(None, ["run_id=events", f"promote.version={version}", *sets]))
    return json.loads(json.dumps(dataclasses.asdict(result)))


def connection(url: str, secret: str = "") -> str:
    return json.dumps({"conn_type": "http", "host": url, **({"password": secret} if secret else {})})


@pytest.fixture
def events(dagbag, monkeypatch):
    """The success callback of register and promote tasks, and an alert receiver on ``finetune_alerts``."""
    import finetune_events

    with webhook_receiver() as alerts:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", json.dumps({"conn_type": "http", "host": alerts.url}))
        yield finetune_events.ON_ALIAS_MOVES, alerts


def test_a_promotion_sends_one_signed_event_per_alias_it_moved(events, monkeypatch):
    notifier, alerts = events
    tracker = client()
    v1, v2 = register_version(tracker, 0.80), register_version(tracker, 0.90)
    promoted(v1, "promote.requested_by=ana")
    secret = secrets.token_hex(16)
    with signed_receiver(secret) as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", connection(receiver.url, secret))
        result = promoted(v2, "promote.requested_by=ana", "promote.reason=better on refunds")
        notifier({"ti": FinishedTask("promote", result)})
    assert len(receiver.requests) == 2 and len(receiver.accepted) == 2  # each verified, none retried
    kept, champion = receiver.accepted  # in the order the registry lock moved them
    assert (kept["alias"], kept["version"], kept["previous_version"]) == ("previous_champion", v1, None)
    assert (champion["alias"], champion["version"], champion["previous_version"]) == ("champion", v2, v1)
    assert champion["metrics"] == {"accuracy": 0.9} and kept["metrics"] == {"accuracy": 0.8}
    assert champion["gate"] == {"passed": True, "metric": "accuracy", "reason": "", "forced": False}
    assert champion["requested_by"] == "ana" and champion["reason"] == "better on refunds"
    assert champion["airflow"]["dag_id"] == "promote" and champion["airflow"]["run_id"] == "manual__events"
    [audit] = [r for r in promotion_audit(tracker) if r.data.tags["promotion.version"] == v2]
    assert champion["mlflow"]["audit_run_id"] == kept["mlflow"]["audit_run_id"] == audit.info.run_id
    assert champion["mlflow"]["model_uri"] == f"models:/{MODEL_NAME}/{v2}" and champion["moved_at"]
    for raw, headers in receiver.requests:
        assert headers["X-Finetune-Delivery"] == json.loads(raw)["delivery_id"]
        assert headers["X-Finetune-Event"] == "alias.moved"
        tampered = raw.replace(b'"version":"', b'"version":"1', 1)
        assert not receiver.verified(tampered, headers["X-Finetune-Signature"])  # the check can fail
        assert not SignedReceiver("", "another secret", []).verified(raw, headers["X-Finetune-Signature"])
    assert kept["delivery_id"] != champion["delivery_id"]
    assert alerts.messages == []


def test_a_503_then_200_is_tried_twice_and_delivered_once(events, monkeypatch):
    notifier, alerts = events
    v1 = register_version(client(), 0.80)
    secret = secrets.token_hex(16)
    with signed_receiver(secret, answers=[503]) as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", connection(receiver.url, secret))
        result = promoted(v1)
        started = time.monotonic()
        notifier({"ti": FinishedTask("promote", result)})
        elapsed = time.monotonic() - started
    [(first, _), (second, _)] = receiver.requests  # one retry, the same event
    assert first == second
    [event] = receiver.accepted
    assert (event["alias"], event["version"], event["previous_version"]) == ("champion", v1, None)
    assert 1.0 <= elapsed < 5  # the first back-off, then delivered
    assert alerts.messages == []


def test_a_dead_receiver_leaves_the_promotion_standing_and_raises_an_alert(events, monkeypatch):
    notifier, alerts = events
    tracker = client()
    v1 = register_version(tracker, 0.80)
    port = closed_port()
    dead = f"http://127.0.0.1:{port}/hooks/finetune"
    monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", connection(dead, secrets.token_hex(16)))
    result = promoted(v1)
    started = time.monotonic()
    notifier({"ti": FinishedTask("promote", result)})  # does not raise: the task's success stands
    elapsed = time.monotonic() - started
    assert aliases(tracker) == {"champion": v1}
    [alert] = alerts.messages
    text = alert["text"]
    assert "1 alias event(s) not delivered to connection `finetune_events`" in text
    assert f"(http://127.0.0.1:{port}/hooks/finetune): ConnectionRefusedError" in text and "(3 tries)" in text
    assert f"the alias move(s) stand: {MODEL_NAME} champion (none) -> {v1} (DAG `promote`" in text
    assert "log: http://localhost:8080/dags/promote/runs/manual__events/tasks/promote" in text
    assert 3.0 <= elapsed < 10  # back-off 1 s then 2 s, bounded


@pytest.mark.parametrize(
    "answers, secret, alerted",
    [
        ([400], "s", "HTTP 400 Bad Request (not retried)"),  # a refusal is not retried
        ([], "", "has no secret (its password or extra 'secret'): events are never sent unsigned"),
    ],
)
def test_a_refusal_or_a_missing_secret_is_alerted_and_not_retried(events, monkeypatch, answers, secret, alerted):
    notifier, alerts = events
    v1 = register_version(client(), 0.80)
    with signed_receiver(secret or "unused", answers=answers) as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", connection(receiver.url, secret))
        notifier({"ti": FinishedTask("promote", promoted(v1))})
    assert len(receiver.requests) == len(answers) and receiver.accepted == []
    [alert] = alerts.messages
    assert alerted in alert["text"]


def test_without_the_connection_or_a_move_nothing_is_sent_and_nothing_fails(events, monkeypatch):
    notifier, alerts = events
    monkeypatch.delenv("AIRFLOW_CONN_FINETUNE_EVENTS", raising=False)
    v1 = register_version(client(), 0.80)
    notifier({"ti": FinishedTask("promote", promoted(v1))})
    secret = secrets.token_hex(16)
    with signed_receiver(secret) as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", connection(receiver.url, secret))
        unchanged = promoted(v1)  # already champion: nothing moved
        assert unchanged["outcome"] == "unchanged" and unchanged["alias_moves"] == []
        notifier({"ti": FinishedTask("promote", unchanged)})
    assert receiver.requests == [] and alerts.messages == []


def test_register_and_promote_tasks_send_alias_events_and_no_other_task_does(dagbag):
    import finetune_events

    for dag_id in ("finetune", "collect", "promote", "aliases"):
        for task in dagbag.dags[dag_id].tasks:
            sends = finetune_events.ON_ALIAS_MOVES in (task.on_success_callback or [])
            assert sends == (task.task_id in ("register", "promote")), (dag_id, task.task_id)
