"""``finetune run``: run the real ``finetune`` DAG through Airflow on this machine.

Uses ``airflow dags test`` with ``AIRFLOW_HOME`` (SQLite) under ``$FINETUNE_HOME`` (default
``./.finetune``), passes ``--source`` and ``--set`` as the run's Params, streams the task logs to
stderr and prints a one-line JSON summary last. On failure it names the step and its error.

On your own machine you are the deployment: ``--config FILE`` is the deployment's config file
(``FINETUNE_CONFIG`` for this run), trusted, any key; ``--set`` is what a trigger sends, held to
the deployment's ``trigger_keys`` before Airflow starts, and ``--source`` to its
``collect.allowed_sources`` (the shipped data by default: a file of your own needs a config file
with ``collect: {allowed_sources: [/its/dir/]}``, which the refusal spells out).

``--no-promote`` makes a smoke run: the version is registered as challenger and champion never
moves (the trigger's ``evaluate.promote=false``); the summary's ``reason`` says so.

With the deployment's ``promote.require_approval`` on, a run that may promote is refused before
Airflow starts: its champion waits for a person in Airflow's Required actions page, which
``airflow dags test`` cannot serve (no UI, and no scheduler to apply the approval's timeout).
The message says where to go instead: ``make up`` and a trigger from the UI, or ``--no-promote``.

    finetune run --source pipeline/data/support_intents.jsonl --set train.epochs=1 --no-promote
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import steps, storage
from pipeline.config import add_settings_arguments, finetune_home, safe_run_id
from pipeline.errors import ConfigError, PipelineError
from pipeline.steps import PIPELINE, RESULT_FILE, step_error

DAG_ID = "finetune"
APPROVAL_REFUSED = (
    "promote.require_approval is on in the deployment's config: a new champion waits for a person to "
    "approve it in Airflow's Required actions page, which `finetune run` (airflow dags test: no UI, no "
    "scheduler for the approval's timeout) cannot offer. Start the UIs with `make up`, trigger finetune "
    "there (Dags > finetune > Trigger) and answer under Browse > Required actions; or run with "
    "--no-promote (a smoke run: challenger only, nobody asked)"
)


def dags_folder() -> Path:
    return Path(os.environ.get("FINETUNE_DAGS_FOLDER", Path(__file__).resolve().parent.parent / "dags"))


def airflow_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    home = finetune_home()
    env = {**os.environ, **(extra or {})}
    env.update(
        {
            "FINETUNE_HOME": str(home),
            "AIRFLOW_HOME": env.get("AIRFLOW_HOME", str(home / "airflow")),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
    )
    return env


def _airflow(args: list[str], env: dict[str, str], capture: bool = False) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    if capture:
        return subprocess.run(command, env=env, capture_output=True, text=True)
    return subprocess.run(command, env=env, stdout=sys.stderr, stderr=sys.stderr)


def find_run_id(env: dict[str, str], dag_id: str, logical_date: str) -> str | None:
    listing = _airflow(["dags", "list-runs", dag_id, "-o", "json"], env, capture=True)
    lines = [line for line in listing.stdout.splitlines() if line.startswith("[")]  # skip warnings
    try:
        runs = json.loads(lines[-1]) if lines else []
    except ValueError:
        return None
    for dag_run in runs:
        if str(dag_run.get("logical_date", "")).startswith(logical_date[:19]):
            return dag_run["run_id"]
    return None


def failure(artifact_run_uri: str) -> str:
    for step in PIPELINE:
        error = step_error(storage.join(artifact_run_uri, step))
        if error is not None:
            summary, _, details = str(error["error"]).partition("\n")  # the rest is in the step's log above
            where = storage.join(artifact_run_uri, step, steps.ERROR_FILE)
            return f"step '{step}' failed: {summary}" + (
                f" (in full in its log above and in {where})" if details else ""
            )
        if not storage.exists(storage.join(artifact_run_uri, step, RESULT_FILE)):
            return f"step '{step}' failed (see the task log above)"
    return "the DAG run failed (see the log above)"


def test_dag(dag_id: str, conf: dict[str, Any], env_extra: dict[str, str] | None = None) -> str:
    """Run one DAG run of ``dag_id`` with ``airflow dags test`` (logs to stderr); its run id."""
    env = airflow_env(env_extra)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    if _airflow(["db", "migrate"], env, capture=True).returncode != 0:
        raise PipelineError("`airflow db migrate` failed; run it by hand to see why")
    logical_date = datetime.now(UTC).replace(microsecond=0).isoformat()
    print(f"finetune run: airflow dags test {dag_id} {logical_date} -c '{json.dumps(conf)}'", file=sys.stderr)
    _airflow(["dags", "test", dag_id, logical_date, "-c", json.dumps(conf)], env)
    airflow_run_id = find_run_id(env, dag_id, logical_date)
    if airflow_run_id is None:
        raise PipelineError(f"the {dag_id} DAG run was not created (see the log above)")
    return airflow_run_id


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        help="data source URI (repeatable): only under the config's collect.allowed_sources",
    )
    add_settings_arguments(
        parser,
        "the deployment's YAML config file (FINETUNE_CONFIG for this run): any key",
        "a trigger's override: only keys the config's trigger_keys allow",
    )
    parser.add_argument(
        "--no-promote",
        action="store_true",
        help="a smoke run: register the version as challenger and never move champion (evaluate.promote=false)",
    )
    return parser


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What ``finetune run`` prints of register's result."""
    summary = {
        key: result[key] for key in ("model_name", "version", "aliases", "reason", "metrics", "run_id", "snapshot")
    }
    if result.get("base_metrics"):  # causal-lm: what fine-tuning bought, on the same eval tokens
        summary["base_metrics"] = result["base_metrics"]
    if result.get("slices"):  # per language of the eval rows: one number can hide a language it cannot read
        summary["slices"] = {
            name: {k: round(v, 4) for k, v in values.items()} for name, values in result["slices"].items()
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.no_promote:
        args.overrides.append("evaluate.promote=false")
    sources = [s if storage.scheme(s) else str(Path(s).expanduser().resolve()) for s in args.source]
    env_extra = {"FINETUNE_CONFIG": str(Path(args.config).resolve())} if args.config else {}
    trigger = args.overrides + ([f"collect.sources={json.dumps(sources)}"] if sources else [])
    try:
        deployment = steps.deployment_overrides({**os.environ, **env_extra})  # as the DAG's tasks will read it
        cfg = steps.trigger_config(deployment, trigger, origin="run --set")  # as the DAG's tasks will check it
        if cfg.promote.require_approval and cfg.evaluate.promote:
            raise ConfigError(APPROVAL_REFUSED)
    except PipelineError as exc:
        print(f"error: run: {exc}", file=sys.stderr)
        return exc.exit_code
    conf: dict[str, Any] = {"overrides": args.overrides}
    if sources:
        conf["source"] = sources
    try:
        airflow_run_id = test_dag(DAG_ID, conf, env_extra)
    except PipelineError as exc:
        print(f"error: run: {exc}", file=sys.stderr)
        return 1
    run_uri = storage.join(cfg.artifact_root, "runs", safe_run_id(airflow_run_id))
    result_uri = storage.join(run_uri, "register", "result.json")
    if not storage.exists(result_uri):
        print(f"error: run: {failure(run_uri)}", file=sys.stderr)
        return 1
    result = storage.read_json(result_uri)
    summary = _summary(result)
    print(
        f"finetune run: artifacts in {run_uri}; MLflow UI: make up (or `mlflow ui --backend-store-uri "
        f"sqlite:///{finetune_home() / 'mlflow.db'}`)",
        file=sys.stderr,
    )
    print(json.dumps(summary, ensure_ascii=False))
    return 0
