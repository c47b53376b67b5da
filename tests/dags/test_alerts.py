"""Alerts through the Airflow connection ``finetune_alerts`` to a real loopback webhook: a failed
task sends one message naming the DAG, run, task, the step's error and the log link; a new
champion sends one; a run past its deadline sends one through Airflow's own callback runner; no
connection sends nothing and changes nothing."""

import json
import uuid
from types import SimpleNamespace

import pytest

from tests.faults import closed_port, webhook_receiver
from tests.helpers import DAGS


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["collect"]


def connection(url: str) -> str:
    return json.dumps({"conn_type": "http", "host": url})


def test_a_failed_task_sends_one_message_naming_dag_run_task_error_and_log(
    dag, airflow_db, monkeypatch, tmp_path, deployment_allows
):
    deployment_allows(sources=[tmp_path], model_names=["alerts-*"])
    with webhook_receiver() as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", connection(receiver.url))
        run = dag.test(
            run_conf={"source": [str(tmp_path / "nothing-*.jsonl")], "model_name": f"alerts-{uuid.uuid4().hex[:8]}"}
        )
    assert run.state == "failed"
    [message] = receiver.messages  # one, from the task that failed (announce never ran)
    text = message["text"]
    assert set(message) == {"text"}  # Slack-compatible
    assert "task `collect` of DAG `collect` failed" in text and f"run `{run.run_id}`" in text
    assert f"source {tmp_path}/nothing-*.jsonl matches no files (exit code 2)" in text  # from error.json
    assert "log: http://localhost:8080/dags/collect/runs/" in text and "/tasks/collect" in text


def test_without_a_connection_nothing_is_sent_and_the_outcome_is_unchanged(
    dag, airflow_db, monkeypatch, tmp_path, deployment_allows
):
    deployment_allows(sources=[tmp_path], model_names=["alerts-*"])
    monkeypatch.delenv("AIRFLOW_CONN_FINETUNE_ALERTS", raising=False)
    with webhook_receiver() as receiver:
        run = dag.test(
            run_conf={"source": [str(tmp_path / "nothing-*.jsonl")], "model_name": f"alerts-{uuid.uuid4().hex[:8]}"}
        )
    assert run.state == "failed" and receiver.messages == []
    [collect] = [ti for ti in run.get_task_instances() if ti.task_id == "collect"]
    assert collect.state == "failed" and collect.try_number == 1  # bad input: not retried, as with alerts


def test_an_unreachable_webhook_does_not_change_the_outcome(dag, airflow_db, monkeypatch, tmp_path, deployment_allows):
    deployment_allows(sources=[tmp_path], model_names=["alerts-*"])
    monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", connection(f"http://127.0.0.1:{closed_port()}/hook"))
    run = dag.test(
        run_conf={"source": [str(tmp_path / "nothing-*.jsonl")], "model_name": f"alerts-{uuid.uuid4().hex[:8]}"}
    )
    assert run.state == "failed"


def test_an_alias_moved_outside_the_pipeline_fails_the_aliases_dag_and_its_alert_names_it(
    dagbag, airflow_db, monkeypatch
):
    """The scheduled `aliases` DAG: champion moved in MLflow's API (as its UI does) without the
    pipeline -> the task fails at once, its alert naming the alias, both versions and the window;
    once the move is adopted through promote (audited) the check passes."""
    from pipeline import promote
    from pipeline.config import load_config
    from pipeline.tracking import client
    from tests.helpers import MODEL_NAME, register_version

    tracker = client()
    v1, v2 = register_version(tracker, 0.80), register_version(tracker, 0.90)
    promote.run(load_config(None, ["run_id=p1", f"promote.version={v1}", "promote.requested_by=ana"]))
    tracker.set_registered_model_alias(MODEL_NAME, "champion", v2)  # what MLflow's UI does, unaudited
    with webhook_receiver() as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", connection(receiver.url))
        run = dagbag.dags["aliases"].test(run_conf={"model_name": MODEL_NAME})
    assert run.state == "failed"
    [task] = run.get_task_instances()
    assert task.try_number == 1  # a finding, not retried
    [message] = receiver.messages
    text = message["text"]
    assert "task `aliases` of DAG `aliases` failed" in text
    moved = f"{MODEL_NAME}: 1 alias(es) moved outside the pipeline: champion is version {v2}, but the pipeline's "
    assert moved + f"audit leaves it version {v1} (promoted by ana at " in text
    assert "moved outside the pipeline (MLflow's UI or API) between " in text and "(exit code 3)" in text
    assert str(tracker.get_registered_model(MODEL_NAME).aliases["champion"]) == v2  # the check moves nothing
    adopt = ["run_id=p2", f"promote.version={v2}", "promote.requested_by=ana", "promote.force=true"]
    promote.run(load_config(None, [*adopt, "promote.reason=adopting the UI move"]))
    assert dagbag.dags["aliases"].test(run_conf={"model_name": MODEL_NAME}).state == "success"


class FinishedTask:
    """What the success callback reads of a finished task instance: ids, log link, its result."""

    def __init__(self, task_id: str, result: dict):
        self.task_id, self.dag_id, self.run_id, self.try_number = task_id, "finetune", "manual__x", 1
        self.log_url = f"http://localhost:8080/dags/finetune/runs/manual__x/tasks/{task_id}"
        self.result = result

    def xcom_pull(self, task_ids):
        assert task_ids == self.task_id
        return self.result


@pytest.mark.parametrize(
    "task_id, result, announced",
    [
        ("register", {"model_name": "m", "version": "4", "promoted": True, "reason": "beats v3", "metrics": {}}, True),
        ("register", {"model_name": "m", "version": "4", "promoted": False, "reason": "worse", "metrics": {}}, False),
        (
            "register",
            {
                "model_name": "m",
                "version": "4",
                "promoted": False,
                "reason": "worse",
                "metrics": {},
                "outside_moves": ["champion is version 3, but the pipeline's audit leaves it version 2 (...)"],
            },
            "moved outside the pipeline: m champion is version 3",
        ),
        (
            "promote",
            {
                "model_name": "m",
                "version": "2",
                "outcome": "promoted",
                "target_alias": "champion",
                "previous_version": "4",
                "reason": "roll back",
            },
            True,
        ),
        (
            "promote",
            {
                "model_name": "m",
                "version": "2",
                "outcome": "unchanged",
                "target_alias": "champion",
                "previous_version": "2",
                "reason": "",
            },
            False,
        ),
    ],
)
def test_a_new_champion_is_announced_and_nothing_else(dagbag, monkeypatch, task_id, result, announced):
    import finetune_alerts

    with webhook_receiver() as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", connection(receiver.url))
        finetune_alerts.ON_PROMOTION({"ti": FinishedTask(task_id, result)})
    if isinstance(announced, str):  # not promoted, but an alias moved outside the pipeline
        [message] = receiver.messages
        assert announced in message["text"] and "is the new champion" not in message["text"]
    elif announced:
        [message] = receiver.messages
        assert f"m version {result['version']} is the new champion" in message["text"]
        assert f"/tasks/{task_id}" in message["text"]
    else:
        assert receiver.messages == []


def test_register_and_promote_tasks_announce_promotions_and_every_task_alerts_on_failure(dagbag):
    import finetune_alerts

    for dag_id in ("finetune", "collect", "promote", "aliases"):
        for task in dagbag.dags[dag_id].tasks:
            assert finetune_alerts.ON_FAILURE in task.on_failure_callback, (dag_id, task.task_id)
            promoting = task.task_id in ("register", "promote")
            assert (finetune_alerts.ON_PROMOTION in (task.on_success_callback or [])) == promoting


def test_a_run_past_its_deadline_sends_a_message_through_airflows_callback_runner(monkeypatch):
    from datetime import timedelta

    import structlog
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.sdk.execution_time.callback_supervisor import execute_callback

    monkeypatch.setenv("FINETUNE_DEADLINE_ALERTS", "true")
    bag = BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS)
    assert bag.import_errors == {}
    import finetune_tasks

    for dag_id, steps_ in (
        ("finetune", ["collect", "validate", "train", "evaluate", "register"]),
        ("promote", ["promote"]),
    ):
        [alert] = bag.dags[dag_id].deadline
        assert alert.interval == sum((finetune_tasks.execution_timeout(s) for s in steps_), timedelta(0))
    [alert] = bag.dags["finetune"].deadline
    context = {
        "dag_run": {"dag_id": "finetune", "run_id": "scheduled__2026-01-04", "state": "running"},
        "deadline": {"id": "d1", "deadline_time": "2026-01-04T08:00:00+00:00"},
    }
    with webhook_receiver() as receiver:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", connection(receiver.url))
        ok, error = execute_callback(
            alert.callback.path,
            {**alert.callback.kwargs, "context": context},
            dag_rel_path=None,
            bundle_path=None,
            log=structlog.get_logger("test"),
        )
    assert (ok, error) == (True, None)
    [message] = receiver.messages
    assert (
        "run `scheduled__2026-01-04` of DAG `finetune` is past its deadline (2026-01-04T08:00:00+00:00)"
        in message["text"]
    )


def test_deadline_alerts_are_off_by_default_and_a_bad_switch_fails_the_import(dagbag, monkeypatch):
    from airflow.dag_processing.dagbag import BundleDagBag

    assert not dagbag.dags["finetune"].deadline
    monkeypatch.setenv("FINETUNE_DEADLINE_ALERTS", "sometimes")
    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert "FINETUNE_DEADLINE_ALERTS: expected true or false, got 'sometimes'" in next(iter(bag.import_errors.values()))


def test_a_notifier_needs_no_airflow_task_to_build_its_text():
    import finetune_alerts

    ti = SimpleNamespace(task_id="announce", dag_id="collect", run_id="r", try_number=3, log_url="http://l")
    text = finetune_alerts.failure_text({"ti": ti, "exception": RuntimeError("asset store down")})
    assert (
        "task `announce` of DAG `collect` failed in run `r` (try 3)\nerror: asset store down\nlog: http://l"
        == text.removeprefix("finetune-pipeline: ")
    )
