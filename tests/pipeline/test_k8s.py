"""Kubernetes manifests, proven without a cluster: every rendered Pod/PyTorchJob and every file in
k8s/ validates against the real schemas (kubernetes-validate, strict; the Kubeflow CRD), meets
Pod Security "restricted", pins its images; hadolint and checkov pass over docker/ and k8s/;
bad settings fail at render time naming the setting. The deployment (docs/deploy.md) holds
together: the Helm values, the deployment's config, RBAC across namespaces, the MLflow UI's way
in, the model cache and the images `make images` builds name the same things.

    .venv/bin/python -m pytest -q tests/pipeline/test_k8s.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline import cli, local, steps
from pipeline.config import file_overrides, load_config
from pipeline.config.deploy import check_image
from pipeline.errors import ConfigError
from pipeline.k8s import jobs, manifests
from tests.manifests import (
    RUN,
    InMemoryCustomObjects,
    images,
    manifests_in,
    pod_specs,
    restricted_violations,
    validate_core,
)

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.yaml"


def all_rendered() -> list[tuple[str, str, dict]]:
    return [
        (step, launcher, steps.render(step, RUN if step == "train" else RUN[:1], launcher))
        for launcher in ("kubernetes", "pytorchjob")
        for step in steps.STEPS
    ]


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


# --- rendered Pods and PyTorchJobs ---


@pytest.mark.parametrize("step, launcher, obj", all_rendered(), ids=lambda v: v if isinstance(v, str) else "")
def test_rendered_objects_validate_meet_restricted_and_pin_images(step, launcher, obj):
    if obj["kind"] == "PyTorchJob":
        jsonschema.validate(obj, crd_schema())
        for spec in pod_specs(obj):  # the replicas' pod templates against the core Pod schema
            validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "replica"}, "spec": spec})
    else:
        validate_core(obj)
    for spec in pod_specs(obj):
        assert restricted_violations(spec) == []
        assert all(check_image("image", image) is None for image in images(spec))
        assert spec["automountServiceAccountToken"] is False
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert {"/tmp", manifests.HF_CACHE} <= set(mounts)
        # HF_HOME is the shared model cache: the base model is downloaded once, not per pod.
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts[manifests.HF_CACHE]]["persistentVolumeClaim"] == {"claimName": "finetune-model-cache"}


def test_pod_argv_is_the_local_argv_and_returns_through_xcom():
    pod = steps.render("collect", RUN[:1], "kubernetes")
    (base,) = pod["spec"]["containers"]
    assert base["name"] == "base"  # KubernetesPodOperator merges its settings into 'base'
    assert [*base["command"], *base["args"]] == [
        *steps.step_argv("collect", RUN[:1]),
        "--result-file",
        "/airflow/xcom/return.json",
    ]
    train = steps.render("train", [*RUN, "train.num_processes=4"], "kubernetes")["spec"]["containers"][0]
    assert train["command"] == ["python", "-m", "torch.distributed.run"]
    assert train["args"] == [
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "pipeline",
        *steps.step_argv("train", [*RUN, "train.num_processes=4"])[1:],
        "--result-file",
        "/airflow/xcom/return.json",
    ]


def test_training_gets_gpus_gpu_nodes_and_priority_and_other_steps_do_not():
    spec = steps.render(
        "train", [*RUN, "train.num_processes=2", 'k8s.gpu_tolerations=["gpu=a100:NoExecute"]'], "kubernetes"
    )["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
    assert resources["requests"]["memory"] == steps.STEPS["train"].memory
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute"}]
    assert spec["priorityClassName"] == "finetune-training"
    assert spec["containers"][0]["image"].endswith("step-cuda:0.1.0")
    collect = steps.render("collect", RUN[:1], "kubernetes")["spec"]
    assert "nvidia.com/gpu" not in collect["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in collect and "tolerations" not in collect
    assert collect["containers"][0]["image"].endswith("step-cpu:0.1.0")


def test_secrets_are_referenced_by_name_never_inlined():
    overrides = [*RUN, "k8s.aws_secret=team-s3", "k8s.mlflow_secret=team-mlflow", "k8s.hf_secret=team-hf"]
    for launcher in ("kubernetes", "pytorchjob"):
        for spec in pod_specs(steps.render("train", overrides, launcher)):
            c = spec["containers"][0]
            assert {"secretRef": {"name": "team-s3"}} in c["envFrom"]
            assert {"secretRef": {"name": "team-mlflow"}} in c["envFrom"]
            # HF_TOKEN for gated or private hub models; a pod starts without the Secret.
            assert {"secretRef": {"name": "team-hf", "optional": True}} in c["envFrom"]
            assert {e["name"] for e in c["env"]} == {"HF_HOME", "TOKENIZERS_PARALLELISM"}
    with pytest.raises(ConfigError, match="k8s.hf_secret: a name is required"):
        steps.render("train", [*RUN, 'k8s.hf_secret=""'], "kubernetes")


def test_hf_home_is_the_model_cache_k8s_ships_and_no_claim_gives_each_pod_its_own():
    (claim,) = [d for d in manifests_in(ROOT / "k8s") if d["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == load_config().k8s.model_cache_claim == "finetune-model-cache"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # mounted by pods on many nodes at once
    pod = steps.render("evaluate", [*RUN[:1], "k8s.model_cache_claim=team-cache"], "kubernetes")
    assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "team-cache"}} in pod["spec"]["volumes"]
    # No claim: an emptyDir per pod, as before (every pod downloads what it needs).
    pod = steps.render("evaluate", [*RUN[:1], 'k8s.model_cache_claim=""', "k8s.hf_cache_size=50Gi"], "kubernetes")
    assert {"name": "hf-cache", "emptyDir": {"sizeLimit": "50Gi"}} in pod["spec"]["volumes"]
    validate_core(pod)
    with pytest.raises(ConfigError, match="k8s.model_cache_claim: 'Team_Cache' does not match"):
        steps.render("evaluate", [*RUN[:1], "k8s.model_cache_claim=Team_Cache"], "kubernetes")


def test_pytorchjob_has_master_and_workers_with_one_process_per_gpu():
    job = steps.render("train", [*RUN, "k8s.num_nodes=3", "train.num_processes=4"], "pytorchjob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "4"
    for spec in pod_specs(job):
        (c,) = spec["containers"]
        assert c["name"] == "pytorch"
        assert [*c["command"], *c["args"]] == [
            "python",
            "-m",
            "torch.distributed.run",
            "-m",
            "pipeline",
            *steps.step_argv("train", [*RUN, "k8s.num_nodes=3", "train.num_processes=4"])[1:],
        ]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # A name a DNS label accepts, unique per run.
    assert job["metadata"]["name"].startswith("finetune-train-scheduled-2026-01-05t00-00-00")
    single = steps.render("train", [*RUN, "k8s.num_nodes=1"], "pytorchjob")["spec"]["pytorchReplicaSpecs"]
    assert list(single) == ["Master"]
    # Other steps stay pods under the pytorchjob launcher.
    assert steps.render("evaluate", RUN[:1], "pytorchjob")["kind"] == "Pod"


def test_cli_render_prints_exactly_the_manifest(capsys):
    assert (
        cli.main(["render", "--step", "train", "--launcher", "pytorchjob", *sum((["--set", s] for s in RUN), [])]) == 0
    )
    assert yaml.safe_load(capsys.readouterr().out) == steps.render("train", RUN, "pytorchjob")


def _train_processes_and_gpus(manifest: dict) -> tuple[int, int]:
    """(processes per node, GPUs per node) as each kind of manifest states them."""
    gpu = manifests.GPU_RESOURCE
    if manifest["kind"] == "Pod":
        (main,) = manifest["spec"]["containers"]
        (nproc,) = [int(a.split("=")[1]) for a in main["args"] if a.startswith("--nproc_per_node=")]
        return nproc, int(main["resources"]["limits"][gpu])
    if manifest["kind"] == "PyTorchJob":
        (main,) = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        return int(manifest["spec"]["nprocPerNode"]), int(main["resources"]["limits"][gpu])
    trainer = manifest["spec"]["trainer"]
    return trainer["numProcPerNode"], int(trainer["resourcesPerNode"]["limits"][gpu])


@pytest.mark.parametrize("recipe", sorted((ROOT / "pipeline" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_starts_one_process_per_gpu_it_asks_for_on_every_launcher(recipe):
    overrides = [*cli.file_overrides(str(recipe)), *RUN]
    wanted = steps.config_of(overrides).train.num_processes
    command = local.local_command("train", overrides, "result.json")
    assert f"--nproc_per_node={wanted}" in command  # the local launcher
    for launcher in ("kubernetes", "pytorchjob", "trainjob"):
        assert _train_processes_and_gpus(steps.render("train", overrides, launcher)) == (wanted, wanted), launcher
    if recipe.name == "support_chat_qwen.yaml":
        assert wanted == 4  # what its header promises: 4 GPUs on one node


# --- bad input: a clear error at render time, naming the setting; nothing is built ---


@pytest.mark.parametrize(
    "overrides, launcher, message",
    [
        (
            ["k8s.gpus_per_node=12"],
            "kubernetes",
            r"k8s.gpus_per_node: 12 GPUs per pod cannot be scheduled .* 8 GPUs per node \(k8s.max_gpus_per_node\)",
        ),
        (["k8s.gpus_per_node=4", "k8s.max_gpus_per_node=2"], "pytorchjob", r"k8s.gpus_per_node: 4 GPUs"),
        (
            ["train.num_processes=12"],
            "kubernetes",
            r"train.num_processes=12: 12 GPUs per training pod cannot be scheduled .* 8 GPUs per node",
        ),
        (
            ["train.num_processes=4", "k8s.gpus_per_node=2"],
            "pytorchjob",
            r"k8s.gpus_per_node=2 disagrees with train.num_processes=4: a training pod runs one process per GPU",
        ),
        ([], "slurm", r"--launcher: unknown launcher 'slurm'"),
        ([], "local", r"--launcher: 'local' runs a subprocess"),
        (["k8s.aws_secret="], "kubernetes", r"k8s.aws_secret: a name is required"),
        (['k8s.mlflow_secret=""'], "pytorchjob", r"k8s.mlflow_secret: a name is required"),
        (["k8s.num_nodes=0"], "pytorchjob", r"k8s.num_nodes: 0 is below the minimum 1"),
        (["k8s.image=registry.example.com/finetune/step-cpu"], "kubernetes", r"k8s.image: .* has no tag"),
        (["k8s.gpu_image=localhost:5000/step-cuda"], "pytorchjob", r"k8s.gpu_image: .* has no tag"),
        (["k8s.image=registry.example.com/step-cpu:latest"], "kubernetes", r"k8s.image: .* tagged ':latest'"),
        (['k8s.gpu_tolerations=["nvidia.com/gpu:Sometimes"]'], "kubernetes", r"k8s.gpu_tolerations: .*Effect"),
        (['k8s.gpu_node_selector=["gpu"]'], "kubernetes", r"k8s.gpu_node_selector: 'gpu' is not key=value"),
    ],
)
def test_bad_settings_fail_at_render_naming_the_setting(overrides, launcher, message):
    with pytest.raises(ConfigError, match=message):
        steps.render("train", [*RUN, *overrides], launcher)


def test_a_digest_pinned_image_is_accepted():
    image = "registry.example.com/step-cpu@sha256:" + "a" * 64
    assert steps.render("collect", [f"k8s.image={image}"], "kubernetes")["spec"]["containers"][0]["image"] == image


def test_cli_render_bad_input_exits_2_with_the_setting_named(capsys):
    assert cli.main(["render", "--step", "train", "--launcher", "kubernetes", "--set", "k8s.num_nodes=0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "k8s.num_nodes: 0 is below the minimum 1" in captured.err


def test_the_local_launcher_refuses_cluster_launchers_instead_of_running_locally(monkeypatch):
    monkeypatch.setenv("FINETUNE_LAUNCHER", "kubernetes")
    with pytest.raises(ConfigError, match="submitted by the finetune DAG"):
        local.launch("collect", RUN[:1])


# --- submitting a PyTorchJob: the create / watch / delete loop ---


def test_run_job_keeps_a_succeeded_job_and_deletes_a_failed_or_timed_out_one():
    job = steps.render("train", RUN, "pytorchjob")
    running = [{"type": "Running", "status": "True"}]
    api = InMemoryCustomObjects([running, running + [{"type": "Succeeded", "status": "True"}]])
    assert jobs.run_job(api, job, 0, 60, sleep=lambda s: None, log=lambda m: None) == "Succeeded"
    assert api.deleted == []
    api = InMemoryCustomObjects([running, [{"type": "Failed", "status": "True"}]])
    assert jobs.run_job(api, job, 0, 60, sleep=lambda s: None, log=lambda m: None) == "Failed"
    assert api.deleted == [job["metadata"]["name"]]
    api = InMemoryCustomObjects([])
    assert jobs.run_job(api, job, 0, -1, sleep=lambda s: None, log=lambda m: None) == "Timeout"
    assert api.deleted == [job["metadata"]["name"]]


def test_a_new_attempt_replaces_the_job_an_earlier_attempt_left_instead_of_failing_on_its_name():
    job = steps.render("train", RUN, "pytorchjob")
    running, done = [{"type": "Running", "status": "True"}], [{"type": "Succeeded", "status": "True"}]
    api = InMemoryCustomObjects([done, running, done])
    assert jobs.run_job(api, job, 0, 60, sleep=lambda s: None, log=lambda m: None) == "Succeeded"
    logged = []
    # The task is cleared: the same run's job name is still taken by the succeeded job.
    assert jobs.run_job(api, job, 0, 60, sleep=lambda s: None, log=logged.append) == "Succeeded"
    assert api.deleted == [job["metadata"]["name"]] and "left by an earlier attempt" in logged[0]


def test_killed_pytorchjob_pods_restart_and_a_steps_verdict_does_not():
    job = steps.render("train", [*RUN, "k8s.job_restarts=5"], "pytorchjob")
    assert job["spec"]["runPolicy"]["backoffLimit"] == 5
    assert {r["restartPolicy"] for r in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    jsonschema.validate(job, crd_schema())


# --- k8s/ manifests and docker/ images ---


def test_kustomization_lists_every_manifest_and_each_validates():
    listed = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in (ROOT / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    docs = manifests_in(ROOT / "k8s")
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "ResourceQuota",
        "LimitRange",
        "PriorityClass",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Ingress",
    } <= {d["kind"] for d in docs}
    # What is run by hand, not applied with the rest (k8s/jobs/: the model cache's seeding), and
    # the ConfigMap kustomize generates from the deployment's config, as `kubectl kustomize` does.
    jobs = manifests_in(ROOT / "k8s" / "jobs")
    assert [d["kind"] for d in jobs] == ["Job"]
    for doc in [*docs, *jobs, deployment_configmap()]:
        if doc["kind"] != "ClusterTrainingRuntime":  # Trainer's CRD kind: tests/pipeline/test_trainjob.py
            validate_core(doc)
        for spec in pod_specs(doc):
            assert restricted_violations(spec) == [], doc["metadata"]["name"]
            assert all(check_image("image", image) is None for image in images(spec))
    (seed,) = pod_specs(jobs[0])
    (container,) = seed["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in seed["volumes"]}
    assert (
        volumes[mounts[manifests.HF_CACHE]]["persistentVolumeClaim"]["claimName"] == load_config().k8s.model_cache_claim
    )
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in container["env"]  # the one pod that downloads
    assert volumes["hf-token"]["secret"] == {
        "secretName": load_config().k8s.hf_secret,
        "optional": True,
        "items": [{"key": "HF_TOKEN", "path": "token"}],
    }


def kustomization() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())


def deployment_configmap() -> dict:
    """The ConfigMap kustomization.yaml's configMapGenerator makes from the deployment's config."""
    (generator,) = kustomization()["configMapGenerator"]
    assert generator["options"]["disableNameSuffixHash"] is True  # the Helm values name it as it is
    data = {}
    for item in generator["files"]:
        key, _, path = item.partition("=")
        data[key] = (ROOT / "k8s" / path).read_text()
    meta = {"name": generator["name"], "namespace": generator["namespace"], "labels": generator["options"]["labels"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def helm_values() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "helm" / "airflow-values.yaml").read_text())


def deploy_doc() -> str:
    return (ROOT / "docs" / "deploy.md").read_text()


def test_airflow_helm_values_deliver_the_deployment_config_and_name_secrets_only():
    values = helm_values()
    assert values["executor"] == "KubernetesExecutor"
    # Every Airflow container, task pods included, runs the image of docker/airflow.Dockerfile, on
    # the Airflow version that image is built on; DAGs and plugin come in it, nothing syncs them.
    base = (ROOT / "docker" / "airflow.Dockerfile").read_text().split("\nFROM apache/airflow:", 1)[1]
    assert values["airflowVersion"] == base.split("-", 1)[0]
    check_image("defaultAirflowRepository", f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}")
    assert values["dags"] == {"persistence": {"enabled": False}, "gitSync": {"enabled": False}}
    # FINETUNE_CONFIG names the file the ConfigMap of the deployment's config is mounted as.
    env = {e["name"]: e["value"] for e in values["env"]}
    configmap = deployment_configmap()
    (volume,) = [v for v in values["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]]
    (mount,) = [m for m in values["volumeMounts"] if m["name"] == volume["name"]]
    (key,) = configmap["data"]
    assert env["FINETUNE_CONFIG"] == f"{mount['mountPath']}/{key}" and mount["readOnly"] is True
    assert env["FINETUNE_LAUNCHER"] in steps.LAUNCHERS and env["FINETUNE_LAUNCHER"] != "local"
    assert json.loads(env["AIRFLOW_CONN_KUBERNETES_DEFAULT"]) == {
        "conn_type": "kubernetes",
        "extra": {"in_cluster": True},
    }
    # Credentials only as Secrets by name: no value of one, nor a key the chart would make a Secret of.
    assert not any(word in name for name in env for word in ("PASSWORD", "SECRET", "TOKEN", "KEY_ID"))
    assert {s["envName"]: s["secretName"] for s in values["secret"]} == {
        "AWS_ACCESS_KEY_ID": "finetune-aws",
        "AWS_SECRET_ACCESS_KEY": "finetune-aws",
    }
    assert all(s["secretKey"] == s["envName"] for s in values["secret"])
    assert yaml.safe_load(values["extraEnvFrom"]) == [
        {"secretRef": {"name": "finetune-airflow-connections", "optional": True}}
    ]
    assert not {"fernetKey", "webserverSecretKey", "apiSecretKey", "jwtSecret", "extraSecrets"} & set(values)
    assert "metadataConnection" not in values["data"] and values["postgresql"] == {"enabled": False}
    named = {
        values["data"]["metadataSecretName"],
        *(values[k] for k in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName")),
    }
    doc = deploy_doc()
    # Every Secret the values name is one docs/deploy.md says how to create, in Airflow's namespace.
    for secret in {*named, "finetune-aws", "finetune-airflow-connections"}:
        assert f"kubectl -n airflow create secret generic {secret}" in doc, secret
    assert values["createUserJob"] == {"enabled": False}  # no account whose password everyone knows


def test_the_deployment_config_renders_every_step_and_agrees_with_the_manifests():
    configmap = deployment_configmap()
    (name,) = [path.partition("=")[2] for path in kustomization()["configMapGenerator"][0]["files"]]
    overrides = file_overrides(ROOT / "k8s" / name)  # what every Airflow process reads: FINETUNE_CONFIG
    cfg = load_config(None, overrides)
    docs = manifests_in(ROOT / "k8s")
    (settings,) = [d for d in docs if d["kind"] == "ConfigMap"]
    # Airflow reads results and errors where the steps write them.
    assert cfg.artifact_root == settings["data"]["FINETUNE_ARTIFACT_ROOT"]
    k = cfg.k8s
    assert settings["metadata"]["name"] == k.settings_configmap and settings["metadata"]["namespace"] == k.namespace
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == k.model_cache_claim and claim["metadata"]["namespace"] == k.namespace
    (role_binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert role_binding["metadata"]["namespace"] == k.namespace
    # The ConfigMap lives where Airflow runs: the namespace the RoleBinding's subject is in.
    assert configmap["metadata"]["namespace"] == role_binding["subjects"][0]["namespace"]
    for step in steps.STEPS:
        for launcher in ("kubernetes", "trainjob"):
            manifest = steps.render(step, [*overrides, *(RUN if step == "train" else RUN[:1])], launcher)
            assert manifest["metadata"]["namespace"] == k.namespace


def test_rbac_is_namespaced_and_least_privilege():
    docs = manifests_in(ROOT / "k8s")
    assert not {"ClusterRole", "ClusterRoleBinding"} & {d["kind"] for d in docs}
    (role,) = [d for d in docs if d["kind"] == "Role"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert not any("*" in grant for grant in granted)
    assert {
        ("", "pods", "create"),
        ("", "pods", "delete"),
        ("kubeflow.org", "pytorchjobs", "create"),
        ("kubeflow.org", "pytorchjobs", "watch"),
        ("kubeflow.org", "pytorchjobs", "delete"),
    } <= granted
    assert not any(resource == "secrets" for _, resource, _ in granted)
    step_sa = [d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "finetune-step"]
    assert step_sa and step_sa[0]["automountServiceAccountToken"] is False
    # Granted in `finetune` to Airflow's task pods in their own namespace: the service account
    # the Helm values give them, in the namespace docs/deploy.md installs the chart into.
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == "finetune"
    (subject,) = binding["subjects"]
    workers = helm_values()["workers"]["serviceAccount"]
    assert (subject["kind"], subject["name"]) == ("ServiceAccount", workers["name"]) and workers["create"] is True
    assert subject["namespace"] == "airflow" != binding["metadata"]["namespace"]
    assert f"--namespace {subject['namespace']} -f k8s/helm/airflow-values.yaml" in deploy_doc()
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert {subject["namespace"], binding["metadata"]["namespace"]} <= namespaces


def test_mlflow_server_has_auth_on_and_takes_its_stores_from_secrets():
    (deploy,) = [
        d for d in manifests_in(ROOT / "k8s") if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"
    ]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["args"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert (
        refs["MLFLOW_BACKEND_STORE_URI"] == "mlflow-server" and refs["MLFLOW_ARTIFACTS_DESTINATION"] == "mlflow-server"
    )
    # The basic-auth app does not start without a static CSRF key, nor without Flask-WTF.
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "mlflow-server"
    assert "Flask-WTF==" in (ROOT / "docker" / "mlflow.Dockerfile").read_text()


def test_people_reach_mlflows_ui_through_the_ingress_and_the_steps_through_the_service():
    docs = manifests_in(ROOT / "k8s")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"]
    (ingress,) = [d for d in docs if d["kind"] == "Ingress"]
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "mlflow", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"hosts": [rule["host"]], "secretName": "mlflow-tls"}]
    assert "annotations" not in ingress["metadata"]  # the controller's own: an overlay adds them
    # MLflow answers 403 to a Host it does not list (localhost and private IPs by default, matched
    # exactly) and to a state-changing request from an origin it does not list: the Ingress's
    # host, the UI's origin behind it, and the Service's names with its port must all be there.
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    namespace = service["metadata"]["namespace"]
    assert rule["host"] in hosts
    for name in ("mlflow", f"mlflow.{namespace}", f"mlflow.{namespace}.svc", f"mlflow.{namespace}.svc.cluster.local"):
        assert f"{name}:{port}" in hosts
    assert env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"].split(",") == [f"https://{rule['host']}"]
    # The network policies let the ingress controller and the pipeline's pods in, on MLflow's port.
    allowed = [
        (peer, port_rule["port"])
        for policy in docs
        if policy["kind"] == "NetworkPolicy"
        and policy["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "mlflow"}
        for rule_in in policy["spec"]["ingress"]
        for peer in rule_in["from"]
        for port_rule in rule_in["ports"]
    ]
    assert ({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}, port) in allowed
    assert ({"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "finetune-pipeline"}}}, port) in allowed
    assert ingress["spec"]["ingressClassName"] == "nginx"  # the controller in that namespace


def test_make_images_builds_every_dockerfile_as_the_manifests_and_the_config_name_it():
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "images", "IMAGE_REGISTRY=registry.example.com"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    built = {}
    for line in out.splitlines():
        if line.startswith("docker build "):
            words = line.split()
            built[words[words.index("-f") + 1]] = words[words.index("-t") + 1]
    assert sorted(built) == sorted(f"docker/{p.name}" for p in (ROOT / "docker").glob("*.Dockerfile"))
    values, k = helm_values(), load_config().k8s
    (deploy,) = [
        d for d in manifests_in(ROOT / "k8s") if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"
    ]
    assert built["docker/step-cpu.Dockerfile"] == k.image
    assert built["docker/step-cuda.Dockerfile"] == k.gpu_image
    assert built["docker/airflow.Dockerfile"] == f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}"
    assert built["docker/mlflow.Dockerfile"] == deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    # Without an engine it says so, in words, rather than failing inside docker.
    assert "Docker engine" in (ROOT / "Makefile").read_text().split("\nimages:", 1)[1].split("\n\n", 1)[0]


def test_the_cuda_image_ships_deepspeeds_cpu_adam_built_for_its_accelerator():
    """ZeRO-Offload steps the optimizer with DeepSpeed's CPU Adam, and the CUDA image has no compiler
    to build it in a pod: it is compiled into the wheel in a build stage, for the cuda accelerator
    (DeepSpeed loads a prebuilt op only on the accelerator it was built for), from the sdist."""
    text = (ROOT / "docker" / "step-cuda.Dockerfile").read_text()
    build, runtime = text.split("\nFROM ", 2)[1:]
    assert " AS deepspeed-ops" in build.splitlines()[0]
    assert "DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1" in build and "--no-binary deepspeed" in build
    assert "g++" in build and "g++" not in runtime  # the compiler stays in the build stage
    assert "COPY --from=deepspeed-ops /wheels /wheels" in runtime and "/wheels/deepspeed-*.whl" in runtime
    assert "DS_ACCELERATOR=cuda" in runtime


def test_no_image_is_latest_or_unpinned_anywhere():
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        bases = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("FROM ")]
        assert bases, dockerfile
        for base in bases:
            check_image(f"{dockerfile.name} FROM", base)
        assert "\nUSER root" not in dockerfile.read_text() and "\nUSER " in dockerfile.read_text()
        assert (
            "-c constraints.txt" in dockerfile.read_text()
            or "-c /opt/finetune/constraints.txt" in dockerfile.read_text()
        )


def tool(name: str) -> str:
    """A dev tool from this venv, or checkov from its isolated venv (see the Makefile); missing fails."""
    for candidate in (Path(sys.executable).parent / name, ROOT / ".tools" / name / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is not installed: run 'make install' (CI installs it)"
    return found


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    out = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


@pytest.mark.parametrize("directory, framework", [("k8s", "kubernetes"), ("docker", "dockerfile")])
def test_checkov_finds_nothing_but_documented_skips(directory, framework):
    out = subprocess.run(
        [tool("checkov"), "-d", str(ROOT / directory), "--framework", framework, "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == []
    for r in reports:
        for skipped in r["results"]["skipped_checks"]:
            assert len(skipped.get("check_result", {}).get("suppress_comment", "")) > 20, skipped["check_id"]
    assert sum(r["summary"]["passed"] for r in reports) > 20  # it really checked something


# --- deadlines: a pod or job runs at most its step's timeout ---


@pytest.mark.parametrize("step", list(steps.STEPS))
def test_pods_carry_the_steps_timeout_as_active_deadline_and_still_validate(step):
    from pipeline.config import load_config

    pod = steps.render(step, RUN if step == "train" else RUN[:1], "kubernetes")
    assert pod["spec"]["activeDeadlineSeconds"] == steps.step_timeout(step, load_config())
    validate_core(pod)
    # The DAG passes the deployment's timeout, whatever the run's own config says.
    shorter = steps.render(step, [*RUN[:1], f"timeouts.{step}=999"], "kubernetes", deadline_s=120)
    assert shorter["spec"]["activeDeadlineSeconds"] == 120
    validate_core(shorter)


def test_a_pytorchjob_runs_at_most_the_train_timeout_or_the_job_timeout():
    job = steps.render("train", [*RUN, "timeouts.train=7200"], "pytorchjob")
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200
    jsonschema.validate(job, crd_schema())
    job = steps.render("train", [*RUN, "k8s.job_timeout_seconds=3600"], "pytorchjob", deadline_s=7200)
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 3600


def test_k8s_resources_memory_raises_a_steps_pod_memory_and_k8s_memory_is_refused_naming_it():
    pod = steps.render(
        "train", [*RUN, 'k8s.resources={"train": {"memory": "16Gi"}, "evaluate": {"memory": "6Gi"}}'], "kubernetes"
    )
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "16Gi"
    assert pod["spec"]["containers"][0]["resources"]["requests"]["memory"] == "16Gi"
    validate_core(pod)
    assert (
        steps.render("collect", RUN[:1], "kubernetes")["spec"]["containers"][0]["resources"]["limits"]["memory"]
        == steps.STEPS["collect"].memory
    )
    with pytest.raises(ConfigError) as refused:
        steps.render("train", [*RUN, 'k8s.memory=["train=16Gi", "evaluate=6Gi"]'], "kubernetes")
    assert str(refused.value) == (
        "k8s.memory is replaced by k8s.resources: set k8s.resources.train.memory, k8s.resources.evaluate.memory "
        'instead, e.g. k8s.resources={"train": {"memory": "16Gi"}, "evaluate": {"memory": "6Gi"}} (with any other '
        "steps' k8s.resources entries)"
    )
    suggested = str(refused.value).split("e.g. ", 1)[1].split(" (", 1)[0]  # the value it names, as --set takes it
    pod = steps.render("train", [*RUN, suggested], "kubernetes")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "16Gi"
    with pytest.raises(ConfigError, match="set k8s.resources.train.memory instead"):
        steps.render("train", [*RUN, 'k8s.memory=["train:16Gi"]'], "kubernetes")


def test_the_served_champion_runs_the_step_image_ready_on_ping_with_the_tracking_secret_by_name():
    """k8s/serve.yaml: `mlflow models serve` of the champion in the step image, the way `finetune
    serve` runs it; ready only once /ping answers (the model loaded); credentials by Secret name."""
    docs = {
        (d["kind"], d["metadata"]["name"]): d for d in manifests_in(ROOT / "k8s") if "serve" in d["metadata"]["name"]
    }
    deploy = docs[("Deployment", "finetune-serve")]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["image"] == load_config().k8s.image
    assert c["command"] == ["mlflow"] and c["args"][:3] == [
        "models",
        "serve",
        "--model-uri=models:/support-intents@champion",
    ]
    assert "--env-manager=local" in c["args"] and c["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert c["envFrom"] == [{"secretRef": {"name": load_config().k8s.mlflow_secret}}] and not any(
        "value" in e and "PASSWORD" in e["name"] for e in c["env"]
    )
    service = docs[("Service", "finetune-serve")]
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    # Its label lets it through the policy in front of MLflow, which it reads the model from.
    assert deploy["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "finetune-pipeline"
