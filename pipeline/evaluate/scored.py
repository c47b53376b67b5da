"""What a task family's evaluation hands the step: the new model's metrics, slices and artifacts,
its trivial baseline on the same rows, and how it scores another model (the champion) on the same
rows; and the metric lines on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Scored:
    """One task family's verdict on the new model, before the gate, and how it scores another
    model (the champion) on the same rows."""

    rows: Any  # the eval rows, logged to MLflow as the evaluation data set
    metrics: dict[str, float]
    slices: dict[str, dict[str, float]]  # the same metrics per language of the rows, with "rows"
    base_metrics: dict[str, float]
    artifacts: dict[str, bytes]  # file name -> content, under evaluate/
    # (model, tokenizer) -> the same metrics and slices, on the same rows
    score_other: Callable[[Any, Any], tuple[dict[str, float], dict[str, dict[str, float]]]]
    challenge_rows: Any = None  # the challenge set's rows when scored, logged to MLflow beside the eval rows
    model: Any = None  # a classifier: the new model and its tokenizer, scored on the reference sets too
    tokenizer: Any = None
    # What a version must beat to become the first champion: the same metrics of a model that
    # learnt nothing, on the same rows (the majority class; a causal LM's base model).
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_name: str = ""


def print_metrics(what: str, metrics: dict[str, float]) -> None:
    print(f"evaluate: {what} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr, flush=True)
