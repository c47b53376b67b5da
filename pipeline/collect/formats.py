"""Formats: one source file (JSONL, CSV or Parquet, each optionally gzipped) parsed as a stream of
chunks of records, with errors that name the file and the row, line or byte.

    python -c "from pipeline.collect import formats; print(formats.format_of('data.csv.gz'))"

pandas and pyarrow are imported inside the functions that parse CSV and Parquet.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.collect.streams import BoundedGzip, CheckedStream, Chunk, Limits, NotAnObject
from pipeline.errors import DataError

FORMATS = ("jsonl", "csv", "parquet")
READ_BYTES = 1 << 20  # bytes per read from a source stream
COLUMNAR_BLOCK_BYTES = 1 << 20  # bytes per block of pyarrow's JSON reader; a longer line reads row by row


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
