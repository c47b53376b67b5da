"""register: log the trained model to MLflow with the transformers flavor, register a version
with its lineage and model card, give it the ``challenger`` alias and, when the evaluate step's
gate passed, move ``champion`` to it -- unless the deployment's ``promote.require_approval`` is on:
then the result says ``awaiting_approval`` and a person decides (the finetune DAG's approval and
promote tasks). The model card (``register.card``) links every picture of the run (evaluate's
loss curves, confusion matrix, per-class F1 or perplexity, and ``register/drift.png``, drawn here
from validate's drift report) and shows a causal LM's first sample answers. The version that held ``champion`` keeps the
``previous_champion`` alias, so a roll-back is promoting that alias back.

Re-running register for the same pipeline run returns the version it already registered and
finishes what an interrupted try left undone (``challenger``, the promotion attempt).

    finetune register --set register.train_result_uri=.../train/result.json \\
        --set register.evaluate_result_uri=.../evaluate/result.json \\
        --set register.collect_result_uri=.../collect/result.json

mlflow and transformers are imported inside the functions that use them: the step table
imports this module when Airflow parses the DAG files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline import drift, lock, registry, storage, tracking
from pipeline.config import CHALLENGER, CHAMPION, CHAT_TASKS, PipelineConfig, RegisterConfig
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.models import check_weights, load_causal_lm, load_trained_lm, resolve_model
from pipeline.register.card import model_card

DRIFT_PICTURE = "register/drift.png"  # drawn here from validate's drift.json, beside evaluate's pictures
INPUT_EXAMPLE = ["Where is my order #A1234?", "我想取消订单"]
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Where is my order #A1234?"}], "max_tokens": 16}
# What register asks the saved model through mlflow.pyfunc before it registers it: one utterance,
# one chat message answered in a few tokens.
SERVING_PROBES: dict[str, Any] = {
    "text-classification": INPUT_EXAMPLE[:1],
    "llm/v1/chat": {**CHAT_EXAMPLE, "max_tokens": 4},
}


@dataclass(frozen=True)
class RegisterResult:
    result_uri: str
    model_name: str
    version: str
    aliases: list[str]
    promoted: bool
    reason: str
    metrics: dict[str, float]
    run_id: str
    snapshot: str
    mlflow_run_id: str
    model_uri: str
    base_metrics: dict[str, float] = field(default_factory=dict)  # causal-lm: the base model, same eval tokens
    slices: dict[str, dict[str, float]] = field(default_factory=dict)  # the metrics per language of the eval rows
    outside_moves: list[str] = field(default_factory=list)  # aliases someone moved without the pipeline
    gate: dict[str, Any] = field(default_factory=dict)  # the version's gate verdict (registry.gate_summary)
    alias_moves: list[registry.AliasMove] = field(default_factory=list)  # what this try moved: one event each
    # promote.require_approval: the gate passed and champion waits for a person (the finetune DAG's
    # approval task, then promote); drift: validate's measures then, for the approval's body.
    awaiting_approval: bool = False
    drift: list[dict[str, Any]] = field(default_factory=list)


def _read(uri: str, key: str, required: bool) -> dict[str, Any]:
    if not uri:
        if required:
            raise ConfigError(f"register.{key} is required")
        return {}
    return storage.read_json(uri)


def _inputs(own: RegisterConfig) -> dict[str, dict[str, Any]]:
    inputs = {
        step: _read(getattr(own, f"{step}_result_uri"), f"{step}_result_uri", step in ("train", "evaluate"))
        for step in ("collect", "validate", "train", "evaluate")
    }
    evaluated = inputs["evaluate"]
    gate = evaluated.get("gate_metric")
    if gate not in (evaluated.get("metrics") or {}):
        raise DataError(f"{own.evaluate_result_uri}: gate metric '{gate}' missing from the evaluation metrics")
    return inputs


def pip_requirements(adapter: bool = False) -> list[str]:
    """What serving the model needs, pinned to what trained it. Given explicitly: MLflow's own
    inference adds torchvision for every torch model and runs a slow subprocess."""
    names = ("mlflow", "transformers", "torch", "accelerate", *(("peft",) if adapter else ()))
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in names]


def git_commit() -> str:
    """The code's commit: baked into images as FINETUNE_GIT_COMMIT, else read from a checkout."""
    if os.environ.get("FINETUNE_GIT_COMMIT"):
        return os.environ["FINETUNE_GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            text=True,
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gate_record(cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """evaluate's verdict as the version records it (``finetune.gate``), the one register promotes
    on: both versions' metrics on the same snapshot (its sha256), the champion compared against,
    the margin and the direction."""
    evaluated = inputs["evaluate"]
    keys = ("promote", "reason", "gate_metric", "greater_is_better", "thresholds", "champion_version")
    return {key: evaluated.get(key) for key in keys} | {
        "metrics": evaluated.get("metrics") or {},
        "champion_metrics": evaluated.get("champion_metrics") or {},
        # evaluate's result does not carry the margin: it ran with the same pipeline config.
        "promotion_margin": cfg.evaluate.promotion_margin,
        "snapshot_uri": inputs["train"].get("snapshot_uri", ""),
        "snapshot_sha256": inputs["collect"].get("sha256", ""),
    }


def lineage_tags(cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> dict[str, str]:
    trained, evaluated = inputs["train"], inputs["evaluate"]
    validated, collected = inputs["validate"], inputs["collect"]
    tags = {
        tracking.RUN_TAG: cfg.run_id,
        "finetune.task": cfg.task,
        "finetune.base_model": cfg.base_model,
        # DPO's reference: what its reward is measured against (the base unless train.reference_model)
        "finetune.reference_model": (cfg.train.reference_model or cfg.base_model) if cfg.task == "preference" else "",
        # Airflow exports its context to the task's environment; the step subprocess inherits it.
        "airflow.dag_id": os.environ.get("AIRFLOW_CTX_DAG_ID", ""),
        "airflow.run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID", ""),
        "airflow.try_number": os.environ.get("AIRFLOW_CTX_TRY_NUMBER", ""),
        "finetune.snapshot_uri": trained["snapshot_uri"],
        "finetune.snapshot_sha256": collected.get("sha256", ""),
        "finetune.validation_summary_uri": validated.get("summary_uri", ""),
        "finetune.data_docs_uri": validated.get("data_docs_uri", ""),
        "finetune.trained_model_uri": trained["model_uri"],
        "finetune.config_sha256": trained.get("config_sha256", ""),
        "finetune.git_commit": git_commit(),
        "finetune.image": os.environ.get("FINETUNE_IMAGE", ""),
        "finetune.gate": json.dumps(gate_record(cfg, inputs)),
        "finetune.gate_passed": str(bool(evaluated["promote"])).lower(),
    }
    tags.update({f"metric.{k}": f"{float(v):.6f}" for k, v in evaluated["metrics"].items()})
    tags.update({f"base_metric.{k}": f"{float(v):.6f}" for k, v in (evaluated.get("base_metrics") or {}).items()})
    return {k: v for k, v in tags.items() if v != ""}


def _drift_report(validated: dict[str, Any]) -> dict[str, Any] | None:
    """validate's drift report (``drift.json`` beside its ``drift.html``); None when validate found
    no earlier snapshot to compare with (the first run of a model) or was not run."""
    page = validated.get("drift_report_uri") or ""
    if not page:
        return None
    report_uri = page.rsplit("/", 1)[0] + "/drift.json"
    return storage.read_json(report_uri) if storage.exists(report_uri) else None


def drift_measures(validated: dict[str, Any]) -> list[dict[str, Any]]:
    """validate's drift measures against the last accepted snapshot, each with its bar
    (``check``, ``of``, ``value``, ``max``, ``passed``); empty when there was nothing to compare with."""
    report = _drift_report(validated) or {}
    keys = ("check", "of", "value", "max", "passed")
    return [{key: measure.get(key) for key in keys} for measure in report.get("checks") or []]


def drift_picture(validated: dict[str, Any], run_id: str) -> dict[str, str]:
    """Draw the validate step's drift report (``drift.json`` beside its ``drift.html``) as a PNG and
    log it to ``run_id`` as ``DRIFT_PICTURE``; ``{path: caption}``, or ``{}`` when validate found no
    earlier snapshot to compare with (the first run of a model) or was not run."""
    page = validated.get("drift_report_uri") or ""
    report = _drift_report(validated)
    if report is None:
        return {}
    sha256 = (report.get("reference") or {}).get("sha256") or ""  # the URI is too long for a title
    png, _ = drift.plot_png(report, "Drift from the last accepted snapshot" + (f" {sha256[:12]}" if sha256 else ""))
    with tempfile.TemporaryDirectory(prefix="finetune-register-") as tmp:
        path = Path(tmp) / DRIFT_PICTURE.rsplit("/", 1)[-1]
        path.write_bytes(png)
        tracking.client().log_artifact(run_id, str(path), DRIFT_PICTURE.rsplit("/", 1)[0])
    return {
        DRIFT_PICTURE: "Drift of the training snapshot from the last accepted one: label shares and text "
        f"lengths (the full report: {page})"
    }


def _log_model(cfg: PipelineConfig, model_uri: str, run_id: str, card: str) -> Any:
    import mlflow

    what = f"trained model {model_uri}"
    with tempfile.TemporaryDirectory(prefix="finetune-register-") as tmp:
        path = resolve_model(model_uri, Path(tmp), what="trained model", published=True)
        # A refusal from here on leaves the run FAILED (start_run's exit) and nothing registered.
        with tracking.module_api(), mlflow.start_run(run_id=run_id):
            check_weights(Path(path), what)  # before anything is logged or registered
            flavor = _chat_model(cfg, path, Path(tmp)) if cfg.task in CHAT_TASKS else _classifier(path, what)
            # mlflow.transformers.log_model, but with serving_round_trip on the directory it saves,
            # before the upload; MLflow's own check of the input example there only warns.
            info = mlflow.models.Model.log(
                artifact_path=None,  # deprecated for name, still a required argument
                name="model",
                flavor=_served_transformers(what),
                validate_serving_input=False,
                **flavor,
            )
            mlflow.log_text(card, "model_card.md")
            return info


def _classifier(path: str, what: str) -> dict[str, Any]:
    """log_model arguments for a sequence classifier: a text-classification pipeline."""
    import transformers

    try:
        # The signature is inferred by running the pipeline on the input example.
        classifier = transformers.pipeline("text-classification", model=path, tokenizer=path)
    except (OSError, ValueError) as exc:  # a config whose architecture transformers cannot build
        raise ModelError(f"{what}: cannot load a text-classification pipeline: {exc}; nothing registered") from exc
    return {
        "transformers_model": classifier,
        "task": "text-classification",
        "input_example": INPUT_EXAMPLE,
        "pip_requirements": pip_requirements(),
    }


def _served_transformers(what: str) -> Any:
    """MLflow's transformers flavor for ``Model.log`` whose save ends with ``serving_round_trip``
    on the saved directory, the one Model.log uploads next: a model that cannot be served stops
    the log there, before any upload (MLflow marks the logged model FAILED)."""
    import mlflow

    def save_model(path: str, **kwargs: Any) -> None:
        mlflow.transformers.save_model(path=path, **kwargs)
        serving_round_trip(path, kwargs["task"], what)

    return SimpleNamespace(__name__="mlflow.transformers", save_model=save_model)


def serving_round_trip(path: str, task: str, what: str) -> None:
    """Refuse (exit 2) a saved MLflow model that does not load and answer the way it is served:
    ``mlflow.pyfunc`` loads ``path`` and predicts ``SERVING_PROBES[task]``, one short input, and
    the served tokenizer must read the probe as more than its unknown token (without its
    tokenizer.json, transformers builds a BERT tokenizer of only special tokens, and the model
    then answers every text alike)."""
    import mlflow

    probe = SERVING_PROBES[task]
    text = probe[0] if isinstance(probe, list) else probe["messages"][-1]["content"]
    check = f"{what}: the serving round trip (mlflow.pyfunc load + predict of {json.dumps(probe, ensure_ascii=False)})"
    try:
        served = mlflow.pyfunc.load_model(path)
        answers = served.predict(probe)
        tokenizer = served.get_raw_model().tokenizer
    except Exception as exc:  # whatever stops it stops serving too
        raise ModelError(f"{check} failed: {exc}; nothing registered") from exc
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or set(ids) == {tokenizer.unk_token_id}:
        raise ModelError(
            f"{check} failed: the served tokenizer reads {text!r} as nothing but its unknown token "
            f"{tokenizer.unk_token!r} ({len(tokenizer)} tokens in all): a tokenizer file (tokenizer.json, vocab.txt) "
            "is missing from the published model; nothing registered"
        )
    if len(answers) != 1:
        raise ModelError(f"{check} failed: {len(answers)} answers to one input; nothing registered")


def _chat_model(cfg: PipelineConfig, path: str, scratch: Path) -> dict[str, Any]:
    """log_model arguments for a causal LM: a chat model (OpenAI-style messages in and out). A LoRA
    adapter is logged alone, with a reference to the base model's directory (or hub name)."""
    adapter = (Path(path) / "adapter_config.json").is_file()
    base_model_path = None
    if adapter:
        # The train step refused an S3 base for an adapter: a local directory, or a hub name (None).
        local = storage.local_path(cfg.base_model) if storage.scheme(cfg.base_model) in ("", "file", "pkg") else None
        base_model_path = str(local) if local is not None and local.is_dir() else None
        model, tokenizer = load_trained_lm(path, cfg.base_model, scratch)
    else:
        model, tokenizer = load_causal_lm(path, "trained model")
    return {
        "transformers_model": {"model": model, "tokenizer": tokenizer},
        "task": "llm/v1/chat",
        "input_example": CHAT_EXAMPLE,
        "pip_requirements": pip_requirements(adapter),
        "base_model_path": base_model_path,
    }


def _already_registered(tracker: Any, cfg: PipelineConfig) -> Any:
    query = f"name='{cfg.model_name}' and tags.`{tracking.RUN_TAG}` = '{cfg.run_id}'"
    versions = tracker.search_model_versions(query)
    return versions[0] if versions else None


PROMOTION_DONE = "finetune.register.promotion"  # version tag: the outcome of register's promotion attempt


def _complete(tracker: Any, cfg: PipelineConfig, version: str, evaluated: dict[str, Any]) -> list[registry.AliasMove]:
    """What follows the version, done so that a re-run after a crash at any point ends where an
    uninterrupted run would: ``challenger`` (unless a newer version holds it by now), then, when
    the gate passed and no earlier try finished it, the promotion attempt. The aliases this try
    moved, in order."""
    moves: list[registry.AliasMove] = []
    held = tracker.get_registered_model(cfg.model_name).aliases.get(CHALLENGER)
    if held is None or int(held) < int(version):
        tracker.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        why = f"version {version} registered by pipeline run {cfg.run_id}"
        metrics = {k: float(v) for k, v in evaluated["metrics"].items()}
        previous = "" if held is None else str(held)
        moves.append(registry.AliasMove(CHALLENGER, version, previous, why, metrics, at=lock.SYSTEM_CLOCK.stamp()))
    if cfg.promote.require_approval:  # champion moves when a person approves: the finetune DAG's promote task
        return moves
    if evaluated["promote"] and PROMOTION_DONE not in tracker.get_model_version(cfg.model_name, version).tags:
        # Under the registry lock, and only if the champion evaluate compared against still holds.
        promotion = registry.attempt(
            tracker,
            cfg.model_name,
            version,
            CHAMPION,
            requested_by=f"register:{cfg.run_id}",
            reason=evaluated["reason"],
            expected_current=evaluated.get("champion_version") or "",
            ttl_s=cfg.promote.lock_ttl_s,
            wait_s=cfg.promote.lock_wait_s,
        )
        tracker.set_model_version_tag(cfg.model_name, version, PROMOTION_DONE, promotion.outcome)
        moves += promotion.alias_moves
    return moves


def _ensure_registered_model(tracker: Any, cfg: PipelineConfig) -> None:
    """Create the registered model ``cfg.model_name`` unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        tracker.create_registered_model(
            cfg.model_name, description=f"{cfg.task} models fine-tuned by finetune-pipeline"
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _new_version(tracker: Any, cfg: PipelineConfig, inputs: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Log the trained model with its model card (pictures, a causal LM's samples) and register it
    as a new version with its lineage; the version and the MLflow run it was logged to."""
    trained, evaluated = inputs["train"], inputs["evaluate"]
    mlflow_run_id = trained.get("mlflow_run_id") or tracking.pipeline_run_id(cfg)
    pictures_run_id = evaluated.get("mlflow_run_id") or mlflow_run_id  # where evaluate logged its PNGs
    pictures = {p["path"]: p["caption"] for p in evaluated.get("pictures") or []}
    pictures.update(drift_picture(inputs["validate"], pictures_run_id))
    samples = (
        storage.read_json(evaluated["report_uri"]) if cfg.task == "causal-lm" and evaluated.get("report_uri") else []
    )
    card = model_card(cfg, inputs, pictures, pictures_run_id, samples)
    info = _log_model(cfg, trained["model_uri"], mlflow_run_id, card)
    # The registry's store finds the logged model (models:/<model_id>) through the module-level
    # tracking URI, not this client's (MLflow's own TODO in create_model_version).
    with tracking.module_api():
        version = str(
            tracker.create_model_version(
                cfg.model_name,
                info.model_uri,
                run_id=mlflow_run_id,
                tags=lineage_tags(cfg, inputs),
                description=card,
                model_id=info.model_id,
            ).version
        )
    return version, mlflow_run_id


def run(cfg: PipelineConfig) -> RegisterResult:
    inputs = _inputs(cfg.register)
    trained, evaluated = inputs["train"], inputs["evaluate"]
    tracker = tracking.client()
    _ensure_registered_model(tracker, cfg)
    existing = _already_registered(tracker, cfg)
    if existing is not None:  # a retried or re-run register: same training run, same version
        version, mlflow_run_id = str(existing.version), existing.run_id
        print(f"register: pipeline run {cfg.run_id} is already version {version}; completing it", file=sys.stderr)
    else:
        version, mlflow_run_id = _new_version(tracker, cfg, inputs)
    # Before promoting: an alias moved outside the pipeline is reported (and alerted), not adopted in silence.
    outside = [str(move) for move in registry.outside_moves(tracker, cfg.model_name)]
    for move in outside:
        print(f"register: WARNING {cfg.model_name}: {move}", file=sys.stderr)
    moves = _complete(tracker, cfg, version, evaluated)
    tracker.set_tag(mlflow_run_id, "finetune.registered_version", f"{cfg.model_name}/{version}")
    registered = tracker.get_model_version(cfg.model_name, version)
    aliases = sorted(registered.aliases)
    print(f"register: {cfg.model_name} version {version} aliases {aliases}: {evaluated['reason']}", file=sys.stderr)
    awaiting = bool(evaluated["promote"]) and cfg.promote.require_approval and CHAMPION not in aliases
    if awaiting:
        print(
            f"register: version {version} passed the gate and is awaiting approval (promote.require_approval): "
            f"{CHAMPION} moves when a person approves it in Airflow's Required actions",
            file=sys.stderr,
        )
    elif CHAMPION not in aliases:
        print(
            f"register: the champion is unchanged; version {version} stays {CHALLENGER}. To promote it anyway, "
            f"trigger the promote DAG with version={version}, force=true and a reason (recorded in "
            f"{cfg.model_name}-promotions).",
            file=sys.stderr,
        )
    metrics = {k: float(v) for k, v in evaluated["metrics"].items()}
    return RegisterResult(
        result_uri=storage.join(cfg.step_uri("register"), "result.json"),
        model_name=cfg.model_name,
        version=version,
        aliases=aliases,
        promoted=CHAMPION in aliases,
        reason=evaluated["reason"],
        metrics=metrics,
        run_id=cfg.run_id,
        snapshot=trained["snapshot_uri"],
        mlflow_run_id=mlflow_run_id,
        model_uri=f"models:/{cfg.model_name}/{version}",
        base_metrics={k: float(v) for k, v in (evaluated.get("base_metrics") or {}).items()},
        slices=evaluated.get("slices") or {},
        outside_moves=outside,
        gate=registry.gate_summary(registered, forced=False),
        alias_moves=moves,
        awaiting_approval=awaiting,
        drift=drift_measures(inputs["validate"]) if awaiting else [],
    )
