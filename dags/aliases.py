"""
### aliases: notice alias moves made outside the pipeline

Compares each alias of the registered model `model_name` (`champion`, `previous_champion` and
any other the promote DAG moved; not `challenger`, which `register` moves to each new version)
with the pipeline's promotion audit (the MLflow experiment `<model_name>-promotions`). An alias
someone moved or deleted in MLflow's UI or API without the pipeline fails the task (exit 3, not
retried), and its alert names the alias, the version it points at, where the audit left it and
the window in which it moved (from the last record or the last clean check to now). To put it
back, or to adopt the move, promote through the promote DAG, which audits it. `register` runs the
same check before it promotes.

Runs on `FINETUNE_ALIASES_SCHEDULE` (default `@hourly`, UTC; a tick more than 5 minutes in the past
when the DAG is unpaused is skipped, not run).
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import chain, dag
from finetune_alerts import deadline_alert
from finetune_tasks import DEFAULT_ARGS, run_deadline, step_params, step_task
from finetune_timetable import OnTimeCronTimetable

from pipeline.steps import dag_steps, launcher_from_env

LAUNCHER = launcher_from_env()  # read at parse time: it decides which operator each task is
SCHEDULE = OnTimeCronTimetable(os.environ.get("FINETUNE_ALIASES_SCHEDULE", "@hourly"), timezone="UTC")


@dag(
    dag_id="aliases",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["finetune", "mlops", "registry"],
    default_args=DEFAULT_ARGS,  # a finding (exit 3) fails at once; MLflow unreachable (75) is retried
    deadline=deadline_alert(run_deadline(dag_steps("aliases"))),
    params=step_params("aliases", overrides=False),
    doc_md=__doc__,
)
def aliases():
    chain(*(step_task(step, LAUNCHER) for step in dag_steps("aliases")))


aliases()
