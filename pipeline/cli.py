"""``finetune``: the one entrypoint every container, subprocess and PyTorchJob worker runs.

    finetune collect  [--config FILE] [--set key=value ...] [--result-file PATH]
    finetune validate | train | evaluate | register   (same options)
    finetune run --source URI [--source URI ...] [--set key=value ...]   # the whole DAG via Airflow

A step writes its result JSON to ``<artifact_root>/runs/<run_id>/<step>/result.json`` (and to
``--result-file`` when given, e.g. ``/airflow/xcom/return.json`` in a pod). On a user error it
prints ``error: ...``, writes ``error.json`` beside it and exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import STEP_NAMES, PipelineConfig, load_config
from pipeline.errors import PipelineError


def _step_parser(step: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"finetune {step}", description=_step_summary(step))
    parser.add_argument("--config", help="YAML config file (sections per step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--result-file", help="also write the result JSON here")
    return parser


def _step_summary(step: str) -> str:
    return {
        "collect": "Read sources into a content-addressed Parquet snapshot.",
        "validate": "Gate the snapshot with a Great Expectations suite.",
        "train": "Fine-tune the base model with Hugging Face Trainer + DeepSpeed.",
        "evaluate": "Score the trained model and the champion on held-out data.",
        "register": "Log the model to MLflow, register it and move aliases.",
        "promote": "Move a registry alias (champion) to a version; roll back; audited.",
        "run": "Run the whole finetune DAG through Airflow on this machine.",
        "render": "Print the Kubernetes manifest a step would be submitted as (Pod or PyTorchJob).",
    }[step]


def step_error(step_uri: str) -> dict[str, Any] | None:
    """The error a step recorded under its prefix (``step_main`` writes it), or None."""
    from pipeline import storage

    uri = storage.join(step_uri, "error.json")
    return storage.read_json(uri) if storage.exists(uri) else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def step_main(step: str, run: Callable[[PipelineConfig], Any], argv: Sequence[str] | None) -> int:
    """Parse, run, write the result JSON: what every step module's ``main`` does."""
    from pipeline import storage

    args = _step_parser(step).parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if is_main_process():
            storage.delete(storage.join(cfg.step_uri(step), "error.json"))
        result = run(cfg)
    except PipelineError as exc:
        print(f"error: {step}: {exc}", file=sys.stderr)
        if cfg is not None and is_main_process():
            storage.write_json(storage.join(cfg.step_uri(step), "error.json"),
                               {"step": step, "error": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    if result is None:  # a non-zero rank of a distributed step: rank 0 reports
        return 0
    payload = dataclasses.asdict(result)
    storage.write_json(storage.join(cfg.step_uri(step), "result.json"), payload)
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(payload))
    print(json.dumps(payload, ensure_ascii=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = (*STEP_NAMES, "run", "render")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        print("\ncommands:\n" + "\n".join(f"  {c:<9} {_step_summary(c)}" for c in commands))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from pipeline import dagrun

        return dagrun.main(rest)
    if command == "render":
        from pipeline import k8s

        return k8s.render_main(rest)
    module = importlib.import_module(f"pipeline.{command}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
