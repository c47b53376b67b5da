"""checkpoints: training state in the artifact store, written so that no reader takes a half-written one.

A checkpoint is what the Trainer saved at an optimizer step (DeepSpeed's own checkpoint: model,
optimizer and scheduler states of every rank and ZeRO stage; the RNG states of every rank; the
trainer state, which holds the data position) plus the ids of the examples each rank trained on,
under ``<run>/train/checkpoints/checkpoint-<step>/``. Its files go first; its marker,
``COMPLETE.json``, goes last and lists every file with its size and sha256, the step, the world
size and the settings that shaped the state. A directory without its marker (a kill during the
write) is never used; one whose files do not match their marker is passed over for the one before.

    python -c "from pipeline import checkpoints; print(checkpoints.complete('file:///.../train/checkpoints'))"
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import ConfigError, DataError

MARKER = "COMPLETE.json"
_NAME = re.compile(r"checkpoint-(\d+)")


def name(step: int) -> str:
    return f"checkpoint-{step:08d}"  # zero-padded: listings sort by step


@dataclass(frozen=True)
class Checkpoint:
    uri: str
    step: int
    marker: dict[str, Any]


def file_digests(local_dir: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> size and sha256 of every file under ``local_dir``."""
    digests = {}
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests[file.relative_to(local_dir).as_posix()] = {"size": file.stat().st_size, "sha256": sha.hexdigest()}
    return digests


def upload(local_dir: Path, root: str, step: int) -> dict[str, dict[str, Any]]:
    """Copy the files of ``local_dir`` to ``<root>/checkpoint-<step>/``, each whole or not at all;
    return their digests for the marker. Each node uploads the files its own ranks wrote."""
    digests = file_digests(local_dir)
    if MARKER in digests:
        raise DataError(f"{local_dir}: holds a file named {MARKER}, the name kept for the checkpoint marker")
    target = storage.join(root, name(step))
    for relative in digests:
        storage.put_file(local_dir / relative, storage.join(target, relative))
    return digests


def write_marker(root: str, step: int, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The last write of a checkpoint: from here on it may be resumed from."""
    uri = storage.join(root, name(step), MARKER)
    storage.write_json(uri, {**meta, "step": step, "files": files, "saved_at": time.time()})
    return uri


def _by_step(root: str) -> dict[int, list[str]]:
    """Step -> the URIs of the files of ``<root>/checkpoint-<step>/``, marker or not."""
    base = root.rstrip("/") + "/"
    found: dict[int, list[str]] = {}
    for uri in storage.list_tree(root):
        top, _, rest = uri[len(base) :].partition("/")
        match = _NAME.fullmatch(top)
        if match and rest:
            found.setdefault(int(match.group(1)), []).append(uri)
    return found


def complete(root: str) -> list[Checkpoint]:
    """The checkpoints under ``root`` that have their marker, newest first."""
    found = []
    for step, uris in _by_step(root).items():
        directory = storage.join(root, name(step))
        if storage.join(directory, MARKER) in uris:
            found.append(Checkpoint(directory, step, storage.read_json(storage.join(directory, MARKER))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: checkpoint X, now Y' for every setting that differs between two nested dicts."""
    found = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return found


def check_compatible(checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint saved by a different world size or different settings, naming each difference."""
    diffs = differences({k: checkpoint.marker.get(k) for k in meta}, meta)
    if diffs:
        raise ConfigError(
            f"{checkpoint.uri} was saved by another configuration and cannot be resumed from: "
            + "; ".join(diffs)
            + ". Set train.resume=false to start this run's training over "
            "(its checkpoints are deleted), or train with the checkpoint's settings."
        )


def fetch(checkpoint: Checkpoint, dest: Path) -> Path:
    """A local directory holding the checkpoint, every file checked against its marker (size and
    sha256): a DataError names the first one that differs. Local roots are read in place."""
    files = checkpoint.marker.get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(f"{checkpoint.uri}/{MARKER}: lists no files")
    local = storage.local_path(checkpoint.uri)
    if local is None:
        shutil.rmtree(dest, ignore_errors=True)
        for relative in files:
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise DataError(f"{checkpoint.uri}/{MARKER}: names a file outside the checkpoint: {relative}")
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download(storage.join(checkpoint.uri, relative), target)
        local = dest
    found = file_digests(local)
    for relative, expected in files.items():
        if found.get(relative) != expected:
            got = found.get(relative)
            raise DataError(
                f"{checkpoint.uri}: {relative} does not match its marker (expected {expected['size']} "
                f"bytes, sha256 {expected['sha256'][:12]}; found "
                + (f"{got['size']} bytes, sha256 {got['sha256'][:12]})" if got else "no such file)")
            )
    return local


def newest_usable(root: str, meta: dict[str, Any], dest: Path) -> tuple[Checkpoint, Path] | None:
    """The newest complete checkpoint whose files match its marker, fetched into ``dest``; a
    damaged one is reported and the one before it tried. None when there is none."""
    for checkpoint in complete(root):
        check_compatible(checkpoint, meta)
        try:
            return checkpoint, fetch(checkpoint, dest)
        except DataError as exc:
            print(
                f"train: checkpoint at step {checkpoint.step} is damaged, trying an older one: {exc}",
                file=sys.stderr,
                flush=True,
            )
    return None


def prune(root: str, keep: int, also_keep: int | None = None) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints (and the one at step ``also_keep``,
    early stopping's best), and the incomplete ones older than the newest complete one (left by a
    kill during a write). The marker goes first, so a delete cut short leaves a directory that is
    never used. Returns the deleted steps."""
    kept = {c.step for c in complete(root)[:keep]} | ({also_keep} if also_keep is not None else set())
    newest = max(kept, default=None)
    doomed = {
        step: uris for step, uris in _by_step(root).items() if newest is not None and step < newest and step not in kept
    }
    for step, uris in sorted(doomed.items()):
        _delete(storage.join(root, name(step)), uris)
    return sorted(doomed)


def delete_all(root: str) -> None:
    """Every checkpoint under ``root``, complete or not (``train.resume=false``)."""
    for step, uris in _by_step(root).items():
        _delete(storage.join(root, name(step)), uris)


def _delete(directory: str, uris: list[str]) -> None:
    marker = storage.join(directory, MARKER)
    if marker in uris:
        storage.delete(marker)
    for uri in uris:
        if uri != marker:
            storage.delete(uri)
    path = storage.local_path(directory)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
