"""evaluate: score the trained model and the current ``champion`` on the same held-out split and
decide whether the new model should be promoted.

Metrics: accuracy, macro-F1, a per-class report and a confusion-matrix PNG, written under
``<artifact_root>/runs/<run_id>/evaluate/`` and logged to the pipeline's MLflow run. The model is
promoted when there is no champion, or when it beats the champion's ``gate_metric`` by more than
``promotion_margin``. A champion that can no longer be loaded fails the step (fail closed).

    finetune evaluate --set evaluate.snapshot_uri=... --set evaluate.model_uri=.../train/model
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, check_fields, option
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.promote import CHAMPION

METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class EvaluateConfig:
    snapshot_uri: str = option("", "Snapshot whose eval split is scored (the collect step's snapshot_uri).")
    model_uri: str = option("", "Trained model directory (the train step's model_uri).")
    gate_metric: str = option("accuracy", "Metric compared with the champion's to decide promotion.",
                              choices=METRICS)
    greater_is_better: bool = option(True, "Direction of gate_metric (false for losses, perplexity).")
    promotion_margin: float = option(0.0, "Promote only when the new model beats the champion by more than this.",
                                     minimum=0.0, maximum=1.0)
    thresholds: list[str] = option([], "Absolute bars every new model must clear, e.g. ['accuracy>=0.85'].")
    batch_size: int = option(64, "Examples per inference batch.", minimum=1, maximum=4096)
    max_seq_len: int = option(64, "Tokens per example after truncation.", minimum=8, maximum=8192)

    def __post_init__(self) -> None:
        check_fields(self, "evaluate.")
        for rule in self.thresholds:
            parse_threshold(rule)


def parse_threshold(rule: str) -> tuple[str, str, float]:
    match = re.fullmatch(r"\s*(\w+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", rule)
    if not match or match.group(1) not in METRICS:
        raise ConfigError(f"evaluate.thresholds: {rule!r} is not '<metric> >= <number>' or '<metric> <= <number>' "
                          f"with a metric in {list(METRICS)}")
    try:
        return match.group(1), match.group(2), float(match.group(3))
    except ValueError as exc:
        raise ConfigError(f"evaluate.thresholds: {rule!r}: {match.group(3)!r} is not a number") from exc


@dataclass(frozen=True)
class EvaluateResult:
    result_uri: str
    metrics: dict[str, float]
    report_uri: str
    confusion_matrix_uri: str
    rows: int
    gate_metric: str
    promote: bool
    reason: str
    champion_version: str = ""
    champion_metrics: dict[str, float] = field(default_factory=dict)
    greater_is_better: bool = True
    thresholds: list[str] = field(default_factory=list)


def predict(model: Any, tokenizer: Any, texts: list[str], batch_size: int, max_seq_len: int) -> list[str]:
    import torch

    model.eval()
    labels = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_seq_len,
                              padding=True, return_tensors="pt")
            logits = model(**batch).logits
            labels.extend(model.config.id2label[int(i)] for i in logits.argmax(dim=-1))
    return labels


def score(truth: list[str], predicted: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}


def confusion_png(truth: list[str], predicted: list[str], labels: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(6.0, 0.6 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, ax=ax, xticks_rotation=45,
                                            colorbar=False)
    ax.set_title("Confusion matrix (eval split)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def decide(metrics: dict[str, float], champion: dict[str, float] | None, cfg: EvaluateConfig) -> tuple[bool, str]:
    """The promotion gate: every absolute threshold, then the margin over the champion."""
    for rule in cfg.thresholds:
        name, op, bound = parse_threshold(rule)
        if not (metrics[name] >= bound if op == ">=" else metrics[name] <= bound):
            return False, f"{name} {metrics[name]:.4f} fails the threshold {name} {op} {bound}"
    metric, ours = cfg.gate_metric, metrics[cfg.gate_metric]
    if champion is None:
        return True, f"no champion yet; {metric}={ours:.4f}"
    theirs = champion[metric]
    gain = ours - theirs if cfg.greater_is_better else theirs - ours
    better = "higher" if cfg.greater_is_better else "lower"
    if gain > cfg.promotion_margin:
        return True, f"{metric} {ours:.4f} beats champion {theirs:.4f} by more than {cfg.promotion_margin} ({better} is better)"
    return False, f"{metric} {ours:.4f} does not beat champion {theirs:.4f} by more than {cfg.promotion_margin} ({better} is better)"


def _load_local(model_uri: str, scratch: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.train import resolve_model

    path = resolve_model(model_uri, scratch, what="evaluate.model_uri")
    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _champion(cfg: PipelineConfig) -> tuple[str, Any, Any] | None:
    """(version, model, tokenizer) of the registered champion, or None when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import client

    try:
        version = client().get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException as exc:
        # No registered model, or no champion alias yet. Anything else (an unreachable server,
        # a permission error) must not read as "no champion": that would promote unchecked.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
            return None
        raise ModelError(f"cannot look up the champion of {cfg.model_name}: {exc}") from exc
    try:
        parts = mlflow.transformers.load_model(f"models:/{cfg.model_name}@{CHAMPION}", return_type="components")
    except Exception as exc:  # fail closed: never promote over a champion we could not score
        raise ModelError(f"champion {cfg.model_name} version {version.version} cannot be loaded, "
                         f"so the new model cannot be compared with it: {exc}") from exc
    return str(version.version), parts["model"], parts["tokenizer"]


def run(cfg: PipelineConfig) -> EvaluateResult:
    from sklearn.metrics import classification_report

    from pipeline.collect import load_snapshot

    own = cfg.evaluate
    for key in ("snapshot_uri", "model_uri"):
        if not getattr(own, key):
            raise ConfigError(f"evaluate.{key} is required")
    frame = load_snapshot(own.snapshot_uri)
    rows = frame[(frame["split"] == "eval") & frame["label"].notna() & frame["text"].notna()]
    if rows.empty:
        raise DataError(f"{own.snapshot_uri}: the eval split is empty; raise collect.eval_fraction")
    texts, truth = [str(t) for t in rows["text"]], [str(v) for v in rows["label"]]
    with tempfile.TemporaryDirectory(prefix="finetune-eval-") as tmp:
        model, tokenizer = _load_local(own.model_uri, Path(tmp))
        predicted = predict(model, tokenizer, texts, own.batch_size, own.max_seq_len)
    metrics = score(truth, predicted)
    print(f"evaluate: {len(rows)} eval rows " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr)
    champion = _champion(cfg)
    champion_version, champion_metrics = "", {}
    if champion is not None:
        champion_version, champion_model, champion_tokenizer = champion
        champion_metrics = score(truth, predict(champion_model, champion_tokenizer, texts, own.batch_size,
                                                own.max_seq_len))
        print(f"evaluate: champion v{champion_version} " + " ".join(f"{k}={v:.4f}" for k, v in
                                                                  champion_metrics.items()), file=sys.stderr)
    promote, reason = decide(metrics, champion_metrics if champion is not None else None, own)
    print(f"evaluate: promote={promote}: {reason}", file=sys.stderr)

    labels = sorted(set(truth) | set(predicted))
    out_uri = cfg.step_uri("evaluate")
    report_uri = storage.join(out_uri, "classification_report.json")
    png_uri = storage.join(out_uri, "confusion_matrix.png")
    report = classification_report(truth, predicted, labels=labels, output_dict=True, zero_division=0)
    storage.write_json(report_uri, report)
    png = confusion_png(truth, predicted, labels)
    storage.write_bytes(png_uri, png)
    _log(cfg, rows, metrics, champion_metrics, report, png, promote, reason)
    return EvaluateResult(result_uri=storage.join(out_uri, "result.json"), metrics=metrics, report_uri=report_uri,
                          confusion_matrix_uri=png_uri, rows=len(rows), gate_metric=own.gate_metric,
                          promote=promote, reason=reason, champion_version=champion_version,
                          champion_metrics=champion_metrics, greater_is_better=own.greater_is_better,
                          thresholds=list(own.thresholds))


def _log(cfg: PipelineConfig, rows: Any, metrics: dict[str, float], champion_metrics: dict[str, float],
         report: dict[str, Any], png: bytes, promote: bool, reason: str) -> None:
    import mlflow

    from pipeline.tracking import client, pipeline_run_id

    run_id = pipeline_run_id(cfg)
    tracker = client()
    for key, value in metrics.items():
        tracker.log_metric(run_id, f"eval_{key}", value)
    for key, value in champion_metrics.items():
        tracker.log_metric(run_id, f"champion_eval_{key}", value)
    tracker.set_tag(run_id, "gate.promote", str(promote).lower())
    tracker.set_tag(run_id, "gate.reason", reason)
    tracker.log_dict(run_id, report, "evaluate/classification_report.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "confusion_matrix.png"
        path.write_bytes(png)
        tracker.log_artifact(run_id, str(path), "evaluate")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(mlflow.data.from_pandas(rows[["text", "label"]], source=cfg.evaluate.snapshot_uri,
                                                 name="eval", targets="label"), context="eval")


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import step_main

    return step_main("evaluate", run, argv)
