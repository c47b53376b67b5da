"""Retries by cause on the cluster launchers: after a failed pod or PyTorchJob the task reads the
step's error.json (written by a real failing step here) and the pod's exit code, and Airflow's
retry policy on every task (the DAGs' ``retry_policy``, the one retry table) fails it at once for
bad input (2), a failed gate (3) and out of memory (137, naming k8s.resources.<step>.memory), but
retries a transient fault (75) or a crash, the cause in its reason; through Airflow's own task
runner (``dag.test()``) too. The local launcher's path is tested in tests/pipeline/test_retries.py
and test_steps.py."""

import importlib
import json

import pytest
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
)

from pipeline import cli, steps, storage
from pipeline.config import load_config
from tests.helpers import DAGS
from tests.manifests import RUN, InMemoryCustomObjects


def load_dag_module(name: str = "finetune_tasks"):
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert bag.import_errors == {}
    return importlib.import_module(name)  # on sys.path once a DAG file is parsed


def verdict(exc: BaseException) -> str:
    """What Airflow's task runner does with ``exc`` under the DAGs' retry policy (it calls
    ``evaluate`` as here): 'retry', 'fail', or 'default' (the task's standard retries)."""
    return load_dag_module().DEFAULT_ARGS["retry_policy"].evaluate(exc, 1, 3).action.value


def failed_pod(exit_code: int, reason: str = "Error") -> V1Pod:
    terminated = V1ContainerStateTerminated(exit_code=exit_code, reason=reason)
    return V1Pod(
        metadata=V1ObjectMeta(name="finetune-train"),
        status=V1PodStatus(
            phase="Failed",
            container_statuses=[
                V1ContainerStatus(
                    name="base",
                    image="i",
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=V1ContainerState(terminated=terminated),
                ),
                V1ContainerStatus(
                    name="airflow-xcom-sidecar",
                    image="i",
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=0)),
                ),
            ],
        ),
    )


def write_error(run_id: str, step: str, code: int) -> None:
    """The step's error.json as ``finetune <step>`` writes it: from a real failing run for 2, by
    hand for the other codes (a step writes the same shape for each)."""
    cfg = load_config(None, [f"run_id={run_id}"])
    if code == 2:
        assert (
            cli.main(["collect", "--set", 'collect.sources=["/nonexistent/*.jsonl"]', "--set", f"run_id={run_id}"]) == 2
        )
        error = storage.read_json(storage.join(cfg.step_uri("collect"), steps.ERROR_FILE))
    else:
        error = {"step": step, "error": f"exit {code} happened", "exit_code": code}
    storage.write_json(storage.join(cfg.step_uri(step), steps.ERROR_FILE), error)


@pytest.mark.parametrize("code, retried", [(2, False), (3, False), (75, True)])
def test_a_failed_pod_with_the_steps_own_verdict(code, retried):
    operators = load_dag_module("finetune_k8s_operators")
    run_id = f"pod-{code}"
    write_error(run_id, "train", code)
    cfg = load_config(None, [f"run_id={run_id}"])
    exit_code, oom = operators.pod_exit(failed_pod(1))
    outcome = operators.task_exception("train", "kubernetes", cfg, exit_code, "Pod returned a failure", oom=oom)
    assert isinstance(outcome, steps.StepFailed) and verdict(outcome) == ("retry" if retried else "fail")
    assert ("matches no files" if code == 2 else f"exit {code} happened") in str(outcome)


def test_an_oom_killed_pod_says_out_of_memory_names_the_steps_memory_key_and_is_not_retried():
    operators = load_dag_module("finetune_k8s_operators")
    cfg = load_config(None, ["run_id=pod-oom", 'k8s.resources={"train": {"memory": "12Gi"}}'])
    exit_code, oom = operators.pod_exit(failed_pod(137, "OOMKilled"))
    assert (exit_code, oom) == (137, True)
    outcome = operators.task_exception("train", "kubernetes", cfg, exit_code, "", oom=oom)
    assert verdict(outcome) == "fail"
    assert "ran out of memory" in str(outcome) and "k8s.resources.train.memory" in str(outcome)
    assert "its pods have 12Gi" in str(outcome)


def test_a_crashed_pod_without_an_error_file_is_retried():
    operators = load_dag_module("finetune_k8s_operators")
    cfg = load_config(None, ["run_id=pod-crash"])
    exit_code, oom = operators.pod_exit(failed_pod(139))
    outcome = operators.task_exception("train", "kubernetes", cfg, exit_code, "Pod failed", oom=oom)
    assert verdict(outcome) == "retry" and "exited with code 139" in str(outcome)
    assert operators.pod_exit(V1Pod(status=V1PodStatus(phase="Failed"))) == (None, False)  # evicted before it ran
    # Killed but not for memory (preempted, stopped): a SIGKILL is not taken for the OOM killer.
    exit_code, oom = operators.pod_exit(failed_pod(137, "Error"))
    outcome = operators.task_exception("train", "kubernetes", cfg, exit_code, "Pod failed", oom=oom)
    assert verdict(outcome) == "retry" and "not for memory" in str(outcome)


def test_a_pod_past_its_active_deadline_is_a_timeout_and_is_retried():
    operators = load_dag_module("finetune_k8s_operators")
    pod = failed_pod(137, "Error")
    pod.status.reason = "DeadlineExceeded"
    assert operators.pod_exit(pod) == (steps.TIMEOUT_EXIT_CODE, False)
    exit_code, oom = operators.pod_exit(pod)
    outcome = operators.task_exception(
        "train", "kubernetes", load_config(None, ["run_id=pod-deadline"]), exit_code, "Pod failed", oom=oom
    )
    assert verdict(outcome) == "retry" and outcome.returncode == 124
    assert "ran past its timeout" in str(outcome) and "timeouts.train" in str(outcome)


class FakeTI:
    """What run_overrides asks of a task instance: the upstream results."""

    def __init__(self, upstream):
        self.upstream = upstream

    def xcom_pull(self, task_ids):
        return self.upstream[task_ids]


@pytest.mark.parametrize("code, retried", [(None, True), (2, False), (75, True)])
def test_the_pytorchjob_task_reads_the_verdict_of_a_failed_job(monkeypatch, tmp_path, code, retried):
    monkeypatch.setenv("FINETUNE_LAUNCHER", "pytorchjob")
    tasks = load_dag_module()
    operator = tasks.step_task("train", "pytorchjob")
    run_id = f"job-{code}"
    if code is not None:
        write_error(run_id, "train", code)
    api = InMemoryCustomObjects([[{"type": "Running", "status": "True"}], [{"type": "Failed", "status": "True"}]])
    monkeypatch.setattr(type(operator), "api", lambda self: api)  # the cluster, not the operator, is faked
    context = {
        "ti": FakeTI({"collect": {"snapshot_uri": json.loads(RUN[1].partition("=")[2])}}),
        "params": {},
        "run_id": run_id,
        "dag_run": None,
    }
    (tmp_path / "deploy.yaml").write_text("k8s:\n  job_poll_seconds: 1\n")
    monkeypatch.setenv("FINETUNE_CONFIG", str(tmp_path / "deploy.yaml"))
    with pytest.raises(steps.StepFailed) as failed:
        operator.execute(context)
    assert verdict(failed.value) == ("retry" if retried else "fail")
    assert api.deleted  # a failed job is deleted either way
    if code == 2:
        assert "matches no files" in str(failed.value)
    elif code is None:
        assert "ended Failed" in str(failed.value) and failed.value.retryable


@pytest.mark.parametrize("fault, retried", [("missing file", False), ("HTTP 503", True)])
def test_the_local_task_fails_at_once_on_bad_input_and_lets_a_transient_fault_retry(fault, retried, deployment_allows):
    from tests.faults import always_503

    operators = load_dag_module("finetune_operators")
    operator = operators.LocalStepOperator(task_id="collect", step="collect")
    with always_503() as url:
        source = "/nonexistent/*.jsonl" if fault == "missing file" else f"{url}/data.jsonl"
        deployment_allows(sources=["/nonexistent/", f"{url}/"])
        context = {"ti": FakeTI({}), "params": {"source": [source]}, "run_id": f"local-{retried}", "dag_run": None}
        with pytest.raises(steps.StepFailed) as failed:
            operator.execute(context)
    assert verdict(failed.value) == ("retry" if retried else "fail")
    assert ("HTTP Error 503" if retried else "matches no files") in str(failed.value)


@pytest.mark.parametrize(
    "pod_exit, error_code, outcome, says",
    [
        (2, 2, "fail", "matches no files"),
        (137, None, "fail", "ran out of memory"),
        (1, None, "retry", "exited with code 1"),
    ],
)
def test_the_pod_task_reads_the_container_and_the_steps_verdict(
    monkeypatch, pod_exit, error_code, outcome, says, deployment_allows
):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException

    monkeypatch.setenv("FINETUNE_LAUNCHER", "kubernetes")
    tasks = load_dag_module()
    operator = tasks.step_task("collect", "kubernetes")
    run_id = f"pod-task-{pod_exit}"
    if error_code is not None:
        write_error(run_id, "collect", error_code)

    def pod_ran_and_failed(self, context):  # the cluster's part: KPO saw the step container end so
        self.remote_pod = failed_pod(pod_exit, "OOMKilled" if pod_exit == 137 else "Error")
        raise AirflowException("Pod finetune-collect returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, "execute", pod_ran_and_failed)
    deployment_allows(sources=["/nonexistent/"])
    context = {"ti": FakeTI({}), "params": {"source": ["/nonexistent/*.jsonl"]}, "run_id": run_id, "dag_run": None}
    with pytest.raises(steps.StepFailed) as failed:
        operator.execute(context)
    assert verdict(failed.value) == outcome and says in str(failed.value)
    if pod_exit == 137:
        assert "k8s.resources.collect.memory" in str(failed.value) and steps.STEPS["collect"].memory in str(
            failed.value
        )


def test_bad_input_raised_by_the_task_itself_fails_at_once_and_airflows_own_errors_retry_as_usual():
    from airflow.sdk.exceptions import AirflowTaskTimeout

    from pipeline.errors import ConfigError, TransientError

    assert verdict(ConfigError("train.epochs: must be >= 1")) == "fail"  # a refused trigger key, a bad Param
    assert verdict(TransientError("the registry lock wait ran out")) == "retry"
    assert verdict(AirflowTaskTimeout("execution_timeout")) == verdict(RuntimeError("API 500")) == "default"
    decision = load_dag_module().DEFAULT_ARGS["retry_policy"].evaluate(steps.StepFailed("step 'x' ran out", 137), 1, 3)
    assert decision.reason == "exit code 137, out of memory: not retried: step 'x' ran out"


def test_every_task_of_every_dag_carries_the_retry_table(dagbag):
    for dag_id in ("collect", "finetune", "promote", "aliases"):
        for task in dagbag.dags[dag_id].tasks:
            assert task.retry_policy is load_dag_module().RETRY_TABLE, (dag_id, task.task_id)
            assert task.retries == 2  # the policy decides which failures use them, not how many


def test_through_airflows_task_runner_bad_input_fails_at_once_and_a_transient_fault_is_retried_with_its_cause(
    dagbag, airflow_db, tmp_path, s3, s3_server, monkeypatch, deployment_allows
):
    from datetime import timedelta

    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.session import create_session

    from tests.faults import failing_proxy

    deployment_allows(sources=[tmp_path], model_names=["retry-cause-*"])
    dag = dagbag.dags["collect"]
    collect = dag.get_task("collect")
    deployment = load_dag_module("finetune_operators").deployment_config()  # its own model and sample
    bad = dag.test(run_conf={"source": [str(tmp_path / "none-*.jsonl")], "model_name": deployment.model_name})
    [ti] = [ti for ti in bad.get_task_instances() if ti.task_id == "collect"]
    assert (ti.state, ti.try_number) == ("failed", 1)  # bad input: the policy failed it, no retry
    saved = collect.retries, collect.retry_delay, collect.retry_exponential_backoff
    collect.retries, collect.retry_delay, collect.retry_exponential_backoff = 1, timedelta(0), False
    try:
        with failing_proxy(s3_server, fail_first=None) as proxy:  # the artifact store answers 503 SlowDown
            monkeypatch.setenv("FINETUNE_ARTIFACT_ROOT", f"s3://{s3}/artifacts")
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the verdict is the point, not botocore's back-off
            # dag.test() keeps the last run's conf in the DAG's Params: the source is given again.
            flaky = dag.test(run_conf={"source": deployment.collect.sources, "model_name": deployment.model_name})
    finally:
        collect.retries, collect.retry_delay, collect.retry_exponential_backoff = saved
    [ti] = [ti for ti in flaky.get_task_instances() if ti.task_id == "collect"]
    assert (ti.state, ti.try_number) == ("failed", 2)  # retried once, as many as retries allows
    with create_session() as session:
        first = session.query(TaskInstanceHistory).filter_by(run_id=flaky.run_id, task_id="collect").one()
    assert first.try_number == 1 and first.retry_reason.startswith("exit code 75, retried: "), first.retry_reason
    assert "(503)" in first.retry_reason  # the cause, as the UI shows it
