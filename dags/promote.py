"""
### promote: move a registered model version to an alias — promote or roll back

Trigger it from the Airflow UI. `version` is a version number or an alias to resolve
(`challenger`, `previous_champion`). The move runs under the registry lock and re-reads the
champion first: a version that did not pass its promotion gate, or is not better than the
current champion on the gate metric, is refused unless `force` is set, and `force` needs a
`reason`. Every attempt, refused or not, is recorded (who, when, why) as a run in the MLflow
experiment `<model_name>-promotions`.

**Roll back**: `version=previous_champion`, `force=true`, `reason=<why>`.
"""

from __future__ import annotations

import json

import pendulum
from airflow.sdk import Param, dag, task

from pipeline.config import param_schema
from pipeline.promote import ALIAS_PATTERN

PARAMS = {
    "model_name": Param(**param_schema("model_name"), title="model_name"),
    "version": Param("challenger", type="string", minLength=1, title="version",
                     description="Version number, or an alias to resolve: challenger, previous_champion, ..."),
    "target_alias": Param("champion", type="string", pattern=f"^{ALIAS_PATTERN}$", title="target_alias",
                          description="The alias to move (letters, digits, _ and -)."),
    "reason": Param("", type="string", title="reason", description="Why; recorded; required with force."),
    "force": Param(False, type="boolean", title="force",
                   description="Override the gate and the champion comparison (needs a reason)."),
}


@dag(
    dag_id="promote",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one promotion at a time from Airflow; the registry lock covers the rest
    tags=["finetune", "mlops", "registry"],
    default_args={"retries": 0, "owner": "ml-platform"},
    params=PARAMS,
    doc_md=__doc__,
)
def promote():
    @task(task_id="promote")
    def move_alias(**context):
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline import steps
        from pipeline.config import safe_run_id
        from pipeline.errors import PipelineError

        params = context["params"]
        user = getattr(context["dag_run"], "triggering_user_name", None) or "unknown"
        overrides = [f"model_name={json.dumps(params['model_name'])}",
                     f"promote.version={json.dumps(str(params['version']))}",
                     f"promote.target_alias={json.dumps(params['target_alias'])}",
                     f"promote.reason={json.dumps(params['reason'])}",
                     f"promote.force={json.dumps(params['force'])}",
                     f"promote.requested_by={json.dumps(user)}",
                     f"run_id={safe_run_id(context['run_id'])}"]
        try:
            return steps.launch("promote", overrides)
        except PipelineError as exc:  # a refused promotion is a verdict, not a flake: no retry
            raise AirflowFailException(str(exc)) from exc

    move_alias()


promote()
