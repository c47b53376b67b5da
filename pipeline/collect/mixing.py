"""Mixing: a source may be sampled, to a row count (``#rows=N``) or to a share of the sampled
sources together (``#weight=W``). Sampling is seeded (``seed``): a row's key is a hash of the
seed, its file and position and its content, and a source keeps its rows with the smallest keys.
Rows keep their split (a hash of their text), so sampling never moves a row across the boundary.

    finetune collect --set 'collect.sources=[pipeline/data/support_intents.jsonl#rows=50]'

numpy and pyarrow are imported inside the functions that stage, plan and replay.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.collect.sources import SourceFile
from pipeline.collect.writer import RowFile, SnapshotWriter, Tally
from pipeline.errors import ConfigError

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
                raise ConfigError(
                    f"{where}: unknown '#{key}'; a source may end in #rows=N (keep N rows) or "
                    "#weight=W (its share among the weighted sources)"
                )
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

    def stage(
        self, read: Callable[[SourceFile, _Staging], None], columns: tuple[str, ...], seed: int, tmp: Path
    ) -> None:
        """Read every file of the source into staging files, noting each row's sampling key;
        ``read`` parses one file into the staging file it is given."""
        import numpy as np

        keys: list[Any] = []
        for number, source in enumerate(self.files):
            staging = _Staging(tmp / f"mix-{id(self)}-{number}.parquet", columns, seed, source.uri)
            try:
                read(source, staging)
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
            keys = self.keys[offset : offset + len(table)]
            mask = [True] * len(table) if self.cut is None else (keys < np.uint64(self.cut)).tolist()
            offset += len(table)
            values = {c: [v for v, k in zip(table.column(c).to_pylist(), mask) if k] for c in writer.columns}
            if values[writer.columns[0]]:
                writer.add(values)
                tally.add(values)
            path.unlink()

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "source": self.spec,
            "rows_read": sum(f.rows for f in self.files),
            "rows_kept": self.keep if self.samples else sum(f.rows for f in self.files),
            "rows": self.rows,
            "weight": self.weight,
        }


class _Staging:
    """A sampled source's rows, written as they are parsed, each with its sampling key."""

    def __init__(self, path: Path, columns: tuple[str, ...], seed: int, uri: str) -> None:
        self.path, self.columns, self.prefix = path, columns, f"{seed}\0{uri}\0".encode()
        self._file = RowFile(path, columns)
        self.keys: list[int] = []

    def add(self, values: dict[str, Any]) -> None:
        table = self._file.table(values)
        for row in zip(*(table.column(c).to_pylist() for c in self.columns)):
            content = json.dumps([len(self.keys), *row], ensure_ascii=False).encode("utf-8", "surrogatepass")
            self.keys.append(int.from_bytes(hashlib.blake2b(self.prefix + content, digest_size=8).digest(), "big"))
        self._file.write(table)

    def close(self) -> None:
        self._file.close()


def plan_mix(entries: list[MixEntry]) -> None:
    """How many rows each sampled source keeps, and the key below which they are. ``#rows=N``:
    N, or all when the source has fewer. ``#weight``: shares of the largest mix the weighted
    sources can fill without repeating a row (a source short of its share sets the total)."""
    import numpy as np

    weights = {id(e): e.weight for e in entries if e.weight is not None}
    weighted = [e for e in entries if id(e) in weights]
    total_weight = sum(weights.values())
    if weighted:
        fill = min(len(e.keys) / (weights[id(e)] / total_weight) for e in weighted)
        for entry in weighted:
            entry.keep = min(len(entry.keys), int(round(fill * weights[id(entry)] / total_weight)))
    for entry in entries:
        if entry.rows is not None:
            entry.keep = min(len(entry.keys), entry.rows)
        if entry.keep < len(entry.keys):
            entry.cut = int(np.partition(entry.keys, entry.keep)[entry.keep])
        print(f"collect: {entry.spec}: keeps {entry.keep} of {len(entry.keys)} rows", file=sys.stderr)
