"""What Airflow adds around the steps: the full `finetune` DAG on the shipped data with 1 epoch,
per task its wall time in Airflow minus the wall time of the step's own process (the launcher's
`launch: step ... after` line), and the run's total minus the tasks; plus `finetune --help` and
the parse time of each DAG file. Targets (issue 14): <= 2 s per task beyond the step's own
process, `finetune --help` < 1 s, < 0.5 s per DAG file.

Two paths to the same DAG: `--path run` (default) is `finetune run` (Airflow's `dags test`, in
one process); `--path scheduler` is what `make up` starts (`airflow standalone`: API server,
scheduler, DAG processor, LocalExecutor) on a scratch $FINETUNE_HOME and free ports, with the run
triggered through the REST API (POST /api/v2/dags/finetune/dagRuns, a JWT from the simple auth
manager's /auth/token) and timed from its task instances. Each path, and `--only parse`, updates
its own part of bench/results/orchestration.json and leaves the others as they were measured.

DAG parse: each file in a process of its own, Airflow imported and its objects frozen first
(`gc.freeze()`), as the DAG processor forks a parser per file; the first parse of a fresh copy of
the sources (compiling them) and a second one (bytecode cached, as every re-parse after it).
`--baseline REV` parses that commit's sources too, interleaved, for a before/after in one run.

    .venv/bin/python bench/orchestration.py --repeats 3                  # ~15 min on 2 cores
    .venv/bin/python bench/orchestration.py --only parse --repeats 5 --baseline HEAD~1   # ~4 min
    .venv/bin/python bench/orchestration.py --path scheduler --repeats 1 # ~8 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import RESULTS, spread, timed_lines, update_result, write_result  # noqa: E402
from pipeline import services  # noqa: E402

STARTED = re.compile(r"\[DAG TEST\] starting task_id=(\w+)")
ENDED = re.compile(r"\[DAG TEST\] end task task_id=(\w+)")
STEP = re.compile(r"launch: step '(\w+)' ended \((-?\d+)\) after ([\d.]+) s")
SOURCES = ("dags", "pipeline", "plugins")  # what a DAG parse imports of this repository
PARSE = """
import gc, sys, time
from pathlib import Path
from airflow.dag_processing.dagbag import BundleDagBag
gc.freeze()  # as the DAG processor's manager does before it forks a parser per file
dags, name = Path(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
bag = BundleDagBag(dag_folder=str(dags / name), bundle_path=dags)
elapsed = time.perf_counter() - started
assert not bag.import_errors, bag.import_errors
print("parse:", name, elapsed)
print("from:", *(sys.modules[m].__file__ for m in ("pipeline", "finetune_timetable") if m in sys.modules))
"""
DAG_ID = "finetune"
# No cron tick is due when the DAG is unpaused (the next 29 February after its start_date is in
# 2028), so the only run is the one the REST API triggers.
NO_TICK_DUE = "0 0 29 2 *"
RUN_TIMEOUT_S = 1800.0


def dag_run(epochs: int) -> dict:
    """One `finetune run`: per task (Airflow wall, step process wall, overhead) and the total."""
    env = {**os.environ, "FINETUNE_HOME": tempfile.mkdtemp(prefix="finetune-orch-")}
    command = [sys.executable, "-m", "pipeline", "run", "--set", f"train.epochs={epochs}"]
    code, lines, wall = timed_lines(command, env)
    if code != 0:
        raise SystemExit("finetune run failed:\n" + "\n".join(line for _, line in lines[-40:]))
    began, tasks = {}, {}
    for t, line in lines:
        if m := STARTED.search(line):
            began[m.group(1)] = t
        elif m := STEP.search(line):
            tasks.setdefault(m.group(1), {})["step_s"] = float(m.group(3))
        elif (m := ENDED.search(line)) and m.group(1) in began:
            tasks.setdefault(m.group(1), {})["task_s"] = t - began[m.group(1)]
    for figures in tasks.values():
        figures["overhead_s"] = figures["task_s"] - figures.get("step_s", 0.0)
    return {"wall_s": wall, "tasks": tasks, "outside_tasks_s": wall - sum(f["task_s"] for f in tasks.values())}


def help_wall() -> float:
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("finetune")), "--help"], check=True, capture_output=True)
    return time.perf_counter() - started


# --- DAG parse ---------------------------------------------------------------------------------


def source_tree(dest: Path, rev: str | None = None) -> Path:
    """A copy of what a DAG parse imports of this repository: the working tree's, or commit ``rev``'s."""
    dest.mkdir(parents=True)
    if rev is None:
        for name in SOURCES:
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    else:
        archive = subprocess.run(["git", "archive", rev, *SOURCES], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def dag_files(dags: Path) -> list[str]:
    """The DAG files of ``dags``: its .py files less the helpers ``.airflowignore`` names."""
    ignore = dags / ".airflowignore"
    ignored = {
        line.strip()
        for line in (ignore.read_text().splitlines() if ignore.exists() else [])
        if line.strip() and not line.startswith("#")
    }
    return sorted(path.name for path in dags.glob("*.py") if path.name not in ignored)


def parse_file(tree: Path, name: str, airflow_home: str) -> float:
    """Seconds to parse ``tree``'s DAG file ``name`` in a process of its own, with ``tree``'s
    pipeline package and plugins ahead of the installed ones. Bytecode is written beside the
    sources, as in a deployment (this machine's PYTHONDONTWRITEBYTECODE would recompile them each time)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.update(AIRFLOW_HOME=airflow_home, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "plugins")]))
    done = subprocess.run(
        [sys.executable, "-c", PARSE, str(tree / "dags"), name], capture_output=True, text=True, env=env, cwd=tree
    )
    found = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("parse: ")]
    if done.returncode != 0 or not found:
        raise SystemExit(f"parsing {tree / 'dags' / name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    imported = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("from: ")][0]
    if not all(Path(module).is_relative_to(tree) for module in imported):  # the installed copy would be measured
        raise SystemExit(f"parsing {tree / 'dags' / name} imported {imported}, not the copy under {tree}")
    return float(found[0])


def parse_times(source: Path, scratch: Path) -> dict[str, dict[str, float]]:
    """Per DAG file of ``source``: its first parse in a fresh copy (``cold``: the sources compiled)
    and the next one (``warm``: bytecode cached, as every re-parse after that)."""
    airflow_home = tempfile.mkdtemp(prefix="airflow-home-", dir=scratch)
    times: dict[str, dict[str, float]] = {"cold": {}, "warm": {}}
    for name in dag_files(source / "dags"):
        tree = Path(tempfile.mkdtemp(prefix="tree-", dir=scratch)) / "src"
        shutil.copytree(source, tree)
        times["cold"][name] = parse_file(tree, name, airflow_home)
        times["warm"][name] = parse_file(tree, name, airflow_home)
    return times


def short_commit(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def parse_section(repeats: int, baseline: str | None, rev: str | None = None) -> dict[str, Any]:
    """The DAG parse figures of the working tree or commit ``rev`` (and of ``baseline``,
    interleaved repetition by repetition)."""
    scratch = Path(tempfile.mkdtemp(prefix="finetune-parse-"))
    try:
        trees = {"current": source_tree(scratch / "current", rev)}
        if baseline:
            trees["baseline"] = source_tree(scratch / "baseline", baseline)
        runs: dict[str, list[dict[str, dict[str, float]]]] = {label: [] for label in trees}
        for repetition in range(repeats):
            for label, tree in trees.items():
                runs[label].append(parse_times(tree, scratch))
            print(f"orchestration: parse {repetition + 1}/{repeats}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def figures(measured: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        return {
            name: {kind: spread([m[kind][name] for m in measured]) for kind in ("warm", "cold")}
            for name in measured[0]["warm"]
        }

    section: dict[str, Any] = {"repeats": repeats, "files": figures(runs["current"])}
    if rev:  # not the working tree: say which sources were measured
        section["sources"] = short_commit(rev)
    if baseline:
        section["baseline"] = {"commit": short_commit(baseline), "files": figures(runs["baseline"])}
    return section


# --- through the scheduler -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(url: str, token: str | None = None, body: dict | None = None, method: str | None = None) -> Any:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(
        url, headers=headers, method=method, data=json.dumps(body).encode() if body is not None else None
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def poll(what: str, probe, timeout_s: float, every_s: float = 2.0) -> Any:
    """``probe()`` until it returns something truthy; SystemExit naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise SystemExit(f"orchestration: timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
    return value


def _seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def task_log(home: Path, run_id: str, task_id: str, try_number: int) -> str:
    """The task's log as the scheduler's worker wrote it under $AIRFLOW_HOME/logs (Airflow's default layout)."""
    path = (
        home
        / "airflow"
        / "logs"
        / f"dag_id={DAG_ID}"
        / f"run_id={run_id}"
        / f"task_id={task_id}"
        / f"attempt={try_number}.log"
    )
    if not path.exists():
        raise SystemExit(f"orchestration: no log for task {task_id} at {path}")
    return path.read_text(errors="replace")


def scheduler_run(epochs: int) -> dict[str, Any]:
    """One run of the `finetune` DAG through `make up`'s Airflow, triggered by the REST API: per
    task the wait before it (since the run was queued or the previous task ended), its time in
    Airflow, its step's own process, and the overhead (wait + Airflow - step)."""
    home = Path(tempfile.mkdtemp(prefix="finetune-sched-"))
    # Not this process's Airflow settings; free ports for both UIs and both log servers, so the
    # run never meets a developer's own `make up`.
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        {
            "FINETUNE_HOME": str(home),
            "FINETUNE_SCHEDULE": NO_TICK_DUE,
            "AIRFLOW_PORT": str(free_port()),
            "MLFLOW_PORT": str(free_port()),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
    )
    url = f"http://{services.HOST}:{env['AIRFLOW_PORT']}"
    command = [sys.executable, "-m", "pipeline.services"]
    try:
        began = time.perf_counter()
        up = subprocess.run([*command, "up"], env=env, capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"orchestration: `make up` failed:\n{up.stderr[-4000:]}")
        up_s = time.perf_counter() - began
        password = json.loads((home / "airflow" / services.PASSWORD_FILE).read_text())[services.ADMIN_USER]
        token = api(f"{url}/auth/token", body={"username": services.ADMIN_USER, "password": password}, method="POST")[
            "access_token"
        ]

        def parsed() -> bool:
            try:
                return bool(api(f"{url}/api/v2/dags/{DAG_ID}", token))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # the DAG processor has not parsed it yet
                    return False
                raise

        poll(f"the DAG processor to parse {DAG_ID}", parsed, 300)
        api(f"{url}/api/v2/dags/{DAG_ID}", token, {"is_paused": False}, method="PATCH")
        triggered = time.perf_counter()
        run = api(
            f"{url}/api/v2/dags/{DAG_ID}/dagRuns",
            token,
            {"logical_date": None, "conf": {"overrides": [f"train.epochs={epochs}"]}},
            method="POST",
        )
        run_url = f"{url}/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"
        run = poll(
            f"run {run['dag_run_id']} to end",
            lambda: (r := api(run_url, token))["state"] in ("success", "failed") and r,
            RUN_TIMEOUT_S,
            5.0,
        )
        observed_s = time.perf_counter() - triggered
        instances = api(f"{run_url}/taskInstances", token)["task_instances"]
        if run["state"] != "success":
            states = {ti["task_id"]: ti["state"] for ti in instances}
            raise SystemExit(f"orchestration: run {run['dag_run_id']} {run['state']}: {states}; logs in {home}")
        tasks, previous_end = {}, run["queued_at"]
        for ti in sorted(instances, key=lambda ti: ti["start_date"]):
            launched = STEP.findall(task_log(home, run["dag_run_id"], ti["task_id"], ti["try_number"]))
            if not launched:
                raise SystemExit(f"orchestration: no `launch: step` line in the log of {ti['task_id']}")
            figures = {
                "wait_s": _seconds(ti["start_date"], previous_end),
                "task_s": _seconds(ti["end_date"], ti["start_date"]),
                "step_s": float(launched[-1][2]),
            }
            figures["overhead_s"] = figures["wait_s"] + figures["task_s"] - figures["step_s"]
            tasks[ti["task_id"]] = figures
            previous_end = ti["end_date"]
        wall = _seconds(run["end_date"], run["queued_at"])
    except BaseException:
        print(f"orchestration: the scheduler run's home (logs, stores) is kept in {home}", file=sys.stderr)
        raise
    finally:
        subprocess.run([*command, "down"], env=env, capture_output=True, text=True)
    shutil.rmtree(home, ignore_errors=True)
    return {
        "up_s": up_s,
        "wall_s": wall,
        "observed_s": observed_s,
        "tasks": tasks,
        "outside_steps_s": wall - sum(f["step_s"] for f in tasks.values()),
    }


def scheduler_section(epochs: int, repeats: int) -> dict[str, Any]:
    runs = []
    for repetition in range(repeats):
        runs.append(scheduler_run(epochs))
        print(
            f"orchestration: scheduler run {repetition + 1}/{repeats}: {runs[-1]['wall_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    names = list(runs[0]["tasks"])
    return {
        "setup": {
            "dag": DAG_ID,
            "launcher": "local",
            "epochs": epochs,
            "repeats": repeats,
            "via": "make up (airflow standalone: LocalExecutor), triggered by POST /api/v2/dags/finetune/dagRuns",
        },
        "up_s": spread([r["up_s"] for r in runs]),
        "wall_s": spread([r["wall_s"] for r in runs]),
        "outside_steps_s": spread([r["outside_steps_s"] for r in runs]),
        "tasks": {
            name: {
                key: spread([r["tasks"][name][key] for r in runs])
                for key in ("wait_s", "task_s", "step_s", "overhead_s")
            }
            for name in names
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--path",
        choices=["run", "scheduler"],
        default="run",
        help="run: `finetune run` (airflow dags test), plus --help and DAG parse; "
        "scheduler: make up's Airflow, triggered by the REST API",
    )
    parser.add_argument("--only", choices=["parse"], help="measure only the DAG parse (no training)")
    parser.add_argument("--baseline", metavar="REV", help="with the DAG parse, also parse this commit's sources")
    parser.add_argument("--rev", metavar="REV", help="parse this commit's sources instead of the working tree's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or RESULTS / "orchestration.json"
    if args.only == "parse":
        path = update_result(
            "orchestration",
            {"dag_parse": parse_section(args.repeats, args.baseline, args.rev)},
            out,
            drop=["dag_parse_s"],
        )
    elif args.path == "scheduler":
        path = update_result("orchestration", {"scheduler": scheduler_section(args.epochs, args.repeats)}, out)
    else:
        kept = json.loads(out.read_text()).get("scheduler") if out.exists() else None
        runs, helps = [], []
        for run in range(args.repeats):
            runs.append(dag_run(args.epochs))
            helps += [help_wall() for _ in range(2)]
            print(
                f"orchestration: run {run + 1}/{args.repeats}: {runs[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True
            )
        names = list(runs[0]["tasks"])
        report = {
            "setup": {
                "dag": DAG_ID,
                "launcher": "local",
                "via": "finetune run (airflow dags test)",
                "epochs": args.epochs,
                "repeats": args.repeats,
            },
            "dag_run": {
                "wall_s": spread([r["wall_s"] for r in runs]),
                "outside_tasks_s": spread([r["outside_tasks_s"] for r in runs]),
                "tasks": {
                    name: {
                        key: spread([r["tasks"][name][key] for r in runs if key in r["tasks"][name]])
                        for key in ("task_s", "step_s", "overhead_s")
                    }
                    for name in names
                },
            },
            "finetune_help_s": spread(helps),
            **({"scheduler": kept} if kept else {}),
        }
        write_result("orchestration", report, out)
        path = update_result("orchestration", {"dag_parse": parse_section(args.repeats, args.baseline, args.rev)}, out)
    print(f"orchestration: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
