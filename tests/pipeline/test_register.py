import json
import os
from pathlib import Path

import pytest

from pipeline import register, storage
from pipeline.config import load_config
from pipeline.errors import DataError
from pipeline.tracking import client
from tests.helpers import aliases


def _inputs(tmp_path, classifier_dir, name, promote, accuracy, metrics=None, champion=""):
    uris = {step: (tmp_path / f"{name}-{step}.json").as_uri() for step in ("collect", "train", "evaluate")}
    storage.write_json(uris["collect"], {"sha256": "ab" * 32, "rows": 100, "rows_train": 80, "rows_eval": 20})
    storage.write_json(uris["train"], {"model_uri": str(classifier_dir), "mlflow_run_id": "",
                                       "snapshot_uri": "file:///data/snap.parquet", "config_sha256": "cd" * 32})
    storage.write_json(uris["evaluate"], {"metrics": metrics or {"accuracy": accuracy, "macro_f1": accuracy},
                                          "gate_metric": "accuracy", "promote": promote, "reason": f"test {name}",
                                          "champion_version": champion})
    return load_config(None, [f"run_id={name}"] + [f"register.{step}_result_uri={uri}" for step, uri in uris.items()])


def test_register_versions_aliases_and_promotion(tmp_path, classifier_dir):
    first = register.run(_inputs(tmp_path, classifier_dir, "r1", True, 0.8))
    assert first.version == "1" and first.aliases == ["challenger", "champion"]
    second = register.run(_inputs(tmp_path, classifier_dir, "r2", False, 0.7))
    assert second.aliases == ["challenger"] and not second.promoted
    assert aliases(client()) == {"champion": "1", "challenger": "2"}
    third = register.run(_inputs(tmp_path, classifier_dir, "r3", True, 0.9, champion="1"))
    assert aliases(client()) == {"champion": "3", "challenger": "3", "previous_champion": "1"}
    # Evaluated against v1, but v3 is champion by now: register must not guess, v4 stays challenger.
    fourth = register.run(_inputs(tmp_path, classifier_dir, "r4", True, 0.95, champion="1"))
    assert not fourth.promoted and aliases(client()) == {"champion": "3", "challenger": "4", "previous_champion": "1"}
    version = client().get_model_version("support-intents", third.version)
    assert version.tags["finetune.run_id"] == "r3" and version.tags["metric.accuracy"] == "0.900000"
    assert json.loads(version.tags["finetune.gate"])["promote"] is True
    run = client().get_run(third.mlflow_run_id)
    assert run.data.tags["finetune.run_id"] == "r3"
    # Embedded default: artifacts stay beside the SQLite file under FINETUNE_HOME, not in ./mlruns.
    location = client().get_experiment_by_name("support-intents").artifact_location
    assert location == (Path(os.environ["FINETUNE_HOME"]) / "mlartifacts").as_uri()


def test_champion_loads_and_predicts_through_pyfunc(tmp_path, classifier_dir):
    import mlflow

    register.run(_inputs(tmp_path, classifier_dir, "p1", True, 0.8))
    model = mlflow.pyfunc.load_model("models:/support-intents@champion")
    predictions = model.predict(register.INPUT_EXAMPLE)
    assert len(predictions) == len(register.INPUT_EXAMPLE)
    assert set(predictions["label"]) <= {"order_status", "password_reset", "refund_request"}
    assert model.metadata.signature is not None
    local = mlflow.artifacts.download_artifacts("models:/support-intents@champion", dst_path=str(tmp_path / "m"))
    requirements = (tmp_path / "m" / "requirements.txt").read_text() if local else ""
    assert "transformers==" in requirements and "torch==" in requirements and "torchvision" not in requirements


def test_missing_gate_metric_registers_nothing(tmp_path, classifier_dir):
    register.run(_inputs(tmp_path, classifier_dir, "ok", True, 0.8))
    before = aliases(client())
    with pytest.raises(DataError, match="gate metric 'accuracy' missing from the evaluation metrics"):
        register.run(_inputs(tmp_path, classifier_dir, "bad", True, 0.9, metrics={"macro_f1": 0.9}))
    assert aliases(client()) == before
    assert len(client().search_model_versions("name='support-intents'")) == 1


def test_lineage_model_card_and_idempotent_rerun(tmp_path, classifier_dir, monkeypatch):
    import mlflow

    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "finetune")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-11-29T00:00:00+00:00")
    monkeypatch.setenv("AIRFLOW_CTX_TRY_NUMBER", "2")
    cfg = _inputs(tmp_path, classifier_dir, "lin", True, 0.8)
    first = register.run(cfg)
    version = client().get_model_version("support-intents", first.version)
    tags = version.tags
    assert tags["airflow.dag_id"] == "finetune" and tags["airflow.try_number"] == "2"
    assert tags["airflow.run_id"] == "manual__2026-11-29T00:00:00+00:00"
    assert tags["finetune.snapshot_sha256"] == "ab" * 32 and tags["finetune.config_sha256"] == "cd" * 32
    assert len(tags["finetune.git_commit"]) == 40  # this checkout's commit
    assert "## Intended use" in version.description and "| accuracy | 0.8000 | - |" in version.description
    card = mlflow.artifacts.load_text(f"runs:/{first.mlflow_run_id}/model_card.md")
    assert card == version.description

    again = register.run(cfg)  # a retried task: same pipeline run, same version
    assert again.version == first.version
    assert len(client().search_model_versions("name='support-intents'")) == 1
