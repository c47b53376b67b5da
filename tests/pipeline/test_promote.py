"""Promotion and roll-back on a real MLflow registry; concurrency against a real `mlflow server`
backed by PostgreSQL (tests/conftest.py starts it on loopback)."""

import json
import os
import subprocess
import sys

import pytest

from pipeline import aliases as aliases_step
from pipeline import promote, registry
from pipeline.config import load_config
from pipeline.errors import ConfigError, ModelError
from pipeline.tracking import client
from tests.helpers import MODEL_NAME, aliases, lock_is_free, promotion_audit, register_version


def _promote(*sets):
    return promote.run(load_config(None, ["run_id=p", *sets]))


def test_promote_refuse_and_roll_back_with_an_audit_per_attempt():
    tracker = client()
    v1, v2, v3 = register_version(tracker, 0.80), register_version(tracker, 0.90), register_version(tracker, 0.85)
    assert _promote(f"promote.version={v1}", "promote.requested_by=ana").outcome == "promoted"
    assert _promote(f"promote.version={v2}").outcome == "promoted"
    assert aliases(tracker) == {"champion": v2, "previous_champion": v1}
    with pytest.raises(promote.PromotionRefused, match="0.8500 of version 3 is not better than champion version 2"):
        _promote(f"promote.version={v3}")
    assert _promote(f"promote.version={v2}").outcome == "unchanged"
    rollback = _promote(
        "promote.version=previous_champion",
        "promote.force=true",
        "promote.reason=v2 misroutes refunds",
        "promote.requested_by=ana",
    )
    assert rollback.outcome == "promoted" and rollback.previous_version == v2
    assert aliases(tracker) == {"champion": v1, "previous_champion": v2}
    records = promotion_audit(tracker)
    assert len(records) == 5
    assert sorted(r.data.tags["promotion.outcome"] for r in records) == [
        "promoted",
        "promoted",
        "promoted",
        "refused",
        "unchanged",
    ]
    forced = [r for r in records if r.data.tags["promotion.forced"] == "True"][0]
    assert forced.data.tags["promotion.reason"] == "v2 misroutes refunds"
    assert forced.data.tags["promotion.requested_by"] == "ana" and forced.data.tags["promotion.at"]
    assert json.loads(tracker.get_model_version(MODEL_NAME, v1).tags["finetune.promoted_to.champion"])["forced"]
    assert lock_is_free(tracker)

    # Every move above went through the pipeline: the aliases match its audit.
    assert registry.outside_moves(tracker, MODEL_NAME) == []
    checked = tracker.get_registered_model(MODEL_NAME).tags[registry.CHECKED_TAG]
    # MLflow's UI or API moves champion and deletes previous_champion, without the pipeline: both noticed.
    tracker.set_registered_model_alias(MODEL_NAME, "champion", v3)
    tracker.delete_registered_model_alias(MODEL_NAME, "previous_champion")
    moves = {move.alias: move for move in registry.outside_moves(tracker, MODEL_NAME)}
    assert set(moves) == {"champion", "previous_champion"}
    assert (moves["champion"].version, moves["champion"].expected) == (v3, [v1])
    assert str(moves["champion"]).startswith(
        f"champion is version {v3}, but the pipeline's audit leaves it version {v1}"
    )
    assert f"promoted by ana at {forced.data.tags['promotion.at']}" in str(moves["champion"])
    assert moves["champion"].since == checked and moves["champion"].noticed > checked  # the window it moved in
    assert str(moves["previous_champion"]).startswith(
        f"previous_champion is deleted, but the pipeline's audit leaves it version {v2}"
    )
    with pytest.raises(aliases_step.AliasesMovedOutside, match="2 alias") as found:
        aliases_step.run(load_config(None, ["run_id=check"]))
    assert found.value.exit_code == 3


def test_a_version_that_failed_its_gate_needs_force():
    tracker = client()
    failed = register_version(tracker, 0.99, passed=False)
    with pytest.raises(promote.PromotionRefused, match="did not pass its promotion gate.*force=true and a reason"):
        _promote(f"promote.version={failed}")
    assert "champion" not in aliases(tracker)


@pytest.mark.parametrize(
    "sets, error, message",
    [
        (["promote.version=42"], ModelError, "version '42' does not exist"),
        (["promote.version=challenger"], ModelError, "alias 'challenger' does not exist"),
        (["promote.version=1", "promote.target_alias=champ ion"], ConfigError, "promote.target_alias: 'champ ion'"),
        (["promote.version=1", "promote.target_alias=latest"], ConfigError, "reserved by MLflow"),
        (["promote.version=1", "promote.force=true"], ConfigError, "promote.force requires promote.reason"),
        ([], ConfigError, "promote.version is required"),
    ],
)
def test_bad_requests_change_nothing(sets, error, message):
    tracker = client()
    _promote(f"promote.version={register_version(tracker, 0.8)}")
    before = aliases(tracker)
    with pytest.raises(error, match=message):
        _promote(*sets)
    assert aliases(tracker) == before


@pytest.mark.slow
def test_ten_concurrent_promotions_leave_exactly_the_best_champion(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracker = client()
    accuracies = [0.71, 0.93, 0.65, 0.88, 0.97, 0.74, 0.90, 0.69, 0.95, 0.80]
    versions = [register_version(tracker, a) for a in accuracies]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    attempts = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "promote",
                "--set",
                f"promote.version={v}",
                "--set",
                f"promote.requested_by=attempt-{v}",
                "--set",
                f"run_id=c{v}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    outcomes = [(a.wait(timeout=300), a.stderr.read()) for a in attempts]
    crashed = [err[-6000:] for code, err in outcomes if code not in (0, 2)]  # 2: a refusal, which is fine
    assert not crashed, crashed
    best = versions[accuracies.index(max(accuracies))]
    assert aliases(tracker)["champion"] == best
    records = promotion_audit(tracker)
    assert sorted(r.data.tags["promotion.requested_by"] for r in records) == sorted(f"attempt-{v}" for v in versions)
    assert lock_is_free(tracker)


def test_a_lower_is_better_gate_metric_promotes_the_lower_perplexity():
    """A causal-lm version records perplexity with greater_is_better false: lower wins."""
    tracker = client()
    name = "support-chat"
    tracker.create_registered_model(name)
    gate = json.dumps({"gate_metric": "perplexity", "greater_is_better": False})
    v1, v2, v3 = (
        str(
            tracker.create_model_version(
                name,
                "s3://registry-test/chat",
                tags={"finetune.gate_passed": "true", "metric.perplexity": f"{ppl:.6f}", "finetune.gate": gate},
            ).version
        )
        for ppl in (120.0, 95.0, 130.0)
    )
    sets = [f"model_name={name}"]
    assert _promote(*sets, f"promote.version={v1}").outcome == "promoted"
    assert _promote(*sets, f"promote.version={v2}").outcome == "promoted"  # 95 < 120
    with pytest.raises(promote.PromotionRefused, match="perplexity 130.0000 of version 3 is not better"):
        _promote(*sets, f"promote.version={v3}")
    assert str(tracker.get_model_version_by_alias(name, "champion").version) == v2


def test_an_approval_promotes_on_evaluates_head_to_head_and_a_refusal_is_audited_and_moves_nothing():
    """promote.approval, as the finetune DAG's promote task sets it from a person's answer."""
    tracker = client()
    v1, v2 = register_version(tracker, 0.80), register_version(tracker, 0.70)
    # v2 was scored against v1, head to head on the same rows, and passed there.
    tracker.set_model_version_tag(
        MODEL_NAME, v2, "finetune.gate", json.dumps({"gate_metric": "accuracy", "champion_version": v1})
    )
    approved = _promote(
        f"promote.version={v1}", "promote.approval=approved", "promote.requested_by=ana", "promote.reason=looks right"
    )
    assert approved.outcome == "promoted" and approved.requested_by == "ana"
    assert aliases(tracker) == {"champion": v1}
    [record] = promotion_audit(tracker)
    assert record.data.tags["promotion.requested_by"] == "ana" and record.data.tags["promotion.reason"] == "looks right"

    refused = _promote(
        f"promote.version={v2}", "promote.approval=rejected", "promote.requested_by=bo", "promote.reason=zh regressed"
    )
    assert (refused.outcome, refused.reason, refused.alias_moves) == ("refused", "refused by bo: zh regressed", [])
    assert aliases(tracker) == {"champion": v1}  # untouched, and no exception: a person's answer is no failure
    again = _promote(
        f"promote.version={v2}", "promote.approval=rejected", "promote.requested_by=bo", "promote.reason=zh regressed"
    )
    assert again.audit_run_id == refused.audit_run_id  # a retried task finds its record, writes no second
    [refusal] = [r for r in promotion_audit(tracker) if r.data.tags["promotion.version"] == v2]
    assert refusal.info.run_id == refused.audit_run_id
    assert refusal.data.tags["promotion.outcome"] == "refused" and refusal.data.tags["promotion.previous_version"] == v1
    assert refusal.data.tags["promotion.why"] == "refused by bo: zh regressed"
    assert registry.outside_moves(tracker, MODEL_NAME) == []  # a refusal leaves the aliases where the audit says
    assert lock_is_free(tracker)

    # v3 was evaluated when there was no champion; approved after v1 became one: refused, as register's would be.
    v3 = register_version(tracker, 0.99)
    with pytest.raises(promote.PromotionRefused, match=f"champion is version {v1} now, not version \\(none\\)"):
        _promote(f"promote.version={v3}", "promote.approval=approved", "promote.requested_by=ana")
    assert aliases(tracker) == {"champion": v1}
