"""End to end: `finetune run` drives the real DAG through `airflow dags test` (SQLite Airflow),
real DeepSpeed over 2 processes and real MLflow; assertions are on the registry."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import load_config, safe_run_id
from tests.helpers import shipped_rows, write_jsonl

pytestmark = pytest.mark.e2e  # the runs that train are marked slow too


def _finetune_run(*args):
    command = [sys.executable, "-m", "pipeline", "run", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


# Enough training for the tiny random BERT to beat the majority class on small_data's eval rows, the
# floor under a first champion: 1 epoch at batch size 8 learnt nothing (accuracy 0.43, the majority
# class's); this reached 0.57 to 0.79 over three random inits, against 0.43.
LEARNS = ["--set", "train.epochs=8", "--set", "train.learning_rate=3e-3", "--set", "train.batch_size=4"]


def _deployment(tmp_path, *sources, model_names=()) -> list[str]:
    """`--config FILE` of a local user's deployment that lets `--source` pick ``sources`` and
    `--set model_name` the ``model_names``, as the refusal without it says to write."""
    path = tmp_path / "deployment.yaml"
    allowed = json.dumps(["pkg://pipeline/data/", *map(str, sources)])
    path.write_text(f"collect: {{allowed_sources: {allowed}}}\nallowed_model_names: {json.dumps(list(model_names))}\n")
    return ["--config", str(path)]


@pytest.mark.slow
def test_run_registers_a_champion_then_bad_data_changes_nothing(tmp_path, tiny_model_dir, small_data):
    from pipeline.tracking import client

    common = ["--set", f"base_model={tiny_model_dir}", *LEARNS]
    common += _deployment(tmp_path, small_data.parent)
    done = _finetune_run("--source", str(small_data), *common)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # No base_metrics (causal-lm only); the metrics per language of the eval rows beside the overall ones.
    assert set(summary) == {"model_name", "version", "aliases", "reason", "metrics", "run_id", "snapshot", "slices"}
    assert {"latin", "zh"} <= set(summary["slices"]) and all(s["rows"] > 0 for s in summary["slices"].values())
    assert summary["version"] == "1" and summary["aliases"] == ["challenger", "champion"], summary["reason"]
    assert (
        summary["reason"].startswith("no champion yet; accuracy=") and "beats the majority-class" in summary["reason"]
    )
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0
    assert summary["run_id"].startswith("manual__")

    tracker = client()
    version = tracker.get_model_version_by_alias("support-intents", "champion")
    assert str(version.version) == "1" and version.tags["finetune.run_id"] == summary["run_id"]
    assert version.tags["finetune.snapshot_uri"] == summary["snapshot"]
    run = tracker.get_run(version.run_id)
    assert run.data.metrics["eval_accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert run.data.params["train.epochs"] == "8"
    assert tracker.get_metric_history(run.info.run_id, "train_loss")
    artifacts = {a.path for a in tracker.list_artifacts(run.info.run_id, "evaluate")}
    assert "evaluate/confusion_matrix.png" in artifacts
    assert [a.path for a in tracker.list_artifacts(run.info.run_id, "train")] == [
        "train/deepspeed_config.json",
        "train/training_summary.json",
    ]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"train", "eval"}

    bad = write_jsonl(tmp_path / "bad.jsonl", shipped_rows(3, 10) + [{"text": "no label here", "label": None}])
    failed = _finetune_run("--source", str(bad), *common)
    assert failed.returncode != 0
    assert "step 'validate' failed" in failed.stderr
    assert "expect_column_values_to_not_be_null(column=label): 1 unexpected" in failed.stderr
    assert len(tracker.search_model_versions("name='support-intents'")) == 1
    assert str(tracker.get_model_version_by_alias("support-intents", "champion").version) == "1"


def test_unknown_key_and_bad_value_fail_before_airflow_starts():
    unknown = _finetune_run("--set", "train.epoch=2")
    assert unknown.returncode == 2
    assert "unknown config key 'train.epoch'" in unknown.stderr and "did you mean 'train.epochs'" in unknown.stderr
    bad = _finetune_run("--set", "train.learning_rate=fast")
    assert bad.returncode == 2 and "train.learning_rate: expected a number, got 'fast'" in bad.stderr


def _holding(secrets: dict[str, str], where: str, data: bytes) -> list[str]:
    return [f"{name} in {where}" for name, secret in secrets.items() if secret.encode() in data]


def _secrets_found(secrets: dict[str, str], done, home: Path, s3_endpoint: str) -> list[str]:
    """Where any of ``secrets`` shows: the run's output (every task log: `airflow dags test` runs the
    tasks in its process), every file under FINETUNE_HOME (Airflow's database and logs, snapshots,
    published models, scratch), MLflow's PostgreSQL store (pg_dump) and every object on the S3 API
    (the server's artifacts)."""
    import boto3
    import psycopg2

    found = _holding(secrets, "the run's output", (done.stdout + done.stderr).encode())
    for path in (p for p in home.rglob("*") if p.is_file()):
        found += _holding(secrets, str(path), path.read_bytes())
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    with admin, admin.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE 'mlflow_test_%'")
        databases = [row[0] for row in cursor.fetchall()]
    admin.close()
    assert databases  # the server's store is among them
    for database in databases:
        dump = subprocess.run(
            ["pg_dump", "-h", "127.0.0.1", "-U", "postgres", database], capture_output=True, check=True, timeout=120
        )
        found += _holding(secrets, f"PostgreSQL database {database}", dump.stdout)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    objects = 0
    for bucket in (b["Name"] for b in s3.list_buckets()["Buckets"]):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                objects += 1
                body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                found += _holding(secrets, f"s3://{bucket}/{item['Key']}", body)
    assert objects  # the model's artifacts, at least
    return found


@pytest.mark.slow
def test_against_a_remote_mlflow_server_on_postgres_with_s3_artifacts(
    mlflow_server, s3_server, s3, monkeypatch, tiny_model_dir, small_data, tmp_path
):
    """The same run against `mlflow server` (PostgreSQL, artifacts proxied to the S3 API), its data
    read from S3, with a password in the tracking URI and secrets in the environment: none of them is
    in any log, result, artifact or store afterwards. The champion then loads and predicts in a fresh
    process, from the server."""
    import os

    import boto3

    secrets = {name: f"{name.lower()}-{os.urandom(6).hex()}" for name in ("PASSWORD", "AWS", "HF_TOKEN", "MLFLOW")}
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", mlflow_server.replace("http://", f"http://finetune:{secrets['PASSWORD']}@")
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets["AWS"])  # moto accepts any; collect signs with it
    monkeypatch.setenv("HF_TOKEN", secrets["HF_TOKEN"])
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secrets["MLFLOW"])  # sent as a bearer token; the server ignores it
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    boto3.client("s3").upload_file(str(small_data), s3, "intents/small.jsonl")
    source = f"s3://{s3}/intents/small.jsonl"
    name = "remote-intents"
    done = _finetune_run(
        *_deployment(tmp_path, f"s3://{s3}/intents/", model_names=[name]),
        "--source",
        source,
        "--set",
        f"base_model={tiny_model_dir}",
        *LEARNS,
        "--set",
        f"model_name={name}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    from pipeline.tracking import client

    version = client().get_model_version_by_alias(name, "champion")
    assert str(version.version) == summary["version"] and version.tags["finetune.run_id"] == summary["run_id"]
    assert client().get_experiment_by_name(name).artifact_location.startswith("mlflow-artifacts:")
    from pipeline import storage

    manifest = storage.read_json(summary["snapshot"].rsplit("/", 1)[0] + "/manifest.json")
    assert [entry["uri"] for entry in manifest["sources"]] == [source]  # collect read it, from S3
    assert _secrets_found(secrets, done, Path(os.environ["FINETUNE_HOME"]), s3_server) == []

    probe = (
        "import json, mlflow, sys; m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "print(json.dumps(m.predict(['where is my parcel', '我要退款'])['label'].tolist()))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe, f"models:/{name}@champion"], capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    labels = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert len(labels) == 2 and set(labels) <= {r["label"] for r in shipped_rows(3, 40)}  # small_data's intents


@pytest.mark.slow
def test_causal_lm_run_registers_a_chat_model_better_than_its_base(causal_lm_run, monkeypatch):
    """The LLM path through the same DAG: the shipped instruction/chat data, the tiny Llama,
    ZeRO-3 over 2 processes; the registered model's eval perplexity beats the base model's.
    The run is tests/conftest.py's ``causal_lm_run`` (the next test reads its artifacts)."""
    from pipeline.tracking import client

    monkeypatch.setenv("FINETUNE_HOME", str(causal_lm_run.home))  # the run's registry
    done = causal_lm_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["aliases"] == ["challenger", "champion"]
    assert summary["metrics"]["perplexity"] < summary["base_metrics"]["perplexity"]
    # Of evaluate.generate_rows=4 greedy answers, the share that ended with a stop token: both models.
    assert {summary["metrics"]["stop_rate"] * 4, summary["base_metrics"]["stop_rate"] * 4} <= {0.0, 1.0, 2.0, 3.0, 4.0}
    version = client().get_model_version_by_alias("support-chat", "champion")
    run = client().get_run(version.run_id)
    assert run.data.metrics["eval_perplexity"] == pytest.approx(summary["metrics"]["perplexity"])
    assert run.data.metrics["base_eval_perplexity"] == pytest.approx(summary["base_metrics"]["perplexity"])
    assert json.loads(version.tags["finetune.gate"])["greater_is_better"] is False
    assert version.tags["finetune.task"] == "causal-lm"
    assert "evaluate/samples.json" in {a.path for a in client().list_artifacts(run.info.run_id, "evaluate")}
    trained = json.loads(open(client().download_artifacts(run.info.run_id, "train/training_summary.json")).read())
    assert (
        trained["conversations"]["kept"] + trained["conversations"]["dropped_overlong"]
        == trained["conversations"]["examples"]
    )


@pytest.mark.slow
def test_zero3_causal_lm_saved_weights_reload_to_the_in_memory_eval_loss(causal_lm_run, monkeypatch):
    # The ZeRO-3 training and the evaluation in a fresh process are those of the causal-LM DAG run
    # (tests/conftest.py's causal_lm_run, which the test above checks through the registry): the
    # local launcher, 2 processes, the shipped instruction/chat data, train.max_seq_len=256.
    monkeypatch.setenv("FINETUNE_HOME", str(causal_lm_run.home))
    assert causal_lm_run.done.returncode == 0, causal_lm_run.done.stderr[-3000:]
    run_id = safe_run_id(json.loads(causal_lm_run.done.stdout.strip().splitlines()[-1])["run_id"])
    run = load_config(None, [f"run_id={run_id}"])
    collected, result, evaluated = (
        storage.read_json(run.step_uri(step) + "/result.json") for step in ("collect", "train", "evaluate")
    )
    summary = storage.read_json(result["summary_uri"])
    assert summary["deepspeed"]["zero_stage"] == 3 and summary["trainer_world_size"] == 2
    assert summary["conversations"]["kept"] == collected["rows_train"]
    for epoch in summary["sharding"]["epochs"]:
        assert epoch["seen_twice"] == 0 and epoch["seen_per_rank"][0] == epoch["seen_per_rank"][1] > 0
    # Per-token loss of a random 1000-token model starts near ln(1000) = 6.9; token averaging
    # across ranks done wrong would double it.
    assert result["train_loss"] < 7.5
    # A fresh process loads the published safetensors: the same eval loss as the sharded weights
    # had in memory before the save (an empty ZeRO-3 save would give a random model's ~6.9).
    assert evaluated["metrics"]["eval_loss"] == pytest.approx(summary["eval_loss_in_memory"], rel=1e-5)
    assert evaluated["metrics"]["perplexity"] < evaluated["base_metrics"]["perplexity"]
    assert not evaluated["greater_is_better"] and evaluated["gate_metric"] == "perplexity"
    # Per language of the held-out conversations: their rows add up to the scored conversations.
    slices = evaluated["slices"]
    assert slices and all(v["perplexity"] > 1 for v in slices.values())
    assert sum(v["rows"] for v in slices.values()) == summary["eval_conversations"]["kept"]
    samples = storage.read_json(evaluated["report_uri"])
    assert len(samples) == 4 and {"prompt", "reference", "output", "rouge_l"} <= set(samples[0])
