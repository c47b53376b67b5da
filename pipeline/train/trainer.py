"""train's Trainer: Hugging Face's, with the example ids of every micro-batch it trains on
recorded (the sharding audit, saved in each checkpoint), train.extend_vocab's warm start (one
optimizer, the body's learning rate held at 0 for the first epochs), the progress lines and MLflow
metrics of each log step, and what a finished training reports about its ranks and DeepSpeed.

    python -c "from pipeline.train import trainer; print(trainer.sharding_report([{0: [0, 1]}, {0: [2, 3]}], 4))"
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline import tracking
from pipeline.errors import ConfigError, PipelineError


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
            print(
                f"train: step {state.global_step}/{state.max_steps} "
                + " ".join(f"{k}={v:.4g}" for k, v in numbers.items()),
                flush=True,
            )
            if mlflow_run_id:
                tracking.client().log_batch(
                    mlflow_run_id,
                    metrics=[
                        _metric(f"train_{k}" if not k.startswith("train_") else k, v, state.global_step)
                        for k, v in numbers.items()
                    ],
                )

    return [Progress()]


def _metric(key: str, value: float, step: int) -> Any:
    from mlflow.entities import Metric

    return Metric(key=key, value=value, timestamp=int(time.time() * 1000), step=step)


def sharding_report(per_rank: list[dict[int, list[int]]], examples: int) -> dict[str, Any]:
    """Per-epoch counts: how many ids each rank saw and how many were seen more than once."""
    epochs = sorted({e for seen in per_rank for e in seen})
    report = []
    for epoch in epochs:
        ids = [i for seen in per_rank for i in seen.get(epoch, [])]
        report.append(
            {
                "epoch": epoch,
                "seen_per_rank": [len(seen.get(epoch, [])) for seen in per_rank],
                "distinct": len(set(ids)),
                "seen_twice": len(ids) - len(set(ids)),
            }
        )
    return {"world_size": len(per_rank), "examples": examples, "epochs": report}


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
        "own (train.offload_optimizer, or an optimizer in train.deepspeed_config); set train.extend_vocab_epochs=0"
    )

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
                    optimizer.add_param_group(
                        {
                            **{k: v for k, v in group.items() if k != "params"},
                            "params": params,
                            "warm_start": is_warm,
                            "lr": self.learning_rate if is_warm else group["lr"],
                        }
                    )

    def scheduler(self, args: Any, optimizer: Any, total: int, per_epoch: int) -> Any:
        import torch
        from transformers import get_scheduler

        groups = getattr(optimizer, "param_groups", None) or []  # HF's stand-in for DeepSpeed's has none
        if not groups or not all("warm_start" in group for group in groups):  # DeepSpeed builds its own
            raise ConfigError(self.REFUSED)
        phase = min(total, self.epochs * per_epoch)

        def shape(steps: int) -> Any:  # the Trainer's schedule over `steps`, as a function of the step
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            made = get_scheduler(
                args.lr_scheduler_type,
                optimizer=probe,
                num_training_steps=max(steps, 1),
                num_warmup_steps=args.get_warmup_steps(max(steps, 1)),
                scheduler_specific_kwargs=args.lr_scheduler_kwargs,
            )
            if not isinstance(made, torch.optim.lr_scheduler.LambdaLR):
                raise ConfigError(
                    f"train.trainer_args.lr_scheduler_type={args.lr_scheduler_type}: train.extend_vocab's "
                    "two phases need a schedule that is a function of the step (linear, cosine, ...)"
                )
            return made.lr_lambdas[0]

        warm, body = shape(total), shape(total - phase)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [
                warm if group["warm_start"] else (lambda step: 0.0 if step < phase else body(step - phase))
                for group in groups
            ],
        )


# What the Trainer, its optimizer and scheduler and the DeepSpeed engine raise while they are built
# when the settings cannot work: bad input (exit 2, never retried). Not a RuntimeError: a lost rank,
# a collective's timeout and running out of memory raise one, and a retry may succeed.
REFUSALS = (TypeError, ValueError, AssertionError, ImportError, KeyError)


@contextlib.contextmanager
def settings_refused(settings: str) -> Iterator[None]:
    """Building the Trainer and its DeepSpeed engine from ``settings`` (the train.* settings it reads,
    as ``key=value, ...``): what it refuses becomes a ConfigError, the refusal first, the settings
    after; a PipelineError (a TransientError too) and anything else pass as they are."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:
        if not isinstance(exc, REFUSALS) and type(exc).__name__ != "DeepSpeedConfigError":
            raise
        raise ConfigError(
            f"the settings cannot build the Trainer and its DeepSpeed engine: {type(exc).__name__}: {exc}\n"
            f"  the settings: {settings}"
        ) from exc


def _audited_trainer(trainer_class: Any) -> Any:
    class AuditedTrainer(trainer_class):
        """Records the example ids of each micro-batch it trains on (see ``_Audit``)."""

        lr_scheduler: Any  # Trainer's; declared for mypy, which cannot see into a base class chosen at run time

        def __init__(self, audit: _Audit, warm_start: _WarmStart | None, settings: str = "", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.audit = audit
            self.warm_start = warm_start
            self.settings = settings  # what builds the optimizer and the DeepSpeed engine, for a refusal

        def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
            # The DeepSpeed engine, the optimizer and the scheduler (and a resumed run's checkpoint
            # loaded into them), built at the start of train(): construction only, so that a crash
            # while training stays a crash (retried).
            resuming = f"; resuming from {resume_from_checkpoint}" if resume_from_checkpoint else ""
            with settings_refused(self.settings + resuming):
                return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

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
            self.lr_scheduler = self.warm_start.scheduler(
                self.args, optimizer or self.optimizer, num_training_steps, per_epoch
            )
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


def _deepspeed_summary(trainer: Any, ds_config: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO stage, what is offloaded, and the optimizer DeepSpeed actually steps with."""
    zero = ds_config.get("zero_optimization", {})
    optimizer = getattr(trainer.model_wrapped, "basic_optimizer", None) or trainer.optimizer
    return {
        "zero_stage": zero.get("stage"),
        "offload_optimizer": "offload_optimizer" in zero,
        "offload_params": "offload_param" in zero,
        "optimizer": type(optimizer).__name__,
    }


def _peak_memory(torch: Any) -> int:
    """This rank's peak memory: allocated on the GPU, or the process's resident set on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
