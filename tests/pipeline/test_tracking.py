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
