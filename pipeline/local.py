"""The local launcher: a step as a subprocess of this process (training under
``torch.distributed.run`` over ``train.num_processes`` processes), running the argv a container
gets (``steps.step_argv``), its output streamed to this log, its result JSON read back.

The step runs in a session of its own; past its timeout, or when the caller is interrupted
(Airflow's execution_timeout, a kill of the task), every process it started is stopped, torchrun's
workers included. A failed step is judged by the retry table in ``pipeline.steps``
(``classify_failure``), as on every launcher.

    python -c "from pipeline import local; print(local.local_command('train', ['train.epochs=1'], 'result.json'))"

Launching layer, above the step table it reads; never Airflow. It is imported at DAG parse time
(the local task's operator), so what it imports keeps heavy libraries inside functions.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from pipeline import steps
from pipeline.distributed import default_accelerator
from pipeline.errors import ConfigError

# Every process a local step starts carries this variable (value: the launch's id), so a stop finds
# them all, even the torchrun workers, which run in sessions of their own and outlive their parent
# if it dies first (the idea of Jenkins' process tree killer).
LAUNCH_TAG = "FINETUNE_LAUNCH_ID"


def launch(step: str, overrides: Sequence[str], env: Mapping[str, str] | None = None, **local: Any) -> dict[str, Any]:
    """Run one step with the launcher named by ``FINETUNE_LAUNCHER`` and return its result JSON;
    ``env`` goes into the step's environment (``local_env``), ``local`` to ``launch_local``
    (``timeout_s``, ``grace_s``, ``started``)."""
    launcher = steps.launcher_from_env()
    if launcher != "local":
        # Pods and PyTorchJobs are submitted by the DAG's operators, which Airflow can watch,
        # log and kill; this process never talks to a cluster itself.
        raise ConfigError(
            f"FINETUNE_LAUNCHER: '{launcher}' steps are submitted by the finetune DAG; "
            f"'finetune render --step {step} --launcher {launcher}' shows the manifest"
        )
    return launch_local(step, overrides, env, **local)


def launch_local(
    step: str,
    overrides: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    grace_s: float = 30.0,
    started: Callable[[StepProcess], None] | None = None,
) -> dict[str, Any]:
    """Run ``step`` as a subprocess, stream its output to this log, return its result JSON.

    The step runs in a process group of its own; past ``timeout_s`` seconds, or when this call is
    interrupted, every process of it gets SIGTERM, then SIGKILL after ``grace_s``."""
    with tempfile.TemporaryDirectory(prefix=f"finetune-{step}-") as tmp:
        result_file = str(Path(tmp) / "result.json")
        command = local_command(step, overrides, result_file)
        print("launch:", " ".join(command), flush=True)
        tail: collections.deque[str] = collections.deque(maxlen=40)
        oom_before = oom_kills()
        began = time.monotonic()
        returncode = run_step_process(command, local_env(env), timeout_s, grace_s, started, tail)
        print(f"launch: step '{step}' ended ({returncode}) after {time.monotonic() - began:.2f} s", flush=True)
        oom_after = oom_kills()
        oom = None if oom_before is None or oom_after is None else oom_after > oom_before
        if returncode is None:
            raise steps.StepFailed(
                f"step '{step}' ran past its timeout of {timeout_s:g} s and was stopped, with every "
                f"process it started; if it needs longer, raise timeouts.{step} in the deployment's "
                "config (FINETUNE_CONFIG)",
                steps.TIMEOUT_EXIT_CODE,
            )
        if returncode != 0:
            # The step's own verdict, when it gave one; torch.distributed.run exits 1 whatever its
            # workers said, so the exit code is read back from error.json too.
            error = steps.step_error(steps.config_of(overrides).step_uri(step))
            raise steps.classify_failure(step, "local", returncode, error, detail="\n".join(list(tail)[-10:]), oom=oom)
        return json.loads(Path(result_file).read_text())


def local_command(step: str, overrides: Sequence[str], result_file: str) -> list[str]:
    """The subprocess command of the local launcher for the same argv a container gets."""
    cfg = steps.config_of(overrides)  # fail here, before any process starts, on a bad override
    args = [*steps.step_argv(step, overrides)[1:], "--result-file", result_file]
    if steps.STEPS[step].distributed:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={cfg.train.num_processes}",
            "-m",
            "pipeline",
            *args,
        ]
    return [sys.executable, "-m", "pipeline", *args]


def local_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The step subprocess's environment: this one, plus ``extra`` (e.g. ``aws_env``), which wins."""
    env = {**os.environ, **(extra or {})}
    env.update(default_accelerator(env))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def aws_env(login: str | None, password: str | None, extra: Mapping[str, Any]) -> dict[str, str]:
    """boto3's environment variables from the fields of an AWS connection in Airflow's layout
    (login, password, extra ``aws_session_token``, ``endpoint_url``, ``region_name``); a field
    left empty is left out, so the standard AWS chain still supplies it."""
    values = {
        "AWS_ACCESS_KEY_ID": login,
        "AWS_SECRET_ACCESS_KEY": password,
        "AWS_SESSION_TOKEN": extra.get("aws_session_token"),
        "AWS_ENDPOINT_URL": extra.get("endpoint_url"),
        "AWS_DEFAULT_REGION": extra.get("region_name"),
    }
    return {name: str(value) for name, value in values.items() if value}


class StepProcess:
    """A local step: its command in a session of its own, and every process it starts."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.tag = uuid.uuid4().hex
        self.popen = subprocess.Popen(
            list(command),
            env={**env, LAUNCH_TAG: self.tag},
            stdin=subprocess.DEVNULL,  # nothing may answer a prompt (transformers' "run the custom code? [y/N]")
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )

    def members(self) -> list[psutil.Process]:
        """The live processes of this step: its process group (the leader's session) and every
        process carrying its tag, wherever it moved."""
        found = []
        for proc in psutil.process_iter():
            if proc.pid == os.getpid():
                continue
            try:
                if os.getpgid(proc.pid) == self.popen.pid or proc.environ().get(LAUNCH_TAG) == self.tag:
                    found.append(proc)
            except (psutil.Error, OSError):  # gone meanwhile, or another user's
                continue
        return found

    def stop(self, grace_s: float) -> None:
        """SIGTERM every process of the step, SIGKILL what is left after ``grace_s``. Safe in a
        signal handler (the leader is polled, never waited on under Popen's lock) and idempotent."""
        for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            procs = self.members()
            if not procs:
                return
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signum)
            deadline = time.monotonic() + wait_s
            others = [proc for proc in procs if proc.pid != self.popen.pid]
            while time.monotonic() < deadline:
                # The leader is our child: reaped by poll(); the others are reaped by init or their parent.
                leader_done = self.popen.poll() is not None
                others = [proc for proc in others if _alive(proc)]
                if leader_done and not others:
                    break
                time.sleep(0.05)

    def wait(self, timeout_s: float | None) -> int | None:
        """The leader's exit code, or None when it still runs after ``timeout_s`` seconds."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (code := self.popen.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.1)  # short waits: Popen.wait() without a timeout holds a lock a signal handler needs
        return code


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_step_process(
    command: Sequence[str],
    env: Mapping[str, str],
    timeout_s: float | None = None,
    grace_s: float = 30.0,
    started: Callable[[StepProcess], None] | None = None,
    tail: collections.deque[str] | None = None,
) -> int | None:
    """Run ``command`` as a local step, its output streamed to this log (and its last lines kept
    in ``tail``); return its exit code, or None when it ran past ``timeout_s``. Whatever ends
    the wait -- the step, its timeout, an exception here (Airflow's execution_timeout, a kill) --
    no process of the step is left running. ``started`` gets the running step (for ``on_kill``)."""
    tail = collections.deque(maxlen=40) if tail is None else tail
    process = StepProcess(command, env)

    def pump() -> None:
        assert process.popen.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under it: the step was stopped
            for line in process.popen.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip())

    reader = threading.Thread(target=pump, name="step-output", daemon=True)
    reader.start()
    try:
        if started is not None:
            started(process)
        code = process.wait(timeout_s)
    finally:
        process.stop(grace_s)  # the step's stragglers too: a torchrun worker whose parent died
        reader.join(timeout=5)
        if process.popen.stdout is not None:
            process.popen.stdout.close()
    return code


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer ended in this process's memory cgroup (cgroup v2
    ``memory.events``, v1 ``memory.oom_control``); None where neither can be read. A step killed
    by SIGKILL is out of memory only if this count rose meanwhile: otherwise someone else killed
    it (a preemption, a person, a node agent) and a retry may well succeed."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control")
    for candidate in candidates:
        try:
            for entry in candidate.read_text().splitlines():
                key, _, value = entry.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None
