"""Typed config fields: a dataclass field with a help text and bounds (``option``), the check
that enforces type and bounds with an error naming the key (``check_fields``), and the JSON
schema an Airflow ``Param`` gets from the same field (``json_schema``).

    python -c "from pipeline.config import TrainConfig; print(TrainConfig(epochs=3))"

Foundation layer: imports nothing of ours but ``errors``.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import typing
from dataclasses import field
from typing import Any

from pipeline.errors import ConfigError


def option(default: Any, help: str, **bounds: Any) -> Any:
    """A dataclass field with a help text and optional bounds.

    Bounds: ``minimum``, ``maximum``, ``exclusive_minimum``, ``min_items``, ``choices``, ``pattern``.
    ``check_fields`` enforces them; ``json_schema`` turns them into Airflow Param schemas.
    """
    metadata = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}: expected a mapping of names to values, got {value!r}")
        return value
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
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()  # YAML reads an unquoted timestamp as one; the field is text
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


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def json_schema(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """JSON-schema keywords for an Airflow ``Param`` bound to the field ``f`` of type ``hint``."""
    json_type = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        hint, "object" if typing.get_origin(hint) is dict else "array"
    )
    schema: dict[str, Any] = {"default": default_of(f), "type": json_type, "description": f.metadata["help"]}
    meta = f.metadata
    if "choices" in meta:
        schema["enum"] = list(meta["choices"])
    for ours, theirs in (
        ("minimum", "minimum"),
        ("maximum", "maximum"),
        ("exclusive_minimum", "exclusiveMinimum"),
        ("min_items", "minItems"),
    ):
        if ours in meta:
            schema[theirs] = meta[ours]
    if "pattern" in meta:  # JSON schema patterns match anywhere: anchor them as fullmatch does
        schema["pattern"] = f"^(?:{meta['pattern']})$"
    if json_type == "array":
        schema["items"] = {"type": "string"}
    return schema


def describe(f: dataclasses.Field, hint: Any) -> tuple[str, str, str]:
    """A field as a person reads it in ``--help``: its type, its default and its bounds."""
    kind = {str: "text", int: "integer", float: "number", bool: "true|false"}.get(
        hint, "mapping" if typing.get_origin(hint) is dict else "list"
    )
    meta = f.metadata
    bounds = []
    if "choices" in meta:
        bounds.append("one of " + ", ".join(str(c) if c != "" else "''" for c in meta["choices"]))
    low = meta.get("minimum", meta.get("exclusive_minimum"))
    if low is not None or "maximum" in meta:
        left = "(" if "exclusive_minimum" in meta else "["
        bounds.append(f"{left}{'' if low is None else low}..{meta.get('maximum', '')}]")
    if "min_items" in meta:
        bounds.append(f"at least {meta['min_items']} item(s)")
    if "pattern" in meta:
        bounds.append(f"matching {meta['pattern']}")
    default = default_of(f)
    return kind, "''" if default == "" else str(default), "; ".join(bounds)
