import json
import os
from pathlib import Path

import pytest

from pipeline import register, storage
from pipeline.config import load_config
from pipeline.errors import DataError
from pipeline.tracking import client


def _inputs(tmp_path, classifier_dir, name, promote, accuracy, metrics=None):
    train_uri = (tmp_path / f"{name}-train.json").as_uri()
    evaluate_uri = (tmp_path / f"{name}-evaluate.json").as_uri()
    storage.write_json(train_uri, {"model_uri": str(classifier_dir), "mlflow_run_id": "",
                                   "snapshot_uri": "file:///data/snap.parquet"})
    storage.write_json(evaluate_uri, {"metrics": metrics or {"accuracy": accuracy, "macro_f1": accuracy},
                                      "gate_metric": "accuracy", "promote": promote, "reason": f"test {name}"})
    return load_config(None, [f"run_id={name}", f"register.train_result_uri={train_uri}",
                              f"register.evaluate_result_uri={evaluate_uri}"])


def _aliases(name="support-intents"):
    return {alias: str(version) for alias, version in client().get_registered_model(name).aliases.items()}


def test_register_versions_aliases_and_promotion(tmp_path, classifier_dir):
    first = register.run(_inputs(tmp_path, classifier_dir, "r1", True, 0.8))
    assert first.version == "1" and first.aliases == ["challenger", "champion"]
    second = register.run(_inputs(tmp_path, classifier_dir, "r2", False, 0.7))
    assert second.aliases == ["challenger"] and not second.promoted
    assert _aliases() == {"champion": "1", "challenger": "2"}
    third = register.run(_inputs(tmp_path, classifier_dir, "r3", True, 0.9))
    assert _aliases() == {"champion": "3", "challenger": "3", "previous_champion": "1"}
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
    before = _aliases()
    with pytest.raises(DataError, match="gate metric 'accuracy' missing from the evaluation metrics"):
        register.run(_inputs(tmp_path, classifier_dir, "bad", True, 0.9, metrics={"macro_f1": 0.9}))
    assert _aliases() == before
    assert len(client().search_model_versions("name='support-intents'")) == 1
