"""collect: stream records from local paths, file://, s3:// or https:// sources into one
content-addressed Parquet snapshot with a manifest.

Sources are read a batch of records at a time and written as Parquet row groups of
``collect.row_group_rows`` rows to a local temporary file, so memory stays flat however large the
sources are (bench/results/collect.md). The finished file is then published to
``<artifact_root>/snapshots/<sha256>/data.parquet``, ``manifest.json`` last. What a row holds depends on ``task``:

- ``sequence-classification``: ``text``, ``label``, ``split`` (from ``collect.text_column`` and
  ``collect.label_column``);
- ``causal-lm``: ``messages`` (a JSON list of ``{"role", "content"}``, from a ``messages`` field
  or ``prompt`` + ``response`` + optional ``system``), ``split``.

An entry of ``collect.sources`` may end in ``#rows=N`` (keep N of its rows) or ``#weight=W`` (its
share of the rows of the weighted entries, as many as they can fill without repeating a row);
the sample is seeded by ``seed`` and the manifest records each entry's rows read and kept.

The split (``train`` or ``eval``) comes from a stable hash of the normalised text, so it never
changes between runs and the same text can never land in both splits. For classification the
work is a column at a time: pyarrow's JSON reader on a parsing thread of its own (``formats``),
the split from Arrow buffers (``keys``), the content address over the columns (``writer``); the
manifest records that address scheme (``scheme``: 2; ``pipeline.snapshot``). A published
snapshot is a valid source: collecting it again gives the same sha256 and URI. An http(s) source's redirects are
followed (at most five) only within its scheme and, unless ``collect.allowed_hosts`` lists the
host, only to public addresses or back to the source's own host and port; the manifest names the
source as configured (``uri``) and the URL its bytes came from (``final_uri``).

    finetune collect --set collect.sources='[pipeline/data/support_intents.jsonl]'

The step is here; its parts beside it: ``sources`` (which files a source names, a local copy of
each; http(s) downloads are ``pipeline.storage.http``'s), ``formats`` (JSONL, CSV, Parquet as
chunks of records), ``keys`` (the split of a column of texts), ``mixing`` (``#rows`` /
``#weight``) and ``writer`` (the snapshot's Parquet file and content address).

pandas, pyarrow and urllib3 are imported inside the functions that parse, write or download:
the step table imports this package when Airflow parses the DAG files.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import chat, preference, storage
from pipeline.collect.formats import format_of, open_source
from pipeline.collect.keys import split_column
from pipeline.collect.keys import split_of as split_of  # collect.split_of: the split of one text
from pipeline.collect.mixing import MixEntry, plan_mix
from pipeline.collect.sources import SourceFile, expand, local_copy
from pipeline.collect.streams import Chunk, Limits, read_ahead
from pipeline.collect.writer import SnapshotWriter, Tally, UnencodableRow
from pipeline.config import READ_ROWS, CollectConfig, PipelineConfig
from pipeline.errors import DataError
from pipeline.snapshot import SCHEME, snapshot_columns

# The source fields a causal-lm record may use (chat.to_messages decides which shape it is).
CHAT_FIELDS = ("messages", "prompt", "response", "system")


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


# ----------------------------------------------------------------------------------------------
# The step: read every source into the writer, then publish the snapshot


def run(cfg: PipelineConfig) -> CollectResult:
    own = cfg.collect
    entries = [MixEntry.parse(source, i) for i, source in enumerate(own.sources)]
    for entry in entries:
        entry.files = expand(entry.uri, own.allowed_hosts)
        for source in entry.files:
            format_of(source.uri)  # an unknown format fails now, not after reading the other sources
    sources = [file for entry in entries for file in entry.files]
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="finetune-collect-") as tmp_name:
        tmp = Path(tmp_name)
        columns = snapshot_columns(cfg.task, own.extra_columns)
        writer = SnapshotWriter(tmp / "data.parquet", columns, own.row_group_rows)
        try:
            mixed = [entry for entry in entries if entry.samples]
            for entry in mixed:  # first pass: every row of a sampled source, with its sampling key
                entry.stage(
                    lambda source, staging: read_source(cfg, source, staging, None, tmp), columns, cfg.seed, tmp
                )
            plan_mix(mixed)
            for entry in entries:
                if entry.samples:
                    entry.replay(writer, tally)
                else:
                    for source in entry.files:
                        read_source(cfg, source, writer, tally, tmp)
            sha = writer.finish()
        finally:
            writer.close()
        snapshot_uri, manifest_uri = publish_snapshot(
            cfg, writer, sha, sources, tally, [e.manifest_entry() for e in entries] if mixed else None
        )
    return CollectResult(
        result_uri=storage.join(cfg.step_uri("collect"), "result.json"),
        snapshot_uri=snapshot_uri,
        manifest_uri=manifest_uri,
        sha256=sha,
        rows=writer.rows,
        rows_train=writer.rows - tally.rows_eval,
        rows_eval=tally.rows_eval,
        labels=sorted(tally.labels),
    )


def read_source(cfg: PipelineConfig, source: SourceFile, writer: Any, tally: Tally | None, tmp: Path) -> None:
    """Parse one source file chunk by chunk into snapshot rows and hand them to ``writer`` (the
    snapshot's, or a sampled source's staging file)."""
    own = cfg.collect
    fields: tuple[str, ...]
    if cfg.task == "causal-lm":
        to_rows, fields = _chat_rows, CHAT_FIELDS
    elif cfg.task == "preference":
        to_rows, fields = _preference_rows, preference.FIELDS
    else:
        to_rows, fields = _classification_rows, (own.text_column, own.label_column)
    fields = tuple(dict.fromkeys((*fields, *own.extra_columns)))
    columnar = cfg.task == "sequence-classification"  # the others' rows are built a record at a time
    limits = Limits(own.max_record_bytes, own.max_decompressed_bytes, own.max_compression_ratio)
    with (
        local_copy(source, tmp, own.allowed_hosts) as path,
        open_source(path, source.uri, fields, min(own.row_group_rows, READ_ROWS), tmp, limits, columnar) as parsed,
        contextlib.ExitStack() as stack,  # the parsing thread stops before the file closes
    ):
        if parsed.columns_complete:  # fail before reading rows when the header says so
            _check_columns(cfg.task, source.uri, parsed.columns, own)
        for chunk in stack.enter_context(read_ahead(parsed.chunks)):
            if not columnar:
                chunk.values = {f: _python(v) for f, v in chunk.values.items()}
            values = {**to_rows(chunk, source.uri, own), **_extra_values(chunk, own)}
            try:
                writer.add(values)
            except UnencodableRow as exc:
                raise DataError(
                    f"{source.uri}: {chunk.where(exc.index)}: a value is not valid Unicode "
                    "(an unpaired surrogate such as \\ud800)"
                ) from None
            source.rows += len(chunk)
            if tally is not None:
                tally.add(values)
        _check_columns(cfg.task, source.uri, parsed.columns, own)
        if not source.rows:
            raise DataError(f"{source.uri}: has a header but no rows")
    print(f"collect: {source.uri}: {source.rows} rows", file=sys.stderr)


def publish_snapshot(
    cfg: PipelineConfig,
    writer: SnapshotWriter,
    sha: str,
    sources: list[SourceFile],
    tally: Tally,
    mix: list[dict[str, Any]] | None = None,
) -> tuple[str, str]:
    """Publish the finished file at ``<artifact_root>/snapshots/<sha256>/``, the manifest last;
    content-addressed, so unchanged data is not rewritten. The snapshot's and manifest's URIs."""
    snapshot_dir = storage.join(cfg.artifact_root, "snapshots", sha)
    snapshot_uri = storage.join(snapshot_dir, "data.parquet")
    manifest_uri = storage.join(snapshot_dir, "manifest.json")
    if not storage.exists(manifest_uri):
        storage.put_file(writer.path, snapshot_uri)
        storage.write_json(
            manifest_uri,
            {
                "sha256": sha,
                "scheme": SCHEME,
                "task": cfg.task,
                "rows": writer.rows,
                "rows_eval": tally.rows_eval,
                "row_groups": writer.row_groups,
                "sources": [s.manifest_entry() for s in sources],
                "labels": sorted(tally.labels),
                "schema": {f.name: str(f.type) for f in writer.schema},
                "eval_fraction": cfg.collect.eval_fraction,
                "created_at": datetime.now(UTC).isoformat(),
                **({"mix": {"seed": cfg.seed, "sources": mix}} if mix else {}),
            },
        )  # written last: a snapshot without its manifest is not published
    return snapshot_uri, manifest_uri


# ----------------------------------------------------------------------------------------------
# Rows: a chunk of source records as snapshot columns


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _strings(values: Any) -> bool:
    """Whether a chunk's column is an Arrow string array (pyarrow's JSON reader, CSV, Parquet text)."""
    import pyarrow as pa

    return isinstance(values, pa.Array) and values.type == pa.string()


def _python(values: Any) -> list[Any]:
    return values if isinstance(values, list) else values.to_pylist()


def _classification_rows(chunk: Chunk, uri: str, own: CollectConfig) -> dict[str, Any]:
    """text, label, split. Nulls stay nulls for validate to report; text must already be text (a
    number there means the column is not what the file claims); numeric labels become text.
    Columns that are Arrow text already pass as they are; others are checked a value at a time."""
    texts, labels = chunk.values[own.text_column], chunk.values[own.label_column]
    if not (_strings(texts) and _strings(labels)):
        texts, labels = list(_python(texts)), list(_python(labels))
        for index, (text, label) in enumerate(zip(texts, labels)):
            if _is_null(text):
                texts[index] = None
            elif not isinstance(text, str):
                raise DataError(
                    f"{uri}: {chunk.where(index)}: '{own.text_column}' is {type(text).__name__} "
                    f"{_short(text)}, not a string"
                )
            if _is_null(label):
                labels[index] = None
            elif isinstance(label, (int, float)):  # bool too: 0/1 and True/False classes
                labels[index] = str(label)
            elif not isinstance(label, str):
                raise DataError(
                    f"{uri}: {chunk.where(index)}: '{own.label_column}' is {type(label).__name__} "
                    f"{_short(label)}, not a string or number"
                )
        texts = _text_array(texts, lambda index: f"{uri}: {chunk.where(index)}: '{own.text_column}'")
    return {"text": texts, "label": labels, "split": split_column(texts, own.eval_fraction)}


def _chat_rows(chunk: Chunk, uri: str, own: CollectConfig) -> dict[str, Any]:
    """messages (chat.dumps JSON), split. Role order is validate's to judge, not collect's."""
    columns = [chunk.values[f] for f in CHAT_FIELDS]
    conversations = []
    for index, values in enumerate(zip(*columns)):
        record = {f: v for f, v in zip(CHAT_FIELDS, values) if not _is_null(v)}
        try:
            messages = chat.dumps(chat.to_messages(record))
        except ValueError as exc:
            raise DataError(f"{uri}: {chunk.where(index)}: {exc}") from exc
        conversations.append(messages)
    array = _text_array(conversations, lambda index: f"{uri}: {chunk.where(index)}: the messages")
    return {"messages": array, "split": split_column(array, own.eval_fraction)}


def _text_array(values: list[Any], where: Any) -> Any:
    """The texts as an Arrow string array; one UTF-8 cannot hold (JSON can escape half a surrogate
    pair; UTF-8 and Parquet cannot hold it) is named by ``where(index)``."""
    import pyarrow as pa

    try:
        return pa.array(values, pa.string())
    except (UnicodeEncodeError, pa.ArrowInvalid):
        index = next(i for i, v in enumerate(values) if isinstance(v, str) and not _utf8(v))
        raise DataError(f"{where(index)} is not valid Unicode (an unpaired surrogate such as \\ud800)") from None


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def _preference_rows(chunk: Chunk, uri: str, own: CollectConfig) -> dict[str, Any]:
    """prompt, chosen, rejected (each chat.dumps JSON: text becomes one turn), split by the prompt,
    so that a prompt's pairs are all in one split. Pair structure is validate's to judge."""
    columns: dict[str, Any] = {f: [] for f in preference.FIELDS}
    for index, values in enumerate(zip(*(chunk.values[f] for f in preference.FIELDS))):
        record = {f: v for f, v in zip(preference.FIELDS, values) if not _is_null(v)}
        try:
            pair = [preference.dumps(m) for m in preference.to_pair(record)]
        except ValueError as exc:
            raise DataError(f"{uri}: {chunk.where(index)}: {exc}") from exc
        for field, value in zip(preference.FIELDS, pair):
            columns[field].append(value)
    prompts = _text_array(columns["prompt"], lambda index: f"{uri}: {chunk.where(index)}: 'prompt'")
    return {**columns, "prompt": prompts, "split": split_column(prompts, own.eval_fraction)}


def _extra_values(chunk: Chunk, own: CollectConfig) -> dict[str, Any]:
    """The columns collect.extra_columns carries (e.g. channel, product), as text; nulls stay null."""
    return {
        column: chunk.values[column]
        if _strings(chunk.values[column])
        else [
            None if _is_null(v) else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            for v in _python(chunk.values[column])
        ]
        for column in own.extra_columns
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_columns(task: str, uri: str, found: set[str], own: CollectConfig) -> None:
    extra = [c for c in own.extra_columns if c not in found]
    if extra:
        raise DataError(
            f"{uri}: missing column(s) {extra} that collect.extra_columns carries into the snapshot; "
            f"found {sorted(found)}"
        )
    if task == "causal-lm":
        if "messages" not in found and not {"prompt", "response"} <= found:
            raise DataError(
                f"{uri}: missing column(s): needs 'messages', or 'prompt' and 'response' (task=causal-lm reads "
                f"these names; no setting maps another column to them); the file's columns are {sorted(found)}"
            )
        return
    if task == "preference":
        absent = [c for c in preference.FIELDS if c not in found]
        if absent:
            raise DataError(
                f"{uri}: missing column(s) {absent}: task=preference reads 'prompt', 'chosen' and 'rejected' (chat "
                f"messages or text; no setting maps another column to them); the file's columns are {sorted(found)}"
            )
        return
    settings = {"collect.text_column": own.text_column, "collect.label_column": own.label_column}
    missing = {setting: column for setting, column in settings.items() if column not in found}
    if missing:
        named = ", ".join(f"'{column}' ({setting})" for setting, column in missing.items())
        fix = " and ".join(f"{setting}=<column>" for setting in missing)
        raise DataError(
            f"{uri}: missing column(s) {named}; the file's columns are {sorted(found)}: set {fix} to the "
            "one(s) holding the text and the label"
        )
