"""Reading a published snapshot: the Parquet file ``collect`` writes, wherever it lives.

    python -c "from pipeline.snapshot import load_snapshot; print(load_snapshot('file:///.../data.parquet'))"

pandas is imported inside ``load_snapshot``: the module is on the DAG-parse path through the steps.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import storage

if TYPE_CHECKING:
    import pandas as pd


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
