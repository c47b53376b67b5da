"""Every task of every DAG has an execution_timeout: the step's own (``timeouts.<step>``, the
deployment's config) plus the launcher's grace and margin, on every launcher; the deployment's
config moves it, a run cannot."""

from datetime import timedelta

import pytest

from tests.helpers import DAGS

DAG_FILES = {"finetune": "finetune.py", "collect": "collect.py", "promote": "promote.py"}


def load(monkeypatch, dag_id, launcher="local", **env):
    from airflow.dag_processing.dagbag import BundleDagBag

    monkeypatch.setenv("FINETUNE_LAUNCHER", launcher)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = BundleDagBag(dag_folder=str(DAGS / DAG_FILES[dag_id]), bundle_path=DAGS)
    assert bag.import_errors == {}
    return bag.dags[dag_id]


@pytest.mark.parametrize("launcher", ["local", "kubernetes", "pytorchjob"])
@pytest.mark.parametrize("dag_id", list(DAG_FILES))
def test_every_task_of_every_dag_has_an_execution_timeout(monkeypatch, dag_id, launcher):
    from pipeline import steps
    from pipeline.config import load_config

    dag = load(monkeypatch, dag_id, launcher)
    from finetune_tasks import ANNOUNCE_TIMEOUT, LAUNCH_MARGIN_S  # on sys.path once a DAG file is parsed

    defaults = load_config()
    for task in dag.tasks:
        assert task.execution_timeout is not None, task.task_id
        if task.task_id == "announce":
            assert task.execution_timeout == ANNOUNCE_TIMEOUT
            continue
        own = steps.step_timeout(task.task_id, defaults)
        assert task.execution_timeout == timedelta(seconds=own + defaults.timeouts.kill_grace_s + LAUNCH_MARGIN_S)
        if task.task_id == "train":
            assert task.execution_timeout >= timedelta(hours=6)
        else:
            assert task.execution_timeout <= timedelta(hours=1, minutes=10)


def test_the_deployments_config_sets_the_timeouts(monkeypatch, tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("timeouts:\n  train: 7200\n  collect: 60\n  kill_grace_s: 10\n")
    dag = load(monkeypatch, "finetune", FINETUNE_CONFIG=str(deployment))
    assert dag.get_task("train").execution_timeout == timedelta(seconds=7200 + 10 + 300)
    assert dag.get_task("collect").execution_timeout == timedelta(seconds=60 + 10 + 300)
