"""The model registry's aliases, moved safely: the registry lock, resolving a version or alias,
the promotion verdict and one audit record per attempt. Behind the ``promote`` step (manual
promote and roll-back) and the automatic promotion at the end of ``register``.

Safety: MLflow has no compare-and-set on aliases, so every attempt runs under a registry lock
-- a registered model named ``<model>.promotion-lock`` that only one client can create (the
tracking store's unique name constraint), deleted when done, broken after ``LOCK_TTL_S`` if its
holder died. Inside the lock an attempt re-reads the current champion, refuses a version that
did not pass its gate or is not better than the champion on the gate metric (unless forced,
which needs a reason), moves the alias, keeps the old champion as ``previous_champion`` and
re-reads the alias to check the write. Roll-back = promote ``previous_champion`` with force.

    python -c "from pipeline import registry, tracking; print(registry.resolve_version(tracking.client(), 'support-intents', 'champion'))"

mlflow is imported inside the functions that use it: the module is on the DAG-parse path
through the steps.
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.config import CHAMPION, PREVIOUS_CHAMPION
from pipeline.errors import ConfigError, ModelError, PipelineError

LOCK_TTL_S = 600  # a holder that has not released after this long is presumed dead
LOCK_WAIT_S = 300


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


@contextmanager
def registry_lock(tracker: Any, model_name: str, holder: str):
    """Mutual exclusion for alias moves on ``model_name`` across processes and machines."""
    from mlflow.exceptions import MlflowException

    lock = f"{model_name}.promotion-lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            tracker.create_registered_model(lock, tags={"holder": holder},
                                            description="Held while an alias of the model is being moved.")
            break
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # the server saw the name taken, then released, while creating: try again
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = tracker.get_registered_model(lock)
            if held.tags.get("holder") == holder:
                break  # our create went through but its response was lost and the client retried it
            if time.time() * 1000 - held.creation_timestamp > LOCK_TTL_S * 1000:
                print(f"promote: breaking stale lock held by {held.tags.get('holder')}", file=sys.stderr)
                tracker.delete_registered_model(lock)
                continue
        except MlflowException:
            continue  # released between our create and get: try again at once
        if time.monotonic() > deadline:
            raise PipelineError(f"registry lock {lock} still held after {LOCK_WAIT_S}s; "
                                f"if its holder died, delete the registered model '{lock}'")
        time.sleep(0.1 + random.random() * 0.3)
    try:
        yield
    finally:
        try:
            tracker.delete_registered_model(lock)
        except MlflowException as exc:
            # The HTTP client retries a DELETE whose response was lost; the retry finds it gone.
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


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


def _metric(version: Any) -> tuple[str, bool, float | None]:
    gate = json.loads(version.tags.get("finetune.gate", "{}"))
    name = gate.get("gate_metric") or "accuracy"
    value = version.tags.get(f"metric.{name}")
    return name, gate.get("greater_is_better", True) is not False, float(value) if value is not None else None


def _verdict(candidate: Any, current: Any | None, alias: str, force: bool) -> str | None:
    """Why ``candidate`` may not take ``alias`` from ``current``; None when it may."""
    if force:
        return None
    if candidate.tags.get("finetune.gate_passed") != "true":
        return f"version {candidate.version} did not pass its promotion gate"
    if alias != CHAMPION or current is None:
        return None
    name, greater_is_better, ours = _metric(candidate)
    _, _, theirs = _metric(current)
    if ours is None or theirs is None:
        return f"{name} is not recorded on version {candidate.version if ours is None else current.version}"
    if not (ours > theirs if greater_is_better else ours < theirs):
        return f"{name} {ours:.4f} of version {candidate.version} is not better than champion " \
               f"version {current.version} ({theirs:.4f})"
    return None


def _audit(tracker: Any, model_name: str, record: dict[str, Any]) -> str:
    """One MLflow run per attempt in the experiment '<model>-promotions': who, when, why, what."""
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
    run = tracker.create_run(experiment_id, run_name=f"{record['outcome']} v{record['version']} -> {record['alias']}",
                             tags={f"promotion.{k}": str(v) for k, v in record.items()})
    tracker.set_terminated(run.info.run_id)
    return run.info.run_id


def attempt(tracker: Any, model_name: str, ref: str, alias: str, *, requested_by: str, reason: str,
            force: bool = False, expected_current: str | None = None) -> Promotion:
    """Move ``alias`` to the version ``ref`` names, under the registry lock; audit every attempt.

    ``expected_current``: the version the caller compared against (register passes the champion
    evaluate scored); if the alias has moved since, the attempt is refused rather than guessed.
    """
    candidate = resolve_version(tracker, model_name, ref)
    version = str(candidate.version)
    holder = f"{requested_by or 'unknown'}:{uuid.uuid4().hex[:8]}"
    with registry_lock(tracker, model_name, holder):
        current_version = tracker.get_registered_model(model_name).aliases.get(alias)
        current_version = None if current_version is None else str(current_version)
        current = tracker.get_model_version(model_name, current_version) if current_version else None
        refusal = _verdict(candidate, current, alias, force)
        if refusal is None and expected_current is not None and (current_version or "") != expected_current:
            refusal = f"{alias} moved to version {current_version} since version {version} was evaluated"
        if current_version == version:
            outcome, why = "unchanged", f"version {version} already holds {alias}"
        elif refusal is not None:
            outcome, why = "refused", refusal
        else:
            if alias == CHAMPION and current_version is not None:
                tracker.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, current_version)
            tracker.set_registered_model_alias(model_name, alias, version)
            written = str(tracker.get_registered_model(model_name).aliases.get(alias))
            if written != version:  # only possible if something wrote around the lock
                raise PipelineError(f"{alias} reads version {written} right after moving it to {version}")
            outcome, why = "promoted", reason or "passed the gate"
        record = {"model": model_name, "version": version, "alias": alias, "outcome": outcome, "why": why,
                  "reason": reason, "forced": force, "requested_by": requested_by or "unknown",
                  "previous_version": current_version or "", "at": datetime.now(timezone.utc).isoformat()}
        audit_run_id = _audit(tracker, model_name, record)
        if outcome == "promoted":
            tracker.set_model_version_tag(model_name, version, f"finetune.promoted_to.{alias}", json.dumps(record))
    print(f"promote: {model_name} v{version} -> {alias}: {outcome}: {why}", file=sys.stderr)
    return Promotion(model_name=model_name, version=version, target_alias=alias, outcome=outcome, reason=why,
                         previous_version=current_version or "", audit_run_id=audit_run_id)
