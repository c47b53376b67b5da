"""The registered champion, loaded to be scored beside the new model; fail closed when it cannot be.

mlflow is imported inside the function that uses it.
"""

from __future__ import annotations

from typing import Any

from pipeline import tracking
from pipeline.config import CHAMPION, PipelineConfig
from pipeline.errors import ModelError


def load_champion(cfg: PipelineConfig) -> tuple[str, Any, Any] | None:
    """(version, model, tokenizer) of the registered champion, or None when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = tracking.client().get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException as exc:
        # No registered model, or no champion alias yet. Anything else (an unreachable server,
        # a permission error) must not read as "no champion": that would promote unchecked.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
            return None
        raise ModelError(f"cannot look up the champion of {cfg.model_name}: {exc}") from exc
    try:
        with tracking.module_api():  # a models:/ URI is read from the registry URI mlflow is set to
            parts = mlflow.transformers.load_model(f"models:/{cfg.model_name}@{CHAMPION}", return_type="components")
    except Exception as exc:  # fail closed: never promote over a champion we could not score
        raise ModelError(
            f"champion {cfg.model_name} version {version.version} cannot be loaded, "
            f"so the new model cannot be compared with it: {exc}"
        ) from exc
    return str(version.version), parts["model"], parts["tokenizer"]
