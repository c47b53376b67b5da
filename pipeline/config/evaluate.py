"""evaluate's settings: the task families' metrics and their directions, the promotion gate,
absolute thresholds (overall or per slice), the challenge set and the reference sets the
deployment pins.

    finetune evaluate --help

Foundation layer (the ``config`` package): imports nothing of ours but ``fields`` and ``errors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

# Each task family's metrics, the first its default gate metric, and each metric's direction.
TASK_METRICS = {
    "sequence-classification": ("accuracy", "macro_f1"),
    "causal-lm": ("perplexity", "eval_loss", "exact_match", "rouge_l", "stop_rate"),
    # pipeline/preference.py says what each is
    "preference": ("reward_accuracy", "reward_margin", "dpo_reward_accuracy", "dpo_reward_margin", "chosen_perplexity"),
}
METRICS = tuple(m for names in TASK_METRICS.values() for m in names)
LOWER_IS_BETTER = ("perplexity", "eval_loss", "chosen_perplexity")
DIRECTIONS = ("auto", "higher", "lower")


def parse_threshold(rule: str, key: str = "evaluate.thresholds") -> tuple[str, str, float]:
    """``'accuracy>=0.85'`` as ``("accuracy", ">=", 0.85)``, and a bar on one slice of the eval
    split, ``'accuracy[zh]>=0.85'``, as ``("accuracy[zh]", ">=", 0.85)`` (or of the challenge set,
    ``'accuracy[challenge:zh]>=0.85'``); a ConfigError quoting the rule otherwise."""
    match = re.fullmatch(r"\s*(\w+)(\[[\w=.:\-]+\])?\s*(>=|<=)\s*([-+0-9.eE]+)\s*", rule)
    if not match or match.group(1) not in METRICS:
        raise ConfigError(
            f"{key}: {rule!r} is not '<metric> >= <number>' or '<metric> <= <number>' "
            f"(or '<metric>[<slice>] >= <number>', e.g. accuracy[zh]>=0.85) with a metric in "
            f"{list(METRICS)}"
        )
    try:
        return match.group(1) + (match.group(2) or ""), match.group(3), float(match.group(4))
    except ValueError as exc:
        raise ConfigError(f"{key}: {rule!r}: {match.group(4)!r} is not a number") from exc


# The hand-written challenge set shipped beside the demo data (pipeline/data/README.md): scored as
# the slices "challenge", "challenge:zh", "challenge:latin", never trained on.
DEFAULT_CHALLENGE = "pkg://pipeline/data/support_challenge.jsonl"
CHALLENGE = "challenge"


def is_challenge(slice_name: str) -> bool:
    """Whether ``slice_name`` is one of the challenge set's slices (``challenge``, ``challenge:zh``):
    evaluate's gate and register's model card treat them apart from the eval split's."""
    return slice_name == CHALLENGE or slice_name.startswith(f"{CHALLENGE}:")


# A reference set: the deployment's own labelled rows, pinned by content, scored for the new model
# and the champion on every run, and gated on (pipeline/evaluate/reference.py).
REFERENCE_NAME = r"[A-Za-z0-9][\w.-]{0,63}"
PINNED = re.compile(r"(?P<uri>.+)#sha256=(?P<sha256>[0-9a-f]{64})")


def pinned(name: str, entry: object) -> tuple[str, str]:
    """(uri, sha256) of the reference set ``name``'s entry ``'<uri>#sha256=<64 hex digits>'``; a
    ConfigError naming the entry otherwise."""
    where = f"evaluate.reference_sets[{name!r}]"
    if not re.fullmatch(REFERENCE_NAME, name):
        raise ConfigError(f"{where}: a set's name is letters, digits, '_', '.', '-' (up to 64), e.g. 'support'")
    match = PINNED.fullmatch(entry.strip()) if isinstance(entry, str) else None
    if not match:
        raise ConfigError(
            f"{where}: {entry!r} is not '<uri>#sha256=<64 lowercase hex digits>' (the file's sha256, e.g. "
            f"from `sha256sum FILE`): a reference set is pinned by its content"
        )
    return match["uri"], match["sha256"]


def check_reference_gate(own: EvaluateConfig) -> None:
    """Each reference set is pinned; each reference threshold is a classification metric's, on
    every set or on one (``accuracy[support]>=0.8``) that ``reference_sets`` names."""
    for name, entry in own.reference_sets.items():
        pinned(name, entry)
    key = "evaluate.reference_thresholds"
    if own.reference_thresholds and not own.reference_sets:
        raise ConfigError(f"{key} is set but evaluate.reference_sets is empty: there is no set to hold the bar to")
    for rule in own.reference_thresholds:
        metric, _, set_name = parse_threshold(rule, key)[0].rstrip("]").partition("[")
        if metric not in TASK_METRICS["sequence-classification"]:
            raise ConfigError(
                f"{key}: {rule!r}: reference sets are scored with {list(TASK_METRICS['sequence-classification'])}"
            )
        if set_name and set_name not in own.reference_sets:
            raise ConfigError(f"{key}: {rule!r} names '{set_name}', not a set of {sorted(own.reference_sets)}")


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate's settings (``evaluate.*``): the promotion gate, the bars, the slices and the
    challenge set. None of them is a ``TrainingArguments`` field: evaluate scores with its own loop,
    so ``evaluate.batch_size`` is not ``per_device_eval_batch_size`` (the loss of ``train.eval_steps``
    during training uses ``train.batch_size``), and causal-lm reads ``train.max_seq_len`` and
    ``train.chat_template``, as training used them."""

    snapshot_uri: str = option("", "Snapshot whose eval split is scored (the collect step's snapshot_uri).")
    model_uri: str = option("", "Trained model directory (the train step's model_uri).")
    gate_metric: str = option(
        "",
        "Metric compared with the champion's to decide promotion; empty: the task's first (accuracy, perplexity).",
        choices=("", *METRICS),
    )
    metric_direction: str = option(
        "auto",
        "Whether a higher or lower gate_metric is better; auto: lower for eval_loss and perplexity, higher otherwise.",
        choices=DIRECTIONS,
    )
    promotion_margin: float = option(
        0.0,
        "Promote only when the new model beats the champion by more than this; with no champion yet, the trivial "
        "baseline on the same rows (the majority class; a causal LM's base model).",
        minimum=0.0,
    )
    promote: bool = option(
        True,
        "false: register the new version as challenger and never move champion, whatever the gate says (a smoke "
        "run; finetune run --no-promote). A trigger may set it to false, never to true where the deployment's "
        "config says false.",
    )
    thresholds: list[str] = option(
        [],
        "Absolute bars every new model must clear, overall or on one slice of "
        "the eval split, e.g. ['accuracy>=0.85', 'accuracy[zh]>=0.85'].",
    )
    max_slice_regression: float = option(
        0.05,
        "Refuse a new model that is worse than the champion on any slice "
        "(a language of the eval split) by more than this on the gate metric, "
        "however much better it is overall.",
        minimum=0.0,
    )
    min_slice_rows: int = option(
        20,
        "Slices with fewer eval rows are reported but not gated on (too few to tell a regression from noise).",
        minimum=1,
    )
    slice_columns: list[str] = option(
        [],
        "Snapshot columns to slice the eval split on besides the language, each "
        "value a slice named column=value (e.g. channel=email, gated as "
        "accuracy[channel=email]>=0.8); collect.extra_columns carries them.",
    )
    challenge_uri: str = option(
        DEFAULT_CHALLENGE,
        "sequence-classification: a JSONL file of {text, label} rows never trained on, scored by the new model and "
        "the champion as the slices challenge, challenge:zh, challenge:latin (reported, gated only by a threshold "
        "such as accuracy[challenge:zh]>=0.85). Its labels must be ones the model knows; the shipped default is "
        "skipped for a model that does not know all of its labels (your own intents). Empty: none.",
    )
    reference_sets: dict[str, str] = option(
        {},
        "sequence-classification, set by the deployment only (never by a trigger): name -> '<uri>#sha256=<hex>', "
        "JSONL files of {text, label} rows the deployment owns, read and checked against their sha256 (a "
        "mismatch fails the step, naming the set), scored for the new model and the champion on every run; "
        "a new model below evaluate.reference_thresholds or worse than the champion by more than "
        "evaluate.max_reference_regression on any of them is not promoted, whatever the run's own eval split says.",
    )
    reference_thresholds: list[str] = option(
        [],
        "Bars on every reference set, or on one by name, e.g. ['accuracy>=0.8', 'macro_f1[support]>=0.75'].",
    )
    max_reference_regression: float = option(
        0.02,
        "Refuse a new model worse than the champion on any reference set by more than this, on accuracy or macro_f1.",
        minimum=0.0,
    )
    batch_size: int = option(64, "Examples per inference batch.", minimum=1, maximum=4096)
    max_seq_len: int = option(
        64,
        "Tokens per example after truncation (classification; causal-lm uses train.max_seq_len, as training did).",
        minimum=8,
        maximum=8192,
    )
    generate_rows: int = option(
        32,
        "causal-lm: held-out conversations answered by greedy generation for exact match and ROUGE-L; 0: none.",
        minimum=0,
    )
    max_new_tokens: int = option(64, "causal-lm: longest generated answer, in tokens.", minimum=1, maximum=4096)

    def __post_init__(self) -> None:
        check_fields(self, "evaluate.")
        for rule in self.thresholds:
            parse_threshold(rule)
        check_reference_gate(self)

    def reference_pins(self) -> dict[str, tuple[str, str]]:
        """Each reference set's (uri, sha256), by name."""
        return {name: pinned(name, entry) for name, entry in sorted(self.reference_sets.items())}

    def gate(self, task: str) -> tuple[str, bool]:
        """(metric, greater_is_better) of the promotion gate for ``task``."""
        metric = self.gate_metric or TASK_METRICS[task][0]
        if metric not in TASK_METRICS[task]:
            raise ConfigError(
                f"evaluate.gate_metric: {metric!r} is not a {task} metric; choose one of {list(TASK_METRICS[task])}"
            )
        if self.metric_direction == "auto":
            return metric, metric not in LOWER_IS_BETTER
        return metric, self.metric_direction == "higher"
