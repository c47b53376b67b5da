import sys

import pytest

from pipeline import steps
from pipeline.errors import ConfigError


def test_overrides_carry_params_then_free_overrides_then_upstream_uris():
    params = {"epochs": 2, "learning_rate": 5e-5, "source": ["s3://bucket/data/"], "overrides": ["train.epochs=4"]}
    upstream = {"collect": {"snapshot_uri": "file:///a/data.parquet"}}
    sets = steps.step_overrides("train", params, upstream, "r1")
    assert sets.index("train.epochs=2") < sets.index("train.epochs=4")  # the free-form override wins
    assert sets[-2:] == ["run_id=r1", 'train.snapshot_uri="file:///a/data.parquet"']
    from pipeline.config import load_config

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
