"""The snapshot writer: rows to a local Parquet file in fixed row groups, hashed as they pass,
a column at a time over the Arrow buffers (snapshot scheme 2, ``pipeline.snapshot``).

``RowFile`` is the one place the snapshot's Arrow schema (every column a string) and the tables
written in it are built; the snapshot and a sampled source's staging file both write through it.

    python -c "from pathlib import Path; from pipeline.collect.writer import SnapshotWriter; w = SnapshotWriter(Path('/tmp/s.parquet'), ('text', 'split'), 2); w.add({'text': ['hi'], 'split': ['train']}); print(w.finish())"

pyarrow is imported inside the functions that write.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.snapshot import SCHEME_NAME

FREE_TEXT = ("text", "messages", "prompt", "chosen", "rejected")  # the columns of free text, by task


class UnencodableRow(ValueError):
    """A string that UTF-8 cannot hold (an unpaired surrogate from a JSON escape)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class RowFile:
    """A local Parquet file of snapshot rows: every column a string, in the order ``columns``."""

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.columns = path, columns
        self.schema = pa.schema([(c, pa.string()) for c in columns])
        # Dictionary pages for the short repeated columns (label, split, channel, ...) only: free
        # text rarely repeats, and trying a dictionary for it first costs a third of the write.
        dictionary = [c for c in columns if c not in FREE_TEXT]
        self._writer: Any = pq.ParquetWriter(path, self.schema, use_dictionary=dictionary)  # type: ignore[arg-type]

    def table(self, values: dict[str, Any]) -> Any:
        """The rows ``values`` (one list or Arrow array per column) as an Arrow table in the file's
        schema. A string UTF-8 cannot hold raises UnencodableRow with its row."""
        import pyarrow as pa

        return pa.table({c: _string_array(values[c]) for c in self.columns}, self.schema)

    def write(self, table: Any, row_group_size: int | None = None) -> None:
        self._writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
    _pending: list[Any] = field(default_factory=list)
    _pending_rows: int = 0
    _file: Any = None

    def __post_init__(self) -> None:
        self._file = RowFile(self.path, self.columns)
        self.schema = self._file.schema
        self._digests = [ColumnDigest() for _ in self.columns]

    def add(self, values: dict[str, Any]) -> None:
        """Rows as one list or Arrow string array per column."""
        table = self._file.table(values)
        for name, digest in zip(self.columns, self._digests):
            digest.update(table.column(name))
        self._pending.append(table)
        self._pending_rows += len(table)
        self.rows += len(table)
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self._pending)
        whole = len(table) if final else len(table) - len(table) % self.row_group_rows
        for start in range(0, whole, self.row_group_rows):
            self._file.write(
                table.slice(start, min(self.row_group_rows, whole - start)), row_group_size=self.row_group_rows
            )
            self.row_groups += 1
        self._pending = [table.slice(whole)] if whole < len(table) else []
        self._pending_rows = len(table) - whole

    def finish(self) -> str:
        """Close the file; the content address of the rows (``content_address``)."""
        if self._pending_rows:
            self._flush(final=True)
        self.close()
        return content_address(self.columns, self._digests)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _string_array(values: Any) -> Any:
    """A column as one Arrow string array: an Arrow array as it is, a list converted."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == pa.string() else values.cast(pa.string())
    try:
        return pa.array(values, pa.string())
    except (UnicodeEncodeError, pa.ArrowInvalid, pa.ArrowTypeError):
        raise UnencodableRow(next(i for i, v in enumerate(values) if not _encodable(v))) from None


def _encodable(value: Any) -> bool:
    try:
        if isinstance(value, str):
            value.encode()
        return True
    except UnicodeEncodeError:
        return False


class ColumnDigest:
    """One column's bytes, hashed as they pass: its values' UTF-8 bytes end to end in one sha256,
    their lengths (int32 little-endian, -1 for a null) in another, so the digest is the same
    however the rows were batched."""

    def __init__(self) -> None:
        self.data = hashlib.sha256()
        self.lengths = hashlib.sha256()

    def update(self, column: Any) -> None:
        import numpy as np
        import pyarrow.compute as pc

        for array in column.chunks if hasattr(column, "chunks") else [column]:
            if not len(array):
                continue
            lengths = pc.binary_length(array).fill_null(-1).to_numpy(zero_copy_only=False)
            self.lengths.update(lengths.astype("<i4", copy=False).tobytes())
            offsets = np.frombuffer(array.buffers()[1], np.int32, len(array) + 1, array.offset * 4)
            data = array.buffers()[2]
            if data is not None and offsets[-1] > offsets[0]:
                self.data.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])


def content_address(columns: tuple[str, ...], digests: list[ColumnDigest]) -> str:
    """Snapshot scheme 2's address: the sha256 of the scheme's name and, per column in order, its
    name and its two digests. (Scheme 1 hashed every row as a JSON array, a line each.)"""
    whole = hashlib.sha256(f"{SCHEME_NAME}\n".encode())
    for name, digest in zip(columns, digests):
        whole.update(name.encode() + b"\0" + digest.lengths.digest() + digest.data.digest())
    return whole.hexdigest()


@dataclass
class Tally:
    """What the manifest and the result say about the rows besides their count."""

    rows_eval: int = 0
    labels: set[str] = field(default_factory=set)

    def add(self, values: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        splits = _string_array(values["split"])
        self.rows_eval += int(pc.sum(pc.equal(splits, pa.scalar("eval"))).as_py() or 0)
        if "label" in values:
            self.labels.update(v for v in pc.unique(_string_array(values["label"]).drop_null()).to_pylist())
