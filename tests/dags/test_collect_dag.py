"""The collect DAG: integrity, and real runs through Airflow (`dag.test()`, tasks run by Airflow's
task runner against the metadata DB): a new snapshot is announced once on the model's snapshot
Asset, unchanged data never, and the Airflow connection `aws_default` reaches an S3 source."""

import json
import uuid

import pytest

from tests.helpers import shipped_rows, task_result, write_jsonl


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["collect"]


def test_graph_schedule_params_retries_and_docs(dag):
    from finetune_tasks import SNAPSHOTS

    assert dag.task_ids == ["collect", "announce"]
    assert dag.get_task("announce").upstream_task_ids == {"collect"}
    assert dag.get_task("announce").outlets == [SNAPSHOTS] and dag.get_task("announce").inlets == [SNAPSHOTS]
    assert dag.get_task("collect").outlets == []
    assert dag.timetable.expression == "0 0 * * *" and dag.catchup is False and dag.max_active_runs == 1  # @daily
    assert {"finetune", "mlops", "data"} <= set(dag.tags)
    assert all(task.retries == 2 and task.retry_exponential_backoff for task in dag.tasks)
    assert set(dag.params) == {"source", "model_name", "overrides"}
    assert dag.params["model_name"] == "support-intents"
    assert "<model_name>-snapshot" in dag.doc_md and "FINETUNE_COLLECT_SCHEDULE" in dag.doc_md


def snapshot_events(asset_name: str) -> list:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = (
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == asset_name)
            .order_by(AssetEvent.id)
        )
        events = session.scalars(query).all()
        return [
            {"extra": event.extra, "source_dag_id": event.source_dag_id, "source_task_id": event.source_task_id}
            for event in events
        ]


def test_new_snapshot_is_announced_once_unchanged_data_never(dag, airflow_db, tmp_path, deployment_allows):
    deployment_allows(sources=[tmp_path], model_names=["intents-*"])
    from pipeline import storage

    model = f"intents-{uuid.uuid4().hex[:8]}"  # its own Asset: events from other tests do not count
    data = write_jsonl(tmp_path / "intents.jsonl", shipped_rows(labels=3, per_label=10))
    first = dag.test(run_conf={"source": [str(data)], "model_name": model})
    assert first.state == "success"
    collected = task_result(first, "collect")
    [event] = snapshot_events(f"{model}-snapshot")
    assert event["extra"] == {"snapshot_uri": collected["snapshot_uri"], "sha256": collected["sha256"], "rows": 30}
    assert (event["source_dag_id"], event["source_task_id"]) == ("collect", "announce")
    assert storage.exists(event["extra"]["snapshot_uri"])

    again = dag.test(run_conf={"source": [str(data)], "model_name": model})
    assert again.state == "success"
    assert task_result(again, "announce")["announced"] is False
    assert len(snapshot_events(f"{model}-snapshot")) == 1

    write_jsonl(data, shipped_rows(labels=3, per_label=12))  # new rows: a new snapshot
    changed = dag.test(run_conf={"source": [str(data)], "model_name": model})
    assert changed.state == "success"
    events = snapshot_events(f"{model}-snapshot")
    assert len(events) == 2 and events[-1]["extra"]["rows"] == 36
    assert events[-1]["extra"]["sha256"] != event["extra"]["sha256"]


def test_s3_source_with_credentials_from_the_aws_default_connection(
    dag, airflow_db, s3_server, tmp_path, monkeypatch, deployment_allows
):
    import os

    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    deployment_allows(sources=[f"s3://{bucket}/"], model_names=["s3-*"])
    dummy = {"aws_access_key_id": "moto-dummy", "aws_secret_access_key": "moto-dummy"}  # moto accepts any
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", **dummy)
    s3.create_bucket(Bucket=bucket)
    rows = shipped_rows(labels=3, per_label=10)
    s3.put_object(Bucket=bucket, Key="intents/part-0.jsonl", Body=write_jsonl(tmp_path / "p.jsonl", rows).read_bytes())
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)  # nothing from the standard chain: only the connection can work
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": dummy["aws_access_key_id"],
                "password": dummy["aws_secret_access_key"],
                "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"},
            }
        ),
    )

    run = dag.test(run_conf={"source": [f"s3://{bucket}/intents/"], "model_name": f"s3-{uuid.uuid4().hex[:8]}"})
    assert run.state == "success"
    collected = task_result(run, "collect")
    assert collected["rows"] == 30
    assert not any(name.startswith("AWS_ACCESS") for name in os.environ)  # given to the step only
