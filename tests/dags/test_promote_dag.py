"""The promote DAG: integrity, and real runs through Airflow (`dag.test()`, what `airflow dags test`
runs, in this process against the metadata DB) against MLflow; the alias events its task sends
(more of them in tests/dags/test_events.py)."""

import json
import secrets

import pytest

from tests.faults import closed_port, signed_receiver, webhook_receiver
from tests.helpers import MODEL_NAME, aliases, promotion_audit, register_version


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["promote"]


def test_manual_only_one_task_params_validated(dag):
    from airflow.sdk.definitions.param import ParamValidationError

    assert dag.schedule is None and dag.max_active_runs == 1 and dag.task_ids == ["promote"]
    assert set(dag.params) == {"model_name", "version", "target_alias", "reason", "force"}
    # Retried only for what may clear by itself (exit 75); a refusal fails at once (AirflowFailException).
    assert dag.get_task("promote").retries == 2 and dag.get_task("promote").retry_exponential_backoff
    with pytest.raises(ParamValidationError):
        dag.params.get_param("target_alias").resolve("champ ion")
    with pytest.raises(ParamValidationError):
        dag.params.get_param("force").resolve("yes")


def events_connection(url: str, secret: str) -> str:
    return json.dumps({"conn_type": "http", "host": url, "password": secret})


@pytest.mark.slow
def test_roll_back_through_airflow_records_who_and_why(dag, airflow_db, monkeypatch):
    """...and sends a signed event for each alias it moved; with the events receiver dead, the
    promotion succeeds all the same and an alert says so."""
    from pipeline.tracking import client

    def promote(version, force=False, reason=""):
        """A run of the promote DAG as `airflow dags test` makes it (``dag.test()``: Airflow's task
        runner, the metadata DB, the step as a subprocess), in this process. Every Param is spelled
        out: the task runner merges a run's conf into the task's Params in place."""
        return dag.test(
            run_conf={
                "model_name": MODEL_NAME,
                "version": version,
                "target_alias": "champion",
                "force": force,
                "reason": reason,
            }
        )

    tracker = client()
    v1, v2 = register_version(tracker, 0.8), register_version(tracker, 0.9)
    tracker.set_registered_model_alias(MODEL_NAME, "previous_champion", v1)
    tracker.set_registered_model_alias(MODEL_NAME, "champion", v2)
    secret = secrets.token_hex(16)
    with signed_receiver(secret) as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", events_connection(receiver.url, secret))
        run = promote("previous_champion", force=True, reason="v2 misroutes refunds")
    assert run.run_id.startswith("manual__")
    assert aliases(tracker) == {"champion": v1, "previous_champion": v2}
    [record] = promotion_audit(tracker)
    assert record.data.tags["promotion.requested_by"] == "dag_test"  # `airflow dags test`'s user
    assert record.data.tags["promotion.reason"] == "v2 misroutes refunds"
    kept, champion = receiver.accepted  # each signature verified over the raw body, none retried
    assert len(receiver.requests) == 2
    assert (kept["alias"], kept["version"], kept["previous_version"]) == ("previous_champion", v2, v1)
    assert (champion["alias"], champion["version"], champion["previous_version"]) == ("champion", v1, v2)
    assert champion["requested_by"] == "dag_test" and champion["reason"] == "v2 misroutes refunds"
    assert champion["gate"]["forced"] is True and champion["mlflow"]["audit_run_id"] == record.info.run_id
    assert (champion["airflow"]["dag_id"], champion["airflow"]["run_id"]) == ("promote", run.run_id)

    with webhook_receiver() as alerts:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", json.dumps({"conn_type": "http", "host": alerts.url}))
        dead = f"http://127.0.0.1:{closed_port()}/hooks"
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_EVENTS", events_connection(dead, secret))
        assert promote(v2).state == "success"  # better than the champion v1: allowed, the receiver dead
    assert aliases(tracker)["champion"] == v2
    undelivered = [m["text"] for m in alerts.messages if "not delivered" in m["text"]]
    assert len(undelivered) == 1 and f"{MODEL_NAME} champion {v1} -> {v2}" in undelivered[0]
    monkeypatch.delenv("AIRFLOW_CONN_FINETUNE_ALERTS")
    promote(v1)  # worse than the champion, not forced
    assert aliases(tracker)["champion"] == v2
    outcomes = sorted(r.data.tags["promotion.outcome"] for r in promotion_audit(tracker))
    assert outcomes == ["promoted", "promoted", "refused"]
    assert (
        json.loads(tracker.get_model_version(MODEL_NAME, v2).tags["finetune.promoted_to.champion"])["forced"] is False
    )
