"""The registry lock, attacked where a lock breaks: two waiters racing for a stale lease, a holder
frozen (SIGSTOP) past its TTL, a holder killed (SIGKILL) inside the lock, refused writes, and a
wait that must end. Real MLflow stores (SQLite here, `mlflow server` on PostgreSQL for the
10-way run); the interleavings are forced with barriers and signals, not hoped for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import lock, registry
from pipeline.tracking import client
from tests.helpers import MODEL_NAME, aliases, lock_generations, lock_is_free, promotion_audit, register_version

LOCK = f"{MODEL_NAME}.promotion-lock."


class Recorder:
    """The real client, counting calls; a method may first wait at a barrier or be refused."""

    def __init__(self, real, barrier_on=None, barrier=None, refuse=()):
        self.real, self.barrier_on, self.barrier, self.refuse = real, barrier_on, barrier, set(refuse)
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self.real, name)

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.refuse:
                from mlflow.exceptions import MlflowException

                raise MlflowException(f"{name}: permission denied", error_code="PERMISSION_DENIED")
            if name == self.barrier_on and self.barrier is not None and self.calls[name] == 1:
                self.barrier.wait(timeout=30)  # both contenders reach this call before either makes it
            return attr(*args, **kwargs)

        return call


def _stale_lease(tracker, generation=1, holder="dead-holder#0", ttl_s=1):
    """A lease whose holder is gone: never renewed again, taken over once watched for its TTL."""
    tracker.create_registered_model(
        f"{LOCK}{generation}", tags={"holder": holder, "renewed_at": "7", "ttl_s": str(ttl_s), "released": "false"}
    )


def test_two_waiters_racing_for_a_stale_lock_never_both_hold_it():
    real = client()
    _stale_lease(real)
    barrier = threading.Barrier(2)
    inside, most, entered, guard = [0], [0], [], threading.Lock()

    def contender(name):
        tracker = Recorder(client(), barrier_on="create_registered_model", barrier=barrier)
        with lock.registry_lock(tracker, MODEL_NAME, name, ttl_s=5, wait_s=30) as lease:
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                entered.append((name, lease.generation))
            time.sleep(0.5)
            lease.check()
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=contender, args=(f"waiter-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert most[0] == 1 and len(entered) == 2
    assert sorted(generation for _, generation in entered) == [2, 3]  # one took over the stale lease, then the other
    held = lock_generations(real)
    assert list(held) == [f"{LOCK}3"] and held[f"{LOCK}3"]["released"] == "true"  # older generations pruned


HOLDER = """
import sys, time
from pipeline import lock, tracking
tracker = tracking.client()
clock = lock.Clock(wall=lambda: time.time() + float(sys.argv[3]))  # this machine's clock, that far off
ttl_s = float(sys.argv[2])
with lock.registry_lock(tracker, sys.argv[1], "frozen-holder", ttl_s=ttl_s, wait_s=30, clock=clock) as lease:
    print("held", lease.generation, flush=True)
    sys.stdin.readline()  # frozen here by the test
    try:
        lease.check()
        tracker.set_registered_model_alias(sys.argv[1], "champion", "1")
        print("wrote", flush=True)
    except lock.LockLost as exc:
        print("lost:", exc, flush=True)
"""


def _holder(ttl_s, name=MODEL_NAME, clock_offset_s=0.0):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, str(ttl_s), str(clock_offset_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    line = holder.stdout.readline()
    assert line.startswith("held"), line + holder.stderr.read()
    return holder


def test_a_holder_frozen_past_the_ttl_loses_the_lock_and_neither_writes_nor_removes_its_successor():
    tracker = client()
    v1, v2 = register_version(tracker, 0.8), register_version(tracker, 0.9)
    holder = _holder(ttl_s=2)
    os.kill(holder.pid, signal.SIGSTOP)  # an eviction notice that never came, a GC pause, a stuck VM
    try:
        with lock.registry_lock(tracker, MODEL_NAME, "successor", ttl_s=30, wait_s=10) as lease:
            assert lease.generation == 2  # took over generation 1 once it was seen unrenewed for the TTL
            tracker.set_registered_model_alias(MODEL_NAME, "champion", v2)
            os.kill(holder.pid, signal.SIGCONT)
            out, err = holder.communicate("go\n", timeout=60)
            assert "lost: registry lock " in out and "is no longer held by frozen-holder" in out, out + err
            assert "wrote" not in out
            # The frozen holder's release touched nothing of ours: our lease stands, and still guards writes.
            lease.check()
            held = lock_generations(tracker)[f"{LOCK}2"]
            assert held["holder"] == lease.token and held["released"] == "false"
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
    assert aliases(tracker) == {"champion": v2} and v1 == "1"


def test_a_refused_prune_does_not_stop_the_lock_and_a_refused_create_fails_at_once():
    real = client()
    _stale_lease(real)
    refusing_delete = Recorder(real, refuse={"delete_registered_model"})
    with lock.registry_lock(refusing_delete, MODEL_NAME, "a", ttl_s=5, wait_s=5) as lease:
        assert lease.generation == 2
    assert refusing_delete.calls["delete_registered_model"] == 1  # tried once, not in a loop
    assert set(lock_generations(real)) == {f"{LOCK}1", f"{LOCK}2"}

    refusing_create = Recorder(real, refuse={"create_registered_model"})
    started = time.monotonic()
    with pytest.raises(Exception, match=rf"cannot create the registry lock {LOCK}3: .*permission"):
        with lock.registry_lock(refusing_create, MODEL_NAME, "b", ttl_s=5, wait_s=30):
            pass
    assert time.monotonic() - started < 5 and refusing_create.calls["create_registered_model"] == 1


def test_a_busy_lock_is_waited_for_with_back_off_until_the_deadline_then_a_retryable_error():
    real = client()
    # The holder renews every TTL/4 (1 s), each renewal three calls to the SQLite store; a TTL of
    # 4 s leaves it room for a slow renewal on a loaded machine (2 s did not: a take-over under load).
    with lock.registry_lock(real, MODEL_NAME, "long-holder", ttl_s=4, wait_s=8):
        waiter = Recorder(client())
        started = time.monotonic()
        with pytest.raises(lock.RegistryBusy) as busy:
            lock.acquire(waiter, MODEL_NAME, "impatient", ttl_s=4, wait_s=5)
        waited = time.monotonic() - started
    # The holder renewed the lease all along, so the 5 s wait outlasted the 4 s TTL in vain.
    assert 5 <= waited < 8
    assert waiter.calls["search_registered_models"] < 20  # backed off: no spin
    message = str(busy.value)
    assert "long-holder" in message and "promote.lock_wait_s" in message and "promote.lock_ttl_s" in message
    assert busy.value.exit_code == 75  # launchers retry it; bad input (2) and a failed gate (3) they do not


@pytest.mark.slow
def test_ten_concurrent_promotions_proceed_past_a_holder_killed_inside_the_lock(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracker = client()
    name = "killed-holder-intents"  # the server is shared with the other 10-way test
    accuracies = [0.71, 0.93, 0.65, 0.88, 0.97, 0.74, 0.90, 0.69, 0.95, 0.80]
    versions = [register_version(tracker, a, name=name) for a in accuracies]
    holder = _holder(ttl_s=3, name=name, clock_offset_s=3600)  # its clock an hour ahead
    holder.kill()  # SIGKILL inside the lock: no release, no renewal, ever again
    holder.wait(timeout=10)
    started = time.monotonic()
    attempts = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "promote",
                "--set",
                f"model_name={name}",
                "--set",
                f"promote.version={v}",
                "--set",
                f"promote.requested_by=attempt-{v}",
                "--set",
                f"run_id=k{v}",
                "--set",
                "promote.lock_ttl_s=3",
            ],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    outcomes = [(a.wait(timeout=300), a.stderr.read()) for a in attempts]
    crashed = [err[-6000:] for code, err in outcomes if code not in (0, 2)]  # 2: a refusal, which is fine
    assert not crashed, crashed
    assert any("taking over the registry lock from frozen-holder" in err for _, err in outcomes)
    assert time.monotonic() - started < 120
    best = versions[accuracies.index(max(accuracies))]
    assert aliases(tracker, name)["champion"] == best
    records = promotion_audit(tracker, name)
    assert sorted(r.data.tags["promotion.requested_by"] for r in records) == sorted(f"attempt-{v}" for v in versions)
    assert "promoting" not in {r.data.tags["promotion.outcome"] for r in records}
    assert lock_is_free(tracker, name)


@pytest.mark.parametrize("offset_s", [120, -120])
def test_contenders_whose_wall_clocks_are_off_never_take_a_healthy_holders_lease(offset_s):
    real = client()
    skewed = lock.Clock(wall=lambda: time.time() + offset_s)
    busy = []

    def contender(i):
        try:
            lock.acquire(client(), MODEL_NAME, f"skewed-{i}", ttl_s=2, wait_s=3.5, clock=skewed)
        except lock.RegistryBusy as exc:
            busy.append(str(exc))

    with lock.registry_lock(real, MODEL_NAME, "healthy-holder", ttl_s=2, wait_s=5) as lease:
        threads = [threading.Thread(target=contender, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        lease.check()  # still the lock, after both waited past its TTL
        assert len(busy) == 2 and all("healthy-holder" in message for message in busy), busy
        assert list(lock_generations(real)) == [f"{LOCK}1"]


def test_a_holder_an_hour_ahead_killed_inside_the_lock_is_taken_over_after_one_ttl():
    tracker = client()
    holder = _holder(ttl_s=1.5, clock_offset_s=3600)  # its renewal stamps an hour in the future
    holder.kill()
    holder.wait(timeout=10)
    started = time.monotonic()
    with lock.registry_lock(tracker, MODEL_NAME, "next", ttl_s=5, wait_s=20) as lease:
        waited = time.monotonic() - started
        assert lease.generation == 2
    assert 1.5 <= waited < 8, waited  # one TTL of watching it unrenewed (and back-off), not an hour


def test_a_holder_whose_renewal_was_late_loses_the_lock_only_to_another_holder():
    """A renewal thread starved past the TTL (a loaded machine) is not a lost lease; a take-over is."""
    tracker = client()
    lease = lock.acquire(tracker, MODEL_NAME, "starved", ttl_s=1, wait_s=5)  # never renewed
    time.sleep(1.5)
    lease.check()  # late, but nobody took it: still ours
    successor = lock.acquire(client(), MODEL_NAME, "successor", ttl_s=5, wait_s=10)
    assert successor.generation == 2
    with pytest.raises(lock.LockLost, match="generation 2 took over"):
        lease.check()


def _unpruned_generations(count):
    """``count`` released lock generations written straight into the SQLite store (the client
    would take minutes), as a lock whose old generations could never be pruned leaves them."""
    import sqlite3

    from pipeline.tracking import tracking_uri

    client().search_registered_models()  # the store creates its tables
    now = int(time.time() * 1000)
    names = [f"{LOCK}{n}" for n in range(1, count + 1)]
    with sqlite3.connect(tracking_uri().removeprefix("sqlite:///")) as db:
        db.executemany(
            "INSERT INTO registered_models (name, creation_time, last_updated_time) VALUES (?, ?, ?)",
            [(name, now, now) for name in names],
        )
        tags = {"holder": "old#0", "renewed_at": "3", "ttl_s": "60", "released": "true"}
        db.executemany(
            "INSERT INTO registered_model_tags (key, value, name) VALUES (?, ?, ?)",
            [(key, value, name) for name in names for key, value in tags.items()],
        )


def test_the_lock_works_with_two_thousand_unpruned_generations():
    _unpruned_generations(2000)  # more than one page of the search, and 999 sorts after 2000 by name
    tracker = client()
    with lock.registry_lock(tracker, MODEL_NAME, "first", ttl_s=5, wait_s=10) as lease:
        assert lease.generation == 2001
        with pytest.raises(lock.RegistryBusy, match="still held by first"):
            lock.acquire(client(), MODEL_NAME, "second", ttl_s=5, wait_s=1)
    with lock.registry_lock(tracker, MODEL_NAME, "third", ttl_s=5, wait_s=10) as lease:
        assert lease.generation == 2002
    left = len(lock._generations(tracker, MODEL_NAME))
    assert left == 2002 - 2 * lock.PRUNE_AT_MOST  # each holder pruned a few of the oldest


class TakenOverAfterAudit(Recorder):
    """The real client; right after the attempt's audit run is created, another holder takes
    generation 2 (as a contender does once this holder stalls past its TTL)."""

    def create_run(self, *args, **kwargs):
        run = self.real.create_run(*args, **kwargs)
        self.real.create_registered_model(f"{LOCK}2", tags={"holder": "usurper#1", "released": "false"})
        return run


def test_an_attempt_that_lost_its_lease_ends_its_audit_run_failed_as_lost():
    real = client()
    version = register_version(real, 0.9)
    with pytest.raises(lock.LockLost, match="generation 2 took over"):
        registry.attempt(TakenOverAfterAudit(real), MODEL_NAME, version, "champion", requested_by="a", reason="")
    (record,) = promotion_audit(real)
    assert record.info.status == "FAILED" and record.data.tags["promotion.outcome"] == "lost"
    assert "no longer held" in record.data.tags["promotion.why"]
    assert aliases(real) == {}
    assert lock_generations(real)[f"{LOCK}2"]["holder"] == "usurper#1"  # the loser's release touched nothing
