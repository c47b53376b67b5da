"""The promote DAG: integrity, and real runs through Airflow (`dag.test()`, what `airflow dags test`
runs, in this process against the metadata DB) against MLflow."""

import json

import pytest

from tests.helpers import MODEL_NAME, aliases, promotion_audit, register_version


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["promote"]


def test_manual_only_one_task_params_validated(dag):
    from airflow.sdk.definitions.param import ParamValidationError

    assert dag.schedule is None and dag.max_active_runs == 1 and dag.task_ids == ["promote"]
    assert set(dag.params) == {"model_name", "version", "target_alias", "reason", "force"}
    # Retried only for what may clear by itself (exit 75); a refusal fails at once (AirflowFailException).
    assert dag.get_task("promote").retries == 2 and dag.get_task("promote").retry_exponential_backoff
    with pytest.raises(ParamValidationError):
        dag.params.get_param("target_alias").resolve("champ ion")
    with pytest.raises(ParamValidationError):
        dag.params.get_param("force").resolve("yes")


@pytest.mark.slow
def test_roll_back_through_airflow_records_who_and_why(dag, airflow_db):
    from pipeline.tracking import client

    def promote(version, force=False, reason=""):
        """A run of the promote DAG as `airflow dags test` makes it (``dag.test()``: Airflow's task
        runner, the metadata DB, the step as a subprocess), in this process. Every Param is spelled
        out: the task runner merges a run's conf into the task's Params in place."""
        return dag.test(
            run_conf={
                "model_name": MODEL_NAME,
                "version": version,
                "target_alias": "champion",
                "force": force,
                "reason": reason,
            }
        )

    tracker = client()
    v1, v2 = register_version(tracker, 0.8), register_version(tracker, 0.9)
    tracker.set_registered_model_alias(MODEL_NAME, "previous_champion", v1)
    tracker.set_registered_model_alias(MODEL_NAME, "champion", v2)
    run = promote("previous_champion", force=True, reason="v2 misroutes refunds")
    assert run.run_id.startswith("manual__")
    assert aliases(tracker) == {"champion": v1, "previous_champion": v2}
    [record] = promotion_audit(tracker)
    assert record.data.tags["promotion.requested_by"] == "dag_test"  # `airflow dags test`'s user
    assert record.data.tags["promotion.reason"] == "v2 misroutes refunds"

    promote(v2)  # better than the champion v1: allowed
    assert aliases(tracker)["champion"] == v2
    promote(v1)  # worse than the champion, not forced
    assert aliases(tracker)["champion"] == v2
    outcomes = sorted(r.data.tags["promotion.outcome"] for r in promotion_audit(tracker))
    assert outcomes == ["promoted", "promoted", "refused"]
    assert (
        json.loads(tracker.get_model_version(MODEL_NAME, v2).tags["finetune.promoted_to.champion"])["forced"] is False
    )
