"""The reference sets: labelled rows the deployment owns (``evaluate.reference_sets``), pinned by
their sha256, which no trigger can set. Every run reads each, refuses one whose content changed,
and scores the new model and the champion on the same rows, so that a run's own data (its eval
split, cut from whatever the trigger sent) is never the only evidence the gate sees.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline import storage
from pipeline.config import EvaluateConfig
from pipeline.errors import DataError
from pipeline.evaluate.challenge import parse_rows
from pipeline.evaluate.classifier import predict, score
from pipeline.evaluate.scored import Scored, print_metrics

ReferenceRows = dict[str, tuple[list[str], list[str]]]  # set name -> (texts, labels)


def read_reference_sets(own: EvaluateConfig) -> ReferenceRows:
    """Each reference set's texts and labels, its bytes checked against the pinned sha256 first: a
    file that changed is a DataError naming the set (the deployment's data changed under it)."""
    sets: ReferenceRows = {}
    for name, (uri, expected) in own.reference_pins().items():
        content = storage.read_bytes(uri)
        actual = hashlib.sha256(content).hexdigest()
        where = f"evaluate.reference_sets[{name!r}] {uri}"
        if actual != expected:
            raise DataError(
                f"{where}: its sha256 is {actual}, not the pinned {expected}: the deployment's reference data "
                f"changed under it, so no model is gated on it; check the file, then pin its new sha256"
            )
        sets[name] = parse_rows(content, where)
        if not sets[name][0]:
            raise DataError(f"{where} has no rows")
    return sets


def score_reference_sets(
    own: EvaluateConfig, sets: ReferenceRows, scored: Scored, champion: tuple[str, Any, Any] | None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """The new model's and the champion's metrics on each reference set, the same rows for both:
    ``{"support": {"rows": 220, "accuracy": ..., "macro_f1": ...}}``. A label the new model cannot
    predict is a DataError naming the set: the labels changed, not the model's skill."""
    ours: dict[str, dict[str, float]] = {}
    theirs: dict[str, dict[str, float]] = {}
    known = set(scored.model.config.id2label.values()) if sets else set()
    for name, (texts, truth) in sets.items():
        unknown = sorted(set(truth) - known)
        if unknown:
            raise DataError(
                f"evaluate.reference_sets[{name!r}]: label(s) {unknown} are not labels the new model knows "
                f"({sorted(known)}): a model trained on other labels cannot be measured on this set"
            )
        predicted = predict(scored.model, scored.tokenizer, texts, own.batch_size, own.max_seq_len)
        ours[name] = {"rows": float(len(texts)), **score(truth, predicted)}
        print_metrics(f"reference set {name} ({len(texts)} rows)", ours[name])
        if champion is not None:
            version, model, tokenizer = champion
            theirs_predicted = predict(model, tokenizer, texts, own.batch_size, own.max_seq_len)
            theirs[name] = {"rows": float(len(texts)), **score(truth, theirs_predicted)}
            print_metrics(f"  champion v{version} on it", theirs[name])
    return ours, theirs
