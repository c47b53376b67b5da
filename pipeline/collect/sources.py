"""Sources: which files an entry of collect.sources names (a path, a glob, a directory, an S3 key
or prefix, an http(s) URL), and a local copy of each to parse.

Which sources a trigger may pick is decided at the trigger check (``pipeline.config.scope``, against
collect.allowed_sources); which hosts collect may download from in ``check_allowed``, before any byte
is read; where a redirect may lead, in ``pipeline.storage.http``, before anything connects to it.

    python -c "from pipeline.collect import sources; print(sources.expand('pipeline/data/*.jsonl'))"
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import local_files
from pipeline.errors import ConfigError, DataError
from pipeline.storage import http


@dataclass
class SourceFile:
    """One file a source names; what the manifest records about it fills in as it is read."""

    uri: str
    size: int | None = None
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    rows: int = 0
    # http(s): the URL the bytes came from, after redirects. ``uri`` stays the URL the config
    # names, so the manifest's sources match collect.sources and collecting them again works.
    final_uri: str | None = None

    def manifest_entry(self) -> dict[str, Any]:
        entry = {
            "uri": self.uri,
            "bytes": self.size,
            "sha256": self.sha256,
            "rows": self.rows,
            "etag": self.etag,
            "last_modified": self.last_modified,
        }
        if self.final_uri is not None:
            entry["final_uri"] = self.final_uri
        return entry


def check_allowed(source: str, allowed_hosts: Sequence[str]) -> None:
    """Refuse a source collect may not download from: with collect.allowed_hosts, an http(s) source
    must name a listed host. Which sources a trigger may pick is the trigger check's
    (``pipeline.config.scope``, at ``steps.trigger_config``), before collect runs."""
    if storage.scheme(source) in ("http", "https") and allowed_hosts and not http.listed(source, allowed_hosts):
        raise ConfigError(
            f"source {source}: {http.host_port(source)} is not in collect.allowed_hosts "
            f"{list(allowed_hosts)}; add it there to download from it"
        )


def expand(source: str, allowed_hosts: Sequence[str] = ()) -> list[SourceFile]:
    """Every file a source names, in a stable order; no bytes are read yet."""
    check_allowed(source, allowed_hosts)
    kind = storage.scheme(source)
    if kind in ("http", "https"):
        return [SourceFile(source)]
    if kind == "s3":
        info = storage.object_info(source)
        objects = [info] if info is not None else storage.list_object_info(source)
        if not objects:
            raise DataError(f"source {source} matches no objects (no such key, and no keys under that prefix)")
        return [SourceFile(o["uri"], size=o["size"], etag=o["etag"], last_modified=o["last_modified"]) for o in objects]
    path = storage.local_path(source)
    if path is None:
        raise DataError(f"source {source}: unsupported URI scheme '{kind}' (use a path, file://, s3:// or https://)")
    files = local_files(path)  # the very files a trigger's source was checked by (config.scope)
    if not files:
        raise DataError(f"source {source} matches no files")
    out = []
    for file in files:
        stat = file.stat()
        out.append(
            SourceFile(
                str(file), size=stat.st_size, last_modified=datetime.fromtimestamp(stat.st_mtime, UTC).isoformat()
            )
        )
    return out


@contextlib.contextmanager
def local_copy(source: SourceFile, tmp: Path, allowed_hosts: Sequence[str] = ()) -> Iterator[Path]:
    """A local file holding the source's bytes: the file itself, or a download deleted afterwards.

    Remote sources go to disk, not memory, so a source's size costs disk space only; the sha256 of
    the raw bytes is taken here, from that file, for the manifest.
    """
    kind = storage.scheme(source.uri)
    if kind in ("http", "https", "s3"):
        path = tmp / f"source{Path(source.uri.split('?')[0]).suffix}"
        try:
            if kind == "s3":
                storage.download(source.uri, path)
            else:
                _download_http(source, path, allowed_hosts)
            source.size = path.stat().st_size
            source.sha256 = _file_sha256(path)
            yield path
        finally:
            path.unlink(missing_ok=True)
        return
    path = Path(source.uri)
    try:
        source.sha256 = _file_sha256(path)
    except OSError as exc:
        raise DataError(f"cannot read {source.uri}: {exc.strerror}") from exc
    yield path


def _download_http(source: SourceFile, dest: Path, allowed_hosts: Sequence[str]) -> None:
    """Download an http(s) source, noting its ETag, Last-Modified and the URL it came from."""
    done = http.download(source.uri, dest, allowed_hosts)
    source.etag = done.etag
    if done.last_modified is not None:
        source.last_modified = done.last_modified
    source.final_uri = done.final_uri


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
