"""train's checkpoints, as the Trainer makes and resumes them: the callback that copies each of its
checkpoints to the artifact store (marker last, pruned to ``train.keep_checkpoints``), SIGTERM's
last checkpoint, where a new attempt resumes, and early stopping's best checkpoint. The format
in the store (files, marker, what is complete or damaged) is ``pipeline.checkpoints``'.

    python -c "from pipeline.config import load_config; from pipeline.train import checkpointing; \\
               print(checkpointing.checkpoint_root(load_config(None, ['run_id=r'])))"
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import checkpoints, storage
from pipeline.config import PipelineConfig
from pipeline.distributed import barrier, collective, from_rank0, gather, ranks
from pipeline.errors import DataError
from pipeline.train.trainer import _Audit

# Settings a new attempt may change without making its checkpoints another run's: how often and how
# many checkpoints, how long to wait. Everything else that shapes the weights must match to resume.
RESUME_FREE = (
    "checkpoint_steps",
    "keep_checkpoints",
    "resume",
    "term_grace_s",
    "collective_timeout_s",
    "logging_steps",
)


def checkpoint_meta(cfg: PipelineConfig, ds_config: dict[str, Any], world: int) -> dict[str, Any]:
    """What a checkpoint records about the run that saved it and a resume must match."""
    return {
        "world_size": world,
        "settings": {
            "base_model": cfg.base_model,
            "seed": cfg.seed,
            "task": cfg.task,
            "deepspeed": ds_config,
            "train": {k: v for k, v in vars(cfg.train).items() if k not in RESUME_FREE},
        },
    }


def checkpoint_root(cfg: PipelineConfig) -> str:
    return storage.join(cfg.step_uri("train"), "checkpoints")


def _resume_point(cfg: PipelineConfig, meta: dict[str, Any], local: Path) -> tuple[int, Path] | None:
    """The step and local directory of the newest usable checkpoint of this run, on every rank,
    or None. ``train.resume=false`` deletes the run's checkpoints instead."""
    root = checkpoint_root(cfg)
    if not cfg.train.resume:
        from_rank0(lambda: checkpoints.delete_all(root))
        return None

    def choose() -> tuple[int, str] | None:
        found = checkpoints.newest_usable(root, meta, local / "resume")
        return None if found is None else (found[0].step, str(found[1]))

    chosen = from_rank0(choose)
    if chosen is None:
        return None
    step, path = chosen
    rank, local_rank, _ = ranks()
    if rank != 0 and local_rank == 0 and not Path(path).is_dir():  # another node: fetch its own copy
        marker = storage.read_json(storage.join(root, checkpoints.name(step), checkpoints.MARKER))
        checkpoints.fetch(checkpoints.Checkpoint(storage.join(root, checkpoints.name(step)), step, marker), Path(path))
    barrier()
    return step, Path(path)


def _best_checkpoint(cfg: PipelineConfig, step: int, resume: tuple[int, Path] | None, local: Path) -> Path:
    """A local directory holding the best evaluation's checkpoint of a resumed run, on every rank."""
    if resume is not None and resume[0] == step:
        return resume[1]
    root = checkpoint_root(cfg)
    found = [c for c in checkpoints.complete(root) if c.step == step]
    if not found:
        raise DataError(
            f"{root}: the best evaluation's checkpoint (step {step}) is gone, so early stopping cannot "
            "publish its weights; set train.resume=false to train this run over"
        )
    dest = local / "best"
    if ranks()[1] == 0:
        checkpoints.fetch(found[0], dest)
    barrier()
    return storage.local_path(found[0].uri) or dest


def _newest_step(cfg: PipelineConfig) -> int | None:
    found = checkpoints.complete(checkpoint_root(cfg))
    return found[0].step if found else None


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


class _Termination:
    """SIGTERM (eviction, preemption notice) asks for a checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
            print(
                "train: SIGTERM: saving a checkpoint at the end of this step, then exiting", file=sys.stderr, flush=True
            )

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _checkpointing(
    cfg: PipelineConfig, meta: dict[str, Any], audit: _Audit, term: _Termination, resume: tuple[int, Path] | None
) -> Any:
    from transformers import TrainerCallback

    own = cfg.train

    class Checkpointing(TrainerCallback):
        """Checkpoints every ``train.checkpoint_steps`` and at the last step (at each epoch end with 0:
        the Trainer's save strategies), copied to the artifact store with the marker last; on SIGTERM, one more
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
                state.best_model_checkpoint = str(
                    _best_checkpoint(cfg, state.best_global_step, resume, Path(args.output_dir))
                )

        def on_epoch_end(self, args, state, control, **kwargs):
            if not own.checkpoint_steps:  # else the cadence alone (the demo: 2 saves of 437 MiB, not 6)
                control.should_save = state.global_step != self.saved_step  # not twice for one step
                self.save_started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            asked = _termination_agreed(term, self.save_s)
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
            if own.early_stopping_patience:
                control.should_save = _new_best(metrics, state) or self.on_cadence

        def on_save(self, args, state, control, **kwargs):
            started = time.monotonic()
            self.saved_step = state.global_step
            best = state.best_global_step if args.load_best_model_at_end else None
            _publish(cfg, meta, audit, Path(args.output_dir), state.global_step, state.epoch, best)
            self.save_s = time.monotonic() - (self.save_started or started)

    return Checkpointing()


def _new_best(metrics: dict[str, float] | None, state: Any) -> bool:
    """The Trainer's own test for a new best evaluation (strictly lower), made before it records one."""
    loss = (metrics or {}).get("eval_loss")
    return loss is not None and (state.best_metric is None or loss < state.best_metric)


def _termination_agreed(term: _Termination, save_s: float) -> Any:
    """[SIGTERM seen, seconds since, the last checkpoint's time], the largest over the ranks:
    every rank decides alike, for a checkpoint is a collective and ranks get the signal apart."""
    import torch

    asked = torch.tensor(
        [1.0 if term.at is not None else 0.0, time.monotonic() - term.at if term.at is not None else 0.0, save_s]
    )
    if (dist := collective()) is not None:
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
    return asked


def _publish(
    cfg: PipelineConfig,
    meta: dict[str, Any],
    audit: _Audit,
    output_dir: Path,
    step: int,
    epoch: float,
    best: int | None,
) -> None:
    """The Trainer's checkpoint of ``step``, with this rank's audit, to the artifact store: each node
    uploads its own ranks' files, rank 0 writes the marker last and prunes; then the node's local
    copies go, but for early stopping's best (the Trainer loads it at the end)."""
    own = cfg.train
    root = checkpoint_root(cfg)
    rank, local_rank, _ = ranks()
    local = output_dir / f"checkpoint-{step}"
    (local / f"audit-rank{rank}.json").write_text(audit.state())
    (local / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody reads; settings are in the marker
    barrier()
    files = checkpoints.upload(local, root, step) if local_rank == 0 else {}
    gathered = gather(files)
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        checkpoints.write_marker(root, step, merged, {**meta, "epoch": epoch})
        pruned = checkpoints.prune(root, own.keep_checkpoints, also_keep=best)
        print(
            f"train: checkpoint at step {step} saved to {storage.join(root, checkpoints.name(step))} "
            f"({sum(f['size'] for f in merged.values()) / 2**20:.1f} MiB"
            + (f"; deleted steps {pruned}" if pruned else "")
            + ")",
            file=sys.stderr,
            flush=True,
        )
    barrier()
    if local_rank == 0:
        for folder in output_dir.glob("checkpoint-*"):
            if best is None or folder.name != f"checkpoint-{best}":
                shutil.rmtree(folder, ignore_errors=True)
