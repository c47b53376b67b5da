"""Kubeflow Trainer v2, proven without a cluster: the TrainJob the `trainjob` launcher renders and
the ClusterTrainingRuntime in k8s/ validate against Trainer's CRDs (../shared/schemas), with no
field the API server would silently drop; the runtime's pods meet Pod Security "restricted"; nodes,
GPUs, env, Secrets and the deadline come from the config as the PyTorchJob's do; the watch loop
replaces a job an earlier attempt left, deletes a failed one, and passes the rank-0 pod's log on,
each line once (a CoreV1 API in memory, tests/inmemory_core.py).

    .venv/bin/python -m pytest -q tests/pipeline/test_trainjob.py
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline import cli, k8s, steps
from pipeline.config import load_config
from pipeline.config.deploy import check_image
from pipeline.errors import ConfigError
from pipeline.k8s import jobs, manifests
from tests.inmemory_core import InMemoryCoreV1
from tests.manifests import RUN, InMemoryCustomObjects, images, restricted_violations, validate_core

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT.parent / "shared" / "schemas"
CRDS = {
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
}


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the CRD's structural schema does not declare: the API server prunes them without a
    word, so a misspelt or newer-API field would silently do nothing."""
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") or "properties" not in schema:
            extra = schema.get("additionalProperties")
            return (
                [p for k, v in obj.items() for p in unknown_fields(v, extra, f"{path}.{k}")]
                if isinstance(extra, dict)
                else []
            )
        return [f"{path}.{k}" for k in obj if k not in schema["properties"]] + [
            p
            for k, v in obj.items()
            if k in schema["properties"]
            for p in unknown_fields(v, schema["properties"][k], f"{path}.{k}")
        ]
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [p for i, v in enumerate(obj) for p in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def validate_crd(obj: dict) -> None:
    schema = crd_schema(obj["kind"])
    jsonschema.validate(obj, schema)
    assert unknown_fields(obj, schema) == []


def train(overrides=(), deadline_s=None) -> dict:
    return steps.render("train", [*RUN, *overrides], "trainjob", deadline_s=deadline_s)


def runtime_pod_spec(runtime: dict) -> dict:
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]["template"]["spec"]


# --- the rendered TrainJob ---


def test_the_trainjob_validates_against_trainers_crd_and_its_node_against_the_pod_schema():
    job = train()
    validate_crd(job)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "finetune-torch-distributed",
    }
    trainer = job["spec"]["trainer"]
    node = {
        "name": k8s.TRAINER_CONTAINER,
        "image": trainer["image"],
        "command": trainer["command"],
        "args": trainer["args"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
    }
    validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node"}, "spec": {"containers": [node]}})
    assert check_image("image", trainer["image"]) is None and trainer["image"].endswith("step-cuda:0.1.0")
    assert job["metadata"]["name"].startswith("finetune-train-scheduled-2026-01-05t00-00-00")
    # Every other step stays a pod under this launcher.
    assert steps.render("evaluate", RUN[:1], "trainjob")["kind"] == "Pod"


@pytest.mark.parametrize("old_api", ["podSpecOverrides", "podTemplateOverrides"])  # before v2.1; v2.1
def test_an_older_or_misspelt_api_field_is_caught_not_pruned(old_api):
    job = train()
    job["spec"][old_api] = job["spec"].pop("runtimePatches")
    with pytest.raises(AssertionError):
        validate_crd(job)
    runtime = k8s.training_runtime_manifest(load_config(), steps.STEPS["train"])
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = 1  # removed in Trainer v2.2
    with pytest.raises(AssertionError):
        validate_crd(runtime)


def node_patch(job: dict) -> dict:
    """Our one runtime patch's entry for the trainer's node Job (Trainer v2.2+ ``runtimePatches``)."""
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == manifests.PATCH_MANAGER
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == k8s.TRAINER_NODE
    return node


def test_nodes_gpus_env_secrets_and_deadline_come_from_the_config_as_the_pytorchjobs_do():
    overrides = [
        "k8s.num_nodes=3",
        "train.num_processes=4",
        "k8s.aws_secret=team-s3",
        "k8s.mlflow_secret=team-mlflow",
        'k8s.resources={"train": {"memory": "16Gi"}}',
        'k8s.gpu_tolerations=["gpu=a100:NoExecute"]',
        "k8s.trainjob_runtime=team-torch",
        "timeouts.train=7200",
    ]
    job, pytorchjob = train(overrides), steps.render("train", [*RUN, *overrides], "pytorchjob")
    validate_crd(job)
    (replica,) = [r["template"]["spec"] for r in pytorchjob["spec"]["pytorchReplicaSpecs"].values()][:1]
    master = replica["containers"][0]
    trainer, node = job["spec"]["trainer"], node_patch(job)
    pod = node["template"]["spec"]["template"]["spec"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"] == master["resources"]
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": "4"}
    # The same argv as a PyTorchJob replica, the local launcher's under torch.distributed.run.
    assert (
        [*trainer["command"], *trainer["args"]]
        == [*master["command"], *master["args"]]
        == [
            "python",
            "-m",
            "torch.distributed.run",
            "-m",
            "pipeline",
            *steps.step_argv("train", [*RUN, *overrides])[1:],
        ]
    )
    # Values as the replica's; the Secrets by name and key (Trainer allows no env in a patch of the
    # node container, and envFrom nowhere on a TrainJob), never a value.
    values = [e for e in trainer["env"] if "value" in e]
    assert values == master["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e}
    assert len(values) + len(refs) == len(trainer["env"]) and all(
        set(e) <= {"name", "value", "valueFrom"} for e in trainer["env"]
    )
    assert {name: ref["name"] for name, ref in refs.items()} == {
        "AWS_ACCESS_KEY_ID": "team-s3",
        "AWS_SECRET_ACCESS_KEY": "team-s3",
        "MLFLOW_TRACKING_URI": "team-mlflow",
        "MLFLOW_TRACKING_USERNAME": "team-mlflow",
        "MLFLOW_TRACKING_PASSWORD": "team-mlflow",
        "HF_TOKEN": "finetune-hf",
    }
    assert all(ref["key"] == name for name, ref in refs.items())
    assert [name for name, ref in refs.items() if ref.get("optional")] == [
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "HF_TOKEN",
    ]
    # Every key the TrainJob references is one the k8s README says its Secret holds.
    readme = (ROOT / "k8s" / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in refs)
    assert "containers" not in pod  # no env patch on the node container: the webhook refuses it
    assert (pod["serviceAccountName"], pod["nodeSelector"], pod["tolerations"]) == (
        replica["serviceAccountName"],
        replica["nodeSelector"],
        replica["tolerations"],
    )
    # Our labels on the JobSet, its node Job and their pods.
    (patch,) = job["spec"]["runtimePatches"]
    assert (
        patch["trainingRuntimeSpec"]["template"]["metadata"]["labels"]
        == job["metadata"]["labels"]
        == node["template"]["metadata"]["labels"]
        == node["template"]["spec"]["template"]["metadata"]["labels"]
    )
    assert job["spec"]["runtimeRef"]["name"] == "team-torch"
    # The deadline: the same number as the PyTorchJob's activeDeadlineSeconds, enforced by Trainer
    # (spec.activeDeadlineSeconds, v2.2+) and by the DAG task.
    assert job["spec"]["activeDeadlineSeconds"] == pytorchjob["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    assert k8s.job_deadline_seconds(job) == k8s.job_deadline_seconds(pytorchjob) == 7200
    assert k8s.job_deadline_seconds(train(["k8s.job_timeout_seconds=3600"], deadline_s=7200)) == 3600
    assert k8s.job_deadline_seconds(train(deadline_s=120)) == 120


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["k8s.num_nodes=0"], r"k8s.num_nodes: 0 is below the minimum 1"),
        (["k8s.gpus_per_node=4", "k8s.max_gpus_per_node=2"], r"k8s.gpus_per_node: 4 GPUs"),
        (["train.num_processes=4", "k8s.gpus_per_node=8"], r"k8s.gpus_per_node=8 disagrees with train.num_processes=4"),
        (["k8s.trainjob_runtime=Torch_Runtime"], r"k8s.trainjob_runtime"),
        (["k8s.aws_secret="], r"k8s.aws_secret: a name is required"),
        (["k8s.gpu_image=localhost:5000/step-cuda"], r"k8s.gpu_image: .* has no tag"),
    ],
)
def test_bad_settings_fail_at_render_naming_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(overrides)


def test_cli_render_prints_exactly_the_trainjob(capsys):
    assert cli.main(["render", "--step", "train", "--launcher", "trainjob", *sum((["--set", s] for s in RUN), [])]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == train()


# --- the ClusterTrainingRuntime in k8s/ ---


def test_the_runtime_in_k8s_is_the_one_the_code_builds_and_validates():
    (runtime,) = yaml.safe_load_all((ROOT / "k8s" / "trainingruntime.yaml").read_text())
    assert runtime == k8s.training_runtime_manifest(load_config(), steps.STEPS["train"])
    validate_crd(runtime)
    assert runtime["metadata"]["name"] == load_config().k8s.trainjob_runtime
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # Trainer's torch plugin fills in the job and container of these names (v2: both 'node'), the
    # job it finds by its ancestor label; processes per node are each TrainJob's.
    assert node["name"] == k8s.TRAINER_NODE == "node"
    assert [c["name"] for c in runtime_pod_spec(runtime)["containers"]] == [k8s.TRAINER_CONTAINER] == ["node"]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    # Its Job and pod template are valid Kubernetes objects (1.31 and newest, strict).
    validate_core(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, "spec": node["template"]["spec"]}
    )
    assert "trainingruntime.yaml" in yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())["resources"]


def test_the_runtimes_pods_are_restricted_pinned_and_shaped_like_a_pytorchjob_replica():
    runtime = k8s.training_runtime_manifest(load_config(), steps.STEPS["train"])
    spec = runtime_pod_spec(runtime)
    assert restricted_violations(spec) == []
    assert all(check_image("image", image) is None for image in images(spec))
    assert spec["automountServiceAccountToken"] is False
    replica = steps.render("train", RUN, "pytorchjob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    same = (
        "serviceAccountName",
        "securityContext",
        "volumes",
        "nodeSelector",
        "tolerations",
        "priorityClassName",
        "terminationGracePeriodSeconds",
        "restartPolicy",
    )
    assert {key: spec[key] for key in same} == {key: replica[key] for key in same}
    ours, theirs = spec["containers"][0], replica["containers"][0]
    for key in ("securityContext", "volumeMounts", "envFrom", "env", "image"):
        assert ours[key] == theirs[key], key


def test_the_runtime_restarts_killed_pods_and_leaves_a_steps_verdict_to_airflow():
    runtime = k8s.training_runtime_manifest(
        load_config(None, ["k8s.job_restarts=5", "k8s.job_timeout_seconds=7200"]), steps.STEPS["train"]
    )
    validate_crd(runtime)
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    job = node["template"]["spec"]
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 0}
    assert job["backoffLimit"] == 5 and job["activeDeadlineSeconds"] == 7200
    assert job["completionMode"] == "Indexed"  # PET_NODE_RANK is the completion index
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["containerName"] == k8s.TRAINER_CONTAINER
    assert rule["onExitCodes"]["operator"] == "In" and rule["onExitCodes"]["values"] == list(range(1, 128))
    # The retry table's codes are all among them: bad input, failed gate, transient, timeout.
    assert {2, 3, 75, 124} <= set(rule["onExitCodes"]["values"]) and 137 not in rule["onExitCodes"]["values"]


# --- submitting: the create / watch / delete loop, and the rank-0 pod's log ---

RUNNING = [{"type": "Created", "status": "True", "reason": "JobsCreationSucceeded"}]
COMPLETE = [*RUNNING, {"type": "Complete", "status": "True", "reason": "JobSetCompleted"}]
FAILED = [*RUNNING, {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset failed"}]


def quiet(*_):
    return None


def test_a_complete_trainjob_is_kept_and_a_failed_or_timed_out_one_deleted():
    job = train()
    api = InMemoryCustomObjects([RUNNING, COMPLETE])
    assert k8s.run_job(api, job, 0, 60, sleep=quiet, log=quiet) == "Succeeded"
    assert api.deleted == [] and api.objects[("finetune", job["metadata"]["name"])]["kind"] == "TrainJob"
    api = InMemoryCustomObjects([RUNNING, FAILED])
    logged = []
    assert k8s.run_job(api, job, 0, 60, sleep=quiet, log=logged.append) == "Failed"
    assert api.deleted == [job["metadata"]["name"]]
    assert any("Failed=True FailedJobs jobset failed" in line for line in logged)  # the operator's reason, once
    api = InMemoryCustomObjects([])
    assert k8s.run_job(api, job, 0, -1, sleep=quiet, log=quiet) == "Timeout"
    assert api.deleted == [job["metadata"]["name"]]


def test_a_new_attempt_replaces_the_trainjob_an_earlier_attempt_left():
    job = train()
    api = InMemoryCustomObjects([COMPLETE, RUNNING, COMPLETE])
    assert k8s.run_job(api, job, 0, 60, sleep=quiet, log=quiet) == "Succeeded"
    logged = []
    assert k8s.run_job(api, job, 0, 60, sleep=quiet, log=logged.append) == "Succeeded"
    assert api.deleted == [job["metadata"]["name"]]
    assert logged[0] == f"replacing TrainJob finetune/{job['metadata']['name']} left by an earlier attempt"


def master_labels(job: dict) -> dict:
    return jobs.job_api(job).master_labels(job["metadata"]["name"])


class Cluster:
    """The two in-memory APIs, with the job's pods writing their log as the loop sleeps."""

    def __init__(self, job: dict, conditions, script):
        self.api, self.core, self.script, self.polls = InMemoryCustomObjects(conditions), InMemoryCoreV1(), script, 0

    def sleep(self, seconds):
        self.polls += 1
        self.core.advance(10)
        self.script(self.core, self.polls)


@pytest.mark.parametrize("launcher", ["trainjob", "pytorchjob"])
def test_the_rank0_pods_log_reaches_the_task_log_each_line_once_while_the_job_runs(launcher):
    job = steps.render("train", RUN, launcher)
    container = jobs.job_api(job).master_container
    worker = {**master_labels(job)}
    worker[next(k for k in worker if k.endswith(("completion-index", "replica-index")))] = "1"

    def script(core, poll):
        if poll == 1:
            core.start("master")
            core.write("master", container, "loading the snapshot", "epoch 1 step 10 loss 0.9")
            core.write("worker", container, "a worker's line")
        elif poll == 2:
            core.write("master", container, "epoch 1 step 20 loss 0.7", "epoch 1 step 20 loss 0.7")  # same instant
        elif poll == 3:
            core.write("master", container, "step 'train' failed: exit 75 happened")

    cluster = Cluster(job, [[], [], [], [{"type": "Failed", "status": "True"}]], script)
    cluster.core.add_pod("master", master_labels(job), container, started=False)
    cluster.core.add_pod("worker", worker, container)
    logged = []
    assert k8s.run_job(cluster.api, job, 1, 600, sleep=cluster.sleep, log=logged.append, core=cluster.core) == "Failed"
    lines = [line for line in logged if line.startswith("[rank 0]")]
    assert lines == [
        "[rank 0] loading the snapshot",
        "[rank 0] epoch 1 step 10 loss 0.9",
        "[rank 0] epoch 1 step 20 loss 0.7",
        "[rank 0] epoch 1 step 20 loss 0.7",
        "[rank 0] step 'train' failed: exit 75 happened",
    ]  # read before the failed job was deleted
    assert cluster.api.deleted == [job["metadata"]["name"]]
    # A pod still starting is said once, not at every poll; every read names the step's container.
    assert sum("cannot be read yet" in line and "ContainerCreating" in line for line in logged) == 1
    assert {read["container"] for read in cluster.core.reads} == {container}
    assert {read["pod"] for read in cluster.core.reads} == {"master"}
    # Reads after the first overlap the last one, so no line falls between two polls.
    assert all(read["since_seconds"] and read["since_seconds"] >= jobs.LOG_OVERLAP_S for read in cluster.core.reads[2:])


def test_a_replaced_rank0_pod_is_followed_from_its_first_line():
    job = train()
    container = k8s.TRAINER_CONTAINER

    def script(core, poll):
        if poll == 1:
            core.write("node-0-a", container, "step 10")
        elif poll == 2:  # preempted: the Job replaces the pod; it resumes from the checkpoint
            core.add_pod("node-0-b", master_labels(job), container)
            core.write("node-0-b", container, "resuming from step 10", "step 20")

    cluster = Cluster(job, [[], [], [], COMPLETE], script)
    cluster.core.add_pod("node-0-a", master_labels(job), container)
    cluster.core.write("node-0-a", container, "starting")
    logged = []
    phase = k8s.run_job(cluster.api, job, 1, 600, sleep=cluster.sleep, log=logged.append, core=cluster.core)
    assert phase == "Succeeded"
    assert [line for line in logged if line.startswith(("[rank 0]", "following"))] == [
        "following the log of pod finetune/node-0-a (rank 0)",
        "[rank 0] starting",
        "[rank 0] step 10",
        "following the log of pod finetune/node-0-b (rank 0)",
        "[rank 0] resuming from step 10",
        "[rank 0] step 20",
    ]


@pytest.mark.parametrize(
    "stamp, key",
    [
        ("2026-01-05T00:00:01Z", ("2026-01-05T00:00:01", 0)),
        ("2026-01-05T00:00:01.5Z", ("2026-01-05T00:00:01", 500_000_000)),
        ("2026-01-05T00:00:01.123456789Z", ("2026-01-05T00:00:01", 123_456_789)),
        ("loss", None),
        ("2026-01-05", None),
    ],
)
def test_kubelet_timestamps_order_whatever_their_digits(stamp, key):
    assert jobs.log_time(stamp) == key
    assert jobs.log_time("2026-01-05T00:00:01.5Z") > jobs.log_time("2026-01-05T00:00:01.12Z")
