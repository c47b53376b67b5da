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

The step is here; its parts beside it: ``suites`` (each task family's expectations and the frame
they read), ``columns`` (the classification suite's derived columns and the token counting both
suites share), ``conversations`` (the chat suite's), ``coverage`` (the tokenizer's unknown tokens
per writing system), ``checks`` (running the suites in Great Expectations; the one shape of every
check), ``accepted`` (the last accepted snapshot and drift from it) and ``report`` (Data Docs,
summary, drift report, MLflow, and what a failed check means).

great_expectations, pandas, numpy, pyarrow and mlflow are imported inside the functions that use
them: the step table imports this package when Airflow parses the DAG files.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, ValidationFailed
from pipeline.models import load_tokenizer
from pipeline.snapshot import load_snapshot
from pipeline.validate.accepted import measure_drift, read_accepted, record_accepted
from pipeline.validate.checks import drift_check, run_suite
from pipeline.validate.coverage import coverage_checks, coverage_expectations, coverage_frame
from pipeline.validate.report import explain, print_checks, publish, remedy
from pipeline.validate.suites import SUITES


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


class _Laps:
    """The seconds each phase of the step took, into ``timings`` (the summary's ``timings_s``)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.clock = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record the time since the previous lap (or the start) as ``phase``."""
        self.timings[phase] = round(time.perf_counter() - self.clock, 3)
        self.clock = time.perf_counter()


def _run_suites(
    cfg: PipelineConfig, suite: Any, coverage: dict[str, Any], gx: Any, scratch: Path
) -> tuple[list[dict[str, Any]], Path]:
    """Run the task's suite and, when the tokenizer's coverage was measured, the coverage suite
    beside it in one Great Expectations run; the checks (the coverage ones described per writing
    system) and the Data Docs."""
    own = cfg.validate
    checks, docs = run_suite(
        [
            (suite.name, suite.frame, suite.expectations),
            *(
                [("tokenizer_coverage", coverage_frame(coverage, own), coverage_expectations(gx, own))]
                if coverage
                else []
            ),
        ],
        own,
        scratch,
    )
    described = [c for c in checks if c["check"] == "tokenizer_coverage"]
    checks = [c for c in checks if c["check"] != "tokenizer_coverage"] + coverage_checks(described, coverage, own)
    return checks, docs


def _failure(cfg: PipelineConfig, failed: list[dict[str, Any]], summary: dict[str, Any]) -> ValidationFailed:
    """The failed gate's error: a line naming the failed checks, then the snapshot, every failed
    check with its count, examples and the fix, one a line, and the Data Docs."""
    explained = "".join(f"\n  {explain(c)} [to fix: {remedy(c['check'], cfg, summary)}]" for c in failed)
    return ValidationFailed(
        f"{len(failed)} check(s) failed: {', '.join(c['check'] for c in failed)}\n"
        f"  snapshot: {cfg.validate.snapshot_uri}{explained}\n"
        f"  Data Docs: {summary['data_docs_uri']}/index.html; validate.* settings belong in the "
        f"deployment's config: FINETUNE_CONFIG, or `finetune run --config FILE`"
    )


def run(cfg: PipelineConfig) -> ValidateResult:
    own = cfg.validate
    if not own.snapshot_uri:
        raise ConfigError("validate.snapshot_uri is required (the collect step's snapshot_uri)")
    timings: dict[str, float] = {}
    lap = _Laps(timings).lap
    frame = load_snapshot(own.snapshot_uri)
    accepted = read_accepted(cfg)
    lap("load")
    summary: dict[str, Any] = {
        "snapshot_uri": own.snapshot_uri,
        "task": cfg.task,
        "rows": len(frame),
        "columns": [str(c) for c in frame.columns],
        "tokenizer": cfg.base_model,
        "timings_s": timings,
    }
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home from a pipeline step
    import great_expectations as gx  # seconds to import: only a step that validates pays for it

    lap("import")
    with tempfile.TemporaryDirectory(prefix="finetune-validate-") as tmp:
        scratch = Path(tmp)
        suite = SUITES[cfg.task](cfg, frame, load_tokenizer(cfg.base_model, scratch), accepted, gx)
        summary.update(suite.summary)
        lap("derive")
        checks, docs = _run_suites(cfg, suite, summary.get("tokenizer_coverage", {}), gx, scratch)
        parsed = suite.parsed
        del suite  # the derived frame: as large as the snapshot, and no longer needed
        lap("suite")
        summary["drift"], report = measure_drift(cfg, accepted, frame, parsed)
        if report is not None:
            checks += [drift_check(m, own) for m in report["checks"]]
        lap("drift")
        failed = [c for c in checks if not c["success"] and c["severity"] == "error"]
        warnings = [c for c in checks if not c["success"] and c["severity"] == "warning"]
        summary_uri = publish(cfg, summary, checks, docs, report, scratch, passed=not failed)
        lap("publish")

    print_checks(checks, summary)
    if failed:
        raise _failure(cfg, failed, summary)
    labels = sorted({str(v) for v in frame["label"].dropna()}) if "label" in frame else []
    record_uri = record_accepted(cfg, len(frame), labels, summary_uri)
    return ValidateResult(
        result_uri=storage.join(cfg.step_uri("validate"), "result.json"),
        passed=True,
        summary_uri=summary_uri,
        data_docs_uri=summary["data_docs_uri"],
        failed=[],
        rows=len(frame),
        warnings=[explain(c) for c in warnings],
        drift_report_uri=summary["drift"].get("report_uri", ""),
        accepted_uri=record_uri,
    )
