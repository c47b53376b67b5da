"""train: fine-tune a pretrained model with Hugging Face ``Trainer`` and DeepSpeed ZeRO, over
``train.num_processes`` processes started by ``torch.distributed.run``.

Two task families: ``sequence-classification`` (a classification head on the snapshot's
``text``/``label``) and ``causal-lm`` (instruction or chat fine-tuning on the snapshot's
``messages``, rendered with the chat template, loss on assistant tokens only, optional LoRA).
Each rank gets its own shard of every epoch; at the end the ranks exchange the ids of the
examples they saw and rank 0 records the sharding audit (per-rank counts, overlap) in
``training_summary.json``. The model is published as safetensors with its tokenizer under
``<artifact_root>/runs/<run_id>/train/model/`` (and a LoRA adapter under ``train/adapter/``).

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m pipeline train \\
        --set train.snapshot_uri=file:///.../data.parquet --set train.epochs=1

torch, transformers, deepspeed, datasets, peft and mlflow are imported inside the functions that
use them: the step table imports this module when Airflow parses the DAG files.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from pipeline import chat, checkpoints, storage, tracking
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.errors import ConfigError, DataError, ModelError, PipelineError, TransientError
from pipeline.models import (extend_embeddings, extend_like, extend_vocabulary, lm_tokenizer, load_causal_lm,
                             resolve_model)
from pipeline.snapshot import load_snapshot


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
        config.setdefault("optimizer", {"type": "AdamW", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}})
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def mixed_precision(cfg: TrainConfig) -> dict[str, bool]:
    """TrainingArguments' bf16/fp16 flags; the DeepSpeed JSON's "auto" entries follow them."""
    import torch

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={cfg.precision}: {precision} training needs a GPU; use fp32 or auto on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    ordered = sorted(labels)
    return dict(enumerate(ordered)), {label: i for i, label in enumerate(ordered)}


def _ranks() -> tuple[int, int, int]:
    """This process's rank, its rank on this node and the world size, as torch.distributed.run sets them."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))


class _Audit:
    """Which example ids this rank trained on, per epoch. The collator attaches the ids to each
    batch and the trainer records them when the batch is trained on, not when it is fetched: the
    data loader fetches ahead, and a checkpoint must hold exactly what its weights have seen."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.seen: dict[int, list[int]] = {}
        self.epoch = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        import torch

        ids = [int(f.pop("example_id")) for f in features]
        batch = self.collate(features)
        batch["example_id"] = torch.tensor(ids)
        return batch

    def record(self, ids: Any) -> None:
        self.seen.setdefault(self.epoch, []).extend(int(i) for i in ids.tolist())

    def state(self) -> str:
        return json.dumps({str(epoch): ids for epoch, ids in self.seen.items()})

    def restore(self, text: str) -> None:
        self.seen = {int(epoch): ids for epoch, ids in json.loads(text).items()}


def _callbacks(audit: _Audit, mlflow_run_id: str | None) -> list[Any]:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Progress lines for the task log, per-step metrics to MLflow (rank 0)."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            # Floor, not round: a run resumed mid-epoch starts at a fractional epoch (e.g. 0.67).
            audit.epoch = int((state.epoch or 0) + 1e-6)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            print(f"train: step {state.global_step}/{state.max_steps} "
                  + " ".join(f"{k}={v:.4g}" for k, v in numbers.items()), flush=True)
            if mlflow_run_id:
                tracking.client().log_batch(mlflow_run_id, metrics=[_metric(f"train_{k}" if not k.startswith("train_") else k,
                                                                   v, state.global_step) for k, v in numbers.items()])

    return [Progress()]


# Settings a new attempt may change without making its checkpoints another run's: how often and how
# many checkpoints, how long to wait. Everything else that shapes the weights must match to resume.
RESUME_FREE = ("checkpoint_steps", "keep_checkpoints", "resume", "term_grace_s", "collective_timeout_s",
               "logging_steps")


def checkpoint_meta(cfg: PipelineConfig, ds_config: dict[str, Any], world: int) -> dict[str, Any]:
    """What a checkpoint records about the run that saved it and a resume must match."""
    return {"world_size": world, "settings": {
        "base_model": cfg.base_model, "seed": cfg.seed, "task": cfg.task, "deepspeed": ds_config,
        "train": {k: v for k, v in vars(cfg.train).items() if k not in RESUME_FREE}}}


def _collective() -> Any:
    """torch.distributed when more than one rank trains, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _barrier() -> None:
    if (dist := _collective()) is not None:
        dist.barrier()


def _from_rank0(compute: Any) -> Any:
    """``compute()`` on rank 0, its result (or its PipelineError, raised here) on every rank."""
    dist = _collective()
    outcome: list[Any] = [None]
    if dist is None or dist.get_rank() == 0:
        try:
            outcome = [("ok", compute())]
        except PipelineError as exc:
            outcome = [("error", exc)]
    if dist is not None:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _node_dir(scratch: Path) -> Path:
    """A directory every rank on this node shares: DeepSpeed writes each rank's part of a
    checkpoint into one folder. Keyed by the launch, so that another run never shares it."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    if not launch:
        return scratch / "checkpoints"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    path = Path(tempfile.gettempdir()) / f"finetune-train-{launch}-{restart}"
    if _ranks()[1] == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    _barrier()
    return path


def _resume_point(cfg: PipelineConfig, meta: dict[str, Any], local: Path) -> tuple[int, Path] | None:
    """The step and local directory of the newest usable checkpoint of this run, on every rank,
    or None. ``train.resume=false`` deletes the run's checkpoints instead."""
    root = checkpoint_root(cfg)
    if not cfg.train.resume:
        _from_rank0(lambda: checkpoints.delete_all(root))
        return None

    def choose() -> tuple[int, str] | None:
        found = checkpoints.newest_usable(root, meta, local / "resume")
        return None if found is None else (found[0].step, str(found[1]))

    chosen = _from_rank0(choose)
    if chosen is None:
        return None
    step, path = chosen
    rank, local_rank, _ = _ranks()
    if rank != 0 and local_rank == 0 and not Path(path).is_dir():  # another node: fetch its own copy
        marker = storage.read_json(storage.join(root, checkpoints.name(step), checkpoints.MARKER))
        checkpoints.fetch(checkpoints.Checkpoint(storage.join(root, checkpoints.name(step)), step, marker), Path(path))
    _barrier()
    return step, Path(path)


def _best_checkpoint(cfg: PipelineConfig, step: int, resume: tuple[int, Path] | None, local: Path) -> Path:
    """A local directory holding the best evaluation's checkpoint of a resumed run, on every rank."""
    if resume is not None and resume[0] == step:
        return resume[1]
    root = checkpoint_root(cfg)
    found = [c for c in checkpoints.complete(root) if c.step == step]
    if not found:
        raise DataError(f"{root}: the best evaluation's checkpoint (step {step}) is gone, so early stopping cannot "
                        "publish its weights; set train.resume=false to train this run over")
    dest = local / "best"
    if _ranks()[1] == 0:
        checkpoints.fetch(found[0], dest)
    _barrier()
    return storage.local_path(found[0].uri) or dest


def checkpoint_root(cfg: PipelineConfig) -> str:
    return storage.join(cfg.step_uri("train"), "checkpoints")


class _Termination:
    """SIGTERM (eviction, preemption notice) asks for a checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
            print("train: SIGTERM: saving a checkpoint at the end of this step, then exiting", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _checkpointing(cfg: PipelineConfig, meta: dict[str, Any], audit: _Audit, term: _Termination,
                   resume: tuple[int, Path] | None) -> Any:
    from transformers import TrainerCallback

    own = cfg.train
    root = checkpoint_root(cfg)
    rank, local_rank, _ = _ranks()

    class Checkpointing(TrainerCallback):
        """Checkpoints at each epoch end and every ``train.checkpoint_steps`` (the Trainer's save
        strategy), copied to the artifact store with the marker last; on SIGTERM, one more
        checkpoint and a stop, when it fits in ``train.term_grace_s``.

        With early stopping, also at each evaluation that is a new best. The best checkpoint stays
        on the node (the Trainer loads it at the end) and in the artifact store (a resumed run
        fetches it), whatever ``train.keep_checkpoints`` says."""

        stopped_at: int | None = None
        save_s = 0.0  # the last checkpoint's time, from the decision to save to its marker
        save_started = 0.0
        on_cadence = False  # this step is one of train.checkpoint_steps
        saved_step = -1

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run's state names its best checkpoint by the old attempt's local path.
            if args.load_best_model_at_end and state.best_global_step and state.best_model_checkpoint is None:
                state.best_model_checkpoint = str(_best_checkpoint(cfg, state.best_global_step, resume,
                                                                   Path(args.output_dir)))

        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step != self.saved_step  # not twice for one step
            self.save_started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            # Every rank decides alike: a checkpoint is a collective, and ranks get the signal apart.
            asked = torch.tensor([1.0 if term.at is not None else 0.0,
                                  time.monotonic() - term.at if term.at is not None else 0.0, self.save_s])
            if (dist := _collective()) is not None:
                dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            self.on_cadence = bool(own.checkpoint_steps) and state.global_step % own.checkpoint_steps == 0
            if own.early_stopping_patience and self.on_cadence:
                control.should_save = True  # the Trainer's save interval is train.eval_steps then
            if asked[0] > 0:
                self.stopped_at = state.global_step
                control.should_training_stop = True
                control.should_evaluate = False
                control.should_save = bool(asked[1] + asked[2] < own.term_grace_s)
            if control.should_save:
                self.save_started = time.monotonic()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not own.early_stopping_patience:
                return
            # The Trainer's own test for a new best (strictly lower), made before it records one.
            loss = (metrics or {}).get("eval_loss")
            best = loss is not None and (state.best_metric is None or loss < state.best_metric)
            control.should_save = best or self.on_cadence

        def on_save(self, args, state, control, **kwargs):
            started = time.monotonic()
            step = self.saved_step = state.global_step
            local = Path(args.output_dir) / f"checkpoint-{step}"
            (local / f"audit-rank{rank}.json").write_text(audit.state())
            (local / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody reads; settings are in the marker
            _barrier()
            files = checkpoints.upload(local, root, step) if local_rank == 0 else {}
            gathered: list[Any] = [files]
            if (dist := _collective()) is not None:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, files)
            best = state.best_global_step if args.load_best_model_at_end else None
            if rank == 0:
                merged = {k: v for part in gathered for k, v in part.items()}
                checkpoints.write_marker(root, step, merged, {**meta, "epoch": state.epoch})
                pruned = checkpoints.prune(root, own.keep_checkpoints, also_keep=best)
                print(f"train: checkpoint at step {step} saved to {storage.join(root, checkpoints.name(step))} "
                      f"({sum(f['size'] for f in merged.values()) / 2**20:.1f} MiB"
                      + (f"; deleted steps {pruned}" if pruned else "") + ")", file=sys.stderr, flush=True)
            _barrier()
            if local_rank == 0:
                for folder in Path(args.output_dir).glob("checkpoint-*"):
                    if best is None or folder.name != f"checkpoint-{best}":
                        shutil.rmtree(folder, ignore_errors=True)
            self.save_s = time.monotonic() - (self.save_started or started)

    return Checkpointing()


def _metric(key: str, value: float, step: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=int(time.time() * 1000), step=step)


def _gather_audit(audit: _Audit) -> list[dict[int, list[int]]]:
    if (dist := _collective()) is None:
        return [audit.seen]
    gathered: list[Any] = [None] * dist.get_world_size()
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
    if cfg.task == "causal-lm" and own.lora_r and not own.lora_merge and storage.scheme(cfg.base_model) == "s3":
        raise ConfigError(f"train.lora_merge=false registers the adapter with a reference to base_model, but "
                          f"'{cfg.base_model}' is copied from S3 into a temporary directory for each step; use a "
                          f"local directory or a hub name, or train.lora_merge=true")
    rank, _, world = _ranks()
    ds_config = deepspeed_config(own)
    with tempfile.TemporaryDirectory(prefix="finetune-train-") as tmp:
        scratch = Path(tmp)
        model_dir = resolve_model(cfg.base_model, scratch)
        frame = load_snapshot(own.snapshot_uri)
        train_rows = frame[frame["split"] == "train"].reset_index(drop=True)
        if train_rows.empty:
            raise DataError(f"{own.snapshot_uri}: the train split is empty")
        check_snapshot(cfg, frame)
        # Data and tokenizer first: bad input fails here, before any model is built or run tracked.
        parts = TASK_PARTS[cfg.task](cfg, model_dir, frame, model_kwargs(cfg, model_dir))
        if own.eval_steps and parts.eval_dataset is None:
            raise DataError(f"{own.snapshot_uri}: train.eval_steps={own.eval_steps} needs held-out examples, but "
                            "the eval split has none (collect.eval_fraction)")
        mlflow_run_id = _start_tracking(cfg, ds_config, train_rows) if rank == 0 else None
        outcome = _fit(cfg, parts, model_dir, ds_config, scratch, mlflow_run_id)
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
    return TrainResult(result_uri=storage.join(out_uri, "result.json"), model_uri=model_uri, summary_uri=summary_uri,
                       snapshot_uri=own.snapshot_uri, base_model=cfg.base_model, global_step=outcome["global_step"],
                       train_loss=outcome["train_loss"], train_runtime_s=outcome["train_runtime_s"],
                       world_size=world, mlflow_run_id=mlflow_run_id or "",
                       config_sha256=config_hash(cfg, ds_config))


def check_snapshot(cfg: PipelineConfig, frame: Any) -> None:
    """The snapshot holds what the task family trains on."""
    needed = {"sequence-classification": ("text", "label"), "causal-lm": ("messages",)}[cfg.task]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{cfg.train.snapshot_uri}: no column(s) {missing} for task {cfg.task}; found "
                        f"{list(frame.columns)} (was it collected for another task?)")


def config_hash(cfg: PipelineConfig, ds_config: dict[str, Any]) -> str:
    """Everything that shapes the weights apart from the data: model, seed, train settings, DeepSpeed."""
    settings = {"base_model": cfg.base_model, "seed": cfg.seed, "task": cfg.task,
                "train": {k: v for k, v in vars(cfg.train).items() if k != "snapshot_uri"}, "deepspeed": ds_config}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _start_tracking(cfg: PipelineConfig, ds_config: dict[str, Any], train_rows: Any) -> str:
    import mlflow

    run_id = tracking.pipeline_run_id(cfg)
    tracker = tracking.client()
    params = {"task": cfg.task, "base_model": cfg.base_model, "seed": cfg.seed,
              **{f"train.{k}": v for k, v in vars(cfg.train).items()}}
    tracker.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    tracker.log_dict(run_id, ds_config, "train/deepspeed_config.json")
    columns = [c for c in train_rows.columns if c != "split"]
    with mlflow.start_run(run_id=run_id):
        dataset = mlflow.data.from_pandas(train_rows[columns], source=cfg.train.snapshot_uri, name="train",
                                          targets="label" if "label" in columns else None)
        mlflow.log_input(dataset, context="training")
    return run_id


@dataclass
class Parts:
    """What a task family hands the shared Trainer set-up."""

    load_model: Any  # () -> model; called after TrainingArguments, so that ZeRO-3 partitions it
    tokenizer: Any
    dataset: Any
    collator: Any
    summary: dict[str, Any]
    after_training: Any = None  # (trainer) -> summary entries; runs on every rank
    eval_dataset: Any = None  # the snapshot's eval split, for train.eval_steps
    warm_start: bool = False  # train.extend_vocab added tokens: _fit may train their rows and the head first


def classification_parts(cfg: PipelineConfig, model_dir: str, frame: Any, model_kwargs: dict[str, Any]) -> Parts:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    rows = frame[frame["split"] == "train"].reset_index(drop=True)
    labels = sorted({str(v) for v in frame["label"].dropna().tolist()})
    if len(labels) < 2:
        raise DataError(f"{cfg.train.snapshot_uri}: needs at least 2 labels to train a classifier, found {labels}")
    id2label, label2id = label_maps(labels)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base_model '{cfg.base_model}': cannot load its tokenizer: {exc}") from exc

    added = _extend_vocab(cfg.train, tokenizer, rows["text"].tolist())

    def load_model() -> Any:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id, **model_kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"base_model '{cfg.base_model}': cannot load: {exc}") from exc
        if added:
            extend_embeddings(model, list(added.values()))
        return model

    def encode(split_rows: Any) -> tuple[Any, int]:
        """The Dataset, and its tokens (counted here: read back from the Dataset, the column comes
        out of Arrow a row at a time, which took longer than the tokenizing)."""
        # .tolist(): Arrow-backed columns convert at once; iterating them boxes a value at a time.
        encoded = tokenizer(split_rows["text"].tolist(), truncation=True, max_length=cfg.train.max_seq_len)
        return _token_dataset({**encoded, "labels": [label2id[str(v)] for v in split_rows["label"].tolist()],
                               "example_id": list(range(len(split_rows)))}), sum(map(len, encoded["input_ids"]))

    dataset, tokens = encode(rows)
    held_out = frame[(frame["split"] == "eval") & frame["label"].notna()].reset_index(drop=True)
    return Parts(load_model, tokenizer, dataset, DataCollatorWithPadding(tokenizer),
                 {"labels": labels, "examples": len(rows), "train_tokens": tokens,
                  "extended_vocab": {"added_tokens": len(added), "tokens": "".join(added)}},
                 eval_dataset=encode(held_out)[0] if cfg.train.eval_steps and len(held_out) else None,
                 warm_start=bool(added))


# The Arrow types Dataset.from_dict infers for a tokenizer's columns, given up front: inferring them
# took longer than anything else train does around the tokenizer (0.3 s of 0.5 s per 100,000 rows).
TOKEN_COLUMN_TYPES = {"input_ids": "int32", "token_type_ids": "int8", "attention_mask": "int8"}


def _token_dataset(columns: dict[str, list[Any]]) -> Any:
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(pa.table({
        name: pa.array(values, pa.list_(pa.type_for_alias(TOKEN_COLUMN_TYPES[name])) if name in TOKEN_COLUMN_TYPES
                       else None) for name, values in columns.items()})))


def causal_lm_parts(cfg: PipelineConfig, model_dir: str, frame: Any, model_kwargs: dict[str, Any]) -> Parts:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    own = cfg.train
    tokenizer = lm_tokenizer(model_dir, f"base_model '{cfg.base_model}'")
    # Before encoding: the conversations are tokenized with the new tokens.
    added = _extend_vocab(own, tokenizer, (m["content"] for messages in chat.conversations(frame, "train")
                                           for m in messages))
    examples, counts, template = chat.encode_split(cfg, tokenizer, frame, "train")
    eval_examples, eval_counts, _ = chat.encode_split(cfg, tokenizer, frame, "eval")
    print(f"train: conversations {counts}", file=sys.stderr, flush=True)
    if own.packing:
        examples = chat.pack(examples, own.max_seq_len)
    tokenizer.chat_template = template  # the published tokenizer renders as training did

    def load_model() -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, **model_kwargs)
        if added:
            extend_embeddings(model, list(added.values()))
        if not own.lora_r:
            return model
        from peft import LoraConfig, get_peft_model

        # The new rows train beside the adapter (PEFT's trainable tokens; tied output embeddings too).
        new_ids = list(range(len(tokenizer) - len(added), len(tokenizer)))
        return get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=own.lora_r, lora_alpha=own.lora_alpha, lora_dropout=own.lora_dropout,
            target_modules=list(own.lora_target_modules) or None, trainable_token_indices=new_ids or None))

    dataset = Dataset.from_list(examples)
    collator = (chat.PackedCollator(tokenizer.pad_token_id) if own.packing else
                DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=chat.IGNORE, padding=True))

    def after_training(trainer: Any) -> dict[str, Any]:
        # The loss of the weights as they are in memory (sharded, under ZeRO-3), on the held-out
        # conversations; the evaluate step recomputes it from the saved files. Equal figures show
        # the save wrote the trained weights, not ZeRO-3's empty placeholders.
        total, tokens = chat.token_loss(trainer.model, eval_examples, tokenizer.pad_token_id, own.batch_size)
        return {"eval_loss_in_memory": total / tokens if tokens else None, "eval_tokens": tokens}

    return Parts(load_model, tokenizer, dataset, collator,
                 {"conversations": counts, "eval_conversations": eval_counts, "packed_sequences": len(examples),
                  "lora": bool(own.lora_r), "examples": counts["examples"],
                  "train_tokens": sum(len(e["input_ids"]) for e in examples),
                  "extended_vocab": {"added_tokens": len(added), "tokens": "".join(added)}}, after_training,
                 # Never packed: the held-out loss is per conversation, as evaluate scores it.
                 eval_dataset=Dataset.from_list(eval_examples) if own.eval_steps and eval_examples else None,
                 warm_start=bool(added))


def _extend_vocab(own: TrainConfig, tokenizer: Any, texts: Any) -> dict[str, list[int]]:
    """train.extend_vocab: the characters of the training texts the tokenizer cannot read become
    tokens of their own (models.extend_vocabulary); what each read as before, by character."""
    if not own.extend_vocab:
        return {}
    added = extend_vocabulary(tokenizer, texts, own.extend_vocab_min_count)
    if added:
        print(f"train: extend_vocab: {len(added)} characters the tokenizer could not read are new tokens: "
              f"{''.join(list(added)[:40])}{'...' if len(added) > 40 else ''}", file=sys.stderr, flush=True)
    return added


TASK_PARTS = {"sequence-classification": classification_parts, "causal-lm": causal_lm_parts}


def model_kwargs(cfg: PipelineConfig, model_dir: str) -> dict[str, Any]:
    """``train.model_kwargs``, each checked against the base model's config before any model is
    built: ``attn_implementation``, or an attribute of the config that from_pretrained overrides."""
    if not cfg.train.model_kwargs:
        return {}
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base_model '{cfg.base_model}': cannot load its config: {exc}") from exc
    for name in cfg.train.model_kwargs:
        if name != "attn_implementation" and not hasattr(config, name):
            raise ConfigError(f"train.model_kwargs.{name}: neither attn_implementation nor an attribute of "
                              f"{type(config).__name__}, the config of base_model '{cfg.base_model}'")
    return dict(cfg.train.model_kwargs)


def _fit(cfg: PipelineConfig, parts: Parts, model_dir: str, ds_config: dict[str, Any], scratch: Path,
         mlflow_run_id: str | None) -> dict[str, Any]:
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments, set_seed

    own = cfg.train
    # The body trains for at least one epoch: a one-epoch run has no frozen phase.
    frozen_epochs = min(own.extend_vocab_epochs, own.epochs - 1)
    warm_start = _WarmStart(frozen_epochs, own.extend_vocab_learning_rate) if parts.warm_start and frozen_epochs \
        else None
    if warm_start is not None and "optimizer" in ds_config:  # before any model, engine or op build
        raise ConfigError(_WarmStart.REFUSED)
    set_seed(cfg.seed)
    use_cpu = not torch.cuda.is_available()
    rank, local_rank, world = _ranks()
    if world > 1:
        import deepspeed

        # DeepSpeed's collectives call torch.distributed functions that torch 2.13 deprecates
        # (all_gather_into_tensor, reduce_scatter_tensor); under ZeRO-3 the warning repeats
        # thousands of times and buries the task log. Nothing for us to change.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

        # Before TrainingArguments/from_pretrained: ZeRO-3's zero.Init reads the world size from
        # deepspeed.comm, which would otherwise still say 1 on CPU and reject the batch sizes.
        # A bounded wait: one hung rank fails the collective after collective_timeout_s instead
        # of blocking every later run behind it.
        deepspeed.init_distributed(dist_backend="gloo" if use_cpu else "nccl",
                                   timeout=timedelta(seconds=own.collective_timeout_s))
    node_dir = _node_dir(scratch)
    # TrainingArguments first: with ZeRO-3 it must exist before from_pretrained to partition weights.
    # Every field set here is refused in train.trainer_args (config.PIPELINE_TRAINER_ARGS says why).
    try:
        args = TrainingArguments(
            **own.trainer_args,
            output_dir=str(node_dir), num_train_epochs=own.epochs, learning_rate=own.learning_rate,
            per_device_train_batch_size=own.batch_size, gradient_accumulation_steps=own.gradient_accumulation_steps,
            weight_decay=own.weight_decay, warmup_steps=own.warmup_ratio, logging_steps=own.logging_steps,
            # A classification loss is a per-example mean over equal batches on every rank: token
            # averaging would multiply it by the world size. A causal LM's loss is per token, and
            # batches hold different numbers of target tokens: there it is what makes the mean right.
            average_tokens_across_devices=cfg.task == "causal-lm",
            # Checkpoints: the Trainer's own (DeepSpeed state of every rank, RNG, data position) in a
            # node-local folder, copied to the artifact store by the Checkpointing callback.
            **_schedule(own), save_total_limit=1, report_to="none", seed=cfg.seed, data_seed=cfg.seed,
            use_cpu=use_cpu, ddp_timeout=own.collective_timeout_s, deepspeed=ds_config, disable_tqdm=True,
            remove_unused_columns=False, label_names=["labels"], per_device_eval_batch_size=own.batch_size,
            **mixed_precision(own), dataloader_drop_last=True)  # a partial last batch would be padded with repeats on the other ranks
    except (TypeError, ValueError) as exc:  # what the config-time check cannot know, e.g. an optimizer's package
        raise ConfigError(f"train.trainer_args {json.dumps(own.trainer_args)}: TrainingArguments refused them: "
                          f"{exc}") from exc
    meta = checkpoint_meta(cfg, ds_config, world)
    resume = _resume_point(cfg, meta, node_dir)
    audit = _Audit(parts.collator)
    if resume is not None:
        weights_only_deepspeed_loads()
        step, path = resume
        audit.restore((path / f"audit-rank{rank}.json").read_text())
        if rank == 0:
            print(f"train: resuming from step {step} ({storage.join(checkpoint_root(cfg), checkpoints.name(step))})",
                  file=sys.stderr, flush=True)
    term = _Termination()
    saver = _checkpointing(cfg, meta, audit, term, resume)
    stopping = [EarlyStoppingCallback(own.early_stopping_patience)] if own.early_stopping_patience else []
    trainer = _audited_trainer(Trainer)(audit, warm_start, model=parts.load_model(), args=args,
                                        train_dataset=parts.dataset,
                                        eval_dataset=parts.eval_dataset, data_collator=audit,
                                        callbacks=[*_callbacks(audit, mlflow_run_id), saver, *stopping])
    trainer.remove_callback(PrinterCallback)  # our Progress callback prints one line per log instead
    if args.world_size != world:
        raise RuntimeError(f"Trainer sees world size {args.world_size}, launcher started "
                           f"{world} processes: the data would not be sharded")
    try:
        output = trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    finally:
        term.close()
    if saver.stopped_at is not None:
        raise TransientError(f"train: stopped by SIGTERM at step {saver.stopped_at} (an eviction or preemption "
                             "notice); " + ("a checkpoint was saved there" if saver.stopped_at == _newest_step(cfg)
                                            else f"no time to save within train.term_grace_s={own.term_grace_s}")
                             + "; the next attempt resumes from the newest checkpoint")
    extra = {**_evaluation_summary(trainer, own), **(parts.after_training(trainer) if parts.after_training else {})}
    target = scratch / ("adapter" if cfg.train.lora_r and cfg.task == "causal-lm" else "model")
    trainer.save_model(str(target))  # all ranks: ZeRO-3 gathers the 16-bit weights here
    (target / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in MLflow
    per_rank = _gather_audit(audit)
    parts.tokenizer.save_pretrained(str(target))
    if target.name == "adapter" and trainer.is_world_process_zero():
        _publishable_model(cfg, model_dir, target, scratch / "model")
    report = sharding_report(per_rank, len(parts.dataset))
    if trainer.is_world_process_zero():
        print("train: sharding " + json.dumps(report["epochs"]), file=sys.stderr, flush=True)
    _barrier()
    if local_rank == 0:
        shutil.rmtree(node_dir, ignore_errors=True)
    return {"global_step": int(output.global_step), "train_loss": float(output.training_loss),
            "train_runtime_s": float(output.metrics.get("train_runtime", 0.0)), **parts.summary, **extra,
            "sharding": report, "deepspeed": _deepspeed_summary(trainer, ds_config),
            "trainer_world_size": args.world_size, "peak_memory_bytes": _peak_memory(torch)}


def _deepspeed_summary(trainer: Any, ds_config: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO stage, what is offloaded, and the optimizer DeepSpeed actually steps with."""
    zero = ds_config.get("zero_optimization", {})
    optimizer = getattr(trainer.model_wrapped, "basic_optimizer", None) or trainer.optimizer
    return {"zero_stage": zero.get("stage"), "offload_optimizer": "offload_optimizer" in zero,
            "offload_params": "offload_param" in zero, "optimizer": type(optimizer).__name__}


def _schedule(own: TrainConfig) -> dict[str, Any]:
    """Evaluation and checkpoint arguments. With early stopping the Trainer keeps the best
    evaluation's checkpoint and loads it at the end (load_best_model_at_end), which it allows only
    when saves can fall on evaluations: its save interval is then train.eval_steps, and the
    Checkpointing callback keeps, of those, only a new best, train.checkpoint_steps' and the epoch ends."""
    evaluation = {"eval_strategy": "steps", "eval_steps": own.eval_steps} if own.eval_steps else {"eval_strategy": "no"}
    if own.early_stopping_patience:
        return {**evaluation, "save_strategy": "steps", "save_steps": own.eval_steps, "load_best_model_at_end": True,
                "metric_for_best_model": "eval_loss", "greater_is_better": False,
                "restore_callback_states_from_checkpoint": True}  # a resumed run keeps its patience count
    return {**evaluation, "save_strategy": "steps" if own.checkpoint_steps else "epoch",
            "save_steps": own.checkpoint_steps or None}


def _evaluation_summary(trainer: Any, own: TrainConfig) -> dict[str, Any]:
    """The held-out loss curve of train.eval_steps and, with early stopping, which step won."""
    if not own.eval_steps:
        return {}
    state = trainer.state
    curve = [[entry["step"], entry["eval_loss"]] for entry in state.log_history if "eval_loss" in entry]
    summary: dict[str, Any] = {"eval_loss_curve": curve}
    if own.early_stopping_patience:
        summary.update(best_step=state.best_global_step, best_eval_loss=state.best_metric,
                       stopped_early=state.global_step < state.max_steps)
    return summary


def weights_only_deepspeed_loads() -> None:
    """DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which runs
    whatever a pickle says. Ours come from storage, so they are read with torch's weights-only
    unpickler: tensors, containers and the few DeepSpeed classes its states hold, nothing else
    (the Trainer reads its own files, RNG and scheduler states, that way already)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load


def _newest_step(cfg: PipelineConfig) -> int | None:
    found = checkpoints.complete(checkpoint_root(cfg))
    return found[0].step if found else None


@dataclass
class _WarmStart:
    """train.extend_vocab's first phase: for the first ``epochs`` of train.epochs, only the embeddings
    and the head train (at ``learning_rate``), the body's learning rate held at 0; then the body
    follows the Trainer's schedule (warm-up and decay) over the remaining steps. One optimizer, two kinds of parameter
    group, so that DeepSpeed (whose engine owns the optimizer from the first step) and a resumed run
    see one run, not two."""

    epochs: int
    learning_rate: float
    REFUSED: ClassVar[str] = (
        "train.extend_vocab_epochs: the frozen first phase needs the Trainer's optimizer, but DeepSpeed steps its "
        "own (train.offload_optimizer, or an optimizer in train.deepspeed_config); set train.extend_vocab_epochs=0")

    @staticmethod
    def parameters(model: Any) -> set[int]:
        """The embeddings (input, and untied output) and what the base model lacks: the head."""
        if hasattr(model, "peft_config"):  # LoRA: the new rows are PEFT's trainable tokens
            return {id(p) for name, p in model.named_parameters() if "trainable_tokens" in name}
        prefix = getattr(model, "base_model_prefix", "") + "."
        warm = {id(p) for name, p in model.named_parameters() if not name.startswith(prefix)}
        warm.add(id(model.get_input_embeddings().weight))
        if model.get_output_embeddings() is not None:
            warm.add(id(model.get_output_embeddings().weight))
        return warm

    def split_groups(self, model: Any, optimizer: Any) -> None:
        warm = self.parameters(model)
        groups = list(optimizer.param_groups)
        optimizer.param_groups.clear()
        for group in groups:
            for is_warm in (True, False):
                params = [p for p in group["params"] if (id(p) in warm) == is_warm]
                if params:
                    optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": params,
                                               "warm_start": is_warm,
                                               "lr": self.learning_rate if is_warm else group["lr"]})

    def scheduler(self, args: Any, optimizer: Any, total: int, per_epoch: int) -> Any:
        import torch
        from transformers import get_scheduler

        groups = getattr(optimizer, "param_groups", None) or []  # HF's stand-in for DeepSpeed's has none
        if not groups or not all("warm_start" in group for group in groups):  # DeepSpeed builds its own
            raise ConfigError(self.REFUSED)
        phase = min(total, self.epochs * per_epoch)

        def shape(steps: int) -> Any:  # the Trainer's schedule over `steps`, as a function of the step
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            made = get_scheduler(args.lr_scheduler_type, optimizer=probe, num_training_steps=max(steps, 1),
                                 num_warmup_steps=args.get_warmup_steps(max(steps, 1)),
                                 scheduler_specific_kwargs=args.lr_scheduler_kwargs)
            if not isinstance(made, torch.optim.lr_scheduler.LambdaLR):
                raise ConfigError(f"train.trainer_args.lr_scheduler_type={args.lr_scheduler_type}: train.extend_vocab's "
                                  "two phases need a schedule that is a function of the step (linear, cosine, ...)")
            return made.lr_lambdas[0]

        warm, body = shape(total), shape(total - phase)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [
            warm if group["warm_start"] else (lambda step: 0.0 if step < phase else body(step - phase))
            for group in groups])


def _audited_trainer(trainer_class: Any) -> Any:
    class AuditedTrainer(trainer_class):
        """Records the example ids of each micro-batch it trains on (see ``_Audit``)."""

        def __init__(self, audit: _Audit, warm_start: _WarmStart | None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.audit = audit
            self.warm_start = warm_start

        def create_optimizer(self, *args, **kwargs):
            # Called again after DeepSpeed took the optimizer over (and by then holds flat
            # partitions of the parameters): its groups are split once, when it is made.
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(*args, **kwargs)
            if fresh and self.warm_start is not None:
                self.warm_start.split_groups(self.model, optimizer)
            return optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.warm_start is None or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            per_epoch = max(len(self.get_train_dataloader()) // self.args.gradient_accumulation_steps, 1)
            self.lr_scheduler = self.warm_start.scheduler(self.args, optimizer or self.optimizer, num_training_steps,
                                                          per_epoch)
            return self.lr_scheduler

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.audit.record(inputs.pop("example_id"))
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop("example_id", None)  # held-out examples are not audited
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

        def get_eval_dataloader(self, eval_dataset=None):
            # dataloader_drop_last is for the training shards (the audit); the held-out loss is
            # over every eval example, however few (the Trainer drops the repeats that even out
            # the last batch across ranks when it gathers the losses).
            self.args.dataloader_drop_last = False
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.args.dataloader_drop_last = True

    return AuditedTrainer


def _peak_memory(torch: Any) -> int:
    """This rank's peak memory: allocated on the GPU, or the process's resident set on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
    extend_like(base, base_tokenizer, AutoTokenizer.from_pretrained(str(adapter)))  # train.extend_vocab's rows
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))  # carries the chat template used

