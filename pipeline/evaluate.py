"""evaluate: score the trained model and the current ``champion`` on the same held-out split and
decide whether the new model should be promoted.

Metrics, written under ``<artifact_root>/runs/<run_id>/evaluate/`` and logged to the pipeline's
MLflow run:

- ``sequence-classification``: accuracy, macro-F1, a per-class report, a confusion-matrix PNG and
  a per-class F1 PNG;
- ``causal-lm``: eval loss and perplexity on the assistant tokens of the held-out conversations
  (the base model's too, on the same tokens, drawn beside this model's in ``perplexity.png``),
  exact match and ROUGE-L of greedy generations, and a table of samples (prompt, reference, output).

Both draw ``loss_curves.png``: the training loss per step (and an eval loss during training) from
the pipeline run's MLflow metric history. The result's ``pictures`` lists every PNG by its MLflow
artifact path, for the model card.

A classifier is also scored on ``evaluate.challenge_uri`` (by default the hand-written challenge
set shipped beside the demo data), rows it was never trained on, as the slices ``challenge``,
``challenge:zh`` and ``challenge:latin``, beside the eval split's own.

The model is promoted when there is no champion, or when it beats the champion's ``gate_metric``
by more than ``promotion_margin``, in the metric's direction (lower perplexity is better). A
champion that can no longer be loaded fails the step (fail closed).

    finetune evaluate --set evaluate.snapshot_uri=... --set evaluate.model_uri=.../train/model

torch, transformers, sklearn, matplotlib, pandas and mlflow are imported inside the functions
that use them: the step table imports this module when Airflow parses the DAG files.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import chat, storage, tracking
from pipeline.config import (
    CHALLENGE,
    CHAMPION,
    DEFAULT_CHALLENGE,
    EvaluateConfig,
    PipelineConfig,
    is_challenge,
    parse_threshold,
)
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.models import extend_like, load_causal_lm, load_trained_lm, resolve_model
from pipeline.snapshot import load_snapshot
from pipeline.text import language_of


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


PICTURE_DPI = 110
# Names the train step's per-step logs reach MLflow under (it prefixes the Trainer's keys with
# train_): the loss, and the learning rate that every per-step log has and the summary lacks.
TRAIN_LOSS = "train_loss"
STEP_MARKER = "train_learning_rate"
TRAIN_EVAL_LOSS = ("train_eval_loss", "eval_loss")  # an eval during training, whichever name train gives it
PICTURES = {  # the pictures under evaluate/, in the order the model card shows them
    "loss_curves.png": "Training loss per optimizer step (and the eval loss during training, when train logs it)",
    "confusion_matrix.png": "Confusion matrix on the eval split",
    "per_class_f1.png": "F1 per class on the eval split",
    "perplexity.png": "Perplexity on the held-out assistant tokens: base model, fine-tuned (and the champion)",
}


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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no screen: draw to PNG bytes only
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PICTURE_DPI)
    plt.close(fig)
    return buffer.getvalue()


def confusion_png(truth: list[str], predicted: list[str], labels: list[str], what: str = "eval split") -> bytes:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()

    size = max(6.0, 0.6 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, ax=ax, xticks_rotation=45, colorbar=False)
    ax.set_title(f"Confusion matrix ({what})")
    return _png(fig)


def per_class_f1_png(report: dict[str, Any], labels: list[str]) -> tuple[bytes, dict[str, float]]:
    """Horizontal bars of each class's F1 from a ``classification_report(output_dict=True)``, and
    the values drawn, by label."""
    plt = _pyplot()
    drawn = {label: float(report[label]["f1-score"]) for label in labels}
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.4 * len(labels) + 1.2)))
    names = list(reversed(labels))  # first label on top
    bars = ax.barh(names, [drawn[n] for n in names], color="#36c")
    ax.bar_label(bars, labels=[f"{drawn[n]:.2f}" for n in names], padding=3)
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel("F1")
    macro = report.get("macro avg", {}).get("f1-score")
    ax.set_title("F1 per class (eval split)" + (f", macro F1 {macro:.3f}" if macro is not None else ""))
    return _png(fig), drawn


def loss_history(run_id: str) -> dict[str, tuple[list[int], list[float]]]:
    """The training loss per step, and the eval loss during training when train logged one, read
    back from the pipeline run's MLflow metric history: ``{"train_loss": (steps, values), ...}``.

    ``train_loss`` also holds the end-of-training mean at the last step, which is not a step's
    loss: a step is a value logged beside a learning rate (``STEP_MARKER``, in every per-step log
    and not in the summary), the nearest in time at that step. A step logged twice (an attempt
    resumed from a checkpoint) keeps its latest value. Evaluate's own ``eval_loss`` (causal LM) is
    logged at step 0; an eval during training is at a step past 0."""
    curves = {}
    markers = tracking.metric_history(run_id, STEP_MARKER)
    losses = tracking.metric_history(run_id, TRAIN_LOSS)
    if markers:
        by_step = {}
        for marker in markers:  # oldest first, so a re-logged step keeps its latest value
            same = [m for m in losses if m.step == marker.step]
            if same:
                by_step[marker.step] = min(same, key=lambda m: abs(m.timestamp - marker.timestamp)).value
    else:  # logged without a learning rate: take train_loss as it is
        by_step = {m.step: m.value for m in losses}
    if by_step:
        curves["train_loss"] = (sorted(by_step), [by_step[k] for k in sorted(by_step)])
    for name in TRAIN_EVAL_LOSS:
        during = {m.step: m.value for m in tracking.metric_history(run_id, name) if m.step > 0}
        if during:
            curves["eval_loss"] = (sorted(during), [during[k] for k in sorted(during)])
            break
    return curves


def loss_curves_png(curves: dict[str, tuple[list[int], list[float]]]) -> bytes:
    """Loss against optimizer step, one line per curve of ``loss_history``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"train_loss": ("training loss", "#36c", "."), "eval_loss": ("eval loss (during training)", "#c60", "o")}
    for name, (steps, values) in curves.items():
        label, color, marker = styles.get(name, (name, None, "."))
        ax.plot(steps, values, label=label, color=color, marker=marker, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss per step")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def perplexity_png(
    metrics: dict[str, float],
    base_metrics: dict[str, float],
    champion_metrics: dict[str, float],
    champion_version: str = "",
) -> tuple[bytes, dict[str, float]]:
    """Bars of perplexity on the same held-out tokens: the base model, this fine-tuned model and,
    when there is one, the champion; and the values drawn, by bar name. A log scale when they
    differ by more than 20 times (a random base model's is near its vocabulary size)."""
    plt = _pyplot()
    candidates = {
        "base model": base_metrics.get("perplexity"),
        "fine-tuned": metrics.get("perplexity"),
        f"champion v{champion_version}": champion_metrics.get("perplexity"),
    }
    drawn = {k: float(v) for k, v in candidates.items() if v is not None}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = {"base model": "#9aa", "fine-tuned": "#36c"}
    bars = ax.bar(list(drawn), list(drawn.values()), color=[colors.get(k, "#c60") for k in drawn])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in drawn.values()], padding=3)
    if drawn and max(drawn.values()) > 20 * min(drawn.values()):
        ax.set_yscale("log")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity on the held-out assistant tokens")
    ax.margins(y=0.15)
    return _png(fig), drawn


def _pictures(
    run_id: str, scored: Scored, champion_version: str, champion_metrics: dict[str, float]
) -> dict[str, bytes]:
    """The pictures drawn once the champion is scored: loss curves (from the run's history, when
    train logged any) and, for a causal LM, the perplexity bars."""
    pictures = {}
    curves = loss_history(run_id)
    if curves:
        pictures["loss_curves.png"] = loss_curves_png(curves)
    if "perplexity" in scored.metrics and "perplexity" in scored.base_metrics:
        pictures["perplexity.png"] = perplexity_png(
            scored.metrics, scored.base_metrics, champion_metrics, champion_version
        )[0]
    return pictures


def picture_captions(names: list[str]) -> list[dict[str, str]]:
    """Each picture's MLflow artifact path (``evaluate/<name>``) and what it shows, for the model
    card: the ``PICTURES`` in their order, then the per-slice confusion matrices (the challenge
    set's last)."""
    captions = [{"path": f"evaluate/{name}", "caption": caption} for name, caption in PICTURES.items() if name in names]
    challenge = f"confusion_matrix_{CHALLENGE}"
    for name in sorted(
        (n for n in names if n.startswith("confusion_matrix_") and n.endswith(".png")),
        key=lambda n: (n.startswith(challenge), n),
    ):
        part = name.removeprefix("confusion_matrix_").removesuffix(".png")
        if part == CHALLENGE:
            caption = "Confusion matrix of the challenge set (evaluate.challenge_uri, never trained on)"
        elif part.startswith(f"{CHALLENGE}_"):
            caption = f"Confusion matrix of the challenge set's rows in {part.removeprefix(f'{CHALLENGE}_')}"
        else:
            caption = f"Confusion matrix of the eval rows in {part}"
        captions.append({"path": f"evaluate/{name}", "caption": caption})
    return captions


def decide(
    metrics: dict[str, float],
    champion: dict[str, float] | None,
    cfg: EvaluateConfig,
    task: str = "sequence-classification",
    slices: dict[str, dict[str, float]] | None = None,
    champion_slices: dict[str, dict[str, float]] | None = None,
) -> tuple[bool, str]:
    """The promotion gate: every absolute threshold (overall or per slice), then no slice worse
    than the champion's by more than ``max_slice_regression``, then the margin over the champion.

    The challenge slices meet only the thresholds that name them (``accuracy[challenge:zh]>=0.85``),
    never the regression rule: the set is small (about 100 rows a language, so 0.05 is five
    messages), fixed, and deliberately unlike the training data, so a model that fits a new
    snapshot better can lose a few of its rows by chance. It is there to be read beside the eval
    split, not to veto a model on its own; a bar on it is a choice the user makes explicitly."""
    slices = slices or {}
    for rule in cfg.thresholds:
        name, op, bound = parse_threshold(rule)
        metric_name, _, slice_name = name.rstrip("]").partition("[")
        if metric_name not in metrics:
            raise ConfigError(f"evaluate.thresholds: {rule!r}: {metric_name} is not a {task} metric ({list(metrics)})")
        if slice_name and slice_name not in slices:
            where = (
                "the challenge set was not scored (evaluate.challenge_uri is empty, or the shipped set was "
                "skipped for a model that does not know its labels)"
                if is_challenge(slice_name)
                else f"the eval split has no rows of slice '{slice_name}'"
            )
            return False, f"{name} cannot be checked: {where} (slices: {sorted(slices)})"
        value = slices[slice_name][metric_name] if slice_name else metrics[metric_name]
        if not (value >= bound if op == ">=" else value <= bound):
            return False, f"{name} {value:.4f} fails the threshold {name} {op} {bound}"
    metric, greater_is_better = cfg.gate(task)
    ours = metrics[metric]
    if champion is None:
        return True, f"no champion yet; {metric}={ours:.4f}"
    for slice_name, values in sorted(slices.items()):
        theirs_there = (champion_slices or {}).get(slice_name, {}).get(metric)
        if values["rows"] < cfg.min_slice_rows or theirs_there is None or is_challenge(slice_name):
            continue
        loss = theirs_there - values[metric] if greater_is_better else values[metric] - theirs_there
        if loss > cfg.max_slice_regression:
            return False, (
                f"{metric}[{slice_name}] {values[metric]:.4f} is worse than the champion's "
                f"{theirs_there:.4f} on slice '{slice_name}' ({int(values['rows'])} rows) by more than "
                f"evaluate.max_slice_regression={cfg.max_slice_regression}"
            )
    theirs = champion[metric]
    gain = ours - theirs if greater_is_better else theirs - ours
    better = "higher" if greater_is_better else "lower"
    if gain > cfg.promotion_margin:
        return True, (
            f"{metric} {ours:.4f} beats champion {theirs:.4f} by more than {cfg.promotion_margin} ({better} is better)"
        )
    return False, (
        f"{metric} {ours:.4f} does not beat champion {theirs:.4f} by more than {cfg.promotion_margin} "
        f"({better} is better)"
    )


def _champion(cfg: PipelineConfig) -> tuple[str, Any, Any] | None:
    """(version, model, tokenizer) of the registered champion, or None when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = tracking.client().get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException as exc:
        # No registered model, or no champion alias yet. Anything else (an unreachable server,
        # a permission error) must not read as "no champion": that would promote unchecked.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
            return None
        raise ModelError(f"cannot look up the champion of {cfg.model_name}: {exc}") from exc
    try:
        with tracking.module_api():  # a models:/ URI is read from the registry URI mlflow is set to
            parts = mlflow.transformers.load_model(f"models:/{cfg.model_name}@{CHAMPION}", return_type="components")
    except Exception as exc:  # fail closed: never promote over a champion we could not score
        raise ModelError(
            f"champion {cfg.model_name} version {version.version} cannot be loaded, "
            f"so the new model cannot be compared with it: {exc}"
        ) from exc
    return str(version.version), parts["model"], parts["tokenizer"]


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


def _print(what: str, metrics: dict[str, float]) -> None:
    print(f"evaluate: {what} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr, flush=True)


def evaluate_classifier(cfg: PipelineConfig, frame: Any, scratch: Path) -> Scored:
    from sklearn.metrics import classification_report
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    own = cfg.evaluate
    rows = frame[(frame["split"] == "eval") & frame["label"].notna() & frame["text"].notna()]
    if rows.empty:
        raise DataError(f"{own.snapshot_uri}: the eval split is empty; raise collect.eval_fraction")
    texts, truth = [str(t) for t in rows["text"]], [str(v) for v in rows["label"]]
    path = resolve_model(own.model_uri, scratch, what="evaluate.model_uri", published=True)
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    challenge_texts, challenge_truth = challenge_rows(own.challenge_uri, set(model.config.id2label.values()))
    challenge_groups = challenge_slice_groups(challenge_texts)
    predicted = predict(model, tokenizer, texts, own.batch_size, own.max_seq_len)
    metrics = score(truth, predicted)
    groups = slice_groups(cfg, rows, texts)
    slices = score_slices(truth, predicted, groups)
    challenge_predicted = predict(model, tokenizer, challenge_texts, own.batch_size, own.max_seq_len)
    slices.update(score_slices(challenge_truth, challenge_predicted, challenge_groups))
    _print(f"{len(rows)} eval rows", metrics)
    for name, values in slices.items():
        _print(f"  slice {name} ({int(values['rows'])} rows)", {k: v for k, v in values.items() if k != "rows"})

    def score_other(other: Any, other_tokenizer: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        theirs = predict(other, other_tokenizer, texts, own.batch_size, own.max_seq_len)
        theirs_challenge = predict(other, other_tokenizer, challenge_texts, own.batch_size, own.max_seq_len)
        return score(truth, theirs), {
            **score_slices(truth, theirs, groups),
            **score_slices(challenge_truth, theirs_challenge, challenge_groups),
        }

    labels = sorted(set(truth) | set(predicted))
    report = classification_report(truth, predicted, labels=labels, output_dict=True, zero_division=0)
    artifacts = {
        "classification_report.json": json.dumps(report, indent=2).encode(),
        "confusion_matrix.png": confusion_png(truth, predicted, labels),
        "per_class_f1.png": per_class_f1_png(report, labels)[0],
    }
    for name, values in sorted(slices.items()):  # where the model fails, per language and column value
        if values["rows"] >= own.min_slice_rows and name in groups:
            chosen = groups[name]
            artifacts[f"confusion_matrix_{_file_safe(name)}.png"] = confusion_png(
                [truth[i] for i in chosen], [predicted[i] for i in chosen], labels, f"eval split, {name} rows"
            )
    challenge_labels = sorted(set(challenge_truth) | set(challenge_predicted))
    for name, chosen in challenge_groups.items():
        if len(chosen) >= own.min_slice_rows:
            artifacts[f"confusion_matrix_{_file_safe(name)}.png"] = confusion_png(
                [challenge_truth[i] for i in chosen],
                [challenge_predicted[i] for i in chosen],
                challenge_labels,
                "challenge set" + (f", {name.removeprefix(CHALLENGE + ':')} rows" if name != CHALLENGE else ""),
            )
    challenge_frame = None
    if challenge_texts:
        import pandas as pd

        challenge_frame = pd.DataFrame({"text": challenge_texts, "label": challenge_truth})
    return Scored(rows[["text", "label"]], metrics, slices, {}, artifacts, score_other, challenge_frame)


def challenge_rows(uri: str, known_labels: set[str]) -> tuple[list[str], list[str]]:
    """The texts and labels of the challenge file ``uri`` (JSONL, ``{"text", "label"}`` a line);
    none when ``uri`` is empty. A label the model cannot predict is a DataError naming the file
    and the labels, not rows scored as wrong: such a slice would measure the mismatch (a renamed
    intent, a typo in a label), not the model. The shipped default is for the demo's intents, so
    a model of other intents skips it with a note instead."""
    if not uri:
        return [], []
    texts, labels = [], []
    for number, line in enumerate(storage.read_bytes(uri).decode("utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, label = record["text"], record["label"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"evaluate.challenge_uri {uri}: line {number} is not a JSON object with 'text' and "
                f"'label' ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(text, str) or not text.strip() or not isinstance(label, str) or not label:
            raise DataError(
                f"evaluate.challenge_uri {uri}: line {number}: 'text' and 'label' must be non-empty strings"
            )
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError(f"evaluate.challenge_uri {uri} has no rows; set evaluate.challenge_uri='' for none")
    unknown = sorted(set(labels) - known_labels)
    if unknown and uri == DEFAULT_CHALLENGE:
        print(
            f"evaluate: the shipped challenge set is skipped: its intents {unknown} are not this model's "
            f"(it knows {sorted(known_labels)}); set evaluate.challenge_uri to a file of your own labels, or '' "
            f"to say none",
            file=sys.stderr,
            flush=True,
        )
        return [], []
    if unknown:
        raise DataError(
            f"evaluate.challenge_uri {uri}: label(s) {unknown} "
            f"({sum(label in unknown for label in labels)} of {len(labels)} rows) are not labels the "
            f"model knows ({sorted(known_labels)}); relabel those rows or drop them"
        )
    return texts, labels


def challenge_slice_groups(texts: list[str]) -> dict[str, list[int]]:
    """Slice name -> positions of the challenge rows: all of them (``challenge``) and each language
    of them (``challenge:zh``, ``challenge:latin``), by ``text.language_of`` as for the eval rows."""
    if not texts:
        return {}
    groups: dict[str, list[int]] = {CHALLENGE: list(range(len(texts)))}
    for i, text in enumerate(texts):
        groups.setdefault(f"{CHALLENGE}:{language_of(text)}", []).append(i)
    return groups


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


def generate(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], template: str, cfg: PipelineConfig
) -> list[dict[str, Any]]:
    """Greedy answers to the last user turn of each conversation, scored against the reference."""
    import torch

    samples = []
    stop = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    stop.discard(None)
    model.eval()
    for messages in conversations[: cfg.evaluate.generate_rows]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = chat.render(tokenizer, messages[:last], template, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -cfg.train.max_seq_len :]
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=cfg.evaluate.max_new_tokens,
                eos_token_id=sorted(stop),
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        cut = next((i for i, token in enumerate(new) if token in stop), len(new))
        output = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        reference = messages[last]["content"]
        samples.append(
            {
                "prompt": messages[last - 1]["content"],
                "reference": reference,
                "output": output,
                "exact_match": chat.exact_match(reference, output),
                "rouge_l": chat.rouge_l(reference, output),
            }
        )
    return samples


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def score_lm(
    cfg: PipelineConfig,
    model: Any,
    tokenizer: Any,
    frame: Any,
    generate_samples: bool = True,
    encoded: tuple[list[dict], dict[str, int], str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Eval loss and perplexity over the assistant tokens of the eval split; exact match and
    ROUGE-L of generated answers. Loss per token, summed then divided: batching cannot move it.
    ``encoded``: the split as ``chat.encode_split`` gives it for ``tokenizer``, when already done."""
    examples, _, template = encoded or chat.encode_split(cfg, tokenizer, frame, "eval")
    metrics = _loss_metrics(*chat.token_loss(model, examples, tokenizer.pad_token_id, cfg.evaluate.batch_size))
    samples: list[dict[str, Any]] = []
    if generate_samples and cfg.evaluate.generate_rows:
        samples = generate(model, tokenizer, chat.conversations(frame, "eval"), template, cfg)
        metrics["exact_match"] = sum(s["exact_match"] for s in samples) / len(samples)
        metrics["rouge_l"] = sum(s["rouge_l"] for s in samples) / len(samples)
    return metrics, samples


def _loss_metrics(total: float, tokens: int) -> dict[str, float]:
    loss = total / tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def lm_slices(
    cfg: PipelineConfig, model: Any, tokenizer: Any, frame: Any, encoded: tuple[list[dict], dict[str, int], str]
) -> dict[str, dict[str, float]]:
    """Eval loss and perplexity per language of the held-out conversations (their message text)."""
    conversations = chat.conversations(frame, "eval")
    languages = [language_of(" ".join(m["content"] for m in c)) for c in conversations]
    slices = {}
    for name in sorted(set(languages)):
        subset = [e for e in encoded[0] if languages[e["example_id"]] == name]
        if subset:
            total, tokens = chat.token_loss(model, subset, tokenizer.pad_token_id, cfg.evaluate.batch_size)
            slices[name] = {"rows": float(len(subset)), **_loss_metrics(total, tokens)}
    return slices


def evaluate_lm(cfg: PipelineConfig, frame: Any, scratch: Path) -> Scored:
    own = cfg.evaluate
    rows = frame[frame["split"] == "eval"]
    if rows.empty:
        raise DataError(f"{own.snapshot_uri}: the eval split is empty; raise collect.eval_fraction")
    model, tokenizer = load_trained_lm(own.model_uri, cfg.base_model, scratch)
    model = on_accelerator(model)
    encoded = chat.encode_split(cfg, tokenizer, frame, "eval")
    metrics, samples = score_lm(cfg, model, tokenizer, frame, encoded=encoded)
    slices = lm_slices(cfg, model, tokenizer, frame, encoded)
    _print(f"{len(rows)} eval conversations", metrics)
    # The base model on the same tokens (the trained tokenizer: same vocabulary, and the template
    # training used): what fine-tuning bought. A LoRA model holds its base: switch the adapter off.
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_metrics, _ = score_lm(cfg, model, tokenizer, frame, generate_samples=False, encoded=encoded)
    else:
        base, base_tokenizer = load_causal_lm(
            resolve_model(cfg.base_model, scratch / "base"), f"base_model '{cfg.base_model}'"
        )
        extend_like(base, base_tokenizer, tokenizer)  # rows for train.extend_vocab's tokens, as training began
        base_metrics, _ = score_lm(cfg, on_accelerator(base), tokenizer, frame, generate_samples=False, encoded=encoded)
    _print("base model", base_metrics)

    def score_other(other: Any, other_tokenizer: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        if other_tokenizer.pad_token is None:
            other_tokenizer.pad_token = other_tokenizer.eos_token
        theirs = chat.encode_split(cfg, other_tokenizer, frame, "eval")
        other = on_accelerator(other)
        return (
            score_lm(cfg, other, other_tokenizer, frame, encoded=theirs)[0],
            lm_slices(cfg, other, other_tokenizer, frame, theirs),
        )

    return Scored(
        rows[["messages"]],
        metrics,
        slices,
        base_metrics,
        {"samples.json": json.dumps(samples, ensure_ascii=False, indent=2).encode()},
        score_other,
    )


def on_accelerator(model: Any) -> Any:
    """The model on the GPU where the pod has one (k8s.resources gives a causal LM's evaluate one), else as is."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


EVALUATORS = {"sequence-classification": evaluate_classifier, "causal-lm": evaluate_lm}


def run(cfg: PipelineConfig) -> EvaluateResult:
    own = cfg.evaluate
    for key in ("snapshot_uri", "model_uri"):
        if not getattr(own, key):
            raise ConfigError(f"evaluate.{key} is required")
    metric, greater_is_better = own.gate(cfg.task)
    if cfg.task != "sequence-classification" and own.challenge_uri not in ("", DEFAULT_CHALLENGE):
        raise ConfigError(
            f"evaluate.challenge_uri: a challenge set is scored for sequence-classification only, "
            f"not {cfg.task}; set evaluate.challenge_uri=''"
        )
    frame = load_snapshot(own.snapshot_uri)
    with tempfile.TemporaryDirectory(prefix="finetune-eval-") as tmp:
        scored = EVALUATORS[cfg.task](cfg, frame, Path(tmp))
    champion_version = ""
    champion_metrics: dict[str, float] = {}
    champion_slices: dict[str, dict[str, float]] = {}
    champion = _champion(cfg)
    if champion is not None:  # scored on the same rows, by the same code, in this step
        champion_version, champion_model, champion_tokenizer = champion
        champion_metrics, champion_slices = scored.score_other(champion_model, champion_tokenizer)
        _print(f"champion v{champion_version}", champion_metrics)
    promote, reason = decide(
        scored.metrics, champion_metrics if champion_version else None, own, cfg.task, scored.slices, champion_slices
    )
    print(f"evaluate: promote={promote}: {reason}", file=sys.stderr)
    mlflow_run_id = tracking.pipeline_run_id(cfg)
    scored.artifacts.update(_pictures(mlflow_run_id, scored, champion_version, champion_metrics))
    out_uri = cfg.step_uri("evaluate")
    uris = {name: storage.join(out_uri, name) for name in scored.artifacts}
    for name, content in scored.artifacts.items():
        storage.write_bytes(uris[name], content)
    _log(cfg, scored, champion_metrics, promote, reason)
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
        greater_is_better=greater_is_better,
        thresholds=list(own.thresholds),
        slices=scored.slices,
        champion_slices=champion_slices,
        pictures=picture_captions(list(scored.artifacts)),
        mlflow_run_id=mlflow_run_id,
    )


def _log(cfg: PipelineConfig, scored: Scored, champion_metrics: dict[str, float], promote: bool, reason: str) -> None:
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
