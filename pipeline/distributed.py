"""distributed: which process this is in a ``torch.distributed.run`` launch, and the few collectives
the steps use, in one place. Every helper also works in a single process (no launcher, or one rank):
then there is nothing to wait for or exchange.

    python -c "from pipeline import distributed; print(distributed.ranks())"   # (0, 0, 1) outside a launch

torch is imported inside the functions that use it: the CLI asks ``ranks()`` before it knows its step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def ranks() -> tuple[int, int, int]:
    """This process's rank, its rank on this node and the world size, as torch.distributed.run sets them."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def default_accelerator(env: Mapping[str, str]) -> dict[str, str]:
    """``DS_ACCELERATOR=cpu`` (DeepSpeed's CPU accelerator, gloo for collectives) where ``env`` names
    no accelerator and the machine has no GPU; else nothing to add."""
    if "DS_ACCELERATOR" in env or Path("/dev/nvidia0").exists():
        return {}
    return {"DS_ACCELERATOR": "cpu"}


def collective() -> Any:
    """torch.distributed when more than one rank trains, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def barrier() -> None:
    if (dist := collective()) is not None:
        dist.barrier()


def from_rank0(compute: Any) -> Any:
    """``compute()`` on rank 0, its result (or its PipelineError, raised here) on every rank."""
    dist = collective()
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


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if (dist := collective()) is None:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def node_dir(scratch: Path) -> Path:
    """A directory every rank on this node shares: DeepSpeed writes each rank's part of a
    checkpoint into one folder. Keyed by the launch, so that another run never shares it."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    if not launch:
        return scratch / "checkpoints"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    path = Path(tempfile.gettempdir()) / f"finetune-train-{launch}-{restart}"
    if ranks()[1] == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    barrier()
    return path
