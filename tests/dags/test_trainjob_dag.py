"""The finetune DAG under FINETUNE_LAUNCHER=trainjob: the same five tasks, training as a TrainJob
(Kubeflow Trainer v2) and every other step as a pod. Its operator, against a cluster's APIs in
memory: a new attempt replaces the TrainJob an earlier one left, a failed TrainJob is judged by the
step's error.json and the retry table (the DAGs' retry policy), and the rank-0 pod's log reaches
the Airflow task log.

    .venv/bin/python -m pytest -q tests/dags/test_trainjob_dag.py
"""

import functools
import json

import pytest
import structlog

from pipeline import cli, k8s, steps, storage
from pipeline.config import load_config
from pipeline.k8s import jobs
from tests.helpers import DAGS
from tests.inmemory_core import InMemoryCoreV1
from tests.manifests import RUN, InMemoryCustomObjects

ORDER = ["collect", "validate", "train", "evaluate", "register"]
COMPLETE = [{"type": "Complete", "status": "True", "reason": "JobSetCompleted"}]
FAILED = [{"type": "Failed", "status": "True", "reason": "FailedJobs"}]


def load_tasks():
    from airflow.dag_processing.dagbag import BundleDagBag

    assert BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS).import_errors == {}
    import finetune_tasks  # on sys.path once a DAG file is parsed

    return finetune_tasks


class FakeTI:
    """What run_overrides asks of a task instance: the upstream results."""

    def __init__(self, upstream):
        self.upstream = upstream

    def xcom_pull(self, task_ids):
        return self.upstream[task_ids]


def write_error(run_id: str, code: int) -> None:
    """train's error.json as ``finetune <step>`` writes it: from a real failing step for 2 (bad
    input), in the same shape by hand for the other codes."""
    cfg = load_config(None, [f"run_id={run_id}"])
    if code == 2:
        assert (
            cli.main(["collect", "--set", 'collect.sources=["/nonexistent/*.jsonl"]', "--set", f"run_id={run_id}"]) == 2
        )
        error = storage.read_json(storage.join(cfg.step_uri("collect"), steps.ERROR_FILE))
    else:
        error = {"step": "train", "error": f"exit {code} happened", "exit_code": code}
    storage.write_json(storage.join(cfg.step_uri("train"), steps.ERROR_FILE), error)


def test_training_is_a_trainjob_and_every_other_step_a_pod(monkeypatch):
    from airflow.dag_processing.dagbag import BundleDagBag

    monkeypatch.setenv("FINETUNE_LAUNCHER", "trainjob")
    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert bag.import_errors == {}
    dag = bag.dags["finetune"]
    assert sorted(dag.task_ids) == sorted(ORDER)
    for upstream, downstream in zip(ORDER, ORDER[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert type(dag.get_task("train")).__name__ == "TrainJobOperator"
    assert {type(dag.get_task(step)).__name__ for step in ORDER if step != "train"} == {"StepPodOperator"}
    assert dag.get_task("train").execution_timeout is not None


def operator_on(monkeypatch, tmp_path, api, core=None):
    """The train task as the DAG builds it, its cluster APIs the in-memory ones."""
    monkeypatch.setenv("FINETUNE_LAUNCHER", "trainjob")
    operator = load_tasks().step_task("train", "trainjob")
    monkeypatch.setattr(type(operator), "api", lambda self: api)
    if core is None:

        def no_cluster(self):
            raise RuntimeError("no kubernetes_default connection")

        monkeypatch.setattr(type(operator), "core_api", no_cluster)
    else:
        monkeypatch.setattr(type(operator), "core_api", lambda self: core)
    (tmp_path / "deploy.yaml").write_text("k8s:\n  job_poll_seconds: 1\n")
    monkeypatch.setenv("FINETUNE_CONFIG", str(tmp_path / "deploy.yaml"))
    return operator


def context(run_id: str) -> dict:
    return {
        "ti": FakeTI({"collect": {"snapshot_uri": json.loads(RUN[1].partition("=")[2])}}),
        "params": {},
        "run_id": run_id,
        "dag_run": None,
    }


def test_a_new_attempt_replaces_the_trainjob_an_earlier_attempt_left(monkeypatch, tmp_path):
    run_id = "trainjob-again"
    result = {"model_uri": "s3://b/runs/x/train/model", "final_loss": 0.5}
    storage.write_json(
        storage.join(load_config(None, [f"run_id={run_id}"]).step_uri("train"), steps.RESULT_FILE), result
    )
    api = InMemoryCustomObjects([COMPLETE, COMPLETE])
    operator = operator_on(monkeypatch, tmp_path, api)
    assert operator.execute(context(run_id)) == result
    (name,) = [name for _, name in api.objects]
    assert api.objects[("finetune", name)]["kind"] == "TrainJob" and api.deleted == []
    # The task is cleared: the same run's TrainJob name is still taken by the completed job.
    with structlog.testing.capture_logs() as logs:
        assert operator.execute(context(run_id)) == result
    assert api.deleted == [name]
    assert any("left by an earlier attempt" in entry["event"] for entry in logs)


@pytest.mark.parametrize("code, retried", [(None, True), (2, False), (3, False), (75, True)])
def test_a_failed_trainjob_is_judged_by_the_steps_error_json(monkeypatch, tmp_path, code, retried):
    run_id = f"trainjob-{code}"
    if code is not None:
        write_error(run_id, code)
    api = InMemoryCustomObjects([[], FAILED])
    operator = operator_on(monkeypatch, tmp_path, api)
    with pytest.raises(steps.StepFailed) as failed:
        operator.execute(context(run_id))
    # What Airflow's task runner does with it: the DAGs' retry policy, the one retry table.
    decision = load_tasks().DEFAULT_ARGS["retry_policy"].evaluate(failed.value, 1, 3)
    assert decision.action.value == ("retry" if retried else "fail")
    assert api.deleted  # a failed job is deleted either way
    if code == 2:
        assert "matches no files" in str(failed.value)
    elif code is None:
        assert "TrainJob finetune-train-" in str(failed.value) and "ended Failed" in str(failed.value)
        assert failed.value.retryable
    else:
        assert f"exit {code} happened" in str(failed.value)


def test_a_trainjob_past_its_deadline_is_deleted_and_retried_as_a_timeout(monkeypatch, tmp_path):
    api = InMemoryCustomObjects([])
    operator = operator_on(monkeypatch, tmp_path, api)
    monkeypatch.setattr(k8s, "job_deadline_seconds", lambda manifest: -1)  # the deadline has passed
    with pytest.raises(steps.StepFailed) as failed:
        operator.execute(context("trainjob-late"))
    assert failed.value.returncode == steps.TIMEOUT_EXIT_CODE and failed.value.retryable
    assert "ran past its deadline (timeouts.train)" in str(failed.value) and api.deleted


def test_the_rank0_pods_log_reaches_the_task_log_while_the_trainjob_runs(monkeypatch, tmp_path):
    run_id = "trainjob-logs"
    write_error(run_id, 2)
    job = steps.render("train", [f"run_id={run_id}", RUN[1]], "trainjob")
    core = InMemoryCoreV1()
    labels = jobs.job_api(job).master_labels(job["metadata"]["name"])
    core.add_pod("finetune-train-node-0-0", labels, k8s.TRAINER_CONTAINER)
    core.write("finetune-train-node-0-0", k8s.TRAINER_CONTAINER, "loading snapshot s3://b/snap/data.parquet")
    api = InMemoryCustomObjects([[], [], FAILED])
    polls = iter(range(100))

    def cluster_moves(seconds):  # between two polls the step writes its next line
        core.advance(seconds)
        core.write("finetune-train-node-0-0", k8s.TRAINER_CONTAINER, f"step {next(polls)}")

    monkeypatch.setattr(k8s, "run_job", functools.partial(k8s.run_job, sleep=cluster_moves))  # the cluster's clock
    operator = operator_on(monkeypatch, tmp_path, api, core)
    with structlog.testing.capture_logs() as logs, pytest.raises(steps.StepFailed):
        operator.execute(context(run_id))
    lines = [entry["event"] for entry in logs if str(entry["event"]).startswith("[rank 0]")]
    assert lines == ["[rank 0] loading snapshot s3://b/snap/data.parquet", "[rank 0] step 0", "[rank 0] step 1"]
    assert any("following the log of pod finetune/finetune-train-node-0-0" in entry["event"] for entry in logs)


def test_without_a_core_api_the_job_still_runs_and_says_its_log_is_not_streamed(monkeypatch, tmp_path):
    run_id = "trainjob-nolog"
    storage.write_json(
        storage.join(load_config(None, [f"run_id={run_id}"]).step_uri("train"), steps.RESULT_FILE), {"ok": True}
    )
    operator = operator_on(monkeypatch, tmp_path, InMemoryCustomObjects([COMPLETE]))
    with structlog.testing.capture_logs() as logs:
        assert operator.execute(context(run_id)) == {"ok": True}
    assert any("will not be streamed" in entry["event"] for entry in logs)
