"""The one table that knows each step: its ``run``, the DAG that runs it, its upstream inputs,
its resources and how it is launched; and the one retry table that judges a failed step.

A DAG task is built from a row of ``STEPS`` by the factory in ``dags/``; it turns the DAG
Params and the upstream results into ``--set`` overrides (``step_overrides``) and hands the argv
(``step_argv``) to a launcher. Every launcher runs exactly that argv: ``local`` as a subprocess
(``pipeline/local.py``; training under ``torch.distributed.run`` over ``train.num_processes``
processes), ``kubernetes`` as one Pod per step, ``pytorchjob`` and ``trainjob`` as a Pod per step but
training as a multi-node Kubeflow PyTorchJob (Training Operator v1) or TrainJob (Trainer v2)
(``render`` builds those manifests with ``pipeline/k8s.py``; the DAG submits them). Whichever
launcher ran it, a failed step becomes a ``StepFailed`` by ``classify_failure``.
Adding a step is one row here plus its module.

    python -c "from pipeline import steps; print(steps.step_argv('train', ['train.epochs=1']))"

Launching layer: imports the step modules (for their ``run``) and ``k8s``; never Airflow. It is
imported at DAG parse time, so everything it imports keeps heavy libraries inside functions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import aliases, collect, evaluate, k8s, promote, register, storage, train, validate
from pipeline.config import (
    STEP_NAMES,
    PipelineConfig,
    check_model_name,
    check_sources,
    check_trigger,
    defaults_environment,
    file_overrides,
    load_config,
    value_of,
)
from pipeline.errors import ConfigError, PipelineError, ValidationFailed

LAUNCHERS = ("local", "kubernetes", "pytorchjob", "trainjob")
# The launchers that submit the distributed step (train) as a Kubeflow job, and the kind of job:
# Training Operator v1's PyTorchJob, or Trainer v2's TrainJob. Every other step runs as a pod.
JOB_LAUNCHERS = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
# What a step leaves under <artifact_root>/runs/<run_id>/<step>/ for its launcher to read back.
RESULT_FILE, ERROR_FILE = "result.json", "error.json"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[PipelineConfig], Any]  # the step's work; returns its result dataclass (None on ranks > 0)
    summary: str  # one line for `finetune --help` and `finetune <step> --help`
    dag: str  # the DAG whose task runs this step
    # config key <- (upstream step, field of its result JSON)
    inputs: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    requested_by_key: str = ""  # config key that receives the Airflow user who triggered the run
    distributed: bool = False  # started over N processes by torch.distributed.run
    cpu: str = "1"
    memory: str = "2Gi"
    gpus: int = 0


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step("collect", collect.run, "Read sources into a content-addressed Parquet snapshot.", "finetune"),
        Step(
            "validate",
            validate.run,
            "Gate the snapshot with a Great Expectations suite.",
            "finetune",
            inputs={"validate.snapshot_uri": ("collect", "snapshot_uri")},
        ),
        Step(
            "train",
            train.run,
            "Fine-tune the base model with Hugging Face Trainer + DeepSpeed.",
            "finetune",
            inputs={"train.snapshot_uri": ("collect", "snapshot_uri")},
            distributed=True,
            cpu="2",
            memory="8Gi",
            gpus=1,
        ),
        Step(
            "evaluate",
            evaluate.run,
            "Score the trained model and the champion on held-out data.",
            "finetune",
            inputs={"evaluate.snapshot_uri": ("collect", "snapshot_uri"), "evaluate.model_uri": ("train", "model_uri")},
            memory="4Gi",
        ),
        Step(
            "register",
            register.run,
            "Log the model to MLflow, register it and move aliases.",
            "finetune",
            inputs={
                "register.train_result_uri": ("train", "result_uri"),
                "register.evaluate_result_uri": ("evaluate", "result_uri"),
                "register.validate_result_uri": ("validate", "result_uri"),
                "register.collect_result_uri": ("collect", "result_uri"),
            },
            memory="4Gi",
        ),
        Step(
            "promote",
            promote.run,
            "Move a registry alias (champion) to a version; roll back; audited.",
            "promote",
            requested_by_key="promote.requested_by",
            memory="1Gi",
        ),
        Step(
            "aliases",
            aliases.run,
            "Check each registry alias against the promotion audit; a move made outside the pipeline fails.",
            "aliases",
            memory="1Gi",
        ),
    )
}


def result_type(step: str) -> type:
    """The result dataclass ``step``'s ``run`` returns (its return annotation; the ``None`` of ranks > 0 left out)."""
    hint = typing.get_type_hints(STEPS[step].run)["return"]
    return next(kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None))


def result_fields(step: str) -> frozenset[str]:
    """The fields of ``step``'s result JSON: its result dataclass's own field names."""
    return frozenset(item.name for item in dataclasses.fields(result_type(step)))


def result_keys(step: str, *names: str) -> tuple[str, ...]:
    """``names``, each checked to be a field of ``step``'s result dataclass: the keys a reader of
    its result JSON (a DAG's task or callback) uses, so a renamed field fails its import."""
    unknown = [name for name in names if name not in result_fields(step)]
    if unknown:
        raise TypeError(f"{unknown} are no fields of the result of step {step!r}")
    return names


def check_inputs(table: Mapping[str, Step]) -> None:
    """Every ``inputs`` entry of ``table`` names a step of it and a field of that step's result
    dataclass: a renamed result field fails the import, not a run."""
    for row in table.values():
        for key, (source, result_field) in row.inputs.items():
            if source not in table or result_field not in result_fields(source):
                raise TypeError(
                    f"steps.STEPS[{row.name!r}].inputs[{key!r}]: {source}.{result_field} is no field of "
                    f"the result of step {source!r}"
                )


def check_steps(table: Mapping[str, Step]) -> None:
    """The rows of ``table`` are the steps the config knows (``config.STEP_NAMES``: one field of
    the timeouts section each, below this layer): a row without its ``timeouts.<step>``, or a timeout
    without its row, fails the import, not a run."""
    rows, timed = set(table), set(STEP_NAMES)
    if rows != timed:
        raise TypeError(
            f"steps.STEPS and config.TimeoutsConfig (pipeline/config/deploy.py) name different steps: rows without "
            f"a timeouts.<step> field {sorted(rows - timed)}, timeouts without a row {sorted(timed - rows)}"
        )


check_inputs(STEPS)
check_steps(STEPS)


def dag_steps(dag_id: str) -> tuple[str, ...]:
    """The steps ``dag_id`` runs, in the table's order: one task each, chained."""
    return tuple(name for name, step in STEPS.items() if step.dag == dag_id)


PIPELINE: tuple[str, ...] = dag_steps("finetune")

# Each DAG's Params: Param name -> config key. Their types, bounds, defaults and help come from
# the config fields (config.param_schema).
DAG_PARAMS: dict[str, dict[str, str]] = {
    "finetune": {
        "source": "collect.sources",
        "model_name": "model_name",
        "task": "task",
        "base_model": "base_model",
        "epochs": "train.epochs",
        "learning_rate": "train.learning_rate",
        "batch_size": "train.batch_size",
        "zero_stage": "train.zero_stage",
        "num_processes": "train.num_processes",
        "trainer_args": "train.trainer_args",
        "promote": "evaluate.promote",  # false: a smoke run, registered as challenger only
    },
    "promote": {
        "model_name": "model_name",
        "version": "promote.version",
        "target_alias": "promote.target_alias",
        "reason": "promote.reason",
        "force": "promote.force",
    },
    "aliases": {"model_name": "model_name"},
}


# The deployment's config files, trusted: FINETUNE_CONFIG (any section, trigger_keys included)
# and FINETUNE_K8S_CONFIG (the k8s section: images, namespace, Secret names, ...), in that order.
DEPLOYMENT_CONFIG_VARIABLES = ("FINETUNE_CONFIG", "FINETUNE_K8S_CONFIG")


def deployment_overrides(environ: Mapping[str, str] | None = None) -> list[str]:
    """The deployment's config files as ``key=value`` overrides (each checked, naming the file)."""
    environ = os.environ if environ is None else environ
    return [item for name in DEPLOYMENT_CONFIG_VARIABLES if environ.get(name) for item in file_overrides(environ[name])]


def deployment_config(deployment: Sequence[str] | None = None) -> PipelineConfig:
    """The deployment's effective config (its config files over the defaults): what the trigger
    form shows as defaults. Read when a DAG file is parsed: local files, no network. ``deployment``:
    its files' overrides (``deployment_overrides()``), when the caller has read them already.

    Built once per distinct input in a process: a DAG file asks for it for every task's timeout
    and for the Params (22 times for finetune.py), the task's ``execute``, in the process that
    parsed it, asks again, and so does its failure alert; each build checks every field (4 ms;
    BENCHMARKS.md, DAG parse). The key is all a build reads (``config.defaults_environment``), not
    the whole environment, which the task runner changes before ``execute`` (``AIRFLOW_CTX_*``)."""
    deployment = deployment_overrides() if deployment is None else deployment
    return _deployment_config(tuple(deployment), defaults_environment())


@functools.lru_cache(maxsize=4)
def _deployment_config(overrides: tuple[str, ...], environment: tuple[str | None, str | None, str]) -> PipelineConfig:
    return load_config(None, overrides)


class StepOverrides(list[str]):
    """A step's ``key=value`` overrides (the list ``step_argv`` and the launchers take) with the
    ``PipelineConfig`` they build, built and checked once by ``step_overrides``, and ``trusted``, the
    deployment's config the trigger was held to (its ``timeouts``, which no trigger can lift). Each
    later hop in this process (a launcher, ``render``, the failure verdict) asks ``config_of`` for
    the config instead of building it again; a list changed since builds its own."""

    def __init__(self, items: Sequence[str], cfg: PipelineConfig | None, trusted: PipelineConfig) -> None:
        super().__init__(items)
        self.trusted = trusted
        self._cfg, self._built_from = cfg, tuple(items)

    def config(self) -> PipelineConfig:
        if self._cfg is None or tuple(self) != self._built_from:
            return load_config(None, self)
        return self._cfg


def config_of(overrides: Sequence[str]) -> PipelineConfig:
    """The config of ``overrides``: the one ``step_overrides`` built with them, else built now."""
    return overrides.config() if isinstance(overrides, StepOverrides) else load_config(None, overrides)


def _key(item: str) -> str:
    return item.partition("=")[0].strip()


def trigger_config(
    deployment: Sequence[str],
    trigger: Sequence[str],
    trusted: PipelineConfig | None = None,
    origin: str = "DAG run conf",
    built: PipelineConfig | None = None,
) -> PipelineConfig:
    """The config of the deployment's overrides then what a trigger sent (``built``, where the
    caller built it with them): an unknown key or a bad value first, named as such, then a key the
    deployment's ``trigger_keys`` (of ``trusted``, its config, built here when not given) does not
    allow, then a source outside its ``collect.allowed_sources`` or a model name outside its
    ``allowed_model_names``, before anything is read. The one place that policy is applied."""
    if built is not None:
        cfg = built
    elif trusted is not None and not trigger:
        cfg = trusted  # the deployment's overrides alone: its own config
    else:
        cfg = load_config(None, [*deployment, *trigger])
    if trusted is None:
        trusted = cfg if not trigger else load_config(None, deployment)
    check_trigger(trigger, trusted.trigger_keys, origin, sent=cfg, deployment=trusted)
    sent = {_key(item) for item in trigger}
    if "collect.sources" in sent:
        check_sources(cfg.collect.sources, trusted.collect.allowed_sources, origin)
    if "model_name" in sent:
        others = [item for item in trigger if _key(item) != "model_name"]
        check_model_name(
            cfg.model_name,
            trusted.allowed_model_names,
            lambda: load_config(None, [*deployment, *others]).model_name,
            origin,
        )
    return cfg


def step_overrides(
    step: str,
    params: Mapping[str, Any],
    upstream: Mapping[str, Mapping[str, Any]],
    run_id: str,
    requested_by: str = "",
    deployment: Sequence[str] = (),
    run_date: str = "",
    trusted: PipelineConfig | None = None,
    extra: Sequence[str] = (),
) -> StepOverrides:
    """``key=value`` overrides for one step, later ones winning: the deployment's (trusted; its
    config ``trusted``, built here when not given), then what the trigger sent -- its DAG's Params
    that differ from the deployment's values, then the free-form ``overrides`` Param -- refused
    unless the deployment's ``trigger_keys`` allow each key, then the pipeline's own: who asked,
    the run id and date, the upstream result URIs and ``extra``. They come with their config."""
    row = STEPS[step]
    trusted = load_config(None, deployment) if trusted is None else trusted
    trigger = [
        f"{key}={json.dumps(params[name])}"
        for name, key in DAG_PARAMS[row.dag].items()
        if name in params and params[name] != value_of(trusted, key)
    ]
    trigger += list(params.get("overrides") or [])
    own = [f"{row.requested_by_key}={json.dumps(requested_by or 'unknown')}"] if row.requested_by_key else []
    own.append(f"run_id={run_id}")
    if run_date:
        own.append(f"run_date={json.dumps(run_date)}")
    missing = [
        (source, result_field)
        for source, result_field in row.inputs.values()
        if source not in upstream or result_field not in upstream[source]
    ]
    if not missing:
        own += [
            f"{key}={json.dumps(upstream[source][result_field])}" for key, (source, result_field) in row.inputs.items()
        ]
    own += extra
    sets = [*deployment, *trigger, *own]
    cfg = _one_build(sets, trigger, own) if not missing else None
    trigger_config(deployment, trigger, trusted, built=cfg)
    if missing:
        source, result_field = missing[0]
        raise ConfigError(f"{step}: upstream result {source}.{result_field} is missing")
    return StepOverrides(sets, cfg, trusted)


def _one_build(sets: Sequence[str], trigger: Sequence[str], own: Sequence[str]) -> PipelineConfig | None:
    """The config of all of ``sets`` where it alone answers what the deployment's and the trigger's
    overrides would (the pipeline's ``own`` keys set no key the trigger set; every check is of one
    field), so one build serves; None where it cannot: then they are built as before."""
    own_keys = {_key(item) for item in own}
    if any(mine == key or mine.startswith(f"{key}.") for key in map(_key, trigger) for mine in own_keys):
        return None
    try:
        return load_config(None, sets)
    except ConfigError:
        return None


def step_error(step_uri: str) -> dict[str, Any] | None:
    """The error a step recorded under its prefix (``finetune <step>`` writes it), or None."""
    uri = storage.join(step_uri, ERROR_FILE)
    return storage.read_json(uri) if storage.exists(uri) else None


def step_argv(step: str, overrides: Sequence[str]) -> list[str]:
    """The container argv for ``step``: ``finetune <step> --set k=v ...``."""
    if step not in STEPS:
        raise ConfigError(f"unknown step '{step}'; steps are {list(STEPS)}")
    return ["finetune", step, *(part for item in overrides for part in ("--set", item))]


OOM_EXIT_CODE = 137  # 128 + SIGKILL: what a container the kernel's OOM killer ended exits with
TIMEOUT_EXIT_CODE = 124  # as timeout(1): the step ran past its time and was killed

# The one retry table, applied by every launcher (local, kubernetes, pytorchjob): a failed step's
# exit code -- its own, from error.json, where it wrote one -- and whether the task is retried.
# Retries back off exponentially (the DAGs' retry_exponential_backoff).
#   2    bad input (ConfigError, DataError, ModelError)        never: the same input fails again
#   3    the data gate failed (ValidationFailed)               never
#   75   transient (TransientError: S3/HTTP 5xx, throttling,   yes
#        connection refused or reset, timeouts, MLflow
#        unreachable, the registry lock wait ran out)
#   124  ran past timeouts.<step> and was stopped              yes
#   137  out of memory (OOMKilled; locally, a SIGKILL while     never: raise the memory first
#        the cgroup's OOM-kill count rose; any other SIGKILL,
#        e.g. a preemption, is a crash and retried)
#   any other (a crash, a lost node, a signal)                 yes
NOT_RETRIED = {
    ConfigError.exit_code: "bad input",
    ValidationFailed.exit_code: "the data gate failed",
    OOM_EXIT_CODE: "out of memory",
}


class StepFailed(PipelineError):
    """A launched step exited non-zero; the message carries its own error line, ``retryable`` the
    retry table's verdict (``classify_failure`` builds it from an exit code and error.json)."""

    def __init__(self, message: str, returncode: int, retryable: bool | None = None, details: str = "") -> None:
        super().__init__(message)
        self.details = details  # the lines after the first of the step's own error, printed once in its log
        self.returncode = returncode
        self.exit_code = returncode if 0 < returncode < 256 else 1
        self.retryable = returncode not in NOT_RETRIED if retryable is None else retryable


def classify_failure(
    step: str,
    launcher: str,
    exit_code: int | None,
    error: Mapping[str, Any] | None = None,
    memory: str = "",
    detail: str = "",
    oom: bool | None = None,
) -> StepFailed:
    """The ``StepFailed`` a failed step is reported as on every launcher, classified by the table
    above: the step's own error.json (``step_error``) when it wrote one, else its exit code (None:
    unknown, a crash). ``memory`` is its pod's memory limit, named in an out-of-memory message. ``oom``: what
    the cluster said (a pod's OOMKilled); None: a SIGKILL (137) is taken for the OOM killer."""
    if error is not None:
        # Its first line: the step printed the rest in its own log, and error.json holds it all.
        summary, _, details = str(error["error"]).partition("\n")
        more = " (in full in the step's log above and its error.json)" if details else ""
        return StepFailed(f"step '{step}' failed: {summary}{more}", int(error["exit_code"]), details=details)
    if oom is False and exit_code in (OOM_EXIT_CODE, -signal.SIGKILL):  # evicted, preempted, stopped
        return StepFailed(
            f"step '{step}' was killed (exit code {OOM_EXIT_CODE}, not for memory): {detail}",
            OOM_EXIT_CODE,
            retryable=True,
        )
    if oom or exit_code in (OOM_EXIT_CODE, -signal.SIGKILL):
        if launcher == "local":
            where = (
                "give the Airflow worker more memory, or lower train.batch_size or train.num_processes "
                "(fewer processes share the machine)"
            )
        else:
            where = (
                f"raise k8s.resources.{step}.memory (its pods have {memory or STEPS[step].memory}), e.g. "
                f"k8s.resources: {{{step}: {{memory: <more>}}}} in the deployment's config (FINETUNE_K8S_CONFIG or "
                "FINETUNE_CONFIG), then clear the task"
            )
        return StepFailed(
            f"step '{step}' ran out of memory (killed, exit code {OOM_EXIT_CODE}): {where}", OOM_EXIT_CODE
        )
    if exit_code == TIMEOUT_EXIT_CODE:
        return StepFailed(
            f"step '{step}' ran past its timeout and was stopped ({detail}); if it needs longer, raise "
            f"timeouts.{step} in the deployment's config (FINETUNE_CONFIG)",
            TIMEOUT_EXIT_CODE,
        )
    if exit_code is None:
        return StepFailed(f"step '{step}' failed without an exit code: {detail}", 1)
    how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
    return StepFailed(f"step '{step}' {how}: {detail}", exit_code)


def check_launcher(launcher: str, origin: str = "FINETUNE_LAUNCHER") -> str:
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{origin}: unknown launcher '{launcher}'; choose one of {list(LAUNCHERS)}")
    return launcher


def launcher_from_env() -> str:
    """The launcher named by ``FINETUNE_LAUNCHER`` (default ``local``), checked."""
    return check_launcher(os.environ.get("FINETUNE_LAUNCHER", "local"))


def job_kind(step: str, launcher: str) -> str | None:
    """The kind of Kubeflow job ``launcher`` submits ``step`` as (``JOB_LAUNCHERS``): the distributed
    step (train) under ``pytorchjob`` or ``trainjob``; None for a pod or a local subprocess."""
    return JOB_LAUNCHERS.get(launcher) if STEPS[step].distributed else None


def render(step: str, overrides: Sequence[str], launcher: str, deadline_s: int | None = None) -> dict[str, Any]:
    """The manifest ``launcher`` submits for ``step``: a Pod, or for training a PyTorchJob or a
    TrainJob (``job_kind``), that runs at most ``deadline_s`` seconds (default: ``timeouts.<step>``
    of the overrides' config; the DAG passes the deployment's, which no trigger can lift).

    The config is validated first, so a bad value fails here, naming its key, and nothing is submitted.
    """
    check_launcher(launcher, "--launcher")
    if launcher == "local":
        raise ConfigError(
            "--launcher: 'local' runs a subprocess, not a manifest; "
            f"choose one of {[name for name in LAUNCHERS if name != 'local']}"
        )
    step_args = step_argv(step, overrides)[1:]
    cfg = config_of(overrides)
    kind = job_kind(step, launcher)
    if kind == "PyTorchJob":
        return k8s.pytorchjob_manifest(cfg, STEPS[step], step_args, deadline_s)
    if kind == "TrainJob":
        return k8s.trainjob_manifest(cfg, STEPS[step], step_args, deadline_s)
    return k8s.pod_manifest(cfg, STEPS[step], step_args, deadline_s)


def step_timeout(step: str, cfg: PipelineConfig) -> int:
    """Seconds one attempt of ``step`` may run: ``timeouts.<step>``. The DAG passes the deployment's
    config here, never a run's, so what a trigger sends cannot lift it."""
    if step not in STEPS or not hasattr(cfg.timeouts, step):
        raise ConfigError(
            f"no timeouts.{step} for step '{step}'; every row of steps.STEPS needs a field in config.TimeoutsConfig"
        )
    return int(getattr(cfg.timeouts, step))
