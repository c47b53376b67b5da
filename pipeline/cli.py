"""``finetune``: the one entrypoint every container, subprocess and PyTorchJob worker runs.

    finetune collect  [--config FILE] [--set key=value ...] [--result-file PATH]
    finetune validate | train | evaluate | register | promote   (same options)
    finetune run --source URI [--source URI ...] [--set key=value ...]   # the whole DAG via Airflow
    finetune render --step STEP --launcher kubernetes|pytorchjob [--set key=value ...]

A step writes its result JSON to ``<artifact_root>/runs/<run_id>/<step>/result.json`` (and to
``--result-file`` when given, e.g. ``/airflow/xcom/return.json`` in a pod). On a user error it
prints ``error: ...``, writes ``error.json`` beside it and exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline import dagrun, steps, storage
from pipeline.config import file_overrides, load_config
from pipeline.errors import ConfigError, PipelineError

# The commands that are no step, beside one per row of the step table.
COMMANDS = {
    "run": "Run the whole finetune DAG through Airflow on this machine.",
    "render": "Print the Kubernetes manifest a step would be submitted as (Pod or PyTorchJob).",
}


def _step_parser(step: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"finetune {step}", description=steps.STEPS[step].summary)
    parser.add_argument("--config", help="YAML config file (sections per step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--result-file", help="also write the result JSON here")
    return parser


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def step_main(step: str, argv: Sequence[str] | None) -> int:
    """``finetune <step>``: parse, run the step's ``run`` from the table, write the result JSON."""
    args = _step_parser(step).parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if is_main_process():
            # A re-run starts bare: neither an old error nor an old result may pass for this run's
            # while the step rewrites its outputs.
            for name in (steps.ERROR_FILE, steps.RESULT_FILE):
                storage.delete(storage.join(cfg.step_uri(step), name))
        result = steps.STEPS[step].run(cfg)
    except PipelineError as exc:
        print(f"error: {step}: {exc}", file=sys.stderr)
        if cfg is not None and is_main_process():
            storage.write_json(storage.join(cfg.step_uri(step), steps.ERROR_FILE),
                               {"step": step, "error": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    if result is None:  # a non-zero rank of a distributed step: rank 0 reports
        return 0
    payload = dataclasses.asdict(result)
    storage.write_json(storage.join(cfg.step_uri(step), steps.RESULT_FILE), payload)
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(payload))
    print(json.dumps(payload, ensure_ascii=False))
    return 0


def render_main(argv: Sequence[str] | None) -> int:
    """``finetune render --step S --launcher L [--config F] [--set k=v ...]``: print the manifest as YAML."""
    parser = argparse.ArgumentParser(prog="finetune render", description=COMMANDS["render"])
    parser.add_argument("--step", required=True, choices=list(steps.STEPS))
    parser.add_argument("--launcher", required=True, help=f"one of {[n for n in steps.LAUNCHERS if n != 'local']}")
    parser.add_argument("--config", help="YAML config file (sections per step, and k8s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. k8s.num_nodes=4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        overrides = [*(file_overrides(args.config) if args.config else []), *args.overrides]
        manifest = steps.render(args.step, overrides, args.launcher)
    except ConfigError as exc:
        print(f"error: render: {exc}", file=sys.stderr)
        return exc.exit_code
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    summaries = {**{name: step.summary for name, step in steps.STEPS.items()}, **COMMANDS}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in summaries:
        print(__doc__.strip())
        print("\ncommands:\n" + "\n".join(f"  {name:<9} {summary}" for name, summary in summaries.items()))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return dagrun.main(rest)
    if command == "render":
        return render_main(rest)
    return step_main(command, rest)


if __name__ == "__main__":
    sys.exit(main())
