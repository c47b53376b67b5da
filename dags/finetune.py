"""
### finetune: collect → validate → train → evaluate → register

Fine-tunes a pretrained transformer on a labelled text snapshot and registers it in MLflow.

| task | what it does | writes under `<artifact_root>/runs/<run_id>/` |
|---|---|---|
| `collect` | reads the `source` URIs into a content-addressed Parquet snapshot | `collect/` |
| `validate` | Great Expectations gate; a failure stops the run | `validate/` (Data Docs) |
| `train` | Hugging Face `Trainer` + DeepSpeed ZeRO over `num_processes` | `train/model/` |
| `evaluate` | accuracy, macro-F1, confusion matrix; compares with `champion` | `evaluate/` |
| `register` | MLflow model version, alias `challenger`, `champion` if it wins | `register/` |

Each task runs `finetune <step> --set ...` — the same argv a container would run — through the
launcher chosen by `FINETUNE_LAUNCHER` (default `local`). Data moves as URIs; XCom carries only
each step's small result JSON. Bad input fails the task without retries; crashes are retried.
Extra settings go in the `overrides` Param as `step.key=value` strings.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, chain, dag, task

from pipeline.config import param_schema
from pipeline.steps import PARAM_KEYS, PIPELINE, STEPS

SCHEDULE = os.environ.get("FINETUNE_SCHEDULE", "@weekly")

PARAMS = {name: Param(**param_schema(key), title=name) for name, key in PARAM_KEYS.items()}
PARAMS["overrides"] = Param([], type="array", items={"type": "string"}, title="overrides",
                            description="More config overrides as step.key=value, e.g. train.max_seq_len=128.")


def step_task(step: str):
    """One Airflow task per row of ``pipeline.steps.STEPS``, run by the configured launcher."""

    @task(task_id=step)
    def launch(**context):
        from airflow.exceptions import AirflowFailException

        from pipeline import steps
        from pipeline.config import safe_run_id
        from pipeline.errors import PipelineError

        upstream = {source: context["ti"].xcom_pull(task_ids=source)
                    for source, _ in STEPS[step].inputs.values()}
        try:
            overrides = steps.step_overrides(step, context["params"], upstream, safe_run_id(context["run_id"]))
            return steps.launch(step, overrides)
        except PipelineError as exc:
            if getattr(exc, "retryable", False):
                raise
            raise AirflowFailException(str(exc)) from exc  # bad input: retrying cannot help

    return launch()


@dag(
    dag_id="finetune",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["finetune", "mlops", "training"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "owner": "ml-platform"},
    params=PARAMS,
    doc_md=__doc__,
)
def finetune():
    chain(*(step_task(step) for step in PIPELINE))


finetune()
