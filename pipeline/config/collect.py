"""collect's settings: where the rows come from and how the snapshot is split.

    finetune collect --help

Foundation layer (the ``config`` package): imports nothing of ours but ``fields``, ``errors`` and ``scope``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.config.scope import check_prefix
from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

DEFAULT_SOURCE = "pkg://pipeline/data/support_intents.jsonl"
ALLOWED_SOURCE = "pkg://pipeline/data/"  # the data shipped with the package
# Records parsed at a time. As Python objects a record costs several times its bytes, so batches
# stay small; rows then gather into row groups in Arrow's compact form.
READ_ROWS = 10_000


@dataclass(frozen=True)
class CollectConfig:
    """collect's settings (``collect.*``): the sources, the held-out share and the snapshot's row
    groups. None of them is a ``TrainingArguments`` field."""

    sources: list[str] = option(
        [DEFAULT_SOURCE],
        "Data sources: paths, globs, file://, s3://bucket/key-or-prefix, https:// (JSONL, CSV, Parquet; .gz ok). "
        "An entry ending in #rows=N keeps N of its rows, #weight=W its share among the weighted entries "
        "(seeded by `seed`).",
        min_items=1,
    )
    text_column: str = option("text", "Column holding the input text in the sources (sequence-classification).")
    label_column: str = option("label", "Column holding the label in the sources (sequence-classification).")
    eval_fraction: float = option(
        0.2, "Share of rows held out for evaluation, by text hash.", exclusive_minimum=0.0, maximum=0.5
    )
    row_group_rows: int = option(
        100_000,
        f"Rows per Parquet row group of the snapshot (sources are read {READ_ROWS} rows at a time, or "
        "this many if fewer); with the row size, it bounds collect's memory.",
        minimum=1,
        maximum=1_000_000,
    )  # pyarrow caps a row group at 1Mi rows by default
    # A redirect must not turn a public source into a request to the cloud metadata service or
    # an internal host; this list is how a deployment vouches for the hosts it does mean.
    allowed_hosts: list[str] = option(
        [],
        "http(s) sources: hosts a download may reach, as 'host' (any port) or 'host:port' (IPv6: '[::1]:8080'). "
        "Empty: any host for a URL in collect.sources, and redirects only to public addresses or back to the "
        "source's own host:port; not empty: the source URL and every redirect must name a listed host, which "
        "may then be loopback, link-local or private. A redirect never changes the scheme.",
    )

    # What a trigger may pick: the deployment's own collect.sources are never held to it.
    allowed_sources: list[str] = option(
        [ALLOWED_SOURCE],
        "Prefixes under which a trigger may pick collect.sources: absolute paths or file:// (compared after "
        "resolving symlinks and '..', on a path boundary; every file a glob or directory names must be under "
        "one), pkg://<package>/<dir>, s3://bucket/prefix, http(s)://host[:port]/path. The deployment's own "
        "collect.sources are not limited by it; a trigger can never set it.",
    )
    extra_columns: list[str] = option(
        [],
        "Source columns carried into the snapshot as text (e.g. channel, product), "
        "for evaluate.slice_columns; every source must have them.",
    )

    # What one source may cost, so a bad file is refused by name instead of the pod being killed
    # for memory or disk (docs/data.md#bounded-reads).
    max_record_bytes: int = option(
        16 << 20,
        "Largest record a source may hold, in bytes: a JSONL line, a CSV record (as read for a record on one "
        "line, on its values once parsed for one whose quoted fields span lines), a Parquet row's selected "
        "columns as Arrow bytes. A longer one is refused, naming the file and line or row. It bounds memory "
        "(a 16 MiB JSONL record peaks at about 190 MB over the process's own 75); validate.max_text_chars "
        "judges a text's length.",
        minimum=1 << 10,
        maximum=1 << 30,
    )
    max_decompressed_bytes: int = option(
        10 << 30,
        "A .gz source may decompress to at most this many bytes (a .parquet.gz is decompressed to scratch: "
        "half the default 20Gi deploy.scratch_size, leaving room for the snapshot).",
        minimum=1 << 20,
    )
    max_compression_ratio: float = option(
        200.0,
        "A .gz source may decompress to at most this many times the compressed bytes read so far, judged "
        "once 8 MiB are out (text gzips 3-20x; a bomb of zeros about 1000x, deflate's most).",
        minimum=1.0,
    )

    def __post_init__(self) -> None:
        check_fields(self, "collect.")
        reserved = [c for c in self.extra_columns if c in ("text", "label", "messages", "split")]
        if reserved:
            raise ConfigError(
                f"collect.extra_columns: {reserved} are the snapshot's own columns; name source "
                "columns to carry besides them (collect.text_column and collect.label_column map those)"
            )
        for prefix in self.allowed_sources:
            check_prefix(prefix)
        for host in self.allowed_hosts:
            if not re.fullmatch(r"[^\s/?#@]+", host):  # a URL here would silently never match
                raise ConfigError(
                    f"collect.allowed_hosts: {host!r} is not a host or host:port "
                    "(e.g. 'data.example.com' or '10.0.0.5:8080')"
                )
