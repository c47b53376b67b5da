"""The model registry's aliases, moved safely: the registry lock, resolving a version or alias,
the promotion verdict and one audit record per attempt. Behind the ``promote`` step (manual
promote and roll-back) and the automatic promotion at the end of ``register``.

MLflow has no compare-and-set on aliases; the one atomic step it offers is creating a registered
model (the name is unique). The lock is built on that alone -- a lease per generation:

1. A lease is the registered model ``<model>.promotion-lock.<n>``, tagged with its holder's unique
   token; only the newest generation counts. Creating generation n+1 is the only way to take
   the lock, so of any number of contenders exactly one succeeds (the name is unique).
2. n+1 may be created only when generation n is released or was not renewed for its holder's
   ``ttl_s`` (a tag of the lease); the holder renews every ``ttl_s / 4`` while it holds the lock.
   Nothing is ever deleted to take the lock, so a contender can never remove a newer holder's lease.
3. Before every alias write the holder checks that its generation is still the newest, still
   carries its token and was renewed less than ``3/4 ttl_s`` ago; otherwise it stops (``LockLost``).
4. Release marks the holder's own generation released; it never touches another generation.
   Older generations are pruned by the next holder. Every wait sleeps with jittered back-off
   and ends at ``wait_s`` (default five TTLs) with ``RegistryBusy``, which launchers retry.
What is left: a holder frozen for longer than ``ttl_s / 4`` exactly between its check and its
write (milliseconds apart) could still write once; the alias is re-read after every move, and a
write around the lock fails the attempt loudly.

Inside the lock an attempt re-reads the current champion, refuses a version that did not pass its
gate or is not better than the champion on the gate metric (unless forced, which needs a
reason), moves the alias, keeps the old champion as ``previous_champion`` and re-reads the alias
to check the write. Roll-back = promote ``previous_champion`` with force.

    python -c "from pipeline import registry, tracking; \\
        print(registry.resolve_version(tracking.client(), 'support-intents', 'champion'))"

mlflow is imported inside the functions that use it: the module is on the DAG-parse path
through the steps.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import CHAMPION, PREVIOUS_CHAMPION
from pipeline.errors import ConfigError, ModelError, PipelineError, TransientError

LOCK_TTL_S = 60.0  # a lease not renewed for this long is presumed dead (its holder renews every TTL/4)
LOCK_WAIT_S = 300.0  # how long an attempt waits for the lock: five TTLs
MAX_BACKOFF_S = 2.0


class RegistryBusy(TransientError):
    """The registry lock was not free within the wait: try again later."""


class LockLost(TransientError):
    """This holder's lease was taken over (it stalled past the TTL); it must not write."""


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _lock_prefix(model_name: str) -> str:
    return f"{model_name}.promotion-lock."


def _generations(tracker: Any, model_name: str) -> list[int]:
    """The lock generations that exist for ``model_name``, oldest first."""
    prefix = _lock_prefix(model_name)
    # LIKE treats '_' as a wildcard: the names are filtered exactly below.
    found = tracker.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=1000)
    return sorted(
        int(m.name[len(prefix) :]) for m in found if m.name.startswith(prefix) and m.name[len(prefix) :].isdigit()
    )


def _lease_tags(tracker: Any, name: str) -> dict[str, str] | None:
    """The tags of the lock generation ``name``, or None when it no longer exists."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(tracker.get_registered_model(name).tags)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@dataclass
class Lease:
    """The lock, held: generation ``generation`` of ``model_name``'s lock, under ``token``."""

    tracker: Any
    model_name: str
    generation: int
    token: str
    ttl_s: float
    renewed: float = field(default_factory=time.monotonic)  # when this holder last renewed it
    lost: str = ""  # why the lease is no longer ours, once the renewer has seen it
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return f"{_lock_prefix(self.model_name)}{self.generation}"

    def check(self) -> None:
        """Raise ``LockLost`` unless this lease is certainly still the lock: call before each write."""
        if not self.lost and time.monotonic() - self.renewed > 0.75 * self.ttl_s:
            self.lost = f"not renewed for {time.monotonic() - self.renewed:.1f}s (the TTL is {self.ttl_s:g}s)"
        if not self.lost:
            self.lost = self._taken_over() or ""
        if self.lost:
            raise LockLost(
                f"registry lock {self.name} is no longer held by {self.token}: {self.lost}; "
                f"nothing was written after that"
            )

    def _taken_over(self) -> str | None:
        newest = _generations(self.tracker, self.model_name)
        if newest and newest[-1] != self.generation:
            return f"generation {newest[-1]} took over"
        tags = _lease_tags(self.tracker, self.name)
        if tags is None or tags.get("holder") != self.token or tags.get("released") == "true":
            return "its lease was removed or reassigned"
        return None

    def keep_renewed(self) -> None:
        """Renew every TTL/4 until released (a thread); stop at the first sign of a take-over."""
        while not self._stop.wait(self.ttl_s / 4):
            try:
                taken = self._taken_over()
                if taken:
                    self.lost = taken
                    return
                self.tracker.set_registered_model_tag(self.name, "renewed_at", str(_now_ms()))
                self.renewed = time.monotonic()
            except Exception as exc:  # the server is briefly away: check() refuses once renewal is overdue
                print(f"promote: could not renew {self.name}: {exc}", file=sys.stderr)

    def release(self) -> None:
        """Mark this generation released, if it is still ours; never touch another generation."""
        self._stop.set()
        try:
            if self._taken_over() is None:
                self.tracker.set_registered_model_tag(self.name, "released", "true")
        except Exception as exc:  # it then expires after the TTL; the next holder prunes it
            print(f"promote: could not release {self.name} (it expires in {self.ttl_s:g}s): {exc}", file=sys.stderr)

    def prune(self) -> None:
        """Delete the generations before this one (best effort: a refusal only leaves clutter)."""
        for generation in _generations(self.tracker, self.model_name):
            if generation >= self.generation:
                break
            try:
                self.tracker.delete_registered_model(f"{_lock_prefix(self.model_name)}{generation}")
            except Exception as exc:
                print(f"promote: could not prune lock generation {generation}: {exc}", file=sys.stderr)
                return


def _try_acquire(tracker: Any, model_name: str, token: str, ttl_s: float) -> tuple[Lease | None, str]:
    """Take the lock if it is free: the lease, or None and who holds it."""
    from mlflow.exceptions import MlflowException

    prefix = _lock_prefix(model_name)
    generations = _generations(tracker, model_name)
    if generations:
        tags = _lease_tags(tracker, f"{prefix}{generations[-1]}")
        if tags is None:
            return None, "a generation being pruned"
        holder, renewed_at = tags.get("holder", "?"), int(tags.get("renewed_at", "0"))
        idle_s = (_now_ms() - renewed_at) / 1000
        # The holder's own TTL counts: it promised to renew within it, whatever ours is.
        if tags.get("released") != "true" and idle_s <= float(tags.get("ttl_s", ttl_s)):
            return None, holder
        if tags.get("released") != "true":
            print(
                f"promote: taking over the registry lock from {holder}, not renewed for {idle_s:.0f}s", file=sys.stderr
            )
    generation = (generations[-1] if generations else 0) + 1
    name = f"{prefix}{generation}"
    try:
        tracker.create_registered_model(
            name,
            tags={"holder": token, "renewed_at": str(_now_ms()), "ttl_s": str(ttl_s), "released": "false"},
            description="A lease on moving this model's aliases (pipeline/registry.py).",
        )
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_ALREADY_EXISTS":
            tags = _lease_tags(tracker, name)
            if not tags or tags.get("holder") != token:  # else our create went through and the client retried it
                return None, (tags or {}).get("holder", "another contender")
        elif exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, "a contender"  # the server saw the name taken, then pruned, while creating: try again
        else:
            raise PipelineError(
                f"cannot create the registry lock {name}: {exc.message} (the MLflow user needs "
                f"permission to create registered models)"
            ) from exc
    lease = Lease(tracker, model_name, generation, token, ttl_s)
    lease.prune()
    return lease, token


def acquire(
    tracker: Any,
    model_name: str,
    holder: str,
    ttl_s: float = LOCK_TTL_S,
    wait_s: float = LOCK_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> Lease:
    """Wait for and take the registry lock of ``model_name``; ``RegistryBusy`` after ``wait_s``."""
    token = f"{holder}#{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        lease, held_by = _try_acquire(tracker, model_name, token, ttl_s)
        if lease is not None:
            return lease
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryBusy(
                f"registry lock {_lock_prefix(model_name)}* still held by {held_by} after waiting "
                f"{wait_s:g}s (promote.lock_wait_s); a holder that stops renewing it loses it after "
                f"{ttl_s:g}s (promote.lock_ttl_s): retry later"
            )
        sleep(min(delay * (0.5 + random.random()), remaining))
        delay = min(delay * 2, MAX_BACKOFF_S)


@contextmanager
def registry_lock(
    tracker: Any, model_name: str, holder: str, ttl_s: float = LOCK_TTL_S, wait_s: float = LOCK_WAIT_S
) -> Iterator[Lease]:
    """Mutual exclusion for alias moves on ``model_name`` across processes and machines; the lease
    is renewed while the block runs, and ``lease.check()`` must precede every write."""
    lease = acquire(tracker, model_name, holder, ttl_s, wait_s)
    renewer = threading.Thread(target=lease.keep_renewed, name=f"renew {lease.name}", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        lease.release()
        renewer.join(timeout=5)


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
        return (
            f"{name} {ours:.4f} of version {candidate.version} is not better than champion "
            f"version {current.version} ({theirs:.4f})"
        )
    return None


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
    refusal = _verdict(candidate, current, alias, force)
    if refusal is None and expected_current is not None and (current_version or "") != expected_current:
        refusal = f"{alias} moved to version {current_version} since version {version} was evaluated"
    if current_version == version:
        return "unchanged", f"version {version} already holds {alias}"
    if refusal is not None:
        return "refused", refusal
    return "promoting", reason or "passed the gate"


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
) -> Promotion:
    """Move ``alias`` to the version ``ref`` names, under the registry lock; audit every attempt.

    ``expected_current``: the version the caller compared against (register passes the champion
    evaluate scored); if the alias has moved since, the attempt is refused rather than guessed.
    The audit record is written before any alias moves (as "promoting") and completed after, so
    an attempt that dies midway still left its record.
    """
    candidate = resolve_version(tracker, model_name, ref)
    version = str(candidate.version)
    with registry_lock(tracker, model_name, requested_by or "unknown", ttl_s, wait_s) as lease:
        current_version = tracker.get_registered_model(model_name).aliases.get(alias)
        current_version = None if current_version is None else str(current_version)
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
            "at": datetime.now(UTC).isoformat(),
        }
        audit_run_id = _audit(tracker, model_name, record)
        if outcome == "promoting":
            _move(tracker, lease, model_name, alias, version, current_version)
            outcome = record["outcome"] = "promoted"
            tracker.set_tag(audit_run_id, "promotion.outcome", outcome)
            tracker.update_run(audit_run_id, status="FINISHED", name=_audit_name(record))
        tagged = f"finetune.promoted_to.{alias}"
        if outcome == "promoted" or (outcome == "unchanged" and tagged not in candidate.tags):
            lease.check()  # "unchanged" and untagged: an earlier attempt died after the move
            tracker.set_model_version_tag(model_name, version, tagged, json.dumps(record))
    print(f"promote: {model_name} v{version} -> {alias}: {outcome}: {why}", file=sys.stderr)
    return Promotion(
        model_name=model_name,
        version=version,
        target_alias=alias,
        outcome=outcome,
        reason=why,
        previous_version=current_version or "",
        audit_run_id=audit_run_id,
    )
