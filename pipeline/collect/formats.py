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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError

FORMATS = ("jsonl", "csv", "parquet")
READ_BYTES = 1 << 20  # bytes per read from a source stream
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)  # truncated, corrupt, not gzip at all
RATIO_FROM_BYTES = 8 << 20  # a compression ratio is judged from this much output on: a small file's says little


@dataclass(frozen=True)
class Limits:
    """What one source may cost (``collect.max_record_bytes``, ``max_decompressed_bytes``,
    ``max_compression_ratio``): past any of them it is refused by name, never read on."""

    record_bytes: int = 16 << 20
    decompressed_bytes: int = 10 << 30
    compression_ratio: float = 200.0


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


class BoundedGzip:
    """gzip decompression that refuses a bomb: more than ``limits.decompressed_bytes`` out, or more
    than ``limits.compression_ratio`` times the compressed bytes read so far. Each read is checked
    before its bytes are handed on, so no caller ever holds or writes more than the limit."""

    def __init__(self, file: BinaryIO, uri: str, limits: Limits) -> None:
        self._file = file
        self._gzip = gzip.GzipFile(fileobj=file)
        self._uri = uri
        self._limits = limits
        self._out = 0

    def read(self, size: int) -> bytes:
        try:
            data = self._gzip.read(size)
        except GZIP_ERRORS as exc:
            raise DataError(f"{self._uri}: cannot decompress gzip data ({exc})") from exc
        self._out += len(data)
        read_in = self._file.tell()
        limit, ratio = self._limits.decompressed_bytes, self._limits.compression_ratio
        if self._out > limit:
            raise DataError(
                f"{self._uri}: decompresses to more than {limit} bytes (collect.max_decompressed_bytes); "
                f"refused after reading {read_in} compressed bytes"
            )
        if self._out >= RATIO_FROM_BYTES and self._out > ratio * read_in:
            raise DataError(
                f"{self._uri}: decompresses to more than {ratio:g} times its size (collect.max_compression_ratio): "
                f"{self._out} bytes from the first {read_in} compressed bytes"
            )
        return data

    def close(self) -> None:
        self._gzip.close()


class CheckedStream(io.RawIOBase):
    """Decompresses (gzip, within ``limits``) and checks UTF-8 and line lengths as bytes pass
    through, unchanged, to a parser.

    Errors name the file and say where: a truncated gzip, the byte offset and line of the first
    byte that is not UTF-8 (offsets count decompressed bytes), or the first line longer than
    ``limits.record_bytes``, refused as soon as that many bytes of it are read. A line ends at
    ``breaks``: a newline, or for CSV a carriage return too (pandas ends a record at either).
    """

    def __init__(self, path: Path, uri: str, compressed: bool, limits: Limits, breaks: bytes = b"\n") -> None:
        self._file = path.open("rb")
        self._raw: BinaryIO | BoundedGzip = BoundedGzip(self._file, uri, limits) if compressed else self._file
        self._uri = uri
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0
        self._newlines = 0
        self._record_bytes = limits.record_bytes
        self._carriage = b"\r" in breaks
        self._line = 0  # bytes of the line being read so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        pending = self._decoder.getstate()[0]  # the start of a character split across reads
        try:
            self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            seen = pending + data
            line = self._newlines + seen[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{self._uri}: not valid UTF-8 at byte {self._offset - len(pending) + exc.start} (line {line})"
            ) from exc
        self._check_lines(data)
        self._offset += len(data)
        self._newlines += data.count(b"\n")
        buffer[: len(data)] = data
        return len(data)

    def _check_lines(self, data: bytes) -> None:
        """Refuse a line longer than the limit, counting across reads; a parser never gathers it."""
        limit = self._record_bytes
        text = data.replace(b"\r", b"\n") if self._carriage else data  # same length, same offsets
        first, last = text.find(b"\n"), text.rfind(b"\n")
        if first < 0:
            self._line += len(text)
            if self._line > limit:
                self._too_long(0)
            return
        if self._line + first > limit:
            self._too_long(0)
        if last - first - 1 > limit:  # a whole line between two breaks in this read may be too long
            lengths = list(map(len, text[first + 1 : last].split(b"\n")))
            longest = max(lengths)
            if longest > limit:
                index = lengths.index(longest)
                self._too_long(data.count(b"\n", 0, first + 1 + sum(lengths[:index]) + index))
        self._line = len(text) - last - 1
        if self._line > limit:
            self._too_long(data.count(b"\n"))

    def _too_long(self, newlines_before: int) -> None:
        line = self._newlines + newlines_before + 1
        raise DataError(
            f"{self._uri}: line {line} is longer than collect.max_record_bytes ({self._record_bytes} bytes); "
            "no record may be that long"
        )

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
def open_source(
    path: Path, uri: str, fields: tuple[str, ...], chunk_rows: int, tmp: Path, limits: Limits
) -> Iterator[Parsed]:
    """Parse one file as a stream of chunks of ``chunk_rows`` records; a field a record lacks
    reads as None. A record, or a .gz's output, past ``limits`` is refused. Everything the file
    opened is closed on leaving, on error too."""
    fmt, compressed = format_of(uri)
    if path.stat().st_size == 0:
        raise DataError(f"{uri}: file is empty")
    with contextlib.ExitStack() as stack:
        if fmt == "parquet":
            yield _parquet_source(path, uri, fields, chunk_rows, compressed, tmp, stack, limits)
        elif fmt == "csv":
            yield _csv_source(path, uri, fields, chunk_rows, compressed, stack, limits)
        else:
            checked = CheckedStream(path, uri, compressed, limits)
            stream = stack.enter_context(io.BufferedReader(checked, READ_BYTES))
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
    path: Path,
    uri: str,
    fields: tuple[str, ...],
    chunk_rows: int,
    compressed: bool,
    stack: contextlib.ExitStack,
    limits: Limits,
) -> Parsed:
    import pandas as pd

    checked = CheckedStream(path, uri, compressed, limits, breaks=b"\n\r")
    stream = stack.enter_context(io.BufferedReader(checked, READ_BYTES))
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
            _check_csv_records(frame, uri, rows, limits.record_bytes)
            yield Chunk(
                {
                    f: [v if isinstance(v, str) else None for v in frame[f]] if f in frame else [None] * len(frame)
                    for f in fields
                },
                rows,
            )
            rows += len(frame)

    return Parsed(set(first.columns), True, chunks())


def _check_csv_records(frame: Any, uri: str, rows: int, limit: int) -> None:
    """A record whose quoted fields span lines passes the line check: measure its values' bytes.
    Characters first (a UTF-8 character is 1 to 4 bytes), so only a long row is encoded."""
    chars = frame.apply(lambda column: column.str.len()).fillna(0).sum(axis=1).to_numpy()
    for index in (chars * 4 > limit).nonzero()[0]:
        values = frame.iloc[int(index)]
        if sum(len(v.encode("utf-8", "surrogatepass")) for v in values if isinstance(v, str)) > limit:
            raise DataError(
                f"{uri}: row {rows + int(index) + 1} is longer than collect.max_record_bytes ({limit} bytes) "
                "in its values; no record may be that long"
            )


def _parquet_source(
    path: Path,
    uri: str,
    fields: tuple[str, ...],
    chunk_rows: int,
    compressed: bool,
    tmp: Path,
    stack: contextlib.ExitStack,
    limits: Limits,
) -> Parsed:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if compressed:  # Parquet needs random access: decompress to disk, never to memory
        plain = tmp / "source.parquet"
        stack.callback(plain.unlink, missing_ok=True)
        with path.open("rb") as file, contextlib.closing(BoundedGzip(file, uri, limits)) as packed:
            with plain.open("wb") as out:  # each block is checked against the limits before it is written
                while block := packed.read(READ_BYTES):
                    out.write(block)
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
                _check_parquet_rows(batch, uri, rows, limits.record_bytes)
                yield Chunk(
                    {f: batch.column(f).to_pylist() if f in columns else [None] * batch.num_rows for f in fields}, rows
                )
                rows += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{uri}: cannot read Parquet data after row {rows} ({exc})") from exc

    return Parsed(columns, True, chunks())


def _check_parquet_rows(batch: Any, uri: str, rows: int, limit: int) -> None:
    """Refuse a row whose selected columns hold more than ``limit`` bytes, from the Arrow batch,
    before any value becomes a Python object (which costs several times its bytes)."""
    import numpy as np

    sizes = sum((_arrow_row_bytes(column) for column in batch.columns), np.zeros(batch.num_rows, np.int64))
    over = np.flatnonzero(sizes > limit)
    if len(over):
        raise DataError(
            f"{uri}: row {rows + int(over[0]) + 1} is longer than collect.max_record_bytes ({limit} bytes) "
            f"in its columns {batch.schema.names}; no record may be that long"
        )


def _arrow_row_bytes(array: Any) -> Any:
    """The bytes each row of an Arrow array holds: text and binary by length, lists and structs
    as the sum of what they hold, anything else by its width."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        return _arrow_row_bytes(array.dictionary_decode())
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        held = np.concatenate(([0], np.cumsum(_arrow_row_bytes(array.flatten()))))
        lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        ends = np.cumsum(lengths)
        return held[ends] - held[ends - lengths]
    if pa.types.is_struct(kind):
        return sum((_arrow_row_bytes(field) for field in array.flatten()), np.zeros(len(array), np.int64))
    try:
        width = max(kind.bit_width // 8, 1)
    except ValueError:  # a type without a fixed width (a map, a union): its average
        width = array.nbytes // max(len(array), 1)
    return np.full(len(array), width, np.int64)
