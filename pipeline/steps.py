"""The one table that knows each step: its upstream inputs, resources and how it is launched.

A DAG task is built from a row of ``STEPS`` by the factory in ``dags/``; it turns the DAG
Params and the upstream results into ``--set`` overrides (``step_overrides``) and hands the argv
(``step_argv``) to a launcher. Every launcher runs exactly that argv: ``local`` as a subprocess
(training under ``torch.distributed.run`` over ``train.num_processes`` processes), ``kubernetes``
as one Pod per step and ``pytorchjob`` as a Pod per step but training as a multi-node Kubeflow
PyTorchJob (``render`` builds those manifests with ``pipeline/k8s.py``; the DAG submits them).

    python -c "from pipeline import steps; print(steps.step_argv('train', ['train.epochs=1']))"

Pure Python: this module never imports Airflow and is imported at DAG parse time.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli import step_error
from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError, ValidationFailed

LAUNCHERS = ("local", "kubernetes", "pytorchjob")


@dataclass(frozen=True)
class Step:
    name: str
    # config key <- (upstream step, field of its result JSON)
    inputs: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    distributed: bool = False  # started over N processes by torch.distributed.run
    cpu: str = "1"
    memory: str = "2Gi"
    gpus: int = 0


STEPS: dict[str, Step] = {
    "collect": Step("collect"),
    "validate": Step("validate", inputs={"validate.snapshot_uri": ("collect", "snapshot_uri")}),
    "train": Step("train", inputs={"train.snapshot_uri": ("collect", "snapshot_uri")},
                  distributed=True, cpu="2", memory="8Gi", gpus=1),
    "evaluate": Step("evaluate", inputs={"evaluate.snapshot_uri": ("collect", "snapshot_uri"),
                                         "evaluate.model_uri": ("train", "model_uri")}, memory="4Gi"),
    "register": Step("register", inputs={"register.train_result_uri": ("train", "result_uri"),
                                         "register.evaluate_result_uri": ("evaluate", "result_uri"),
                                         "register.validate_result_uri": ("validate", "result_uri"),
                                         "register.collect_result_uri": ("collect", "result_uri")},
                     memory="4Gi"),
    "promote": Step("promote", memory="1Gi"),
}

# The finetune DAG's tasks, in order; promote runs in a DAG of its own.
PIPELINE: tuple[str, ...] = ("collect", "validate", "train", "evaluate", "register")

# DAG Param name -> config key. The Params' types, bounds and defaults come from the config fields.
PARAM_KEYS: dict[str, str] = {
    "source": "collect.sources",
    "model_name": "model_name",
    "task": "task",
    "base_model": "base_model",
    "epochs": "train.epochs",
    "learning_rate": "train.learning_rate",
    "batch_size": "train.batch_size",
    "zero_stage": "train.zero_stage",
    "num_processes": "train.num_processes",
    "promotion_margin": "evaluate.promotion_margin",
}


def step_overrides(step: str, params: Mapping[str, Any], upstream: Mapping[str, Mapping[str, Any]],
                   run_id: str) -> list[str]:
    """``key=value`` overrides for one step: Params, then the free-form ``overrides`` Param, then
    the run id and upstream result URIs (which a user override must not redirect)."""
    sets = [f"{key}={json.dumps(params[name])}" for name, key in PARAM_KEYS.items() if name in params]
    sets += list(params.get("overrides") or [])
    sets.append(f"run_id={run_id}")
    for key, (source, result_field) in STEPS[step].inputs.items():
        if source not in upstream or result_field not in upstream[source]:
            raise ConfigError(f"{step}: upstream result {source}.{result_field} is missing")
        sets.append(f"{key}={json.dumps(upstream[source][result_field])}")
    return sets


def step_argv(step: str, overrides: Sequence[str]) -> list[str]:
    """The container argv for ``step``: ``finetune <step> --set k=v ...``."""
    if step not in STEPS:
        raise ConfigError(f"unknown step '{step}'; steps are {list(STEPS)}")
    return ["finetune", step, *(part for item in overrides for part in ("--set", item))]


def local_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The step subprocess's environment: this one, plus ``extra`` (e.g. ``aws_env``), which wins."""
    env = {**os.environ, **(extra or {})}
    if "DS_ACCELERATOR" not in env and not Path("/dev/nvidia0").exists():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator; gloo for collectives
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def local_command(step: str, overrides: Sequence[str], result_file: str) -> list[str]:
    """The subprocess command of the local launcher for the same argv a container gets."""
    cfg = load_config(None, overrides)  # fail here, before any process starts, on a bad override
    args = [*step_argv(step, overrides)[1:], "--result-file", result_file]
    if STEPS[step].distributed:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={cfg.train.num_processes}", "-m", "pipeline", *args]
    return [sys.executable, "-m", "pipeline", *args]


class StepFailed(PipelineError):
    """A launched step exited non-zero; the message carries its own error line."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode
        # Exit codes 2 and 3 are the steps' own verdicts on bad input; anything else (a crash,
        # an OOM kill, a lost node) may succeed on a retry.
        self.retryable = returncode not in (ConfigError.exit_code, ValidationFailed.exit_code)


def check_launcher(launcher: str, origin: str = "FINETUNE_LAUNCHER") -> str:
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{origin}: unknown launcher '{launcher}'; choose one of {list(LAUNCHERS)}")
    return launcher


def launcher_from_env() -> str:
    """The launcher named by ``FINETUNE_LAUNCHER`` (default ``local``), checked."""
    return check_launcher(os.environ.get("FINETUNE_LAUNCHER", "local"))


def aws_env(login: str | None, password: str | None, extra: Mapping[str, Any]) -> dict[str, str]:
    """boto3's environment variables from the fields of an AWS connection in Airflow's layout
    (login, password, extra ``aws_session_token``, ``endpoint_url``, ``region_name``); a field
    left empty is left out, so the standard AWS chain still supplies it."""
    values = {"AWS_ACCESS_KEY_ID": login, "AWS_SECRET_ACCESS_KEY": password,
              "AWS_SESSION_TOKEN": extra.get("aws_session_token"), "AWS_ENDPOINT_URL": extra.get("endpoint_url"),
              "AWS_DEFAULT_REGION": extra.get("region_name")}
    return {name: str(value) for name, value in values.items() if value}


def launch(step: str, overrides: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one step with the launcher named by ``FINETUNE_LAUNCHER`` and return its result JSON;
    ``env`` goes into the step's environment (``local_env``)."""
    launcher = launcher_from_env()
    if launcher != "local":
        # Pods and PyTorchJobs are submitted by the DAG's operators, which Airflow can watch,
        # log and kill; this process never talks to a cluster itself.
        raise ConfigError(f"FINETUNE_LAUNCHER: '{launcher}' steps are submitted by the finetune DAG; "
                          f"'finetune render --step {step} --launcher {launcher}' shows the manifest")
    return launch_local(step, overrides, env)


def uses_pytorchjob(step: str, launcher: str) -> bool:
    """With the ``pytorchjob`` launcher the distributed step (train) runs as a PyTorchJob, the rest as pods."""
    return launcher == "pytorchjob" and STEPS[step].distributed


def render(step: str, overrides: Sequence[str], launcher: str) -> dict[str, Any]:
    """The manifest ``launcher`` submits for ``step``: a Pod, or a PyTorchJob for training.

    The config is validated first, so a bad value fails here, naming its key, and nothing is submitted.
    """
    from pipeline import k8s

    check_launcher(launcher, "--launcher")
    if launcher == "local":
        raise ConfigError("--launcher: 'local' runs a subprocess, not a manifest; "
                          f"choose one of {[name for name in LAUNCHERS if name != 'local']}")
    step_args = step_argv(step, overrides)[1:]
    cfg = load_config(None, overrides)
    if uses_pytorchjob(step, launcher):
        return k8s.pytorchjob_manifest(cfg, STEPS[step], step_args)
    return k8s.pod_manifest(cfg, STEPS[step], step_args)


def launch_local(step: str, overrides: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``step`` as a subprocess, stream its output to this log, return its result JSON."""
    with tempfile.TemporaryDirectory(prefix=f"finetune-{step}-") as tmp:
        result_file = str(Path(tmp) / "result.json")
        command = local_command(step, overrides, result_file)
        print("launch:", " ".join(command), flush=True)
        tail: collections.deque[str] = collections.deque(maxlen=40)
        with subprocess.Popen(command, env=local_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as process:
            assert process.stdout is not None
            for line in process.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip())
        if process.returncode != 0:
            # The step's own verdict, when it gave one; torch.distributed.run exits 1 whatever its
            # workers said, so the exit code is read back from error.json too.
            error = step_error(load_config(None, overrides).step_uri(step))
            if error is not None:
                raise StepFailed(f"step '{step}' failed: {error['error']}", int(error["exit_code"]))
            reason = "\n".join(list(tail)[-10:])
            raise StepFailed(f"step '{step}' exited with code {process.returncode}: {reason}", process.returncode)
        return json.loads(Path(result_file).read_text())
