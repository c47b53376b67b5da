"""collect: read labelled text from local paths, file://, s3:// or https:// sources and publish a
content-addressed Parquet snapshot with a manifest.

Rows are normalised to ``text`` and ``label`` columns and given a ``split`` (``train`` or ``eval``)
by a stable hash of the normalised text, so the split never changes between runs and the same
text can never land in both splits.

    finetune collect --set collect.sources='[pipeline/data/support_intents.jsonl]'
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import sys
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.config import PipelineConfig, check_fields, option
from pipeline.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_SOURCE = "pkg://pipeline/data/support_intents.jsonl"
FORMATS = ("jsonl", "csv", "parquet")


@dataclass(frozen=True)
class CollectConfig:
    sources: list[str] = option(
        [DEFAULT_SOURCE],
        "Data sources: paths, globs, file://, s3://bucket/key-or-prefix, https:// (JSONL, CSV, Parquet; .gz ok).",
        min_items=1,
    )
    text_column: str = option("text", "Column holding the input text in the sources.")
    label_column: str = option("label", "Column holding the label in the sources.")
    eval_fraction: float = option(0.2, "Share of rows held out for evaluation, by text hash.",
                                  exclusive_minimum=0.0, maximum=0.5)

    def __post_init__(self) -> None:
        check_fields(self, "collect.")


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


def normalize_text(text: str) -> str:
    """The form used for hashing, splitting and duplicate detection."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def split_of(text: str, eval_fraction: float) -> str:
    digest = hashlib.sha256(normalize_text(text).encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def _expand(source: str) -> list[tuple[str, bytes]]:
    """(uri, raw bytes) for every file a source names."""
    kind = storage.scheme(source)
    if kind in ("http", "https"):
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                return [(source, response.read())]
        except OSError as exc:
            raise DataError(f"cannot download {source}: {exc}") from exc
    if kind == "s3":
        return _expand_s3(source)
    path = storage.local_path(source)
    matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
    files: list[Path] = []
    for match in map(Path, matches):
        files.extend(sorted(match.rglob("*")) if match.is_dir() else [match])
    files = [f for f in files if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise DataError(f"source {source} matches no files")
    return [(str(f), storage.read_bytes(str(f))) for f in files]


def _expand_s3(source: str) -> list[tuple[str, bytes]]:
    objects = [source] if storage.exists(source) else storage.list_objects(source)
    if not objects:
        raise DataError(f"source {source} matches no objects")
    return [(uri, storage.read_bytes(uri)) for uri in objects]


def _format_of(uri: str) -> tuple[str, bool]:
    name = uri.lower().split("?")[0]
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    for fmt, suffixes in (("jsonl", (".jsonl", ".json", ".ndjson")), ("csv", (".csv",)), ("parquet", (".parquet",))):
        if name.endswith(suffixes):
            return fmt, compressed
    raise DataError(f"{uri}: unknown format; expected one of {', '.join(FORMATS)} (optionally .gz)")


def read_table(uri: str, raw: bytes) -> pd.DataFrame:
    """Parse one file into a DataFrame; errors name the file (and line for JSONL)."""
    import pandas as pd

    fmt, compressed = _format_of(uri)
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{uri}: cannot decompress gzip data ({exc})") from exc
    if not raw.strip():
        raise DataError(f"{uri}: file is empty")
    if fmt == "parquet":
        return pd.read_parquet(io.BytesIO(raw))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri}: not valid UTF-8 at byte {exc.start}") from exc
    if fmt == "csv":
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{uri}: line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{uri}: line {number} is not a JSON object")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _normalise(frame: pd.DataFrame, uri: str, cfg: CollectConfig) -> pd.DataFrame:
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"{uri}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"{uri}: has a header but no rows")
    out = frame[[cfg.text_column, cfg.label_column]].rename(
        columns={cfg.text_column: "text", cfg.label_column: "label"})
    # Nulls stay nulls for the validate step to report. Text must already be text: a number or a
    # list there means the column is not what the file claims. Labels may be numbers (0/1 classes).
    wrong = [i for i, v in enumerate(out["text"]) if not (v is None or v != v or isinstance(v, str))]
    if wrong:
        value = out["text"].iloc[wrong[0]]
        raise DataError(f"{uri}: row {wrong[0] + 1}: '{cfg.text_column}' is {type(value).__name__} {value!r}, not "
                        f"a string ({len(wrong)} such row(s))")
    out["label"] = out["label"].map(lambda v: v if v is None or v != v or isinstance(v, str) else str(v))
    return out


def snapshot_hash(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    for text, label, split in frame[["text", "label", "split"]].itertuples(index=False):
        digest.update(json.dumps([text, label, split], ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def run(cfg: PipelineConfig) -> CollectResult:
    import pandas as pd

    own = cfg.collect
    frames, sources = [], []
    for source in own.sources:
        for uri, raw in _expand(source):
            frame = _normalise(read_table(uri, raw), uri, own)
            frames.append(frame)
            sources.append({"uri": uri, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                            "rows": len(frame)})
            print(f"collect: {uri}: {len(frame)} rows", file=sys.stderr)
    data = pd.concat(frames, ignore_index=True)
    data["split"] = [split_of(t, own.eval_fraction) if isinstance(t, str) else "train" for t in data["text"]]
    sha = snapshot_hash(data)
    snapshot_dir = storage.join(cfg.artifact_root, "snapshots", sha)
    snapshot_uri = storage.join(snapshot_dir, "data.parquet")
    manifest_uri = storage.join(snapshot_dir, "manifest.json")
    labels = sorted({str(v) for v in data["label"].dropna()})
    if not storage.exists(manifest_uri):  # content-addressed: unchanged data is not rewritten
        buffer = io.BytesIO()
        data.to_parquet(buffer, index=False)
        storage.write_bytes(snapshot_uri, buffer.getvalue())
        storage.write_json(manifest_uri, {
            "sha256": sha, "rows": len(data), "sources": sources, "labels": labels,
            "schema": {c: str(t) for c, t in data.dtypes.items()}, "eval_fraction": own.eval_fraction,
            "created_at": datetime.now(timezone.utc).isoformat(),
        })  # written last: a snapshot without its manifest is not published
    counts = data["split"].value_counts()
    return CollectResult(result_uri=storage.join(cfg.step_uri("collect"), "result.json"), snapshot_uri=snapshot_uri, manifest_uri=manifest_uri, sha256=sha, rows=len(data),
                         rows_train=int(counts.get("train", 0)), rows_eval=int(counts.get("eval", 0)),
                         labels=labels)


def load_snapshot(snapshot_uri: str) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(io.BytesIO(storage.read_bytes(snapshot_uri)))


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import step_main

    return step_main("collect", run, argv)
