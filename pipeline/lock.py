"""The registry lock: mutual exclusion for alias moves on one registered model, across processes
and machines. ``registry`` takes it around every alias move (``registry_lock``).

MLflow has no compare-and-set on aliases; the one atomic step it offers is creating a registered
model (the name is unique). The lock is built on that alone -- a lease per generation:

1. A lease is the registered model ``<model>.promotion-lock.<n>``, tagged with its holder's unique
   token; only the newest generation counts. Creating generation n+1 is the only way to take
   the lock, so of any number of contenders exactly one succeeds (the name is unique).
2. The holder renews its lease every ``ttl_s / 4`` by writing a larger value to its
   ``renewed_at`` tag. n+1 may be created only when generation n is released, or when the contender
   itself has watched n's ``renewed_at`` stay the same for n's ``ttl_s`` on its own monotonic clock.
   No client's wall clock decides anything (the value is wall-clock ms, for people), so a
   contender or holder whose clock is hours off neither takes a live lease nor keeps a dead one;
   the cost is that a dead holder is taken over one TTL after a contender first looks at it.
   Nothing is ever deleted to take the lock, so a contender can never remove a newer holder's lease.
3. Before every alias write the holder reads the registry: its generation must still be the
   newest and still carry its token; otherwise it stops (``LockLost``). A late renewal alone (its
   renewal thread starved) loses nothing: only another holder's lease does.
4. Release marks the holder's own generation released; it never touches another generation.
   Older generations are pruned by the next holder, a few at a time; however many are left, all
   are found (every page of the search). Every wait sleeps with jittered back-off and ends at
   ``wait_s`` (default five TTLs) with ``RegistryBusy``, which launchers retry.
What is left: a holder frozen between its check and its write (milliseconds apart) until a
contender saw its lease unrenewed for a TTL could still write once; the alias is re-read after
every move (``registry``), and a write around the lock fails the attempt loudly.

mlflow is imported inside the functions that use it: the module is on the DAG-parse path
through the steps.
"""

from __future__ import annotations

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

from pipeline.errors import PipelineError, TransientError

LOCK_TTL_S = 60.0  # a lease seen unrenewed for this long is presumed dead (its holder renews every TTL/4)
LOCK_WAIT_S = 300.0  # how long an attempt waits for the lock: five TTLs
MAX_BACKOFF_S = 2.0
PRUNE_AT_MOST = 25  # older generations a new holder deletes: clutter shrinks without slowing one take


class RegistryBusy(TransientError):
    """The registry lock was not free within the wait: try again later."""


class LockLost(TransientError):
    """This holder's lease was taken over (it stalled past the TTL); it must not write."""


@dataclass(frozen=True)
class Clock:
    """Where the lock takes time. ``monotonic`` times every decision (a contender's stopwatch on
    a lease, the wait's deadline); ``wall`` only stamps tags and records for people to read."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic

    def stamp(self) -> str:
        return datetime.fromtimestamp(self.wall(), UTC).isoformat(timespec="milliseconds")


SYSTEM_CLOCK = Clock()


def _lock_prefix(model_name: str) -> str:
    return f"{model_name}.promotion-lock."


def _generations(tracker: Any, model_name: str) -> list[int]:
    """The lock generations that exist for ``model_name``, oldest first: every page of the search."""
    prefix = _lock_prefix(model_name)
    found, token = [], None
    while True:
        # LIKE treats '_' as a wildcard: the names are filtered exactly below.
        page = tracker.search_registered_models(
            filter_string=f"name LIKE '{prefix}%'", max_results=1000, page_token=token
        )
        found += [m.name[len(prefix) :] for m in page if m.name.startswith(prefix)]
        if not (token := page.token):
            return sorted(int(suffix) for suffix in found if suffix.isdigit())


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
    clock: Clock = SYSTEM_CLOCK
    renewed_at: int = 0  # the value of this lease's ``renewed_at`` tag: each renewal writes a larger one
    lost: str = ""  # why the lease is no longer ours, once a check or the renewer has seen it
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return f"{_lock_prefix(self.model_name)}{self.generation}"

    def check(self) -> None:
        """Raise ``LockLost`` unless the registry still shows this lease as the lock: call before
        each write. A renewal that came late (a starved thread) is not a loss; a newer holder is."""
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
                self.renewed_at = _renewed_at(self.clock, self.renewed_at)
                self.tracker.set_registered_model_tag(self.name, "renewed_at", str(self.renewed_at))
            except Exception as exc:  # the server is briefly away: contenders take over after a TTL
                print(f"promote: could not renew {self.name}: {exc}", file=sys.stderr)

    def release(self) -> None:
        """Mark this generation released, if it is still ours; never touch another generation."""
        self._stop.set()
        try:
            if self._taken_over() is None:
                self.tracker.set_registered_model_tag(self.name, "released", "true")
        except Exception as exc:  # it then expires after the TTL; the next holder prunes it
            print(f"promote: could not release {self.name} (it expires in {self.ttl_s:g}s): {exc}", file=sys.stderr)

    def prune(self, at_most: int = PRUNE_AT_MOST) -> None:
        """Delete up to ``at_most`` older generations, oldest first (best effort: a refusal leaves clutter)."""
        for generation in _generations(self.tracker, self.model_name)[:at_most]:
            if generation >= self.generation:
                break
            try:
                self.tracker.delete_registered_model(f"{_lock_prefix(self.model_name)}{generation}")
            except Exception as exc:
                print(f"promote: could not prune lock generation {generation}: {exc}", file=sys.stderr)
                return


def _renewed_at(clock: Clock, before: int = 0) -> int:
    """The next ``renewed_at``: wall-clock ms (for people and older code), always above ``before``."""
    return max(int(clock.wall() * 1000), before + 1)


@dataclass
class Watch:
    """A contender's view of the newest lease: its (generation, ``renewed_at``), first seen ``since``."""

    clock: Clock = SYSTEM_CLOCK
    seen: tuple[int, str] | None = None
    since: float = 0.0

    def unrenewed_for(self, generation: int, renewed_at: str) -> float:
        """Seconds this contender has watched ``generation`` keep ``renewed_at``."""
        now = self.clock.monotonic()
        if self.seen != (generation, renewed_at):
            self.seen, self.since = (generation, renewed_at), now
        return now - self.since


def _holder_of(tracker: Any, name: str, generation: int, watch: Watch, ttl_s: float) -> str | None:
    """Who still holds generation ``name``, or None when it is free to take: released, or watched
    unrenewed for its holder's own TTL (it promised to renew within it, whatever ours is)."""
    tags = _lease_tags(tracker, name)
    if tags is None:
        return "a generation being pruned"
    if tags.get("released") == "true":
        return None
    holder = tags.get("holder", "?")
    idle_s = watch.unrenewed_for(generation, tags.get("renewed_at", ""))
    if idle_s < float(tags.get("ttl_s", ttl_s)):
        return holder
    print(f"promote: taking over the registry lock from {holder}, seen unrenewed for {idle_s:.1f}s", file=sys.stderr)
    return None


def _try_acquire(tracker: Any, model_name: str, token: str, ttl_s: float, watch: Watch) -> tuple[Lease | None, str]:
    """Take the lock if it is free: the lease, or None and who holds it."""
    from mlflow.exceptions import MlflowException

    prefix = _lock_prefix(model_name)
    generations = _generations(tracker, model_name)
    if generations:
        held_by = _holder_of(tracker, f"{prefix}{generations[-1]}", generations[-1], watch, ttl_s)
        if held_by is not None:
            return None, held_by
    generation = (generations[-1] if generations else 0) + 1
    name, renewed_at = f"{prefix}{generation}", _renewed_at(watch.clock)
    try:
        tracker.create_registered_model(
            name,
            tags={"holder": token, "renewed_at": str(renewed_at), "ttl_s": str(ttl_s), "released": "false"},
            description="A lease on moving this model's aliases (pipeline/lock.py).",
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
    return Lease(tracker, model_name, generation, token, ttl_s, watch.clock, renewed_at), token


def acquire(
    tracker: Any,
    model_name: str,
    holder: str,
    ttl_s: float = LOCK_TTL_S,
    wait_s: float = LOCK_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Clock = SYSTEM_CLOCK,
) -> Lease:
    """Wait for and take the registry lock of ``model_name``; ``RegistryBusy`` after ``wait_s``."""
    token = f"{holder}#{uuid.uuid4().hex[:12]}"
    watch = Watch(clock)
    deadline = clock.monotonic() + wait_s
    delay = 0.05
    while True:
        lease, held_by = _try_acquire(tracker, model_name, token, ttl_s, watch)
        if lease is not None:
            return lease
        remaining = deadline - clock.monotonic()
        if remaining <= 0:
            raise RegistryBusy(
                f"registry lock {_lock_prefix(model_name)}* still held by {held_by} after waiting "
                f"{wait_s:g}s (promote.lock_wait_s); a holder that stops renewing it loses it "
                f"{ttl_s:g}s (promote.lock_ttl_s) after a contender first sees it: retry later"
            )
        sleep(min(delay * (0.5 + random.random()), remaining))
        delay = min(delay * 2, MAX_BACKOFF_S)


@contextmanager
def registry_lock(
    tracker: Any,
    model_name: str,
    holder: str,
    ttl_s: float = LOCK_TTL_S,
    wait_s: float = LOCK_WAIT_S,
    clock: Clock = SYSTEM_CLOCK,
) -> Iterator[Lease]:
    """Mutual exclusion for alias moves on ``model_name`` across processes and machines; the lease
    is renewed while the block runs, and ``lease.check()`` must precede every write."""
    lease = acquire(tracker, model_name, holder, ttl_s, wait_s, clock=clock)
    renewer = threading.Thread(target=lease.keep_renewed, name=f"renew {lease.name}", daemon=True)
    renewer.start()
    try:
        lease.prune()  # renewed meanwhile: a slow prune never costs the lease
        yield lease
    finally:
        lease.release()
        renewer.join(timeout=5)
