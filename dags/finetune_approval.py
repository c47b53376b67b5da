"""The approval gate (``promote.require_approval``, the deployment's): between ``register`` and
``promote`` in the ``finetune`` DAG, a person approves or rejects the version register left as
``challenger`` before ``champion`` moves.

``ApprovalTask`` is Airflow's human-in-the-loop operator (``HITLOperator``) with two answers,
Approve and Reject, and a comment. It asks only when register's result says the version passed
its gate and is ``awaiting_approval`` (a refused gate or a smoke run skips it, and ``promote``
after it); its body is ``approval_body``, the evidence a reviewer needs, built from the run's
result JSONs (XCom) alone, so every launcher asks the same question. While it waits the task
holds no worker slot (Airflow 3.3 parks it ``awaiting_input``); the answer comes from the UI's
Required actions page or the REST API, only from ``promote.approvers`` when the deployment names
them, and no answer within ``promote.approval_timeout`` is Reject (the scheduler applies the
default). The connection ``finetune_alerts`` is told where to answer.

Its answer is the task's XCom (``decision``, ``answered_by``, ``comment``, ``timed_out``);
``approval_overrides`` turns it into the ``promote`` step's settings, so the move (or the recorded
refusal) runs as every other step does: a subprocess, or a pod under a cluster launcher. Not a
DAG file (``.airflowignore``); the task factory and the operators import it as ``finetune_approval``.

    python -c "import sys; sys.path.insert(0, 'dags'); import finetune_approval as a; print(a.approval_overrides({'decision': 'rejected', 'answered_by': 'ana', 'comment': 'too soon'}, {'version': '3'}, 60))"
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import BaseNotifier, Param
from airflow.sdk.exceptions import AirflowSkipException
from finetune_alerts import send_alert

from pipeline import steps
from pipeline.config import APPROVED, CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, REJECTED, is_challenge

APPROVAL_TASK = "approve"
APPROVE, REJECT = "Approve", "Reject"
TIMEOUT_USER = "airflow:approval_timeout"  # who "answered" when nobody did: the timeout's Reject
# Where the MLflow UI is, for the body's links (make up sets it); else an http(s) tracking URI.
MLFLOW_UI_VARIABLE = "FINETUNE_MLFLOW_UI_URL"

# The result fields the body and the promote task read (checked against each step's result dataclass).
REGISTER_KEYS = steps.result_keys(
    "register", "model_name", "version", "reason", "mlflow_run_id", "model_uri", "awaiting_approval", "drift"
)
EVALUATE_KEYS = steps.result_keys(
    "evaluate",
    "metrics",
    "champion_metrics",
    "champion_version",
    "gate_metric",
    "greater_is_better",
    "slices",
    "champion_slices",
    "baseline",
    "baseline_name",
    "reason",
)
VALIDATE_KEYS = steps.result_keys(
    "validate", "passed", "rows", "warnings", "data_docs_uri", "drift_report_uri", "summary_uri"
)


def mlflow_ui_url(environ: Mapping[str, str] | None = None) -> str:
    """The MLflow UI's root for links: ``FINETUNE_MLFLOW_UI_URL``, else the tracking URI when it
    is a server's (without any user or password in it), else ``""`` (the body then names the
    model version and run without a link)."""
    environ = os.environ if environ is None else environ
    url = environ.get(MLFLOW_UI_VARIABLE) or environ.get("MLFLOW_TRACKING_URI") or ""
    if not url.startswith(("http://", "https://")):
        return ""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _number(value: Any) -> str:
    return f"{float(value):.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _change(ours: Any, theirs: Any) -> str:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (ours, theirs)):
        return "-"
    return f"{float(ours) - float(theirs):+.4f}"


def _worse(ours: float, theirs: float, greater_is_better: bool) -> bool:
    return ours < theirs if greater_is_better else ours > theirs


def _metrics_section(registered: Mapping[str, Any], evaluated: Mapping[str, Any]) -> list[str]:
    version, champion = registered["version"], evaluated.get("champion_version") or ""
    metrics, theirs = evaluated.get("metrics") or {}, evaluated.get("champion_metrics") or {}
    if champion:
        heading = f"#### Metrics on the eval split: version {version} ({CHALLENGER}) vs version {champion} ({CHAMPION})"
        lines = [heading, "", f"| metric | version {version} | version {champion} | change |", "|---|---|---|---|"]
        lines += [
            f"| {name} | {_number(value)} | {_number(theirs.get(name))} | {_change(value, theirs.get(name))} |"
            for name, value in sorted(metrics.items())
        ]
        return lines
    baseline = evaluated.get("baseline") or {}
    named = evaluated.get("baseline_name") or "the baseline"
    lines = [
        f"#### Metrics on the eval split: version {version}; no {CHAMPION} yet, so against {named}",
        "",
        f"| metric | version {version} | {named} | change |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {_number(value)} | {_number(baseline.get(name))} | {_change(value, baseline.get(name))} |"
        for name, value in sorted(metrics.items())
    ]
    return lines


def _slices_section(evaluated: Mapping[str, Any]) -> list[str]:
    """The gate metric per slice beside the champion's, and which slices are worse than its."""
    slices, theirs = evaluated.get("slices") or {}, evaluated.get("champion_slices") or {}
    gate, greater = evaluated.get("gate_metric") or "", evaluated.get("greater_is_better", True) is not False
    rows, regressed = [], []
    for name, values in sorted(slices.items(), key=lambda item: (is_challenge(item[0]), item[0])):
        if gate not in values:
            continue
        ours, other = values[gate], (theirs.get(name) or {}).get(gate)
        worse = isinstance(other, int | float) and _worse(float(ours), float(other), greater)
        if worse:
            regressed.append(f"{name} ({_change(ours, other)})")
        mark = " **regressed**" if worse else ""
        rows.append(
            f"| {name} | {int(values.get('rows', 0))} | {_number(ours)} | {_number(other)} | {_change(ours, other)}{mark} |"
        )
    if not rows:
        return []
    lines = [f"#### By slice ({gate}; challenge slices are the hand-written set)", ""]
    lines += ["| slice | rows | this version | champion | change |", "|---|---|---|---|---|", *rows, ""]
    if regressed:
        lines.append(f"**Regressed against the {CHAMPION}:** {', '.join(regressed)}")
    elif theirs:
        lines.append(f"No slice regressed against the {CHAMPION}.")
    return lines


def _data_section(registered: Mapping[str, Any], validated: Mapping[str, Any]) -> list[str]:
    passed = "passed" if validated.get("passed") else "not passed"
    lines = ["#### Data", "", f"- Validation: {passed}, {validated.get('rows', '?')} rows"]
    lines += [f"  - warning: {warning}" for warning in validated.get("warnings") or []]
    drift = registered.get("drift") or []
    if not drift:
        lines.append("- Drift: no earlier accepted snapshot of this model to compare with")
        return lines
    lines += [
        "- Drift from the last accepted snapshot:",
        "",
        "| measure | of | value | bar | within |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m.get('check')} | {m.get('of')} | {_number(m.get('value'))} | {_number(m.get('max'))} | "
        f"{'yes' if m.get('passed') else '**no**'} |"
        for m in drift
    ]
    return lines


def _links_section(registered: Mapping[str, Any], validated: Mapping[str, Any], mlflow_ui: str) -> list[str]:
    model, version, run_id = registered["model_name"], registered["version"], registered.get("mlflow_run_id") or ""
    card = f"{model} version {version} (`{registered.get('model_uri') or f'models:/{model}/{version}'}`)"
    run = f"`{run_id}`"
    if mlflow_ui:
        card = f"[{card}]({mlflow_ui}/#/models/{quote(model)}/versions/{version})"
        run = f"[{run_id}]({mlflow_ui}/#/runs/{run_id})" if run_id else run
    lines = ["#### Links", "", f"- Model card: {card}", f"- MLflow run: {run}"]
    if validated.get("data_docs_uri"):
        lines.append(f"- Data Docs: `{validated['data_docs_uri']}/index.html`")
    if validated.get("drift_report_uri"):
        lines.append(f"- Drift report: `{validated['drift_report_uri']}`")
    return lines


def approval_body(
    registered: Mapping[str, Any],
    evaluated: Mapping[str, Any],
    validated: Mapping[str, Any],
    mlflow_ui: str = "",
    timeout: timedelta | None = None,
) -> str:
    """The approval's body, as markdown: the version's metrics beside the champion's (or the
    baseline a first champion must beat), the gate metric per slice with any slice that regressed,
    validation and drift from the last accepted data, links to the model card, the MLflow run and
    Data Docs, and what each answer does. From register's, evaluate's and validate's result JSONs."""
    version, champion = registered["version"], evaluated.get("champion_version") or ""
    if champion:
        approve = f"version {version} becomes {CHAMPION}; version {champion} keeps {PREVIOUS_CHAMPION}"
    else:
        approve = f"version {version} becomes the first {CHAMPION}"
    waits = f"; no answer within {_duration(timeout)} is Reject" if timeout else ""
    parts = [
        f"**{registered['model_name']} version {version}** passed its promotion gate: {evaluated.get('reason', '')}",
        "",
        *_metrics_section(registered, evaluated),
        "",
        *_slices_section(evaluated),
        "",
        *_data_section(registered, validated),
        "",
        *_links_section(registered, validated, mlflow_ui),
        "",
        f"**Approve**: {approve}, under the registry lock, audited with your name and comment. "
        f"**Reject**: version {version} stays {CHALLENGER}, the {CHAMPION} is untouched, and the refusal "
        f"is audited{waits}.",
    ]
    text = "\n".join(parts)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text + "\n"


def _duration(timeout: timedelta) -> str:
    seconds = int(timeout.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 and seconds >= 60 else f"{seconds} s"


def approval_overrides(answer: Mapping[str, Any], registered: Mapping[str, Any], timeout_s: int) -> list[str]:
    """The ``promote`` step's settings from the approval's ``answer`` (its task's XCom) and
    register's result: the version, ``champion``, who answered and why, and the answer. Never
    forced: an approval is held to evaluate's head-to-head, as register's own promotion is."""
    decision = answer["decision"]
    who = answer.get("answered_by") or TIMEOUT_USER
    comment = str(answer.get("comment") or "").strip()
    if answer.get("timed_out"):
        reason = f"no answer within {timeout_s} s (promote.approval_timeout): Reject"
    else:
        reason = comment or (f"approved by {who}" if decision == APPROVED else "")
    return [
        f"promote.version={json.dumps(str(registered['version']))}",
        f"promote.target_alias={CHAMPION}",
        f"promote.requested_by={json.dumps(who)}",
        f"promote.reason={json.dumps(reason)}",
        "promote.force=false",
        f"promote.approval={decision}",
    ]


def required_actions_link(context: Any) -> str:
    """The Required actions page of this task instance, or why there is none (no ``api.base_url``)."""
    try:
        return HITLOperator.generate_link_to_ui_from_context(context=context)
    except ValueError as exc:
        return f"(no link: {exc}; set [api] base_url)"


class ApprovalAsked(BaseNotifier):
    """Tells the connection ``finetune_alerts`` that an approval waits, with the link to answer it."""

    def notify(self, context: Any) -> None:
        try:
            task, ti = context["task"], context["ti"]
            registered = ti.xcom_pull(task_ids="register") or {}
            deadline = task.hitl_summary_extra.get("timeout_datetime") or "no deadline"
            who = ", ".join(user["name"] for user in task.assigned_users or []) or "anyone allowed on the DAG"
            send_alert(
                f"finetune-pipeline: approval needed: {registered.get('model_name')} version "
                f"{registered.get('version')} passed its gate and waits for a person before it becomes "
                f"{CHAMPION} (DAG `{ti.dag_id}`, run `{ti.run_id}`). Answer at {required_actions_link(context)} "
                f"(who may: {who}; no answer by {deadline} is Reject)"
            )
        except Exception as exc:  # an alert must never change the outcome of what it reports
            self.log.warning("alert: the approval request was not sent: %s", exc)


COMMENT = Param(
    "",
    type="string",
    title="Comment",
    description="Why: recorded as the reason of the promotion, or of the refusal.",
    source="task",
)


class ApprovalTask(HITLOperator):
    """Ask a person whether the version ``register`` left as ``challenger`` becomes ``champion``.

    Asks only when register's result is ``awaiting_approval`` (its gate passed with
    ``promote.require_approval`` on); otherwise the task and ``promote`` after it are skipped.
    The subject and body are built when it runs, from the run's result JSONs (``approval_body``).
    Two answers, Approve and Reject, and an optional comment; Reject is also the answer when the
    timeout passes. The task succeeds whatever the answer: a refusal is a decision, recorded by
    the ``promote`` task after it, not a failure.

    :param approvers: the Airflow user ids who may answer (``promote.approvers``); empty: anyone
        the auth manager lets act on the DAG.
    :param timeout: how long it waits for an answer (``promote.approval_timeout``).
    :param kwargs: ``BaseOperator``'s (``task_id``, callbacks, ...).
    """

    def __init__(self, *, approvers: Sequence[str], timeout: timedelta, **kwargs: Any) -> None:
        # The form's one field. Airflow hands every task its DAG's Params too: none of them is asked.
        kwargs.pop("params", None)
        params = {"comment": COMMENT}
        super().__init__(
            subject="Promote the challenger to champion?",
            options=[APPROVE, REJECT],
            defaults=[REJECT],  # what a timeout answers: never Approve
            multiple=False,
            params=params,
            assigned_users=[{"id": user, "name": user} for user in approvers] or None,
            response_timeout=timeout,
            notifiers=[ApprovalAsked()],
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        ti = context["ti"]
        registered = ti.xcom_pull(task_ids="register") or {}
        if not registered.get("awaiting_approval"):
            raise AirflowSkipException(
                f"register did not leave version {registered.get('version')} awaiting approval "
                "(its gate refused it, or promotion was off): nobody is asked, champion unchanged"
            )
        evaluated, validated = ti.xcom_pull(task_ids="evaluate") or {}, ti.xcom_pull(task_ids="validate") or {}
        self.subject = f"Promote {registered['model_name']} version {registered['version']} to {CHAMPION}?"
        self.body = approval_body(registered, evaluated, validated, mlflow_ui_url(), self.response_timeout)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        answer = super().execute_complete(context=context, event=event)
        registered = context["ti"].xcom_pull(task_ids="register") or {}
        user = answer.get("responded_by_user") or {}
        decision = APPROVED if answer["chosen_options"] == [APPROVE] else REJECTED
        result = {
            "decision": decision,
            "answered_by": str(user.get("name") or ""),
            "comment": str((answer.get("params_input") or {}).get("comment") or ""),
            "timed_out": bool(event.get("timedout")) and not user,
            "responded_at": str(getattr(answer.get("responded_at"), "isoformat", lambda: "")()),
            "model_name": registered.get("model_name", ""),
            "version": str(registered.get("version", "")),
        }
        by = "the timeout" if result["timed_out"] else result["answered_by"]
        self.log.info("approval: %s by %s: %s", decision, by, result["comment"] or "(no comment)")
        return result
