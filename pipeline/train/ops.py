"""ops: DeepSpeed's C++ ops (the shared-memory collectives of its CPU accelerator, CPU Adam for
ZeRO-Offload), built once and loaded before DeepSpeed asks for them, so that a train step never
waits on a build.

DeepSpeed JIT-compiles an op the first time a process needs it, through
``torch.utils.cpp_extension``, which serialises builds with a lock *file* in the op's build
directory (``torch/utils/file_baton.py``) and waits while that file exists, with no message and no
deadline, even when the op is already built. A process killed mid-build leaves the file behind,
and every later training on the machine sleeps until its timeout.

Here every build the pipeline starts runs under an ``flock`` on ``finetune-build.lock`` in the
extensions directory, which the kernel releases when its holder dies. So a lock file found while
holding the flock belongs to no live pipeline build: it is removed, saying so, and the op is
built (announced, with its duration: about a minute on 2 cores) or loaded. A loaded op stays
cached in DeepSpeed's builder, which then never reaches the lock file again in this process.

The extensions live beside the interpreter (``<sys.prefix>/torch_extensions``: in the project's
``.venv``), because a build is tied to the interpreter's paths: a second checkout's venv sharing
``~/.cache/torch_extensions`` rebuilds the op over the first's. ``TORCH_EXTENSIONS_DIR`` overrides.
Ops built into DeepSpeed's own package (``DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1`` at its install,
as the images do) are imported the way DeepSpeed imports them, with no build directory at all.

    python -c "from pipeline.train import ops; ops.main()"   # every op this machine uses (make install)
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.distributed import default_accelerator
from pipeline.errors import ModelError

# DeepSpeed's builder class names, as its accelerator's create_op_builder takes them.
SHM_COMM, CPU_ADAM = "ShareMemCommBuilder", "CPUAdamBuilder"
ALL_OPS = (SHM_COMM, CPU_ADAM)
BUILD_LOCK = "finetune-build.lock"


def extensions_dir() -> Path:
    """Where torch builds and finds the ops; sets ``TORCH_EXTENSIONS_DIR`` for this process when unset."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    beside = Path(sys.prefix) / "torch_extensions"
    if not (os.access(sys.prefix, os.W_OK) or beside.is_dir()):  # a read-only environment: the user's cache
        from torch.utils.cpp_extension import get_default_build_root

        beside = Path(get_default_build_root()) / f"finetune-py{sys.version_info.major}{sys.version_info.minor}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(beside)
    return beside


def needed(offload_optimizer: bool) -> tuple[str, ...]:
    """The ops a train step with these settings loads: the CPU accelerator's collectives on every
    launch (DeepSpeed builds that op when it sets up torch.distributed), CPU Adam with offload."""
    ops: list[str] = []
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        ops.append(SHM_COMM)
    if offload_optimizer:
        ops.append(CPU_ADAM)
    return tuple(ops)


def prepare(names: Sequence[str], log: Callable[[str], None] = print) -> list[str]:
    """Build (when missing) and load each op in ``names`` this accelerator can use; return the names
    of those built now. Never waits on a build lock that no live process holds."""
    builders = _builders(names)
    if not builders:
        return []
    root = extensions_dir()
    built_now = []
    with _build_lock(root, log):
        from torch.utils.cpp_extension import _get_build_directory

        for builder in builders:
            build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink(missing_ok=True)
                log(
                    f"train: removed {stale}: a DeepSpeed op build lock that no live build holds "
                    "(a build killed part-way leaves it, and torch would wait on it forever)"
                )
            missing = not (build_dir / f"{builder.NAME}.so").exists()
            if missing:
                log(f"train: building DeepSpeed's {builder.NAME} op into {build_dir} (once per environment)")
            began = time.monotonic()
            try:
                builder.load(verbose=False)
            except Exception as exc:  # a compiler error, no compiler, no ninja: a person fixes it
                raise ModelError(
                    f"train: DeepSpeed's {builder.NAME} op cannot be built in {build_dir}: {exc}. It needs "
                    "a C++ compiler and ninja, or DeepSpeed installed with the op prebuilt "
                    f"({builder.BUILD_VAR}=1 pip install deepspeed)"
                ) from exc
            if missing:
                built_now.append(builder.NAME)
                log(f"train: built DeepSpeed's {builder.NAME} op in {time.monotonic() - began:.0f} s")
    return built_now


def _builders(names: Sequence[str]) -> list[Any]:
    """The builders to load through a build directory: compatible here, not prebuilt in the package."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builders = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        if not installed_ops.get(builder.NAME, False):
            builders.append(builder)
    return builders


@contextmanager
def _build_lock(root: Path, log: Callable[[str], None]) -> Iterator[None]:
    """The pipeline's build lock: an flock, so it dies with its holder; who holds it is written in it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / BUILD_LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log(f"train: waiting for {holder}, which builds or loads DeepSpeed's ops in {root}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> int:
    """Build every op this machine's accelerator uses (what ``make install`` and the images run)."""
    os.environ.update(default_accelerator(os.environ))
    try:
        built = prepare(ALL_OPS)
    except ModelError as exc:  # e.g. no CUDA compiler for a GPU build: the step that needs it says so
        print(f"DeepSpeed ops not built now: {exc}", file=sys.stderr)
        return 0
    print(f"DeepSpeed ops in {extensions_dir()}: " + (f"built {', '.join(built)}" if built else "all built already"))
    return 0
