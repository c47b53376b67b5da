"""startup: the train step's start-up watchdog. Between the step's start and the first training
step it loads a model (perhaps from the hub), builds DeepSpeed's ops, meets its peers and builds
the engine; any of these can wait forever without a word (a build lock nobody will remove, a peer
that never comes). If the step prints nothing for ``train.startup_timeout_s`` while starting, it
fails with a ``TransientError`` (exit 75, retried) that says where it waits: the innermost frames
of its stack and, when it waits on a torch build lock, the lock file's path.

Anything written to ``sys.stdout``/``sys.stderr`` (the pipeline's lines, a download's progress
bar) re-arms it; the Trainer's ``on_train_begin`` ends it. A ``SIGALRM`` timer is the clock: its
handler runs in the main thread, where the step waits, so it raises there (``time.sleep``, socket
and ``subprocess`` waits are interrupted) and the step's own error handling reports it.

    with startup.watchdog(600) as started:
        ...                                  # load, build, rendezvous
        trainer.add_callback(started.callback())
        trainer.train()
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO, cast

from pipeline.errors import TransientError

_SHOWN_FRAMES = 8


class _Expired(BaseException):
    """What the timer raises where the step waits. Not an ``Exception``, as ``KeyboardInterrupt``
    is not: libraries that catch every ``Exception`` and retry (botocore does, around a request)
    would swallow it and wait again. The watchdog turns it into a ``TransientError``."""


class Started:
    """The running watchdog: ``poke()`` re-arms it, ``stop()`` ends it (idempotent)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.active = False

    def poke(self) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)

    def stop(self) -> None:
        if self.active:
            self.active = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def callback(self) -> Any:
        """A ``TrainerCallback`` that ends the watchdog when training begins (the engine is built)."""
        from transformers import TrainerCallback

        started = self

        class _TrainingBegan(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                started.stop()

        return _TrainingBegan()


class _Poking:
    """A text stream that re-arms the watchdog on every write; everything else is the stream's."""

    def __init__(self, stream: TextIO, started: Started) -> None:
        self._stream = stream
        self._started = started

    def write(self, text: str) -> int:
        self._started.poke()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def watchdog(timeout_s: float) -> Iterator[Started]:
    """Fail the step when it prints nothing for ``timeout_s`` seconds until ``stop()``; 0: off.
    Off too outside the main thread, where no signal handler can be set."""
    started = Started(timeout_s)
    if timeout_s <= 0 or threading.current_thread() is not threading.main_thread():
        yield started
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        started.active = False
        raise _Expired(describe(frame, timeout_s))

    previous = signal.signal(signal.SIGALRM, on_alarm)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = cast(TextIO, _Poking(sys.stdout, started)), cast(TextIO, _Poking(sys.stderr, started))
    started.active = True
    started.poke()
    try:
        yield started
    except _Expired as expired:
        raise TransientError(str(expired)) from None
    finally:
        started.stop()
        sys.stdout, sys.stderr = streams
        signal.signal(signal.SIGALRM, previous)


def describe(frame: FrameType | None, timeout_s: float) -> str:
    """What the step waits on, from the frame the timer interrupted: the innermost frame, the
    pipeline's own innermost call and, in a torch build, the lock file."""
    stack = traceback.extract_stack(frame) if frame is not None else traceback.StackSummary()
    message = f"printed nothing for {timeout_s:g} s while starting (train.startup_timeout_s)"
    if stack:
        message += f"; it waits in {_place(stack[-1])}"
        ours = [f for f in stack if f"{os.sep}pipeline{os.sep}" in f.filename]
        if ours and ours[-1] is not stack[-1]:
            message += f", called from {_place(ours[-1])}"
    lock = _baton_lock(frame)
    if lock:
        message += (
            f", for the build lock {lock}, which no build removed (a build killed part-way leaves it): "
            "if no build runs, delete the file"
        )
    shown = "".join(f"  {_place(f)}\n" for f in stack[-_SHOWN_FRAMES:])
    return f"{message}. Innermost frames, the last is where it waits:\n{shown.rstrip()}"


def _place(frame: traceback.FrameSummary) -> str:
    """``torch/utils/file_baton.py:50 in wait()``: a file's path from its package, not the venv's."""
    path = frame.filename
    for marker in ("site-packages/", f"lib/python{sys.version_info.major}.{sys.version_info.minor}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if f"{os.sep}pipeline{os.sep}" in path:
        path = "pipeline" + os.sep + path.rsplit(f"{os.sep}pipeline{os.sep}", 1)[1]
    return f"{path}:{frame.lineno} in {frame.name}()"


def _baton_lock(frame: FrameType | None) -> str | None:
    """The lock file when the step sits in torch's ``FileBaton.wait`` (a JIT build's lock)."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "wait" and type(owner).__name__ == "FileBaton":
            return str(getattr(owner, "lock_file_path", ""))
        frame = frame.f_back
    return None
