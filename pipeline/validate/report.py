"""What the gate publishes and says: Data Docs, the drift report and ``summary.json`` under the
step's prefix and on the pipeline's MLflow run, the verdict of each check on stderr, and for a
failed check the explanation and the remedy the step's error names.

mlflow is imported inside the function that logs to it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import drift, storage, tracking
from pipeline.config import PipelineConfig


def publish(
    cfg: PipelineConfig,
    summary: dict[str, Any],
    checks: list[dict[str, Any]],
    docs: Path,
    report: dict[str, Any] | None,
    scratch: Path,
    passed: bool,
) -> str:
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
    numbers = {
        "validate_rows": summary["rows"],
        "validate_failed_checks": sum(not c["success"] and c["severity"] == "error" for c in checks),
        "validate_warning_checks": sum(not c["success"] and c["severity"] == "warning" for c in checks),
        **{c["check"]: c["observed_value"] for c in checks if c["check"] in drift.CHECKS},
        **{
            f"tokenizer_unknown_rate_{name}": entry["rate"]
            for name, entry in summary.get("tokenizer_coverage", {}).items()
        },
    }
    tracker.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()])
    tracker.set_tag(run_id, "validate.passed", str(summary["passed"]).lower())


def print_checks(checks: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for check in checks:
        verdict = "ok  " if check["success"] else ("WARN" if check["severity"] == "warning" else "FAIL")
        observed = f" = {check['observed_value']} (max {check['max']})" if "max" in check else ""
        print(
            f"validate: {verdict} {check['check']}: {check['expectation']}({check['column'] or ''}){observed}",
            file=sys.stderr,
        )
    tokens = summary.get("token_count")
    if tokens:
        print(
            f"validate: token counts on {tokens['rows_counted']} of {tokens['rows']} rows: {tokens['policy']}",
            file=sys.stderr,
        )
    drops = summary.get("training_drops")
    if drops:
        per_split = "; ".join(
            f"{split} {drops[split]['truncated']} truncated, {drops[split]['dropped']} dropped of {drops[split]['rows']}"
            for split in ("train", "eval")
        )
        print(f"validate: rows longer than train.max_seq_len={drops['max_seq_len']}: {per_split}", file=sys.stderr)
    if summary["drift"]["status"] == "skipped":
        print(f"validate: drift skipped: {summary['drift']['reason']}", file=sys.stderr)


def explain(check: dict[str, Any]) -> str:
    head = f"{check['check']}: {check['expectation']}(column={check['column']}): "
    if "max" in check:  # a drift measure
        rows = (
            f", {check['unexpected_count']} rows, example rows {check['example_rows']}"
            if check["unexpected_count"]
            else ""
        )
        lacking = (
            f", {check['missing_characters']} characters its vocabulary lacks"
            if check.get("missing_characters")
            else ""
        )
        return head + f"observed {check['observed_value']} > max {check['max']}{rows}{lacking}"
    values = f", values {check['example_values']}" if check.get("example_values") else ""
    return (
        head + f"{check['unexpected_count']} unexpected, example rows {check['example_rows']}, "
        f"observed {check['observed_value']}{values}"
    )


def remedy(check: str, cfg: PipelineConfig, summary: dict[str, Any]) -> str:
    """What a person can do about a failed check: the cause in plain words and the setting or
    action that resolves it."""
    own = cfg.validate
    allowed = summary.get("label_allowed", {})
    drift = (
        "the data moved away from the last accepted snapshot: check it is the data you meant; drift checks "
        "fail the gate only with validate.drift_severity=error"
    )
    return {
        **_conversation_remedies(cfg),
        "columns": f"the snapshot lacks a column training reads; its columns are {summary.get('columns', '?')}: "
        "collect.text_column and collect.label_column name the source's columns that become text and label "
        "(causal-lm: messages, or prompt and response, by those names); give collect the source, not a "
        "hand-made snapshot",
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
        "split_leakage": "the same text in train and eval (preference: the same prompt): give collect the source, "
        "which splits by text (preference: by prompt)",
        "training_drops": f"more than validate.max_dropped_rate={own.max_dropped_rate} of the rows are longer than "
        f"train.max_seq_len={cfg.train.max_seq_len} tokens, so training would "
        f"{'truncate' if cfg.task != 'causal-lm' else cfg.train.overlong} them (or find nothing left to learn once "
        "truncated): raise train.max_seq_len, shorten or split them in the source, or raise "
        "validate.max_dropped_rate knowingly (the summary's training_drops counts them per split)",
        "drift_label_psi": drift,
        "drift_length_ks": drift,
        "drift_oov_rate": drift,
        "tokenizer_coverage": (
            f"even with the training split's characters seen at least train.extend_vocab_min_count="
            f"{cfg.train.extend_vocab_min_count} times added to the vocabulary (train.extend_vocab), too much of this "
            "writing system is unknown: the rest are rarer or only in the eval split; add training rows that use "
            "them, lower train.extend_vocab_min_count, or choose a base_model whose tokenizer covers the script"
            if cfg.train.extend_vocab
            else "base_model's tokenizer maps too much of this writing system to its unknown token, so the model cannot "
            "read it: set train.extend_vocab=true (the training split's missing characters become tokens), or "
            "choose a base_model whose tokenizer covers the script (a multilingual one), or raise "
            "validate.max_unknown_token_rate knowingly"
        ),
    }.get(check, "see the Data Docs")


def _conversation_remedies(cfg: PipelineConfig) -> dict[str, str]:
    """``remedy``'s words for the chat and preference families' own checks."""
    chat_source = "fix the conversations in the source (the format: pipeline/data/README.md)"
    return {
        "messages_valid": chat_source,
        "role_order": chat_source,
        "assistant_present": chat_source,
        "assistant_not_empty": chat_source,
        "pairs_valid": "fix the pairs in the source: prompt (ending with a user turn), chosen and rejected (assistant "
        "turns with text), each chat messages or text (the format: pipeline/data/README.md)",
        "answers_differ": "a pair whose chosen and rejected answers are the same teaches nothing: drop or fix it in "
        "the source",
        "pair_tokens": f"pairs whose prompt and answer are longer than train.max_seq_len={cfg.train.max_seq_len} "
        "tokens with the chat template (DPO truncates nothing): raise train.max_seq_len, or shorten them in the source",
    }
