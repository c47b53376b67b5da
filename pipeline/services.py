"""The UIs on this machine: Airflow (``airflow standalone``: API server and UI, scheduler, DAG
processor, triggerer) and the MLflow UI, started in the background on 127.0.0.1 over the same
embedded stores ``finetune run`` uses (``$FINETUNE_HOME/airflow``, ``mlflow.db``, ``mlartifacts``).

    python -m pipeline.services up      # make up: start, wait until both answer, print the URLs
    python -m pipeline.services down    # make down: stop exactly what `up` started

Each service runs in a process group of its own, recorded in ``$FINETUNE_HOME/run/<name>.pid``
(JSON: pid, its start time, URL), so ``up`` twice finds the running copy instead of starting a
second one, and ``down`` stops that group and nothing else. Logs go to
``$FINETUNE_HOME/logs/<name>.log``. Ports are settings: ``AIRFLOW_PORT`` (8080) and
``MLFLOW_PORT`` (5000); neither may be one of Airflow's log servers
(``AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT``, 8793, and ``..._TRIGGER_LOG_SERVER_PORT``, 8794).
Linux only (``/proc``), like ``make up``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline import tracking
from pipeline.config import finetune_home, load_config
from pipeline.errors import ConfigError, PipelineError

HOST = "127.0.0.1"
ADMIN_USER = "admin"  # airflow standalone's SimpleAuthManager user
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"  # written by standalone at first start
# Every process a service starts carries this variable (children inherit it), so `down` can find
# one that left the process group; its value names the FINETUNE_HOME it belongs to.
MARKER = "FINETUNE_SERVICES_HOME"
START_TIMEOUT_S = float(os.environ.get("FINETUNE_UP_TIMEOUT", "300"))  # make up on 2 cores: 15-27 s measured
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    command: list[str]
    env: dict[str, str]
    health_path: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def port_setting(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a port number, got {raw!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}: expected a port in 1..65535, got {port}")
    return port


def ports() -> dict[str, int]:
    """The UI ports from the environment, refused when they collide with each other or with
    Airflow's log servers (the scheduler's workers and the triggerer serve task logs there)."""
    chosen = {"AIRFLOW_PORT": port_setting("AIRFLOW_PORT", 8080), "MLFLOW_PORT": port_setting("MLFLOW_PORT", 5000)}
    reserved = {
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": port_setting("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", 8793),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": port_setting("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT", 8794),
    }
    for name, port in chosen.items():
        for log_name, log_port in reserved.items():
            if port == log_port:
                raise ConfigError(
                    f"{name}={port} is Airflow's log server port ({log_name}); choose another port, "
                    f"e.g. {name}={port + 1 if port + 1 not in reserved.values() else port + 2}"
                )
    if chosen["AIRFLOW_PORT"] == chosen["MLFLOW_PORT"]:
        raise ConfigError(f"AIRFLOW_PORT and MLFLOW_PORT are both {chosen['AIRFLOW_PORT']}; give them different ports")
    return chosen


def services(home: Path) -> list[Service]:
    chosen = ports()
    bin_dir = Path(sys.executable).parent  # the venv's: standalone runs `airflow` from PATH
    base = {
        **os.environ,
        MARKER: str(home),
        "FINETUNE_HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("GX_ANALYTICS_ENABLED", "false"),
        # MLflow's GenAI job runner: seven idle workers this project never uses
        ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    ):
        base.setdefault(name, value)
    airflow_port, mlflow_port = chosen["AIRFLOW_PORT"], chosen["MLFLOW_PORT"]
    airflow_env = {
        **base,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": os.environ.get(
            "FINETUNE_DAGS_FOLDER", str(Path(__file__).resolve().parent.parent / "dags")
        ),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # LocalExecutor forks this many workers at start (Airflow's default, 32, on a laptop);
        # a finetune run is a chain and the promote DAG runs one task.
        "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "4"),
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(airflow_port),
        "AIRFLOW__API__BASE_URL": f"http://{HOST}:{airflow_port}",
        # Task workers report to the API server; its default assumes port 8080.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{airflow_port}/execution/",
        # Where the approval's body links the model card and the MLflow run (dags/finetune_approval.py).
        "FINETUNE_MLFLOW_UI_URL": os.environ.get("FINETUNE_MLFLOW_UI_URL", f"http://{HOST}:{mlflow_port}"),
    }
    mlflow_command = [
        str(bin_dir / "mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(mlflow_port),
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--default-artifact-root",
        (home / "mlartifacts").as_uri(),
        "--workers",
        "1",
    ]
    return [
        Service(
            "airflow", airflow_port, [str(bin_dir / "airflow"), "standalone"], airflow_env, "/api/v2/monitor/health"
        ),
        Service("mlflow", mlflow_port, mlflow_command, base, "/health"),
    ]


# --- processes --------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a reused pid); None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _live_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in _live_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(pid)
    return members


def marked_processes(home: Path) -> list[int]:
    """Every live process started by this home's services, wherever its process group is."""
    needle = f"{MARKER}={home}\0".encode()
    found = []
    for pid in _live_pids():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes() and _start_time(pid) is not None:
                found.append(pid)
        except OSError:
            continue
    return found


def pid_file(home: Path, name: str) -> Path:
    return home / "run" / f"{name}.pid"


def log_file(home: Path, name: str) -> Path:
    return home / "logs" / f"{name}.log"


def running(home: Path, name: str) -> dict | None:
    """The recorded process of service ``name`` if it still runs, else None (a stale file is removed)."""
    path = pid_file(home, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("start_time") is not None and _start_time(record["pid"]) == record["start_time"]:
        return record
    path.unlink(missing_ok=True)
    return None


def log_tail(home: Path, name: str, lines: int = 40) -> str:
    try:
        text = log_file(home, name).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def start(home: Path, service: Service) -> dict:
    if _port_taken(service.port):
        setting = "AIRFLOW_PORT" if service.name == "airflow" else "MLFLOW_PORT"
        raise PipelineError(
            f"{service.name}: port {service.port} on {HOST} is in use by another program; "
            f"stop it or set {setting} to a free port"
        )
    log = log_file(home, service.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(service.command)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            service.command,
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home,
        )
    record = {"pid": process.pid, "start_time": _start_time(process.pid), "url": service.url}
    if record["start_time"] is None:
        raise PipelineError(f"{service.name} exited at once; the end of {log}:\n{log_tail(home, service.name)}")
    pid_file(home, service.name).parent.mkdir(parents=True, exist_ok=True)
    pid_file(home, service.name).write_text(json.dumps(record) + "\n")
    return record


def healthy(service: Service) -> bool:
    """The service answers its health endpoint; for Airflow, every component reports healthy."""
    try:
        with urllib.request.urlopen(service.url + service.health_path, timeout=5) as response:
            body = response.read()
    except (OSError, urllib.error.URLError):
        return False
    if service.name != "airflow":
        return True
    try:
        report = json.loads(body)
    except ValueError:
        return False
    return all(
        (report.get(part) or {}).get("status") == "healthy"
        for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
    )


def wait_healthy(home: Path, service: Service, record: dict, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while not healthy(service):
        if _start_time(record["pid"]) != record["start_time"]:
            raise PipelineError(
                f"{service.name} exited during start-up; the end of {log_file(home, service.name)}:\n"
                f"{log_tail(home, service.name)}"
            )
        if time.monotonic() > deadline:
            raise PipelineError(
                f"{service.name} did not answer {service.url}{service.health_path} within "
                f"{timeout_s:.0f} s (FINETUNE_UP_TIMEOUT); the end of "
                f"{log_file(home, service.name)}:\n{log_tail(home, service.name)}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def stop_group(pgid: int) -> None:
    """SIGTERM the process group, wait for it to go, SIGKILL what is left after STOP_TIMEOUT_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group_members(pgid):
            return


def up(home: Path) -> int:
    home.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    try:
        waiting = []
        for service in services(home):
            record = running(home, service.name)
            if record is None:
                record = start(home, service)
                started.append(service.name)
                print(
                    f"{service.name}: started (pid {record['pid']}); waiting for {service.url}{service.health_path}",
                    file=sys.stderr,
                )
            else:  # a second `up`: the running copy, on the port it was started with
                print(f"{service.name}: already running (pid {record['pid']}) at {record['url']}", file=sys.stderr)
                service = replace(service, port=int(record["url"].rsplit(":", 1)[1]))
            waiting.append((service, record))
        for service, record in waiting:  # both start at once; wait for each in turn
            wait_healthy(home, service, record, START_TIMEOUT_S)
    except PipelineError:
        for name in started:  # leave nothing half-started behind
            stop_service(home, name)
        raise
    (airflow, _), (mlflow, _) = waiting
    print(
        f"Airflow UI  {airflow.url}  user {ADMIN_USER}, password in {home / 'airflow' / PASSWORD_FILE}\n"
        f"MLflow UI   {mlflow.url}\n"
        f"Logs        {home / 'logs'}; stop both with `make down` (python -m pipeline.services down)"
    )
    return 0


# --- the champion, served -----------------------------------------------------------------------

SERVE = "serve"


def serve(home: Path, model_name: str, alias: str = "champion") -> int:
    """``finetune serve`` (make serve): MLflow's scoring server (``mlflow models serve``, env
    manager local) for the version ``alias`` names now, on 127.0.0.1:``SERVE_PORT`` (5001). The
    alias is resolved once, here: after a promotion or a roll-back, stop and serve again. The
    served version is printed and kept in ``$FINETUNE_HOME/run/serve.pid``; `make down` stops it."""
    home.mkdir(parents=True, exist_ok=True)
    record = running(home, SERVE)
    if record is not None:
        print(
            f"serve: already serving {record['model']} version {record['version']} at {record['url']} "
            f"(pid {record['pid']}); `make down` stops it",
            file=sys.stderr,
        )
        return 0
    uri = tracking.tracking_uri()
    try:
        version = str(tracking.client().get_model_version_by_alias(model_name, alias).version)
    except Exception as exc:  # no such model or alias
        raise PipelineError(
            f"serve: {model_name}@{alias} names no version ({' '.join(str(exc).split())[:200]})"
        ) from exc
    port = port_setting("SERVE_PORT", 5001)
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{model_name}/{version}"]
    command += ["--env-manager", "local", "--host", HOST, "--port", str(port), "--workers", "1"]
    env = {**os.environ, MARKER: str(home), "FINETUNE_HOME": str(home), "MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # it runs `uvicorn` from PATH
    env.setdefault("HF_HUB_OFFLINE", "1")
    service = Service(SERVE, port, command, env, "/ping")
    record = start(home, service)
    record.update(model=model_name, alias=alias, version=version)
    pid_file(home, SERVE).write_text(json.dumps(record) + "\n")
    print(f"serve: {model_name}@{alias} is version {version}; waiting for {service.url}/ping", file=sys.stderr)
    try:
        wait_healthy(home, service, record, START_TIMEOUT_S)
    except PipelineError:
        stop_service(home, SERVE)
        raise
    example = json.dumps({"inputs": ["where is my parcel", "我要退款"]}, ensure_ascii=False)
    print(
        f"serving {model_name} version {version} ({alias} when started) at {service.url}\n"
        f"curl -s {service.url}/invocations -H 'Content-Type: application/json' -d '{example}'\n"
        f"stop it with `make down`"
    )
    return 0


def stop_service(home: Path, name: str) -> bool:
    record = running(home, name)
    if record is not None:
        stop_group(record["pid"])  # the pid is its group's id: started with start_new_session
    pid_file(home, name).unlink(missing_ok=True)
    return record is not None


def down(home: Path) -> int:
    for name in ("airflow", "mlflow", SERVE):
        print(f"{name}: {'stopped' if stop_service(home, name) else 'not running'}", file=sys.stderr)
    for pid in marked_processes(home):  # a child that left its group (none is known to)
        try:
            os.kill(pid, signal.SIGKILL)
            print(f"stopped stray process {pid}", file=sys.stderr)
        except ProcessLookupError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.services", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", SERVE])
    parser.add_argument("--model", default="", help="serve: the registered model (default: the config's model_name)")
    parser.add_argument("--alias", default="champion", help="serve: the alias whose version is served")
    args = parser.parse_args(argv)
    home = finetune_home()
    try:
        if args.action == SERVE:
            return serve(home, args.model or _default_model_name(), args.alias)
        return up(home) if args.action == "up" else down(home)
    except PipelineError as exc:
        print(f"error: {args.action}: {exc}", file=sys.stderr)
        return exc.exit_code


def _default_model_name() -> str:
    return load_config(None).model_name


if __name__ == "__main__":
    sys.exit(main())
