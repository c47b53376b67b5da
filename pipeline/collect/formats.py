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
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError

FORMATS = ("jsonl", "csv", "parquet")
READ_BYTES = 1 << 20  # bytes per read from a source stream
COLUMNAR_BLOCK_BYTES = 1 << 20  # bytes per block of pyarrow's JSON reader; a longer line reads row by row
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
    """A batch of records of one file, as one list of values (or one Arrow array) per field."""

    values: dict[str, Any]
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

    def __init__(
        self, path: Path, uri: str, compressed: bool, limits: Limits, breaks: bytes = b"\n", count: bool = False
    ) -> None:
        self._file = path.open("rb")
        self._raw: BinaryIO | BoundedGzip = BoundedGzip(self._file, uri, limits) if compressed else self._file
        self._uri = uri
        self._pending = b""  # the start of a character split across reads
        self._offset = 0
        self._newlines = 0
        self._record_bytes = limits.record_bytes
        self._carriage = b"\r" in breaks
        self._line = 0  # bytes of the line being read so far
        self._count = count
        self.records = 0  # with ``count``: lines holding more than whitespace, once the stream has ended
        self._content = False  # whether the line being read holds more than whitespace so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        self._check_utf8(data)
        self._check_lines(data)
        if self._count:
            self._count_records(data)
        self._offset += len(data)
        self._newlines += data.count(b"\n")
        buffer[: len(data)] = data
        return len(data)

    def _check_utf8(self, data: bytes) -> None:
        """Arrow's UTF-8 check of the whole characters read so far (a character split across reads
        waits for its end); where it fails, Python's decoder finds the byte and the line."""
        import pyarrow as pa

        pending = self._pending
        whole = pending + data if pending else data
        cut = _complete(whole) if data else len(whole)
        try:
            if cut:
                chars = memoryview(whole)[:cut]
                pa.Array.from_buffers(pa.binary(), 1, [None, _offsets(cut), pa.py_buffer(chars)]).cast(pa.string())
        except pa.ArrowInvalid:
            pass
        else:
            if data or not whole:
                self._pending = whole[cut:]
                return
        try:
            codecs.getincrementaldecoder("utf-8")().decode(whole, final=not data)
        except UnicodeDecodeError as exc:
            line = self._newlines + whole[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{self._uri}: not valid UTF-8 at byte {self._offset - len(pending) + exc.start} (line {line})"
            ) from exc
        self._pending = whole[cut:]

    def _count_records(self, data: bytes) -> None:
        """Count the lines that hold more than whitespace (``bytes.strip``'s): the records the
        row-by-row JSONL reader would parse, which pyarrow's reader must match (it also reads two
        objects on one line, or one across two). A line's first byte decides, but for the rare
        line that starts with whitespace. A record that does not start with ``{`` stops pyarrow's
        reader before it parses it (NotAnObject): pyarrow reads a ``null`` line as a row of nulls,
        and a file of ``null`` alone crashes it."""
        import numpy as np

        if not data:
            self.records += self._content
            self._content = False
            return
        if self._offset == 0 and data.startswith(codecs.BOM_UTF8):
            data = b" " * len(codecs.BOM_UTF8) + data[len(codecs.BOM_UTF8) :]  # the reader drops a BOM
        breaks = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
        head = data[: breaks[0]] if len(breaks) else data
        if not self._content:
            self._content = _opens(head)
        if not len(breaks):
            return
        self.records += self._content
        starts, ends = breaks[:-1] + 1, breaks[1:]
        filled = starts < ends
        starts, ends = starts[filled], ends[filled]
        firsts = np.frombuffer(data, np.uint8)[starts]
        plain = ~np.isin(firsts, WHITESPACE_BYTES)
        if (firsts[plain] != ord("{")).any():
            raise NotAnObject()
        self.records += int(plain.sum())
        for start, end in zip(starts[~plain].tolist(), ends[~plain].tolist()):
            self.records += _opens(data[start:end])
        self._content = _opens(data[int(breaks[-1]) + 1 :])

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


WHITESPACE_BYTES = list(b" \t\r\x0b\x0c")  # bytes.strip()'s whitespace, but for the newline


class NotAnObject(Exception):
    """A JSONL line that does not start with an object: the row-by-row reader names it."""


def _opens(piece: bytes) -> bool:
    """Whether a piece of a line holds more than whitespace; NotAnObject if that is not an object's ``{``."""
    content = piece.lstrip(b" \t\r\x0b\x0c")
    if content and content[:1] != b"{":
        raise NotAnObject()
    return bool(content)


def _complete(data: bytes) -> int:
    """How many bytes of ``data`` are whole UTF-8 characters: all but a last one still missing bytes."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            needs = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2 if byte >= 0xC0 else 1
            return len(data) - back if needs > back else len(data)
    return len(data)


def _offsets(size: int) -> Any:
    """The offsets buffer of a one-value Arrow binary array of ``size`` bytes."""
    import pyarrow as pa

    return pa.py_buffer(bytes(4) + size.to_bytes(4, "little", signed=True))


@contextlib.contextmanager
def read_ahead(chunks: Iterator[Chunk], depth: int = 2) -> Iterator[Iterator[Chunk]]:
    """``chunks`` parsed by a thread of their own, up to ``depth`` ahead of the caller, so the
    parser (pyarrow's, which lets go of the GIL) works while the caller builds and writes rows.
    The chunks come in their order; a parse error is raised to the caller where that chunk would
    have come; leaving stops the thread before the file is closed."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def hand(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def parse() -> None:
        try:
            for chunk in chunks:
                if not hand(("chunk", chunk)):
                    return
            hand(("end", None))
        except BaseException as exc:  # handed on, raised in the caller's thread
            hand(("error", exc))

    def given() -> Iterator[Chunk]:
        while True:
            kind, item = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item

    thread = threading.Thread(target=parse, name="collect-parse", daemon=True)
    thread.start()
    try:
        yield given()
    finally:
        stop.set()
        thread.join()


@dataclass
class Parsed:
    """An open source file: the columns it has and its chunks with just the fields asked for."""

    columns: set[str]  # CSV and Parquet: known up front; JSONL: filled in as records are read
    columns_complete: bool
    chunks: Iterator[Chunk]


@contextlib.contextmanager
def open_source(
    path: Path, uri: str, fields: tuple[str, ...], chunk_rows: int, tmp: Path, limits: Limits, columnar: bool = False
) -> Iterator[Parsed]:
    """Parse one file as a stream of chunks of ``chunk_rows`` records; a field a record lacks
    reads as None. A record, or a .gz's output, past ``limits`` is refused. Everything the file
    opened is closed on leaving, on error too. With ``columnar``, JSONL whose fields are all
    strings (or null) comes as Arrow string arrays from pyarrow's reader; CSV and Parquet's string
    columns come as Arrow arrays either way."""
    fmt, compressed = format_of(uri)
    if path.stat().st_size == 0:
        raise DataError(f"{uri}: file is empty")
    with contextlib.ExitStack() as stack:
        if fmt == "parquet":
            yield _parquet_source(path, uri, fields, chunk_rows, compressed, tmp, stack, limits)
        elif fmt == "csv":
            yield _csv_source(path, uri, fields, chunk_rows, compressed, stack, limits)
        else:
            opened: list[CheckedStream] = []

            def stream(count: bool = False) -> BinaryIO:
                opened.append(CheckedStream(path, uri, compressed, limits, count=count))
                return stack.enter_context(io.BufferedReader(opened[-1], READ_BYTES))

            found: set[str] = set()
            if columnar:
                yield Parsed(found, False, _jsonl_columnar(stream, opened, uri, fields, chunk_rows, found))
            else:
                yield Parsed(found, False, _jsonl_chunks(stream(), uri, fields, chunk_rows, found))


def _jsonl_columnar(
    stream: Any, opened: list[CheckedStream], uri: str, fields: tuple[str, ...], chunk_rows: int, found: set[str]
) -> Iterator[Chunk]:
    """JSONL through pyarrow's reader, a block at a time, every field read as a string. Where it
    stops (a value that is not a string: a number, an object; JSON it refuses; a line longer than
    a block; a field no record gives a value), or where its rows are not the file's lines that
    hold more than whitespace (two objects on one line, one across lines), the row-by-row reader reads the file again from the
    start, passing over the rows already given (which it would have given alike), and either
    names the exact row, line or byte at fault or gives the rest."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema([(f, pa.string()) for f in fields])
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False)
    rows = 0
    try:
        reader = pj.open_json(
            stream(count=True), read_options=pj.ReadOptions(block_size=COLUMNAR_BLOCK_BYTES), parse_options=options
        )
        for batch in reader:
            if batch.num_rows:
                found.update(f for f in fields if batch.column(f).null_count < batch.num_rows)
                yield Chunk({f: batch.column(f) for f in fields}, rows)
                rows += batch.num_rows
    except (pa.ArrowException, NotAnObject):
        pass
    else:
        if rows and found >= set(fields) and rows == opened[-1].records:
            return
    found.clear()
    yield from _jsonl_chunks(stream(), uri, fields, chunk_rows, found, skip=rows)


def _jsonl_chunks(
    stream: BinaryIO, uri: str, fields: tuple[str, ...], chunk_rows: int, found: set[str], skip: int = 0
) -> Iterator[Chunk]:
    """Records in batches of lines, each remembering its line number for errors; the first
    ``skip`` records are read and checked but not given."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    rows, seen = skip, 0
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
        if seen < skip:
            seen += 1
            continue
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
    import pyarrow as pa

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
                    f: pa.Array.from_pandas(frame[f], type=pa.string())
                    if f in frame
                    else pa.nulls(len(frame), pa.string())
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
                yield Chunk({f: _parquet_values(batch, f, columns) for f in fields}, rows)
                rows += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{uri}: cannot read Parquet data after row {rows} ({exc})") from exc

    return Parsed(columns, True, chunks())


def _parquet_values(batch: Any, field: str, columns: set[str]) -> Any:
    """A Parquet column as an Arrow string array when it holds text, else as Python values (which
    the rows check and convert); a column the file lacks as nulls."""
    import pyarrow as pa

    if field not in columns:
        return pa.nulls(batch.num_rows, pa.string())
    column = batch.column(field)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    return column.to_pylist()


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
