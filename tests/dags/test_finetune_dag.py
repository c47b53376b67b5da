"""DAG integrity: it imports cleanly and fast, has the expected graph, Params and retries, and
Airflow itself rejects bad Params from the trigger form."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"
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
    assert all(task.retries == 2 for task in dag.tasks)
    assert "collect → validate → train → evaluate → register" in dag.doc_md
    assert dag.schedule == "@weekly"


def test_params_have_type_bounds_default_and_description(dag):
    expected = {"source", "task", "base_model", "epochs", "learning_rate", "batch_size", "zero_stage",
                "num_processes", "promotion_margin", "overrides"}
    assert set(dag.params) == expected
    for name in expected:
        param = dag.params.get_param(name)
        assert param.schema.get("type") and param.description, name
    assert dag.params.get_param("epochs").schema["minimum"] == 1
    assert dag.params.get_param("zero_stage").schema["enum"] == [0, 1, 2, 3]
    assert dag.params["source"] == ["pkg://pipeline/data/support_intents.jsonl"]


@pytest.mark.parametrize("name, value", [("learning_rate", "fast"), ("epochs", 0), ("zero_stage", 5),
                                         ("task", "regression"), ("source", []), ("num_processes", 1.5)])
def test_airflow_rejects_bad_params(dag, name, value):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_parsing_imports_nothing_heavy_and_is_fast():
    probe = (
        "import sys, time, runpy, json; import airflow.sdk; t = time.perf_counter();"
        f"runpy.run_path({str(DAGS / 'finetune.py')!r}); elapsed = time.perf_counter() - t;"
        f"print(json.dumps({{'elapsed': elapsed, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["elapsed"] < 1.0, f"parsing dags/finetune.py took {report['elapsed']:.2f}s"
