"""Chat data for the ``causal-lm`` task family: the message format, its rules, rendering with a
chat template and the assistant-only loss mask.

A snapshot row of a causal-LM data set holds ``messages``: a JSON list of ``{"role", "content"}``
objects. Instruction records (``prompt``, ``response``, optional ``system``) become
``system?, user, assistant``. A conversation is valid when an optional system message comes
first and user and assistant turns then alternate, starting with user and ending with a
non-empty assistant turn.

    python -c "from pipeline import chat; print(chat.role_problem([{'role': 'user', 'content': 'hi'}]))"

torch is imported inside ``token_loss`` alone: collect and validate use the rest without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, DataError
from pipeline.text import CJK, normalize_text

ROLES = ("system", "user", "assistant")


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """One source record as a message list: a ``messages`` field as it is, or an instruction.

    Raises ``ValueError`` naming the field when the record has neither shape or a field is not text.
    """
    if "messages" in record and record["messages"] is not None:
        return parse_messages(record["messages"])
    if record.get("prompt") is None or record.get("response") is None:
        raise ValueError("needs either 'messages' or both 'prompt' and 'response'")
    messages = []
    for field, role in (("system", "system"), ("prompt", "user"), ("response", "assistant")):
        value = record.get(field)
        if value is None or (field == "system" and value == ""):
            continue
        if not isinstance(value, str):
            raise ValueError(f"'{field}' is {type(value).__name__} {value!r}, not a string")
        messages.append({"role": role, "content": value})
    return messages


def parse_messages(value: Any) -> list[dict[str, str]]:
    """A message list from a list or its JSON text; ``ValueError`` says what is wrong and where."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"'messages' is not valid JSON ({exc.msg})") from exc
    if hasattr(value, "tolist"):  # a list that went through Parquet comes back as an array
        value = value.tolist()
    if not isinstance(value, list):
        raise ValueError(f"'messages' is {type(value).__name__}, not a list")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {number} is {type(message).__name__}, not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {number}: role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {number} ({role}): content is {type(content).__name__}, not a string")
        messages.append({"role": role, "content": content})
    return messages


def dumps(messages: list[dict[str, str]]) -> str:
    """The snapshot form of a message list (stable, readable for non-ASCII text)."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def role_problem(messages: list[dict[str, str]]) -> str | None:
    """What breaks the conversation rules, or None: the wording names the message number."""
    if not messages:
        return "no messages"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for number, message in enumerate(turns, start=len(messages) - len(turns) + 1):
        expected = "user" if (number - (len(messages) - len(turns))) % 2 == 1 else "assistant"
        if message["role"] != expected:
            return f"message {number} is {message['role']}, expected {expected} (role order)"
    if not any(m["role"] == "assistant" for m in turns):
        return "no assistant turn"
    if turns[-1]["role"] != "assistant":
        return f"message {len(messages)} is {turns[-1]['role']}: a conversation must end with an assistant turn"
    empty = [n for n, m in enumerate(messages, start=1) if m["role"] == "assistant" and not m["content"].strip()]
    if empty:
        return f"message {empty[0]} is an empty assistant turn"
    return None


# A configured template for tokenizers that ship none (train.chat_template: chatml).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML}
IGNORE = -100  # label of a token that takes no part in the loss (Hugging Face convention)


def chat_template(tokenizer: Any, configured: str) -> str:
    """The template to render with: the configured one (a name in TEMPLATES or Jinja text), else
    the tokenizer's own; ``ValueError`` when there is neither."""
    if configured:
        return TEMPLATES.get(configured, configured)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(
        "the tokenizer has no chat template and train.chat_template is not set "
        f"(a Jinja template, or one of {list(TEMPLATES)})"
    )


def render(tokenizer: Any, messages: list[dict[str, str]], template: str, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must learn to produce.

    Each assistant turn spans from the end of the conversation so far plus the generation prompt
    to the end of that turn (its closing tokens included, so the model learns to stop). This needs
    a template that renders every conversation as a prefix of its continuations, as chat templates
    do; one that does not is reported rather than guessed at.
    """
    full = render(tokenizer, messages, template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], template, add_generation_prompt=True) if index else ""
        through = render(tokenizer, messages[: index + 1], template)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                "the chat template does not render a conversation as a prefix of its continuation, "
                "so assistant turns cannot be located for the loss mask"
            )
        spans.append((len(before), len(through)))
    return full, spans


def stop_ids(tokenizer: Any, model_dir: str | None = None) -> set[int]:
    """The token ids generation stops at: the tokenizer's EOS and the ``eos_token_id`` of the
    model's ``generation_config.json`` (or ``config.json``) in ``model_dir``."""
    ids = {tokenizer.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        file = Path(model_dir) / name if model_dir else None
        if file is not None and file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids |= set(value if isinstance(value, list) else [value])
            break
    ids.discard(None)
    return ids


def turn_end(tokenizer: Any, template: str) -> tuple[str, list[int]]:
    """What the template renders after an assistant turn's content (its end-of-turn marker), as
    text and token ids: what a model trained on it learns to produce last."""
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]
    text, spans = assistant_spans(tokenizer, probe, template)
    begin, end = spans[0]
    closing = text[begin:end]
    marker = closing[closing.index("fine") + len("fine") :]
    return marker, list(tokenizer(closing, add_special_tokens=False)["input_ids"])


def use_eos_token(tokenizer: Any, model: Any | None, token: str) -> int:
    """Make ``token`` (train.eos_token, TRL's ``SFTConfig.eos_token``) the tokenizer's EOS and one
    of the model's ``generation_config.eos_token_id``, so generation stops where training ends a
    turn; its id. A token the vocabulary lacks is refused."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"train.eos_token {token!r} is not a single token of the tokenizer's vocabulary")
    tokenizer.eos_token = token
    if model is not None:
        config = model.generation_config
        current = config.eos_token_id
        config.eos_token_id = sorted({*(current if isinstance(current, list) else [current]), token_id} - {None})
    return int(token_id)


def encode(
    tokenizer: Any, messages: list[dict[str, str]], template: str, train_on_inputs: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels: labels copy the ids on assistant tokens and are IGNORE elsewhere, or
    copy every id with ``train_on_inputs`` (train.train_on_inputs)."""
    text, spans = assistant_spans(tokenizer, messages, template)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if train_on_inputs:
        return list(encoded["input_ids"]), list(encoded["input_ids"])
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(begin <= start < stop for begin, stop in spans) and end > start
        labels.append(token if inside else IGNORE)
    return list(encoded["input_ids"]), labels


def token_length(tokenizer: Any, messages: list[dict[str, str]], template: str) -> int:
    """Tokens of the rendered conversation, as training sees it."""
    return len(tokenizer(render(tokenizer, messages, template), add_special_tokens=False)["input_ids"])


def nothing_to_learn(labels: list[int]) -> bool:
    """Whether a (truncated) example's labels leave no target: the first label is never predicted."""
    return all(label == IGNORE for label in labels[1:])


def prepare(
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    template: str,
    max_seq_len: int,
    overlong: str,
    train_on_inputs: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Encode conversations for training; longer than ``max_seq_len`` -> truncated or dropped.

    Returns the examples (``input_ids``, ``labels``, ``example_id``: the conversation's index)
    and the counts a run reports: kept, truncated, dropped_overlong, dropped_no_target (nothing
    left to learn after truncation).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the tokenizer is not a fast (Rust) tokenizer; the loss mask needs its offset mapping")
    counts = {"examples": len(conversations), "kept": 0, "truncated": 0, "dropped_overlong": 0, "dropped_no_target": 0}
    examples: list[dict[str, Any]] = []
    for index, messages in enumerate(conversations):
        ids, labels = encode(tokenizer, messages, template, train_on_inputs)
        if len(ids) > max_seq_len:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            counts["truncated"] += 1
        if nothing_to_learn(labels):
            counts["dropped_no_target"] += 1
            continue
        counts["kept"] += 1
        examples.append({"input_ids": ids, "labels": labels, "example_id": index})
    return examples, counts


def pack(examples: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate whole examples, in order, into sequences of at most ``max_seq_len`` tokens,
    with ``position_ids`` that start again at 0 for each example.

    Without cross-talk: given position ids and no attention mask, transformers' causal mask is
    block-diagonal by example (``masking_utils.find_packed_sequence_indices``, every attention
    implementation), so no example attends to another and each keeps the positions it has alone;
    ``PackedCollator`` pads in a block of its own. The first token of each example is never a
    target (it would be predicted from the previous example). A packed sequence's ``example_id``
    is its first example's.
    """
    packed: list[dict[str, list[int]]] = []
    for example in examples:
        n = len(example["input_ids"])
        piece = {
            "input_ids": list(example["input_ids"]),
            "labels": [IGNORE, *example["labels"][1:]],
            "position_ids": list(range(n)),
        }
        last = packed[-1] if packed else None
        if last is not None and len(last["input_ids"]) + n <= max_seq_len:
            for key in ("input_ids", "labels", "position_ids"):
                last[key] = last[key] + piece[key]
        else:
            packed.append({**example, **piece})
    return packed


class PackedCollator:
    """Batches of packed sequences: padded at the end with a block of its own (positions from 0,
    labels ignored), no attention mask and no KV cache, so the model builds the block-diagonal
    causal mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
            positions = f.get("position_ids") or range(len(f["input_ids"]))  # an unpacked one (eval)
            batch["position_ids"].append(list(positions) + list(range(pad)))
        # No KV cache: with one, transformers skips the packed-sequence mask (it is for generation).
        return {**{key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}, "use_cache": False}


def conversations(frame: Any, split: str) -> list[list[dict[str, str]]]:
    """The parsed conversations of one split (``train`` or ``eval``) of a causal-lm snapshot."""
    return [parse_messages(m) for m in frame.loc[frame["split"] == split, "messages"]]


def encode_split(cfg: PipelineConfig, tokenizer: Any, frame: Any, split: str) -> tuple[list[dict], dict[str, int], str]:
    """A split's conversations as training examples, with the length-policy counts and the
    template used: what train trains on and evaluate scores, encoded the same way."""
    own = cfg.train
    try:
        template = chat_template(tokenizer, own.chat_template)
        # The loss on the prompt too (train_on_inputs) for training only: evaluate's figures stay comparable.
        examples, counts = prepare(
            tokenizer,
            conversations(frame, split),
            template,
            own.max_seq_len,
            own.overlong,
            train_on_inputs=own.train_on_inputs and split == "train",
        )
    except ValueError as exc:
        raise ConfigError(f"base_model '{cfg.base_model}': {exc}") from exc
    if counts["examples"] and not examples:
        raise DataError(
            f"{own.snapshot_uri}: none of the {counts['examples']} {split} conversations fits "
            f"train.max_seq_len={own.max_seq_len} with something left to learn "
            f"(overlong={own.overlong}: {counts})"
        )
    return examples, counts, template


def words(text: str) -> list[str]:
    """Tokens for ROUGE-L and exact match, of the normalised text: words (numbers included: an
    order number in an answer matters), and each CJK character on its own."""
    return re.findall(f"[{CJK}]|\\w+", normalize_text(text))


def rouge_l(reference: str, output: str) -> float:
    """ROUGE-L F1: longest common subsequence of words over the reference's and output's lengths."""
    ref, out = words(reference), words(output)
    if not ref or not out:
        return float(ref == out)
    previous = [0] * (len(out) + 1)
    for token in ref:
        current = [0]
        for j, other in enumerate(out, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(out), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(reference: str, output: str) -> float:
    return float(words(reference) == words(output))


def token_loss(model: Any, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed next-token cross-entropy over the labelled tokens, and how many there were.

    Summed, not averaged per batch, so the figure does not depend on batching: the train step's
    value before saving and the evaluate step's after reloading must agree to the last digits.
    """
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, example in enumerate(batch):
                n = len(example["input_ids"])
                ids[row, :n] = torch.tensor(example["input_ids"])
                labels[row, :n] = torch.tensor(example["labels"])
                mask[row, :n] = 1
            device = next(model.parameters()).device
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)),
                    shifted.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
            count += int((shifted != IGNORE).sum())
    return total, count
