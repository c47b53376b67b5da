"""The last accepted snapshot of a model, and drift against it.

A passing gate points ``<artifact_root>/accepted/<model_name>/latest.json`` at its snapshot
(never rewinding it past a newer pipeline run); the next run takes that record's labels as the
allowed set and measures drift (:mod:`pipeline.drift`) of its snapshot from the recorded one.

pandas is imported inside the function that builds the compared texts.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

from pipeline import chat, drift, storage
from pipeline.config import PipelineConfig
from pipeline.errors import DataError
from pipeline.snapshot import load_snapshot
from pipeline.validate.conversations import parse_each


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
            print(
                f"validate: {uri} stays at the snapshot of run {current.get('run_id')} ({theirs.isoformat()}), "
                f"newer than this run ({ours.isoformat()})",
                file=sys.stderr,
            )
            return uri
    storage.write_json(
        uri,
        {
            "snapshot_uri": cfg.validate.snapshot_uri,
            "sha256": _snapshot_sha256(cfg.validate.snapshot_uri),
            "labels": labels,
            "rows": rows,
            "task": cfg.task,
            "run_id": cfg.run_id,
            "summary_uri": summary_uri,
            "run_date": ours.isoformat(),
            "accepted_at": datetime.now(UTC).isoformat(),
        },
    )
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

    if task == "preference" and parsed is None:  # the prompt and the chosen answer, as the suite hands them
        parsed = [
            None if any(not isinstance(row[f], str) for f in ("prompt", "chosen")) else _pair_text(row)
            for _, row in frame.iterrows()
        ]
    if task == "sequence-classification":
        texts = frame["text"] if "text" in frame else pd.Series([], dtype=object)
        return texts.where(texts.map(lambda t: isinstance(t, str)), None), frame.get("label")
    if parsed is None:
        parsed, _ = parse_each(frame.get("messages", []))
    return pd.Series(["\n".join(x["content"] for x in m) if m else None for m in parsed], dtype=object), None


def _pair_text(row: Any) -> list[dict[str, str]] | None:
    try:
        return chat.parse_messages(row["prompt"]) + chat.parse_messages(row["chosen"])
    except ValueError:
        return None


def measure_drift(
    cfg: PipelineConfig, accepted: dict[str, Any] | None, frame: Any, parsed: list[Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
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
    report = drift.compare(
        ref_texts,
        cur_texts,
        ref_labels,
        cur_labels,
        own.drift_max_label_psi,
        own.drift_max_length_ks,
        own.drift_max_oov_rate,
    )
    report["reference"] = {k: accepted.get(k) for k in ("snapshot_uri", "sha256", "accepted_at", "run_id")}
    report["current"] = {"snapshot_uri": own.snapshot_uri}
    return {"status": "compared", "reference": report["reference"]}, report
