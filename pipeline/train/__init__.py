"""train: fine-tune a pretrained model with Hugging Face ``Trainer`` and DeepSpeed ZeRO, over
``train.num_processes`` processes started by ``torch.distributed.run``.

Three task families: ``sequence-classification`` (a classification head on the snapshot's
``text``/``label``), ``causal-lm`` (instruction or chat fine-tuning on the snapshot's
``messages``, rendered with the chat template, loss on assistant tokens only, optional LoRA) and
``preference`` (DPO on ``prompt``/``chosen``/``rejected`` pairs with TRL's ``DPOTrainer``, against
the base model or ``train.reference_model``, optional LoRA; ``preference``).
Each rank gets its own shard of every epoch; at the end the ranks exchange the ids of the
examples they saw and rank 0 records the sharding audit (per-rank counts, overlap) in
``training_summary.json``. The model is published as safetensors with its tokenizer under
``<artifact_root>/runs/<run_id>/train/model/`` (and a LoRA adapter under ``train/adapter/``).

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m pipeline train \\
        --set train.snapshot_uri=file:///.../data.parquet --set train.epochs=1

This module is the recipe, read top to bottom: ``run`` (the step) and ``_fit`` (the training, phase
by phase). The task families' parts are in ``parts`` (the model, tokenizer, datasets and collator of
each; ``preference`` adds its Trainer class, arguments and reference model), the plumbing beside it: ``trainer`` (the audited Trainer, the warm start, the progress
callbacks), ``checkpointing`` (checkpoints to the store, SIGTERM, resume) and
``pipeline.distributed`` (ranks and collectives).

torch, transformers, deepspeed, datasets, peft and mlflow are imported inside the functions that
use them: the step table imports this module when Airflow parses the DAG files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline import checkpoints, storage, tracking
from pipeline.config import CHAT_TASKS, PipelineConfig, TrainConfig
from pipeline.distributed import barrier, gather, node_dir, ranks
from pipeline.errors import ConfigError, DataError, TransientError
from pipeline.models import extend_like, load_causal_lm, resolve_model
from pipeline.snapshot import load_snapshot
from pipeline.train import ops, startup
from pipeline.train.checkpointing import (
    _checkpointing,
    _newest_step,
    _resume_point,
    _Termination,
    checkpoint_meta,
    checkpoint_root,
    weights_only_deepspeed_loads,
)
from pipeline.train.parts import TASK_PARTS, Parts, model_kwargs
from pipeline.train.preference import preference_parts
from pipeline.train.trainer import (
    _Audit,
    _audited_trainer,
    _callbacks,
    _deepspeed_summary,
    _peak_memory,
    _WarmStart,
    settings_refused,
    sharding_report,
)


@dataclass(frozen=True)
class TrainResult:
    result_uri: str
    model_uri: str
    summary_uri: str
    snapshot_uri: str
    base_model: str
    global_step: int
    train_loss: float
    train_runtime_s: float
    world_size: int
    mlflow_run_id: str
    config_sha256: str  # training config + DeepSpeed config, for lineage


def run(cfg: PipelineConfig) -> TrainResult | None:
    own = cfg.train
    if not own.snapshot_uri:
        raise ConfigError("train.snapshot_uri is required (the collect step's snapshot_uri)")
    if cfg.task in CHAT_TASKS and own.lora_r and not own.lora_merge and storage.scheme(cfg.base_model) == "s3":
        raise ConfigError(
            f"train.lora_merge=false registers the adapter with a reference to base_model, but "
            f"'{cfg.base_model}' is copied from S3 into a temporary directory for each step; use a "
            f"local directory or a hub name, or train.lora_merge=true"
        )
    rank, _, world = ranks()
    ds_config = deepspeed_config(own)
    with (
        startup.watchdog(own.startup_timeout_s) as started,
        tempfile.TemporaryDirectory(prefix="finetune-train-") as tmp,
    ):
        scratch = Path(tmp)
        model_dir = resolve_model(cfg.base_model, scratch)
        frame = load_snapshot(own.snapshot_uri)
        train_rows = frame[frame["split"] == "train"].reset_index(drop=True)
        if train_rows.empty:
            raise DataError(f"{own.snapshot_uri}: the train split is empty")
        check_snapshot(cfg, frame)
        # Data and tokenizer first: bad input fails here, before any model is built or run tracked.
        parts = {**TASK_PARTS, "preference": preference_parts}[cfg.task](
            cfg, model_dir, frame, model_kwargs(cfg, model_dir)
        )
        if own.eval_steps and parts.eval_dataset is None:
            raise DataError(
                f"{own.snapshot_uri}: train.eval_steps={own.eval_steps} needs held-out examples, but "
                "the eval split has none (collect.eval_fraction)"
            )
        mlflow_run_id = _start_tracking(cfg, ds_config, train_rows) if rank == 0 else None
        outcome = _fit(cfg, parts, model_dir, ds_config, scratch, mlflow_run_id, started)
        if rank != 0:
            return None
        out_uri = cfg.step_uri("train")
        if (scratch / "adapter").is_dir():
            storage.publish_dir(scratch / "adapter", storage.join(out_uri, "adapter"))
        model_uri = storage.publish_dir(scratch / "model", storage.join(out_uri, "model"))
        summary_uri = storage.join(out_uri, "training_summary.json")
        storage.write_json(summary_uri, outcome)
        if mlflow_run_id:  # the sharding audit and, for causal-lm, the truncated/dropped counts
            tracking.client().log_dict(mlflow_run_id, outcome, "train/training_summary.json")
        # The model is published: the checkpoints were only for finishing this training.
        checkpoints.delete_all(checkpoint_root(cfg))
    return TrainResult(
        result_uri=storage.join(out_uri, "result.json"),
        model_uri=model_uri,
        summary_uri=summary_uri,
        snapshot_uri=own.snapshot_uri,
        base_model=cfg.base_model,
        global_step=outcome["global_step"],
        train_loss=outcome["train_loss"],
        train_runtime_s=outcome["train_runtime_s"],
        world_size=world,
        mlflow_run_id=mlflow_run_id or "",
        config_sha256=config_hash(cfg, ds_config),
    )


def check_snapshot(cfg: PipelineConfig, frame: Any) -> None:
    """The snapshot holds what the task family trains on."""
    needed = {
        "sequence-classification": ("text", "label"),
        "causal-lm": ("messages",),
        "preference": ("prompt", "chosen", "rejected"),
    }[cfg.task]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{cfg.train.snapshot_uri}: no column(s) {missing} for task {cfg.task}; found "
            f"{list(frame.columns)} (was it collected for another task?)"
        )


def config_hash(cfg: PipelineConfig, ds_config: dict[str, Any]) -> str:
    """Everything that shapes the weights apart from the data: model, seed, train settings, DeepSpeed."""
    settings = {
        "base_model": cfg.base_model,
        "seed": cfg.seed,
        "task": cfg.task,
        "train": {k: v for k, v in vars(cfg.train).items() if k != "snapshot_uri"},
        "deepspeed": ds_config,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _start_tracking(cfg: PipelineConfig, ds_config: dict[str, Any], train_rows: Any) -> str:
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    run_id = tracking.pipeline_run_id(cfg)
    tracker = tracking.client()
    params = {
        "task": cfg.task,
        "base_model": cfg.base_model,
        "seed": cfg.seed,
        **{f"train.{k}": v for k, v in vars(cfg.train).items()},
    }
    tracker.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    tracker.log_dict(run_id, ds_config, "train/deepspeed_config.json")
    columns = [c for c in train_rows.columns if c != "split"]
    with tracking.module_api(), mlflow.start_run(run_id=run_id):
        dataset = from_pandas(
            train_rows[columns],
            source=cfg.train.snapshot_uri,
            name="train",
            targets="label" if "label" in columns else None,
        )
        mlflow.log_input(dataset, context="training")
    return run_id


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    uri = cfg.deepspeed_config or f"pkg://pipeline/configs/zero{cfg.zero_stage}.json"
    try:
        config = json.loads(storage.read_bytes(uri))
    except (DataError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed_config: cannot load {uri}: {exc}") from exc
    zero = config.setdefault("zero_optimization", {})
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # DeepSpeed refuses ZeRO-Offload with the Trainer's own (client) optimizer: the optimizer
        # must step where its states now live, which DeepSpeed's CPU Adam does. "auto" values are
        # the Trainer's (train.learning_rate, train.weight_decay, adam_* in train.trainer_args);
        # the learning-rate schedule stays the Trainer's.
        config.setdefault(
            "optimizer",
            {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        )
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def _fit(
    cfg: PipelineConfig,
    parts: Parts,
    model_dir: str,
    ds_config: dict[str, Any],
    scratch: Path,
    mlflow_run_id: str | None,
    started: startup.Started,
) -> dict[str, Any]:
    """The training, on every rank: the Trainer's arguments, the resume point, the Trainer with its
    callbacks, the training itself, then the model and the sharding audit saved."""
    import torch
    from transformers import set_seed

    warm_start = _warm_start(cfg.train, parts, ds_config)
    set_seed(cfg.seed)
    use_cpu = not torch.cuda.is_available()
    rank, local_rank, world = ranks()
    # Before DeepSpeed sets up torch.distributed or its optimizer: both may need a C++ op built.
    ops.prepare(ops.needed(cfg.train.offload_optimizer))
    if world > 1:
        _init_distributed(cfg.train, use_cpu)
    checkpoint_dir = node_dir(scratch)
    args = _training_arguments(cfg, checkpoint_dir, ds_config, use_cpu, parts)
    meta = checkpoint_meta(cfg, ds_config, world)
    resume = _resume_point(cfg, meta, checkpoint_dir)
    audit = _Audit(parts.collator)
    if resume is not None:
        _restore(cfg, resume, audit, rank)
    term = _Termination()
    saver = _checkpointing(cfg, meta, audit, term, resume)
    trainer = _trainer(cfg, parts, args, audit, warm_start, saver, mlflow_run_id, world, scratch)
    trainer.add_callback(started.callback())  # training began: the start-up is over
    try:
        output = trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    finally:
        term.close()
    if saver.stopped_at is not None:
        raise _stopped(cfg, saver.stopped_at)
    extra, report = _save(cfg, parts, trainer, audit, model_dir, scratch)
    barrier()
    if local_rank == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {
        "global_step": int(output.global_step),
        "train_loss": float(output.training_loss),
        "train_runtime_s": float(output.metrics.get("train_runtime", 0.0)),
        **parts.summary,
        **extra,
        "sharding": report,
        "deepspeed": _deepspeed_summary(trainer, ds_config),
        "trainer_world_size": args.world_size,
        "peak_memory_bytes": _peak_memory(torch),
    }


def _stopped(cfg: PipelineConfig, step: int) -> TransientError:
    """What a run SIGTERM stopped at ``step`` raises: retried, from the newest checkpoint."""
    return TransientError(
        f"train: stopped by SIGTERM at step {step} (an eviction or preemption "
        "notice); "
        + (
            "a checkpoint was saved there"
            if step == _newest_step(cfg)
            else f"no time to save within train.term_grace_s={cfg.train.term_grace_s}"
        )
        + "; the next attempt resumes from the newest checkpoint"
    )


def _warm_start(own: TrainConfig, parts: Parts, ds_config: dict[str, Any]) -> _WarmStart | None:
    """train.extend_vocab's frozen first phase, when the task family added tokens and the run has one."""
    # The body trains for at least one epoch: a one-epoch run has no frozen phase.
    frozen_epochs = min(own.extend_vocab_epochs, own.epochs - 1)
    warm_start = (
        _WarmStart(frozen_epochs, own.extend_vocab_learning_rate) if parts.warm_start and frozen_epochs else None
    )
    if warm_start is not None and "optimizer" in ds_config:  # before any model, engine or op build
        raise ConfigError(_WarmStart.REFUSED)
    return warm_start


def _init_distributed(own: TrainConfig, use_cpu: bool) -> None:
    import deepspeed

    # DeepSpeed's collectives call torch.distributed functions that torch 2.13 deprecates
    # (all_gather_into_tensor, reduce_scatter_tensor); under ZeRO-3 the warning repeats
    # thousands of times and buries the task log. Nothing for us to change.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    # Before TrainingArguments/from_pretrained: ZeRO-3's zero.Init reads the world size from
    # deepspeed.comm, which would otherwise still say 1 on CPU and reject the batch sizes.
    # A bounded wait: one hung rank fails the collective after collective_timeout_s instead
    # of blocking every later run behind it.
    deepspeed.init_distributed(
        dist_backend="gloo" if use_cpu else "nccl", timeout=timedelta(seconds=own.collective_timeout_s)
    )


def _training_arguments(
    cfg: PipelineConfig, output_dir: Path, ds_config: dict[str, Any], use_cpu: bool, parts: Parts | None = None
) -> Any:
    from transformers import TrainingArguments as HfTrainingArguments

    # The family's own subclass where it has one (preference: TRL's DPOConfig), with its fields.
    TrainingArguments = (parts and parts.arguments_class) or HfTrainingArguments  # noqa: N806
    family = {**(parts.arguments if parts else {}), **cfg.train.trainer_args}
    own = cfg.train
    # TrainingArguments first: with ZeRO-3 it must exist before from_pretrained to partition weights.
    # Every field set here is refused in train.trainer_args (config.PIPELINE_TRAINER_ARGS says why).
    try:
        return TrainingArguments(
            **family,
            output_dir=str(output_dir),
            num_train_epochs=own.epochs,
            learning_rate=own.learning_rate,
            per_device_train_batch_size=own.batch_size,
            gradient_accumulation_steps=own.gradient_accumulation_steps,
            weight_decay=own.weight_decay,
            warmup_steps=own.warmup_ratio,
            logging_steps=own.logging_steps,
            # A classification loss is a per-example mean over equal batches on every rank: token
            # averaging would multiply it by the world size. A causal LM's loss is per token, and
            # batches hold different numbers of target tokens: there it is what makes the mean right.
            average_tokens_across_devices=cfg.task == "causal-lm",  # DPO's loss is a mean over pairs
            # Checkpoints: the Trainer's own (DeepSpeed state of every rank, RNG, data position) in a
            # node-local folder, copied to the artifact store by the Checkpointing callback.
            **_schedule(own),
            save_total_limit=1,
            report_to="none",
            seed=cfg.seed,
            data_seed=cfg.seed,
            use_cpu=use_cpu,
            ddp_timeout=own.collective_timeout_s,
            deepspeed=ds_config,
            disable_tqdm=True,
            remove_unused_columns=False,
            label_names=["labels"],
            per_device_eval_batch_size=own.batch_size,
            **mixed_precision(own),
            dataloader_drop_last=True,
        )  # a partial last batch would be padded with repeats on the other ranks
    except (TypeError, ValueError) as exc:  # what the config-time check cannot know, e.g. an optimizer's package
        raise ConfigError(
            f"train.trainer_args {json.dumps(own.trainer_args)}: TrainingArguments refused them: {exc}"
        ) from exc


def _restore(cfg: PipelineConfig, resume: tuple[int, Path], audit: _Audit, rank: int) -> None:
    """A resumed run: DeepSpeed's files read weights-only, and this rank's audit as the checkpoint holds it."""
    weights_only_deepspeed_loads()
    step, path = resume
    audit.restore((path / f"audit-rank{rank}.json").read_text())
    if rank == 0:
        print(
            f"train: resuming from step {step} ({storage.join(checkpoint_root(cfg), checkpoints.name(step))})",
            file=sys.stderr,
            flush=True,
        )


def _trainer(
    cfg: PipelineConfig,
    parts: Parts,
    args: Any,
    audit: _Audit,
    warm_start: _WarmStart | None,
    saver: Any,
    mlflow_run_id: str | None,
    world: int,
    scratch: Path,
) -> Any:
    """The audited Trainer (the family's class, else transformers'), its model loaded (after the
    TrainingArguments: ZeRO-3 partitions it)."""
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer

    own = cfg.train
    stopping = [EarlyStoppingCallback(own.early_stopping_patience)] if own.early_stopping_patience else []
    model = parts.load_model()  # what from_pretrained or PEFT refuse is named by parts
    extra = parts.trainer_kwargs(model, scratch) if parts.trainer_kwargs else {}
    settings = (
        f"train.zero_stage={own.zero_stage}, train.deepspeed_config={own.deepspeed_config or '(the shipped one)'}, "
        f"train.offload_optimizer={own.offload_optimizer}, train.offload_params={own.offload_params}, "
        f"train.batch_size={own.batch_size}, train.gradient_accumulation_steps={own.gradient_accumulation_steps}, "
        f"train.precision={own.precision}, train.trainer_args={json.dumps(own.trainer_args)}"
    )
    with settings_refused(settings):
        trainer = _audited_trainer(parts.trainer_class or Trainer)(
            audit,
            warm_start,
            settings,
            model=model,
            args=args,
            train_dataset=parts.dataset,
            eval_dataset=parts.eval_dataset,
            data_collator=audit,
            callbacks=[*_callbacks(audit, mlflow_run_id), saver, *stopping],
            **extra,
        )
    trainer.remove_callback(PrinterCallback)  # our Progress callback prints one line per log instead
    if args.world_size != world:
        raise RuntimeError(
            f"Trainer sees world size {args.world_size}, launcher started "
            f"{world} processes: the data would not be sharded"
        )
    return trainer


def _save(
    cfg: PipelineConfig, parts: Parts, trainer: Any, audit: _Audit, model_dir: str, scratch: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """After training, on every rank: the held-out figures, the model (or adapter) with its tokenizer
    under ``scratch``, and the sharding report of the ids every rank trained on."""
    own = cfg.train
    extra = {**_evaluation_summary(trainer, own), **(parts.after_training(trainer) if parts.after_training else {})}
    target = scratch / ("adapter" if cfg.train.lora_r and cfg.task in CHAT_TASKS else "model")
    trainer.save_model(str(target))  # all ranks: ZeRO-3 gathers the 16-bit weights here
    (target / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in MLflow
    per_rank = gather(audit.seen)
    parts.tokenizer.save_pretrained(str(target))
    if target.name == "adapter" and trainer.is_world_process_zero():
        _publishable_model(cfg, model_dir, target, scratch / "model")
    report = sharding_report(per_rank, len(parts.dataset))
    if trainer.is_world_process_zero():
        print("train: sharding " + json.dumps(report["epochs"]), file=sys.stderr, flush=True)
    return extra, report


def _schedule(own: TrainConfig) -> dict[str, Any]:
    """Evaluation and checkpoint arguments. With early stopping the Trainer keeps the best
    evaluation's checkpoint and loads it at the end (load_best_model_at_end), which it allows only
    when saves can fall on evaluations: its save interval is then train.eval_steps, and the
    Checkpointing callback keeps, of those, only a new best and train.checkpoint_steps' (the epoch
    ends with 0)."""
    evaluation = {"eval_strategy": "steps", "eval_steps": own.eval_steps} if own.eval_steps else {"eval_strategy": "no"}
    if own.early_stopping_patience:
        return {
            **evaluation,
            "save_strategy": "steps",
            "save_steps": own.eval_steps,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
            "restore_callback_states_from_checkpoint": True,
        }  # a resumed run keeps its patience count
    return {
        **evaluation,
        "save_strategy": "steps" if own.checkpoint_steps else "epoch",
        "save_steps": own.checkpoint_steps or None,
    }


def mixed_precision(cfg: TrainConfig) -> dict[str, Any]:
    """TrainingArguments' bf16/fp16 flags; the DeepSpeed JSON's "auto" entries follow them."""
    import torch

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={cfg.precision}: {precision} training needs a GPU; use fp32 or auto on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _evaluation_summary(trainer: Any, own: TrainConfig) -> dict[str, Any]:
    """The held-out loss curve of train.eval_steps and, with early stopping, which step won."""
    if not own.eval_steps:
        return {}
    state = trainer.state
    curve = [[entry["step"], entry["eval_loss"]] for entry in state.log_history if "eval_loss" in entry]
    summary: dict[str, Any] = {"eval_loss_curve": curve}
    if own.early_stopping_patience:
        summary.update(
            best_step=state.best_global_step,
            best_eval_loss=state.best_metric,
            stopped_early=state.global_step < state.max_steps,
        )
    return summary


def _publishable_model(cfg: PipelineConfig, model_dir: str, adapter: Path, out: Path) -> None:
    """The ``model/`` a LoRA run publishes: base + adapter merged, or the adapter alone."""
    if not cfg.train.lora_merge:
        shutil.copytree(adapter, out)
        return
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over and only rank 0 is here: loading under ZeRO-3's zero.Init would wait for
    # the other ranks' collectives forever.
    unset_hf_deepspeed_config()
    base, base_tokenizer = load_causal_lm(model_dir, f"base_model '{cfg.base_model}'")
    extend_like(
        base, base_tokenizer, AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=False)
    )  # train.extend_vocab's rows
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=False).save_pretrained(
        str(out)
    )  # carries the chat template used
