"""DAG integrity: it imports cleanly and fast, has the expected graph, schedule, Params and
retries, and Airflow itself rejects bad Params from the trigger form."""

import json
import subprocess
import sys

import pytest

from tests.helpers import DAGS

HEAVY = ("torch", "transformers", "deepspeed", "mlflow", "great_expectations", "pandas", "datasets")


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["finetune"]


def test_task_graph_is_the_five_steps_in_order(dag):
    order = ["collect", "validate", "train", "evaluate", "register"]
    assert sorted(dag.task_ids) == sorted(order)
    for upstream, downstream in zip(order, order[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}


def test_schedule_tags_retries_and_docs(dag):
    assert dag.catchup is False and dag.max_active_runs == 1
    assert {"finetune", "mlops"} <= set(dag.tags)
    assert all(task.retries == 2 and task.retry_exponential_backoff for task in dag.tasks)
    assert "collect → validate → train → evaluate → register" in dag.doc_md
    assert "FINETUNE_ASSET_SCHEDULE" in dag.doc_md and "aws_default" in dag.doc_md


def test_cron_or_the_default_models_snapshot_asset(dag):
    from airflow.sdk import AssetOrTimeSchedule

    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "0 0 * * 0"  # FINETUNE_SCHEDULE's default, @weekly
    [asset] = dag.timetable.asset_condition.objects
    assert (asset.name, asset.uri) == ("support-intents-snapshot", "x-finetune://snapshots/support-intents")


def load_finetune(monkeypatch, **env):
    from airflow.dag_processing.dagbag import BundleDagBag

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    return bag


def test_asset_schedule_can_be_switched_off_and_a_bad_switch_fails_the_import(monkeypatch):
    dag = load_finetune(monkeypatch, FINETUNE_ASSET_SCHEDULE="false", FINETUNE_SCHEDULE="0 3 * * 1").dags["finetune"]
    assert dag.timetable.expression == "0 3 * * 1"
    bag = load_finetune(monkeypatch, FINETUNE_ASSET_SCHEDULE="sometimes")
    assert "FINETUNE_ASSET_SCHEDULE: expected true or false, got 'sometimes'" in next(iter(bag.import_errors.values()))


def test_params_have_type_bounds_default_and_description(dag):
    expected = {
        "source",
        "model_name",
        "task",
        "base_model",
        "epochs",
        "learning_rate",
        "batch_size",
        "zero_stage",
        "num_processes",
        "trainer_args",
        "promote",
        "overrides",
    }
    assert set(dag.params) == expected
    for name in expected:
        param = dag.params.get_param(name)
        assert param.schema.get("type") and param.description, name
    assert dag.params.get_param("epochs").schema["minimum"] == 1
    assert dag.params.get_param("zero_stage").schema["enum"] == [0, 1, 2, 3]
    assert dag.params.get_param("task").schema["enum"] == ["sequence-classification", "causal-lm", "preference"]
    assert dag.params.get_param("task").resolve("preference") == "preference"
    assert dag.params["source"] == ["pkg://pipeline/data/support_intents.jsonl"]
    # Off: a smoke run, registered as challenger only (evaluate.promote); on by default.
    assert dag.params.get_param("promote").schema["type"] == "boolean" and dag.params["promote"] is True
    assert dag.params.get_param("promote").resolve(False) is False


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", "fast"),
        ("epochs", 0),
        ("zero_stage", 5),
        ("task", "regression"),
        ("source", []),
        ("num_processes", 1.5),
        ("promote", "sometimes"),
    ],
)
def test_airflow_rejects_bad_params(dag, name, value):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


@pytest.mark.parametrize("dag_file", ["finetune.py", "collect.py"])
def test_parsing_imports_nothing_heavy(dag_file):
    # What parsing costs in time is measured by bench/orchestration.py (BENCHMARKS.md), not here: a
    # wall-clock bar in a test fails on a busy machine. What makes parsing slow is tested instead.
    # The bundle folder on sys.path, as Airflow's DAG processor puts it, for `import finetune_tasks`.
    probe = (
        f"import sys, time, runpy, json; import airflow.sdk; sys.path.append({str(DAGS)!r}); t = time.perf_counter();"
        f"runpy.run_path({str(DAGS / dag_file)!r}); elapsed = time.perf_counter() - t;"
        f"print(json.dumps({{'elapsed': elapsed, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"parsing dags/{dag_file} imports {report['heavy']}"


def test_the_shared_task_module_is_not_parsed_as_a_dag_file(dagbag):
    assert set(dagbag.dag_ids) == {"finetune", "collect", "promote", "aliases"}
    assert not any(path.endswith("finetune_tasks.py") for path in dagbag.file_last_changed)


@pytest.mark.parametrize("override", ["evaluate.metric_direction=lower", "k8s.image=any/image:1"])
def test_a_refused_trigger_key_fails_the_run_before_any_step_does_work(dag, airflow_db, override, capfd):
    from pipeline import storage
    from pipeline.config import load_config

    run = dag.test(run_conf={"overrides": [override]})
    logged = "".join(capfd.readouterr())
    assert f"DAG run conf: '{override.partition('=')[0]}' may not be set by a trigger" in logged
    assert run.state == "failed"
    collect = run.get_task_instance("collect")
    assert collect.state == "failed" and collect.try_number == 1  # a verdict on the input: never retried
    root = storage.local_path(load_config().artifact_root)
    assert not (root / "snapshots").exists() and not (root / "runs").exists()


@pytest.mark.parametrize("dag_id", ["finetune", "collect", "promote"])
def test_every_param_of_the_trigger_form_has_a_title_and_a_description(dagbag, dag_id):
    params = dagbag.dags[dag_id].params
    for name in params:
        schema = params.get_param(name).schema
        assert schema.get("title") and schema["title"] != name and params.get_param(name).description, name
        assert schema.get("type"), name
