"""Shared fixtures: a private FINETUNE_HOME per test, a tiny BERT built from a config with
MiniLM's real tokenizer, and small labelled data sets written as real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import build_tiny_lm, free_port, moto_server, shipped_rows, write_jsonl


@pytest.fixture(autouse=True)
def finetune_home(tmp_path, monkeypatch):
    """Every test gets its own artifact store, MLflow SQLite file and Airflow home."""
    home = tmp_path / "home"
    monkeypatch.setenv("FINETUNE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FINETUNE_ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture
def deployment_allows(tmp_path, monkeypatch):
    """As a real deployment would let its triggers pick its data and model names: ``allow(sources,
    model_names, **settings)`` writes a config file (FINETUNE_CONFIG) whose collect.allowed_sources
    add ``sources`` to the shipped data and whose allowed_model_names are ``model_names``."""
    import yaml

    def allow(sources=(), model_names=(), **settings):
        tree = {**settings, "allowed_model_names": list(model_names)}
        collect = tree.setdefault("collect", {})
        collect["allowed_sources"] = ["pkg://pipeline/data/", *map(str, sources)]
        path = tmp_path / "deployment-allows.yaml"
        path.write_text(yaml.safe_dump(tree))
        monkeypatch.setenv("FINETUNE_CONFIG", str(path))
        return path

    return allow


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (random weights, the same in every session: tests that train it assert what
    it learns) saved like a pretrained checkpoint, with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline import storage
    from pipeline.config import DEFAULT_BASE_MODEL

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(storage.local_path(DEFAULT_BASE_MODEL)))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def small_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "small.jsonl", shipped_rows(labels=3, per_label=40))


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, tiny_model_dir):
    """The tiny BERT with a (random) 3-way classification head, as train would publish it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = ["order_status", "password_reset", "refund_request"]
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    path = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """Moto's S3 API in server mode on a free loopback port, reached through AWS_ENDPOINT_URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 API; moto accepts any signature, so the keys are dummies."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "moto-dummy")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto-dummy")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A real `mlflow server` on loopback: a fresh PostgreSQL database as its backend store and
    the loopback S3 API as its artifact store, proxied, so clients need no S3 access."""
    import subprocess
    import sys
    import time
    import urllib.request
    import uuid

    try:
        import psycopg2

        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    except Exception as exc:  # CI and our machines have it; elsewhere say why
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {exc}")
    database = f"mlflow_test_{uuid.uuid4().hex[:10]}"
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {database}")
    port = free_port()
    import boto3

    s3_env = {
        "AWS_ENDPOINT_URL": s3_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "moto-dummy",
        "AWS_SECRET_ACCESS_KEY": "moto-dummy",
    }
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="moto-dummy",
        aws_secret_access_key="moto-dummy",
    ).create_bucket(Bucket=database.replace("_", "-"))
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
            "--artifacts-destination",
            f"s3://{database.replace('_', '-')}/mlflow",
            "--workers",
            "2",
        ],
        env={**server_env, **s3_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("mlflow server exited at start-up") from None
            time.sleep(0.5)
    else:
        raise RuntimeError("mlflow server did not become healthy in 120 s")
    yield url
    server.terminate()
    server.wait(timeout=30)
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


# The LLM path through the real DAG costs a ZeRO-3 training and an evaluation with generation;
# one run serves two tests of test_e2e: one reads its registry, the other its artifacts.
CAUSAL_LM_RUN = [
    "--source",
    "pkg://pipeline/data/support_instructions.jsonl",
    "--set",
    "task=causal-lm",
    "--set",
    "model_name=support-chat",
    "--set",
    "train.zero_stage=3",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.learning_rate=1e-3",
    "--set",
    "train.max_seq_len=256",
    "--set",
    "evaluate.generate_rows=4",
]


@pytest.fixture(scope="session")
def causal_lm_run(tmp_path_factory, tiny_lm_dir):
    """`finetune run` of the causal-LM path (the shipped instruction/chat data, the tiny Llama,
    ZeRO-3 over 2 processes) in a FINETUNE_HOME of its own, set up as ``finetune_home`` sets up
    each test's: the finished process and that home. A test that reads its registry or artifacts
    points FINETUNE_HOME there."""
    import subprocess
    import sys
    from types import SimpleNamespace

    home = tmp_path_factory.mktemp("causal-lm-run") / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "FINETUNE_ARTIFACT_ROOT", "AIRFLOW_HOME")
    }
    env.update(
        FINETUNE_HOME=str(home), HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false", TOKENIZERS_PARALLELISM="false"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *CAUSAL_LM_RUN, "--set", f"base_model={tiny_lm_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return SimpleNamespace(done=done, home=home)
