"""Formats: one source file (JSONL, CSV or Parquet, each optionally gzipped) parsed as a stream of
chunks of records, with errors that name the file and the row, line or byte.

    python -c "from pipeline.collect import formats; print(formats.format_of('data.csv.gz'))"

pandas and pyarrow are imported inside the functions that parse CSV and Parquet.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError

FORMATS = ("jsonl", "csv", "parquet")
READ_BYTES = 1 << 20  # bytes per read from a source stream
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)  # truncated, corrupt, not gzip at all


def format_of(uri: str) -> tuple[str, bool]:
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
        self._raw: BinaryIO | gzip.GzipFile = gzip.GzipFile(fileobj=self._file) if compressed else self._file
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
            line = self._newlines + seen[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{self._uri}: not valid UTF-8 at byte {self._offset - len(pending) + exc.start} (line {line})"
            ) from exc
        self._offset += len(data)
        self._newlines += data.count(b"\n")
        buffer[: len(data)] = data
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
    fmt, compressed = format_of(uri)
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


def _jsonl_chunks(
    stream: BinaryIO, uri: str, fields: tuple[str, ...], chunk_rows: int, found: set[str]
) -> Iterator[Chunk]:
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


def _csv_source(
    path: Path, uri: str, fields: tuple[str, ...], chunk_rows: int, compressed: bool, stack: contextlib.ExitStack
) -> Parsed:
    import pandas as pd

    stream = stack.enter_context(io.BufferedReader(CheckedStream(path, uri, compressed), READ_BYTES))
    try:
        # Every value as text (a label '007' stays '007'); an empty cell is null, for validate.
        # The C parser handles BOM, CRLF and quoted newlines, reading the stream a block at a time.
        reader = stack.enter_context(
            pd.read_csv(
                stream, dtype=str, keep_default_na=False, na_values=[""], chunksize=chunk_rows, encoding="utf-8-sig"
            )
        )
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
            yield Chunk(
                {
                    f: [v if isinstance(v, str) else None for v in frame[f]] if f in frame else [None] * len(frame)
                    for f in fields
                },
                rows,
            )
            rows += len(frame)

    return Parsed(set(first.columns), True, chunks())


def _parquet_source(
    path: Path,
    uri: str,
    fields: tuple[str, ...],
    chunk_rows: int,
    compressed: bool,
    tmp: Path,
    stack: contextlib.ExitStack,
) -> Parsed:
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
                yield Chunk(
                    {f: batch.column(f).to_pylist() if f in columns else [None] * batch.num_rows for f in fields}, rows
                )
                rows += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{uri}: cannot read Parquet data after row {rows} ({exc})") from exc

    return Parsed(columns, True, chunks())
