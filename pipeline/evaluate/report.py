"""What the step leaves on the pipeline's MLflow run: the metrics (the champion's, the base model's,
each slice's), the gate's verdict as tags, the artifacts, the samples table, the evaluation data sets.

mlflow and pandas are imported inside the function that logs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline import storage, tracking
from pipeline.config import CHALLENGE, PipelineConfig
from pipeline.evaluate.scored import Scored


def log_reference(
    cfg: PipelineConfig, ours: dict[str, dict[str, float]], champion: dict[str, dict[str, float]]
) -> None:
    """Each reference set's figures on the pipeline's MLflow run: ``reference/<set>/accuracy`` and
    ``reference/<set>/rows`` for the new model, ``reference/<set>/champion_accuracy`` for the champion."""
    run_id = tracking.pipeline_run_id(cfg)
    tracker = tracking.client()
    for who, figures in (("", ours), ("champion_", champion)):
        for name, values in figures.items():
            for key, value in values.items():
                if not (who and key == "rows"):
                    tracker.log_metric(run_id, f"reference/{name}/{who}{key}", value)


def log_to_mlflow(
    cfg: PipelineConfig, scored: Scored, champion_metrics: dict[str, float], promote: bool, reason: str
) -> None:
    import mlflow
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas  # what mlflow.data.from_pandas is, set there at import

    run_id = tracking.pipeline_run_id(cfg)
    tracker = tracking.client()
    for prefix, metrics in (
        ("eval_", scored.metrics),
        ("champion_eval_", champion_metrics),
        ("base_eval_", scored.base_metrics),
    ):
        for key, value in metrics.items():
            tracker.log_metric(run_id, prefix + key.removeprefix("eval_"), value)
    # e.g. eval_accuracy_zh, eval_rows_channel:email, eval_accuracy_challenge:zh
    for slice_name, values in scored.slices.items():
        for key, value in values.items():
            tracker.log_metric(run_id, f"eval_{key.removeprefix('eval_')}_{slice_name.replace('=', ':')}", value)
    tracker.set_tag(run_id, "gate.promote", str(promote).lower())
    tracker.set_tag(run_id, "gate.reason", reason)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in scored.artifacts.items():
            if name == "samples.json":
                continue  # logged as a table below, which the MLflow UI shows as one
            path = Path(tmp) / name
            path.write_bytes(content)
            tracker.log_artifact(run_id, str(path), "evaluate")
    if "samples.json" in scored.artifacts:
        samples = json.loads(scored.artifacts["samples.json"])
        if samples:
            tracker.log_table(run_id, data=pd.DataFrame(samples), artifact_file="evaluate/samples.json")
    targets = "label" if "label" in scored.rows.columns else None
    with tracking.module_api(), mlflow.start_run(run_id=run_id):
        mlflow.log_input(
            from_pandas(scored.rows, source=cfg.evaluate.snapshot_uri, name="eval", targets=targets), context="eval"
        )
        if scored.challenge_rows is not None:  # MLflow resolves file:// and s3://, not pkg:// or a bare path
            challenge_path = storage.local_path(cfg.evaluate.challenge_uri)
            source = challenge_path.as_uri() if challenge_path else cfg.evaluate.challenge_uri
            mlflow.log_input(
                from_pandas(scored.challenge_rows, name=CHALLENGE, targets="label", source=source), context=CHALLENGE
            )
