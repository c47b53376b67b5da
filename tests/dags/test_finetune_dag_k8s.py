"""The finetune DAG under FINETUNE_LAUNCHER=kubernetes / pytorchjob: the same five tasks, built as
KubernetesPodOperators (training as a PyTorchJob), and the pod KPO would submit, XCom sidecar
included, still validates and meets Pod Security "restricted"."""

import pytest

from tests.helpers import DAGS
from tests.manifests import RUN, restricted_violations, validate_core

ORDER = ["collect", "validate", "train", "evaluate", "register"]


def load_dag(monkeypatch, launcher):
    from airflow.dag_processing.dagbag import BundleDagBag

    monkeypatch.setenv("FINETUNE_LAUNCHER", launcher)
    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert bag.import_errors == {}
    return bag.dags["finetune"]


@pytest.mark.parametrize(
    "launcher, train_type", [("kubernetes", "StepPodOperator"), ("pytorchjob", "PyTorchJobOperator")]
)
def test_same_graph_with_cluster_operators(monkeypatch, launcher, train_type):
    dag = load_dag(monkeypatch, launcher)
    assert sorted(dag.task_ids) == sorted(ORDER)
    for upstream, downstream in zip(ORDER, ORDER[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert type(dag.get_task("train")).__name__ == train_type
    assert type(dag.get_task("collect")).__name__ == "StepPodOperator"
    assert dag.get_task("collect").do_xcom_push is True


def test_submitted_pod_with_xcom_sidecar_is_valid_and_restricted(monkeypatch):
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
    from kubernetes.client import ApiClient

    from pipeline import steps

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')
    operator = load_dag(monkeypatch, "kubernetes").get_task("train")
    manifest = steps.render("train", RUN, "kubernetes")
    operator.full_pod_spec = PodGenerator.deserialize_model_dict(manifest)  # as execute() does
    pod = ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(dry_run=True))
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["base", "airflow-xcom-sidecar"]
    assert pod["spec"]["containers"][0]["args"] == manifest["spec"]["containers"][0]["args"]
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in pod["spec"]["containers"][0]["volumeMounts"]
    validate_core(pod)
    assert restricted_violations(pod["spec"]) == []


def test_bad_launcher_fails_the_dag_import(monkeypatch):
    from airflow.dag_processing.dagbag import BundleDagBag

    monkeypatch.setenv("FINETUNE_LAUNCHER", "slurm")
    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert "unknown launcher 'slurm'" in next(iter(bag.import_errors.values()))


@pytest.mark.parametrize("launcher", ["kubernetes", "pytorchjob"])
def test_promote_runs_as_a_pod_on_the_cluster_launchers(monkeypatch, launcher):
    """Promotion and roll-back are a row of the step table like the rest: on a cluster they run as a
    pod, never as a local subprocess of the Airflow worker (which has no registry credentials)."""
    from airflow.dag_processing.dagbag import BundleDagBag

    from pipeline import steps

    monkeypatch.setenv("FINETUNE_LAUNCHER", launcher)
    bag = BundleDagBag(dag_folder=str(DAGS / "promote.py"), bundle_path=DAGS)
    assert bag.import_errors == {}
    task = bag.dags["promote"].get_task("promote")
    assert type(task).__name__ == "StepPodOperator" and task.retries == 2 and task.retry_exponential_backoff
    manifest = steps.render("promote", ["promote.version=3", "run_id=manual__x"], launcher)
    assert manifest["kind"] == "Pod" and manifest["spec"]["containers"][0]["args"][:2] == ["promote", "--set"]
    validate_core(manifest)
    assert restricted_violations(manifest["spec"]) == []
