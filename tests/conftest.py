"""Shared fixtures: a private FINETUNE_HOME per test, a tiny BERT built from a config with
MiniLM's real tokenizer, and small labelled data sets written as real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import shipped_rows, write_jsonl


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (random weights) saved like a pretrained checkpoint, with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline import storage
    from pipeline.config import DEFAULT_BASE_MODEL

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(storage.local_path(DEFAULT_BASE_MODEL)))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
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
        tiny_model_dir, num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    path = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path
