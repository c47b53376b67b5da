"""The approval gate's DAG side (dags/finetune_approval.py): the body a reviewer reads, built from
the run's result JSONs; the promote step's settings from the answer. In-process and cheap; the
approval through Airflow's task runner is tests/dags/test_approval_dag.py, and through the UI with
a person's clicks tests/test_ui.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pipeline import steps
from pipeline.config import load_config

REGISTERED = {
    "model_name": "support-intents",
    "version": "3",
    "reason": "accuracy 0.9100 beats champion 0.8800",
    "mlflow_run_id": "abc123",
    "model_uri": "models:/support-intents/3",
    "awaiting_approval": True,
    "drift": [
        {"check": "drift_label_psi", "of": "label", "value": 0.01, "max": 0.2, "passed": True},
        {"check": "drift_oov_rate", "of": "text", "value": 0.31, "max": 0.05, "passed": False},
    ],
}
EVALUATED = {
    "metrics": {"accuracy": 0.91, "macro_f1": 0.9},
    "champion_metrics": {"accuracy": 0.88, "macro_f1": 0.89},
    "champion_version": "1",
    "gate_metric": "accuracy",
    "greater_is_better": True,
    "slices": {
        "latin": {"rows": 60, "accuracy": 0.95},
        "zh": {"rows": 60, "accuracy": 0.80},
        "challenge:zh": {"rows": 20, "accuracy": 0.7},
    },
    "champion_slices": {"latin": {"rows": 60, "accuracy": 0.90}, "zh": {"rows": 60, "accuracy": 0.85}},
    "baseline": {"accuracy": 0.34},
    "baseline_name": "the majority class",
    "reason": "accuracy 0.9100 beats champion 0.8800",
}
VALIDATED = {
    "passed": True,
    "rows": 120,
    "warnings": ["drift_oov_rate: 31% of rows have words the accepted snapshot never had"],
    "data_docs_uri": "s3://artifacts/runs/r/validate/data_docs",
    "drift_report_uri": "s3://artifacts/runs/r/validate/drift.html",
    "summary_uri": "s3://artifacts/runs/r/validate/summary.json",
}


@pytest.fixture(scope="module")
def approval(dagbag):
    import finetune_approval  # on sys.path once a DAG file is parsed

    return finetune_approval


def test_the_body_is_the_evidence_a_reviewer_needs(approval):
    body = approval.approval_body(REGISTERED, EVALUATED, VALIDATED, "http://127.0.0.1:5000", timedelta(hours=72))
    assert body.startswith("**support-intents version 3** passed its promotion gate: accuracy 0.9100 beats")
    # Metrics beside the champion's, with the change.
    assert "| metric | version 3 | version 1 | change |" in body
    assert "| accuracy | 0.9100 | 0.8800 | +0.0300 |" in body and "| macro_f1 | 0.9000 | 0.8900 | +0.0100 |" in body
    # Per slice, the regressed one called out; the challenge slice after the eval split's, with no champion figure.
    assert "| zh | 60 | 0.8000 | 0.8500 | -0.0500 **regressed** |" in body
    assert "| latin | 60 | 0.9500 | 0.9000 | +0.0500 |" in body
    assert body.index("| zh |") < body.index("| challenge:zh | 20 | 0.7000 | - | - |")
    assert "**Regressed against the champion:** zh (-0.0500)" in body
    # Data: validation, its warnings, drift with the bar and whether it held.
    assert "- Validation: passed, 120 rows" in body and "drift_oov_rate: 31% of rows" in body
    assert "| drift_oov_rate | text | 0.3100 | 0.0500 | **no** |" in body
    assert "| drift_label_psi | label | 0.0100 | 0.2000 | yes |" in body
    # Links: the model card (the version's page), the run, Data Docs and the drift report.
    assert "(http://127.0.0.1:5000/#/models/support-intents/versions/3)" in body
    assert "[abc123](http://127.0.0.1:5000/#/runs/abc123)" in body
    assert "- Data Docs: `s3://artifacts/runs/r/validate/data_docs/index.html`" in body
    assert "- Drift report: `s3://artifacts/runs/r/validate/drift.html`" in body
    assert "version 1 keeps previous_champion" in body and "no answer within 72 h is Reject" in body


def test_a_first_champion_is_shown_against_its_baseline_and_without_a_ui_the_links_are_names(approval):
    first = {**EVALUATED, "champion_version": "", "champion_metrics": {}, "champion_slices": {}}
    body = approval.approval_body(
        {**REGISTERED, "drift": []}, first, {"passed": True, "rows": 120}, "", timedelta(minutes=1)
    )
    assert "no champion yet, so against the majority class" in body
    assert "| accuracy | 0.9100 | 0.3400 | +0.5700 |" in body
    assert "Regressed" not in body and "No slice regressed" not in body  # nothing to regress against
    assert "- Drift: no earlier accepted snapshot of this model to compare with" in body
    assert "- Model card: support-intents version 3 (`models:/support-intents/3`)" in body
    assert "- MLflow run: `abc123`" in body and "becomes the first champion" in body
    assert "no answer within 1 min is Reject" in body


def test_the_mlflow_ui_is_the_setting_else_a_servers_tracking_uri_without_its_password(approval):
    assert approval.mlflow_ui_url({"FINETUNE_MLFLOW_UI_URL": "http://127.0.0.1:5000/"}) == "http://127.0.0.1:5000"
    tracking = {"MLFLOW_TRACKING_URI": "https://ana:s3cret@mlflow.example.com/prefix"}
    assert approval.mlflow_ui_url(tracking) == "https://mlflow.example.com/prefix"
    assert approval.mlflow_ui_url({"MLFLOW_TRACKING_URI": "sqlite:///home/mlflow.db"}) == ""


@pytest.mark.parametrize(
    "answer, approval_, requested_by, reason",
    [
        ({"decision": "approved", "answered_by": "ana", "comment": " zh is fine "}, "approved", "ana", "zh is fine"),
        ({"decision": "approved", "answered_by": "ana", "comment": ""}, "approved", "ana", "approved by ana"),
        ({"decision": "rejected", "answered_by": "bo", "comment": "zh regressed"}, "rejected", "bo", "zh regressed"),
        (
            {"decision": "rejected", "answered_by": "", "comment": "", "timed_out": True},
            "rejected",
            "airflow:approval_timeout",
            "no answer within 60 s (promote.approval_timeout): Reject",
        ),
    ],
)
def test_the_answer_becomes_the_promote_steps_settings(approval, answer, approval_, requested_by, reason):
    overrides = approval.approval_overrides(answer, REGISTERED, 60)
    # The pipeline's own settings, after what the trigger sent: even promote.force from a trigger is undone.
    sets = steps.step_overrides(
        "promote", {"overrides": ["promote.force=true", "promote.reason=x"]}, {}, "r1", "trigger-user", extra=overrides
    )
    promote = load_config(None, sets).promote
    assert (promote.version, promote.target_alias, promote.approval) == ("3", "champion", approval_)
    assert (promote.requested_by, promote.reason, promote.force) == (requested_by, reason, False)
