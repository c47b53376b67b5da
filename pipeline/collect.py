"""collect: stream records from local paths, file://, s3:// or https:// sources into one
content-addressed Parquet snapshot with a manifest.

Sources are read a batch of records at a time and written as Parquet row groups of
``collect.row_group_rows`` rows to a local temporary file, so memory stays flat however large the
sources are (bench/results/collect.md). The finished file is then published to
``<artifact_root>/snapshots/<sha256>/data.parquet``, ``manifest.json`` last. What a row holds depends on ``task``:

- ``sequence-classification``: ``text``, ``label``, ``split`` (from ``collect.text_column`` and
  ``collect.label_column``);
- ``causal-lm``: ``messages`` (a JSON list of ``{"role", "content"}``, from a ``messages`` field
  or ``prompt`` + ``response`` + optional ``system``), ``split``.

An entry of ``collect.sources`` may end in ``#rows=N`` (keep N of its rows) or ``#weight=W`` (its
share of the rows of the weighted entries, as many as they can fill without repeating a row);
the sample is seeded by ``seed`` and the manifest records each entry's rows read and kept.

The split (``train`` or ``eval``) comes from a stable hash of the normalised text, so it never
changes between runs and the same text can never land in both splits. A published snapshot is a
valid source: collecting it again gives the same sha256 and URI. An http(s) source's redirects are
followed (at most five) only within its scheme and, unless ``collect.allowed_hosts`` lists the
host, only to public addresses or back to the source's own host and port; the manifest names the
source as configured (``uri``) and the URL its bytes came from (``final_uri``).

    finetune collect --set collect.sources='[pipeline/data/support_intents.jsonl]'

pandas, pyarrow and urllib3 are imported inside the functions that parse, write or download:
the step table imports this module when Airflow parses the DAG files.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import hashlib
import io
import ipaddress
import json
import shutil
import socket
import sys
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from pipeline import chat, storage
from pipeline.config import READ_ROWS, CollectConfig, PipelineConfig
from pipeline.errors import ConfigError, DataError, TransientError
from pipeline.snapshot import snapshot_columns
from pipeline.text import normalize_text

FORMATS = ("jsonl", "csv", "parquet")
READ_BYTES = 1 << 20  # bytes per read from a source stream or an HTTP response
# The source fields a causal-lm record may use (chat.to_messages decides which shape it is).
CHAT_FIELDS = ("messages", "prompt", "response", "system")
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)  # truncated, corrupt, not gzip at all


@dataclass(frozen=True)
class CollectResult:
    result_uri: str
    snapshot_uri: str
    manifest_uri: str
    sha256: str
    rows: int
    rows_train: int
    rows_eval: int
    labels: list[str]


def split_of(text: str, eval_fraction: float) -> str:
    digest = hashlib.sha256(normalize_text(text).encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


# ----------------------------------------------------------------------------------------------
# Sources: which files a source names, and a local copy of each to parse


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
        entry = {"uri": self.uri, "bytes": self.size, "sha256": self.sha256, "rows": self.rows,
                 "etag": self.etag, "last_modified": self.last_modified}
        if self.final_uri is not None:
            entry["final_uri"] = self.final_uri
        return entry


def _expand(source: str, allowed_hosts: Sequence[str] = ()) -> list[SourceFile]:
    """Every file a source names, in a stable order; no bytes are read yet."""
    kind = storage.scheme(source)
    if kind in ("http", "https"):
        if allowed_hosts and not _listed(source, allowed_hosts):
            raise ConfigError(f"source {source}: {_host_port(source)} is not in collect.allowed_hosts "
                              f"{list(allowed_hosts)}; add it there to download from it")
        return [SourceFile(source)]
    if kind == "s3":
        info = storage.object_info(source)
        objects = [info] if info is not None else storage.list_object_info(source)
        if not objects:
            raise DataError(f"source {source} matches no objects (no such key, and no keys under that prefix)")
        return [SourceFile(o["uri"], size=o["size"], etag=o["etag"], last_modified=o["last_modified"])
                for o in objects]
    path = storage.local_path(source)
    if path is None:
        raise DataError(f"source {source}: unsupported URI scheme '{kind}' (use a path, file://, s3:// or https://)")
    matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
    files: list[Path] = []
    for match in map(Path, matches):
        files.extend(sorted(match.rglob("*")) if match.is_dir() else [match])
    files = [f for f in files if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise DataError(f"source {source} matches no files")
    out = []
    for file in files:
        stat = file.stat()
        out.append(SourceFile(str(file), size=stat.st_size,
                              last_modified=datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat()))
    return out


@contextlib.contextmanager
def _local_copy(source: SourceFile, tmp: Path, allowed_hosts: Sequence[str] = ()) -> Iterator[Path]:
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


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# Transient HTTP failures are retried by urllib3's Retry (exponential back-off 0.5 s, 1 s, 2 s),
# as S3 downloads are by botocore's standard mode; a 4xx is the source's answer and is not.
HTTP_RETRIES = 3
HTTP_RETRY_STATUSES = (429, 500, 502, 503, 504)
# Redirects are followed here, not by urllib3, so that each target is checked before anything
# connects to it: a public source must not be able to send collect to 169.254.169.254.
HTTP_MAX_REDIRECTS = 5


def _download_http(source: SourceFile, dest: Path, allowed_hosts: Sequence[str] = ()) -> None:
    """Stream an http(s) URL to ``dest`` in chunks, recording its ETag, Last-Modified and the
    URL it finally came from; at most ``HTTP_MAX_REDIRECTS`` redirects, each checked first."""
    import urllib3

    retry = urllib3.Retry(total=HTTP_RETRIES, backoff_factor=0.5, status_forcelist=HTTP_RETRY_STATUSES,
                          allowed_methods=("GET",), raise_on_status=False)
    pool = urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(connect=30, read=60))
    url = source.uri
    try:
        for _ in range(HTTP_MAX_REDIRECTS + 1):
            response = pool.request("GET", url, preload_content=False, redirect=False)
            try:
                location = response.get_redirect_location()  # False: not a redirect
                if location is False:
                    _save_response(response, source, url, dest)
                    break
                response.close()  # a redirect's body is never wanted, and a hostile one may not end
            finally:
                response.release_conn()
            url = _redirect_target(source.uri, url, location, allowed_hosts)
        else:
            raise DataError(f"cannot download {source.uri}: more than {HTTP_MAX_REDIRECTS} redirects "
                            f"(the last to {url})")
    except urllib3.exceptions.HTTPError as exc:  # refused, timed out, body cut short, retries spent
        where = "" if url == source.uri else f" (redirected to {url})"
        if _http_transient(exc):
            raise TransientError(f"cannot download {source.uri}{where}: {exc!r} (after {HTTP_RETRIES} retries); "
                                 f"it may clear by itself, so the task is retried with back-off") from exc
        raise DataError(f"cannot download {source.uri}{where}: {exc!r}") from exc
    source.final_uri = url


def _http_transient(exc: Exception) -> bool:
    """Whether urllib3's failure may clear by itself: a refused, reset or dropped connection, a
    timeout, a body cut short. A bad certificate or URL is a verdict."""
    import urllib3

    errors = urllib3.exceptions
    reason = exc.reason if isinstance(exc, errors.MaxRetryError) and exc.reason is not None else exc
    if isinstance(reason, (errors.SSLError, errors.LocationValueError, errors.ProxySchemeUnknown)):
        return False
    return isinstance(reason, (errors.TimeoutError, errors.NewConnectionError, errors.ProtocolError,
                               errors.ResponseError, errors.IncompleteRead, errors.DecodeError, ConnectionError))


def _save_response(response: Any, source: SourceFile, url: str, dest: Path) -> None:
    """Write the body of the final (not a redirect) response for ``source`` to ``dest``."""
    if response.status >= 400:
        retried = f" (after {HTTP_RETRIES} retries)" if response.status in HTTP_RETRY_STATUSES else ""
        where = "" if url == source.uri else f" (redirected to {url})"
        message = f"cannot download {source.uri}{where}: HTTP Error {response.status}: {response.reason}{retried}"
        if response.status in HTTP_RETRY_STATUSES or response.status >= 500:  # busy or failing: not the source's answer
            raise TransientError(f"{message}; it may clear by itself, so the task is retried with back-off")
        raise DataError(message)
    with dest.open("wb") as out:
        for chunk in response.stream(READ_BYTES):
            out.write(chunk)
    headers = response.headers
    source.etag = headers.get("ETag")
    if headers.get("Last-Modified"):
        with contextlib.suppress(TypeError, ValueError):
            source.last_modified = parsedate_to_datetime(headers["Last-Modified"]).isoformat()


def _redirect_target(source_uri: str, url: str, location: str | None, allowed_hosts: Sequence[str]) -> str:
    """The absolute URL the redirect from ``url`` points to, once it is allowed: the same scheme
    as the source; with ``allowed_hosts``, a listed host; without, the source's own host and port
    or a host whose every address is public. Nothing has connected to it yet."""
    refused = f"cannot download {source_uri}: refused the redirect from {url} to"
    if not location:
        raise DataError(f"cannot download {source_uri}: {url} answered a redirect without a Location")
    target = urljoin(url, location)
    parts = urlsplit(target)
    if parts.scheme != urlsplit(source_uri).scheme:
        raise DataError(f"{refused} {target}: it changes the scheme from {urlsplit(source_uri).scheme} to "
                        f"{parts.scheme or 'none'}, which no setting allows (name that URL in collect.sources "
                        "if it is the one meant)")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is no number
        host = None
    if not host:
        raise DataError(f"{refused} {target}: not a URL with a host")
    if allowed_hosts:
        if not _listed(target, allowed_hosts):
            raise DataError(f"{refused} {target}: {_host_port(target)} is not in collect.allowed_hosts "
                            f"{list(allowed_hosts)}; add it there to allow it")
        return target
    if _host_port(target) == _host_port(source_uri):
        return target  # back to the host the config names: it reaches nothing the source did not
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise DataError(f"{refused} {target}: cannot resolve {host} ({exc})") from exc
    for text in sorted(addresses):
        address = ipaddress.ip_address(text.split("%")[0])  # an IPv6 zone ('fe80::1%eth0') is no part of it
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its spelling
        if not address.is_global:
            kind = ("loopback" if address.is_loopback else "link-local" if address.is_link_local
                    else "private" if address.is_private else "non-public")
            raise DataError(f"{refused} {target}: {host} resolves to {address}, a {kind} address; add "
                            f"'{_host_port(target)}' to collect.allowed_hosts (with the source's host) to allow it")
    return target


def _host_port(url: str) -> str:
    """'host:port' of ``url`` as collect.allowed_hosts writes it (IPv6 in brackets, default port filled in)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether collect.allowed_hosts names the host of ``url``: alone (any port) or with its port."""
    host_port = _host_port(url)
    host = host_port.rpartition(":")[0]
    return any(entry.lower() in (host_port, host, host.strip("[]")) for entry in allowed_hosts)


# ----------------------------------------------------------------------------------------------
# Parsing: one file as a stream of chunks


def _format_of(uri: str) -> tuple[str, bool]:
    name = uri.lower().split("?")[0]
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    for fmt, suffixes in (("jsonl", (".jsonl", ".json", ".ndjson")), ("csv", (".csv",)), ("parquet", (".parquet",))):
        if name.endswith(suffixes):
            return fmt, compressed
    raise DataError(f"{uri}: unknown format; expected one of {', '.join(FORMATS)} (optionally .gz)")


@dataclass
class Chunk:
    """A batch of records of one file, as one list of values per field."""

    values: dict[str, list[Any]]
    first_row: int  # data rows of the file before this chunk
    lines: list[int] | None = None  # JSONL: each record's line number, which blank lines shift

    def __len__(self) -> int:
        return len(next(iter(self.values.values()), []))

    def where(self, index: int) -> str:
        """How an error names a row: 'row 7', or 'row 7 (line 9)' where the two differ."""
        row = self.first_row + index + 1
        line = self.lines[index] if self.lines else row
        return f"row {row}" if line == row else f"row {row} (line {line})"


class CheckedStream(io.RawIOBase):
    """Decompresses (gzip) and checks UTF-8 as bytes pass through, unchanged, to a parser.

    Errors name the file and say where: a truncated gzip, or the byte offset and line of the
    first byte that is not UTF-8 (offsets count decompressed bytes).
    """

    def __init__(self, path: Path, uri: str, compressed: bool) -> None:
        self._file = path.open("rb")
        self._raw: BinaryIO = gzip.GzipFile(fileobj=self._file) if compressed else self._file
        self._uri = uri
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0
        self._newlines = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._raw.read(len(buffer))
        except GZIP_ERRORS as exc:
            raise DataError(f"{self._uri}: cannot decompress gzip data ({exc})") from exc
        pending = self._decoder.getstate()[0]  # the start of a character split across reads
        try:
            self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            seen = pending + data
            line = self._newlines + seen[:exc.start].count(b"\n") + 1
            raise DataError(f"{self._uri}: not valid UTF-8 at byte {self._offset - len(pending) + exc.start} "
                            f"(line {line})") from exc
        self._offset += len(data)
        self._newlines += data.count(b"\n")
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        self._file.close()
        super().close()


@dataclass
class Parsed:
    """An open source file: the columns it has and its chunks with just the fields asked for."""

    columns: set[str]  # CSV and Parquet: known up front; JSONL: filled in as records are read
    columns_complete: bool
    chunks: Iterator[Chunk]


@contextlib.contextmanager
def open_source(path: Path, uri: str, fields: tuple[str, ...], chunk_rows: int, tmp: Path) -> Iterator[Parsed]:
    """Parse one file as a stream of chunks of ``chunk_rows`` records; a field a record lacks
    reads as None. Everything the file opened is closed on leaving, on error too."""
    fmt, compressed = _format_of(uri)
    if path.stat().st_size == 0:
        raise DataError(f"{uri}: file is empty")
    with contextlib.ExitStack() as stack:
        if fmt == "parquet":
            yield _parquet_source(path, uri, fields, chunk_rows, compressed, tmp, stack)
        elif fmt == "csv":
            yield _csv_source(path, uri, fields, chunk_rows, compressed, stack)
        else:
            stream = stack.enter_context(io.BufferedReader(CheckedStream(path, uri, compressed), READ_BYTES))
            found: set[str] = set()
            yield Parsed(found, False, _jsonl_chunks(stream, uri, fields, chunk_rows, found))


def _jsonl_chunks(stream: BinaryIO, uri: str, fields: tuple[str, ...], chunk_rows: int,
                  found: set[str]) -> Iterator[Chunk]:
    """Records in batches of lines, each remembering its line number for errors."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    rows = 0
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))  # CheckedStream has made sure it is UTF-8
        except json.JSONDecodeError as exc:
            raise DataError(f"{uri}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{uri}: line {number} is not a JSON object but {type(record).__name__}")
        found.update(record)
        records.append(record)
        lines.append(number)
        if len(records) == chunk_rows:
            yield Chunk({f: [r.get(f) for r in records] for f in fields}, rows, lines)
            rows += len(records)
            records, lines = [], []
    if records:
        yield Chunk({f: [r.get(f) for r in records] for f in fields}, rows, lines)
    elif not rows:
        raise DataError(f"{uri}: file is empty (no JSON lines)")


def _csv_source(path: Path, uri: str, fields: tuple[str, ...], chunk_rows: int, compressed: bool,
                stack: contextlib.ExitStack) -> Parsed:
    import pandas as pd

    stream = stack.enter_context(io.BufferedReader(CheckedStream(path, uri, compressed), READ_BYTES))
    try:
        # Every value as text (a label '007' stays '007'); an empty cell is null, for validate.
        # The C parser handles BOM, CRLF and quoted newlines, reading the stream a block at a time.
        reader = stack.enter_context(pd.read_csv(stream, dtype=str, keep_default_na=False, na_values=[""],
                                                 chunksize=chunk_rows, encoding="utf-8-sig"))
        first = next(reader)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{uri}: file is empty") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{uri}: not valid CSV ({exc})") from exc

    def frames() -> Iterator[pd.DataFrame]:
        yield first
        try:
            yield from reader
        except pd.errors.ParserError as exc:
            raise DataError(f"{uri}: not valid CSV ({exc})") from exc

    def chunks() -> Iterator[Chunk]:
        rows = 0
        for frame in frames():
            if frame.empty:
                continue
            yield Chunk({f: [v if isinstance(v, str) else None for v in frame[f]] if f in frame
                         else [None] * len(frame) for f in fields}, rows)
            rows += len(frame)

    return Parsed(set(first.columns), True, chunks())


def _parquet_source(path: Path, uri: str, fields: tuple[str, ...], chunk_rows: int, compressed: bool, tmp: Path,
                    stack: contextlib.ExitStack) -> Parsed:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if compressed:  # Parquet needs random access: decompress to disk, never to memory
        plain = tmp / "source.parquet"
        stack.callback(plain.unlink, missing_ok=True)
        try:
            with gzip.open(path, "rb") as packed, plain.open("wb") as out:
                shutil.copyfileobj(packed, out, READ_BYTES)
        except GZIP_ERRORS as exc:
            raise DataError(f"{uri}: cannot decompress gzip data ({exc})") from exc
        path = plain
    try:
        parquet = stack.enter_context(contextlib.closing(pq.ParquetFile(path)))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{uri}: not a readable Parquet file ({exc})") from exc
    columns = set(parquet.schema_arrow.names)

    def chunks() -> Iterator[Chunk]:
        rows = 0
        try:
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=[f for f in fields if f in columns]):
                yield Chunk({f: batch.column(f).to_pylist() if f in columns else [None] * batch.num_rows
                             for f in fields}, rows)
                rows += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{uri}: cannot read Parquet data after row {rows} ({exc})") from exc

    return Parsed(columns, True, chunks())


# ----------------------------------------------------------------------------------------------
# Rows: a chunk of source records as snapshot columns


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _classification_rows(chunk: Chunk, uri: str, own: CollectConfig) -> dict[str, list[Any]]:
    """text, label, split. Nulls stay nulls for validate to report; text must already be text (a
    number there means the column is not what the file claims); numeric labels become text."""
    texts, labels, splits = [], [], []
    for index, (text, label) in enumerate(zip(chunk.values[own.text_column], chunk.values[own.label_column])):
        if _is_null(text):
            text = None
        elif not isinstance(text, str):
            raise DataError(f"{uri}: {chunk.where(index)}: '{own.text_column}' is {type(text).__name__} "
                            f"{_short(text)}, not a string")
        if _is_null(label):
            label = None
        elif isinstance(label, (int, float)):  # bool too: 0/1 and True/False classes
            label = str(label)
        elif not isinstance(label, str):
            raise DataError(f"{uri}: {chunk.where(index)}: '{own.label_column}' is {type(label).__name__} "
                            f"{_short(label)}, not a string or number")
        texts.append(text)
        labels.append(label)
        splits.append("train" if text is None else _split(text, own, lambda: f"{uri}: {chunk.where(index)}: "
                                                                       f"'{own.text_column}'"))
    return {"text": texts, "label": labels, "split": splits}


def _chat_rows(chunk: Chunk, uri: str, own: CollectConfig) -> dict[str, list[Any]]:
    """messages (chat.dumps JSON), split. Role order is validate's to judge, not collect's."""
    columns = [chunk.values[f] for f in CHAT_FIELDS]
    conversations, splits = [], []
    for index, values in enumerate(zip(*columns)):
        record = {f: v for f, v in zip(CHAT_FIELDS, values) if not _is_null(v)}
        try:
            messages = chat.dumps(chat.to_messages(record))
        except ValueError as exc:
            raise DataError(f"{uri}: {chunk.where(index)}: {exc}") from exc
        conversations.append(messages)
        splits.append(_split(messages, own, lambda: f"{uri}: {chunk.where(index)}: the messages"))
    return {"messages": conversations, "split": splits}


def _extra_values(chunk: Chunk, own: CollectConfig) -> dict[str, list[Any]]:
    """The columns collect.extra_columns carries (e.g. channel, product), as text; nulls stay null."""
    return {column: [None if _is_null(v) else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for v in chunk.values[column]] for column in own.extra_columns}


def _split(text: str, own: CollectConfig, where: Any) -> str:
    try:
        return split_of(text, own.eval_fraction)
    except UnicodeEncodeError:  # JSON can escape half a surrogate pair; UTF-8 and Parquet cannot hold it
        raise DataError(f"{where()} is not valid Unicode (an unpaired surrogate such as \\ud800)") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_columns(task: str, uri: str, found: set[str], own: CollectConfig) -> None:
    extra = [c for c in own.extra_columns if c not in found]
    if extra:
        raise DataError(f"{uri}: missing column(s) {extra} that collect.extra_columns carries into the snapshot; "
                        f"found {sorted(found)}")
    if task == "causal-lm":
        if "messages" not in found and not {"prompt", "response"} <= found:
            raise DataError(f"{uri}: missing column(s): needs 'messages', or 'prompt' and 'response'; "
                            f"found {sorted(found)}")
        return
    missing = [c for c in (own.text_column, own.label_column) if c not in found]
    if missing:
        raise DataError(f"{uri}: missing column(s) {missing}; found {sorted(found)}")


# ----------------------------------------------------------------------------------------------
# The snapshot: Parquet row groups and the content hash, written as rows arrive


class UnencodableRow(ValueError):
    """A string that UTF-8 cannot hold (an unpaired surrogate from a JSON escape)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


@dataclass
class SnapshotWriter:
    """Writes rows to a local Parquet file in row groups of exactly ``row_group_rows`` rows and
    hashes them as they pass, so neither the file's row groups nor the hash depend on how the
    sources happened to be chunked."""

    path: Path
    columns: tuple[str, ...]
    row_group_rows: int
    rows: int = 0
    row_groups: int = 0
    _digest: Any = field(default_factory=hashlib.sha256)
    _pending: list[Any] = field(default_factory=list)
    _pending_rows: int = 0
    _writer: Any = None

    def __post_init__(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = pa.schema([(c, pa.string()) for c in self.columns])
        self._writer = pq.ParquetWriter(self.path, self.schema)

    def add(self, values: dict[str, list[Any]]) -> None:
        import pyarrow as pa

        rows = list(zip(*(values[c] for c in self.columns)))
        # One JSON array per row: the encoding snapshots have always been hashed with.
        try:
            self._digest.update("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        except UnicodeEncodeError:
            raise UnencodableRow(next(i for i, row in enumerate(rows) if not _encodable(row))) from None
        self._pending.append(pa.table({c: pa.array(values[c], pa.string()) for c in self.columns}, self.schema))
        self._pending_rows += len(rows)
        self.rows += len(rows)
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self._pending)
        whole = len(table) if final else len(table) - len(table) % self.row_group_rows
        for start in range(0, whole, self.row_group_rows):
            self._writer.write_table(table.slice(start, min(self.row_group_rows, whole - start)),
                                     row_group_size=self.row_group_rows)
            self.row_groups += 1
        self._pending = [table.slice(whole)] if whole < len(table) else []
        self._pending_rows = len(table) - whole

    def finish(self) -> str:
        """Close the file; the sha256 of the rows."""
        if self._pending_rows:
            self._flush(final=True)
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _encodable(row: tuple[Any, ...]) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False


# ----------------------------------------------------------------------------------------------
# Mixing: a source may be sampled, to a row count (``#rows=N``) or to a share of the sampled
# sources together (``#weight=W``). Sampling is seeded (``seed``): a row's key is a hash of the
# seed, its file and position and its content, and a source keeps its rows with the smallest keys.
# Rows keep their split (a hash of their text), so sampling never moves a row across the boundary.

MIX_KEYS = ("rows", "weight")


@dataclass
class MixEntry:
    """One entry of collect.sources: its URI, its sampling and, once read, what it contributed."""

    spec: str
    uri: str
    rows: int | None = None
    weight: float | None = None
    files: list[SourceFile] = field(default_factory=list)
    keys: Any = None  # numpy uint64, one per staged row
    keep: int = 0
    staged: list[Path] = field(default_factory=list)
    cut: int | None = None  # keep rows whose key is below this; None: every row

    @property
    def samples(self) -> bool:
        return self.rows is not None or self.weight is not None

    @classmethod
    def parse(cls, spec: str, index: int) -> MixEntry:
        uri, _, fragment = spec.partition("#")
        entry = cls(spec, uri if fragment else spec)
        if not fragment:
            return entry
        where = f"collect.sources[{index}] {spec!r}"
        for part in fragment.split("&"):
            key, _, value = part.partition("=")
            if key not in MIX_KEYS:
                raise ConfigError(f"{where}: unknown '#{key}'; a source may end in #rows=N (keep N rows) or "
                                  "#weight=W (its share among the weighted sources)")
            try:
                number = int(value) if key == "rows" else float(value)
            except ValueError:
                raise ConfigError(f"{where}: #{key}={value!r} is not a number") from None
            if not number > 0 or number != number or number == float("inf"):
                raise ConfigError(f"{where}: #{key} must be above 0, got {value}")
            setattr(entry, key, number)
        if entry.rows is not None and entry.weight is not None:
            raise ConfigError(f"{where}: give #rows or #weight, not both")
        return entry

    def stage(self, cfg: PipelineConfig, tmp: Path) -> None:
        """Read every file of the source into staging files, noting each row's sampling key."""
        import numpy as np

        keys: list[Any] = []
        for number, source in enumerate(self.files):
            columns = snapshot_columns(cfg.task, cfg.collect.extra_columns)
            staging = _Staging(tmp / f"mix-{id(self)}-{number}.parquet", columns, cfg.seed, source.uri)
            try:
                read_source(cfg, source, staging, None, tmp)
            finally:
                staging.close()
            keys.append(np.asarray(staging.keys, dtype=np.uint64))
            self.staged.append(staging.path)
        self.keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)

    def replay(self, writer: SnapshotWriter, tally: Tally) -> None:
        """The staged rows whose keys fall below the cut, in their original order."""
        import numpy as np
        import pyarrow.parquet as pq

        offset = 0
        for path in self.staged:
            table = pq.read_table(path)
            keys = self.keys[offset:offset + len(table)]
            mask = [True] * len(table) if self.cut is None else (keys < np.uint64(self.cut)).tolist()
            offset += len(table)
            values = {c: [v for v, k in zip(table.column(c).to_pylist(), mask) if k] for c in writer.columns}
            if values[writer.columns[0]]:
                writer.add(values)
                tally.add(values)
            path.unlink()

    def manifest_entry(self) -> dict[str, Any]:
        return {"source": self.spec, "rows_read": sum(f.rows for f in self.files),
                "rows_kept": self.keep if self.samples else sum(f.rows for f in self.files),
                "rows": self.rows, "weight": self.weight}


class _Staging:
    """A sampled source's rows, written as they are parsed, each with its sampling key."""

    def __init__(self, path: Path, columns: tuple[str, ...], seed: int, uri: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.columns, self.prefix = path, columns, f"{seed}\0{uri}\0".encode()
        self.schema = pa.schema([(c, pa.string()) for c in columns])
        self._writer = pq.ParquetWriter(path, self.schema)
        self.keys: list[int] = []

    def add(self, values: dict[str, list[Any]]) -> None:
        import pyarrow as pa

        for row in zip(*(values[c] for c in self.columns)):
            content = json.dumps([len(self.keys), *row], ensure_ascii=False).encode("utf-8", "surrogatepass")
            self.keys.append(int.from_bytes(hashlib.blake2b(self.prefix + content, digest_size=8).digest(), "big"))
        self._writer.write_table(pa.table({c: pa.array(values[c], pa.string()) for c in self.columns}, self.schema))

    def close(self) -> None:
        self._writer.close()


def plan_mix(entries: list[MixEntry]) -> None:
    """How many rows each sampled source keeps, and the key below which they are. ``#rows=N``:
    N, or all when the source has fewer. ``#weight``: shares of the largest mix the weighted
    sources can fill without repeating a row (a source short of its share sets the total)."""
    import numpy as np

    weighted = [e for e in entries if e.weight is not None]
    total_weight = sum(e.weight for e in weighted)
    if weighted:
        fill = min(len(e.keys) / (e.weight / total_weight) for e in weighted)
        for entry in weighted:
            entry.keep = min(len(entry.keys), int(round(fill * entry.weight / total_weight)))
    for entry in entries:
        if entry.rows is not None:
            entry.keep = min(len(entry.keys), entry.rows)
        if entry.keep < len(entry.keys):
            entry.cut = int(np.partition(entry.keys, entry.keep)[entry.keep])
        print(f"collect: {entry.spec}: keeps {entry.keep} of {len(entry.keys)} rows", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The step: read every source into the writer, then publish the snapshot


@dataclass
class Tally:
    """What the manifest and the result say about the rows besides their count."""

    rows_eval: int = 0
    labels: set[str] = field(default_factory=set)

    def add(self, values: dict[str, list[Any]]) -> None:
        self.rows_eval += values["split"].count("eval")
        self.labels.update(v for v in values.get("label", ()) if v is not None)


def run(cfg: PipelineConfig) -> CollectResult:
    own = cfg.collect
    entries = [MixEntry.parse(source, i) for i, source in enumerate(own.sources)]
    for entry in entries:
        entry.files = _expand(entry.uri, own.allowed_hosts)
        for source in entry.files:
            _format_of(source.uri)  # an unknown format fails now, not after reading the other sources
    sources = [file for entry in entries for file in entry.files]
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="finetune-collect-") as tmp_name:
        tmp = Path(tmp_name)
        writer = SnapshotWriter(tmp / "data.parquet", snapshot_columns(cfg.task, own.extra_columns), own.row_group_rows)
        try:
            mixed = [entry for entry in entries if entry.samples]
            for entry in mixed:  # first pass: every row of a sampled source, with its sampling key
                entry.stage(cfg, tmp)
            plan_mix(mixed)
            for entry in entries:
                if entry.samples:
                    entry.replay(writer, tally)
                else:
                    for source in entry.files:
                        read_source(cfg, source, writer, tally, tmp)
            sha = writer.finish()
        finally:
            writer.close()
        snapshot_uri, manifest_uri = publish_snapshot(cfg, writer, sha, sources, tally,
                                                      [e.manifest_entry() for e in entries] if mixed else None)
    return CollectResult(result_uri=storage.join(cfg.step_uri("collect"), "result.json"), snapshot_uri=snapshot_uri,
                         manifest_uri=manifest_uri, sha256=sha, rows=writer.rows,
                         rows_train=writer.rows - tally.rows_eval, rows_eval=tally.rows_eval,
                         labels=sorted(tally.labels))


def read_source(cfg: PipelineConfig, source: SourceFile, writer: Any, tally: Tally | None, tmp: Path) -> None:
    """Parse one source file chunk by chunk into snapshot rows and hand them to ``writer`` (the
    snapshot's, or a sampled source's staging file)."""
    own = cfg.collect
    if cfg.task == "causal-lm":
        to_rows, fields = _chat_rows, CHAT_FIELDS
    else:
        to_rows, fields = _classification_rows, (own.text_column, own.label_column)
    fields = tuple(dict.fromkeys((*fields, *own.extra_columns)))
    with _local_copy(source, tmp, own.allowed_hosts) as path, \
            open_source(path, source.uri, fields, min(own.row_group_rows, READ_ROWS), tmp) as parsed:
        if parsed.columns_complete:  # fail before reading rows when the header says so
            _check_columns(cfg.task, source.uri, parsed.columns, own)
        for chunk in parsed.chunks:
            values = {**to_rows(chunk, source.uri, own), **_extra_values(chunk, own)}
            try:
                writer.add(values)
            except UnencodableRow as exc:
                raise DataError(f"{source.uri}: {chunk.where(exc.index)}: a value is not valid Unicode "
                                "(an unpaired surrogate such as \\ud800)") from None
            source.rows += len(chunk)
            if tally is not None:
                tally.add(values)
        _check_columns(cfg.task, source.uri, parsed.columns, own)
        if not source.rows:
            raise DataError(f"{source.uri}: has a header but no rows")
    print(f"collect: {source.uri}: {source.rows} rows", file=sys.stderr)


def publish_snapshot(cfg: PipelineConfig, writer: SnapshotWriter, sha: str, sources: list[SourceFile],
                     tally: Tally, mix: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    """Publish the finished file at ``<artifact_root>/snapshots/<sha256>/``, the manifest last;
    content-addressed, so unchanged data is not rewritten. The snapshot's and manifest's URIs."""
    snapshot_dir = storage.join(cfg.artifact_root, "snapshots", sha)
    snapshot_uri = storage.join(snapshot_dir, "data.parquet")
    manifest_uri = storage.join(snapshot_dir, "manifest.json")
    if not storage.exists(manifest_uri):
        storage.put_file(writer.path, snapshot_uri)
        storage.write_json(manifest_uri, {
            "sha256": sha, "task": cfg.task, "rows": writer.rows, "rows_eval": tally.rows_eval,
            "row_groups": writer.row_groups, "sources": [s.manifest_entry() for s in sources],
            "labels": sorted(tally.labels), "schema": {f.name: str(f.type) for f in writer.schema},
            "eval_fraction": cfg.collect.eval_fraction, "created_at": datetime.now(timezone.utc).isoformat(),
            **({"mix": {"seed": cfg.seed, "sources": mix}} if mix else {}),
        })  # written last: a snapshot without its manifest is not published
    return snapshot_uri, manifest_uri
