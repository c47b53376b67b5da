"""validate's settings: the data gate's checks by name, their bars and severities.

    finetune validate --help

Foundation layer (the ``config`` package): imports nothing of ours but ``fields`` and ``errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

# Every check by name: the name is what reports, log lines and validate.warn_only use.
CLASSIFICATION_CHECKS = (
    "columns",
    "row_count",
    "text_present",
    "text_not_blank",
    "text_length",
    "text_tokens",
    "training_drops",
    "label_present",
    "label_allowed",
    "label_cardinality",
    "examples_per_class",
    "split_valid",
    "duplicate_rate",
    "split_leakage",
    "tokenizer_coverage",
)
CHAT_CHECKS = (
    "columns",
    "row_count",
    "messages_valid",
    "role_order",
    "assistant_present",
    "assistant_not_empty",
    "split_valid",
    "duplicate_rate",
    "split_leakage",
    "training_drops",
)
PREFERENCE_CHECKS = (
    "columns",
    "row_count",
    "pairs_valid",
    "answers_differ",
    "pair_tokens",
    "split_valid",
    "duplicate_rate",
    "split_leakage",
)
DRIFT_CHECKS = ("drift_label_psi", "drift_length_ks", "drift_oov_rate")
CHECKS = tuple(dict.fromkeys((*CLASSIFICATION_CHECKS, *CHAT_CHECKS, *PREFERENCE_CHECKS, *DRIFT_CHECKS)))
SEVERITIES = ("warning", "error")


@dataclass(frozen=True)
class ValidateConfig:
    """validate's settings (``validate.*``): the data gate's bars and which checks only warn. None of
    them is a ``TrainingArguments`` field; the gate also reads ``train.max_seq_len``,
    ``train.chat_template`` and ``train.extend_vocab``, as training will use them."""

    snapshot_uri: str = option("", "Snapshot to validate (the collect step's snapshot_uri).")
    min_rows: int = option(10, "Fewest rows a snapshot may have.", minimum=1)
    max_text_chars: int = option(5000, "Longest text, in characters.", minimum=1)
    max_text_tokens: int = option(
        512,
        "Most tokens a text may have with base_model's tokenizer, special tokens not counted (check text_tokens).",
        minimum=1,
    )
    token_sample_rows: int = option(
        20000,
        "Rows whose tokens are counted, a sample seeded by `seed`; 0: every row. Rows long enough in UTF-8 "
        "bytes to possibly exceed the token bar are always counted as well.",
        minimum=0,
    )
    allowed_labels: list[str] = option(
        [],
        "Labels a row may carry; empty: the labels of this model's last accepted "
        "snapshot, or any label before the first one. A new class needs this "
        "list or warn_only: [label_allowed].",
    )
    min_examples_per_class: int = option(2, "Fewest rows any label may have.", minimum=1)
    max_duplicate_rate: float = option(
        0.05, "Largest share of rows whose normalised text repeats another's.", minimum=0.0, maximum=1.0
    )
    # A few long rows are the train step's to truncate or drop (train.max_seq_len, train.overlong;
    # counted per split in both summaries); many mean max_seq_len or the data is wrong.
    max_dropped_rate: float = option(
        0.01,
        "Largest share of rows training would truncate or drop: longer than train.max_seq_len tokens, or "
        "(causal-lm) nothing left to learn once truncated (check training_drops).",
        minimum=0.0,
        maximum=1.0,
    )
    drift_max_label_psi: float = option(
        0.2,
        "Largest population stability index of the label shares vs the last "
        "accepted snapshot (0.1: some shift, 0.25: a large one).",
        minimum=0.0,
    )
    drift_max_length_ks: float = option(
        0.2,
        "Largest Kolmogorov-Smirnov statistic of text lengths vs the last accepted snapshot.",
        minimum=0.0,
        maximum=1.0,
    )
    drift_max_oov_rate: float = option(
        0.2, "Largest share of words the last accepted snapshot never has.", minimum=0.0, maximum=1.0
    )
    max_unknown_token_rate: float = option(
        0.05,
        "Largest share of a writing system's tokens that base_model's "
        "tokenizer maps to its unknown token, after train.extend_vocab (check "
        "tokenizer_coverage).",
        minimum=0.0,
        maximum=1.0,
    )
    min_slice_rows: int = option(
        200,
        "Writing systems with fewer rows are reported but not checked for coverage: "
        "in a small sample most unknown tokens are characters seen once, which no "
        "vocabulary extension can teach.",
        minimum=1,
    )
    # Drift is news, not necessarily bad data (a new product line shifts every measure), so it is
    # reported by default and a team that wants a hard stop opts in.
    drift_severity: str = option(
        "warning", "Severity of the drift checks: warning reports, error fails the gate.", choices=SEVERITIES
    )
    warn_only: list[str] = option(
        [], f"Checks reported as warnings instead of failing the gate; any of {list(CHECKS)}."
    )

    def __post_init__(self) -> None:
        check_fields(self, "validate.")
        unknown = sorted(set(self.warn_only) - set(CHECKS))
        if unknown:
            raise ConfigError(f"validate.warn_only: unknown check(s) {unknown}; checks are {list(CHECKS)}")
