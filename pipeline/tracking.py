"""MLflow in one place: the tracking URI (embedded SQLite by default) and the one MLflow run
per pipeline run, found again by tag so that train, evaluate and register log to the same run
and a retried step does not start a second one.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 finetune register ...

The URI is passed to each client (``client``) and, for MLflow's module-level calls that take none,
set for their with-block only (``module_api``): never exported process-wide. mlflow is imported
inside them: the steps import this module at DAG-parse time. The client ``client`` returns turns
"MLflow cannot be reached" (a refused or dropped connection, a timeout, a 5xx or 429 answer, after
MLflow's own retries) into a ``TransientError``: exit code 75, retried.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from pipeline.config import PipelineConfig, finetune_home
from pipeline.errors import TransientError

RUN_TAG = "finetune.run_id"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else SQLite under ``$FINETUNE_HOME``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = finetune_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow client error says the server could not be reached or is failing, not
    that the request was wrong: a connection or timeout error anywhere in its chain (MLflow wraps
    requests' errors), or an HTTP 5xx / 429 answer."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__module__.split(".")[0] in (
            "requests",
            "urllib3",
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    if type(exc).__name__ == "RestException":  # the server answered with a JSON error
        rest: Any = exc  # mlflow's RestException, known by its name: this module imports mlflow only in client()
        return rest.get_http_status_code() >= 500 or rest.error_code in (
            "TEMPORARILY_UNAVAILABLE",
            "REQUEST_LIMIT_EXCEEDED",
        )
    status = re.search(r"failed with error code (\d{3})", str(exc))  # a non-JSON error page
    return status is not None and (int(status.group(1)) >= 500 or int(status.group(1)) == 429)


def _from_mlflow(exc: BaseException) -> bool:
    """Whether MLflow's code raised ``exc`` (or an error it chains): a frame of the mlflow package."""
    seen: BaseException | None = exc
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        if type(seen).__module__.startswith("mlflow") or any("/mlflow/" in frame.filename for frame in frames):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def transient_error(exc: BaseException, call: str = "") -> TransientError | None:
    """The TransientError (exit 75, retried) for an MLflow call that could not reach the tracking
    server, or None when ``exc`` says something else. For the ``Tracker``'s calls and for the
    module-level ones (``mlflow.start_run``, ``mlflow.log_input``, ``mlflow.pyfunc.log_model``...),
    which the CLI maps with it."""
    if not (unreachable(exc) and (call or _from_mlflow(exc))):
        return None
    uri = _redacted(tracking_uri())
    detail = _redacted(" ".join(str(exc).split()))[:300]
    return TransientError(
        f"MLflow tracking server {uri} unreachable or failing ({call + ': ' if call else ''}{detail}) after MLflow's "
        "own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES); check MLFLOW_TRACKING_URI and the server; the task is "
        "retried with back-off"
    )


def _redacted(text: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//", text)  # never a password in a message


class Tracker:
    """An ``MlflowClient`` whose calls raise ``TransientError`` (exit 75: the task is retried with
    back-off) when the tracking server is ``unreachable``; every other error passes unchanged."""

    def __init__(self, mlflow_client: Any, uri: str) -> None:
        self._client, self.uri = mlflow_client, _redacted(uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                transient = transient_error(exc, name)
                if transient is None:
                    raise
                raise transient from exc

        return call


def client() -> Any:
    """A ``Tracker`` on ``tracking_uri()`` (tracking and registry), passed to this client alone: the
    process's MLflow settings and environment are left as they were."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    return Tracker(MlflowClient(tracking_uri=uri, registry_uri=uri), uri)


def quiet_credentialed_links() -> None:
    """Keep MLflow from printing its "View run <name> at: <tracking host>/#/..." banner (when a run
    starts or ends on a tracking server) if the tracking URI carries userinfo: the banner prints
    the host with it, which in a task log is the password. A step process calls this once, at its
    start; the pipeline's own messages are redacted (``_redacted``)."""
    uri = tracking_uri()
    if _redacted(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # MLflow's own switch, read per call


@contextmanager
def module_api() -> Iterator[str]:
    """MLflow's module-level API pointed at ``tracking_uri()`` for the with-block only, for the calls
    that take no URI (``mlflow.start_run`` and what logs to its active run: ``log_input``,
    ``log_text``, ``<flavor>.log_model``; ``<flavor>.load_model`` of a ``models:/`` URI). Afterwards
    the tracking and registry URIs, and ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` (which
    ``mlflow.set_tracking_uri`` exports for subprocesses), are what they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_uris
    from mlflow.tracking._tracking_service import utils as tracking_uris

    uri = tracking_uri()
    env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    # What mlflow.set_*_uri set, if anything: mlflow's getters would return the environment's.
    before = tracking_uris._tracking_uri, registry_uris._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        if before[0] is None:  # set_tracking_uri cannot go back to "not set" (its type says so)
            tracking_uris._tracking_uri = None
        else:
            mlflow.set_tracking_uri(before[0])
        registry_uris._registry_uri = before[1]  # nor set_registry_uri
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def experiment_id(cfg: PipelineConfig) -> str:
    tracker = client()
    experiment = tracker.get_experiment_by_name(cfg.model_name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):  # embedded: artifacts beside the SQLite file, not ./mlruns
        location = (finetune_home() / "mlartifacts").as_uri()
    try:
        return tracker.create_experiment(cfg.model_name, artifact_location=location)
    except Exception:  # created concurrently by another step or rank
        return tracker.get_experiment_by_name(cfg.model_name).experiment_id


def pipeline_run_id(cfg: PipelineConfig) -> str:
    """The MLflow run of this pipeline run, created on first use."""
    tracker = client()
    exp = experiment_id(cfg)
    found = tracker.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{cfg.run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = tracker.create_run(exp, run_name=cfg.run_id, tags={RUN_TAG: cfg.run_id, "finetune.task": cfg.task})
    return run.info.run_id


def metric_history(run_id: str, name: str) -> list[Any]:
    """Every logged value of metric ``name`` on run ``run_id`` (MLflow ``Metric`` entities: step,
    timestamp, value), oldest first; empty when the metric was never logged."""
    history = client().get_metric_history(run_id, name)
    return sorted(history, key=lambda m: (m.timestamp, m.step))


def artifact_url(run_id: str, path: str) -> str:
    """Where the MLflow UI serves an artifact of a run: absolute on a tracking server
    (``MLFLOW_TRACKING_URI=http...``), else relative to the UI's root (``make up`` serves the
    embedded store), so a link in a model version's description opens it from the UI either way."""
    query = urlencode({"path": path, "run_uuid": run_id})
    uri = tracking_uri()
    base = _redacted(uri).rstrip("/") + "/" if uri.startswith(("http://", "https://")) else ""
    return f"{base}get-artifact?{query}"
