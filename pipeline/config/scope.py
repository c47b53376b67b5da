"""Which values a trigger may give the keys it may always set: ``collect.sources`` only under the
deployment's ``collect.allowed_sources`` prefixes, ``model_name`` only matching its
``allowed_model_names`` (or the name the config would have anyway). Checked before anything is read.

    python -c "from pipeline.config import scope; scope.check_sources(['/etc/passwd'], ['pkg://pipeline/data/'])"

Foundation layer (the ``config`` package): imports nothing of ours but ``storage`` and ``errors``.
What a local source names (``local_files``) is decided here, and collect reads exactly those files,
so the check and the read can never see different files.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline import storage
from pipeline.errors import ConfigError, PipelineError

LOCAL_KINDS = ("", "file", "pkg")
DEFAULT_PORTS = {"http": 80, "https": 443}
ALLOW_HOW = "to allow it, the deployment's config file (FINETUNE_CONFIG, or `finetune run --config FILE`) sets"


def local_files(path: Path) -> list[Path]:
    """Every file a local path, glob or directory names now, in a stable order (hidden ones left out)."""
    matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
    files: list[Path] = []
    for match in map(Path, matches):
        files.extend(sorted(match.rglob("*")) if match.is_dir() else [match])
    return [f for f in files if f.is_file() and not f.name.startswith(".")]


def check_prefix(prefix: str) -> None:
    """An entry of collect.allowed_sources must be a prefix the check can compare against."""
    where = f"collect.allowed_sources: {prefix!r}"
    kind = storage.scheme(prefix)
    if kind == "" and not Path(prefix).expanduser().is_absolute():
        raise ConfigError(f"{where} is a relative path; give an absolute path, file:// or pkg:// URI")
    if kind in ("s3", "pkg") and not urlsplit(prefix).netloc:
        raise ConfigError(f"{where} names no {'bucket' if kind == 's3' else 'package'}")
    if kind in DEFAULT_PORTS and _http_key(prefix) is None:
        raise ConfigError(f"{where} is not a scheme://host[:port]/path prefix without '..' segments")
    if kind not in (*LOCAL_KINDS, "s3", *DEFAULT_PORTS):
        raise ConfigError(f"{where}: unsupported scheme '{kind}' (a path, file://, pkg://, s3:// or http(s)://)")


def _segments(path: str) -> list[str]:
    return re.split(r"[/\\]", unquote(path))


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it, on a '/' boundary ('/data' never allows '/database')."""
    return prefix.endswith("/") and path.startswith(prefix) or path == prefix or path.startswith(f"{prefix}/")


def _http_key(url: str) -> tuple[str, str] | None:
    """'scheme://host:port' and the decoded path of an http(s) URL; None for one with a '..' segment or a bad port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not host or ".." in _segments(parts.path):
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}", unquote(parts.path) or "/"


def _http_allowed(source: str, prefixes: Sequence[str]) -> bool:
    key = _http_key(source)
    for prefix in (p for p in prefixes if storage.scheme(p) in DEFAULT_PORTS):
        allowed = _http_key(prefix)
        if key and allowed and key[0] == allowed[0] and _under(key[1], allowed[1].rstrip("/") or "/"):
            return True
    return False


def _s3_allowed(source: str, prefixes: Sequence[str]) -> bool:
    """A source's key is a listing prefix (``s3://b/data`` lists ``database/`` too), so it must start
    with the allowed key prefix and its '/': ``s3://b/data`` allows ``s3://b/data/...`` only."""
    bucket, key = urlsplit(source).netloc, urlsplit(source).path.lstrip("/")
    if ".." in _segments(key):
        return False
    for prefix in (p for p in prefixes if storage.scheme(p) == "s3"):
        allowed = urlsplit(prefix).path.strip("/")
        if urlsplit(prefix).netloc == bucket and (not allowed or key.startswith(f"{allowed}/")):
            return True
    return False


def _local_roots(prefixes: Sequence[str]) -> list[Path]:
    """The resolved directories of the local prefixes (one of a package not installed allows nothing)."""
    roots = []
    for prefix in prefixes:
        try:
            path = storage.local_path(prefix)
        except PipelineError:
            continue
        if path is not None:
            roots.append(path.resolve())
    return roots


def _fixed_part(path: Path) -> Path:
    """The directory part of a glob before its first wildcard (the path itself when it has none)."""
    parts = path.parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(path.anchor or ".")


def _local_allowed(source: str, prefixes: Sequence[str]) -> bool:
    """Resolved (symlinks, '..') against the resolved local prefixes: the path, a glob's fixed part
    and every file it names now. A pkg:// source only of a package a pkg:// prefix names."""
    kind = storage.scheme(source)
    local = [p for p in prefixes if storage.scheme(p) in LOCAL_KINDS]
    if kind == "pkg" and urlsplit(source).netloc not in {
        urlsplit(p).netloc for p in local if storage.scheme(p) == "pkg"
    }:
        return False
    roots = _local_roots(local)
    try:
        path = storage.local_path(source)
    except PipelineError:  # a pkg:// package not installed
        return False
    if path is None or not roots:
        return False
    named = [_fixed_part(path), *(() if glob.has_magic(str(path)) else (path,)), *local_files(path)]
    return all(any(p.resolve().is_relative_to(root) for root in roots) for p in named)


def source_allowed(source: str, prefixes: Sequence[str]) -> bool:
    """Whether collect.allowed_sources (``prefixes``) lets a trigger pick ``source`` (its
    ``#rows=``/``#weight=`` suffix aside)."""
    uri = source.partition("#")[0]
    kind = storage.scheme(uri)
    if kind in DEFAULT_PORTS:
        return _http_allowed(uri, prefixes)
    if kind == "s3":
        return _s3_allowed(uri, prefixes)
    return kind in LOCAL_KINDS and _local_allowed(uri, prefixes)


def check_announced(snapshot_uri: str, artifact_root: str, prefixes: Sequence[str], origin: str) -> None:
    """Refuse an asset event's ``snapshot_uri`` outside the deployment's snapshot store
    (``<artifact_root>/snapshots/``, where collect publishes) and its ``collect.allowed_sources``:
    whoever may post an asset event gets no wider reach than whoever may trigger a run."""
    store = storage.join(artifact_root, "snapshots")
    if source_allowed(snapshot_uri, [store, *prefixes]):
        return
    raise ConfigError(
        f"{origin}: snapshot_uri {snapshot_uri} is neither in the deployment's snapshot store {store}/ nor under "
        f"collect.allowed_sources {list(prefixes)}; an event may announce only a snapshot collect published there "
        "(or a source a trigger could pick); nothing was read"
    )


def _suggestion(source: str) -> str:
    """A prefix that would allow ``source``: its directory (a glob's fixed part), bucket or URL."""
    uri = source.partition("#")[0]
    kind = storage.scheme(uri)
    if kind == "s3":
        return f"s3://{urlsplit(uri).netloc}/"
    if kind in DEFAULT_PORTS:
        return uri.rsplit("/", 1)[0] + "/" if urlsplit(uri).path.count("/") > 1 else uri
    try:
        path = storage.local_path(uri) if kind in LOCAL_KINDS else None
    except PipelineError:
        path = None
    if path is None:
        return uri
    fixed = _fixed_part(path).resolve()
    return f"{fixed if fixed.is_dir() else fixed.parent}/"


def check_sources(sources: Sequence[str], prefixes: Sequence[str], origin: str = "DAG run conf") -> None:
    """Refuse the first of a trigger's ``sources`` no prefix of collect.allowed_sources allows,
    naming it and what the deployment's config file would set to allow it."""
    for source in sources:
        if not source_allowed(source, prefixes):
            wanted = json.dumps([*prefixes, _suggestion(source)])
            raise ConfigError(
                f"{origin}: source {source} is outside collect.allowed_sources {list(prefixes)}, the prefixes a "
                f"trigger may pick sources under; {ALLOW_HOW} `collect: {{allowed_sources: {wanted}}}`"
            )


def check_model_name(
    name: str, patterns: Sequence[str], anyway: Callable[[], str], origin: str = "DAG run conf"
) -> None:
    """Refuse a trigger's ``model_name`` that matches no pattern of allowed_model_names and is not
    the name the config would have anyway (``anyway()``: without the trigger's model_name)."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
        return
    own = anyway()
    if name == own:
        return
    raise ConfigError(
        f"{origin}: model_name {name!r} matches no pattern of allowed_model_names {list(patterns)}, the names a "
        f"trigger may register or promote under (besides the config's own, {own!r}); {ALLOW_HOW} "
        f"`allowed_model_names: {json.dumps([*patterns, name])}`"
    )
