"""
### promote: move a registered model version to an alias — promote or roll back

Trigger it from the Airflow UI. `version` is a version number or an alias to resolve
(`challenger`, `previous_champion`). The move runs under the registry lock and re-reads the
champion first: a version that did not pass its promotion gate, or is not better than the
current champion on the gate metric, is refused unless `force` is set, and `force` needs a
`reason`. Every attempt, refused or not, is recorded (who, when, why) as a run in the MLflow
experiment `<model_name>-promotions`.
Each alias it moves is sent as a signed JSON event to the Airflow connection `finetune_events`
(docs/operations.md, "Alias events"); an event that cannot be delivered is alerted, and the
move stands.

**Roll back**: `version=previous_champion`, `force=true`, `reason=<why>`.

Its task is built by the same factory as the `finetune` DAG's: under `FINETUNE_LAUNCHER=kubernetes`
or `pytorchjob` it runs as a pod. A refused promotion is a verdict and is not retried; a transient
fault (the registry lock wait ran out, MLflow unreachable) is, with back-off.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import chain, dag
from finetune_alerts import deadline_alert
from finetune_tasks import DEFAULT_ARGS, run_deadline, step_params, step_task

from pipeline.steps import dag_steps, launcher_from_env

LAUNCHER = launcher_from_env()  # read at parse time: it decides which operator each task is


@dag(
    dag_id="promote",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one promotion at a time from Airflow; the registry lock covers the rest
    tags=["finetune", "mlops", "registry"],
    # A refused promotion is a verdict, not a flake: it fails at once (exit 2). A transient fault
    # (exit 75: the registry lock wait ran out, MLflow unreachable) is retried with back-off; a
    # retry of a move that went through finds the version already holding the alias.
    # Shorter waits between tries than the other DAGs' (1 to 10 minutes, not 2 to 30).
    default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1), "max_retry_delay": timedelta(minutes=10)},
    deadline=deadline_alert(run_deadline(dag_steps("promote"))),
    params=step_params("promote", overrides=False, version={"default": "challenger", "minLength": 1}),
    doc_md=__doc__,
)
def promote():
    chain(*(step_task(step, LAUNCHER) for step in dag_steps("promote")))


promote()
