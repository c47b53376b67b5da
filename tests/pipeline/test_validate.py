import json

import pandas as pd
import pytest

from pipeline import collect, storage, validate
from pipeline.config import load_config
from pipeline.errors import ConfigError, ValidationFailed


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
    rows = [(f"fine text {i}", "a", "train") for i in range(10)] + [("   ", "a", "train"), ("ok", None, "eval"),
                                                                     ("x", None, "train")]
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


def _rows(n, label="a", split="train", prefix="text"):
    return [(f"{prefix} {label} {i}", label, split) for i in range(n)]


@pytest.mark.parametrize("rows, sets, check, message", [
    (_rows(12) + [("Text A 0", "a", "train")], ["validate.max_duplicate_rate=0.0"], "duplicate_rate",
     "expect_column_values_to_be_unique(column=text_normalized): 2 unexpected"),
    (_rows(12) + [("lonely", "b", "train")], [], "examples_per_class",
     "expect_column_values_to_be_between(column=label_count): 1 unexpected, example rows [12]"),
    (_rows(12) + [("text a 0", "a", "eval")], ["validate.max_duplicate_rate=0.5"], "split_leakage",
     "expect_column_values_to_be_in_set(column=leaks_across_splits): 2 unexpected, example rows [0, 12]"),
    (_rows(12) + _rows(3, "zz"), ['validate.allowed_labels=["a"]'], "label_allowed",
     "expect_column_values_to_be_in_set(column=label): 3 unexpected, example rows [12, 13, 14]"),
])
def test_data_quality_checks_fail_the_gate_naming_rows(tmp_path, rows, sets, check, message):
    with pytest.raises(ValidationFailed) as failed:
        validate.run(_cfg(_snapshot(tmp_path, rows), *sets))
    assert f"{check}: {message}" in str(failed.value)


def test_a_check_downgraded_to_warning_is_reported_not_enforced(tmp_path):
    rows = _rows(12) + [("lonely", "b", "train")]
    result = validate.run(_cfg(_snapshot(tmp_path, rows), 'validate.warn_only=["examples_per_class"]'))
    assert result.passed and len(result.warnings) == 1 and result.warnings[0].startswith("examples_per_class:")
    summary = storage.read_json(result.summary_uri)
    assert [c["severity"] for c in summary["checks"] if not c["success"]] == ["warning"]
    with pytest.raises(ConfigError, match=r"validate.warn_only: unknown check\(s\) \['typo'\]"):
        _cfg("file:///x.parquet", 'validate.warn_only=["typo"]')


def test_a_snapshot_without_text_fails_on_the_columns_check(tmp_path):
    path = tmp_path / "notext.parquet"
    pd.DataFrame({"label": ["x"] * 12, "split": ["train"] * 12}).to_parquet(path)
    with pytest.raises(ValidationFailed, match=r"columns: expect_column_to_exist\(column=text\)"):
        validate.run(_cfg(path.as_uri()))
