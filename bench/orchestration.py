"""What Airflow adds around the steps: the full `finetune` DAG on the shipped data with 1 epoch
through `finetune run` (Airflow's `dags test`, the local launcher), per task its wall time in
Airflow minus the wall time of the step's own process (the launcher's `launch: step ... after`
line), and the run's total minus the tasks; plus `finetune --help` and the parse time of each DAG
file (Airflow imported first, as in its DAG processor). Targets (issue 14): <= 2 s per task beyond
the step's own process, `finetune --help` < 1 s, < 0.5 s per DAG file.

    .venv/bin/python bench/orchestration.py --repeats 3     # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import spread, timed_lines, write_result  # noqa: E402

STARTED = re.compile(r"\[DAG TEST\] starting task_id=(\w+)")
ENDED = re.compile(r"\[DAG TEST\] end task task_id=(\w+)")
STEP = re.compile(r"launch: step '(\w+)' ended \((-?\d+)\) after ([\d.]+) s")
PARSE = """
import sys, time
from airflow.dag_processing.dagbag import BundleDagBag
dags = sys.argv[1]
from pathlib import Path
for path in sorted(Path(dags).glob("*.py")):
    if path.name in ("finetune_tasks.py", "finetune_alerts.py"):  # .airflowignore: helpers, not DAG files
        continue
    started = time.perf_counter()
    bag = BundleDagBag(dag_folder=str(path), bundle_path=Path(dags))
    assert not bag.import_errors, bag.import_errors
    print("parse:", path.name, time.perf_counter() - started)
"""


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
    return {"wall_s": wall, "tasks": tasks,
            "outside_tasks_s": wall - sum(f["task_s"] for f in tasks.values())}


def help_wall() -> float:
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("finetune")), "--help"], check=True, capture_output=True)
    return time.perf_counter() - started


def parse_times() -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", PARSE, str(ROOT / "dags")], check=True, capture_output=True, text=True,
                          env={**os.environ, "AIRFLOW_HOME": tempfile.mkdtemp(prefix="airflow-home-")})
    found = (line.split()[1:] for line in done.stdout.splitlines() if line.startswith("parse: "))
    return {name: float(value) for name, value in found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs, helps, parses = [], [], []
    for run in range(args.repeats):
        runs.append(dag_run(args.epochs))
        helps += [help_wall() for _ in range(2)]
        parses.append(parse_times())
        print(f"orchestration: run {run + 1}/{args.repeats}: {runs[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    names = list(runs[0]["tasks"])
    report = {
        "setup": {"dag": "finetune", "launcher": "local", "via": "finetune run (airflow dags test)",
                  "epochs": args.epochs, "repeats": args.repeats},
        "dag_run": {"wall_s": spread([r["wall_s"] for r in runs]),
                    "outside_tasks_s": spread([r["outside_tasks_s"] for r in runs]),
                    "tasks": {name: {key: spread([r["tasks"][name][key] for r in runs if key in r["tasks"][name]])
                                     for key in ("task_s", "step_s", "overhead_s")} for name in names}},
        "finetune_help_s": spread(helps),
        "dag_parse_s": {name: spread([p[name] for p in parses]) for name in parses[0]},
    }
    path = write_result("orchestration", report, args.out)
    print(f"orchestration: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
