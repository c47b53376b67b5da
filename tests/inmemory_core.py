"""A cluster's CoreV1 API in memory, for the part of a PyTorchJob's or TrainJob's watch that reads
its rank-0 pod's log: pods with labels, each with a container log that grows as the clock moves;
``list_namespaced_pod`` filters by label selector and ``read_namespaced_pod_log`` honours
``timestamps`` and ``since_seconds`` as the API server does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubernetes.client import V1ObjectMeta, V1Pod, V1PodList, V1PodStatus

from tests.manifests import ApiError

EPOCH = datetime(2026, 1, 5, tzinfo=UTC)


class InMemoryCoreV1:
    """Pods in one namespace. ``now`` is the cluster's clock in seconds; a test moves it (the job
    loop's ``sleep``) and adds log lines at the current time with ``write``."""

    def __init__(self):
        self.now = 0.0
        self.pods: dict[str, V1Pod] = {}
        self.logs: dict[tuple[str, str], list[tuple[float, str]]] = {}
        self.not_started: set[str] = set()
        self.reads: list[dict] = []

    def add_pod(self, name: str, labels: dict[str, str], container: str, started: bool = True) -> None:
        self.pods[name] = V1Pod(
            metadata=V1ObjectMeta(
                name=name,
                uid=f"uid-{name}",
                labels=dict(labels),
                creation_timestamp=EPOCH + timedelta(seconds=self.now),
            ),
            status=V1PodStatus(phase="Running" if started else "Pending"),
        )
        self.logs[(name, container)] = []
        if not started:
            self.not_started.add(name)

    def start(self, name: str) -> None:
        self.not_started.discard(name)
        self.pods[name].status.phase = "Running"

    def write(self, name: str, container: str, *lines: str) -> None:
        self.logs[(name, container)].extend((self.now, line) for line in lines)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    # --- the two CoreV1Api calls the watch makes ---

    def list_namespaced_pod(self, namespace, label_selector=""):
        wanted = dict(pair.split("=", 1) for pair in label_selector.split(",") if pair)
        return V1PodList(
            items=[pod for pod in self.pods.values() if all(pod.metadata.labels.get(k) == v for k, v in wanted.items())]
        )

    def read_namespaced_pod_log(self, name, namespace, container=None, timestamps=False, since_seconds=None):
        self.reads.append({"pod": name, "container": container, "since_seconds": since_seconds})
        if name not in self.pods:
            raise ApiError(404, "NotFound")
        if name in self.not_started:
            raise ApiError(400, f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
        if (name, container) not in self.logs:
            raise ApiError(400, f"container {container} is not valid for pod {name}")
        lines = [
            (at, line)
            for at, line in self.logs[(name, container)]
            if since_seconds is None or at >= self.now - since_seconds
        ]
        if not timestamps:
            return "".join(f"{line}\n" for _, line in lines)
        # The kubelet's RFC 3339 timestamps, nanoseconds with trailing zeros trimmed as Go prints them.
        return "".join(f"{stamp(at)} {line}\n" for at, line in lines)


def stamp(at: float) -> str:
    moment = EPOCH + timedelta(seconds=at)
    fraction = f"{moment.microsecond:06d}000".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"
