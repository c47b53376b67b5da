"""validate: gate a snapshot with a Great Expectations 1.x suite and publish its Data Docs.

The suite checks the columns the trainer needs, that text is present and not blank, and that
every row has a label. A failing suite writes the Data Docs and a JSON summary, then exits with
code 3 naming every failed expectation with its count and example row numbers.

    finetune validate --set validate.snapshot_uri=file:///.../snapshots/<sha>/data.parquet
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, check_fields, option
from pipeline.errors import ConfigError, ValidationFailed


# Every check of the suite by name: the name is what reports and validate.warn_only use.
CHECKS = ("columns", "row_count", "text_present", "text_not_blank", "text_length", "label_present",
          "label_allowed", "split_valid", "examples_per_class", "duplicate_rate", "split_leakage")


@dataclass(frozen=True)
class ValidateConfig:
    snapshot_uri: str = option("", "Snapshot to validate (the collect step's snapshot_uri).")
    min_rows: int = option(10, "Fewest rows a snapshot may have.", minimum=1)
    max_text_chars: int = option(5000, "Longest text, in characters.", minimum=1)
    allowed_labels: list[str] = option([], "Labels a row may carry; empty: any label.")
    min_examples_per_class: int = option(2, "Fewest rows any label may have.", minimum=1)
    max_duplicate_rate: float = option(0.05, "Largest share of rows whose normalised text repeats another's.",
                                       minimum=0.0, maximum=1.0)
    warn_only: list[str] = option([], f"Checks reported as warnings instead of failing the gate; any of "
                                      f"{list(CHECKS)}.")

    def __post_init__(self) -> None:
        check_fields(self, "validate.")
        unknown = sorted(set(self.warn_only) - set(CHECKS))
        if unknown:
            raise ConfigError(f"validate.warn_only: unknown check(s) {unknown}; checks are {list(CHECKS)}")


@dataclass(frozen=True)
class ValidateResult:
    result_uri: str
    passed: bool
    summary_uri: str
    data_docs_uri: str
    failed: list[str]
    rows: int
    warnings: list[str] = field(default_factory=list)


def with_derived_columns(frame: Any) -> Any:
    """Columns the suite checks besides the data: normalised text, rows per label, leakage."""
    from pipeline.collect import normalize_text

    out = frame.copy()  # a missing column is reported by the 'columns' check, not here
    if "text" in out:
        out["text_normalized"] = [normalize_text(t) if isinstance(t, str) else None for t in out["text"]]
    if "label" in out:
        out["label_count"] = out.groupby("label", dropna=False)["label"].transform("size")
    if "split" in out and "text" in out:
        splits = out.groupby("text_normalized")["split"].transform("nunique")
        out["leaks_across_splits"] = splits.fillna(1) > 1  # the same text in train and eval
    return out


def build_suite(gx: Any, cfg: ValidateConfig) -> Any:
    e = gx.expectations
    checks = [
        *(("columns", e.ExpectColumnToExist(column=c)) for c in ("text", "label", "split")),
        ("row_count", e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows)),
        ("text_present", e.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_blank", e.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$")),
        ("text_length", e.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1,
                                                              max_value=cfg.max_text_chars)),
        ("label_present", e.ExpectColumnValuesToNotBeNull(column="label")),
        ("split_valid", e.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"])),
        ("examples_per_class", e.ExpectColumnValuesToBeBetween(column="label_count",
                                                              min_value=cfg.min_examples_per_class)),
        # 'mostly': the share of rows that must be unique; a duplicate rate above the bar fails.
        ("duplicate_rate", e.ExpectColumnValuesToBeUnique(column="text_normalized",
                                                          mostly=1.0 - cfg.max_duplicate_rate)),
        ("split_leakage", e.ExpectColumnValuesToBeInSet(column="leaks_across_splits", value_set=[False])),
    ]
    if cfg.allowed_labels:
        checks.append(("label_allowed", e.ExpectColumnValuesToBeInSet(column="label",
                                                                       value_set=list(cfg.allowed_labels))))
    suite = gx.ExpectationSuite(name="sequence_classification")
    for name, expectation in checks:
        expectation.meta = {"check": name, "severity": "warning" if name in cfg.warn_only else "error"}
        suite.add_expectation(expectation)
    return suite


def _describe(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    details = result.result or {}
    meta = config.meta or {}
    return {
        "check": meta.get("check", config.type),
        "severity": meta.get("severity", "error"),
        "expectation": config.type,
        "column": config.kwargs.get("column"),
        "success": bool(result.success),
        "unexpected_count": details.get("unexpected_count"),
        "example_rows": [int(i) for i in (details.get("partial_unexpected_index_list") or [])[:5]],
        "observed_value": details.get("observed_value"),
    }


def run(cfg: PipelineConfig) -> ValidateResult:
    from pipeline.collect import load_snapshot

    own = cfg.validate
    if not own.snapshot_uri:
        raise ConfigError("validate.snapshot_uri is required (the collect step's snapshot_uri)")
    frame = load_snapshot(own.snapshot_uri)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home from a pipeline step
    import great_expectations as gx

    out_uri = cfg.step_uri("validate")
    with tempfile.TemporaryDirectory(prefix="finetune-gx-") as tmp:
        context = gx.get_context(mode="file", project_root_dir=tmp)
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in task logs
        batch = (context.data_sources.add_pandas("snapshot").add_dataframe_asset(name="rows")
                 .add_batch_definition_whole_dataframe("all"))
        suite = context.suites.add(build_suite(gx, own))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name="snapshot", data=batch,
                                                                                suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="gate", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "SUMMARY"}))
        outcome = checkpoint.run(batch_parameters={"dataframe": with_derived_columns(frame)})
        checks = [_describe(r) for run_result in outcome.run_results.values() for r in run_result.results]
        docs = Path(tmp) / "gx" / "uncommitted" / "data_docs" / "local_site"
        data_docs_uri = storage.publish_dir(docs, storage.join(out_uri, "data_docs"))
    failed = [c for c in checks if not c["success"] and c["severity"] == "error"]
    warnings = [c for c in checks if not c["success"] and c["severity"] == "warning"]
    summary_uri = storage.join(out_uri, "summary.json")
    storage.write_json(summary_uri, {"snapshot_uri": own.snapshot_uri, "rows": len(frame),
                                     "passed": not failed, "checks": checks})
    for check in checks:
        verdict = "ok  " if check["success"] else ("WARN" if check["severity"] == "warning" else "FAIL")
        print(f"validate: {verdict} {check['check']}: {check['expectation']}({check['column'] or ''})",
              file=sys.stderr)
    if failed:
        raise ValidationFailed(f"{len(failed)} expectation(s) failed on {own.snapshot_uri}: "
                               + "; ".join(map(_explain, failed)) + f" (Data Docs: {data_docs_uri}/index.html)")
    return ValidateResult(result_uri=storage.join(out_uri, "result.json"), passed=True, summary_uri=summary_uri,
                          data_docs_uri=data_docs_uri, failed=[], rows=len(frame),
                          warnings=[_explain(c) for c in warnings])


def _explain(check: dict[str, Any]) -> str:
    return (f"{check['check']}: {check['expectation']}(column={check['column']}): {check['unexpected_count']} "
            f"unexpected, example rows {check['example_rows']}, observed {check['observed_value']}")


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import step_main

    return step_main("validate", run, argv)
