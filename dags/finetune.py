"""
### finetune: collect → validate → train → evaluate → register

Fine-tunes a pretrained transformer and registers it in MLflow. The `task` Param picks the
family: `sequence-classification` (labelled text), `causal-lm` (instruction/chat data, the LLM
case: loss on assistant tokens, optional LoRA, perplexity gate) or `preference` (prompt/chosen/rejected
pairs: DPO with TRL on a chat model, optional LoRA, reward-accuracy gate).

| task | what it does | writes under `<artifact_root>/runs/<run_id>/` |
|---|---|---|
| `collect` | reads the `source` URIs into a content-addressed Parquet snapshot | `collect/` |
| `validate` | Great Expectations gate; a failure stops the run | `validate/` (Data Docs) |
| `train` | Hugging Face `Trainer` + DeepSpeed ZeRO over `num_processes` | `train/model/` |
| `evaluate` | accuracy/macro-F1, perplexity/ROUGE-L or reward accuracy (and the base model's); compares with `champion` | `evaluate/` |
| `register` | MLflow model version, alias `challenger`, `champion` if it wins | `register/` |

With no champion yet, "wins" means beating a model that learnt nothing on the same rows (the
majority class, or the base model for a causal LM). The `promote` Param off makes a smoke run:
the version is registered as `challenger` and `champion` never moves.

Each task runs `finetune <step> --set ...` — the same argv a container would run — through the
launcher chosen by `FINETUNE_LAUNCHER` (default `local`; `kubernetes`: a pod per step;
`pytorchjob` / `trainjob`: pods, and training as a multi-node Kubeflow PyTorchJob or Trainer v2 TrainJob).
Data moves as URIs; XCom carries only
each step's small result JSON. Bad input (exit 2), a failed gate (3) and out of memory (137) fail the
task without retries; transient faults (75: S3/HTTP 5xx, throttling, timeouts, MLflow unreachable),
crashes and a step past its `timeouts.<step>` are retried with exponential back-off.
Extra settings go in the `overrides` Param as `step.key=value` strings: only keys the deployment's
`trigger_keys` allow (data, task, model, training settings by default; never the promotion gate,
`k8s.*` or `artifact_root`). A refused key fails the run at `collect`, before any work. The form's
defaults are the deployment's config (`FINETUNE_CONFIG`); a Param left at its default sends nothing.

**When it runs.** On the cron schedule `FINETUNE_SCHEDULE` (default `@weekly`, UTC; a tick more
than 5 minutes in the past when the DAG is unpaused is skipped, not run) and, unless
`FINETUNE_ASSET_SCHEDULE=false`, also whenever the Asset `<model_name>-snapshot` (the default
`model_name` Param's) gets an event: the `collect` DAG emits one when it publishes a snapshot it
has not announced before, and any outside producer may too (the REST API's
`POST /api/v2/assets/events`, or a DAG with the Asset in its `outlets`). In a run triggered that
way, `collect` reads the `snapshot_uri` in the extra of the latest triggering event instead of the
`source` Param (re-collecting a published snapshot gives the same content-addressed snapshot);
an event without one collects the `source` Param.

**Timeouts and alerts.** Each task runs at most `timeouts.<step>` of the deployment's config
(`FINETUNE_CONFIG`; a trigger cannot lift it): the local launcher then stops every process of the
step, a pod gets it as `activeDeadlineSeconds`, and the task's `execution_timeout` backs both. A
task that fails for good, and (with `FINETUNE_DEADLINE_ALERTS=true`) a run still going after one
attempt of each task, sends a message to the webhook of the Airflow connection `finetune_alerts`;
so does a new champion. Each alias `register` moves (`challenger`, `champion`,
`previous_champion`) is also sent as a signed JSON event to the connection `finetune_events`
(docs/operations.md, "Alias events"). No such connection: nothing is sent.

**Approval.** With the deployment's `promote.require_approval` on, `register` sets `challenger`
only, and two tasks follow it: `approve` asks a person in Airflow's **Required actions** (the
evidence as its body; Approve or Reject, and a comment; only `promote.approvers` when the
deployment names them; no answer within `promote.approval_timeout`, 72 h by default, is Reject)
and `promote` then moves `champion` under the registry lock, requested by whoever approved, or
records their refusal; the run succeeds either way. A gate that refused the version (or the
`promote` Param off) skips both: nobody is asked (docs/operations.md, "Approval").

**Credentials.** Under the `local` launcher, an Airflow connection `aws_default`, looked up when
each task runs, supplies the step's `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN` (extra `aws_session_token`), `AWS_ENDPOINT_URL` (extra `endpoint_url`) and
`AWS_DEFAULT_REGION` (extra `region_name`); without it the standard AWS chain applies.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import AssetOrTimeSchedule, chain, dag
from finetune_alerts import deadline_alert
from finetune_operators import deployment_config
from finetune_tasks import (
    DEFAULT_ARGS,
    approval_task,
    approval_timeout,
    default_model_name,
    env_flag,
    run_deadline,
    snapshot_asset,
    step_params,
    step_task,
)
from finetune_timetable import OnTimeCronTimetable

from pipeline.steps import PIPELINE, launcher_from_env

LAUNCHER = launcher_from_env()  # read at parse time: it decides which operator each task is
# The deployment's approval gate, read at parse time too: on, register > approve > promote.
APPROVAL = deployment_config().promote.require_approval
CRON = os.environ.get("FINETUNE_SCHEDULE", "@weekly")
# A tick already past when the DAG is unpaused is skipped, not run (plugins/finetune_timetable.py).
CRON_TIMETABLE = OnTimeCronTimetable(CRON, timezone="UTC")
# On by default: without an unpaused collect DAG or another producer no event ever comes, and
# with one, retraining on new data is the point of scheduling on the Asset.
if env_flag("FINETUNE_ASSET_SCHEDULE", default=True):
    SCHEDULE = AssetOrTimeSchedule(timetable=CRON_TIMETABLE, assets=[snapshot_asset(default_model_name())])
else:
    SCHEDULE = CRON_TIMETABLE


@dag(
    dag_id="finetune",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["finetune", "mlops", "training"],
    default_args=DEFAULT_ARGS,  # retried with back-off but for bad input, a failed gate, out of memory
    # FINETUNE_DEADLINE_ALERTS: a run later than its steps' timeouts (and the approval's wait)
    deadline=deadline_alert(
        run_deadline((*PIPELINE, "promote"), approval_timeout()) if APPROVAL else run_deadline(PIPELINE)
    ),
    params=step_params("finetune"),
    doc_md=__doc__,
)
def finetune():
    if APPROVAL:  # champion moves when a person approves: the promote step, on the run's launcher
        chain(*(step_task(step, LAUNCHER) for step in PIPELINE), approval_task(), step_task("promote", LAUNCHER))
        return
    chain(*(step_task(step, LAUNCHER) for step in PIPELINE))


finetune()
