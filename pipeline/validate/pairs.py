"""The preference suite's derived columns: each row's pair parsed once (drift reuses the prompt and
the chosen answer), what breaks its structure, whether its two answers are the same, its length in
tokens as train encodes it (the longer of prompt + chosen and prompt + rejected), its normalised
text for duplicates and its normalised prompt for leakage across the splits.

numpy is imported inside the functions that use it.
"""

from __future__ import annotations

from typing import Any

from pipeline import preference
from pipeline.text import normalize_text


def preference_columns(frame: Any, tokenizer: Any, template: str) -> tuple[Any, list[Any]]:
    """The preference suite's frame and each row's prompt + chosen messages (None when the row does
    not parse), for drift."""
    import numpy as np

    out = frame.copy()
    if not set(preference.FIELDS) <= set(out.columns):
        return out, [None] * len(out)
    errors: list[str | None] = []
    same: list[bool] = []
    tokens: list[float] = []
    texts: list[str | None] = []
    prompts: list[str | None] = []
    parsed: list[Any] = []
    for values in zip(*(out[f].tolist() for f in preference.FIELDS)):
        try:
            prompt, chosen, rejected = (preference.to_messages(v, f) for v, f in zip(values, preference.FIELDS))
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
            same.append(False)
            tokens.append(np.nan)
            texts.append(None)
            prompts.append(None)
            parsed.append(None)
            continue
        pair = (prompt, chosen, rejected)
        problem = preference.pair_problem(prompt, chosen, rejected)
        identical = preference.normalized(chosen) == preference.normalized(rejected)
        errors.append(None if identical else problem)  # the same answers have a check of their own
        same.append(identical)
        tokens.append(
            float(max(preference.pair_tokens(preference.encode_pair(tokenizer, pair, template))))
            if problem is None
            else np.nan
        )
        texts.append(normalize_text("\n".join(preference.normalized(m) for m in pair)))
        prompts.append(normalize_text(preference.normalized(prompt)))
        parsed.append(prompt + chosen)
    out["pair_error"] = errors
    out["same_answers"] = same
    out["pair_tokens"] = tokens
    out["text_normalized"] = texts
    out["prompt_normalized"] = prompts
    if "split" in out:
        splits = out.groupby("prompt_normalized")["split"].transform("nunique")
        out["leaks_across_splits"] = splits.fillna(1) > 1  # the same prompt in train and eval
    return out, parsed
