import json

import pytest

from pipeline import cli, storage, validate
from pipeline.config import load_config
from pipeline.config.validate import CHAT_CHECKS, CLASSIFICATION_CHECKS
from pipeline.errors import ConfigError, ValidationFailed
from pipeline.validate.accepted import accepted_uri
from pipeline.validate.columns import rows_to_count
from tests.helpers import collect_snapshot, shipped_rows, write_snapshot


def _snapshot(tmp_path, rows, name="snap") -> str:
    return write_snapshot(tmp_path / f"{name}.parquet", rows, ["text", "label", "split"])


def _cfg(snapshot_uri, *extra):
    return load_config(None, [f"validate.snapshot_uri={json.dumps(snapshot_uri)}", "run_id=v", *extra])


def _rows(n, label="a", split="train", prefix="text"):
    return [(f"{prefix} {label} {i}", label, split) for i in range(n)]


def _checks(summary_uri):
    return {c["check"]: c for c in storage.read_json(summary_uri)["checks"]}


def test_good_snapshot_passes_publishes_data_docs_and_is_recorded_as_accepted(small_data):
    snapshot = collect_snapshot([small_data])
    result = validate.run(_cfg(snapshot.snapshot_uri))
    assert result.passed and result.rows == snapshot.rows
    docs = storage.local_path(result.data_docs_uri)
    assert (docs / "index.html").is_file()
    assert any(p.suffix == ".html" for p in (docs / "validations").rglob("*"))
    summary = storage.read_json(result.summary_uri)
    assert summary["passed"] and {c["check"] for c in summary["checks"]} == set(CLASSIFICATION_CHECKS) - {
        "label_allowed",  # nothing to take allowed labels from yet
        "tokenizer_coverage",
    }  # no writing system has validate.min_slice_rows rows here
    assert summary["drift"] == {"status": "skipped", "reason": "no accepted snapshot for model support-intents yet"}
    assert summary["token_count"]["rows_counted"] == snapshot.rows
    record = storage.read_json(result.accepted_uri)
    assert result.accepted_uri.endswith("/accepted/support-intents/latest.json")
    assert record["snapshot_uri"] == snapshot.snapshot_uri and record["sha256"] == snapshot.sha256
    assert record["labels"] == snapshot.labels and record["rows"] == snapshot.rows and record["run_id"] == "v"
    assert record["summary_uri"] == result.summary_uri and record["accepted_at"]


def test_failing_suite_names_checks_counts_and_rows(tmp_path):
    rows = _rows(6) + _rows(6, "b") + [("   ", "a", "train"), ("ok", None, "eval"), ("x", None, "train")]
    cfg = _cfg(_snapshot(tmp_path, rows))
    with pytest.raises(ValidationFailed) as failed:
        validate.run(cfg)
    message = str(failed.value)
    assert message.splitlines()[0] == "3 check(s) failed: text_not_blank, label_present, text_tokens"  # a summary
    assert (
        "text_not_blank: expect_column_values_to_not_match_regex(column=text): 1 unexpected, example rows [12]"
        in message
    )
    assert (
        "label_present: expect_column_values_to_not_be_null(column=label): 2 unexpected, example rows [13, 14]"
        in message
    )
    assert (
        "text_tokens: expect_column_values_to_be_between(column=text_tokens): 1 unexpected, example rows [12]"
        in message
    )  # blank text has no tokens
    assert failed.value.exit_code == 3
    # The report is still published for a person to read; no result.json marks success.
    assert storage.exists(cfg.step_uri("validate") + "/data_docs/index.html")
    assert not storage.read_json(cfg.step_uri("validate") + "/summary.json")["passed"]
    assert not storage.exists(cfg.step_uri("validate") + "/result.json")
    assert not storage.exists(accepted_uri(cfg))


def test_missing_column_and_too_few_rows(tmp_path):
    uri = write_snapshot(tmp_path / "nosplit.parquet", {"text": ["a", "b"], "label": ["x", "y"]})
    with pytest.raises(ValidationFailed) as failed:
        validate.run(_cfg(uri))
    assert "expect_column_to_exist(column=split)" in str(failed.value)
    assert "expect_table_row_count_to_be_between(column=None)" in str(failed.value)


def test_cli_exit_code_is_distinct(tmp_path):
    uri = _snapshot(tmp_path, [("", "a", "train")] * 12)
    assert cli.main(["validate", "--set", f"validate.snapshot_uri={uri}", "--set", "run_id=v2"]) == 3


@pytest.mark.parametrize(
    "rows, sets, check, message",
    [
        (
            _rows(12) + _rows(2, "b") + [("Text A 0", "a", "train")],
            ["validate.max_duplicate_rate=0.0"],
            "duplicate_rate",
            "expect_column_values_to_be_unique(column=text_normalized): 2 unexpected",
        ),
        (
            _rows(12) + [("lonely", "b", "train")],
            [],
            "examples_per_class",
            "expect_column_values_to_be_between(column=label_count): 1 unexpected, example rows [12]",
        ),
        (
            _rows(12) + _rows(2, "b") + [("text a 0", "a", "eval")],
            ["validate.max_duplicate_rate=0.5"],
            "split_leakage",
            "expect_column_values_to_be_in_set(column=leaks_across_splits): 2 unexpected, example rows [0, 14]",
        ),
        (
            _rows(12) + _rows(3, "zz"),
            ['validate.allowed_labels=["a"]'],
            "label_allowed",
            "expect_column_values_to_be_in_set(column=label): 3 unexpected, example rows [12, 13, 14], observed None, "
            "values ['zz', 'zz', 'zz']",
        ),
        (
            _rows(12),
            [],
            "label_cardinality",
            "expect_column_unique_value_count_to_be_between(column=label): None unexpected, example rows [], observed 1",
        ),
        (
            _rows(12) + _rows(2, "b") + [("one two three four five six", "a", "train")],
            ["validate.max_text_tokens=5"],
            "text_tokens",
            "expect_column_values_to_be_between(column=text_tokens): 1 unexpected, example rows [14]",
        ),
        (  # 70 tokens and [CLS], [SEP]: over train.max_seq_len=64, truncated; 1 of 15 rows > 1%
            _rows(12) + _rows(2, "b") + [("word " * 70, "a", "train")],
            [],
            "training_drops",
            "expect_column_values_to_be_null(column=training_drop): 1 unexpected, example rows [14], observed None, "
            "values ['truncated']",
        ),
    ],
)
def test_data_quality_checks_fail_the_gate_naming_rows(tmp_path, rows, sets, check, message):
    with pytest.raises(ValidationFailed) as failed:
        validate.run(_cfg(_snapshot(tmp_path, rows), *sets))
    assert f"{check}: {message}" in str(failed.value)
    # Each failure says what to do about it, naming the setting that governs the check.
    remedy = str(failed.value).split(f"{check}: {message}", 1)[1].split("[to fix: ", 1)[1].split("]", 1)[0]
    assert (
        remedy
        == validate.remedy(
            check, _cfg("file:///x.parquet", *sets), {"label_allowed": {"source": "validate.allowed_labels"}}
        )
        or check == "label_allowed"
    )
    assert any(word in remedy for word in ("validate.", "collect.", "source", "label", "classifier"))


def test_a_check_downgraded_to_warning_is_reported_not_enforced(tmp_path):
    rows = _rows(12) + _rows(2, "c") + [("lonely", "b", "train")]
    result = validate.run(_cfg(_snapshot(tmp_path, rows), 'validate.warn_only=["examples_per_class"]'))
    assert result.passed and len(result.warnings) == 1 and result.warnings[0].startswith("examples_per_class:")
    summary = storage.read_json(result.summary_uri)
    assert [c["severity"] for c in summary["checks"] if not c["success"]] == ["warning"]
    with pytest.raises(ConfigError, match=r"validate.warn_only: unknown check\(s\) \['typo'\]"):
        _cfg("file:///x.parquet", 'validate.warn_only=["typo"]')


def test_a_snapshot_without_text_fails_on_the_columns_check(tmp_path):
    uri = write_snapshot(tmp_path / "notext.parquet", {"label": ["x", "y"] * 6, "split": ["train"] * 12})
    with pytest.raises(ValidationFailed, match=r"columns: expect_column_to_exist\(column=text\)") as failed:
        validate.run(_cfg(uri))
    assert "its columns are ['label', 'split']: collect.text_column and collect.label_column" in str(failed.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("drift_severity", "fatal", "validate.drift_severity: 'fatal' is not one of ['warning', 'error']"),
        ("drift_max_oov_rate", "1.5", "validate.drift_max_oov_rate: 1.5 is above the maximum 1.0"),
        ("token_sample_rows", "-1", "validate.token_sample_rows: -1 is below the minimum 0"),
        ("max_text_tokens", "0", "validate.max_text_tokens: 0 is below the minimum 1"),
    ],
)
def test_new_settings_reject_bad_values_naming_the_key(key, value, message):
    with pytest.raises(ConfigError) as error:
        _cfg("file:///x.parquet", f"validate.{key}={value}")
    assert str(error.value) == message


# --- token counts on a sample ---------------------------------------------------------------


def test_token_counts_sample_rows_but_always_count_rows_that_could_exceed_the_bar(tmp_path):
    rows = _rows(150) + _rows(150, "b") + [("word " * 40, "b", "train")]  # 40 tokens, 200 bytes, last row
    cfg = _cfg(_snapshot(tmp_path, rows), "validate.token_sample_rows=10", "validate.max_text_tokens=30")
    with pytest.raises(ValidationFailed, match=r"text_tokens: .*: 1 unexpected, example rows \[300\]"):
        validate.run(cfg)
    note = storage.read_json(cfg.step_uri("validate") + "/summary.json")["token_count"]
    # 10 sampled rows plus the rows of more than 15 bytes (the long one and 'text a 100'..): fewer than all
    assert 10 < note["rows_counted"] < note["rows"] == 301
    assert "a sample of 10 rows seeded by `seed`, plus every row of more than 15 UTF-8 bytes" in note["policy"]


def test_rows_to_count_is_seeded_and_keeps_long_rows():
    import numpy as np

    lengths = np.array([3] * 1000 + [500])
    first = rows_to_count(lengths, bar=100, sample_rows=20, seed=7)
    assert list(first) == list(rows_to_count(lengths, bar=100, sample_rows=20, seed=7))
    assert 1000 in first and len(first) == 21
    assert list(rows_to_count(lengths, bar=100, sample_rows=0, seed=7)) == list(range(1001))


# --- the last accepted snapshot: allowed labels, drift, MLflow --------------------------------


def _support_rows(labels, per_label, suffix=""):
    return [(r["text"] + suffix, r["label"], "train") for r in shipped_rows(labels=labels, per_label=per_label)]


def test_labels_of_the_last_accepted_snapshot_are_the_allowed_set(tmp_path):
    first = validate.run(_cfg(_snapshot(tmp_path, _support_rows(3, 20), "first"), "run_id=r1"))
    record = storage.read_json(first.accepted_uri)
    assert record["labels"] == ["account_login", "cancel_order", "change_shipping_address"]

    grown = _snapshot(tmp_path, _support_rows(4, 20), "grown")  # a fourth intent: rows 60..79
    with pytest.raises(ValidationFailed) as failed:
        validate.run(_cfg(grown, "run_id=r2"))
    assert (
        "label_allowed: expect_column_values_to_be_in_set(column=label): 20 unexpected, example rows "
        "[60, 61, 62, 63, 64]"
    ) in str(failed.value)
    # Why, and the two ways on: a new model, or a deliberate change of the label set.
    hint = str(failed.value).split("[to fix: ", 1)[1]
    assert f"the last accepted snapshot {record['snapshot_uri']}" in hint
    assert "--set model_name=" in hint and "validate.allowed_labels" in hint and "FINETUNE_CONFIG" in hint
    assert storage.read_json(first.accepted_uri) == record  # a failing gate never moves the record

    # The new class is accepted deliberately; the record then carries it.
    accepted = validate.run(_cfg(grown, "run_id=r3", 'validate.warn_only=["label_allowed"]'))
    assert accepted.warnings[0].startswith("label_allowed:")
    assert len(storage.read_json(accepted.accepted_uri)["labels"]) == 4
    assert storage.read_json(accepted.accepted_uri)["run_id"] == "r3"
    assert validate.run(_cfg(grown, "run_id=r4")).passed


def test_explicit_allowed_labels_win_over_the_record(tmp_path):
    validate.run(_cfg(_snapshot(tmp_path, _support_rows(3, 20), "first"), "run_id=r1"))
    grown = _snapshot(tmp_path, _support_rows(4, 20), "grown")
    labels = json.dumps(sorted({r[1] for r in _support_rows(4, 20)}))
    result = validate.run(_cfg(grown, "run_id=r2", f"validate.allowed_labels={labels}"))
    assert storage.read_json(result.summary_uri)["label_allowed"]["source"] == "validate.allowed_labels"


def test_drift_from_the_accepted_snapshot_is_reported_with_both_distributions(tmp_path):
    validate.run(_cfg(_snapshot(tmp_path, _support_rows(3, 30), "first"), "run_id=r1"))
    # Mostly one class now, three times as long, with words the reference never had.
    rows = _support_rows(3, 30, suffix=" zebra quantum " * 6)
    shifted = [r for r in rows if r[1] == "account_login"] + [r for r in rows if r[1] != "account_login"][::10]
    uri = _snapshot(tmp_path, shifted, "shifted")
    strict = cli.main(
        [
            "validate",
            "--set",
            f"validate.snapshot_uri={uri}",
            "--set",
            "run_id=r2",
            "--set",
            "validate.drift_severity=error",
        ]
    )
    assert strict == 3
    error = storage.read_json(load_config(None, ["run_id=r2"]).step_uri("validate") + "/error.json")["error"]
    assert "drift_label_psi: population_stability_index(column=label): observed " in error and "> max 0.2" in error

    result = validate.run(_cfg(uri, "run_id=r3"))
    assert result.passed  # drift is a warning by default
    checks = _checks(result.summary_uri)
    for name in ("drift_label_psi", "drift_length_ks", "drift_oov_rate"):
        assert checks[name]["severity"] == "warning" and not checks[name]["success"], name
    assert checks["drift_oov_rate"]["unexpected_count"] == len(shifted)
    assert {w.split(":")[0] for w in result.warnings} == {"drift_label_psi", "drift_length_ks", "drift_oov_rate"}

    report = storage.read_json(result.drift_report_uri.replace("drift.html", "drift.json"))
    assert report["label_shares"]["account_login"] == {
        "reference": pytest.approx(1 / 3),
        "current": pytest.approx(30 / 36),
    }
    assert dict(report["top_oov_words"])["zebra"] == 6 * len(shifted)
    page = storage.read_bytes(result.drift_report_uri).decode()
    assert "account_login" in page and "zebra" in page and "<script" not in page and "<link" not in page
    assert page.count("class='ref'") == page.count("class='cur'") > 3  # both sides of each distribution


def test_the_same_data_again_shows_no_drift(tmp_path):
    uri = _snapshot(tmp_path, _support_rows(3, 20))
    validate.run(_cfg(uri, "run_id=r1"))
    result = validate.run(_cfg(uri, "run_id=r2"))
    checks = _checks(result.summary_uri)
    assert [checks[n]["observed_value"] for n in ("drift_label_psi", "drift_length_ks", "drift_oov_rate")] == [0, 0, 0]
    assert not result.warnings


def test_summary_data_docs_and_drift_are_logged_to_mlflow_even_when_the_gate_fails(tmp_path):
    from pipeline.tracking import client, pipeline_run_id

    validate.run(_cfg(_snapshot(tmp_path, _support_rows(3, 20), "first"), "run_id=ok"))
    bad = _support_rows(3, 20) + [(None, "cancel_order", "train")]
    cfg = _cfg(_snapshot(tmp_path, bad, "bad"), "run_id=bad")
    with pytest.raises(ValidationFailed):
        validate.run(cfg)
    tracker = client()
    run = tracker.get_run(pipeline_run_id(cfg))
    assert run.data.tags["validate.passed"] == "false"
    assert run.data.metrics["validate_failed_checks"] == 1 and run.data.metrics["validate_rows"] == 61
    assert "drift_oov_rate" in run.data.metrics
    logged = {f.path for f in tracker.list_artifacts(run.info.run_id, "validate")}
    assert logged == {"validate/summary.json", "validate/data_docs", "validate/drift"}
    assert {f.path for f in tracker.list_artifacts(run.info.run_id, "validate/drift")} == {
        "validate/drift/drift.json",
        "validate/drift/drift.html",
    }
    assert "validate/data_docs/index.html" in {
        f.path for f in tracker.list_artifacts(run.info.run_id, "validate/data_docs")
    }
    assert tracker.get_run(pipeline_run_id(_cfg("x", "run_id=ok"))).data.tags["validate.passed"] == "true"


# --- bad inputs through the CLI: exit 3, the check named, nothing recorded ------------------


@pytest.fixture(scope="module")
def accepted_root(tmp_path_factory):
    """An artifact root whose support-intents model has an accepted snapshot (3 intents x 30)."""
    root = tmp_path_factory.mktemp("accepted")
    uri = _snapshot(root, _support_rows(3, 30), "accepted")
    # A module fixture is set up before the test's own FINETUNE_HOME: give this run a home (an
    # MLflow store) of its own, not the developer's ./.finetune nor one a finished test left.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FINETUNE_HOME", str(root / "home"))
        validate.run(
            load_config(None, [f"validate.snapshot_uri={uri}", "run_id=first", f"artifact_root={root.as_uri()}"])
        )
    return root


def _with(change):
    rows = [list(r) for r in _support_rows(3, 30)]
    change(rows)
    return rows


def _null_labels(rows):
    for i in (3, 40, 77):
        rows[i][1] = None


def _unknown_labels(rows):
    for i in (5, 6):
        rows[i][1] = "brand_new_intent"


def _all_duplicates(rows):
    for row in rows:
        row[0] = "Where is my order?"


def _single_class(rows):
    for row in rows:
        row[1] = "cancel_order"


def _huge_row(rows):
    rows[42][0] = "lorem ipsum " * (2 * 1024 * 1024 // 12)  # 2 MB of text


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            _null_labels,
            "label_present: expect_column_values_to_not_be_null(column=label): 3 unexpected, example rows [3, 40, 77]",
        ),
        (
            _unknown_labels,
            "label_allowed: expect_column_values_to_be_in_set(column=label): 2 unexpected, example rows "
            "[5, 6], observed None, values ['brand_new_intent', 'brand_new_intent']",
        ),
        (
            _all_duplicates,
            "duplicate_rate: expect_column_values_to_be_unique(column=text_normalized): 90 unexpected, "
            "example rows [0, 1, 2, 3, 4]",
        ),
        (
            _single_class,
            "label_cardinality: expect_column_unique_value_count_to_be_between(column=label): None "
            "unexpected, example rows [], observed 1",
        ),
        (
            _huge_row,
            (
                "text_length: expect_column_value_lengths_to_be_between(column=text): 1 unexpected, "
                "example rows [42], observed None, values ['lorem ipsum",
                "text_tokens: expect_column_values_to_be_between(column=text_tokens): 1 unexpected, "
                "example rows [42], observed None, values [699048.0]",
            ),
        ),
    ],
    ids=["null_labels", "unknown_labels", "all_duplicates", "single_class", "2mb_row"],
)
def test_bad_input_exits_3_names_the_check_and_records_nothing(tmp_path, accepted_root, change, expected):
    record_uri = storage.join(accepted_root.as_uri(), "accepted", "support-intents", "latest.json")
    before = storage.read_bytes(record_uri)
    snapshot = _snapshot(tmp_path, _with(change), "bad")
    run_id = f"bad-{change.__name__.strip('_')}"
    code = cli.main(
        [
            "validate",
            "--set",
            f"validate.snapshot_uri={snapshot}",
            "--set",
            f"run_id={run_id}",
            "--set",
            f"artifact_root={accepted_root.as_uri()}",
        ]
    )
    assert code == 3
    step = storage.join(accepted_root.as_uri(), "runs", run_id, "validate")
    error = storage.read_json(step + "/error.json")
    assert error["exit_code"] == 3
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in error["error"]
    assert not storage.exists(step + "/result.json")  # what the next task waits for
    assert storage.read_bytes(record_uri) == before
    assert len(error["error"]) < 20_000  # a 2 MB row is quoted, not copied, into the message


# --- the chat suite (causal-lm) --------------------------------------------------------------


def _conversation(text, label, system=False):
    turns = [{"role": "system", "content": "You route support messages."}] if system else []
    return turns + [{"role": "user", "content": text}, {"role": "assistant", "content": f"Intent: {label}."}]


def _chat_snapshot(tmp_path, conversations, name="chat"):
    messages = [json.dumps(m, ensure_ascii=False) if not isinstance(m, str) else m for m in conversations]
    return write_snapshot(tmp_path / f"{name}.parquet", {"messages": messages, "split": ["train"] * len(messages)})


def _good_chats():
    return [_conversation(r[0], r[1], system=i % 2 == 0) for i, r in enumerate(_support_rows(3, 8))]


def _chat_cfg(uri, tiny_model_dir, *extra):
    return _cfg(
        uri,
        "task=causal-lm",
        f"base_model={tiny_model_dir}",
        "model_name=chat-model",
        "train.chat_template=chatml",
        "train.max_seq_len=256",
        *extra,
    )


def test_good_chat_snapshot_passes_with_the_chat_suite(tmp_path, tiny_model_dir):
    result = validate.run(_chat_cfg(_chat_snapshot(tmp_path, _good_chats()), tiny_model_dir))
    summary = storage.read_json(result.summary_uri)
    assert result.passed and {c["check"] for c in summary["checks"]} == set(CHAT_CHECKS)
    assert summary["token_count"]["counted"] == "tokens of the conversation rendered with the chat template"
    assert storage.read_json(result.accepted_uri)["labels"] == []

    # Against itself: no label drift for chat, length and OOV over the message contents.
    again = validate.run(_chat_cfg(_chat_snapshot(tmp_path, _good_chats()), tiny_model_dir, "run_id=again"))
    drift = {
        c["check"]: c["observed_value"]
        for c in storage.read_json(again.summary_uri)["checks"]
        if c["check"].startswith("drift_")
    }
    assert drift == {"drift_length_ks": 0, "drift_oov_rate": 0}


@pytest.mark.parametrize(
    "broken, expected",
    [
        (
            [
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"},
            ],
            "role_order: expect_column_values_to_be_null(column=role_problem): 1 unexpected, example rows [24], observed "
            "None, values ['message 1 is assistant, expected user (role order)']",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
            "assistant_not_empty: expect_column_values_to_be_between(column=empty_assistant_turns): 1 unexpected, "
            "example rows [24]",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
            "assistant_present: expect_column_values_to_be_between(column=assistant_turns): 1 unexpected, "
            "example rows [24]",
        ),
        (
            '[{"role": "user", "content": "hi"}',
            "messages_valid: expect_column_values_to_be_null(column=messages_error): 1 unexpected, example rows [24], "
            "observed None, values [\"'messages' is not valid JSON",
        ),
        (
            [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}],
            "training_drops: expect_column_values_to_be_null(column=training_drop): 1 unexpected, example rows [24]",
        ),
    ],
    ids=["role_order", "empty_assistant", "no_assistant", "not_json", "too_long"],
)
def test_bad_chat_input_exits_3_names_the_check_and_records_nothing(tmp_path, tiny_model_dir, broken, expected):
    cfg = _chat_cfg(_chat_snapshot(tmp_path, _good_chats(), "good"), tiny_model_dir, "run_id=good")
    record = storage.read_bytes(validate.run(cfg).accepted_uri)
    bad = _chat_snapshot(tmp_path, [*_good_chats(), broken], "bad")
    code = cli.main(
        [
            "validate",
            "--set",
            f"validate.snapshot_uri={bad}",
            "--set",
            "run_id=bad",
            "--set",
            "task=causal-lm",
            "--set",
            f"base_model={tiny_model_dir}",
            "--set",
            "model_name=chat-model",
            "--set",
            "train.chat_template=chatml",
            "--set",
            "train.max_seq_len=256",
            "--set",
            "validate.max_dropped_rate=0",
        ]
    )
    assert code == 3
    step = load_config(None, ["run_id=bad"]).step_uri("validate")
    assert expected in storage.read_json(step + "/error.json")["error"]
    assert not storage.exists(step + "/result.json")
    assert storage.read_bytes(accepted_uri(cfg)) == record


def test_a_few_overlong_conversations_are_counted_per_split_and_more_than_the_rate_refused(tmp_path, tiny_model_dir):
    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    uri = _chat_snapshot(tmp_path, [*_good_chats(), long])  # 1 of 25 over max_seq_len: 4%
    result = validate.run(_chat_cfg(uri, tiny_model_dir, "validate.max_dropped_rate=0.05"))
    summary = storage.read_json(result.summary_uri)
    check = next(c for c in summary["checks"] if c["check"] == "training_drops")
    assert result.passed and check["unexpected_count"] == 1 and check["success"]
    # Cut at train.max_seq_len=256 inside the prompt, so nothing is left to learn: dropped, not truncated.
    assert summary["training_drops"]["train"] == {"rows": 25, "truncated": 0, "dropped": 1, "example_rows": [24]}
    assert summary["training_drops"]["eval"]["rows"] == 0
    with pytest.raises(ValidationFailed, match="training_drops") as refused:  # the default bar, 1%
        validate.run(_chat_cfg(uri, tiny_model_dir, "run_id=strict"))
    assert "example rows [24]" in str(refused.value) and "raise train.max_seq_len" in str(refused.value)


def test_chat_without_a_template_is_a_config_error(tmp_path, tiny_model_dir):
    cfg = _cfg(_chat_snapshot(tmp_path, _good_chats()), "task=causal-lm", f"base_model={tiny_model_dir}")
    with pytest.raises(ConfigError, match="train.chat_template: the tokenizer has no chat template"):
        validate.run(cfg)


def test_the_accepted_snapshot_pointer_only_moves_forward_in_run_order(tmp_path):
    older = _snapshot(tmp_path, _support_rows(3, 20), "older")
    newer = _snapshot(tmp_path, _support_rows(3, 20, suffix=" again"), "newer")
    validate.run(_cfg(newer, "run_id=tuesday", "run_date=2026-11-03T00:00:00+00:00"))
    record_uri = accepted_uri(_cfg(newer))
    # Monday's run cleared and re-run after Tuesday's: it passes, but must not rewind the pointer.
    assert validate.run(_cfg(older, "run_id=monday", "run_date=2026-11-02T00:00:00+00:00")).passed
    assert storage.read_json(record_uri)["snapshot_uri"] == newer
    validate.run(_cfg(older, "run_id=wednesday", "run_date=2026-11-04T00:00:00+00:00"))
    assert storage.read_json(record_uri)["run_id"] == "wednesday"
    with pytest.raises(ConfigError, match="run_date: 'yesterday' is not an ISO 8601"):
        _cfg(older, "run_date=yesterday")


def test_tokenizer_coverage_per_writing_system_names_the_script_the_model_cannot_read(tmp_path):
    # The shipped intents with the default base model, MiniLM: an English WordPiece vocabulary.
    rows = [
        (text, label, "eval" if i % 5 == 0 else "train") for i, (text, label, _) in enumerate(_support_rows(10, 80))
    ]
    uri = _snapshot(tmp_path, rows, "coverage")
    with pytest.raises(ValidationFailed) as failed:  # the old default: no vocabulary extension
        validate.run(_cfg(uri, "run_id=plain", "train.extend_vocab=false"))
    summary = storage.read_json(load_config(None, ["run_id=plain"]).step_uri("validate") + "/summary.json")
    coverage = summary["tokenizer_coverage"]
    assert coverage["latin"]["rate"] < 0.01 and coverage["zh"]["rate"] > 0.5  # most Chinese tokens are [UNK]
    assert coverage["zh"]["missing_characters"] > 100 and coverage["zh"]["rows"] + coverage["latin"]["rows"] == 800
    message = str(failed.value)
    assert f"tokenizer_coverage: unknown_token_rate(column=text (zh)): observed {coverage['zh']['rate']}" in message
    assert "set train.extend_vocab=true" in message and "choose a base_model whose tokenizer covers" in message
    assert "text (latin)" not in message  # English reads fine
    docs = storage.local_path(summary["data_docs_uri"])
    [page] = (docs / "validations" / "tokenizer_coverage").rglob("*.html")  # an expectation in Data Docs
    assert "unknown_token_rate" in page.read_text() and "0.71" in page.read_text()  # zh's rate, failing

    # Reported, not gating, when the team says so.
    assert validate.run(
        _cfg(uri, "run_id=warned", "train.extend_vocab=false", "validate.warn_only=[tokenizer_coverage]")
    ).warnings

    # The default: the training split's missing characters become tokens (train.extend_vocab), and
    # validate counts tokens as training will. What is left unknown is the eval split's rarities.
    result = validate.run(_cfg(uri, "run_id=extended"))
    summary = storage.read_json(result.summary_uri)
    assert result.passed and not [w for w in result.warnings if w.startswith("tokenizer_coverage")]
    assert summary["extended_vocab"]["added_tokens"] > 100
    assert summary["tokenizer_coverage"]["zh"]["rate"] <= 0.05


def test_a_failed_gate_is_printed_once_in_full_after_a_summary_line(tmp_path, capfd):
    """The real step in a subprocess (the local launcher, as an Airflow task runs it): its own log
    has the failure in full, a summary line first; the task's exception (whose first line is
    Airflow's retry reason) and `finetune run`'s last line repeat the summary only."""
    from pipeline import dagrun, local, steps
    from tests.helpers import run_step_here, write_jsonl

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(24)])
    bad.write_text(bad.read_text() + json.dumps({"text": "no label here", "label": None}) + "\n")
    snapshot_uri = run_step_here("collect", [f"collect.sources={json.dumps([str(bad)])}", "run_id=once"])[
        "snapshot_uri"
    ]
    with pytest.raises(steps.StepFailed) as failed:
        local.launch_local("validate", [f"validate.snapshot_uri={snapshot_uri}", "run_id=once"])
    log = capfd.readouterr().out
    assert [line for line in log.splitlines() if line.startswith("error: ")] == [
        "error: validate: 2 check(s) failed: label_present, examples_per_class"  # a null is a class of 1
    ]
    detail = "label_present: expect_column_values_to_not_be_null(column=label): 1 unexpected"
    last_line = dagrun.failure(storage.join(load_config(None, []).artifact_root, "runs", "once"))
    assert (log + str(failed.value) + last_line).count(detail) == 1 and detail in log
    assert str(failed.value) == (
        "step 'validate' failed: 2 check(s) failed: label_present, examples_per_class (in full in the step's log "
        "above and its error.json)"
    )
    assert detail in failed.value.details and failed.value.returncode == 3
    assert last_line.startswith("step 'validate' failed: 2 check(s) failed: label_present, examples_per_class (in")


def test_a_template_whose_turns_end_with_no_stop_token_is_refused_and_train_eos_token_fixes_it(tmp_path, tiny_lm_dir):
    """The tiny Llama with its EOS set to <|endoftext|> (in the tokenizer and the generation
    config) while ChatML ends each turn with <|im_end|>: a model trained on it never stops."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    model = tmp_path / "eos-mismatch"
    shutil.copytree(tiny_lm_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(model)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(model)
    uri = _chat_snapshot(tmp_path, _good_chats())
    chat_cfg = [f"validate.snapshot_uri={json.dumps(uri)}", "task=causal-lm", f"base_model={model}", "model_name=c"]
    with pytest.raises(ConfigError) as refused:
        validate.run(load_config(None, [*chat_cfg, "run_id=mismatch"]))
    message = str(refused.value)
    assert "ends an assistant turn with '<|im_end|>\\n'" in message and "['<|endoftext|>']" in message
    assert (
        refused.value.exit_code == 2 and "set train.eos_token to the end-of-turn token (e.g. '<|im_end|>')" in message
    )
    assert validate.run(load_config(None, [*chat_cfg, "run_id=fixed", "train.eos_token=<|im_end|>"])).passed
    with pytest.raises(ConfigError, match="train.eos_token 'no-such-token' is not a single token"):
        validate.run(load_config(None, [*chat_cfg, "run_id=bogus", "train.eos_token=no-such-token"]))
