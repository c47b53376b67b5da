"""Retries reattach: the job operator (TrainJob and PyTorchJob) records the job it created in the
try's ``task_state_store`` before it watches, and a next try of the same task instance follows
that job while it runs, takes the result of one that succeeded, and replaces one that failed or
was recreated by someone else (another uid), saying so. The operator is the DAG's own, against a
cluster's APIs in memory that give each created job a uid as the API server does; the store is
the accessor's get/set/delete over a dict, kept across tries as the Airflow DB keeps it (Airflow's
own tests of ResumableJobMixin stand it in the same way).

    .venv/bin/python -m pytest -q tests/dags/test_job_reattach.py
"""

from __future__ import annotations

import functools
import threading
import uuid

import pytest
import structlog

from pipeline import k8s, steps, storage
from pipeline.config import load_config
from pipeline.k8s import jobs
from tests.dags.test_trainjob_dag import COMPLETE, FAILED, context, operator_on
from tests.inmemory_core import InMemoryCoreV1
from tests.manifests import InMemoryCustomObjects

RUNNING = [{"type": "Running", "status": "True", "reason": "Running"}]
PYTORCH_DONE = [{"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}]


class Cluster(InMemoryCustomObjects):
    """The custom-objects API in memory, giving each created job a fresh uid and answering the
    created object, as the API server does. ``frozen = (thread, n)``: that thread stops for good
    at its n-th poll of the job (its process was killed: nothing of it runs again, no ``finally``,
    no ``on_kill``)."""

    def __init__(self, conditions_per_poll):
        super().__init__(conditions_per_poll)
        self.created: list[str] = []
        self.frozen: tuple[threading.Thread, int] | None = None
        self.stopped, self.never = threading.Event(), threading.Event()

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        super().create_namespaced_custom_object(group, version, namespace, plural, body)
        body["metadata"] = {**body["metadata"], "uid": str(uuid.uuid4())}
        self.created.append(body["metadata"]["uid"])
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if self.frozen is not None and self.frozen[0] is threading.current_thread():
            if self.frozen[1] <= 1:
                self.stopped.set()
                self.never.wait()  # a daemon thread, parked until the test process exits
            self.frozen = (self.frozen[0], self.frozen[1] - 1)
        return super().get_namespaced_custom_object(group, version, namespace, plural, name)


class TaskStateStore:
    """``context['task_state_store']``'s get/set/delete over a dict, shared by the tries."""

    def __init__(self):
        self.values: dict = {}

    def get(self, key, default=None):
        return self.values.get(key, default)

    def set(self, key, value, *, retention=None):
        assert value is not None
        self.values[key] = value

    def delete(self, key):
        self.values.pop(key, None)


def with_result(run_id: str) -> dict:
    result = {"model_uri": f"s3://b/runs/{run_id}/train/model", "final_loss": 0.5}
    storage.write_json(
        storage.join(load_config(None, [f"run_id={run_id}"]).step_uri("train"), steps.RESULT_FILE), result
    )
    return result


def a_try(operator, run_id: str, store: TaskStateStore) -> dict:
    return operator.execute({**context(run_id), "task_state_store": store})


def killed_mid_watch(operator, api: Cluster, run_id: str, store: TaskStateStore, polls: int) -> None:
    """A first try that created its job and was killed at its ``polls``-th poll of it."""
    first = threading.Thread(target=a_try, args=(operator, run_id, store), daemon=True)
    api.frozen = (first, polls)
    first.start()
    assert api.stopped.wait(30), "the first try never reached its watch"


@pytest.fixture
def cluster(monkeypatch):
    """A Cluster per test, polled without waiting between polls."""
    monkeypatch.setattr(k8s, "run_job", functools.partial(k8s.run_job, sleep=lambda seconds: None))
    return Cluster


def test_a_try_killed_mid_watch_is_retried_onto_the_same_job_and_its_log(monkeypatch, tmp_path, cluster):
    run_id = "reattach-running"
    result = with_result(run_id)
    api, core, store = cluster([RUNNING, RUNNING, RUNNING, RUNNING, COMPLETE]), InMemoryCoreV1(), TaskStateStore()
    operator = operator_on(monkeypatch, tmp_path, api, core)
    killed_mid_watch(operator, api, run_id, store, polls=2)
    (uid,) = api.created
    (name,) = [name for _, name in api.objects]
    assert store.values["kubeflow_job"] == {"kind": "TrainJob", "namespace": "finetune", "name": name, "uid": uid}
    labels = jobs.JOB_APIS["TrainJob"].master_labels(name)
    core.add_pod("finetune-train-node-0-0", labels, k8s.TRAINER_CONTAINER)  # the job runs on
    core.write("finetune-train-node-0-0", k8s.TRAINER_CONTAINER, "step 40 of 100")
    with structlog.testing.capture_logs() as logs:
        assert a_try(operator, run_id, store) == result  # the retry
    events = [str(entry["event"]) for entry in logs]
    assert api.created == [uid] and api.deleted == []  # not created again, not replaced
    assert any(f"reattaching to TrainJob finetune/{name} (uid {uid})" in event for event in events)
    assert "[rank 0] step 40 of 100" in events  # the running job's rank-0 log, in the new try's log
    assert "kubeflow_job" not in store.values  # seen to its end: a cleared task runs it again


def test_a_job_that_succeeded_after_its_try_died_gives_its_result_without_a_new_job(monkeypatch, tmp_path, cluster):
    run_id = "reattach-succeeded"
    result = with_result(run_id)
    api, store = cluster([RUNNING, COMPLETE, COMPLETE]), TaskStateStore()
    operator = operator_on(monkeypatch, tmp_path, api)
    killed_mid_watch(operator, api, run_id, store, polls=2)
    with structlog.testing.capture_logs() as logs:
        assert a_try(operator, run_id, store) == result
    assert len(api.created) == 1 and api.deleted == []
    assert any("created by an earlier try: Succeeded" in str(entry["event"]) for entry in logs)


def test_a_job_that_failed_after_its_try_died_is_replaced(monkeypatch, tmp_path, cluster):
    run_id = "reattach-failed"
    result = with_result(run_id)
    api, store = cluster([RUNNING, FAILED, RUNNING, COMPLETE]), TaskStateStore()
    operator = operator_on(monkeypatch, tmp_path, api)
    killed_mid_watch(operator, api, run_id, store, polls=2)
    (first,) = api.created
    with structlog.testing.capture_logs() as logs:
        assert a_try(operator, run_id, store) == result
    events = [str(entry["event"]) for entry in logs]
    assert len(api.created) == 2 and len(api.deleted) == 1  # the failed one deleted, a new one made
    assert any(f"(uid {first}), failed: replacing it" in event for event in events)
    assert any("left by an earlier attempt" in event for event in events)


def test_a_job_someone_recreated_is_not_adopted_and_the_log_says_so(monkeypatch, tmp_path, cluster):
    run_id = "reattach-recreated"
    result = with_result(run_id)
    api, store = cluster([RUNNING, RUNNING, RUNNING, RUNNING, COMPLETE]), TaskStateStore()
    operator = operator_on(monkeypatch, tmp_path, api)
    killed_mid_watch(operator, api, run_id, store, polls=2)
    (ours,) = api.created
    (key,) = api.objects
    theirs = str(uuid.uuid4())  # someone deleted the job and created one of the same name
    api.objects[key] = {**api.objects[key], "metadata": {**api.objects[key]["metadata"], "uid": theirs}}
    with structlog.testing.capture_logs() as logs:
        assert a_try(operator, run_id, store) == result
    events = [str(entry["event"]) for entry in logs]
    assert any(f"not adopting TrainJob finetune/{key[1]}: its uid is {theirs}, not {ours}" in e for e in events)
    assert api.deleted == [key[1]] and len(api.created) == 2  # replaced, as a job an earlier attempt left
    assert store.values == {}  # the new job ran to its end


def test_a_pytorchjob_retry_reattaches_too(monkeypatch, tmp_path, cluster):
    import finetune_k8s_operators

    run_id = "reattach-pytorchjob"
    result = with_result(run_id)
    api, store = cluster([RUNNING, RUNNING, RUNNING, PYTORCH_DONE]), TaskStateStore()
    operator_on(monkeypatch, tmp_path, api)  # the deployment's config
    operator = finetune_k8s_operators.PyTorchJobOperator(task_id="train", step="train")
    monkeypatch.setattr(type(operator), "api", lambda self: api)
    monkeypatch.setattr(type(operator), "core_api", lambda self: None)
    killed_mid_watch(operator, api, run_id, store, polls=2)
    assert store.values["kubeflow_job"]["kind"] == "PyTorchJob"
    assert a_try(operator, run_id, store) == result
    assert len(api.created) == 1 and api.deleted == []


def test_durable_false_and_no_store_create_the_job_as_before(monkeypatch, tmp_path, cluster):
    run_id = "reattach-off"
    result = with_result(run_id)
    api, store = cluster([COMPLETE, COMPLETE]), TaskStateStore()
    operator = operator_on(monkeypatch, tmp_path, api)
    store.values["kubeflow_job"] = {"kind": "TrainJob", "namespace": "finetune", "name": "x", "uid": "u"}
    with structlog.testing.capture_logs() as logs:  # another job's identity: not adopted, said
        assert a_try(operator, run_id, store) == result
    assert any("not adopting" in str(entry["event"]) for entry in logs) and len(api.created) == 1
    operator.durable = False
    assert a_try(operator, run_id, store) == result
    assert len(api.created) == 2 and store.values == {}  # replaced as before; nothing recorded


def test_the_step_pods_use_the_providers_durable_reattach(monkeypatch):
    """KubernetesPodOperator's own switch (``durable``, Airflow 3.3+): the pod's identity goes to
    the try's task_state_store and a next try follows that pod while it runs."""
    from tests.dags.test_trainjob_dag import load_tasks

    monkeypatch.setenv("FINETUNE_LAUNCHER", "trainjob")
    operator = load_tasks().step_task("evaluate", "trainjob")
    assert type(operator).__name__ == "StepPodOperator"
    assert operator.durable is True and operator.reattach_on_restart is True
