"""
### collect: publish a data snapshot; announce it when it is new → data-aware retraining

| task | what it does |
|---|---|
| `collect` | the finetune DAG's `collect` step (same task factory, same launcher): reads the `source` URIs into a content-addressed Parquet snapshot under `<artifact_root>/snapshots/<sha256>/` |
| `announce` | emits an event on the Asset `<model_name>-snapshot` (URI `x-finetune://snapshots/<model_name>`), extra `{"snapshot_uri", "sha256", "rows"}`, unless that sha256 is the one it last announced there |

Unchanged data publishes nothing new and emits no event, so nothing retrains. The `finetune` DAG
is scheduled on its default model's snapshot Asset as well as on its cron (see its docs): each
new snapshot starts a finetune run whose `collect` task reads that `snapshot_uri`.

Runs on `FINETUNE_COLLECT_SCHEDULE` (default `@daily`, UTC; a tick more than 5 minutes in the past
when the DAG is unpaused is skipped, not run). Under the `local` launcher the Airflow
connection `aws_default` (login, password, extra `aws_session_token`, `endpoint_url`,
`region_name`), looked up when the task runs, is handed to the step as the standard `AWS_*`
variables; without it the standard AWS chain applies. Announcements go through the Asset alias
`finetune-snapshots`, so the Asset follows the run's `model_name`; "last announced" means last
announced by this DAG (an outside producer's event on the same Asset does not count).
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import chain, dag
from finetune_alerts import deadline_alert
from finetune_tasks import ANNOUNCE_TIMEOUT, DEFAULT_ARGS, announce_task, run_deadline, step_params, step_task
from finetune_timetable import OnTimeCronTimetable

from pipeline.steps import launcher_from_env

LAUNCHER = launcher_from_env()  # read at parse time: it decides which operator each task is
# A tick already past when the DAG is unpaused is skipped, not run (plugins/finetune_timetable.py).
SCHEDULE = OnTimeCronTimetable(os.environ.get("FINETUNE_COLLECT_SCHEDULE", "@daily"), timezone="UTC")


@dag(
    dag_id="collect",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs on the same data would both see it as new
    tags=["finetune", "mlops", "data"],
    default_args=DEFAULT_ARGS,  # retried with back-off but for bad input, a failed gate, out of memory
    deadline=deadline_alert(run_deadline(["collect"], ANNOUNCE_TIMEOUT)),
    params=step_params("finetune", ["source", "model_name"]),
    doc_md=__doc__,
)
def collect():
    chain(step_task("collect", LAUNCHER), announce_task())


collect()
