"""The step's pictures (loss curves, confusion matrices, F1 per class, perplexity bars) as PNG
bytes, the loss history they are drawn from, and each picture's caption for the model card.

matplotlib and sklearn are imported inside the functions that use them.
"""

from __future__ import annotations

import io
from typing import Any

from pipeline import tracking
from pipeline.config import CHALLENGE
from pipeline.evaluate.scored import Scored

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


def draw_pictures(
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
