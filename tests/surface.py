"""What a refactor must leave byte-identical: every ``--help`` page, the DAG graphs and every
rendered manifest, written one file each under OUT. Run it before and after, then diff the trees:

    .venv/bin/python -m tests.surface /tmp/surface-before
    .venv/bin/python -m tests.surface /tmp/surface-after && diff -r /tmp/surface-before /tmp/surface-after
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline import cli, steps

ROOT = Path(__file__).resolve().parents[1]
RUN = ["run_id=scheduled__2026-01-05T00_00_00_00_00", 'train.snapshot_uri="s3://b/snap/data.parquet"']
STEPS = tuple(steps.STEPS)
COMMANDS = tuple(cli.COMMANDS)
HOME = "/tmp/finetune-surface"  # one FINETUNE_HOME for every tree: the default artifact_root follows it
DEPLOYMENT = ROOT / "k8s" / "config" / "deploy.yaml"  # the shipped deployment's config (FINETUNE_CONFIG)
LAUNCHERS = ("kubernetes", "pytorchjob", "trainjob")


def finetune(*argv: str) -> str:
    env = {**os.environ, "FINETUNE_HOME": HOME}
    done = subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"


def dag_graphs(**extra: str) -> str:
    """Each DAG's tasks: id, type, edges, retries, trigger rule, timeout, pool, queue; its params and
    tags; ``extra`` goes into the environment of the parse (``FINETUNE_CONFIG``, ...)."""
    home = tempfile.mkdtemp(prefix="surface-airflow-")
    env = {
        **os.environ,
        **extra,
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    }
    probe = r"""
import json, sys
from airflow.dag_processing.dagbag import BundleDagBag
bag = BundleDagBag(dag_folder=sys.argv[1], bundle_path=sys.argv[1])
assert not bag.import_errors, bag.import_errors
out = {}
for dag_id in sorted(bag.dags):
    dag = bag.dags[dag_id]
    out[dag_id] = {
        "tags": sorted(dag.tags), "schedule": type(dag.timetable).__name__, "max_active_runs": dag.max_active_runs,
        "doc_md": dag.doc_md, "params": {k: dag.params.get_param(k).dump() for k in dag.params},
        "tasks": {t.task_id: {"type": t.task_type, "downstream": sorted(t.downstream_task_ids),
                              "retries": t.retries, "trigger_rule": str(t.trigger_rule),
                              "timeout": str(t.execution_timeout), "pool": t.pool, "queue": t.queue,
                              "retry_delay": str(t.retry_delay), "doc_md": t.doc_md}
                  for t in sorted(dag.tasks, key=lambda t: t.task_id)}}
open(sys.argv[2], "w").write(json.dumps(out, indent=1, sort_keys=True, default=str))
"""
    graphs = Path(home) / "graphs.json"
    done = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT / "dags"), str(graphs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    return graphs.read_text() if done.returncode == 0 else f"exit {done.returncode}\n{done.stderr}"


def runtime() -> str:
    probe = (
        "import yaml; from pipeline import k8s, steps; from pipeline.config import load_config; "
        "print(yaml.safe_dump(k8s.training_runtime_manifest(load_config(), steps.STEPS['train']), sort_keys=False))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    return done.stdout + done.stderr


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pages = {"help": finetune("--help"), **{f"help-{name}": finetune(name, "--help") for name in (*STEPS, *COMMANDS)}}
    sets = [arg for setting in RUN for arg in ("--set", setting)]
    for step in STEPS:
        for launcher in LAUNCHERS:
            pages[f"render-{step}-{launcher}"] = finetune("render", "--step", step, "--launcher", launcher, *sets)
    pages["render-train-trainjob-2nodes"] = finetune(
        "render",
        "--step",
        "train",
        "--launcher",
        "trainjob",
        *sets,
        "--set",
        "k8s.num_nodes=2",
        "--set",
        "train.num_processes=4",
    )
    pages["render-train-pytorchjob-deployment"] = finetune(
        "render", "--step", "train", "--launcher", "pytorchjob", "--config", str(DEPLOYMENT), *sets
    )
    pages["config"] = finetune("config")
    pages["config-deployment"] = finetune("config", "--config", str(DEPLOYMENT))
    pages["trainingruntime"] = runtime()
    pages["dags"] = dag_graphs()
    pages["dags-deployment"] = dag_graphs(FINETUNE_CONFIG=str(DEPLOYMENT))
    for name, text in pages.items():
        (out / f"{name}.txt").write_text(text)
    print(json.dumps({"written": len(pages), "out": str(out)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
