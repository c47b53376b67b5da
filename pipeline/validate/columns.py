"""Derived columns: computed once, vectorised where pandas can, so the suite only compares them.
The classification suite's columns are here, with the token counting both suites share: which
rows are counted (every one, or a seeded sample plus every row that could exceed the bar) and the
note the summary keeps of it.

pandas (through the frame), numpy and pyarrow are imported inside the functions that use them.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import ValidateConfig
from pipeline.text import normalize_text
from pipeline.validate.coverage import tokenizer_coverage


def with_derived_columns(frame: Any) -> Any:
    """Columns the classification suite checks besides the data: normalised text, rows per label, leakage."""
    out = frame.copy()  # a missing column is reported by the 'columns' check, not here
    if "text" in out:
        out["text_normalized"] = [normalize_text(t) if isinstance(t, str) else None for t in out["text"]]
    if "label" in out:
        out["label_count"] = out.groupby("label", dropna=False)["label"].transform("size")
    return with_leakage(out)


def with_leakage(out: Any) -> Any:
    if "split" in out and "text_normalized" in out:
        splits = out.groupby("text_normalized")["split"].transform("nunique")
        out["leaks_across_splits"] = splits.fillna(1) > 1  # the same text in train and eval
    return out


def utf8_bytes(texts: Any) -> Any:
    """UTF-8 length of every text (0 for null), vectorised by Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = pa.array(texts, type=pa.large_string(), from_pandas=True)
    return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False)


def rows_to_count(upper_bytes: Any, bar: int, sample_rows: int, seed: int) -> Any:
    """Row positions whose tokens are counted: every row when ``sample_rows`` is 0 or covers them,
    else a seeded sample plus every row that could exceed ``bar``.

    WordPiece, BPE, byte-level BPE and SentencePiece with byte fallback make at most one token
    per UTF-8 byte (``upper_bytes`` adds one for a prefix token), so a shorter row cannot exceed
    the bar; the factor 2 is a margin for normalisers that expand text (NFKD, lower-casing).
    """
    import numpy as np

    if sample_rows == 0 or sample_rows >= len(upper_bytes):
        return np.arange(len(upper_bytes))
    sample = np.random.default_rng(seed).choice(len(upper_bytes), size=sample_rows, replace=False)
    return np.union1d(sample, np.flatnonzero(2 * np.asarray(upper_bytes) > bar))


def token_note(counted: Any, total: int, sample_rows: int, bar: int, what: str) -> dict[str, Any]:
    policy = (
        "every row"
        if len(counted) == total
        else f"a sample of {sample_rows} rows seeded by `seed`, plus every row of more than {bar // 2} UTF-8 "
        f"bytes (only those can exceed {bar} tokens)"
    )
    return {"counted": what, "rows_counted": int(len(counted)), "rows": total, "policy": policy}


def classification_columns(
    frame: Any, tokenizer: Any, own: ValidateConfig, seed: int
) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]:
    """The classification suite's frame, how token counts were taken, and the tokenizer's
    coverage of each writing system on the same rows."""
    import numpy as np

    out = with_derived_columns(frame)
    if "text" not in out:
        return out, {}, {}
    positions = rows_to_count(utf8_bytes(out["text"]) + 1, own.max_text_tokens, own.token_sample_rows, seed)
    positions = [int(i) for i in positions if isinstance(out["text"].iat[i], str)]
    tokens = np.full(len(out), np.nan)  # rows not counted stay null: the expectation skips them
    encoded: list[list[int]] = []
    if positions:
        encoded = tokenizer(
            [out["text"].iat[i] for i in positions],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        tokens[positions] = [len(ids) for ids in encoded]
    out["text_tokens"] = tokens
    coverage = tokenizer_coverage(tokenizer, [out["text"].iat[i] for i in positions], encoded, positions)
    return (
        out,
        token_note(
            positions,
            len(out),
            own.token_sample_rows,
            own.max_text_tokens,
            "tokens of the text, special tokens not counted",
        ),
        coverage,
    )
