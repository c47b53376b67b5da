"""causal-lm: eval loss and perplexity on the assistant tokens of the held-out conversations,
overall and per language, the base model's on the same tokens, and exact match and ROUGE-L of
greedy generations.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline import chat
from pipeline.config import PipelineConfig
from pipeline.errors import DataError
from pipeline.evaluate.scored import Scored, print_metrics
from pipeline.models import extend_like, load_causal_lm, load_trained_lm, resolve_model
from pipeline.text import language_of

# Of greedy answers; the others are of the loss. stop_rate: the share of answers that ended with a
# stop token before evaluate.max_new_tokens (a model that never stops scores 0).
GENERATION_METRICS = ("exact_match", "rouge_l", "stop_rate")


def generate(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], template: str, cfg: PipelineConfig
) -> list[dict[str, Any]]:
    """Greedy answers to the last user turn of each conversation, scored against the reference."""
    import torch

    samples = []
    stop = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    stop.discard(None)
    model.eval()
    for messages in conversations[: cfg.evaluate.generate_rows]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = chat.render(tokenizer, messages[:last], template, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -cfg.train.max_seq_len :]
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=cfg.evaluate.max_new_tokens,
                eos_token_id=sorted(stop),
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        cut = next((i for i, token in enumerate(new) if token in stop), len(new))
        stopped = cut < len(new)
        output = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
        reference = messages[last]["content"]
        samples.append(
            {
                "prompt": messages[last - 1]["content"],
                "reference": reference,
                "output": output,
                "exact_match": chat.exact_match(reference, output),
                "rouge_l": chat.rouge_l(reference, output),
                "stopped": stopped,
            }
        )
    return samples


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def score_lm(
    cfg: PipelineConfig,
    model: Any,
    tokenizer: Any,
    frame: Any,
    generate_samples: bool = True,
    encoded: tuple[list[dict], dict[str, int], str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Eval loss and perplexity over the assistant tokens of the eval split; exact match and
    ROUGE-L of generated answers. Loss per token, summed then divided: batching cannot move it.
    ``encoded``: the split as ``chat.encode_split`` gives it for ``tokenizer``, when already done."""
    examples, _, template = encoded or chat.encode_split(cfg, tokenizer, frame, "eval")
    metrics = _loss_metrics(*chat.token_loss(model, examples, tokenizer.pad_token_id, cfg.evaluate.batch_size))
    samples: list[dict[str, Any]] = []
    if generate_samples and cfg.evaluate.generate_rows:
        samples = generate(model, tokenizer, chat.conversations(frame, "eval"), template, cfg)
        metrics["exact_match"] = sum(s["exact_match"] for s in samples) / len(samples)
        metrics["rouge_l"] = sum(s["rouge_l"] for s in samples) / len(samples)
        metrics["stop_rate"] = sum(s["stopped"] for s in samples) / len(samples)
    return metrics, samples


def _loss_metrics(total: float, tokens: int) -> dict[str, float]:
    loss = total / tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def lm_slices(
    cfg: PipelineConfig, model: Any, tokenizer: Any, frame: Any, encoded: tuple[list[dict], dict[str, int], str]
) -> dict[str, dict[str, float]]:
    """Eval loss and perplexity per language of the held-out conversations (their message text)."""
    conversations = chat.conversations(frame, "eval")
    languages = [language_of(" ".join(m["content"] for m in c)) for c in conversations]
    slices = {}
    for name in sorted(set(languages)):
        subset = [e for e in encoded[0] if languages[e["example_id"]] == name]
        if subset:
            total, tokens = chat.token_loss(model, subset, tokenizer.pad_token_id, cfg.evaluate.batch_size)
            slices[name] = {"rows": float(len(subset)), **_loss_metrics(total, tokens)}
    return slices


def evaluate_lm(cfg: PipelineConfig, frame: Any, scratch: Path) -> Scored:
    own = cfg.evaluate
    rows = frame[frame["split"] == "eval"]
    if rows.empty:
        raise DataError(f"{own.snapshot_uri}: the eval split is empty; raise collect.eval_fraction")
    model, tokenizer = load_trained_lm(own.model_uri, cfg.base_model, scratch)
    model = on_accelerator(model)
    encoded = chat.encode_split(cfg, tokenizer, frame, "eval")
    metrics, samples = score_lm(cfg, model, tokenizer, frame, encoded=encoded)
    slices = lm_slices(cfg, model, tokenizer, frame, encoded)
    print_metrics(f"{len(rows)} eval conversations", metrics)
    # The base model on the same tokens (the trained tokenizer: same vocabulary, and the template
    # training used): what fine-tuning bought, and the bar a first champion must clear. Its answers
    # are generated only when the gate is on them (exact_match, rouge_l). A LoRA model holds its
    # base: switch the adapter off.
    answers = bool(own.generate_rows)  # the base model's stop_rate beside the fine-tune's, always
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_metrics, _ = score_lm(cfg, model, tokenizer, frame, generate_samples=answers, encoded=encoded)
    else:
        base, base_tokenizer = load_causal_lm(
            resolve_model(cfg.base_model, scratch / "base"), f"base_model '{cfg.base_model}'"
        )
        extend_like(base, base_tokenizer, tokenizer)  # rows for train.extend_vocab's tokens, as training began
        base_metrics, _ = score_lm(
            cfg, on_accelerator(base), tokenizer, frame, generate_samples=answers, encoded=encoded
        )
    print_metrics("base model", base_metrics)

    def score_other(other: Any, other_tokenizer: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        if other_tokenizer.pad_token is None:
            other_tokenizer.pad_token = other_tokenizer.eos_token
        theirs = chat.encode_split(cfg, other_tokenizer, frame, "eval")
        other = on_accelerator(other)
        return (
            score_lm(cfg, other, other_tokenizer, frame, encoded=theirs)[0],
            lm_slices(cfg, other, other_tokenizer, frame, theirs),
        )

    return Scored(
        rows[["messages"]],
        metrics,
        slices,
        base_metrics,
        {"samples.json": json.dumps(samples, ensure_ascii=False, indent=2).encode()},
        score_other,
        baseline=base_metrics,
        baseline_name="base model",
    )


def on_accelerator(model: Any) -> Any:
    """The model on the GPU where the pod has one (k8s.resources gives a causal LM's evaluate one), else as is."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model
