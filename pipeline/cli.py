"""``finetune``: the one entrypoint every container, subprocess and PyTorchJob or TrainJob worker runs.

    finetune collect  [--config FILE] [--set key=value ...] [--result-file PATH]
    finetune validate | train | evaluate | register | promote   (same options)
    finetune run --source URI [--source URI ...] [--set key=value ...]   # the whole DAG via Airflow
    finetune render --step STEP --launcher kubernetes|pytorchjob|trainjob [--set key=value ...]
    finetune config [--config FILE] [--set key=value ...]   # the effective configuration, as YAML
    finetune demo-model [--out DIR]                          # the small causal LM make demo-llm trains
    finetune <step> --help                                  # the step's settings: type, default, bounds

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
import textwrap
import typing
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline import chat, dagrun, distributed, models, services, steps, storage, tracking
from pipeline.config import SECTIONS, PipelineConfig, add_settings_arguments, file_overrides, finetune_home, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.fields import describe

# The commands that are no step, beside one per row of the step table.
COMMANDS = {
    "run": "Run the whole finetune DAG through Airflow on this machine.",
    "render": "Print the Kubernetes manifest a step would be submitted as (Pod, PyTorchJob or TrainJob).",
    "config": "Print the effective configuration (defaults < --config < --set) as YAML.",
    "serve": "Serve the champion with MLflow's scoring server on 127.0.0.1 (SERVE_PORT, 5001); make down stops it.",
    "demo-model": "Build the demo causal LM (no hub needed) that `make demo-llm` fine-tunes; print its directory.",
}
CONFIG_HELP = "YAML config file (sections per step)"
SET_HELP = "override a config key, e.g. train.epochs=2 (repeatable)"
DEMO_TEXTS = ("pkg://pipeline/data/support_instructions.jsonl", "pkg://pipeline/data/support_intents.jsonl")


def settings_help(section: str) -> str:
    """Every key of ``section`` ('' for the shared top-level keys) with its type, default, bounds
    and help, generated from the config fields (never written twice)."""
    cls = SECTIONS[section] if section else PipelineConfig
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not section and f.name in SECTIONS:  # the top level's sections, not a section's own key (evaluate.promote)
            continue
        kind, default, bounds = describe(f, hints[f.name])
        key = f"{section}.{f.name}" if section else f.name
        head = f"  {key} ({kind}, default {default}{'; ' + bounds if bounds else ''})"
        lines += [head, *textwrap.wrap(f.metadata["help"], 96, initial_indent="      ", subsequent_indent="      ")]
    return "\n".join(lines)


def _step_parser(step: str) -> argparse.ArgumentParser:
    epilog = (
        f"settings of {step} (--set {step}.KEY=VALUE, or the {step}: section of --config):\n"
        f"{settings_help(step)}\n\nshared settings: finetune config --help"
        if step in SECTIONS
        else f"{step} has no settings of its own (it reads model_name); shared settings: finetune config --help"
    )
    parser = argparse.ArgumentParser(
        prog=f"finetune {step}",
        description=steps.STEPS[step].summary,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(parser, CONFIG_HELP, SET_HELP)
    parser.add_argument("--result-file", help="also write the result JSON here")
    return parser


def is_main_process() -> bool:
    return distributed.ranks()[0] == 0


def step_main(step: str, argv: Sequence[str] | None) -> int:
    """``finetune <step>``: parse, run the step's ``run`` from the table, write the result JSON."""
    args = _step_parser(step).parse_args(argv)
    tracking.quiet_credentialed_links()
    # One id for every rank of one launch of a distributed step (torch.distributed.run sets it;
    # a new launch gets a new one): which error.json belongs to this attempt.
    attempt = os.environ.get("TORCHELASTIC_RUN_ID", "")
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if is_main_process():
            # A re-run starts bare: neither an old error nor an old result may pass for this run's
            # while the step rewrites its outputs. An error another rank of this launch already
            # wrote stays: it may be the only report of why the launch failed.
            storage.delete(storage.join(cfg.step_uri(step), steps.RESULT_FILE))
            old = steps.step_error(cfg.step_uri(step))
            if old is not None and (not attempt or old.get("attempt") != attempt):
                storage.delete(storage.join(cfg.step_uri(step), steps.ERROR_FILE))
        try:
            result = steps.STEPS[step].run(cfg)
        except PipelineError:
            raise
        except Exception as exc:  # MLflow's module-level calls (start_run, log_model...) unwrapped
            transient = tracking.transient_error(exc)
            if transient is None:
                raise
            raise transient from exc
    except PipelineError as exc:
        # Once per failure: rank 0 prints it in full (a summary line, then any details); the other
        # ranks of a distributed step, which mostly fail the same way, their first line.
        rank = distributed.ranks()[0]
        said = str(exc) if rank == 0 else f"(rank {rank}) " + str(exc).partition("\n")[0]
        print(f"error: {step}: {said}", file=sys.stderr)
        if cfg is not None:
            # Every rank writes it (the same verdict; an atomic replace): the first rank to fail
            # makes torch.distributed.run stop the others, rank 0 perhaps before it could write.
            storage.write_json(
                storage.join(cfg.step_uri(step), steps.ERROR_FILE),
                {"step": step, "error": str(exc), "exit_code": exc.exit_code, "attempt": attempt},
            )
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
    add_settings_arguments(
        parser,
        "YAML config file (sections per step, and k8s)",
        "override a config key, e.g. k8s.num_nodes=4 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        overrides = [*(file_overrides(args.config) if args.config else []), *args.overrides]
        manifest = steps.render(args.step, overrides, args.launcher)
    except ConfigError as exc:
        print(f"error: render: {exc}", file=sys.stderr)
        return exc.exit_code
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def config_main(argv: Sequence[str] | None) -> int:
    """``finetune config [--config F] [--set k=v ...]``: what a run with these settings will use."""
    parser = argparse.ArgumentParser(
        prog="finetune config",
        description=COMMANDS["config"],
        epilog=f"shared settings:\n{settings_help('')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(parser, CONFIG_HELP, SET_HELP)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: config: {exc}", file=sys.stderr)
        return exc.exit_code
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def demo_model_main(argv: Sequence[str]) -> int:
    """``finetune demo-model``: a small Llama with a tokenizer trained on the shipped texts."""
    parser = argparse.ArgumentParser(prog="finetune demo-model", description=COMMANDS["demo-model"])
    parser.add_argument("--out", type=Path, default=None, help="where (default $FINETUNE_HOME/models/demo-llm)")
    args = parser.parse_args(argv)
    out = args.out or finetune_home() / "models" / "demo-llm"
    if not (out / "config.json").is_file():
        texts = [
            value
            for uri in DEMO_TEXTS
            for line in storage.read_bytes(uri).decode("utf-8").splitlines()
            for value in json.loads(line).values()
            if isinstance(value, str)
        ]
        models.build_demo_lm(out, texts, chat.CHATML)
        print(
            f"demo-model: built a {models.DEMO_LM_SHAPE['num_hidden_layers']}-layer Llama with a tokenizer trained on "
            f"{len(texts)} shipped texts",
            file=sys.stderr,
        )
    print(out)
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
    if command == "config":
        return config_main(rest)
    if command == "demo-model":
        return demo_model_main(rest)
    if command == "serve":
        return services.main(["serve", *rest])
    return step_main(command, rest)


if __name__ == "__main__":
    sys.exit(main())
