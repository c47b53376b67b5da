"""Retries by cause: faults injected on loopback (a proxy in front of the S3 server that answers
503, an HTTP source that always does, an MLflow tracking URI nobody listens on) end in the
retryable exit code 75 after the client libraries' own retries, verdicts on input stay 2 and 3,
and the one retry table (``steps.classify_failure``) says the same on every launcher."""

import json

import pytest

from pipeline import local, steps, storage, tracking
from pipeline.errors import DataError, TransientError
from tests.faults import always_503, closed_port, failing_proxy
from tests.helpers import collect_snapshot, shipped_rows, write_jsonl


@pytest.fixture
def s3_source(s3, tmp_path, monkeypatch):
    """An S3 prefix holding one JSONL part of 30 rows; boto3 as a fresh step process sees it."""
    import boto3

    boto3.client("s3").put_object(
        Bucket=s3, Key="intents/part-0.jsonl", Body=write_jsonl(tmp_path / "p.jsonl", shipped_rows(3, 10)).read_bytes()
    )
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    return f"s3://{s3}/intents/"


def test_s3_503s_that_clear_are_retried_by_botocore_and_the_step_succeeds(s3_source, s3_server, monkeypatch):
    with failing_proxy(s3_server, fail_first=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = collect_snapshot([s3_source], "run_id=flaky-s3")
    assert result.rows == 30
    assert proxy.failed == 2 and len(proxy.requests) > 2  # both 503s answered, then retried through


def test_s3_that_keeps_failing_exits_75_and_the_launcher_retries_it(s3_source, s3_server):
    with failing_proxy(s3_server, fail_first=None) as proxy:
        with pytest.raises(steps.StepFailed) as failed:
            local.launch_local(
                "collect",
                [f"collect.sources={json.dumps([s3_source])}", "run_id=down-s3"],
                env={"AWS_ENDPOINT_URL": proxy.url},
            )
    assert failed.value.returncode == 75 and failed.value.retryable
    message = str(failed.value)
    assert f"cannot read {s3_source.rstrip('/')}" in message or f"cannot list {s3_source}" in message
    assert proxy.url in message and "SlowDown" in message and "after botocore's retries" in message
    assert len(proxy.requests) >= 5  # botocore's standard mode tried 5 times before giving up


def test_s3_verdicts_stay_bad_input_and_5xx_or_a_refused_connection_is_transient(s3, monkeypatch):
    with pytest.raises(DataError, match=r"cannot read s3://.*/missing.json: .*(Not Found|NoSuchKey)"):
        storage.read_bytes(f"s3://{s3}/missing.json")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the verdict is the point here, not botocore's back-off
    with pytest.raises(
        TransientError, match=r"cannot read s3://.*/any.json: S3 \(http://127.0.0.1:\d+\) still failing"
    ):
        storage.read_bytes(f"s3://{s3}/any.json")
    with always_503() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        with pytest.raises(TransientError, match="SlowDown"):
            storage.write_bytes(f"s3://{s3}/any.json", b"{}")


def test_an_http_source_that_always_answers_503_exits_75():
    with always_503() as url:
        with pytest.raises(steps.StepFailed) as failed:
            local.launch_local("collect", [f'collect.sources=["{url}/data.jsonl"]', "run_id=down-http"])
    assert failed.value.returncode == 75 and failed.value.retryable
    assert f"cannot download {url}/data.jsonl: HTTP Error 503" in str(failed.value)
    assert "(after 3 retries)" in str(failed.value) and "retried with back-off" in str(failed.value)


def test_an_http_source_that_refuses_connections_exits_75():
    source = f"http://127.0.0.1:{closed_port()}/data.jsonl"
    with pytest.raises(steps.StepFailed) as failed:
        local.launch_local("collect", [f'collect.sources=["{source}"]', "run_id=refused-http"])
    assert failed.value.returncode == 75 and "Connection refused" in str(failed.value)


@pytest.mark.parametrize("server", ["closed port", "answers 503"])
def test_mlflow_unreachable_exits_75_naming_the_tracking_uri(server):
    with always_503() as failing:
        uri = f"http://127.0.0.1:{closed_port()}" if server == "closed port" else failing
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        with pytest.raises(steps.StepFailed) as failed:
            local.launch_local("promote", ["promote.version=1", "run_id=no-mlflow"], env=env)
    assert failed.value.returncode == 75 and failed.value.retryable
    assert f"MLflow tracking server {uri} unreachable or failing" in str(failed.value)
    assert "MLFLOW_TRACKING_URI" in str(failed.value)


def test_the_tracker_passes_mlflows_own_verdicts_through(monkeypatch):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as missing:  # an embedded store that answers: "no such model"
        tracking.client().get_registered_model("no-such-model")
    assert not tracking.unreachable(missing.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TransientError) as down:
        tracking.client().get_registered_model("no-such-model")
    assert "127.0.0.1" in str(down.value) and "secret" not in str(down.value)  # named, without its password


# --- the one retry table, as every launcher applies it -----------------------------------------


@pytest.mark.parametrize("launcher", steps.LAUNCHERS)
@pytest.mark.parametrize(
    "code, retried, says",
    [
        (2, False, "bad input"),
        (3, False, "the data gate failed"),
        (75, True, "S3 still failing"),
        (124, True, "ran past"),
        (1, True, "Traceback"),
    ],
)
def test_the_step_s_own_exit_code_decides_the_retry_on_every_launcher(launcher, code, retried, says):
    error = {"step": "train", "error": says, "exit_code": code}
    failure = steps.classify_failure("train", launcher, 1, error)  # torchrun itself exits 1 whatever its ranks said
    assert (failure.returncode, failure.retryable) == (code, retried) and says in str(failure)


@pytest.mark.parametrize(
    "launcher, setting",
    [
        ("local", "train.batch_size"),
        ("kubernetes", "k8s.resources.train.memory"),
        ("pytorchjob", "k8s.resources.train.memory"),
        ("trainjob", "k8s.resources.train.memory"),
    ],
)
def test_an_oom_kill_says_out_of_memory_and_the_setting_to_raise_and_is_not_retried(launcher, setting):
    for exit_code in (137, -9):
        failure = steps.classify_failure("train", launcher, exit_code, None, memory="8Gi")
        assert failure.returncode == 137 and not failure.retryable
        assert "ran out of memory" in str(failure) and setting in str(failure)
    if launcher != "local":
        assert "its pods have 8Gi" in str(failure)


@pytest.mark.parametrize("step", ["collect", "validate", "evaluate", "register", "promote"])
def test_the_oom_hint_names_the_memory_key_of_the_step_that_ran_out(step):
    failure = steps.classify_failure(step, "kubernetes", 137, None, memory="6Gi")
    assert (
        f"raise k8s.resources.{step}.memory (its pods have 6Gi), e.g. k8s.resources: {{{step}: {{memory: "
        "<more>}}" in str(failure)
    )
    assert "k8s.memory" not in str(failure)


def test_a_crash_without_an_error_file_is_retried():
    failure = steps.classify_failure("evaluate", "kubernetes", 1, None, detail="Segmentation fault")
    assert failure.retryable and "exited with code 1: Segmentation fault" in str(failure)
    assert steps.classify_failure("evaluate", "pytorchjob", None, None, detail="PyTorchJob x ended Failed").retryable
