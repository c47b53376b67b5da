"""Data-aware retraining through Airflow: an event on the default model's snapshot Asset, from the
collect DAG or from an outside producer through the REST API, queues the finetune DAG; the
scheduler's own asset-triggered run creation makes a run that consumed it; and that run's
`collect` task, run by `airflow tasks test` on that very run, collects the announced snapshot.
The run is stopped after collect and validate: training is the train step's business."""

import json
import uuid

from tests.helpers import shipped_rows, task_result, write_jsonl

ASSET = "support-intents-snapshot"  # the finetune DAG's: its default model_name's snapshots


def queued_for_finetune() -> list[str]:
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(
            session.scalars(
                select(AssetModel.name)
                .join(AssetDagRunQueue, AssetDagRunQueue.asset_id == AssetModel.id)
                .where(AssetDagRunQueue.target_dag_id == "finetune")
            )
        )


def scheduler_creates_asset_triggered_run():
    """One pass of the scheduler's run creation for asset-triggered DAGs: the DAGs whose asset
    condition is met (``DagModel.dags_needing_dagruns``), then their runs, consuming the events."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType
    from sqlalchemy import select

    with create_session() as session:
        query, triggered_date_by_dag = DagModel.dags_needing_dagruns(session)
        assert "finetune" in triggered_date_by_dag
        dag_models = [model for model in query.all() if model.dag_id == "finetune"]
        SchedulerJobRunner(job=Job())._create_dag_runs_asset_triggered(dag_models=dag_models, session=session)
    with create_session() as session:
        [dag_run] = session.scalars(
            select(DagRun).where(
                DagRun.dag_id == "finetune", DagRun.run_type == DagRunType.ASSET_TRIGGERED, DagRun.state == "queued"
            )
        )
        return dag_run, [event.extra for event in dag_run.consumed_asset_events]


def airflow_tasks_test(task_id: str, run_id: str) -> None:
    """`airflow tasks test finetune <task_id> <run_id>`, in this process (its DB and env)."""
    from airflow.cli import cli_parser

    args = cli_parser.get_parser().parse_args(["tasks", "test", "finetune", task_id, run_id])
    args.func(args)


def test_new_snapshot_from_the_collect_dag_retrains_on_that_snapshot(
    finetune_unpaused, dagbag, tmp_path, deployment_allows
):
    deployment_allows(sources=[tmp_path])
    data = write_jsonl(tmp_path / "intents.jsonl", shipped_rows(labels=3, per_label=10))
    # model_name spelled out: dag.test() runs tasks in this process, and Airflow's task runner merges
    # a run's conf into the task's Params in place, so an earlier test's model_name would linger.
    collect_run = dagbag.dags["collect"].test(run_conf={"source": [str(data)], "model_name": "support-intents"})
    announced = task_result(collect_run, "announce")
    assert announced["announced"] is True and announced["asset"] == ASSET
    assert queued_for_finetune() == [ASSET]

    dag_run, consumed = scheduler_creates_asset_triggered_run()
    assert consumed[-1] == {key: announced[key] for key in ("snapshot_uri", "sha256", "rows")}
    assert queued_for_finetune() == []

    airflow_tasks_test("collect", dag_run.run_id)
    collected = task_result(dag_run, "collect")
    # The shipped default source has 1,600 rows: these 30 are the announced snapshot's.
    assert (collected["snapshot_uri"], collected["sha256"], collected["rows"]) == (
        announced["snapshot_uri"],
        announced["sha256"],
        30,
    )
    airflow_tasks_test("validate", dag_run.run_id)
    validated = task_result(dag_run, "validate")
    assert validated["passed"] is True and validated["rows"] == 30


def test_outside_producer_through_the_rest_api_triggers_finetune(finetune_unpaused, tmp_path):
    from airflow.api_fastapi.app import create_app
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from pipeline import local

    # A snapshot published outside Airflow, by the collect step's own command.
    data = write_jsonl(tmp_path / "more.jsonl", shipped_rows(labels=4, per_label=10))
    published = local.launch_local(
        "collect", [f"collect.sources={json.dumps([str(data)])}", f"run_id=outside-{uuid.uuid4().hex[:8]}"]
    )
    with create_session() as session:
        asset_id = session.scalar(select(AssetModel.id).where(AssetModel.name == ASSET))
    api = TestClient(create_app(apps="core"))  # the real REST API, in this process
    response = api.post(
        "/api/v2/assets/events",
        json={
            "asset_id": asset_id,
            "extra": {
                "snapshot_uri": published["snapshot_uri"],
                "sha256": published["sha256"],
                "rows": published["rows"],
            },
        },
    )
    assert response.status_code == 200, response.text
    assert queued_for_finetune() == [ASSET]

    dag_run, consumed = scheduler_creates_asset_triggered_run()
    assert consumed[-1]["snapshot_uri"] == published["snapshot_uri"]
    airflow_tasks_test("collect", dag_run.run_id)
    collected = task_result(dag_run, "collect")
    assert (collected["sha256"], collected["rows"]) == (published["sha256"], 40)


def test_an_event_naming_no_snapshot_collects_the_source_param(finetune_unpaused, tmp_path):
    from airflow.api_fastapi.app import create_app
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    with create_session() as session:
        asset_id = session.scalar(select(AssetModel.id).where(AssetModel.name == ASSET))
    response = TestClient(create_app(apps="core")).post(
        "/api/v2/assets/events", json={"asset_id": asset_id, "extra": {"note": "new rows at the usual source"}}
    )
    assert response.status_code == 200, response.text

    dag_run, _ = scheduler_creates_asset_triggered_run()
    airflow_tasks_test("collect", dag_run.run_id)
    assert task_result(dag_run, "collect")["rows"] == 1600  # the `source` Param's default: the shipped data


def test_an_event_naming_a_file_outside_the_snapshot_store_is_refused_unread(finetune_unpaused, tmp_path, capfd):
    """Whoever may post an asset event reaches no further than whoever may trigger a run: an event
    naming a local credentials file (outside the snapshot store and collect.allowed_sources) fails
    collect before anything is read."""
    from airflow.api_fastapi.app import create_app
    from airflow.models.asset import AssetModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    creds = tmp_path / "creds.csv"
    creds.write_text("user,password\nadmin,hunter2\n")
    with create_session() as session:
        asset_id = session.scalar(select(AssetModel.id).where(AssetModel.name == ASSET))
    response = TestClient(create_app(apps="core")).post(
        "/api/v2/assets/events", json={"asset_id": asset_id, "extra": {"snapshot_uri": str(creds)}}
    )
    assert response.status_code == 200, response.text

    dag_run, _ = scheduler_creates_asset_triggered_run()
    capfd.readouterr()
    airflow_tasks_test("collect", dag_run.run_id)  # it logs the task's failure, as `airflow tasks test` does
    out, err = capfd.readouterr()
    assert f"ConfigError: asset event on {ASSET}: snapshot_uri {creds} is neither in the deployment's" in out + err
    assert task_result(dag_run, "collect") is None
    with create_session() as session:
        state = session.scalar(
            select(TaskInstance.state).where(TaskInstance.run_id == dag_run.run_id, TaskInstance.task_id == "collect")
        )
    assert state == "failed"
