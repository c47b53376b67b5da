"""sequence-classification: predictions on the eval split, accuracy and macro-F1 overall and per
slice (language, ``evaluate.slice_columns``, the challenge set), the classification report and the
confusion matrices.

torch, transformers, sklearn and pandas are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import CHALLENGE, PipelineConfig
from pipeline.errors import DataError
from pipeline.evaluate.challenge import challenge_rows, challenge_slice_groups
from pipeline.evaluate.pictures import confusion_png, per_class_f1_png
from pipeline.evaluate.scored import Scored, print_metrics
from pipeline.models import resolve_model
from pipeline.text import language_of


def predict(model: Any, tokenizer: Any, texts: list[str], batch_size: int, max_seq_len: int) -> list[str]:
    import torch

    model.eval()
    labels: list[str] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_seq_len,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**batch).logits
            labels.extend(model.config.id2label[int(i)] for i in logits.argmax(dim=-1))
    return labels


def score(truth: list[str], predicted: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
    }


def evaluate_classifier(cfg: PipelineConfig, frame: Any, scratch: Path) -> Scored:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    own = cfg.evaluate
    rows = frame[(frame["split"] == "eval") & frame["label"].notna() & frame["text"].notna()]
    if rows.empty:
        raise DataError(f"{own.snapshot_uri}: the eval split is empty; raise collect.eval_fraction")
    texts, truth = [str(t) for t in rows["text"]], [str(v) for v in rows["label"]]
    path = resolve_model(own.model_uri, scratch, what="evaluate.model_uri", published=True)
    model, tokenizer = (
        AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False),
        AutoTokenizer.from_pretrained(path, trust_remote_code=False),
    )
    challenge_texts, challenge_truth = challenge_rows(own.challenge_uri, set(model.config.id2label.values()))
    challenge_groups = challenge_slice_groups(challenge_texts)
    predicted = predict(model, tokenizer, texts, own.batch_size, own.max_seq_len)
    metrics = score(truth, predicted)
    majority = majority_label(truth)
    baseline = score(truth, [majority] * len(truth))  # what a model that learnt nothing scores here
    groups = slice_groups(cfg, rows, texts)
    slices = score_slices(truth, predicted, groups)
    challenge_predicted = predict(model, tokenizer, challenge_texts, own.batch_size, own.max_seq_len)
    slices.update(score_slices(challenge_truth, challenge_predicted, challenge_groups))
    print_metrics(f"{len(rows)} eval rows", metrics)
    print_metrics(f"majority-class baseline ('{majority}' for every row)", baseline)
    for name, values in slices.items():
        print_metrics(f"  slice {name} ({int(values['rows'])} rows)", {k: v for k, v in values.items() if k != "rows"})

    def score_other(other: Any, other_tokenizer: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        theirs = predict(other, other_tokenizer, texts, own.batch_size, own.max_seq_len)
        theirs_challenge = predict(other, other_tokenizer, challenge_texts, own.batch_size, own.max_seq_len)
        return score(truth, theirs), {
            **score_slices(truth, theirs, groups),
            **score_slices(challenge_truth, theirs_challenge, challenge_groups),
        }

    artifacts = _artifacts(
        own.min_slice_rows, (truth, predicted, groups), slices, (challenge_truth, challenge_predicted, challenge_groups)
    )
    challenge_frame = _frame(challenge_texts, challenge_truth)
    return Scored(
        rows[["text", "label"]],
        metrics,
        slices,
        {},
        artifacts,
        score_other,
        challenge_frame,
        model,
        tokenizer,
        baseline=baseline,
        baseline_name="majority-class baseline",
    )


def _artifacts(
    min_rows: int,
    scored: tuple[list[str], list[str], dict[str, list[int]]],
    slices: dict[str, dict[str, float]],
    challenge: tuple[list[str], list[str], dict[str, list[int]]],
) -> dict[str, bytes]:
    """The classification report, the confusion matrix and F1 per class of the eval split, and a
    confusion matrix per slice of ``min_rows`` rows or more, of the eval split (``scored``: truth,
    predictions, the rows of each slice) and of the challenge set (``challenge``, the same)."""
    from sklearn.metrics import classification_report

    truth, predicted, groups = scored
    challenge_truth, challenge_predicted, challenge_groups = challenge
    labels = sorted(set(truth) | set(predicted))
    report = classification_report(truth, predicted, labels=labels, output_dict=True, zero_division=0)
    artifacts = {
        "classification_report.json": json.dumps(report, indent=2).encode(),
        "confusion_matrix.png": confusion_png(truth, predicted, labels),
        "per_class_f1.png": per_class_f1_png(report, labels)[0],
    }
    for name, values in sorted(slices.items()):  # where the model fails, per language and column value
        if values["rows"] >= min_rows and name in groups:
            chosen = groups[name]
            artifacts[f"confusion_matrix_{_file_safe(name)}.png"] = confusion_png(
                [truth[i] for i in chosen], [predicted[i] for i in chosen], labels, f"eval split, {name} rows"
            )
    challenge_labels = sorted(set(challenge_truth) | set(challenge_predicted))
    for name, chosen in challenge_groups.items():
        if len(chosen) >= min_rows:
            artifacts[f"confusion_matrix_{_file_safe(name)}.png"] = confusion_png(
                [challenge_truth[i] for i in chosen],
                [challenge_predicted[i] for i in chosen],
                challenge_labels,
                "challenge set" + (f", {name.removeprefix(CHALLENGE + ':')} rows" if name != CHALLENGE else ""),
            )
    return artifacts


def majority_label(truth: list[str]) -> str:
    """The label most eval rows have (of a tie, the first in sorted order): the majority-class
    predictor answers it for every row."""
    counts = Counter(truth)
    return min(counts, key=lambda label: (-counts[label], label))


def _frame(texts: list[str], labels: list[str]) -> Any:
    """The rows as a ``{text, label}`` DataFrame, logged to MLflow; None when there are none."""
    if not texts:
        return None
    import pandas as pd

    return pd.DataFrame({"text": texts, "label": labels})


def slice_groups(cfg: PipelineConfig, rows: Any, texts: list[str]) -> dict[str, list[int]]:
    """Slice name -> the positions of its eval rows: the language of each row (``zh``, ``latin``)
    and, for each of ``evaluate.slice_columns``, ``column=value`` (a null value: ``column=``)."""
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(language_of(text), []).append(i)
    for column in cfg.evaluate.slice_columns:
        if column not in rows.columns:
            raise DataError(
                f"{cfg.evaluate.snapshot_uri}: evaluate.slice_columns names '{column}', which the snapshot "
                f"lacks (columns {sorted(c for c in rows.columns if c != 'split')}); collect it with "
                f"collect.extra_columns=['{column}']"
            )
        for i, value in enumerate(rows[column]):
            groups.setdefault(f"{column}={'' if value is None else value}", []).append(i)
    return groups


def score_slices(truth: list[str], predicted: list[str], groups: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """The classification metrics per slice of the rows, each with its row count."""
    return {
        name: {"rows": float(len(chosen)), **score([truth[i] for i in chosen], [predicted[i] for i in chosen])}
        for name, chosen in sorted(groups.items())
    }


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.=-]", "_", name)
