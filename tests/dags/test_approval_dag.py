"""The approval gate through Airflow: the finetune DAG's shape with ``promote.require_approval``
on (every launcher), and the approval answered through Airflow's own REST API while ``dag.test()``
(what `airflow dags test` runs) waits on it: Approve moves champion as the person who answered,
Reject and the timeout (the scheduler's own sweep) record a refusal and move nothing, a version
that is not awaiting approval asks nobody. The same through a browser: tests/test_ui.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pendulum
import pytest

from pipeline import steps
from tests.faults import webhook_receiver
from tests.helpers import DAGS, MODEL_NAME, aliases, promotion_audit, register_version

TIMEOUT_S = 3  # the approval's timeout: only the timeout run lets it pass, and the scheduler's sweep then rejects


@pytest.fixture
def approval_on(tmp_path, monkeypatch):
    """A deployment whose approvals only ana may answer, within ``TIMEOUT_S``."""
    deployment = tmp_path / "approval.yaml"
    deployment.write_text(f"promote: {{require_approval: true, approvers: [ana], approval_timeout: {TIMEOUT_S}}}\n")
    monkeypatch.setenv("FINETUNE_CONFIG", str(deployment))
    return deployment


def load_finetune():
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert bag.import_errors == {}
    return bag.dags["finetune"]


class Upstream:
    """What the promote task's overrides read of a finished run: the approval's and register's XCom."""

    def __init__(self, results: dict):
        self.results = results

    def xcom_pull(self, task_ids):
        return self.results.get(task_ids)


@pytest.mark.parametrize("launcher", ["local", "kubernetes"])
def test_with_approval_on_register_is_followed_by_approve_then_the_promote_step_on_the_runs_launcher(
    approval_on, monkeypatch, launcher
):
    monkeypatch.setenv("FINETUNE_LAUNCHER", launcher)
    dag = load_finetune()
    import finetune_alerts  # on sys.path once a DAG file is parsed
    import finetune_events
    import finetune_operators

    order = ["collect", "validate", "train", "evaluate", "register", "approve", "promote"]
    assert sorted(dag.task_ids) == sorted(order)
    for upstream, downstream in zip(order, order[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    approve, promote = dag.get_task("approve"), dag.get_task("promote")
    assert approve.options == ["Approve", "Reject"] and approve.defaults == ["Reject"]  # a timeout never approves
    assert approve.assigned_users == [{"id": "ana", "name": "ana"}] and approve.response_timeout.total_seconds() == 3
    assert set(approve.serialized_params) == {"comment"}  # the run's Params are not asked again
    assert type(promote).__name__ == ("LocalStepOperator" if launcher == "local" else "StepPodOperator")
    assert {finetune_alerts.ON_PROMOTION, finetune_events.ON_ALIAS_MOVES} <= set(promote.on_success_callback)
    # The answer reaches the step's argv, the same on every launcher.
    answer = {"decision": "approved", "answered_by": "ana", "comment": "zh holds up"}
    context = {
        "ti": Upstream({"approve": answer, "register": {"version": "7", "model_name": MODEL_NAME}}),
        "task": promote,
        "params": {},
        "run_id": "manual__approved",
        "dag_run": None,
    }
    overrides = finetune_operators.run_overrides("promote", context)
    argv = steps.step_argv("promote", overrides)
    for expected in ('promote.version="7"', 'promote.requested_by="ana"', 'promote.reason="zh holds up"'):
        assert expected in argv
    assert argv[-2:] == ["--set", "promote.approval=approved"]
    if launcher == "kubernetes":
        pod = steps.render("promote", overrides, "kubernetes")
        assert pod["spec"]["containers"][0]["args"][: len(argv) - 1] == argv[1:]  # then where the result goes


def test_off_by_default_the_dag_is_the_five_steps(monkeypatch):
    monkeypatch.delenv("FINETUNE_CONFIG", raising=False)
    assert load_finetune().task_ids == ["collect", "validate", "train", "evaluate", "register"]


def gated_version(tracker, accuracy: float, champion: str) -> str:
    """A version as register leaves it awaiting approval: it passed evaluate's head-to-head with ``champion``."""
    version = register_version(tracker, accuracy)
    gate = {"gate_metric": "accuracy", "greater_is_better": True, "champion_version": champion}
    tracker.set_model_version_tag(MODEL_NAME, version, "finetune.gate", json.dumps(gate))
    return version


def approval_dag(registered: dict, empty: Path):
    """register > approve > promote as the finetune DAG wires them (the same factory, the same
    operators), after a stand-in for the steps before: evaluate's and validate's results, and
    register's for a version registered here (training one would prove nothing more)."""
    import finetune_tasks
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.sdk import DAG, chain, task

    with DAG(
        "approval_test",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        default_args={**finetune_tasks.DEFAULT_ARGS, "retries": 0},
    ) as dag:

        @task(task_id="validate")
        def validate():
            return {"passed": True, "rows": 120, "warnings": [], "data_docs_uri": "file:///docs"}

        @task(task_id="evaluate")
        def evaluate():
            return {"metrics": {"accuracy": 0.9}, "champion_version": "", "gate_metric": "accuracy", "reason": "ok"}

        @task(task_id="register")
        def register():
            return registered

        chain(
            validate(),
            evaluate(),
            register(),
            finetune_tasks.approval_task(),
            finetune_tasks.step_task("promote", "local"),
        )
    # Stored as the DAG processor stores a parsed DAG, so dag.test() can make its run.
    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=str(empty), bundle_path=empty)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag


def waiting_approval() -> str | None:
    """The run whose approval waits for an answer now (its task ``awaiting_input``), if any."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(
            select(TaskInstance.run_id).where(
                TaskInstance.dag_id == "approval_test",
                TaskInstance.task_id == "approve",
                TaskInstance.state == TaskInstanceState.AWAITING_INPUT,
            )
        )


def give_up(run_id: str) -> None:
    """Fail the waiting approval, so ``dag.test()`` ends and the test fails on what it finds."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(
            update(TaskInstance)
            .where(TaskInstance.run_id == run_id, TaskInstance.task_id == "approve")
            .values(state="failed")
        )


def beside_the_run(act) -> threading.Thread:
    """``act(run_id)`` in a thread once the run's approval waits, until it returns True (answered,
    or resolved) or 120 s pass; ``dag.test()`` waits on the approval meanwhile."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            run_id = waiting_approval()
            if run_id is not None and act(run_id):
                return
            time.sleep(0.5)
        if run_id := waiting_approval():
            give_up(run_id)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def answered_by(user: str, option: str, comment: str, refused_first: str, responses: list[int]):
    """A person answering the approval through Airflow's REST API (the Required Actions page calls
    the same endpoint) as ``user``; ``refused_first``, a user not among the approvers, tries first."""
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    api = TestClient(create_app(apps="core"))

    def as_user(name: str) -> dict[str, str]:
        jwt = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=name, role="ADMIN"))
        return {"Authorization": f"Bearer {jwt}"}

    def answer(run_id: str) -> bool:
        url = f"/api/v2/dags/approval_test/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails"
        body = {"chosen_options": [option], "params_input": {"comment": comment}}
        for name in (refused_first, user) if refused_first else (user,):
            responses.append(api.patch(url, json=body, headers=as_user(name)).status_code)
        return True

    return answer


def sweep_timeouts(run_id: str) -> bool:
    """The scheduler's own sweep of approvals past their timeout; True once this one is resolved."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()
    return waiting_approval() != run_id


def task_states(run_id: str) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        found = session.execute(
            select(TaskInstance.task_id, TaskInstance.state).where(
                TaskInstance.dag_id == "approval_test", TaskInstance.run_id == run_id
            )
        )
        return {task_id: str(state) for task_id, state in found}


@pytest.mark.slow
def test_approve_reject_and_timeout_through_airflows_task_runner_and_rest_api(
    approval_on, airflow_db, dagbag, tmp_path, monkeypatch
):
    from pipeline.tracking import client

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")  # users are who they say
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080")
    tracker = client()
    empty = tmp_path / "no-dag-files"
    empty.mkdir()
    first = gated_version(tracker, 0.8, champion="")

    def registered(version: str, awaiting: bool = True) -> dict:
        return {"model_name": MODEL_NAME, "version": version, "awaiting_approval": awaiting, "drift": []}

    # Approve: champion moves, as ana, with her comment; bo, not an approver, is refused by the API.
    responses: list[int] = []
    with webhook_receiver() as alerts:
        monkeypatch.setenv("AIRFLOW_CONN_FINETUNE_ALERTS", json.dumps({"conn_type": "http", "host": alerts.url}))
        answering = beside_the_run(answered_by("ana", "Approve", "zh holds up", "bo", responses))
        run = approval_dag(registered(first), empty).test()
        answering.join(timeout=10)
    assert responses == [403, 200]
    assert run.state == "success" and aliases(tracker) == {"champion": first}
    [asked] = [m["text"] for m in alerts.messages if "approval needed" in m["text"]]
    assert f"{MODEL_NAME} version {first} passed its gate" in asked
    assert f"http://127.0.0.1:8080/dags/approval_test/runs/{run.run_id}/tasks/approve/required_actions" in asked
    [record] = promotion_audit(tracker)
    assert record.data.tags["promotion.outcome"] == "promoted"
    assert record.data.tags["promotion.requested_by"] == "ana" and record.data.tags["promotion.reason"] == "zh holds up"

    # Reject: challenger only, the champion untouched, the refusal audited with who and why.
    second = gated_version(tracker, 0.9, champion=first)
    answering = beside_the_run(answered_by("ana", "Reject", "zh regressed", "", responses))
    run = approval_dag(registered(second), empty).test()
    answering.join(timeout=10)
    assert run.state == "success" and aliases(tracker) == {"champion": first}
    [refusal] = [r for r in promotion_audit(tracker) if r.data.tags["promotion.version"] == second]
    assert refusal.data.tags["promotion.why"] == "refused by ana: zh regressed"

    # Nobody answers: once the timeout has passed, the scheduler's sweep answers the default, Reject.
    third = gated_version(tracker, 0.95, champion=first)
    sweeping = beside_the_run(sweep_timeouts)
    run = approval_dag(registered(third), empty).test()
    sweeping.join(timeout=10)
    assert run.state == "success" and aliases(tracker) == {"champion": first}
    [timed_out] = [r for r in promotion_audit(tracker) if r.data.tags["promotion.version"] == third]
    assert timed_out.data.tags["promotion.outcome"] == "refused"
    assert timed_out.data.tags["promotion.why"] == (
        f"refused by airflow:approval_timeout: no answer within {TIMEOUT_S} s (promote.approval_timeout): Reject"
    )

    # The gate refused (or promotion was off): nobody is asked, promote is skipped.
    run = approval_dag(registered(gated_version(tracker, 0.5, champion=first), awaiting=False), empty).test()
    states = task_states(run.run_id)
    assert states["approve"] == "skipped" and states["promote"] == "skipped" and run.state == "success"
    assert len(promotion_audit(tracker)) == 3
