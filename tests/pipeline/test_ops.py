"""DeepSpeed's C++ ops and the train step's start-up: a build lock left by a killed build never
hangs a later step, a live build is waited for (not broken), and a step that waits in silence
fails naming where. Real torch builds and FileBaton, on copies of the ops ``make install`` built,
in subprocesses (a hang here must not hang the suite: every wait is bounded)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train import ops
from tests.helpers import built_ops_copy, subprocess_env

PROBE_S = 60  # the bound: trains, or fails clearly, within a minute


def _python(code: str, extensions: Path, timeout: float = PROBE_S) -> subprocess.CompletedProcess:
    env = subprocess_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions))
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


SHM = "deepspeed_shm_comm"


def test_a_stale_build_lock_is_removed_and_the_op_loads_at_once(tmp_path):
    extensions = built_ops_copy(tmp_path / "ext", SHM)
    stale = extensions / SHM / "lock"
    stale.touch()  # what a process killed mid-build leaves

    # torch alone waits on it, even though the op is built: the hang this guards against.
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pipeline.train import ops; [builder] = ops._builders([{ops.SHM_COMM!r}]); "
            "print('loading', flush=True); builder.load()",
        ],
        env=subprocess_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert waiting.stdout.readline().strip() == "loading"
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=4)
    finally:
        waiting.kill()
        waiting.wait()

    began = time.monotonic()
    done = _python(f"from pipeline.train import ops; print(ops.prepare([{ops.SHM_COMM!r}]))", extensions)
    assert done.returncode == 0, done.stderr
    assert f"removed {stale}" in done.stdout and "no live build holds" in done.stdout
    assert done.stdout.strip().endswith("[]")  # loaded, nothing rebuilt
    assert not stale.exists() and time.monotonic() - began < PROBE_S


def test_a_live_build_is_waited_for_and_its_lock_left_alone(tmp_path):
    extensions = built_ops_copy(tmp_path / "ext", SHM)
    live, go = extensions / SHM / "lock", tmp_path / "go"
    holder = subprocess.Popen(  # a build in progress: the pipeline's flock held, torch's lock file there
        [
            sys.executable,
            "-c",
            "import time\nfrom pathlib import Path\nfrom pipeline.train import ops\n"
            f"with ops._build_lock(Path({str(extensions)!r}), print):\n"
            f"    Path({str(live)!r}).touch(); print('holding', flush=True)\n"
            f"    for _ in range(600):\n        if Path({str(go)!r}).exists(): break\n        time.sleep(0.1)\n"
            f"    Path({str(live)!r}).unlink()\n",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        waiter = subprocess.Popen(
            [sys.executable, "-c", f"from pipeline.train import ops; ops.prepare([{ops.SHM_COMM!r}])"],
            env=subprocess_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions)),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert f"waiting for pid {holder.pid} on " in waiter.stdout.readline()
        assert live.exists()  # not removed from under the live build
        go.touch()
        rest, _ = waiter.communicate(timeout=PROBE_S)
        assert holder.wait(timeout=PROBE_S) == 0 and waiter.returncode == 0
    finally:
        for process in (holder, waiter):
            if process is not None:
                process.kill()
    assert "removed" not in rest  # the holder's lock was its own to remove


def test_a_holder_killed_mid_build_frees_the_pipeline_lock(tmp_path):
    extensions = tmp_path / "ext"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom pathlib import Path\nfrom pipeline.train import ops\n"
            f"with ops._build_lock(Path({str(extensions)!r}), print):\n    print('holding', flush=True); time.sleep(60)\n",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()
    took = _python(
        f"import time; from pathlib import Path; from pipeline.train import ops; t = time.monotonic()\n"
        f"with ops._build_lock(Path({str(extensions)!r}), print): print(round(time.monotonic() - t, 1))",
        extensions,
        timeout=20,
    )
    assert took.returncode == 0 and float(took.stdout.split()[-1]) < 2, took


def test_a_silent_wait_while_starting_fails_naming_the_lock_file(tmp_path):
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    code = (
        "from torch.utils.file_baton import FileBaton\nfrom pipeline.errors import TransientError\n"
        "from pipeline.train import startup\n"
        "try:\n"
        "    with startup.watchdog(2):\n"
        "        print('loading', flush=True)\n"  # a print re-arms it; then nothing for 2 s
        f"        FileBaton({str(lock)!r}).wait()\n"
        "except TransientError as exc:\n    print(exc); raise SystemExit(exc.exit_code)\n"
    )
    began = time.monotonic()
    failed = _python(code, tmp_path, timeout=30)
    assert failed.returncode == 75, failed.stderr
    assert "printed nothing for 2 s while starting (train.startup_timeout_s)" in failed.stdout
    assert "waits in torch/utils/file_baton.py" in failed.stdout and f"the build lock {lock}" in failed.stdout
    assert time.monotonic() - began < 20


def test_the_watchdog_is_re_armed_by_output_and_ends_when_stopped(tmp_path):
    code = (
        "import sys, time\nfrom pipeline.train import startup\n"
        "with startup.watchdog(1) as started:\n"
        "    for _ in range(4):\n        time.sleep(0.5); sys.stderr.write('.')\n"  # 2 s, never 1 s silent
        "    started.stop()\n    time.sleep(1.5)\n"  # stopped: silence is fine
        "print('trained')\n"
    )
    done = _python(code, tmp_path, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stderr


def test_a_train_step_that_waits_in_silence_fails_naming_where(snapshot, tmp_path):
    """The base model is on an S3 endpoint that accepts the connection and never answers: the step
    prints nothing, and fails after train.startup_timeout_s, exit 75 (retried), naming the wait."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = subprocess_env(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{silent.getsockname()[1]}",
            AWS_ACCESS_KEY_ID="silent-dummy",
            AWS_SECRET_ACCESS_KEY="silent-dummy",
            AWS_DEFAULT_REGION="us-east-1",
        )
        settings = [
            "run_id=silent",
            "base_model=s3://models/tiny",
            f"train.snapshot_uri={snapshot.snapshot_uri}",
            "train.startup_timeout_s=3",
        ]
        began = time.monotonic()
        failed = subprocess.run(
            [sys.executable, "-m", "pipeline", "train", *(a for s in settings for a in ("--set", s))],
            env=env,
            capture_output=True,
            text=True,
            timeout=PROBE_S,
            stdin=subprocess.DEVNULL,
        )
    assert failed.returncode == 75, failed.stderr[-2000:]
    assert (
        "error: train: printed nothing for 3 s while starting (train.startup_timeout_s); it waits in " in failed.stderr
    )
    assert "in readinto(), called from pipeline/storage/__init__.py:" in failed.stderr
    assert time.monotonic() - began < PROBE_S
