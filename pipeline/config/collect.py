"""collect's settings: where the rows come from and how the snapshot is split.

    finetune collect --help

Foundation layer (the ``config`` package): imports nothing of ours but ``fields`` and ``errors``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

DEFAULT_SOURCE = "pkg://pipeline/data/support_intents.jsonl"
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

    extra_columns: list[str] = option(
        [],
        "Source columns carried into the snapshot as text (e.g. channel, product), "
        "for evaluate.slice_columns; every source must have them.",
    )

    def __post_init__(self) -> None:
        check_fields(self, "collect.")
        reserved = [c for c in self.extra_columns if c in ("text", "label", "messages", "split")]
        if reserved:
            raise ConfigError(
                f"collect.extra_columns: {reserved} are the snapshot's own columns; name source "
                "columns to carry besides them (collect.text_column and collect.label_column map those)"
            )
        for host in self.allowed_hosts:
            if not re.fullmatch(r"[^\s/?#@]+", host):  # a URL here would silently never match
                raise ConfigError(
                    f"collect.allowed_hosts: {host!r} is not a host or host:port "
                    "(e.g. 'data.example.com' or '10.0.0.5:8080')"
                )
