"""train: fine-tune a pretrained model for sequence classification with Hugging Face ``Trainer``
and DeepSpeed ZeRO, over ``train.num_processes`` processes started by ``torch.distributed.run``.

Each rank gets its own shard of every epoch; at the end the ranks exchange the ids of the
examples they saw and rank 0 records the sharding audit (per-rank counts, overlap) in
``training_summary.json``. The model is published as safetensors with its tokenizer under
``<artifact_root>/runs/<run_id>/train/model/``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m pipeline train \\
        --set train.snapshot_uri=file:///.../data.parquet --set train.epochs=1
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, check_fields, option
from pipeline.errors import ConfigError, DataError, ModelError

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class TrainConfig:
    snapshot_uri: str = option("", "Snapshot to train on (the collect step's snapshot_uri).")
    epochs: int = option(5, "Passes over the training split.", minimum=1, maximum=100)
    learning_rate: float = option(2e-4, "Peak learning rate (linear decay after warm-up).",
                                  exclusive_minimum=0.0, maximum=1.0)
    batch_size: int = option(16, "Examples per process per step (micro-batch).", minimum=1, maximum=1024)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", minimum=1, maximum=1024)
    max_seq_len: int = option(64, "Tokens per example after truncation.", minimum=8, maximum=8192)
    weight_decay: float = option(0.01, "AdamW weight decay.", minimum=0.0, maximum=1.0)
    warmup_ratio: float = option(0.1, "Share of steps spent warming up the learning rate.", minimum=0.0, maximum=0.5)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (shipped configs zero0..zero3.json).", choices=ZERO_STAGES)
    deepspeed_config: str = option("", "A DeepSpeed JSON to use instead of the shipped zero<stage>.json.")
    num_processes: int = option(2, "Training processes on this node (GPUs, or CPU processes with gloo).",
                                minimum=1, maximum=64)
    logging_steps: int = option(5, "Log loss and learning rate every N optimizer steps.", minimum=1)

    def __post_init__(self) -> None:
        check_fields(self, "train.")


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


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    uri = cfg.deepspeed_config or f"pkg://pipeline/configs/zero{cfg.zero_stage}.json"
    try:
        return json.loads(storage.read_bytes(uri))
    except (DataError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed_config: cannot load {uri}: {exc}") from exc


def resolve_model(uri: str, scratch: Path, what: str = "base_model") -> str:
    """A local directory (or hub name) that ``from_pretrained`` can load ``uri`` from."""
    kind = storage.scheme(uri)
    if kind == "s3":
        return str(storage.fetch_dir(uri, scratch / "model"))
    path = storage.local_path(uri) if kind in ("", "file", "pkg") else None
    looks_like_hub_name = kind == "" and not uri.startswith((".", "/", "~")) and uri.count("/") == 1
    if path is None or (looks_like_hub_name and not path.exists()):
        return uri  # a hub name; from_pretrained reports if it cannot be reached
    if not path.is_dir():
        raise ModelError(f"{what} '{uri}': no such directory ({path})")
    if not (path / "config.json").is_file():
        raise ModelError(f"{what} '{uri}': {path} holds no config.json; not a Hugging Face model directory")
    if not os.access(path / "config.json", os.R_OK):
        raise ModelError(f"{what} '{uri}': {path / 'config.json'} is not readable")
    return str(path)


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    ordered = sorted(labels)
    return dict(enumerate(ordered)), {label: i for i, label in enumerate(ordered)}


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class _Audit:
    """Collator wrapper: pads a batch and records which example ids this rank saw, per epoch."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.seen: dict[int, list[int]] = {}
        self.epoch = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.seen.setdefault(self.epoch, []).extend(int(f.pop("example_id")) for f in features)
        return self.collate(features)


def _callbacks(audit: _Audit, mlflow_run_id: str | None) -> list[Any]:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Progress lines for the task log, per-step metrics to MLflow (rank 0)."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            audit.epoch = int(round(state.epoch or 0))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            print(f"train: step {state.global_step}/{state.max_steps} "
                  + " ".join(f"{k}={v:.4g}" for k, v in numbers.items()), flush=True)
            if mlflow_run_id:
                from pipeline.tracking import client

                client().log_batch(mlflow_run_id, metrics=[_metric(f"train_{k}" if not k.startswith("train_") else k,
                                                                   v, state.global_step) for k, v in numbers.items()])

    return [Progress()]


def _metric(key: str, value: float, step: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=int(time.time() * 1000), step=step)


def _gather_audit(audit: _Audit, world: int) -> list[dict[int, list[int]]]:
    if world == 1:
        return [audit.seen]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, audit.seen)
    return gathered


def sharding_report(per_rank: list[dict[int, list[int]]], examples: int) -> dict[str, Any]:
    """Per-epoch counts: how many ids each rank saw and how many were seen more than once."""
    epochs = sorted({e for seen in per_rank for e in seen})
    report = []
    for epoch in epochs:
        ids = [i for seen in per_rank for i in seen.get(epoch, [])]
        report.append({"epoch": epoch, "seen_per_rank": [len(seen.get(epoch, [])) for seen in per_rank],
                       "distinct": len(set(ids)), "seen_twice": len(ids) - len(set(ids))})
    return {"world_size": len(per_rank), "examples": examples, "epochs": report}


def run(cfg: PipelineConfig) -> TrainResult | None:
    own = cfg.train
    if not own.snapshot_uri:
        raise ConfigError("train.snapshot_uri is required (the collect step's snapshot_uri)")
    rank, world = _rank()
    ds_config = deepspeed_config(own)
    with tempfile.TemporaryDirectory(prefix="finetune-train-") as tmp:
        scratch = Path(tmp)
        model_dir = resolve_model(cfg.base_model, scratch)
        from pipeline.collect import load_snapshot

        frame = load_snapshot(own.snapshot_uri)
        labels = sorted({str(v) for v in frame["label"].dropna()})
        if len(labels) < 2:
            raise DataError(f"{own.snapshot_uri}: needs at least 2 labels to train a classifier, found {labels}")
        train_rows = frame[frame["split"] == "train"].reset_index(drop=True)
        if train_rows.empty:
            raise DataError(f"{own.snapshot_uri}: the train split is empty")
        mlflow_run_id = _start_tracking(cfg, ds_config, train_rows) if rank == 0 else None
        outcome = _fit(cfg, model_dir, train_rows, labels, ds_config, scratch, mlflow_run_id)
        if rank != 0:
            return None
        out_uri = cfg.step_uri("train")
        model_uri = storage.publish_dir(scratch / "model", storage.join(out_uri, "model"))
        summary_uri = storage.join(out_uri, "training_summary.json")
        storage.write_json(summary_uri, outcome)
    return TrainResult(result_uri=storage.join(out_uri, "result.json"), model_uri=model_uri, summary_uri=summary_uri,
                       snapshot_uri=own.snapshot_uri, base_model=cfg.base_model, global_step=outcome["global_step"],
                       train_loss=outcome["train_loss"], train_runtime_s=outcome["train_runtime_s"],
                       world_size=world, mlflow_run_id=mlflow_run_id or "",
                       config_sha256=config_hash(cfg, ds_config))


def config_hash(cfg: PipelineConfig, ds_config: dict[str, Any]) -> str:
    """Everything that shapes the weights apart from the data: model, seed, train settings, DeepSpeed."""
    import hashlib

    settings = {"base_model": cfg.base_model, "seed": cfg.seed, "task": cfg.task,
                "train": {k: v for k, v in vars(cfg.train).items() if k != "snapshot_uri"}, "deepspeed": ds_config}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _start_tracking(cfg: PipelineConfig, ds_config: dict[str, Any], train_rows: Any) -> str:
    import mlflow

    from pipeline.tracking import client, pipeline_run_id

    run_id = pipeline_run_id(cfg)
    tracker = client()
    params = {"task": cfg.task, "base_model": cfg.base_model, "seed": cfg.seed,
              **{f"train.{k}": v for k, v in vars(cfg.train).items()}}
    tracker.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    tracker.log_dict(run_id, ds_config, "train/deepspeed_config.json")
    with mlflow.start_run(run_id=run_id):
        dataset = mlflow.data.from_pandas(train_rows[["text", "label"]], source=cfg.train.snapshot_uri,
                                          name="train", targets="label")
        mlflow.log_input(dataset, context="training")
    return run_id


def _fit(cfg: PipelineConfig, model_dir: str, rows: Any, labels: list[str], ds_config: dict[str, Any],
         scratch: Path, mlflow_run_id: str | None) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, PrinterCallback,
                              Trainer,
                              TrainingArguments, set_seed)

    own = cfg.train
    set_seed(cfg.seed)
    use_cpu = not torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed

        # Before TrainingArguments/from_pretrained: ZeRO-3's zero.Init reads the world size from
        # deepspeed.comm, which would otherwise still say 1 on CPU and reject the batch sizes.
        deepspeed.init_distributed(dist_backend="gloo" if use_cpu else "nccl")
    # TrainingArguments first: with ZeRO-3 it must exist before from_pretrained to partition weights.
    args = TrainingArguments(
        output_dir=str(scratch / "checkpoints"), num_train_epochs=own.epochs, learning_rate=own.learning_rate,
        per_device_train_batch_size=own.batch_size, gradient_accumulation_steps=own.gradient_accumulation_steps,
        weight_decay=own.weight_decay, warmup_steps=own.warmup_ratio, logging_steps=own.logging_steps,
        # Sequence classification losses are per-example means with equal batches on every rank;
        # token averaging would multiply them by the world size (and the gradients with them).
        average_tokens_across_devices=False,
        save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed, use_cpu=use_cpu,
        deepspeed=ds_config, disable_tqdm=True, remove_unused_columns=False,
        dataloader_drop_last=True)  # a partial last batch would be padded with repeats on the other ranks
    id2label, label2id = label_maps(labels)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base_model '{cfg.base_model}': cannot load: {exc}") from exc
    encoded = tokenizer(list(rows["text"]), truncation=True, max_length=own.max_seq_len)
    dataset = Dataset.from_dict({**encoded, "labels": [label2id[str(v)] for v in rows["label"]],
                                 "example_id": list(range(len(rows)))})
    audit = _Audit(DataCollatorWithPadding(tokenizer))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=audit,
                      callbacks=_callbacks(audit, mlflow_run_id))
    trainer.remove_callback(PrinterCallback)  # our Progress callback prints one line per log instead
    if args.world_size != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError(f"Trainer sees world size {args.world_size}, launcher started "
                           f"{os.environ.get('WORLD_SIZE')} processes: the data would not be sharded")
    output = trainer.train()
    trainer.save_model(str(scratch / "model"))  # all ranks: ZeRO-3 gathers the 16-bit weights here
    (scratch / "model" / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in MLflow
    per_rank = _gather_audit(audit, args.world_size)
    tokenizer.save_pretrained(str(scratch / "model"))
    report = sharding_report(per_rank, len(rows))
    if trainer.is_world_process_zero():
        print("train: sharding " + json.dumps(report["epochs"]), file=sys.stderr, flush=True)
    return {"global_step": int(output.global_step), "train_loss": float(output.training_loss),
            "train_runtime_s": float(output.metrics.get("train_runtime", 0.0)), "labels": labels,
            "sharding": report, "deepspeed": {"zero_stage": ds_config.get("zero_optimization", {}).get("stage")},
            "trainer_world_size": args.world_size}


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import step_main

    return step_main("train", run, argv)
