"""Running suites with Great Expectations, and the one shape every check takes (a suite's
expectation, a writing system's tokenizer coverage, a drift measure): name, severity,
expectation, column, success, counts, example rows and values, observed value.

great_expectations is imported inside the function that runs the suites.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline import drift
from pipeline.config import ValidateConfig


def severity(check: str, own: ValidateConfig) -> str:
    if check in own.warn_only:
        return "warning"
    return own.drift_severity if check in drift.CHECKS else "error"


def run_suite(
    suites: list[tuple[str, Any, list[tuple[str, Any]]]], own: ValidateConfig, root: Path
) -> tuple[list[dict[str, Any]], Path]:
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
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"gate-{name}",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                result_format={"result_format": "SUMMARY"},
            )
        )
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
        "example_rows": [
            _row_of(i, config.kwargs.get("column")) for i in (details.get("partial_unexpected_index_list") or [])[:5]
        ],
        "example_values": values if any(v is not None for v in values) else [],
        "observed_value": _shorten(details.get("observed_value")),
    }


def drift_check(measure: dict[str, Any], own: ValidateConfig) -> dict[str, Any]:
    """A drift measure in the shape of a suite check, so reports and the gate treat both alike."""
    return {
        "check": measure["check"],
        "severity": severity(measure["check"], own),
        "expectation": measure["measure"],
        "column": measure["of"],
        "success": measure["passed"],
        "unexpected_count": measure.get("rows"),
        "example_rows": measure.get("example_rows", []),
        "example_values": [],
        "observed_value": measure["value"],
        "max": measure["max"],
    }
