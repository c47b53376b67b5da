"""Local directory publishes readers can trust: ``<dir>/<name>`` is a symlink to an immutable
version beside it, ``<dir>/.<name>.published.<id>/``, and a publish swaps the symlink with one
``os.replace``. A reader that resolves the symlink once (``pinned``; ``storage.local_path`` does)
holds one version: it sees the old publish or the new one, never neither and never a mix.

Versions are hidden names (``list_tree`` skips them). A publish prunes the versions that are
neither the new one nor the one it replaced and that were replaced more than ``KEEP_REPLACED_S``
ago, so a reader mid-read keeps its files. A path that is still a plain directory (written before
this layout) is moved to a version name and the symlink put in its place on its first publish.

    python -c "from pathlib import Path; from pipeline.storage import local_publish as p; \\
        print(p.publish(Path('src'), Path('/tmp/x/model')))"
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

# A replaced version stays this long for the readers still reading it (and the one just replaced
# stays until the next publish whatever its age).
KEEP_REPLACED_S = 600.0


_ID = re.compile(r"\d{20}-[0-9a-f]{8}")


def _versions(path: Path) -> list[Path]:
    """The versions of the published directory ``path``, oldest first (ids sort in publish order)."""
    prefix = f".{path.name}.published."
    return sorted(
        p for p in path.parent.iterdir() if p.name.startswith(prefix) and _ID.fullmatch(p.name[len(prefix) :])
    )


def _new_version(path: Path) -> Path:
    # Time first so that names sort in publish order; the random tail keeps two publishers apart.
    return path.with_name(f".{path.name}.published.{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")


def is_published(path: Path) -> bool:
    """Whether ``path`` is the symlink of a published directory (and not a plain one)."""
    return path.is_symlink() and os.readlink(path).startswith(f".{path.name}.published.")


def pinned(path: Path) -> Path:
    """The version a published directory ``path`` points at now (``path`` itself otherwise): read
    every file of one read through it and they all come from one publish."""
    if is_published(path):
        return path.with_name(os.readlink(path))
    return path


def publish(src: Path, path: Path) -> Path:
    """Copy ``src`` into a new version beside ``path`` and swap ``path``'s symlink to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    legacy = _new_version(path)  # named first, so that a migrated plain directory sorts first
    version = _new_version(path)
    shutil.copytree(src, version, symlinks=False)
    os.utime(version)  # copytree gave it src's mtime; a fresh version must look fresh to _prune
    if path.exists() and not path.is_symlink():
        # A plain directory (the layout before symlinks) moves to a version name, then the
        # symlink takes its place: the one moment a reader can find nothing, once per path.
        os.replace(path, legacy)
        previous = legacy
    else:
        previous = pinned(path)
    link = path.with_name(f".{path.name}.{uuid.uuid4().hex}.link")
    os.symlink(version.name, link)  # relative: the parent directory may be moved or mounted elsewhere
    os.replace(link, path)
    if previous != path and previous.exists():
        os.utime(previous)  # its mtime is now the moment it was replaced: the clock of its grace
    _prune(path, keep={version.name, previous.name})
    return version


def _prune(path: Path, keep: set[str]) -> None:
    cutoff = time.time() - KEEP_REPLACED_S
    for version in _versions(path):
        if version.name in keep:
            continue
        try:
            if version.stat().st_mtime < cutoff:
                shutil.rmtree(version, ignore_errors=True)
        except FileNotFoundError:
            continue  # another publisher pruned it first


def remove(path: Path) -> None:
    """Delete a published directory: its symlink first (readers then find nothing), then every version."""
    path.unlink()
    for version in _versions(path):
        shutil.rmtree(version, ignore_errors=True)
