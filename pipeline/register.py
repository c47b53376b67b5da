"""register: log the trained model to MLflow with the transformers flavor, register a version,
give it the ``challenger`` alias and, when the evaluate step decided so, move ``champion`` to it
(the version that held ``champion`` keeps the ``previous_champion`` alias, for roll-back).

    finetune register --set register.train_result_uri=.../train/result.json \\
        --set register.evaluate_result_uri=.../evaluate/result.json \\
        --set register.validate_result_uri=.../validate/result.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, check_fields, option
from pipeline.errors import ConfigError, DataError

CHALLENGER, CHAMPION, PREVIOUS_CHAMPION = "challenger", "champion", "previous_champion"
INPUT_EXAMPLE = ["Where is my order #A1234?", "我想取消订单"]


@dataclass(frozen=True)
class RegisterConfig:
    train_result_uri: str = option("", "The train step's result.json.")
    evaluate_result_uri: str = option("", "The evaluate step's result.json.")
    validate_result_uri: str = option("", "The validate step's result.json (recorded as lineage).")

    def __post_init__(self) -> None:
        check_fields(self, "register.")


@dataclass(frozen=True)
class RegisterResult:
    result_uri: str
    model_name: str
    version: str
    aliases: list[str]
    promoted: bool
    reason: str
    metrics: dict[str, float]
    run_id: str
    snapshot: str
    mlflow_run_id: str
    model_uri: str


def _inputs(own: RegisterConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    for key in ("train_result_uri", "evaluate_result_uri"):
        if not getattr(own, key):
            raise ConfigError(f"register.{key} is required")
    trained = storage.read_json(own.train_result_uri)
    evaluated = storage.read_json(own.evaluate_result_uri)
    validated = storage.read_json(own.validate_result_uri) if own.validate_result_uri else {}
    gate = evaluated.get("gate_metric")
    if gate not in (evaluated.get("metrics") or {}):
        raise DataError(f"{own.evaluate_result_uri}: gate metric '{gate}' missing from the evaluation metrics")
    return trained, evaluated, validated


def pip_requirements() -> list[str]:
    """What serving the model needs, pinned to what trained it. Given explicitly: MLflow's own
    inference adds torchvision for every torch model and runs a slow subprocess."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "transformers", "torch", "accelerate")]


def _log_model(model_uri: str, run_id: str) -> Any:
    import mlflow
    import transformers

    with tempfile.TemporaryDirectory(prefix="finetune-register-") as tmp:
        from pipeline.train import resolve_model

        path = resolve_model(model_uri, Path(tmp), what="trained model")
        classifier = transformers.pipeline("text-classification", model=path, tokenizer=path)
        with mlflow.start_run(run_id=run_id):
            # The signature is inferred by running the pipeline on the input example.
            return mlflow.transformers.log_model(transformers_model=classifier, name="model",
                                                 task="text-classification", input_example=INPUT_EXAMPLE,
                                                 pip_requirements=pip_requirements())


def run(cfg: PipelineConfig) -> RegisterResult:
    from pipeline.tracking import client, pipeline_run_id

    trained, evaluated, validated = _inputs(cfg.register)
    tracker = client()
    mlflow_run_id = trained.get("mlflow_run_id") or pipeline_run_id(cfg)
    info = _log_model(trained["model_uri"], mlflow_run_id)
    snapshot = trained["snapshot_uri"]
    metrics = {k: float(v) for k, v in evaluated["metrics"].items()}
    tags = {
        "finetune.run_id": cfg.run_id, "finetune.task": cfg.task, "finetune.base_model": cfg.base_model,
        "finetune.snapshot_uri": snapshot, "finetune.trained_model_uri": trained["model_uri"],
        "finetune.validation_summary_uri": validated.get("summary_uri", ""),
        "finetune.gate": json.dumps({"promote": evaluated["promote"], "reason": evaluated["reason"],
                                     "metric": evaluated["gate_metric"],
                                     "champion_version": evaluated.get("champion_version", ""),
                                     "champion_metrics": evaluated.get("champion_metrics", {})}),
        **{f"metric.{k}": f"{v:.6f}" for k, v in metrics.items()},
    }
    if not _exists(tracker, cfg.model_name):
        tracker.create_registered_model(cfg.model_name)
    version = tracker.create_model_version(cfg.model_name, info.model_uri, run_id=mlflow_run_id, tags=tags,
                                           description=f"{cfg.task} fine-tuned from {cfg.base_model} "
                                                       f"in pipeline run {cfg.run_id}").version
    tracker.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
    if evaluated["promote"]:
        previous = tracker.get_registered_model(cfg.model_name).aliases.get(CHAMPION)
        if previous is not None:
            tracker.set_registered_model_alias(cfg.model_name, PREVIOUS_CHAMPION, previous)
        tracker.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    aliases = sorted(tracker.get_model_version(cfg.model_name, version).aliases)
    print(f"register: {cfg.model_name} version {version} aliases {aliases}: {evaluated['reason']}", file=sys.stderr)
    return RegisterResult(result_uri=storage.join(cfg.step_uri("register"), "result.json"),
                          model_name=cfg.model_name, version=str(version), aliases=aliases,
                          promoted=bool(evaluated["promote"]), reason=evaluated["reason"], metrics=metrics,
                          run_id=cfg.run_id, snapshot=snapshot, mlflow_run_id=mlflow_run_id,
                          model_uri=f"models:/{cfg.model_name}/{version}")


def _exists(tracker: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        tracker.get_registered_model(name)
        return True
    except MlflowException:
        return False


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import step_main

    return step_main("register", run, argv)
