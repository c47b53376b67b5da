"""The model registry's aliases, moved safely under the registry lock: resolving a version or
alias, the promotion verdict and one audit record per attempt. Behind the ``promote`` step (manual
promote and roll-back) and the automatic promotion at the end of ``register``.

Every move happens under the registry lock (``pipeline/lock.py``: a lease per generation of a
registered model, renewed while held, checked before each write).

Inside the lock an attempt re-reads the champion and refuses a version that did not pass its gate
(unless forced, with a reason). ``register`` promotes on evaluate's one verdict, recorded on the
version (``finetune.gate``: both scored on the same snapshot, its sha256, the champion compared
against, margin and direction), refused only when the champion is no longer that version. A manual
promote compares the versions' recorded gate metrics. The old champion keeps ``previous_champion``;
the alias is re-read after the write. An attempt that lost its lease ends its audit run FAILED with
``promotion.outcome=lost``. Roll-back = promote ``previous_champion`` with force.

    python -c "from pipeline import registry, tracking; \\
        print(registry.resolve_version(tracking.client(), 'support-intents', 'champion'))"

mlflow is imported inside the functions that use it: the module is on the DAG-parse path
through the steps.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION
from pipeline.errors import ConfigError, ModelError, PipelineError
from pipeline.lock import LOCK_TTL_S, LOCK_WAIT_S, SYSTEM_CLOCK, Clock, Lease, LockLost, registry_lock


@dataclass(frozen=True)
class AliasMove:
    """One alias moved, as the step that moved it reports it (an alias event is sent for each)."""

    alias: str
    version: str
    previous_version: str  # "" when the alias was new
    why: str
    metrics: dict[str, float] = field(default_factory=dict)  # the gate metrics recorded on ``version``
    audit_run_id: str = ""  # the promotion audit run; "" for register's challenger, which has none
    at: str = ""


@dataclass(frozen=True)
class Promotion:
    """One attempt to move an alias, as audited: promoted, unchanged or refused, and why."""

    model_name: str
    version: str
    target_alias: str
    outcome: str  # promoted | unchanged | refused
    reason: str
    previous_version: str
    audit_run_id: str
    requested_by: str = ""
    gate: dict[str, Any] = field(default_factory=dict)  # the version's gate verdict (``gate_summary``)
    mlflow_run_id: str = ""  # the MLflow run the version was logged from
    alias_moves: list[AliasMove] = field(default_factory=list)  # empty unless promoted


def _move(tracker: Any, lease: Lease, model_name: str, alias: str, version: str, current_version: str | None) -> None:
    """Move ``alias`` to ``version`` (the old champion keeps ``previous_champion``), each write
    behind a lease check, then read the alias back."""
    if alias == CHAMPION and current_version is not None:
        lease.check()
        tracker.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, current_version)
    lease.check()
    tracker.set_registered_model_alias(model_name, alias, version)
    written = str(tracker.get_registered_model(model_name).aliases.get(alias))
    if written != version:  # only possible if something wrote around the lock
        raise PipelineError(f"{alias} reads version {written} right after moving it to {version}")


def resolve_version(tracker: Any, model_name: str, ref: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not ref:
        raise ConfigError("promote.version is required (a version number or an alias)")
    try:
        if ref.isdigit():
            return tracker.get_model_version(model_name, ref)
        return tracker.get_model_version_by_alias(model_name, ref)
    except MlflowException as exc:
        kind = "version" if ref.isdigit() else "alias"
        raise ModelError(f"{model_name}: {kind} '{ref}' does not exist ({exc.message})") from exc


def _gate(version: Any) -> dict[str, Any]:
    """evaluate's verdict as register recorded it on ``version`` (``finetune.gate``)."""
    return dict(json.loads(version.tags.get("finetune.gate", "{}")))


def _metric(version: Any) -> tuple[str, bool, float | None]:
    gate = _gate(version)
    name = gate.get("gate_metric") or "accuracy"
    value = version.tags.get(f"metric.{name}")
    return name, gate.get("greater_is_better", True) is not False, float(value) if value is not None else None


def recorded_metrics(version: Any) -> dict[str, float]:
    """The metrics register recorded on ``version`` (its ``metric.*`` tags)."""
    return {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}


def gate_summary(version: Any, forced: bool) -> dict[str, Any]:
    """``version``'s gate verdict as an alias event carries it: passed, on which metric, why."""
    gate = _gate(version)
    return {
        "passed": version.tags.get("finetune.gate_passed") == "true",
        "metric": gate.get("gate_metric") or "accuracy",
        "reason": str(gate.get("reason") or ""),
        "forced": forced,
    }


def _compared(candidate: Any, current: Any) -> str | None:
    """A manual promote's verdict from the versions' recorded gate metrics; None when better."""
    name, greater_is_better, ours = _metric(candidate)
    _, _, theirs = _metric(current)
    if ours is None or theirs is None:
        return f"{name} is not recorded on version {candidate.version if ours is None else current.version}"
    if not (ours > theirs if greater_is_better else ours < theirs):
        return (
            f"{name} {ours:.4f} of version {candidate.version} is not better than champion "
            f"version {current.version} ({theirs:.4f})"
        )
    return None


def _head_to_head(candidate: Any, current_version: str | None, alias: str, expected_current: str) -> str | None:
    """register's verdict: evaluate's, which scored both versions on the same data; refused only
    when ``alias`` is no longer the version evaluate compared against (not retryable: a retry
    would promote on a comparison with a version that is not the champion; evaluate again)."""
    version = str(candidate.version)
    recorded = str(_gate(candidate).get("champion_version") or "")
    if recorded != expected_current:
        return (
            f"version {version} records evaluate's comparison with version {recorded or '(none)'}, "
            f"not {expected_current or '(none)'}"
        )
    if (current_version or "") != expected_current:
        return (
            f"{alias} is version {current_version or '(none)'} now, not version {expected_current or '(none)'} "
            f"that evaluate compared version {version} against; not retried: evaluate version {version} "
            f"against the new {alias} (a new pipeline run), or promote it with force and a reason"
        )
    return None


def _verdict(
    candidate: Any, current: Any | None, current_version: str | None, alias: str, force: bool, expected: str | None
) -> str | None:
    """Why ``candidate`` may not take ``alias`` from ``current``; None when it may. With
    ``expected`` (register): evaluate's head-to-head stands, unless the alias moved since."""
    if expected is not None:
        refusal = _head_to_head(candidate, current_version, alias, expected)
        if refusal is not None:
            return refusal
    if force:
        return None
    if candidate.tags.get("finetune.gate_passed") != "true":
        return f"version {candidate.version} did not pass its promotion gate"
    if alias != CHAMPION or current is None or expected is not None:
        return None
    return _compared(candidate, current)


def _audit(tracker: Any, model_name: str, record: dict[str, Any]) -> str:
    """One MLflow run per attempt in the experiment '<model>-promotions': who, when, why, what.
    Left running while the outcome is "promoting", so an attempt that died midway shows as one."""
    from mlflow.exceptions import MlflowException

    name = f"{model_name}-promotions"
    experiment = tracker.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = tracker.create_experiment(name)
        except MlflowException:  # created by a concurrent attempt
            experiment_id = tracker.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    run = tracker.create_run(
        experiment_id, run_name=_audit_name(record), tags={f"promotion.{k}": str(v) for k, v in record.items()}
    )
    if record["outcome"] != "promoting":
        tracker.set_terminated(run.info.run_id)
    return run.info.run_id


def _audit_name(record: dict[str, Any]) -> str:
    return f"{record['outcome']} v{record['version']} -> {record['alias']}"


def _audit_lost(tracker: Any, run_id: str, record: dict[str, Any], lost: LockLost) -> None:
    """End the audit run of an attempt that lost its lease: FAILED, ``promotion.outcome=lost``."""
    record["outcome"] = "lost"
    try:
        tracker.set_tag(run_id, "promotion.outcome", "lost")
        tracker.set_tag(run_id, "promotion.why", str(lost))
        tracker.update_run(run_id, status="FAILED", name=_audit_name(record))
    except Exception as exc:  # the server is away: the run then shows as begun, never finished
        print(f"promote: could not record the lost attempt on audit run {run_id}: {exc}", file=sys.stderr)


def _outcome(
    candidate: Any,
    current: Any | None,
    current_version: str | None,
    alias: str,
    reason: str,
    force: bool,
    expected_current: str | None,
) -> tuple[str, str]:
    """What an attempt does, decided from what it read under the lock: ``unchanged`` when the
    version already holds ``alias``, ``refused`` (the verdict, or the alias moved since the caller
    compared against it), else ``promoting``; and why."""
    version = str(candidate.version)
    refusal = _verdict(candidate, current, current_version, alias, force, expected_current)
    if current_version == version:
        return "unchanged", f"version {version} already holds {alias}"
    if refusal is not None:
        return "refused", refusal
    why = reason or "passed the gate"
    if expected_current is not None:
        sha = str(_gate(candidate).get("snapshot_sha256") or "unknown")[:12]
        why += f" (evaluate's head-to-head with version {expected_current or '(none)'} on snapshot {sha})"
    return "promoting", why


def _carry_out(tracker: Any, lease: Lease, candidate: Any, record: dict[str, Any], audit_run_id: str) -> str:
    """Under the lease: move the alias when the outcome is "promoting" and complete the audit run;
    tag the version with the record; the final outcome."""
    model_name, alias, version = record["model"], record["alias"], record["version"]
    if record["outcome"] == "promoting":
        _move(tracker, lease, model_name, alias, version, record["previous_version"] or None)
        record["outcome"] = "promoted"
        tracker.set_tag(audit_run_id, "promotion.outcome", "promoted")
        tracker.update_run(audit_run_id, status="FINISHED", name=_audit_name(record))
    tagged = f"finetune.promoted_to.{alias}"
    if record["outcome"] == "promoted" or (record["outcome"] == "unchanged" and tagged not in candidate.tags):
        lease.check()  # "unchanged" and untagged: an earlier attempt died after the move
        tracker.set_model_version_tag(model_name, version, tagged, json.dumps(record))
    return str(record["outcome"])


def attempt(
    tracker: Any,
    model_name: str,
    ref: str,
    alias: str,
    *,
    requested_by: str,
    reason: str,
    force: bool = False,
    expected_current: str | None = None,
    ttl_s: float = LOCK_TTL_S,
    wait_s: float = LOCK_WAIT_S,
    clock: Clock = SYSTEM_CLOCK,
) -> Promotion:
    """Move ``alias`` to the version ``ref`` names, under the registry lock; audit every attempt.

    ``expected_current``: the version the caller compared against (register passes the champion
    evaluate scored); evaluate's verdict then stands, and if the alias has moved since, the
    attempt is refused rather than guessed. The audit record is written before any alias moves
    (as "promoting") and completed after (lost, if it lost its lease), so an attempt that dies
    midway still left its record."""
    candidate = resolve_version(tracker, model_name, ref)
    version = str(candidate.version)
    with registry_lock(tracker, model_name, requested_by or "unknown", ttl_s, wait_s, clock) as lease:
        before = {name: str(held) for name, held in tracker.get_registered_model(model_name).aliases.items()}
        current_version = before.get(alias)
        current = tracker.get_model_version(model_name, current_version) if current_version else None
        outcome, why = _outcome(candidate, current, current_version, alias, reason, force, expected_current)
        record = {
            "model": model_name,
            "version": version,
            "alias": alias,
            "outcome": outcome,
            "why": why,
            "reason": reason,
            "forced": force,
            "requested_by": requested_by or "unknown",
            "previous_version": current_version or "",
            "at": clock.stamp(),
        }
        audit_run_id = _audit(tracker, model_name, record)
        try:
            outcome = _carry_out(tracker, lease, candidate, record, audit_run_id)
        except LockLost as lost:
            _audit_lost(tracker, audit_run_id, record, lost)
            raise
    print(f"promote: {model_name} v{version} -> {alias}: {outcome}: {why}", file=sys.stderr)
    return Promotion(
        model_name=model_name,
        version=version,
        target_alias=alias,
        outcome=outcome,
        reason=why,
        previous_version=current_version or "",
        audit_run_id=audit_run_id,
        requested_by=requested_by or "unknown",
        gate=gate_summary(candidate, force),
        mlflow_run_id=str(candidate.run_id or ""),
        alias_moves=_moves(candidate, current, before, record, audit_run_id) if outcome == "promoted" else [],
    )


def _moves(
    candidate: Any, current: Any | None, before: dict[str, str], record: dict[str, Any], audit_run_id: str
) -> list[AliasMove]:
    """The aliases a promoted attempt moved, in the order ``_move`` wrote them."""
    alias, version, why, at = record["alias"], record["version"], record["why"], record["at"]
    moves: list[AliasMove] = []
    held = str(current.version) if current is not None else ""
    if alias == CHAMPION and held and before.get(PREVIOUS_CHAMPION) != held:
        kept = f"version {held} was {CHAMPION} until version {version} took it: {why}"
        previous = before.get(PREVIOUS_CHAMPION, "")
        moves.append(AliasMove(PREVIOUS_CHAMPION, held, previous, kept, recorded_metrics(current), audit_run_id, at))
    previous = record["previous_version"]
    moves.append(AliasMove(alias, version, previous, why, recorded_metrics(candidate), audit_run_id, at))
    return moves


# --- the approval gate --------------------------------------------------------------------------

REFUSED_TAG = "finetune.approval_refused."  # + alias: version tag, the refusal's audit record


def compared_against(tracker: Any, model_name: str, ref: str) -> str:
    """The champion evaluate scored the version ``ref`` names against (``""``: none), as register
    recorded it: what an approved promotion holds the champion to, as register's own would."""
    return str(_gate(resolve_version(tracker, model_name, ref)).get("champion_version") or "")


def refuse(
    tracker: Any,
    model_name: str,
    ref: str,
    alias: str,
    *,
    requested_by: str,
    reason: str,
    ttl_s: float = LOCK_TTL_S,
    wait_s: float = LOCK_WAIT_S,
    clock: Clock = SYSTEM_CLOCK,
) -> Promotion:
    """Record that a person (or the approval's timeout) refused the version ``ref`` names
    ``alias``: one audit record, "refused by <requested_by>: <reason>", written under the registry
    lock beside the champion it leaves where it is; no alias moves. The version is tagged with the
    record, so a retry returns it instead of writing a second."""
    candidate = resolve_version(tracker, model_name, ref)
    version, tagged = str(candidate.version), f"{REFUSED_TAG}{alias}"
    who = requested_by or "unknown"
    with registry_lock(tracker, model_name, who, ttl_s, wait_s, clock) as lease:
        current_version = str(tracker.get_registered_model(model_name).aliases.get(alias) or "")
        earlier = json.loads(candidate.tags[tagged]) if tagged in candidate.tags else None
        record = earlier or {
            "model": model_name,
            "version": version,
            "alias": alias,
            "outcome": "refused",
            "why": f"refused by {who}: {reason or '(no comment)'}",
            "reason": reason,
            "forced": False,
            "requested_by": who,
            "previous_version": current_version,
            "at": clock.stamp(),
        }
        if earlier is None:
            record["audit_run_id"] = _audit(tracker, model_name, record)
            lease.check()
            tracker.set_model_version_tag(model_name, version, tagged, json.dumps(record))
    print(f"promote: {model_name} v{version} -> {alias}: refused: {record['why']}", file=sys.stderr)
    return Promotion(
        model_name=model_name,
        version=version,
        target_alias=alias,
        outcome="refused",
        reason=record["why"],
        previous_version=record["previous_version"],
        audit_run_id=record["audit_run_id"],
        requested_by=record["requested_by"],
        gate=gate_summary(candidate, forced=False),
        mlflow_run_id=str(candidate.run_id or ""),
    )


# --- alias moves made outside the pipeline ------------------------------------------------------

CHECKED_TAG = "finetune.aliases.checked_at"  # registered-model tag: when the aliases last matched the audit


@dataclass(frozen=True)
class OutsideMove:
    """An alias that is not where the pipeline's audit records left it: someone moved (or
    deleted) it in MLflow's UI or API without the pipeline, between ``since`` and ``noticed``."""

    alias: str
    version: str  # where it points now; "" when deleted
    expected: list[str]  # where the audit records leave it ("" for no alias)
    record: str  # the audit record it was compared with
    since: str
    noticed: str

    def __str__(self) -> str:
        now = f"version {self.version}" if self.version else "deleted"
        wanted = " or ".join(f"version {v}" if v else "absent" for v in self.expected)
        return (
            f"{self.alias} is {now}, but the pipeline's audit leaves it {wanted} ({self.record}): moved outside "
            f"the pipeline (MLflow's UI or API) between {self.since} and {self.noticed}"
        )


def _audit_records(tracker: Any, model_name: str) -> list[dict[str, str]]:
    """The promotion audit records of ``model_name`` that say where an alias is: promoted,
    unchanged (found it there, under the lock: how a move made outside is adopted) or promoting
    (in flight or died midway), newest first, with their audit run id."""
    experiment = tracker.get_experiment_by_name(f"{model_name}-promotions")
    if experiment is None:
        return []
    records, token = [], None
    while True:  # every page: a registry promoted for years has many records
        page = tracker.search_runs(
            [experiment.experiment_id],
            order_by=["attributes.start_time DESC"],
            max_results=1000,
            page_token=token,
        )
        for run in page:
            tags = {k.removeprefix("promotion."): v for k, v in run.data.tags.items() if k.startswith("promotion.")}
            if tags.get("outcome") in ("promoted", "promoting", "unchanged"):
                records.append({**tags, "run_id": run.info.run_id})
        token = page.token
        if not token:
            return records


def _expected(records: list[dict[str, str]], alias: str) -> tuple[list[str], dict[str, str] | None]:
    """Where the newest record that moved ``alias`` leaves it (both ends while that record is
    still promoting), and that record; ``previous_champion`` follows the champion's moves."""
    if alias == PREVIOUS_CHAMPION:  # moved only with the champion: "unchanged" leaves it where it was
        newest = next((r for r in records if r.get("alias") == CHAMPION and r.get("outcome") != "unchanged"), None)
    else:
        newest = next((r for r in records if r.get("alias") == alias), None)
    if newest is None:
        return [""], None
    if alias == PREVIOUS_CHAMPION:
        if newest.get("outcome") == "promoting":  # in flight: either, or whatever it was before
            return [], newest
        return [newest.get("previous_version", "")], newest
    if newest.get("outcome") == "promoting":
        return [newest.get("version", ""), newest.get("previous_version", "")], newest
    return [newest.get("version", "")], newest


def outside_moves(tracker: Any, model_name: str, clock: Clock = SYSTEM_CLOCK) -> list[OutsideMove]:
    """Each alias of ``model_name`` (but ``challenger``, which register moves to each new version
    unaudited) that is not where the pipeline's promotion audit leaves it. With none, the
    registered model is tagged ``finetune.aliases.checked_at``, which bounds the next finding's window."""
    model = tracker.get_registered_model(model_name)
    current = {alias: str(version) for alias, version in model.aliases.items()}
    records = _audit_records(tracker, model_name)
    audited = {r.get("alias", "") for r in records} | ({PREVIOUS_CHAMPION} if records else set())
    noticed = clock.stamp()
    moves = []
    for alias in sorted((set(current) | audited | {CHAMPION}) - {CHALLENGER, ""}):
        expected, record = _expected(records, alias)
        if not expected or current.get(alias, "") in expected:
            continue
        at = record.get("at", "") if record else ""
        checked = model.tags.get(CHECKED_TAG, "")
        since = max(at, checked) or "the registered model's creation"
        described = (
            f"{record.get('outcome')} by {record.get('requested_by', 'unknown')} at {at}, audit run {record['run_id']}"
            if record
            else "no audit record: the pipeline never moved it"
        )
        moves.append(OutsideMove(alias, current.get(alias, ""), expected, described, since, noticed))
    if not moves:
        tracker.set_registered_model_tag(model_name, CHECKED_TAG, noticed)
    return moves
