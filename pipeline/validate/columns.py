"""Derived columns: computed once, vectorised where pandas can, so the suite only compares them.
The classification suite's columns are here, with the token counting both suites share: which
rows are counted (every one, or a seeded sample plus every row that could exceed the bar) and the
note the summary keeps of it.

pandas (through the frame), numpy and pyarrow are imported inside the functions that use them.
"""

from __future__ import annotations

from collections.abc import Callable
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


# What training does to a row longer than train.max_seq_len tokens, as the ``training_drop`` column
# says it (null: trained whole). The train step counts the same in its summary.
TRUNCATED, DROPPED_OVERLONG, DROPPED_NO_TARGET = "truncated", "dropped_overlong", "dropped_no_target"


def training_drops(tokens: Any, limit: int, overlong: str, no_target: Callable[[int], bool] | None = None) -> list:
    """Each row's fate in training given its ``tokens`` (null where not counted: such a row is too
    short in UTF-8 bytes to exceed ``limit``): None when trained whole, else truncated or dropped
    (``overlong``, train.overlong); ``no_target(i)``: whether row ``i`` has nothing left to learn
    once truncated (causal-lm)."""
    fates: list[str | None] = []
    for i, count in enumerate(tokens):
        if not count > limit:  # NaN compares False
            fates.append(None)
        elif overlong == "drop":
            fates.append(DROPPED_OVERLONG)
        else:
            fates.append(DROPPED_NO_TARGET if no_target is not None and no_target(i) else TRUNCATED)
    return fates


def drop_counts(frame: Any, limit: int) -> dict[str, Any]:
    """The summary's ``training_drops``: per split, rows, how many training would truncate and how
    many it would drop, and the first few row positions of each."""
    if "training_drop" not in frame or "split" not in frame:
        return {}
    counts: dict[str, Any] = {"max_seq_len": limit}
    for split in ("train", "eval"):
        fates = frame.loc[frame["split"] == split, "training_drop"]
        truncated = fates.index[fates == TRUNCATED]
        dropped = fates.index[fates.isin([DROPPED_OVERLONG, DROPPED_NO_TARGET])]
        counts[split] = {
            "rows": int(len(fates)),
            "truncated": int(len(truncated)),
            "dropped": int(len(dropped)),
            "example_rows": [int(i) for i in [*truncated[:5], *dropped[:5]]],
        }
    return counts


def token_note(counted: Any, total: int, sample_rows: int, bar: int, what: str) -> dict[str, Any]:
    policy = (
        "every row"
        if len(counted) == total
        else f"a sample of {sample_rows} rows seeded by `seed`, plus every row of more than {bar // 2} UTF-8 "
        f"bytes (only those can exceed {bar} tokens)"
    )
    return {"counted": what, "rows_counted": int(len(counted)), "rows": total, "policy": policy}


def classification_columns(
    frame: Any, tokenizer: Any, own: ValidateConfig, seed: int, max_seq_len: int
) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]:
    """The classification suite's frame, how token counts were taken, and the tokenizer's
    coverage of each writing system on the same rows. ``training_drop``: the rows training
    truncates, longer than ``max_seq_len`` (train.max_seq_len) with the special tokens it adds."""
    import numpy as np

    out = with_derived_columns(frame)
    if "text" not in out:
        return out, {}, {}
    room = max_seq_len - tokenizer.num_special_tokens_to_add()  # [CLS] and [SEP] for BERT
    bar = min(own.max_text_tokens, room)  # every row that could exceed either is counted
    positions = rows_to_count(utf8_bytes(out["text"]) + 1, bar, own.token_sample_rows, seed)
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
    out["training_drop"] = training_drops(tokens, room, "truncate")
    coverage = tokenizer_coverage(tokenizer, [out["text"].iat[i] for i in positions], encoded, positions)
    return (
        out,
        token_note(
            positions,
            len(out),
            own.token_sample_rows,
            bar,
            "tokens of the text, special tokens not counted",
        ),
        coverage,
    )
