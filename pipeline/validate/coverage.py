"""Tokenizer coverage: per writing system, how much of the text the base model's tokenizer maps
to its unknown token, as a table the ``tokenizer_coverage`` expectation reads (one row per
writing system with at least ``validate.min_slice_rows`` rows) and as one check per system.

pandas is imported inside the function that builds the table.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import ValidateConfig
from pipeline.models import unreadable
from pipeline.text import language_of
from pipeline.validate.checks import severity


def tokenizer_coverage(
    tokenizer: Any, texts: list[str], encoded: list[list[int]], positions: list[int]
) -> dict[str, dict[str, Any]]:
    """Per writing system (text.language_of): rows, tokens, the share of them that are the
    tokenizer's unknown token, the rows with the most, and characters the vocabulary lacks.
    Empty for a tokenizer without an unknown token (byte-level BPE falls back to bytes instead)."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return {}
    scripts: dict[str, dict[str, Any]] = {}
    for text, ids, row in zip(texts, encoded, positions):
        entry = scripts.setdefault(
            language_of(text), {"rows": 0, "tokens": 0, "unknown": 0, "worst": [], "chars": set()}
        )
        missing = sum(token == unknown for token in ids)
        entry["rows"] += 1
        entry["tokens"] += len(ids)
        entry["unknown"] += missing
        if missing:
            entry["worst"].append((missing / max(len(ids), 1), row))
            entry["chars"].update(c for c in text if not c.isspace())
    for entry in scripts.values():
        lacking = list(unreadable(tokenizer, sorted(entry.pop("chars"))[:5000]))
        worst = sorted(entry.pop("worst"), reverse=True)
        entry.update(
            rate=round(entry["unknown"] / entry["tokens"], 6) if entry["tokens"] else 0.0,
            example_rows=[row for _, row in worst[:5]],
            rows_with_unknown=len(worst),
            missing_characters=len(lacking),
            missing_examples="".join(lacking[:30]),
        )
    return scripts


def coverage_frame(coverage: dict[str, dict[str, Any]], own: ValidateConfig) -> Any:
    """One row per writing system with at least ``validate.min_slice_rows`` rows, indexed by its
    name: the table the tokenizer_coverage expectation reads (and Data Docs shows)."""
    import pandas as pd

    kept = {name: entry for name, entry in sorted(coverage.items()) if entry["rows"] >= own.min_slice_rows}
    return pd.DataFrame(
        {
            "rows": [e["rows"] for e in kept.values()],
            "tokens": [e["tokens"] for e in kept.values()],
            "unknown_tokens": [e["unknown"] for e in kept.values()],
            "unknown_token_rate": [e["rate"] for e in kept.values()],
            "missing_characters": [e["missing_characters"] for e in kept.values()],
        },
        index=pd.Index(list(kept), name="script"),
    )


def coverage_expectations(gx: Any, own: ValidateConfig) -> list[tuple[str, Any]]:
    return [
        (
            "tokenizer_coverage",
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="unknown_token_rate", min_value=0.0, max_value=own.max_unknown_token_rate
            ),
        )
    ]


def coverage_checks(
    described: list[dict[str, Any]], coverage: dict[str, dict[str, Any]], own: ValidateConfig
) -> list[dict[str, Any]]:
    """The tokenizer_coverage expectation's verdict per writing system (its unexpected rows are the
    failing scripts), each with the rate, the rows with the most unknown tokens and what is missing."""
    [result] = described or [{"success": True, "severity": severity("tokenizer_coverage", own)}]
    failing = set() if result["success"] else set(result["example_rows"])
    return [
        {
            "check": "tokenizer_coverage",
            "severity": result["severity"],
            "expectation": "unknown_token_rate",
            "column": f"text ({name})",
            "success": name not in failing,
            "unexpected_count": entry["rows_with_unknown"],
            "example_rows": entry["example_rows"],
            "example_values": [],
            "observed_value": entry["rate"],
            "max": own.max_unknown_token_rate,
            "script": name,
            "missing_characters": entry["missing_characters"],
            "missing_examples": entry["missing_examples"],
        }
        for name, entry in sorted(coverage.items())
        if entry["rows"] >= own.min_slice_rows
    ]
