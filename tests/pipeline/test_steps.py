import ast
import dataclasses
import os
import re
import sys
import typing

import pytest

from pipeline import local, steps
from pipeline.config import STEP_NAMES, load_config
from pipeline.errors import ConfigError
from tests.helpers import ROOT


def test_overrides_carry_params_then_free_overrides_then_upstream_uris():
    params = {"epochs": 2, "learning_rate": 5e-5, "source": ["s3://bucket/data/"], "overrides": ["train.epochs=4"]}
    upstream = {"collect": {"snapshot_uri": "file:///a/data.parquet"}}
    sets = steps.step_overrides(
        "train", params, upstream, "r1", deployment=['collect.allowed_sources=["s3://bucket/"]']
    )
    assert sets.index("train.epochs=2") < sets.index("train.epochs=4")  # the free-form override wins
    assert sets[-2:] == ["run_id=r1", 'train.snapshot_uri="file:///a/data.parquet"']
    cfg = load_config(None, sets)
    assert cfg.train.epochs == 4 and cfg.collect.sources == ["s3://bucket/data/"] and cfg.run_id == "r1"


def test_missing_upstream_result_is_an_error():
    with pytest.raises(ConfigError, match="upstream result collect.snapshot_uri is missing"):
        steps.step_overrides("evaluate", {}, {"train": {"model_uri": "x"}}, "r1")


def test_every_input_in_the_table_is_a_field_of_the_producing_steps_result_dataclass():
    for row in steps.STEPS.values():
        for key, (source, result_field) in row.inputs.items():
            hint = typing.get_type_hints(steps.STEPS[source].run)["return"]
            (result,) = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
            assert dataclasses.is_dataclass(result), f"{source}.run returns no result dataclass"
            assert result_field in {item.name for item in dataclasses.fields(result)}, (
                f"{row.name}: inputs[{key!r}] reads {source}.{result_field}, no field of {result.__name__}"
            )
    renamed = {
        **steps.STEPS,
        "evaluate": dataclasses.replace(
            steps.STEPS["evaluate"], inputs={"evaluate.model_uri": ("train", "model_path")}
        ),
    }
    with pytest.raises(TypeError, match="train.model_path is no field of the result of step 'train'"):
        steps.check_inputs(renamed)


def test_every_step_of_the_table_has_a_timeout_and_every_timeout_a_step():
    assert set(steps.STEPS) == set(STEP_NAMES) and len(STEP_NAMES) == len(steps.STEPS)
    added = {**steps.STEPS, "deploy": dataclasses.replace(steps.STEPS["promote"], name="deploy")}
    with pytest.raises(
        TypeError, match=r"rows without a timeouts.<step> field \['deploy'\], timeouts without a row \[\]"
    ):
        steps.check_steps(added)
    dropped = {name: row for name, row in steps.STEPS.items() if name != "aliases"}
    with pytest.raises(TypeError, match=r"timeouts without a row \['aliases'\]"):
        steps.check_steps(dropped)


# The name register gives each upstream result it reads (its inputs["<step>"] too).
READERS = {"trained": "train", "evaluated": "evaluate", "validated": "validate", "collected": "collect"}


def result_reads(source: str) -> set[tuple[str, str, int]]:
    """(step, key, line) of each ``trained["key"]``, ``evaluated.get("key")``, ``inputs["train"]["key"]``
    ... in ``source``: the fields of the upstream result JSONs register reads, by name."""
    reads = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
        ):
            target, key = node.func.value, node.args[0]
        else:
            continue
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            continue
        if isinstance(target, ast.Name) and target.id in READERS:
            reads.add((READERS[target.id], key.value, node.lineno))
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id == "inputs":
            if isinstance(target.slice, ast.Constant) and target.slice.value in steps.STEPS:
                reads.add((target.slice.value, key.value, node.lineno))
    return reads


def test_every_upstream_result_field_register_reads_is_a_field_of_that_steps_result_dataclass():
    reads = {
        (step, key, f"{path.name}:{line}")
        for path in sorted((ROOT / "pipeline" / "register").glob("*.py"))
        for step, key, line in result_reads(path.read_text())
    }
    assert {("train", "model_uri"), ("evaluate", "promote"), ("collect", "sha256")} <= {(s, k) for s, k, _ in reads}
    unknown = [
        f"register/{where} reads {step}.{key}"
        for step, key, where in sorted(reads)
        if key not in steps.result_fields(step)
    ]
    assert unknown == [], f"no fields of those steps' result dataclasses: {unknown}"
    renamed = result_reads('trained, evaluated = inputs["train"], inputs["evaluate"]\nuri = trained["model_path"]')
    assert [(step, key) for step, key, _ in renamed if key not in steps.result_fields(step)] == [
        ("train", "model_path")
    ]


def test_the_overrides_carry_the_config_they_built_once():
    sets = steps.step_overrides("train", {"epochs": 3}, {"collect": {"snapshot_uri": "file:///s.parquet"}}, "r1")
    assert steps.config_of(sets) is steps.config_of(sets) == load_config(None, sets)
    assert steps.config_of(sets).train.epochs == 3 and sets.trusted.train.epochs != 3
    sets.append("train.epochs=5")  # changed since: its own config
    assert steps.config_of(sets).train.epochs == 5


def test_argv_is_the_container_argv_and_training_is_distributed():
    assert steps.step_argv("collect", ["run_id=r"]) == ["finetune", "collect", "--set", "run_id=r"]
    command = local.local_command("train", ["train.num_processes=3"], "/tmp/r.json")
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    assert command[5:] == ["-m", "pipeline", "train", "--set", "train.num_processes=3", "--result-file", "/tmp/r.json"]
    assert local.local_command("evaluate", [], "/r")[:4] == [sys.executable, "-m", "pipeline", "evaluate"]


def test_bad_override_fails_before_any_process_starts():
    with pytest.raises(ConfigError, match="train.num_processes: 0 is below the minimum 1"):
        local.local_command("train", ["train.num_processes=0"], "/r")


def test_unknown_step_and_launcher(monkeypatch):
    with pytest.raises(ConfigError, match="unknown step 'deploy'"):
        steps.step_argv("deploy", [])
    monkeypatch.setenv("FINETUNE_LAUNCHER", "slurm")
    with pytest.raises(ConfigError, match="unknown launcher 'slurm'"):
        local.launch("collect", [])


def test_failed_step_reports_its_error_and_is_not_retryable(tmp_path):
    with pytest.raises(steps.StepFailed) as failed:
        local.launch_local("collect", [f'collect.sources=["{tmp_path}/nothing-*.jsonl"]', "run_id=r"])
    assert "matches no files" in str(failed.value)
    assert failed.value.returncode == 2 and not failed.value.retryable


def test_aws_env_from_connection_fields_leaves_out_what_is_not_set():
    extra = {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1", "aws_session_token": "token"}
    assert local.aws_env("key-id", "secret", extra) == {
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    # A connection with only a region (keys from an instance role): the chain supplies the rest.
    assert local.aws_env(None, "", {"region_name": "eu-west-1"}) == {"AWS_DEFAULT_REGION": "eu-west-1"}


def test_extra_env_reaches_the_step_and_wins_over_this_process(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env = local.local_env({"AWS_DEFAULT_REGION": "eu-west-1"})
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1" and env["PATH"]
    assert local.local_env()["AWS_DEFAULT_REGION"] == "us-east-1"


# --- what a trigger may set: the deployment's trigger_keys --------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "evaluate.metric_direction=lower",  # would turn the accuracy gate upside down
        'evaluate.thresholds=["accuracy>=0.0"]',
        "evaluate.promotion_margin=0",
        "k8s.image=any/image:1",  # any image, with the S3 and MLflow secrets mounted
        "artifact_root=s3://elsewhere/",
        'validate.warn_only=["label_allowed"]',
        "run_id=another-run",  # would overwrite another run's artifacts
        'trigger_keys=["*"]',  # a trigger can never widen its own allow-list
    ],
)
def test_a_trigger_may_not_set_a_key_outside_the_deployments_allow_list(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' may not be set by a trigger .* trigger_keys"):
        steps.step_overrides("collect", {"overrides": [override]}, {}, "r1")


def test_the_deployment_config_is_trusted_and_can_widen_the_allow_list(tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text(
        "evaluate:\n  metric_direction: lower\ntrain:\n  epochs: 3\n"
        "trigger_keys: [collect.sources, 'train.*', evaluate.promotion_margin]\n"
    )
    overrides = steps.deployment_overrides({"FINETUNE_CONFIG": str(deployment)})
    # The deployment's own keys are never checked; its allow-list then governs the trigger.
    sets = steps.step_overrides(
        "train",
        {"epochs": 3, "overrides": ["evaluate.promotion_margin=0.01"]},
        {"collect": {"snapshot_uri": "file:///s.parquet"}},
        "r1",
        deployment=overrides,
    )
    cfg = load_config(None, sets)
    assert cfg.evaluate.metric_direction == "lower" and cfg.evaluate.promotion_margin == 0.01
    assert (
        cfg.train.epochs == 3 and "train.epochs=3" not in sets[len(overrides) :]
    )  # a Param at its default sends nothing
    assert (
        load_config(
            None,
            steps.step_overrides("train", {"epochs": 7}, {"collect": {"snapshot_uri": "x"}}, "r", deployment=overrides),
        ).train.epochs
        == 7
    )
    with pytest.raises(ConfigError, match="model_name 'other' matches no pattern of allowed_model_names"):
        steps.step_overrides(
            "train", {"model_name": "other"}, {"collect": {"snapshot_uri": "x"}}, "r", deployment=overrides
        )


def test_a_shipped_recipe_that_moves_the_gate_works_as_the_deployments_config():
    recipe = ROOT / "pipeline" / "configs" / "support_chat_qwen.yaml"
    overrides = steps.deployment_overrides({"FINETUNE_CONFIG": str(recipe)})
    cfg = load_config(None, steps.step_overrides("collect", {}, {}, "r1", deployment=overrides))
    assert cfg.evaluate.gate_metric == load_config(recipe).evaluate.gate_metric != ""


def test_finetune_run_refuses_a_trigger_key_before_airflow_starts(capsys):
    from pipeline import dagrun

    assert dagrun.main(["--set", "evaluate.metric_direction=lower"]) == 2
    assert "run --set: 'evaluate.metric_direction' may not be set by a trigger" in capsys.readouterr().err


def test_a_trigger_may_turn_promotion_off_but_never_on(tmp_path):
    upstream = {"collect": {"snapshot_uri": "file:///s.parquet"}}
    # The finetune DAG's `promote` Param is evaluate.promote; off passes whatever trigger_keys say.
    narrow = steps.deployment_overrides(_deployment_file(tmp_path, "narrow", "trigger_keys: ['train.*']\n"))
    sets = steps.step_overrides("train", {"promote": False}, upstream, "r1", deployment=narrow)
    assert "evaluate.promote=false" in sets and load_config(None, sets).evaluate.promote is False
    assert "evaluate.promote=true" not in steps.step_overrides("train", {"promote": True}, upstream, "r1")  # default
    # A deployment that turned promotion off: a trigger cannot turn it back on, by Param or override.
    off = steps.deployment_overrides(_deployment_file(tmp_path, "off", "evaluate: {promote: false}\n"))
    for params in ({"promote": True}, {"overrides": ["evaluate.promote=true"]}):
        with pytest.raises(ConfigError, match="'evaluate.promote' is false in the deployment's config; a trigger may "):
            steps.step_overrides("train", params, upstream, "r1", deployment=off)
    assert (
        load_config(None, steps.step_overrides("train", {}, upstream, "r1", deployment=off)).evaluate.promote is False
    )


def _deployment_file(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return {"FINETUNE_CONFIG": str(path)}


def test_finetune_run_no_promote_registers_a_challenger_only_and_says_so(tmp_path, classifier_dir, monkeypatch, capsys):
    """`finetune run --no-promote` sends evaluate.promote=false as the trigger's override; the
    finetune DAG's evaluate and register, run here from that conf in place of `airflow dags
    test`, register the version as challenger, and the summary says why champion did not move."""
    import json

    from pipeline import dagrun, storage
    from pipeline.config import safe_run_id
    from tests.helpers import run_step_here, write_snapshot

    snapshot = write_snapshot(
        tmp_path / "s.parquet",
        [("where is my order", "order_status", "eval"), ("reset my password", "password_reset", "eval")] * 3,
        ["text", "label", "split"],
    )
    results = {name: (tmp_path / f"{name}.json").as_uri() for name in ("collect", "validate", "train")}
    storage.write_json(results["collect"], {"snapshot_uri": snapshot, "sha256": "ab" * 32, "rows": 6})
    storage.write_json(results["validate"], {})
    storage.write_json(results["train"], {"model_uri": str(classifier_dir), "snapshot_uri": snapshot})
    upstream = {
        "collect": {"snapshot_uri": snapshot, "result_uri": results["collect"]},
        "validate": {"result_uri": results["validate"]},
        "train": {"model_uri": str(classifier_dir), "result_uri": results["train"]},
    }
    sent = []

    def dag_run_here(dag_id, conf, env_extra=None):
        sent.append(conf)
        run_id = "manual__smoke"
        for step in ("evaluate", "register"):
            upstream[step] = run_step_here(step, steps.step_overrides(step, conf, upstream, safe_run_id(run_id)))
        return run_id

    monkeypatch.setattr(dagrun, "test_dag", dag_run_here)
    assert dagrun.main(["--no-promote"]) == 0
    assert sent == [{"overrides": ["evaluate.promote=false"]}]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["aliases"] == ["challenger"]
    assert summary["reason"].startswith(
        "promotion is off (evaluate.promote=false): registered as challenger, champion untouched; the gate "
    )
    from pipeline.tracking import client

    version = client().get_model_version("support-intents", summary["version"])
    assert version.tags["finetune.gate_passed"] == "false" and "evaluate.promote=false" in version.tags["finetune.gate"]
    assert "champion" not in client().get_registered_model("support-intents").aliases


# --- timeouts: a step that hangs is stopped with every process it started --------------------

# A step's process tree as torchrun makes it: the leader starts a worker in a session of its own
# (torchrun does, start_new_session=True), which ignores SIGTERM and has a child of its own.
HANGING_TREE = r"""
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", '''
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "a").write(f"{child.pid}\\n")
time.sleep(600)
''', sys.argv[1]], start_new_session=True)
open(sys.argv[1], "a").write(f"{os.getpid()}\n{worker.pid}\n")
print("tree started", flush=True)
time.sleep(600)
"""


def running(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_for_pids(path, count: int, seconds: float = 30.0) -> list[int]:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = [int(line) for line in path.read_text().split()] if path.exists() else []
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"the process tree did not start: {path.read_text() if path.exists() else 'no pids'}")


def test_a_hanging_step_is_killed_at_its_timeout_and_nothing_it_started_is_left(tmp_path):
    import collections
    import time

    pids_file = tmp_path / "pids"
    handles = []
    tail = collections.deque(maxlen=5)
    started = time.monotonic()
    code = local.run_step_process(
        [sys.executable, "-c", HANGING_TREE, str(pids_file)],
        local.local_env(),
        timeout_s=3,
        grace_s=1,
        started=handles.append,
        tail=tail,
    )
    elapsed = time.monotonic() - started
    assert code is None  # ran past its timeout
    pids = wait_for_pids(pids_file, 3, seconds=1)
    assert running(pids) == [] and handles[0].members() == []
    assert 3 <= elapsed < 3 + 1 + 8  # the timeout, the grace, then SIGKILL for the one ignoring SIGTERM
    assert "tree started" in tail


def test_torchrun_workers_are_stopped_when_airflow_interrupts_the_wait(tmp_path):
    """Airflow's execution_timeout raises inside the task (SIGALRM); the step's processes,
    torchrun's workers in their own sessions included, must not outlive the task."""
    import signal

    pids_file = tmp_path / "pids"
    worker = f"echo $BASHPID >> {pids_file}; exec sleep 600"  # torchrun's macros would eat "$$"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--no-python",
        "bash",
        "-c",
        worker,
    ]
    handles = []

    def execution_timeout(signum, frame):
        raise TimeoutError("execution_timeout")

    def tree_is_up(process):
        handles.append(process)
        wait_for_pids(pids_file, 2, 19)
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # fires inside the wait, not 20 s after the start

    previous = signal.signal(signal.SIGALRM, execution_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, 20)  # the backstop, should the workers never start
        with pytest.raises(TimeoutError):
            # Waits for the workers first, so the alarm interrupts a tree that is fully up.
            local.run_step_process(command, local.local_env(), grace_s=5, started=tree_is_up)
            pytest.fail("the alarm should have interrupted the wait")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    workers = wait_for_pids(pids_file, 2, seconds=1)
    assert running(workers) == [] and running([handles[0].popen.pid]) == []
    assert handles[0].members() == []


def test_launch_local_stops_a_step_hanging_on_a_silent_source_and_names_the_setting(tmp_path):
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/data.jsonl"
        handles = []
        with pytest.raises(steps.StepFailed) as failed:
            local.launch_local(
                "collect", [f'collect.sources=["{url}"]', "run_id=r"], timeout_s=4, grace_s=2, started=handles.append
            )
    assert failed.value.returncode == steps.TIMEOUT_EXIT_CODE and failed.value.retryable
    assert "ran past its timeout of 4 s" in str(failed.value) and "timeouts.collect" in str(failed.value)
    assert handles[0].members() == [] and running([handles[0].popen.pid]) == []


def test_step_timeouts_come_from_the_deployment_and_a_trigger_cannot_lift_them(tmp_path):
    defaults = load_config()
    assert [
        steps.step_timeout(step, defaults) for step in ("collect", "validate", "evaluate", "register", "promote")
    ] == [1800, 1800, 3600, 1800, 900]  # minutes
    assert steps.step_timeout("train", defaults) == 6 * 3600  # hours
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("timeouts:\n  train: 7200\n")
    assert (
        steps.step_timeout("train", load_config(None, steps.deployment_overrides({"FINETUNE_CONFIG": str(deployment)})))
        == 7200
    )
    with pytest.raises(ConfigError, match="'timeouts.train' may not be set by a trigger"):
        steps.step_overrides("train", {"overrides": ["timeouts.train=86400"]}, {"collect": {"snapshot_uri": "x"}}, "r")
    with pytest.raises(ConfigError, match="timeouts.train: 1 is below the minimum 10"):
        load_config(None, ["timeouts.train=1"])
    assert all(steps.step_timeout(step, defaults) > 0 for step in steps.STEPS)  # every row has its timeout


def test_a_local_step_reads_nothing_from_the_workers_stdin(tmp_path):
    """Whatever the worker's stdin holds (here a 'y' waiting on it), a step reads end-of-file: no
    prompt of a library it runs (transformers' "run the custom code? [y/N]") can be answered."""
    import collections

    read, write = os.pipe()
    os.write(write, b"y\n")
    os.close(write)
    saved = os.dup(0)
    os.dup2(read, 0)
    tail = collections.deque(maxlen=5)
    try:
        code = local.run_step_process(
            [sys.executable, "-c", "import sys; print('stdin:', repr(sys.stdin.read()))"], local.local_env(), tail=tail
        )
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)
    assert code == 0
    assert "stdin: ''" in tail, list(tail)
