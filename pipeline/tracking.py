"""MLflow in one place: the tracking URI (embedded SQLite by default) and the one MLflow run
per pipeline run, found again by tag so that train, evaluate and register log to the same run
and a retried step does not start a second one.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 finetune register ...

mlflow is imported inside ``client``: the steps import this module at DAG-parse time.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import PipelineConfig, finetune_home

RUN_TAG = "finetune.run_id"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else SQLite under ``$FINETUNE_HOME``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = finetune_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def client() -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    return MlflowClient()


def experiment_id(cfg: PipelineConfig) -> str:
    tracker = client()
    experiment = tracker.get_experiment_by_name(cfg.model_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):  # embedded: artifacts beside the SQLite file, not ./mlruns
        location = (finetune_home() / "mlartifacts").as_uri()
    try:
        return tracker.create_experiment(cfg.model_name, artifact_location=location)
    except Exception:  # created concurrently by another step or rank
        return tracker.get_experiment_by_name(cfg.model_name).experiment_id


def pipeline_run_id(cfg: PipelineConfig) -> str:
    """The MLflow run of this pipeline run, created on first use."""
    tracker = client()
    exp = experiment_id(cfg)
    found = tracker.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{cfg.run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = tracker.create_run(exp, run_name=cfg.run_id, tags={RUN_TAG: cfg.run_id, "finetune.task": cfg.task})
    return run.info.run_id
