"""Preference pairs (task ``preference``): a prompt and two answers to it, ``chosen`` preferred over
``rejected``, as collect stores them, validate checks them, train's DPO trains on them and evaluate
scores them. One encoding for all three: the prompt rendered with the chat template and its
generation prompt, each answer the tokens the template adds after it (TRL's DPOTrainer splits a
pair the same way).

A field is a list of chat messages or plain text: a text prompt is one user turn, a text answer
one assistant turn.

    python -c "from pipeline import preference; print(preference.to_pair({'prompt': 'hi', 'chosen': 'Hello!', 'rejected': 'Bye.'}))"

torch and mlflow are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline import chat, tracking
from pipeline.errors import ModelError
from pipeline.models import resolve_model

FIELDS = ("prompt", "chosen", "rejected")
Messages = list[dict[str, str]]


def to_messages(value: Any, field: str) -> Messages:
    """One field as messages: text is one turn (the prompt's a user turn, an answer's the
    assistant's); ``ValueError`` names the field."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    try:
        return chat.parse_messages(value)
    except ValueError as exc:
        raise ValueError(f"'{field}': {str(exc).replace(chr(39) + 'messages' + chr(39), 'the value')}") from None


def to_pair(record: dict[str, Any]) -> tuple[Messages, Messages, Messages]:
    """A source record's prompt, chosen and rejected as messages; ``ValueError`` names the field."""
    missing = [f for f in FIELDS if record.get(f) is None]
    if missing:
        raise ValueError(f"needs {list(FIELDS)}; missing {missing}")
    prompt, chosen, rejected = (to_messages(record[f], f) for f in FIELDS)
    return prompt, chosen, rejected


def dumps(messages: Messages) -> str:
    return chat.dumps(messages)


def pair_problem(prompt: Messages, chosen: Messages, rejected: Messages) -> str | None:
    """What breaks a pair, or None: the prompt must end with a user turn, each answer be assistant
    turns with text, and the two answers differ."""
    if not prompt or prompt[-1]["role"] != "user":
        return "'prompt' must end with a user turn"
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or any(m["role"] != "assistant" for m in answer):
            return f"'{field}' must be assistant turns only"
        if not any(m["content"].strip() for m in answer):
            return f"'{field}' is an empty answer"
        problem = chat.role_problem(prompt + answer[:1])
        if problem:
            return f"'prompt' + '{field}': {problem}"
    if normalized(chosen) == normalized(rejected):
        return "'chosen' and 'rejected' are the same answer"
    return None


def normalized(messages: Messages) -> str:
    return "\n".join(" ".join(m["content"].split()).lower() for m in messages)


def parse_row(row: Any) -> tuple[Messages, Messages, Messages]:
    """A snapshot row's pair (its fields are chat.dumps JSON)."""
    return tuple(chat.parse_messages(row[f]) for f in FIELDS)  # type: ignore[return-value]


def pairs(frame: Any, split: str) -> list[tuple[Messages, Messages, Messages]]:
    rows = frame[frame["split"] == split]
    return [tuple(chat.parse_messages(v) for v in values) for values in zip(*(rows[f].tolist() for f in FIELDS))]  # type: ignore[misc]


def encode_answer(tokenizer: Any, prompt: Messages, answer: Messages, template: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens (rendered with its generation prompt) and the answer's: what the
    template renders after the prompt, its end-of-turn tokens included. Where the two renderings
    part before the prompt ends (tokens merging across the boundary), the answer starts there."""
    prompt_ids = tokenizer(chat.render(tokenizer, prompt, template, True), add_special_tokens=False)["input_ids"]
    full = tokenizer(chat.render(tokenizer, prompt + answer, template), add_special_tokens=False)["input_ids"]
    shared = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        shared += 1
    return list(full[:shared]), list(full[shared:])


def encode_pair(tokenizer: Any, pair: tuple[Messages, Messages, Messages], template: str) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` as TRL's DataCollatorForPreference takes them."""
    prompt, chosen, rejected = pair
    prompt_ids, chosen_ids = encode_answer(tokenizer, prompt, chosen, template)
    prompt_rejected, rejected_ids = encode_answer(tokenizer, prompt, rejected, template)
    shared = min(len(prompt_ids), len(prompt_rejected))
    if prompt_ids[:shared] != prompt_rejected[:shared] or len(prompt_ids) != len(prompt_rejected):
        # the prompt's end merged differently with each answer: both answers start where both agree
        while shared and prompt_ids[:shared] != prompt_rejected[:shared]:
            shared -= 1
        chosen_ids = prompt_ids[shared:] + chosen_ids
        rejected_ids = prompt_rejected[shared:] + rejected_ids
        prompt_ids = prompt_ids[:shared]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def pair_tokens(encoded: dict[str, list[int]]) -> tuple[int, int]:
    """Tokens of prompt + chosen and of prompt + rejected: what must fit train.max_seq_len."""
    prompt = len(encoded["prompt_ids"])
    return prompt + len(encoded["chosen_ids"]), prompt + len(encoded["rejected_ids"])


def answer_logps(model: Any, encoded: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> list[list[float]]:
    """For each pair: the summed log-probability of the chosen answer's tokens given the prompt, its
    token count, and the same of the rejected answer ``[chosen_logp, chosen_tokens, rejected_logp,
    rejected_tokens]``. Sums per answer, so that batching cannot move them."""
    import torch

    sequences = []
    for e in encoded:
        for answer in ("chosen_ids", "rejected_ids"):
            sequences.append((e["prompt_ids"] + e[answer], len(e["prompt_ids"])))
    sums: list[tuple[float, int]] = []
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (tokens, prompt_len) in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                target[row, prompt_len : len(tokens)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1))[..., 0]
            chosen = target[:, 1:].to(device)
            for row in range(len(batch)):
                sums.append((float(logps[row][chosen[row]].sum()), int(chosen[row].sum())))
    return [[*sums[2 * i], *sums[2 * i + 1]] for i in range(len(encoded))]


def preference_metrics(own: list[list[float]], reference: list[list[float]], beta: float) -> dict[str, float]:
    """Of a model's answer log-probabilities (``answer_logps``) beside the reference model's:

    - ``reward_accuracy``, ``reward_margin``: the model's own preference, reference-free: the share
      of pairs whose chosen answer has the higher mean token log-probability, and the mean of that
      difference (SimPO's reward). It compares any two models, the base among them;
    - ``dpo_reward_accuracy``, ``dpo_reward_margin``: DPO's implicit reward
      ``beta * (log p(answer) - log p_ref(answer))``, chosen against rejected (TRL's
      ``rewards/accuracies`` and ``rewards/margins``); zero for the reference itself;
    - ``chosen_perplexity``: of the chosen answers' tokens."""
    n = len(own)
    mean_margin = [c / max(nc, 1) - r / max(nr, 1) for c, nc, r, nr in own]
    dpo = [beta * ((c - rc) - (r - rr)) for (c, _, r, _), (rc, _, rr, _) in zip(own, reference)]
    chosen_loss = -sum(p[0] for p in own) / max(sum(p[1] for p in own), 1)
    return {
        "reward_accuracy": sum(m > 0 for m in mean_margin) / n,
        "reward_margin": sum(mean_margin) / n,
        "dpo_reward_accuracy": sum(d > 0 for d in dpo) / n,
        "dpo_reward_margin": sum(dpo) / n,
        "chosen_perplexity": math.exp(min(chosen_loss, 50.0)),
    }


def sample_rows(
    pairs_: list[tuple[Messages, Messages, Messages]], own: list[list[float]], shown: int
) -> list[dict[str, Any]]:
    """The first pairs with the model's mean token log-probability of each answer, for the model card."""
    rows = []
    for (prompt, chosen, rejected), (c, nc, r, nr) in list(zip(pairs_, own))[:shown]:
        rows.append(
            {
                "prompt": prompt[-1]["content"],
                "chosen": chosen[-1]["content"],
                "rejected": rejected[-1]["content"],
                "chosen_logp": c / max(nc, 1),
                "rejected_logp": r / max(nr, 1),
            }
        )
    return rows


def as_json(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps(rows, ensure_ascii=False, indent=2).encode()


def reference_dir(uri: str, scratch: Path) -> str:
    """A local directory of ``train.reference_model``, what train's DPO and evaluate measure the
    implicit reward against: a registered model (``models:/<name>@<alias>``) downloaded from the
    registry (its Hugging Face model directory), else the URI as base_model's are resolved."""
    target = scratch / "reference"
    if not uri.startswith("models:/"):
        return resolve_model(uri, target, what="train.reference_model")
    import mlflow

    try:
        with tracking.module_api():
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:  # the registry names what it lacks (model, alias, version)
        raise ModelError(f"train.reference_model '{uri}': cannot download it from the registry: {exc}") from exc
    weights = sorted(p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    if not weights:
        raise ModelError(f"train.reference_model '{uri}': the registered model holds no Hugging Face model directory")
    return str(weights[0])
