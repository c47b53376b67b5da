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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, check_fields, option
from pipeline.errors import ConfigError, ValidationFailed


@dataclass(frozen=True)
class ValidateConfig:
    snapshot_uri: str = option("", "Snapshot to validate (the collect step's snapshot_uri).")
    min_rows: int = option(10, "Fewest rows a snapshot may have.", minimum=1)
    max_text_chars: int = option(5000, "Longest text, in characters.", minimum=1)

    def __post_init__(self) -> None:
        check_fields(self, "validate.")


@dataclass(frozen=True)
class ValidateResult:
    result_uri: str
    passed: bool
    summary_uri: str
    data_docs_uri: str
    failed: list[str]
    rows: int


def build_suite(gx: Any, cfg: ValidateConfig) -> Any:
    expectations = gx.expectations
    suite = gx.ExpectationSuite(name="sequence_classification")
    for column in ("text", "label", "split"):
        suite.add_expectation(expectations.ExpectColumnToExist(column=column))
    suite.add_expectation(expectations.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows))
    suite.add_expectation(expectations.ExpectColumnValuesToNotBeNull(column="text"))
    suite.add_expectation(expectations.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"))
    suite.add_expectation(expectations.ExpectColumnValueLengthsToBeBetween(
        column="text", min_value=1, max_value=cfg.max_text_chars))
    suite.add_expectation(expectations.ExpectColumnValuesToNotBeNull(column="label"))
    suite.add_expectation(expectations.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"]))
    return suite


def _describe(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    details = result.result or {}
    return {
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
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        checks = [_describe(r) for run_result in outcome.run_results.values() for r in run_result.results]
        docs = Path(tmp) / "gx" / "uncommitted" / "data_docs" / "local_site"
        data_docs_uri = storage.publish_dir(docs, storage.join(out_uri, "data_docs"))
    failed = [c for c in checks if not c["success"]]
    summary_uri = storage.join(out_uri, "summary.json")
    storage.write_json(summary_uri, {"snapshot_uri": own.snapshot_uri, "rows": len(frame),
                                     "passed": not failed, "checks": checks})
    for check in checks:
        print(f"validate: {'ok  ' if check['success'] else 'FAIL'} {check['expectation']}"
              f"({check['column'] or ''})", file=sys.stderr)
    if failed:
        lines = [f"{c['expectation']}(column={c['column']}): {c['unexpected_count']} unexpected, "
                 f"example rows {c['example_rows']}, observed {c['observed_value']}" for c in failed]
        raise ValidationFailed(f"{len(failed)} expectation(s) failed on {own.snapshot_uri}: " + "; ".join(lines)
                               + f" (Data Docs: {data_docs_uri}/index.html)")
    return ValidateResult(result_uri=storage.join(out_uri, "result.json"), passed=True, summary_uri=summary_uri,
                          data_docs_uri=data_docs_uri, failed=[], rows=len(frame))


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import step_main

    return step_main("validate", run, argv)
