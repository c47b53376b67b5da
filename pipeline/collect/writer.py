"""The snapshot writer: rows to a local Parquet file in fixed row groups, hashed as they pass.

``RowFile`` is the one place the snapshot's Arrow schema (every column a string) and the tables
written in it are built; the snapshot and a sampled source's staging file both write through it.

    python -c "from pathlib import Path; from pipeline.collect.writer import SnapshotWriter; w = SnapshotWriter(Path('/tmp/s.parquet'), ('text', 'split'), 2); w.add({'text': ['hi'], 'split': ['train']}); print(w.finish())"

pyarrow is imported inside the functions that write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        self._writer: Any = pq.ParquetWriter(path, self.schema)

    def table(self, values: dict[str, list[Any]]) -> Any:
        """The rows ``values`` (one list per column) as an Arrow table in the file's schema."""
        import pyarrow as pa

        return pa.table({c: pa.array(values[c], pa.string()) for c in self.columns}, self.schema)

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
    _digest: Any = field(default_factory=hashlib.sha256)
    _pending: list[Any] = field(default_factory=list)
    _pending_rows: int = 0
    _file: Any = None

    def __post_init__(self) -> None:
        self._file = RowFile(self.path, self.columns)
        self.schema = self._file.schema

    def add(self, values: dict[str, list[Any]]) -> None:
        rows = list(zip(*(values[c] for c in self.columns)))
        # One JSON array per row: the encoding snapshots have always been hashed with.
        try:
            self._digest.update("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        except UnicodeEncodeError:
            raise UnencodableRow(next(i for i, row in enumerate(rows) if not _encodable(row))) from None
        self._pending.append(self._file.table(values))
        self._pending_rows += len(rows)
        self.rows += len(rows)
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
        """Close the file; the sha256 of the rows."""
        if self._pending_rows:
            self._flush(final=True)
        self.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _encodable(row: tuple[Any, ...]) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class Tally:
    """What the manifest and the result say about the rows besides their count."""

    rows_eval: int = 0
    labels: set[str] = field(default_factory=set)

    def add(self, values: dict[str, list[Any]]) -> None:
        self.rows_eval += values["split"].count("eval")
        self.labels.update(v for v in values.get("label", ()) if v is not None)
