import re
import sys

import pytest

from pipeline import steps
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.helpers import ROOT


def test_overrides_carry_params_then_free_overrides_then_upstream_uris():
    params = {"epochs": 2, "learning_rate": 5e-5, "source": ["s3://bucket/data/"], "overrides": ["train.epochs=4"]}
    upstream = {"collect": {"snapshot_uri": "file:///a/data.parquet"}}
    sets = steps.step_overrides("train", params, upstream, "r1")
    assert sets.index("train.epochs=2") < sets.index("train.epochs=4")  # the free-form override wins
    assert sets[-2:] == ["run_id=r1", 'train.snapshot_uri="file:///a/data.parquet"']
    cfg = load_config(None, sets)
    assert cfg.train.epochs == 4 and cfg.collect.sources == ["s3://bucket/data/"] and cfg.run_id == "r1"


def test_missing_upstream_result_is_an_error():
    with pytest.raises(ConfigError, match="upstream result collect.snapshot_uri is missing"):
        steps.step_overrides("evaluate", {}, {"train": {"model_uri": "x"}}, "r1")


def test_argv_is_the_container_argv_and_training_is_distributed():
    assert steps.step_argv("collect", ["run_id=r"]) == ["finetune", "collect", "--set", "run_id=r"]
    command = steps.local_command("train", ["train.num_processes=3"], "/tmp/r.json")
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    assert command[5:] == ["-m", "pipeline", "train", "--set", "train.num_processes=3", "--result-file", "/tmp/r.json"]
    assert steps.local_command("evaluate", [], "/r")[:4] == [sys.executable, "-m", "pipeline", "evaluate"]


def test_bad_override_fails_before_any_process_starts():
    with pytest.raises(ConfigError, match="train.num_processes: 0 is below the minimum 1"):
        steps.local_command("train", ["train.num_processes=0"], "/r")


def test_unknown_step_and_launcher(monkeypatch):
    with pytest.raises(ConfigError, match="unknown step 'deploy'"):
        steps.step_argv("deploy", [])
    monkeypatch.setenv("FINETUNE_LAUNCHER", "slurm")
    with pytest.raises(ConfigError, match="unknown launcher 'slurm'"):
        steps.launch("collect", [])


def test_failed_step_reports_its_error_and_is_not_retryable(tmp_path):
    with pytest.raises(steps.StepFailed) as failed:
        steps.launch_local("collect", [f'collect.sources=["{tmp_path}/nothing-*.jsonl"]', "run_id=r"])
    assert "matches no files" in str(failed.value)
    assert failed.value.returncode == 2 and not failed.value.retryable


def test_aws_env_from_connection_fields_leaves_out_what_is_not_set():
    extra = {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1", "aws_session_token": "token"}
    assert steps.aws_env("key-id", "secret", extra) == {
        "AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    # A connection with only a region (keys from an instance role): the chain supplies the rest.
    assert steps.aws_env(None, "", {"region_name": "eu-west-1"}) == {"AWS_DEFAULT_REGION": "eu-west-1"}


def test_extra_env_reaches_the_step_and_wins_over_this_process(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env = steps.local_env({"AWS_DEFAULT_REGION": "eu-west-1"})
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1" and env["PATH"]
    assert steps.local_env()["AWS_DEFAULT_REGION"] == "us-east-1"


# --- what a trigger may set: the deployment's trigger_keys --------------------------------------

@pytest.mark.parametrize("override", [
    "evaluate.metric_direction=lower",  # would turn the accuracy gate upside down
    'evaluate.thresholds=["accuracy>=0.0"]',
    "evaluate.promotion_margin=0",
    "k8s.image=any/image:1",  # any image, with the S3 and MLflow secrets mounted
    "artifact_root=s3://elsewhere/",
    'validate.warn_only=["label_allowed"]',
    "run_id=another-run",  # would overwrite another run's artifacts
    'trigger_keys=["*"]',  # a trigger can never widen its own allow-list
])
def test_a_trigger_may_not_set_a_key_outside_the_deployments_allow_list(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' may not be set by a trigger .* trigger_keys"):
        steps.step_overrides("collect", {"overrides": [override]}, {}, "r1")


def test_the_deployment_config_is_trusted_and_can_widen_the_allow_list(tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("evaluate:\n  metric_direction: lower\ntrain:\n  epochs: 3\n"
                          "trigger_keys: [collect.sources, 'train.*', evaluate.promotion_margin]\n")
    overrides = steps.deployment_overrides({"FINETUNE_CONFIG": str(deployment)})
    # The deployment's own keys are never checked; its allow-list then governs the trigger.
    sets = steps.step_overrides("train", {"epochs": 3, "overrides": ["evaluate.promotion_margin=0.01"]},
                                {"collect": {"snapshot_uri": "file:///s.parquet"}}, "r1", deployment=overrides)
    cfg = load_config(None, sets)
    assert cfg.evaluate.metric_direction == "lower" and cfg.evaluate.promotion_margin == 0.01
    assert cfg.train.epochs == 3 and "train.epochs=3" not in sets[len(overrides):]  # a Param at its default sends nothing
    assert load_config(None, steps.step_overrides("train", {"epochs": 7}, {"collect": {"snapshot_uri": "x"}}, "r",
                                                  deployment=overrides)).train.epochs == 7
    with pytest.raises(ConfigError, match="'model_name' may not be set by a trigger"):  # not in this allow-list
        steps.step_overrides("train", {"model_name": "other"}, {"collect": {"snapshot_uri": "x"}}, "r",
                             deployment=overrides)


def test_a_shipped_recipe_that_moves_the_gate_works_as_the_deployments_config():
    recipe = ROOT / "pipeline" / "configs" / "support_chat_qwen.yaml"
    overrides = steps.deployment_overrides({"FINETUNE_CONFIG": str(recipe)})
    cfg = load_config(None, steps.step_overrides("collect", {}, {}, "r1", deployment=overrides))
    assert cfg.evaluate.gate_metric == load_config(recipe).evaluate.gate_metric != ""


def test_finetune_run_refuses_a_trigger_key_before_airflow_starts(capsys):
    from pipeline import dagrun

    assert dagrun.main(["--set", "evaluate.metric_direction=lower"]) == 2
    assert "run --set: 'evaluate.metric_direction' may not be set by a trigger" in capsys.readouterr().err
