"""MLflow's module-level calls (``mlflow.start_run``, ``mlflow.log_input``, ``mlflow.pyfunc.log_model``),
which bypass the wrapped client, are told apart the same way when the server cannot be reached:
the CLI turns them into exit 75 (retried). The whole-step path is in test_resume.py (the server
stopped mid-training)."""

import dataclasses
import json
import os

import pytest

from pipeline import cli, steps, storage, tracking
from pipeline.config import load_config
from pipeline.errors import TransientError
from tests.faults import closed_port


def test_a_module_level_mlflow_call_that_cannot_reach_the_server_is_transient(monkeypatch):
    import mlflow

    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as raised:
        mlflow.search_experiments()
    transient = tracking.transient_error(raised.value)
    assert isinstance(transient, TransientError) and f"MLflow tracking server {uri} unreachable" in str(transient)
    assert tracking.transient_error(ConnectionError("refused by something else")) is None  # not MLflow's


def test_the_cli_maps_an_unwrapped_mlflow_outage_to_exit_75_naming_the_server_without_its_password(monkeypatch, capfd):
    import mlflow

    secret = "s3cr3t-" + os.urandom(4).hex()
    host = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://finetune:{secret}@{host}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def promote_that_calls_mlflow_directly(cfg):
        return mlflow.search_experiments()

    monkeypatch.setitem(
        steps.STEPS, "promote", dataclasses.replace(steps.STEPS["promote"], run=promote_that_calls_mlflow_directly)
    )
    assert cli.main(["promote", "--set", "promote.version=1", "--set", "run_id=outage"]) == 75
    error = storage.read_json(storage.join(load_config(None, ["run_id=outage"]).step_uri("promote"), steps.ERROR_FILE))
    assert error["exit_code"] == 75 and f"MLflow tracking server http://{host} unreachable or failing" in error["error"]
    out, err = capfd.readouterr()
    assert secret not in json.dumps(error) + out + err
