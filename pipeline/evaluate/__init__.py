"""evaluate: score the trained model and the current ``champion`` on the same held-out split and
decide whether the new model should be promoted.

Metrics, written under ``<artifact_root>/runs/<run_id>/evaluate/`` and logged to the pipeline's
MLflow run:

- ``sequence-classification``: accuracy, macro-F1, a per-class report, a confusion-matrix PNG and
  a per-class F1 PNG;
- ``causal-lm``: eval loss and perplexity on the assistant tokens of the held-out conversations
  (the base model's too, on the same tokens, drawn beside this model's in ``perplexity.png``),
  exact match and ROUGE-L of greedy generations, and a table of samples (prompt, reference, output);
- ``preference``: reward accuracy and margin on the held-out pairs (the model's own preference,
  and DPO's implicit reward against the reference model), the chosen answers' perplexity, the
  base model's beside them, and a table of sample pairs.

Both draw ``loss_curves.png``: the training loss per step (and an eval loss during training) from
the pipeline run's MLflow metric history. The result's ``pictures`` lists every PNG by its MLflow
artifact path, for the model card.

A classifier is also scored on ``evaluate.challenge_uri`` (by default the hand-written challenge
set shipped beside the demo data), rows it was never trained on, as the slices ``challenge``,
``challenge:zh`` and ``challenge:latin``, beside the eval split's own.

The model is promoted when it beats the champion's ``gate_metric`` by more than
``promotion_margin``, in the metric's direction (lower perplexity is better), or, with no champion
yet, the trivial baseline's on the same rows by as much: the majority class (a classifier; the
result's ``baseline``) or the base model (a causal LM; ``base_metrics``). ``evaluate.promote=false``
(``finetune run --no-promote``) promotes nothing. A champion that can no longer be loaded fails the
step (fail closed).

A classifier is also scored, beside the champion, on each of ``evaluate.reference_sets``: rows the
deployment owns and pins by sha256 (a trigger can set none of those keys). A file whose content
changed fails the step, naming the set; a new model below ``evaluate.reference_thresholds`` or
worse than the champion by more than ``evaluate.max_reference_regression`` on any set is not
promoted, whatever the run's own eval split says (``reference``).

    finetune evaluate --set evaluate.snapshot_uri=... --set evaluate.model_uri=.../train/model

The step is here; its parts beside it: ``classifier`` (a classifier's predictions, metrics and
slices), ``challenge`` (the challenge set and its slices), ``causal_lm`` (loss, perplexity and
generations of a causal LM), ``champion`` (loading the registered champion), ``reference`` (the
deployment's pinned reference sets), ``gate`` (the promotion rule), ``pictures`` (the PNGs, the
loss history, the captions), ``report`` (logging to MLflow) and ``scored`` (what a task family's
evaluation hands the step).

torch, transformers, sklearn, matplotlib, pandas and mlflow are imported inside the functions
that use them: the step table imports this package when Airflow parses the DAG files.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage, tracking
from pipeline.config import DEFAULT_CHALLENGE, PipelineConfig
from pipeline.errors import ConfigError
from pipeline.evaluate.causal_lm import evaluate_lm
from pipeline.evaluate.champion import load_champion
from pipeline.evaluate.classifier import evaluate_classifier
from pipeline.evaluate.gate import decide, hold_to_reference, switched_off
from pipeline.evaluate.pictures import draw_pictures, picture_captions
from pipeline.evaluate.preference import evaluate_preference
from pipeline.evaluate.reference import read_reference_sets, score_reference_sets
from pipeline.evaluate.report import log_reference, log_to_mlflow
from pipeline.evaluate.scored import print_metrics
from pipeline.snapshot import load_snapshot


@dataclass(frozen=True)
class EvaluateResult:
    result_uri: str
    metrics: dict[str, float]
    report_uri: str  # classification report, or the causal-lm samples table
    rows: int
    gate_metric: str
    promote: bool
    reason: str
    confusion_matrix_uri: str = ""
    champion_version: str = ""
    champion_metrics: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)  # causal-lm: the base model, same tokens
    # What a first champion must beat, on the same rows: the majority class, or the base model.
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_name: str = ""
    greater_is_better: bool = True
    thresholds: list[str] = field(default_factory=list)
    # Per language of the eval rows (text.language_of), per value of evaluate.slice_columns, and the
    # challenge set's: {"zh": {"rows": 160, "accuracy": ...}, "challenge:zh": {...}, ...}
    slices: dict[str, dict[str, float]] = field(default_factory=dict)
    champion_slices: dict[str, dict[str, float]] = field(default_factory=dict)
    # In the model card's order: [{"path": "evaluate/loss_curves.png", "caption": "..."}, ...], each
    # an MLflow artifact of mlflow_run_id. A list: result JSON is written with sorted keys.
    pictures: list[dict[str, str]] = field(default_factory=list)
    mlflow_run_id: str = ""
    # Per set of evaluate.reference_sets, the same rows for both: {"support": {"rows": 220, "accuracy": ...}}
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    champion_reference: dict[str, dict[str, float]] = field(default_factory=dict)


EVALUATORS = {
    "sequence-classification": evaluate_classifier,
    "causal-lm": evaluate_lm,
    "preference": evaluate_preference,
}


def run(cfg: PipelineConfig) -> EvaluateResult:
    own = cfg.evaluate
    check_inputs(cfg)
    metric, greater_is_better = own.gate(cfg.task)
    references = read_reference_sets(own)  # before any model: changed reference data fails at once, by name
    frame = load_snapshot(own.snapshot_uri)
    with tempfile.TemporaryDirectory(prefix="finetune-eval-") as tmp:
        scored = EVALUATORS[cfg.task](cfg, frame, Path(tmp))
    champion_version = ""
    champion_metrics: dict[str, float] = {}
    champion_slices: dict[str, dict[str, float]] = {}
    champion = load_champion(cfg)
    if champion is not None:  # scored on the same rows, by the same code, in this step
        champion_version, champion_model, champion_tokenizer = champion
        champion_metrics, champion_slices = scored.score_other(champion_model, champion_tokenizer)
        print_metrics(f"champion v{champion_version}", champion_metrics)
    reference, champion_reference = score_reference_sets(own, references, scored, champion)
    verdict = decide(
        scored.metrics,
        champion_metrics if champion_version else None,
        own,
        cfg.task,
        scored.slices,
        champion_slices,
        scored.baseline,
        scored.baseline_name,
    )
    promote, reason = switched_off(hold_to_reference(verdict, reference, champion_reference, own), own)
    print(f"evaluate: promote={promote}: {reason}", file=sys.stderr)
    mlflow_run_id = tracking.pipeline_run_id(cfg)
    scored.artifacts.update(draw_pictures(mlflow_run_id, scored, champion_version, champion_metrics))
    out_uri = cfg.step_uri("evaluate")
    uris = {name: storage.join(out_uri, name) for name in scored.artifacts}
    for name, content in scored.artifacts.items():
        storage.write_bytes(uris[name], content)
    log_to_mlflow(cfg, scored, champion_metrics, promote, reason)
    log_reference(cfg, reference, champion_reference)
    return EvaluateResult(
        result_uri=storage.join(out_uri, "result.json"),
        metrics=scored.metrics,
        report_uri=uris.get("classification_report.json") or uris["samples.json"],
        confusion_matrix_uri=uris.get("confusion_matrix.png", ""),
        rows=len(scored.rows),
        gate_metric=metric,
        promote=promote,
        reason=reason,
        champion_version=champion_version,
        champion_metrics=champion_metrics,
        base_metrics=scored.base_metrics,
        baseline=scored.baseline,
        baseline_name=scored.baseline_name,
        greater_is_better=greater_is_better,
        thresholds=list(own.thresholds),
        slices=scored.slices,
        champion_slices=champion_slices,
        reference=reference,
        champion_reference=champion_reference,
        pictures=picture_captions(list(scored.artifacts)),
        mlflow_run_id=mlflow_run_id,
    )


def check_inputs(cfg: PipelineConfig) -> None:
    """The inputs are given, and the challenge and reference sets are for a classifier."""
    own = cfg.evaluate
    for key in ("snapshot_uri", "model_uri"):
        if not getattr(own, key):
            raise ConfigError(f"evaluate.{key} is required")
    if cfg.task != "sequence-classification" and own.challenge_uri not in ("", DEFAULT_CHALLENGE):
        raise ConfigError(
            f"evaluate.challenge_uri: a challenge set is scored for sequence-classification only, "
            f"not {cfg.task}; set evaluate.challenge_uri=''"
        )
    if cfg.task != "sequence-classification" and own.reference_sets:
        raise ConfigError(
            f"evaluate.reference_sets: reference sets are {{text, label}} rows scored for sequence-classification "
            f"only, not {cfg.task} (a causal LM's would be conversations scored by perplexity: not built); "
            f"set evaluate.reference_sets={{}} for a {cfg.task} deployment"
        )
