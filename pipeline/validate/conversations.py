"""The chat suite's derived columns: each row's conversation parsed once (drift reuses the
result), the problem a row has (does not parse, role order, no or an empty assistant turn), its
normalised text for duplicates and leakage, and its length in tokens once rendered with the chat
template.

numpy is imported inside the functions that use it.
"""

from __future__ import annotations

from typing import Any

from pipeline import chat
from pipeline.config import TrainConfig, ValidateConfig
from pipeline.text import normalize_text
from pipeline.validate.columns import rows_to_count, token_note, training_drops, utf8_bytes, with_leakage

# Tokens a chat template adds per message are estimated from the template itself; this is the
# allowance when the template cannot render the probe (ChatML: <|im_start|>, role, \n, <|im_end|>, \n).
MESSAGE_TOKEN_ALLOWANCE = 5


def parse_each(values: Any) -> tuple[list[list[dict[str, str]] | None], list[str | None]]:
    """Each value's messages (None when they do not parse) and why it does not parse (None when it does)."""
    parsed: list[list[dict[str, str]] | None] = []
    errors: list[str | None] = []
    for value in values:
        try:
            parsed.append(chat.parse_messages(value))
            errors.append(None)
        except ValueError as exc:
            parsed.append(None)
            errors.append(str(exc))
    return parsed, errors


def chat_columns(
    frame: Any, tokenizer: Any, template: str, own: ValidateConfig, train: TrainConfig, seed: int
) -> tuple[Any, dict[str, Any], list[Any]]:
    """The chat suite's frame, how token counts were taken, and each row's parsed messages (None
    when they do not parse). ``training_drop``: what training (``train``: its max_seq_len,
    overlong and train_on_inputs) does to each conversation longer than max_seq_len tokens."""
    max_seq_len = train.max_seq_len
    import numpy as np

    out = frame.copy()
    if "messages" not in out:
        return out, {}, [None] * len(out)
    parsed, errors = parse_each(out["messages"])
    out["messages_error"] = errors
    out["assistant_turns"] = [np.nan if m is None else sum(x["role"] == "assistant" for x in m) for m in parsed]
    out["empty_assistant_turns"] = [
        np.nan if m is None else sum(x["role"] == "assistant" and not x["content"].strip() for x in m) for m in parsed
    ]
    # Missing and empty assistant turns have checks of their own; role_order judges the order alone.
    out["role_problem"] = [
        None
        if m is None or not any(x["role"] == "assistant" for x in m)
        else chat.role_problem([{**x, "content": x["content"] or "-"} for x in m])
        for m in parsed
    ]
    out["text_normalized"] = [
        normalize_text("\n".join(f"{x['role']}: {x['content']}" for x in m))
        if m is not None
        else (normalize_text(v) if isinstance(v, str) else None)
        for m, v in zip(parsed, out["messages"])
    ]
    out = with_leakage(out)
    out["conversation_tokens"], positions = conversation_tokens(parsed, tokenizer, template, own, max_seq_len, seed)

    def no_target(i: int) -> bool:
        messages = parsed[i]
        assert messages is not None  # only a counted row, which parsed, is overlong
        _, labels = chat.encode(tokenizer, messages, template, train.train_on_inputs)
        return chat.nothing_to_learn(labels[:max_seq_len])

    out["training_drop"] = training_drops(out["conversation_tokens"], max_seq_len, train.overlong, no_target)
    return (
        out,
        token_note(
            positions,
            len(out),
            own.token_sample_rows,
            max_seq_len,
            "tokens of the conversation rendered with the chat template",
        ),
        parsed,
    )


def conversation_tokens(
    parsed: list[list[dict[str, str]] | None],
    tokenizer: Any,
    template: str,
    own: ValidateConfig,
    max_seq_len: int,
    seed: int,
) -> tuple[Any, list[int]]:
    """Each conversation's tokens once rendered (null where not counted or not parsed), and the
    rows counted: those that could exceed ``max_seq_len``, and a sample of the rest."""
    import numpy as np

    contents = [None if m is None else "".join(x["content"] for x in m) for m in parsed]
    try:
        probe = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        per_message = len(chat.render(tokenizer, probe, template).encode()) // 2 + 1
    except Exception:  # a template may reject the probe; the documented allowance stands in
        per_message = MESSAGE_TOKEN_ALLOWANCE
    upper = utf8_bytes(contents) + np.array([per_message * len(m) if m else 0 for m in parsed]) + 1
    positions = [int(i) for i in rows_to_count(upper, max_seq_len, own.token_sample_rows, seed) if parsed[i]]
    tokens = np.full(len(parsed), np.nan)
    for i in positions:
        messages = parsed[i]
        assert messages is not None  # positions holds rows whose messages parsed
        tokens[i] = chat.token_length(tokenizer, messages, template)
    return tokens, positions
