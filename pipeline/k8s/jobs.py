"""Submitting a PyTorchJob or TrainJob and watching it until it ends (``run_job``), and following
its rank-0 pod's log meanwhile (``MasterLog``). ``JOB_APIS`` says, per kind of Kubeflow job, where
it lives in the API, how it says it ended and which pod is rank 0.

The ``kubernetes`` client is only touched through API objects the caller passes in (the DAG task,
through the provider's hook): a ``CustomObjectsApi`` for the job, a ``CoreV1Api`` for the log.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.k8s.manifests import TRAINER_CONTAINER, TRAINER_GROUP, TRAINER_NODE, TRAINER_VERSION


@dataclass(frozen=True)
class JobApi:
    """Where a kind of Kubeflow job lives in the API, how it says it ended, and which pod is rank 0."""

    group: str
    version: str
    plural: str
    ended: Mapping[str, str]  # terminal condition type -> 'Succeeded' or 'Failed'
    master_container: str
    master_labels: Callable[[str], dict[str, str]]  # job name -> labels of its rank-0 pod

    def master_selector(self, name: str) -> str:
        return ",".join(f"{key}={value}" for key, value in self.master_labels(name).items())


JOB_APIS = {
    "PyTorchJob": JobApi(
        "kubeflow.org",
        "v1",
        "pytorchjobs",
        {"Succeeded": "Succeeded", "Failed": "Failed"},
        "pytorch",
        lambda name: {
            "training.kubeflow.org/job-name": name,
            "training.kubeflow.org/replica-type": "master",
            "training.kubeflow.org/replica-index": "0",
        },
    ),
    # The JobSet the TrainJob owns has its name; the pod of completion index 0 of its (one) node Job
    # is rank 0 (Trainer points PET_MASTER_ADDR at it), found as Trainer's own SDK finds it: by the
    # labels JobSet and the Job controller give every pod.
    "TrainJob": JobApi(
        TRAINER_GROUP,
        TRAINER_VERSION,
        "trainjobs",
        {"Complete": "Succeeded", "Failed": "Failed"},
        TRAINER_CONTAINER,
        lambda name: {
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": TRAINER_NODE,
            "batch.kubernetes.io/job-completion-index": "0",
        },
    ),
}


def job_api(manifest: Mapping[str, Any]) -> JobApi:
    return JOB_APIS[manifest["kind"]]


def job_deadline_seconds(manifest: Mapping[str, Any]) -> int:
    """The deadline a rendered PyTorchJob or TrainJob carries (``job_deadline``)."""
    if manifest["kind"] == "PyTorchJob":
        return int(manifest["spec"]["runPolicy"]["activeDeadlineSeconds"])
    return int(manifest["spec"]["activeDeadlineSeconds"])


def job_phase(job: Mapping[str, Any]) -> str | None:
    """'Succeeded' or 'Failed' once the job ended (its last true terminal condition), else None."""
    ended = JOB_APIS[job.get("kind", "PyTorchJob")].ended
    for condition in reversed(job.get("status", {}).get("conditions") or []):
        if condition.get("type") in ended and condition.get("status") == "True":
            return ended[condition["type"]]
    return None


def delete_job(api: Any, manifest: Mapping[str, Any]) -> None:
    meta, where = manifest["metadata"], job_api(manifest)
    try:
        api.delete_namespaced_custom_object(
            where.group,
            where.version,
            meta["namespace"],
            where.plural,
            meta["name"],
            body={"propagationPolicy": "Foreground"},
        )
    except Exception as exc:  # already gone: nothing to clean up
        if getattr(exc, "status", None) != 404:
            raise


def _exists(api: Any, manifest: Mapping[str, Any]) -> bool:
    meta, where = manifest["metadata"], job_api(manifest)
    try:
        api.get_namespaced_custom_object(where.group, where.version, meta["namespace"], where.plural, meta["name"])
        return True
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return False
        raise


LOG_OVERLAP_S = 30  # each read of the master's log reaches this far before the last; timestamps drop repeats


class MasterLog:
    """The rank-0 pod's log, read through a ``CoreV1Api`` at each poll of its job and passed to
    ``log`` line by line, each line once: reads overlap, and the kubelet's timestamps tell which
    lines were already passed on. A replaced pod (a restart) is followed from its first line.
    Reading the log never fails the job's watch: a pod not started yet or an API error is said
    once and tried again at the next poll."""

    def __init__(
        self,
        core: Any,
        manifest: Mapping[str, Any],
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        where = job_api(manifest)
        self.core, self.log, self.clock = core, log, clock
        self.namespace, self.container = manifest["metadata"]["namespace"], where.master_container
        self.selector = where.master_selector(manifest["metadata"]["name"])
        self.pod_uid: str | None = None
        self.read_at: float | None = None
        self.last: tuple[str, int] | None = None  # timestamp of the last line passed on
        self.at_last: collections.Counter[str] = collections.Counter()  # the lines passed on at that time
        self.said = ""

    def poll(self) -> None:
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
            if not pods:
                return
            pod = max(pods, key=lambda p: p.metadata.creation_timestamp.timestamp())  # the newest: a replacement
            if pod.metadata.uid != self.pod_uid:
                self.pod_uid, self.read_at, self.last = pod.metadata.uid, None, None
                self.at_last = collections.Counter()
                self.log(f"following the log of pod {self.namespace}/{pod.metadata.name} (rank 0)")
            since = {}
            if self.read_at is not None:
                since["since_seconds"] = int(self.clock() - self.read_at) + LOG_OVERLAP_S
            started = self.clock()
            text = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, container=self.container, timestamps=True, **since
            )
            self.read_at = started
        except Exception as exc:
            message = f"the rank-0 pod's log cannot be read yet: {api_message(exc)}"
            if message != self.said:
                self.said = message
                self.log(message)
            return
        repeats: collections.Counter[str] = collections.Counter()  # this read's lines at the last timestamp
        for line in text.splitlines():
            stamp, _, body = line.partition(" ")
            key = log_time(stamp)
            if key is None:  # not a kubelet timestamp: pass it on as it is
                self.log(f"[rank 0] {line}")
                continue
            if self.last is not None and key < self.last:
                continue  # passed on by an earlier read
            if self.last is None or key > self.last:
                self.last, self.at_last, repeats = key, collections.Counter(), collections.Counter()
            repeats[body] += 1
            if repeats[body] <= self.at_last[body]:
                continue  # the same line at the same instant, passed on by an earlier read
            self.at_last[body] += 1
            self.log(f"[rank 0] {body}")


def api_message(exc: Exception) -> str:
    """What the API server said: the message in an ApiException's body, else its reason."""
    try:
        return str(json.loads(exc.body)["message"])  # type: ignore[attr-defined]
    except Exception:
        return str(getattr(exc, "reason", None) or exc)


def log_time(stamp: str) -> tuple[str, int] | None:
    """A kubelet log timestamp (RFC 3339, UTC, up to nanoseconds) as something that orders:
    (seconds, nanoseconds); None when ``stamp`` is not one."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", stamp)
    if match is None:
        return None
    return match.group(1), int((match.group(2) or "").ljust(9, "0"))


def _create(
    api: Any,
    manifest: Mapping[str, Any],
    deadline: float,
    poll_seconds: float,
    sleep: Callable[[float], None],
    log: Callable[[str], None],
) -> tuple[bool, str | None]:
    """Create the job, replacing one of its name: (False, None) when that one is still there at
    ``deadline``, else (True, the created job's uid as the API server answered it; None if unsaid)."""
    meta, where, kind = manifest["metadata"], job_api(manifest), manifest["kind"]
    try:
        created = api.create_namespaced_custom_object(
            where.group, where.version, meta["namespace"], where.plural, dict(manifest)
        )
    except Exception as exc:
        if getattr(exc, "status", None) != 409:
            raise
        # An earlier attempt of this task left its job (a succeeded job is kept; a cleared task
        # runs again): replace it rather than fail on the name.
        log(f"replacing {kind} {meta['namespace']}/{meta['name']} left by an earlier attempt")
        delete_job(api, manifest)
        while _exists(api, manifest):
            if time.monotonic() > deadline:
                return False, None
            sleep(poll_seconds)
        created = api.create_namespaced_custom_object(
            where.group, where.version, meta["namespace"], where.plural, dict(manifest)
        )
    uid = (created or {}).get("metadata", {}).get("uid") if isinstance(created, Mapping) else None
    return True, uid


def _adoptable(api: Any, manifest: Mapping[str, Any], uid: str, log: Callable[[str], None]) -> bool:
    """Whether the job of ``manifest``'s name that an earlier try created (``uid``) can be watched
    instead of created again: it is still there, the same object (its uid), and has not failed."""
    meta, where, kind = manifest["metadata"], job_api(manifest), manifest["kind"]
    named = f"{kind} {meta['namespace']}/{meta['name']}"
    try:
        job = api.get_namespaced_custom_object(
            where.group, where.version, meta["namespace"], where.plural, meta["name"]
        )
    except Exception as exc:
        if getattr(exc, "status", None) != 404:
            raise
        log(f"{named}, created by an earlier try (uid {uid}), is gone: creating it again")
        return False
    found = (job.get("metadata") or {}).get("uid")
    if found != uid:
        log(
            f"not adopting {named}: its uid is {found}, not {uid} as the earlier try created it "
            "(someone recreated it); replacing it"
        )
        return False
    phase = job_phase(job)
    if phase == "Failed":
        log(f"{named}, created by an earlier try (uid {uid}), failed: replacing it")
        return False
    log(f"reattaching to {named} (uid {uid}), created by an earlier try: {phase or 'still running'}")
    return True


def _created(
    manifest: Mapping[str, Any], uid: str | None, log: Callable[[str], None], created: Callable[[str], None] | None
) -> None:
    meta = manifest["metadata"]
    log(f"created {manifest['kind']} {meta['namespace']}/{meta['name']}" + (f" (uid {uid})" if uid else ""))
    if uid and created is not None:
        created(uid)


def run_job(
    api: Any,
    manifest: Mapping[str, Any],
    poll_seconds: float,
    timeout_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
    core: Any = None,
    adopt: str | None = None,
    created: Callable[[str], None] | None = None,
) -> str:
    """Create the PyTorchJob or TrainJob with a ``CustomObjectsApi``, poll until it ends and return
    its final phase ('Succeeded', 'Failed', 'Timeout'). With a ``CoreV1Api`` as ``core``, the
    rank-0 pod's log goes to ``log`` as the job runs (``MasterLog``).

    ``adopt``: the uid of the job an earlier try of the task created (and could not see to its
    end): that job is watched instead of created again while it runs or after it succeeded; one
    that failed, is gone, or carries another uid (someone recreated it) is replaced, as a job
    left without a uid is. ``created`` is told the uid of a job this call creates, before the watch.

    Anything but success (a Failed job, a timeout, an interruption) deletes the job, so no GPU
    stays reserved by a run Airflow has given up on.
    """
    meta, where, kind = manifest["metadata"], job_api(manifest), manifest["kind"]
    deadline = time.monotonic() + timeout_seconds
    if adopt is None or not _adoptable(api, manifest, adopt, log):
        made, uid = _create(api, manifest, deadline, poll_seconds, sleep, log)
        if not made:
            return "Timeout"
        _created(manifest, uid, log, created)
    master = MasterLog(core, manifest, log) if core is not None else None
    seen: set[tuple[str, str, str]] = set()
    phase = None
    try:
        while True:
            job = api.get_namespaced_custom_object(
                where.group, where.version, meta["namespace"], where.plural, meta["name"]
            )
            for condition in job.get("status", {}).get("conditions") or []:  # Created, Running, Restarting ...
                said = (condition.get("type", ""), condition.get("status", ""), condition.get("reason", ""))
                if said not in seen:
                    seen.add(said)
                    state, message = "=".join(said[:2]), condition.get("message", "")
                    log(f"{kind} {meta['name']}: {state} {said[2]} {message}".rstrip())
            phase = job_phase(job)
            if master is not None:
                master.poll()  # after a terminal status too: the last lines, before a failed job is deleted
            if phase is not None:
                break
            if time.monotonic() > deadline:
                phase = "Timeout"
                break
            sleep(poll_seconds)
        log(f"{kind} {meta['name']}: {phase}")
        return phase
    finally:
        if phase != "Succeeded":
            delete_job(api, manifest)
