"""Reading a published snapshot: the Parquet file ``collect`` writes, wherever it lives, and the
address scheme its manifest records.

A snapshot lives at ``snapshots/<address>/`` and its manifest's ``sha256`` is that address. How
the address and each row's split are computed is the snapshot's scheme (the manifest's
``scheme``; a manifest without one is scheme 1):

1. the sha256 of every row as a JSON array, a line each; the split from the sha256 of the
   text's normalised form (``pipeline.text.normalize_text``), a row at a time in Python.
2. the sha256 over the columns' Arrow buffers (``collect.writer.content_address``); the split
   from a 64-bit hash of the same normalised form, a column at a time (``collect.keys``).

collect writes scheme 2. A snapshot of scheme 1 stays where it is and reads as it always did
(the columns are the same); it is never rewritten. Collecting its rows again publishes a
scheme-2 snapshot beside it, under its own address, where some rows may sit in the other split.

    python -c "from pipeline.snapshot import load_snapshot; print(load_snapshot('file:///.../data.parquet'))"

pandas is imported inside ``load_snapshot``: the module is on the DAG-parse path through the steps.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline import storage

if TYPE_CHECKING:
    import pandas as pd


SCHEME = 2  # the scheme collect writes
SCHEME_NAME = f"finetune-snapshot/{SCHEME}"  # what a scheme-2 address hashes first


def scheme_of(manifest: Mapping[str, Any]) -> int:
    """The address scheme a snapshot's manifest records; 1 for a manifest from before schemes."""
    return int(manifest.get("scheme", 1))


def snapshot_columns(task: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The snapshot's columns, in the fixed order the content hash and the Parquet file use: the
    task's, then the source columns collect.extra_columns carries (evaluate slices on them)."""
    own = {"causal-lm": ("messages",), "preference": ("prompt", "chosen", "rejected")}.get(task, ("text", "label"))
    return (*own, *(c for c in extra if c not in (*own, "split")), "split")


def load_snapshot(snapshot_uri: str) -> pd.DataFrame:
    import pandas as pd

    path = storage.local_path(snapshot_uri)
    if path is not None:
        return pd.read_parquet(path)
    return pd.read_parquet(io.BytesIO(storage.read_bytes(snapshot_uri)))
