"""pipeline.tracking leaves the process's MLflow settings alone: a client gets its URIs passed in,
and MLflow's module-level API is pointed at the store for a with-block only (``module_api``)."""

import os

from pipeline import tracking


def test_a_client_is_bound_to_the_store_and_exports_nothing():
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    tracker = tracking.client()
    assert tracker.tracking_uri == tracking.tracking_uri()
    assert tracker._registry_uri == tracking.tracking_uri()  # MlflowClient keeps it there; no getter
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


def test_module_api_points_mlflow_at_the_store_for_its_block_and_puts_back_what_was_there(monkeypatch):
    import mlflow

    with tracking.module_api() as uri:
        assert uri == tracking.tracking_uri() == mlflow.get_tracking_uri() == mlflow.get_registry_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() != uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # the user's own, kept
    with tracking.module_api() as uri:
        assert uri == mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_a_step_on_a_tracking_server_with_a_password_in_its_uri_prints_no_password(
    mlflow_server, snapshot, classifier_dir, monkeypatch
):
    """MLflow prints "View run ... at: <host>" when a run ends, userinfo and all: evaluate's output
    (what its task log holds) must not carry the password its tracking URI has."""
    import json
    import subprocess
    import sys

    secret = "s3cr3t-" + os.urandom(4).hex()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.replace("http://", f"http://finetune:{secret}@")}
    env.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)
    run_id = "quiet-" + os.urandom(3).hex()
    sets = [
        f"evaluate.snapshot_uri={snapshot.snapshot_uri}",
        f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
        f"run_id={run_id}",
        f"model_name={run_id}",  # a model of its own: the session's server holds other tests' champions
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", *(a for s in sets for a in ("--set", s))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    # Its run on that server ended (so MLflow had its banner to print).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracker = tracking.client()
    experiments = [e.experiment_id for e in tracker.search_experiments()]
    (run,) = tracker.search_runs(experiments, f"tags.`{tracking.RUN_TAG}` = '{run_id}'")
    assert run.info.status == "FINISHED"
