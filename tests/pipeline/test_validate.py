import json

import pandas as pd
import pytest

from pipeline import collect, storage, validate
from pipeline.config import load_config
from pipeline.errors import ValidationFailed


def _snapshot(tmp_path, rows) -> str:
    path = tmp_path / "snap.parquet"
    pd.DataFrame(rows, columns=["text", "label", "split"]).to_parquet(path, index=False)
    return path.as_uri()


def _cfg(snapshot_uri, *extra):
    return load_config(None, [f"validate.snapshot_uri={json.dumps(snapshot_uri)}", "run_id=v", *extra])


def test_good_snapshot_passes_and_publishes_data_docs(small_data):
    snapshot = collect.run(load_config(None, [f"collect.sources={json.dumps([str(small_data)])}"]))
    result = validate.run(_cfg(snapshot.snapshot_uri))
    assert result.passed and result.rows == snapshot.rows
    docs = storage.local_path(result.data_docs_uri)
    assert (docs / "index.html").is_file()
    assert any(p.suffix == ".html" for p in (docs / "validations").rglob("*"))
    summary = storage.read_json(result.summary_uri)
    assert summary["passed"] and {c["expectation"] for c in summary["checks"]} >= {
        "expect_column_values_to_not_be_null", "expect_column_to_exist"}


def test_failing_suite_names_expectations_counts_and_rows(tmp_path):
    rows = [("fine text", "a", "train")] * 10 + [("   ", "a", "train"), ("ok", None, "eval"), ("x", None, "train")]
    cfg = _cfg(_snapshot(tmp_path, rows))
    with pytest.raises(ValidationFailed) as failed:
        validate.run(cfg)
    message = str(failed.value)
    assert "2 expectation(s) failed" in message
    assert "expect_column_values_to_not_match_regex(column=text): 1 unexpected, example rows [10]" in message
    assert "expect_column_values_to_not_be_null(column=label): 2 unexpected, example rows [11, 12]" in message
    assert failed.value.exit_code == 3
    # The report is still published for a person to read; no result.json marks success.
    assert storage.exists(cfg.step_uri("validate") + "/data_docs/index.html")
    assert not storage.read_json(cfg.step_uri("validate") + "/summary.json")["passed"]
    assert not storage.exists(cfg.step_uri("validate") + "/result.json")


def test_missing_column_and_too_few_rows(tmp_path):
    path = tmp_path / "nosplit.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_parquet(path)
    with pytest.raises(ValidationFailed) as failed:
        validate.run(_cfg(path.as_uri()))
    assert "expect_column_to_exist(column=split)" in str(failed.value)
    assert "expect_table_row_count_to_be_between(column=None)" in str(failed.value)


def test_cli_exit_code_is_distinct(tmp_path):
    uri = _snapshot(tmp_path, [("", "a", "train")] * 12)
    assert validate.main(["--set", f"validate.snapshot_uri={uri}", "--set", "run_id=v2"]) == 3
