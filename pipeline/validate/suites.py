"""The suites: for each task family, the named Great Expectations expectations and the frame with
the derived columns they read, ready for :func:`pipeline.validate.checks.run_suite`.

``great_expectations`` is handed in by the step, which imports it once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import chat
from pipeline.config import PipelineConfig, ValidateConfig
from pipeline.errors import ConfigError
from pipeline.models import extend_vocabulary
from pipeline.validate.columns import classification_columns, drop_counts
from pipeline.validate.conversations import chat_columns
from pipeline.validate.pairs import preference_columns


@dataclass
class Suite:
    """One task family's suite, ready to run: the frame with its derived columns, the named
    expectations, the parsed conversations (chat; drift reuses them) and summary entries."""

    name: str
    frame: Any
    expectations: list[tuple[str, Any]]
    parsed: list[Any] | None
    summary: dict[str, Any]


def classification_expectations(gx: Any, own: ValidateConfig, allowed: list[str]) -> list[tuple[str, Any]]:
    e = gx.expectations
    checks = [
        *(("columns", e.ExpectColumnToExist(column=c)) for c in ("text", "label", "split")),
        ("row_count", e.ExpectTableRowCountToBeBetween(min_value=own.min_rows)),
        ("text_present", e.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_blank", e.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$")),
        (
            "text_length",
            e.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1, max_value=own.max_text_chars),
        ),
        (
            "text_tokens",
            e.ExpectColumnValuesToBeBetween(column="text_tokens", min_value=1, max_value=own.max_text_tokens),
        ),
        ("label_present", e.ExpectColumnValuesToNotBeNull(column="label")),
        ("label_cardinality", e.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2)),
        ("split_valid", e.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"])),
        (
            "examples_per_class",
            e.ExpectColumnValuesToBeBetween(column="label_count", min_value=own.min_examples_per_class),
        ),
        # 'mostly': the share of rows that must be unique; a duplicate rate above the bar fails.
        (
            "duplicate_rate",
            e.ExpectColumnValuesToBeUnique(column="text_normalized", mostly=1.0 - own.max_duplicate_rate),
        ),
        ("split_leakage", e.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False])),
        dropped_rows(gx, own),
    ]
    if allowed:
        checks.append(("label_allowed", e.ExpectColumnValuesToBeInSet(column="label", value_set=list(allowed))))
    return checks


def chat_expectations(gx: Any, own: ValidateConfig) -> list[tuple[str, Any]]:
    e = gx.expectations
    return [
        *(("columns", e.ExpectColumnToExist(column=c)) for c in ("messages", "split")),
        ("row_count", e.ExpectTableRowCountToBeBetween(min_value=own.min_rows)),
        # The null-expectations report the problem text of each failing row as its value.
        ("messages_valid", e.ExpectColumnValuesToBeNull(column="messages_error")),
        ("role_order", e.ExpectColumnValuesToBeNull(column="role_problem")),
        ("assistant_present", e.ExpectColumnValuesToBeBetween(column="assistant_turns", min_value=1)),
        ("assistant_not_empty", e.ExpectColumnValuesToBeBetween(column="empty_assistant_turns", max_value=0)),
        ("split_valid", e.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"])),
        (
            "duplicate_rate",
            e.ExpectColumnValuesToBeUnique(column="text_normalized", mostly=1.0 - own.max_duplicate_rate),
        ),
        ("split_leakage", e.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False])),
        dropped_rows(gx, own),
    ]


def dropped_rows(gx: Any, own: ValidateConfig) -> tuple[str, Any]:
    """A few rows training truncates or drops pass (counted in the summary); more than
    validate.max_dropped_rate fail, each failing row's fate reported as its value."""
    return (
        "training_drops",
        gx.expectations.ExpectColumnValuesToBeNull(column="training_drop", mostly=1.0 - own.max_dropped_rate),
    )


def classification_suite(
    cfg: PipelineConfig, frame: Any, tokenizer: Any, accepted: dict[str, Any] | None, gx: Any
) -> Suite:
    own = cfg.validate
    allowed, source = allowed_labels(own, accepted)
    # Tokens as training will count them: with train.extend_vocab, the training split's characters
    # the vocabulary lacks are tokens of their own, and only what is left is unknown.
    added = {}
    if cfg.train.extend_vocab and {"text", "split"} <= set(frame.columns):
        added = extend_vocabulary(
            tokenizer, frame.loc[frame["split"] == "train", "text"], cfg.train.extend_vocab_min_count
        )
    derived, token_note, coverage = classification_columns(frame, tokenizer, own, cfg.seed, cfg.train.max_seq_len)
    return Suite(
        "sequence_classification",
        derived,
        classification_expectations(gx, own, allowed),
        None,
        {
            "label_allowed": {"labels": allowed, "source": source},
            "token_count": token_note,
            "training_drops": drop_counts(derived, cfg.train.max_seq_len),
            "tokenizer_coverage": coverage,
            "extended_vocab": {"added_tokens": len(added), "tokens": "".join(added)},
        },
    )


def chat_suite(cfg: PipelineConfig, frame: Any, tokenizer: Any, accepted: dict[str, Any] | None, gx: Any) -> Suite:
    try:
        template = chat.chat_template(tokenizer, cfg.train.chat_template)
    except ValueError as exc:
        raise ConfigError(f"train.chat_template: {exc}") from exc
    try:
        if cfg.train.eos_token:  # the tokenizer train will use: its EOS renders, and counts, as training's
            chat.use_eos_token(tokenizer, None, cfg.train.eos_token)
    except ValueError as exc:
        raise ConfigError(f"train.chat_template / train.eos_token: {exc}") from exc
    check_turns_stop(cfg, tokenizer, template)
    derived, token_note, parsed = chat_columns(frame, tokenizer, template, cfg.validate, cfg.train, cfg.seed)
    summary = {"token_count": token_note, "training_drops": drop_counts(derived, cfg.train.max_seq_len)}
    return Suite("chat", derived, chat_expectations(gx, cfg.validate), parsed, summary)


def check_turns_stop(cfg: PipelineConfig, tokenizer: Any, template: str) -> None:
    """Refuse a template whose assistant turns end with no token generation stops at (the
    tokenizer's EOS, the base model's generation config, train.eos_token): a model trained on it
    never stops generating (TRL #2059). ``tokenizer`` already carries train.eos_token. Bad settings:
    exit 2, before anything is trained."""
    try:
        marker, ids = chat.turn_end(tokenizer, template)
    except ValueError as exc:
        raise ConfigError(f"train.chat_template / train.eos_token: {exc}") from exc
    stops = chat.stop_ids(tokenizer, tokenizer.name_or_path)
    if not stops:  # a base model that names no stop token at all: nothing the template could match
        print(f"validate: base_model '{cfg.base_model}' names no EOS token; set train.eos_token", file=sys.stderr)
        return
    if set(ids) & stops:
        return
    names = sorted(str(tokenizer.convert_ids_to_tokens(i)) for i in stops)
    marker_tokens = [
        str(t) for t in tokenizer.convert_ids_to_tokens(tokenizer(marker, add_special_tokens=False)["input_ids"])
    ]
    special = [t for t in marker_tokens if t in tokenizer.all_special_tokens] or marker_tokens or ["<end-of-turn>"]
    raise ConfigError(
        f"train.chat_template ({cfg.train.chat_template or 'the tokenizer' + chr(39) + 's own'}) ends an assistant "
        f"turn with {marker!r} (tokens {marker_tokens}), which holds none of the tokens generation stops at "
        f"{names} (base_model '{cfg.base_model}': the tokenizer's EOS and its generation config's eos_token_id): "
        f"a model trained on it would never stop; set train.eos_token to the end-of-turn token (e.g. "
        f"{special[0]!r}), which then becomes the saved tokenizer's EOS and a stop token of the saved "
        "generation config"
    )


def preference_expectations(gx: Any, own: ValidateConfig, max_seq_len: int) -> list[tuple[str, Any]]:
    e = gx.expectations
    return [
        *(("columns", e.ExpectColumnToExist(column=c)) for c in ("prompt", "chosen", "rejected", "split")),
        ("row_count", e.ExpectTableRowCountToBeBetween(min_value=own.min_rows)),
        # The null-expectation reports the problem text of each failing row (naming the field) as its value.
        ("pairs_valid", e.ExpectColumnValuesToBeNull(column="pair_error")),
        ("answers_differ", e.ExpectColumnValuesToBeInSet(column="same_answers", value_set=[False])),
        ("pair_tokens", e.ExpectColumnValuesToBeBetween(column="pair_tokens", min_value=1, max_value=max_seq_len)),
        ("split_valid", e.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"])),
        (
            "duplicate_rate",
            e.ExpectColumnValuesToBeUnique(column="text_normalized", mostly=1.0 - own.max_duplicate_rate),
        ),
        ("split_leakage", e.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False])),
    ]


def preference_suite(
    cfg: PipelineConfig, frame: Any, tokenizer: Any, accepted: dict[str, Any] | None, gx: Any
) -> Suite:
    """Pairs as train's DPO reads them: structure, two different answers, each with its prompt within
    train.max_seq_len tokens once rendered with the chat template (DPO truncates nothing: a longer
    pair is refused here), duplicates, and no prompt in both splits."""
    try:
        template = chat.chat_template(tokenizer, cfg.train.chat_template)
    except ValueError as exc:
        raise ConfigError(f"train.chat_template: {exc}") from exc
    derived, parsed = preference_columns(frame, tokenizer, template)
    counted = derived["pair_tokens"].dropna() if "pair_tokens" in derived else []
    summary = {
        "pair_tokens": {
            "max_seq_len": cfg.train.max_seq_len,
            "longest": int(max(counted)) if len(counted) else 0,
            "counted": len(counted),
            "what": "tokens of the prompt and the longer answer rendered with the chat template",
        }
    }
    return Suite(
        "preference", derived, preference_expectations(gx, cfg.validate, cfg.train.max_seq_len), parsed, summary
    )


SUITES: dict[str, Callable[..., Suite]] = {
    "sequence-classification": classification_suite,
    "causal-lm": chat_suite,
    "preference": preference_suite,
}


def allowed_labels(own: ValidateConfig, accepted: dict[str, Any] | None) -> tuple[list[str], str]:
    if own.allowed_labels:
        return list(own.allowed_labels), "validate.allowed_labels"
    if accepted and accepted.get("labels"):
        return list(accepted["labels"]), f"the last accepted snapshot {accepted['snapshot_uri']}"
    return [], "none: any label (validate.allowed_labels is empty and no snapshot was accepted yet)"
