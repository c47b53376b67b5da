"""validate: gate a snapshot with a Great Expectations 1.x suite, measure its drift from the last
accepted snapshot, and publish Data Docs, a summary and a drift report.

The suite follows ``task``: for ``sequence-classification`` (columns ``text``, ``label``,
``split``) it checks the columns, text presence, length in characters and in the base model's
tokens, labels (present, in the allowed set, at least two classes, enough rows each), duplicates
and leakage between splits; for ``causal-lm`` (columns ``messages``, ``split``) it checks that
every conversation parses, keeps the role order, has a non-empty assistant turn and fits
``train.max_seq_len`` tokens once rendered with the chat template, plus duplicates and leakage.
Drift checks (:mod:`pipeline.drift`) join them when an accepted snapshot exists.

A failing gate publishes the Data Docs, ``summary.json`` and the drift report, logs them to the
pipeline's MLflow run, then exits with code 3 naming every failed check with its count and example
rows. A passing gate records the snapshot as this model's last accepted one
(``<artifact_root>/accepted/<model_name>/latest.json``): the next run takes its labels as the
allowed set and measures drift against it.

    finetune validate --set validate.snapshot_uri=file:///.../snapshots/<sha>/data.parquet

great_expectations, pandas, numpy, pyarrow and mlflow are imported inside the functions that use
them: the step table imports this module when Airflow parses the DAG files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import chat, drift, storage, tracking
from pipeline.config import PipelineConfig, ValidateConfig
from pipeline.errors import ConfigError, DataError, ValidationFailed
from pipeline.models import extend_vocabulary, load_tokenizer, unreadable
from pipeline.snapshot import load_snapshot
from pipeline.text import language_of, normalize_text


@dataclass(frozen=True)
class ValidateResult:
    result_uri: str
    passed: bool
    summary_uri: str
    data_docs_uri: str
    failed: list[str]
    rows: int
    warnings: list[str] = field(default_factory=list)
    drift_report_uri: str = ""  # empty when there was no accepted snapshot to compare with
    accepted_uri: str = ""


# ---------------------------------------------------------------------------------------------
# Derived columns: computed once, vectorised where pandas can, so the suite only compares them.

def with_derived_columns(frame: Any) -> Any:
    """Columns the classification suite checks besides the data: normalised text, rows per label, leakage."""
    out = frame.copy()  # a missing column is reported by the 'columns' check, not here
    if "text" in out:
        out["text_normalized"] = [normalize_text(t) if isinstance(t, str) else None for t in out["text"]]
    if "label" in out:
        out["label_count"] = out.groupby("label", dropna=False)["label"].transform("size")
    return _with_leakage(out)


def _with_leakage(out: Any) -> Any:
    if "split" in out and "text_normalized" in out:
        splits = out.groupby("text_normalized")["split"].transform("nunique")
        out["leaks_across_splits"] = splits.fillna(1) > 1  # the same text in train and eval
    return out


def utf8_bytes(texts: Any) -> Any:
    """UTF-8 length of every text (0 for null), vectorised by Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(texts, type=pa.large_string(), from_pandas=True)
    return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False)


def rows_to_count(upper_bytes: Any, bar: int, sample_rows: int, seed: int) -> Any:
    """Row positions whose tokens are counted: every row when ``sample_rows`` is 0 or covers them,
    else a seeded sample plus every row that could exceed ``bar``.

    WordPiece, BPE, byte-level BPE and SentencePiece with byte fallback make at most one token
    per UTF-8 byte (``upper_bytes`` adds one for a prefix token), so a shorter row cannot exceed
    the bar; the factor 2 is a margin for normalisers that expand text (NFKD, lower-casing).
    """
    import numpy as np

    if sample_rows == 0 or sample_rows >= len(upper_bytes):
        return np.arange(len(upper_bytes))
    sample = np.random.default_rng(seed).choice(len(upper_bytes), size=sample_rows, replace=False)
    return np.union1d(sample, np.flatnonzero(2 * np.asarray(upper_bytes) > bar))


def _token_note(counted: Any, total: int, sample_rows: int, bar: int, what: str) -> dict[str, Any]:
    policy = ("every row" if len(counted) == total else
              f"a sample of {sample_rows} rows seeded by `seed`, plus every row of more than {bar // 2} UTF-8 "
              f"bytes (only those can exceed {bar} tokens)")
    return {"counted": what, "rows_counted": int(len(counted)), "rows": total, "policy": policy}


def classification_columns(frame: Any, tokenizer: Any, own: ValidateConfig,
                           seed: int) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]:
    """The classification suite's frame, how token counts were taken, and the tokenizer's
    coverage of each writing system on the same rows."""
    import numpy as np

    out = with_derived_columns(frame)
    if "text" not in out:
        return out, {}, {}
    positions = rows_to_count(utf8_bytes(out["text"]) + 1, own.max_text_tokens, own.token_sample_rows, seed)
    positions = [int(i) for i in positions if isinstance(out["text"].iat[i], str)]
    tokens = np.full(len(out), np.nan)  # rows not counted stay null: the expectation skips them
    encoded: list[list[int]] = []
    if positions:
        encoded = tokenizer([out["text"].iat[i] for i in positions], add_special_tokens=False,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        tokens[positions] = [len(ids) for ids in encoded]
    out["text_tokens"] = tokens
    coverage = tokenizer_coverage(tokenizer, [out["text"].iat[i] for i in positions], encoded, positions)
    return out, _token_note(positions, len(out), own.token_sample_rows, own.max_text_tokens,
                            "tokens of the text, special tokens not counted"), coverage


def tokenizer_coverage(tokenizer: Any, texts: list[str], encoded: list[list[int]],
                       positions: list[int]) -> dict[str, dict[str, Any]]:
    """Per writing system (text.language_of): rows, tokens, the share of them that are the
    tokenizer's unknown token, the rows with the most, and characters the vocabulary lacks.
    Empty for a tokenizer without an unknown token (byte-level BPE falls back to bytes instead)."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return {}
    scripts: dict[str, dict[str, Any]] = {}
    for text, ids, row in zip(texts, encoded, positions):
        entry = scripts.setdefault(language_of(text), {"rows": 0, "tokens": 0, "unknown": 0, "worst": [], "chars": set()})
        missing = sum(token == unknown for token in ids)
        entry["rows"] += 1
        entry["tokens"] += len(ids)
        entry["unknown"] += missing
        if missing:
            entry["worst"].append((missing / max(len(ids), 1), row))
            entry["chars"].update(c for c in text if not c.isspace())
    for entry in scripts.values():
        lacking = list(unreadable(tokenizer, sorted(entry.pop("chars"))[:5000]))
        worst = sorted(entry.pop("worst"), reverse=True)
        entry.update(rate=round(entry["unknown"] / entry["tokens"], 6) if entry["tokens"] else 0.0,
                     example_rows=[row for _, row in worst[:5]], rows_with_unknown=len(worst),
                     missing_characters=len(lacking), missing_examples="".join(lacking[:30]))
    return scripts


# Tokens a chat template adds per message are estimated from the template itself; this is the
# allowance when the template cannot render the probe (ChatML: <|im_start|>, role, \n, <|im_end|>, \n).
MESSAGE_TOKEN_ALLOWANCE = 5


def chat_columns(frame: Any, tokenizer: Any, template: str, own: ValidateConfig, max_seq_len: int,
                 seed: int) -> tuple[Any, dict[str, Any], list[Any]]:
    """The chat suite's frame, how token counts were taken, and each row's parsed messages (None
    when they do not parse)."""
    import numpy as np

    out = frame.copy()
    if "messages" not in out:
        return out, {}, [None] * len(out)
    parsed: list[list[dict[str, str]] | None] = []
    errors: list[str | None] = []
    for value in out["messages"]:
        try:
            parsed.append(chat.parse_messages(value))
            errors.append(None)
        except ValueError as exc:
            parsed.append(None)
            errors.append(str(exc))
    out["messages_error"] = errors
    out["assistant_turns"] = [np.nan if m is None else sum(x["role"] == "assistant" for x in m) for m in parsed]
    out["empty_assistant_turns"] = [np.nan if m is None else sum(x["role"] == "assistant" and not x["content"].strip()
                                                                 for x in m) for m in parsed]
    # Missing and empty assistant turns have checks of their own; role_order judges the order alone.
    out["role_problem"] = [None if m is None or not any(x["role"] == "assistant" for x in m)
                           else chat.role_problem([{**x, "content": x["content"] or "-"} for x in m]) for m in parsed]
    out["text_normalized"] = [
        normalize_text("\n".join(f"{x['role']}: {x['content']}" for x in m)) if m is not None
        else (normalize_text(v) if isinstance(v, str) else None) for m, v in zip(parsed, out["messages"])]
    out = _with_leakage(out)

    contents = [None if m is None else "".join(x["content"] for x in m) for m in parsed]
    try:
        probe = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        per_message = len(chat.render(tokenizer, probe, template).encode()) // 2 + 1
    except Exception:  # a template may reject the probe; the documented allowance stands in
        per_message = MESSAGE_TOKEN_ALLOWANCE
    upper = utf8_bytes(contents) + np.array([per_message * len(m) if m else 0 for m in parsed]) + 1
    positions = [int(i) for i in rows_to_count(upper, max_seq_len, own.token_sample_rows, seed) if parsed[i]]
    tokens = np.full(len(out), np.nan)
    for i in positions:
        messages = parsed[i]
        assert messages is not None  # positions holds rows whose messages parsed
        tokens[i] = chat.token_length(tokenizer, messages, template)
    out["conversation_tokens"] = tokens
    return out, _token_note(positions, len(out), own.token_sample_rows, max_seq_len,
                            "tokens of the conversation rendered with the chat template"), parsed


# ---------------------------------------------------------------------------------------------
# The suites.

def classification_expectations(gx: Any, own: ValidateConfig, allowed: list[str]) -> list[tuple[str, Any]]:
    e = gx.expectations
    checks = [
        *(("columns", e.ExpectColumnToExist(column=c)) for c in ("text", "label", "split")),
        ("row_count", e.ExpectTableRowCountToBeBetween(min_value=own.min_rows)),
        ("text_present", e.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_blank", e.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$")),
        ("text_length", e.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1,
                                                              max_value=own.max_text_chars)),
        ("text_tokens", e.ExpectColumnValuesToBeBetween(column="text_tokens", min_value=1,
                                                        max_value=own.max_text_tokens)),
        ("label_present", e.ExpectColumnValuesToNotBeNull(column="label")),
        ("label_cardinality", e.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2)),
        ("split_valid", e.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"])),
        ("examples_per_class", e.ExpectColumnValuesToBeBetween(column="label_count",
                                                              min_value=own.min_examples_per_class)),
        # 'mostly': the share of rows that must be unique; a duplicate rate above the bar fails.
        ("duplicate_rate", e.ExpectColumnValuesToBeUnique(column="text_normalized",
                                                          mostly=1.0 - own.max_duplicate_rate)),
        ("split_leakage", e.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False])),
    ]
    if allowed:
        checks.append(("label_allowed", e.ExpectColumnValuesToBeInSet(column="label", value_set=list(allowed))))
    return checks


def chat_expectations(gx: Any, own: ValidateConfig, max_seq_len: int) -> list[tuple[str, Any]]:
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
        ("duplicate_rate", e.ExpectColumnValuesToBeUnique(column="text_normalized",
                                                          mostly=1.0 - own.max_duplicate_rate)),
        ("split_leakage", e.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False])),
        ("conversation_tokens", e.ExpectColumnValuesToBeBetween(column="conversation_tokens", max_value=max_seq_len,
                                                                mostly=1.0 - own.max_overlong_rate)),
    ]


def severity(check: str, own: ValidateConfig) -> str:
    if check in own.warn_only:
        return "warning"
    return own.drift_severity if check in drift.CHECKS else "error"


def run_suite(suites: list[tuple[str, Any, list[tuple[str, Any]]]], own: ValidateConfig,
              root: Path) -> tuple[list[dict[str, Any]], Path]:
    """Run each (name, frame, expectations) in one file context under ``root``, so that one Data
    Docs site shows them all; the checks and the Data Docs folder."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home from a pipeline step
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in task logs
    source = context.data_sources.add_pandas("snapshot")
    checks = []
    for name, frame, expectations in suites:
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
        suite = gx.ExpectationSuite(name=name)
        for check, expectation in expectations:
            expectation.meta = {"check": check, "severity": severity(check, own)}
            suite.add_expectation(expectation)
        suite = context.suites.add(suite)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"gate-{name}", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "SUMMARY"}))
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        checks += [_describe(r) for run_result in outcome.run_results.values() for r in run_result.results]
    return checks, root / "gx" / "uncommitted" / "data_docs" / "local_site"


def _shorten(value: Any, limit: int = 80) -> Any:
    text = value if isinstance(value, str) else None
    return text[:limit] + f"... ({len(text)} chars)" if text is not None and len(text) > limit else value


def _row_of(index: Any, column: str | None) -> int | str:
    """A row number, or where the frame's index is named (the coverage table's, by script), its
    value: GX reports those as {index name: value, column: value}."""
    if isinstance(index, dict):
        return ", ".join(str(v) for k, v in index.items() if k != column)
    return index if isinstance(index, str) else int(index)


def _describe(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    details = result.result or {}
    meta = config.meta or {}
    values = [_shorten(v) for v in (details.get("partial_unexpected_list") or [])[:5]]
    return {
        "check": meta.get("check", config.type),
        "severity": meta.get("severity", "error"),
        "expectation": config.type,
        "column": config.kwargs.get("column"),
        "success": bool(result.success),
        "unexpected_count": details.get("unexpected_count"),
        "example_rows": [_row_of(i, config.kwargs.get("column"))
                         for i in (details.get("partial_unexpected_index_list") or [])[:5]],
        "example_values": values if any(v is not None for v in values) else [],
        "observed_value": _shorten(details.get("observed_value")),
    }


def coverage_frame(coverage: dict[str, dict[str, Any]], own: ValidateConfig) -> Any:
    """One row per writing system with at least ``validate.min_slice_rows`` rows, indexed by its
    name: the table the tokenizer_coverage expectation reads (and Data Docs shows)."""
    import pandas as pd

    kept = {name: entry for name, entry in sorted(coverage.items()) if entry["rows"] >= own.min_slice_rows}
    return pd.DataFrame({"rows": [e["rows"] for e in kept.values()], "tokens": [e["tokens"] for e in kept.values()],
                         "unknown_tokens": [e["unknown"] for e in kept.values()],
                         "unknown_token_rate": [e["rate"] for e in kept.values()],
                         "missing_characters": [e["missing_characters"] for e in kept.values()]},
                        index=pd.Index(list(kept), name="script"))


def coverage_expectations(gx: Any, own: ValidateConfig) -> list[tuple[str, Any]]:
    return [("tokenizer_coverage", gx.expectations.ExpectColumnValuesToBeBetween(
        column="unknown_token_rate", min_value=0.0, max_value=own.max_unknown_token_rate))]


def coverage_checks(described: list[dict[str, Any]], coverage: dict[str, dict[str, Any]],
                    own: ValidateConfig) -> list[dict[str, Any]]:
    """The tokenizer_coverage expectation's verdict per writing system (its unexpected rows are the
    failing scripts), each with the rate, the rows with the most unknown tokens and what is missing."""
    [result] = described or [{"success": True, "severity": severity("tokenizer_coverage", own)}]
    failing = set() if result["success"] else set(result["example_rows"])
    return [{"check": "tokenizer_coverage", "severity": result["severity"], "expectation": "unknown_token_rate",
             "column": f"text ({name})", "success": name not in failing,
             "unexpected_count": entry["rows_with_unknown"], "example_rows": entry["example_rows"],
             "example_values": [], "observed_value": entry["rate"], "max": own.max_unknown_token_rate,
             "script": name, "missing_characters": entry["missing_characters"],
             "missing_examples": entry["missing_examples"]}
            for name, entry in sorted(coverage.items()) if entry["rows"] >= own.min_slice_rows]


def _drift_check(measure: dict[str, Any], own: ValidateConfig) -> dict[str, Any]:
    """A drift measure in the shape of a suite check, so reports and the gate treat both alike."""
    return {"check": measure["check"], "severity": severity(measure["check"], own), "expectation": measure["measure"],
            "column": measure["of"], "success": measure["passed"], "unexpected_count": measure.get("rows"),
            "example_rows": measure.get("example_rows", []), "example_values": [],
            "observed_value": measure["value"], "max": measure["max"]}


def _explain(check: dict[str, Any]) -> str:
    head = f"{check['check']}: {check['expectation']}(column={check['column']}): "
    if "max" in check:  # a drift measure
        rows = (f", {check['unexpected_count']} rows, example rows {check['example_rows']}"
                if check["unexpected_count"] else "")
        lacking = (f", {check['missing_characters']} characters its vocabulary lacks"
                   if check.get("missing_characters") else "")
        return head + f"observed {check['observed_value']} > max {check['max']}{rows}{lacking}"
    values = f", values {check['example_values']}" if check.get("example_values") else ""
    return (head + f"{check['unexpected_count']} unexpected, example rows {check['example_rows']}, "
                   f"observed {check['observed_value']}{values}")


def remedy(check: str, cfg: PipelineConfig, summary: dict[str, Any]) -> str:
    """What a person can do about a failed check: the cause in plain words and the setting or
    action that resolves it."""
    own = cfg.validate
    allowed = summary.get("label_allowed", {})
    drift = ("the data moved away from the last accepted snapshot: check it is the data you meant; drift checks "
             "fail the gate only with validate.drift_severity=error")
    chat_source = "fix the conversations in the source (the format: pipeline/data/README.md)"
    return {
        "columns": "the snapshot lacks a column training reads: collect.text_column and collect.label_column name "
                   "the source's columns (causal-lm: messages, or prompt and response)",
        "row_count": f"fewer than validate.min_rows={own.min_rows} rows: add data, or lower validate.min_rows",
        "text_present": "rows without text: fix or drop them in the source",
        "text_not_blank": "rows whose text is only whitespace: fix or drop them in the source",
        "text_length": f"texts longer than validate.max_text_chars={own.max_text_chars}: shorten them or raise the bar",
        "text_tokens": f"texts with no tokens, or more than validate.max_text_tokens={own.max_text_tokens} of "
                       f"base_model's tokenizer: drop the empty ones; shorten the long ones or raise the bar",
        "label_present": "rows without a label: label them or drop them in the source",
        "label_allowed": f"labels outside the allowed set, which is {allowed.get('source', 'validate.allowed_labels')}; "
                         f"if this is data for another model, set model_name to a new name (e.g. --set "
                         f"model_name=my-intents), which starts its own label set; if the labels changed on purpose, "
                         f"list the new set in validate.allowed_labels (or add label_allowed to validate.warn_only)",
        "label_cardinality": "a classifier needs at least two labels",
        "examples_per_class": f"a label has fewer than validate.min_examples_per_class={own.min_examples_per_class} "
                              f"rows: add examples or drop that label",
        "split_valid": "split must be train or eval: give collect the source, not a hand-made snapshot",
        "duplicate_rate": f"more than validate.max_duplicate_rate={own.max_duplicate_rate} of the rows repeat "
                          f"another's text once normalised: deduplicate the source",
        "split_leakage": "the same text in train and eval: give collect the source, which splits by text",
        "messages_valid": chat_source, "role_order": chat_source, "assistant_present": chat_source,
        "assistant_not_empty": chat_source,
        "conversation_tokens": f"more than validate.max_overlong_rate={own.max_overlong_rate} of the conversations "
                               f"exceed train.max_seq_len={cfg.train.max_seq_len} tokens: raise train.max_seq_len, "
                               f"or raise validate.max_overlong_rate and let train.overlong truncate or drop them",
        "drift_label_psi": drift, "drift_length_ks": drift, "drift_oov_rate": drift,
        "tokenizer_coverage": (
            f"even with the training split's characters seen at least train.extend_vocab_min_count="
            f"{cfg.train.extend_vocab_min_count} times added to the vocabulary (train.extend_vocab), too much of this "
            "writing system is unknown: the rest are rarer or only in the eval split; add training rows that use "
            "them, lower train.extend_vocab_min_count, or choose a base_model whose tokenizer covers the script"
            if cfg.train.extend_vocab else
            "base_model's tokenizer maps too much of this writing system to its unknown token, so the model cannot "
            "read it: set train.extend_vocab=true (the training split's missing characters become tokens), or "
            "choose a base_model whose tokenizer covers the script (a multilingual one), or raise "
            "validate.max_unknown_token_rate knowingly"),
    }.get(check, "see the Data Docs")


# ---------------------------------------------------------------------------------------------
# The last accepted snapshot of a model, and drift against it.

def accepted_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.artifact_root, "accepted", cfg.model_name, "latest.json")


def read_accepted(cfg: PipelineConfig) -> dict[str, Any] | None:
    """This model's last accepted snapshot record, or None (none yet, or one of another task)."""
    uri = accepted_uri(cfg)
    if not storage.exists(uri):
        return None
    record = storage.read_json(uri)
    if record.get("task", cfg.task) != cfg.task:
        print(f"validate: {uri} records a {record.get('task')} snapshot; ignored for task {cfg.task}", file=sys.stderr)
        return None
    return record


def record_accepted(cfg: PipelineConfig, rows: int, labels: list[str], summary_uri: str) -> str:
    """Point ``accepted/<model>/latest.json`` at this snapshot, unless a newer pipeline run (by
    ``run_date``) already moved it: a re-run of an old validate never rewinds it."""
    uri = accepted_uri(cfg)
    ours = cfg.run_time()
    if storage.exists(uri):
        current = storage.read_json(uri)
        theirs = datetime.fromisoformat(current.get("run_date") or current["accepted_at"])
        if theirs > ours:
            print(f"validate: {uri} stays at the snapshot of run {current.get('run_id')} ({theirs.isoformat()}), "
                  f"newer than this run ({ours.isoformat()})", file=sys.stderr)
            return uri
    storage.write_json(uri, {
        "snapshot_uri": cfg.validate.snapshot_uri, "sha256": _snapshot_sha256(cfg.validate.snapshot_uri),
        "labels": labels, "rows": rows, "task": cfg.task, "run_id": cfg.run_id, "summary_uri": summary_uri,
        "run_date": ours.isoformat(), "accepted_at": datetime.now(UTC).isoformat()})
    return uri


def _snapshot_sha256(snapshot_uri: str) -> str | None:
    """The content hash collect recorded in the manifest beside the snapshot, when there is one."""
    manifest = snapshot_uri.rsplit("/", 1)[0] + "/manifest.json"
    try:
        return storage.read_json(manifest).get("sha256") if storage.exists(manifest) else None
    except DataError:
        return None


def _texts_and_labels(task: str, frame: Any, parsed: list[Any] | None = None) -> tuple[Any, Any]:
    """What drift compares: the text (chat: the concatenated message contents) and the labels (chat: none)."""
    import pandas as pd

    if task != "causal-lm":
        texts = frame["text"] if "text" in frame else pd.Series([], dtype=object)
        return texts.where(texts.map(lambda t: isinstance(t, str)), None), frame.get("label")
    if parsed is None:
        parsed = []
        for value in frame.get("messages", []):
            try:
                parsed.append(chat.parse_messages(value))
            except ValueError:
                parsed.append(None)
    return pd.Series(["\n".join(x["content"] for x in m) if m else None for m in parsed], dtype=object), None


def measure_drift(cfg: PipelineConfig, accepted: dict[str, Any] | None, frame: Any,
                  parsed: list[Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The summary's drift entry and the report (None when skipped)."""
    own = cfg.validate
    if accepted is None:
        return {"status": "skipped", "reason": f"no accepted snapshot for model {cfg.model_name} yet"}, None
    try:
        reference = load_snapshot(accepted["snapshot_uri"])
    except (DataError, OSError, ValueError) as exc:  # the reference was deleted or is unreadable
        return {"status": "skipped", "reason": f"the last accepted snapshot cannot be read: {exc}"}, None
    ref_texts, ref_labels = _texts_and_labels(cfg.task, reference)
    cur_texts, cur_labels = _texts_and_labels(cfg.task, frame, parsed)
    report = drift.compare(ref_texts, cur_texts, ref_labels, cur_labels, own.drift_max_label_psi,
                           own.drift_max_length_ks, own.drift_max_oov_rate)
    report["reference"] = {k: accepted.get(k) for k in ("snapshot_uri", "sha256", "accepted_at", "run_id")}
    report["current"] = {"snapshot_uri": own.snapshot_uri}
    return {"status": "compared", "reference": report["reference"]}, report


# ---------------------------------------------------------------------------------------------
# The step: the suite of the task family, drift, then the verdict, published either way.

@dataclass
class Suite:
    """One task family's suite, ready to run: the frame with its derived columns, the named
    expectations, the parsed conversations (chat; drift reuses them) and summary entries."""

    name: str
    frame: Any
    expectations: list[tuple[str, Any]]
    parsed: list[Any] | None
    summary: dict[str, Any]


def classification_suite(cfg: PipelineConfig, frame: Any, tokenizer: Any, accepted: dict[str, Any] | None,
                         gx: Any) -> Suite:
    own = cfg.validate
    allowed, source = _allowed_labels(own, accepted)
    # Tokens as training will count them: with train.extend_vocab, the training split's characters
    # the vocabulary lacks are tokens of their own, and only what is left is unknown.
    added = {}
    if cfg.train.extend_vocab and {"text", "split"} <= set(frame.columns):
        added = extend_vocabulary(tokenizer, frame.loc[frame["split"] == "train", "text"],
                                  cfg.train.extend_vocab_min_count)
    derived, token_note, coverage = classification_columns(frame, tokenizer, own, cfg.seed)
    return Suite("sequence_classification", derived, classification_expectations(gx, own, allowed), None,
                 {"label_allowed": {"labels": allowed, "source": source}, "token_count": token_note,
                  "tokenizer_coverage": coverage, "extended_vocab": {"added_tokens": len(added),
                                                                     "tokens": "".join(added)}})


def chat_suite(cfg: PipelineConfig, frame: Any, tokenizer: Any, accepted: dict[str, Any] | None, gx: Any) -> Suite:
    try:
        template = chat.chat_template(tokenizer, cfg.train.chat_template)
    except ValueError as exc:
        raise ConfigError(f"train.chat_template: {exc}") from exc
    derived, token_note, parsed = chat_columns(frame, tokenizer, template, cfg.validate, cfg.train.max_seq_len,
                                               cfg.seed)
    return Suite("chat", derived, chat_expectations(gx, cfg.validate, cfg.train.max_seq_len), parsed,
                 {"token_count": token_note})


SUITES: dict[str, Callable[..., Suite]] = {"sequence-classification": classification_suite, "causal-lm": chat_suite}


def run(cfg: PipelineConfig) -> ValidateResult:
    own = cfg.validate
    if not own.snapshot_uri:
        raise ConfigError("validate.snapshot_uri is required (the collect step's snapshot_uri)")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        timings[phase] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    frame = load_snapshot(own.snapshot_uri)
    accepted = read_accepted(cfg)
    lap("load")
    summary: dict[str, Any] = {"snapshot_uri": own.snapshot_uri, "task": cfg.task, "rows": len(frame),
                               "tokenizer": cfg.base_model, "timings_s": timings}
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home from a pipeline step
    import great_expectations as gx  # seconds to import: only a step that validates pays for it

    lap("import")
    with tempfile.TemporaryDirectory(prefix="finetune-validate-") as tmp:
        scratch = Path(tmp)
        suite = SUITES[cfg.task](cfg, frame, load_tokenizer(cfg.base_model, scratch), accepted, gx)
        summary.update(suite.summary)
        lap("derive")
        coverage = summary.get("tokenizer_coverage", {})
        checks, docs = run_suite([(suite.name, suite.frame, suite.expectations),
                                  *([("tokenizer_coverage", coverage_frame(coverage, own),
                                      coverage_expectations(gx, own))] if coverage else [])], own, scratch)
        described = [c for c in checks if c["check"] == "tokenizer_coverage"]
        checks = [c for c in checks if c["check"] != "tokenizer_coverage"] + coverage_checks(described, coverage, own)
        parsed = suite.parsed
        del suite  # the derived frame: as large as the snapshot, and no longer needed
        lap("suite")
        summary["drift"], report = measure_drift(cfg, accepted, frame, parsed)
        if report is not None:
            checks += [_drift_check(m, own) for m in report["checks"]]
        lap("drift")
        failed = [c for c in checks if not c["success"] and c["severity"] == "error"]
        warnings = [c for c in checks if not c["success"] and c["severity"] == "warning"]
        summary_uri = publish(cfg, summary, checks, docs, report, scratch, passed=not failed)
        lap("publish")

    _print(checks, summary)
    if failed:
        explained = "; ".join(f"{_explain(c)} [to fix: {remedy(c['check'], cfg, summary)}]" for c in failed)
        raise ValidationFailed(f"{len(failed)} check(s) failed on {own.snapshot_uri}: {explained} (Data Docs: "
                               f"{summary['data_docs_uri']}/index.html; validate.* settings belong in the "
                               f"deployment's config: FINETUNE_CONFIG, or `finetune run --config FILE`)")
    labels = sorted({str(v) for v in frame["label"].dropna()}) if "label" in frame else []
    record_uri = record_accepted(cfg, len(frame), labels, summary_uri)
    return ValidateResult(result_uri=storage.join(cfg.step_uri("validate"), "result.json"), passed=True,
                          summary_uri=summary_uri, data_docs_uri=summary["data_docs_uri"], failed=[], rows=len(frame),
                          warnings=[_explain(c) for c in warnings],
                          drift_report_uri=summary["drift"].get("report_uri", ""), accepted_uri=record_uri)


def publish(cfg: PipelineConfig, summary: dict[str, Any], checks: list[dict[str, Any]], docs: Path,
            report: dict[str, Any] | None, scratch: Path, passed: bool) -> str:
    """Data Docs, the drift report and ``summary.json`` under the step's prefix, then the same on
    the pipeline's MLflow run; published whether the gate passed or not. The summary's URI."""
    out_uri = cfg.step_uri("validate")
    data_docs_uri = storage.publish_dir(docs, storage.join(out_uri, "data_docs"))
    drift_dir = _write_drift(report, scratch / "drift", cfg.validate.snapshot_uri)
    drift_report_uri = _publish_drift(drift_dir, out_uri)
    if drift_report_uri:
        summary["drift"]["report_uri"] = drift_report_uri
    summary_uri = storage.join(out_uri, "summary.json")
    summary.update(passed=passed, checks=checks, data_docs_uri=data_docs_uri)
    storage.write_json(summary_uri, summary)
    try:
        _log(cfg, summary, docs, drift_dir)
    except Exception as exc:  # a failed gate exits 3 even when the tracking server is down
        if passed:
            raise
        print(f"validate: could not log to MLflow: {exc}", file=sys.stderr)
    return summary_uri


def _allowed_labels(own: ValidateConfig, accepted: dict[str, Any] | None) -> tuple[list[str], str]:
    if own.allowed_labels:
        return list(own.allowed_labels), "validate.allowed_labels"
    if accepted and accepted.get("labels"):
        return list(accepted["labels"]), f"the last accepted snapshot {accepted['snapshot_uri']}"
    return [], "none: any label (validate.allowed_labels is empty and no snapshot was accepted yet)"


def _write_drift(report: dict[str, Any] | None, folder: Path, snapshot_uri: str) -> Path | None:
    if report is None:
        return None
    folder.mkdir(parents=True)
    (folder / "drift.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    title = f"Drift of {snapshot_uri} from {report['reference']['snapshot_uri']}"
    (folder / "drift.html").write_text(drift.render_html(report, title), encoding="utf-8")
    return folder


def _publish_drift(folder: Path | None, out_uri: str) -> str:
    """Copy the drift report under the step's prefix; without one, remove a stale report of an earlier try."""
    for name in ("drift.json", "drift.html"):
        uri = storage.join(out_uri, name)
        if folder is None:
            if storage.exists(uri):
                storage.delete(uri)
        else:
            storage.write_bytes(uri, (folder / name).read_bytes())
    return storage.join(out_uri, "drift.html") if folder is not None else ""


def _log(cfg: PipelineConfig, summary: dict[str, Any], docs: Path, drift_dir: Path | None) -> None:
    """The summary, Data Docs, drift report and headline numbers, on the pipeline's MLflow run."""
    from mlflow.entities import Metric

    run_id = tracking.pipeline_run_id(cfg)
    tracker = tracking.client()
    tracker.log_dict(run_id, summary, "validate/summary.json")
    tracker.log_artifacts(run_id, str(docs), "validate/data_docs")
    if drift_dir is not None:
        tracker.log_artifacts(run_id, str(drift_dir), "validate/drift")
    now = int(time.time() * 1000)
    checks = summary["checks"]
    numbers = {"validate_rows": summary["rows"],
               "validate_failed_checks": sum(not c["success"] and c["severity"] == "error" for c in checks),
               "validate_warning_checks": sum(not c["success"] and c["severity"] == "warning" for c in checks),
               **{c["check"]: c["observed_value"] for c in checks if c["check"] in drift.CHECKS},
               **{f"tokenizer_unknown_rate_{name}": entry["rate"]
                  for name, entry in summary.get("tokenizer_coverage", {}).items()}}
    tracker.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()])
    tracker.set_tag(run_id, "validate.passed", str(summary["passed"]).lower())


def _print(checks: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for check in checks:
        verdict = "ok  " if check["success"] else ("WARN" if check["severity"] == "warning" else "FAIL")
        observed = f" = {check['observed_value']} (max {check['max']})" if "max" in check else ""
        print(f"validate: {verdict} {check['check']}: {check['expectation']}({check['column'] or ''}){observed}",
              file=sys.stderr)
    tokens = summary.get("token_count")
    if tokens:
        print(f"validate: token counts on {tokens['rows_counted']} of {tokens['rows']} rows: {tokens['policy']}",
              file=sys.stderr)
    if summary["drift"]["status"] == "skipped":
        print(f"validate: drift skipped: {summary['drift']['reason']}", file=sys.stderr)

