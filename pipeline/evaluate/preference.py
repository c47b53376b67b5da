"""preference: how the tuned model ranks the held-out pairs' answers, beside the reference model
(``train.reference_model``, else the base model) and the champion, and how well it still predicts
the chosen answers (their perplexity). The metrics are ``pipeline.preference.preference_metrics``'.

torch and mlflow are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline import chat, preference
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.evaluate.causal_lm import on_accelerator
from pipeline.evaluate.scored import Scored, print_metrics
from pipeline.models import load_causal_lm, load_trained_lm, resolve_model

SAMPLES = 20  # pairs shown in samples.json (the model card's)


def evaluate_preference(cfg: PipelineConfig, frame: Any, scratch: Path) -> Scored:
    own = cfg.evaluate
    rows = frame[frame["split"] == "eval"]
    if rows.empty:
        raise DataError(f"{own.snapshot_uri}: the eval split has no pairs; raise collect.eval_fraction")
    pairs = preference.pairs(frame, "eval")
    model, tokenizer = load_trained_lm(own.model_uri, cfg.base_model, scratch)
    model = on_accelerator(model)
    encoded = _encoded(cfg, tokenizer, pairs)
    logps = _logps(cfg, model, tokenizer, encoded)
    beta = cfg.train.dpo_beta
    # The reference: train.reference_model, else the base (a LoRA model's own, its adapter switched off).
    if cfg.train.reference_model:
        reference, _ = _reference(cfg, scratch)
        reference_logps = _logps(cfg, on_accelerator(reference), tokenizer, encoded)
        with _base(cfg, scratch, model) as base:
            base_logps = _logps(cfg, base, tokenizer, encoded)
    else:
        with _base(cfg, scratch, model) as base:
            base_logps = reference_logps = _logps(cfg, base, tokenizer, encoded)
    metrics = preference.preference_metrics(logps, reference_logps, beta)
    base_metrics = preference.preference_metrics(base_logps, reference_logps, beta)
    print_metrics(f"{len(pairs)} eval pairs", metrics)
    print_metrics("base model", base_metrics)

    def score_other(other: Any, other_tokenizer: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        if other.get_output_embeddings() is None:  # e.g. a champion registered as a classifier
            raise ModelError(
                f"the champion of {cfg.model_name} is a {type(other).__name__}, not a causal LM: its answers' "
                "log-probabilities cannot be scored against the new model's; register it as a chat model"
            )
        if other_tokenizer.pad_token is None:
            other_tokenizer.pad_token = other_tokenizer.eos_token
        theirs = _logps(cfg, on_accelerator(other), other_tokenizer, _encoded(cfg, other_tokenizer, pairs))
        return preference.preference_metrics(theirs, reference_logps, beta), {}

    return Scored(
        rows[list(preference.FIELDS)],
        metrics,
        {},
        base_metrics,
        {"samples.json": preference.as_json(preference.sample_rows(pairs, logps, SAMPLES))},
        score_other,
        baseline=base_metrics,
        baseline_name="base model",
    )


def _encoded(cfg: PipelineConfig, tokenizer: Any, pairs: list[Any]) -> list[dict[str, list[int]]]:
    try:
        template = chat.chat_template(tokenizer, cfg.train.chat_template)
        return [preference.encode_pair(tokenizer, pair, template) for pair in pairs]
    except ValueError as exc:
        raise ConfigError(f"base_model '{cfg.base_model}': {exc}") from exc


def _logps(cfg: PipelineConfig, model: Any, tokenizer: Any, encoded: list[dict[str, list[int]]]) -> list[list[float]]:
    return preference.answer_logps(model, encoded, tokenizer.pad_token_id, cfg.evaluate.batch_size)


@contextlib.contextmanager
def _base(cfg: PipelineConfig, scratch: Path, model: Any) -> Any:
    """The base model: the tuned one with its LoRA adapter off, or loaded from base_model."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
        return
    base, _ = load_causal_lm(resolve_model(cfg.base_model, scratch / "base"), f"base_model '{cfg.base_model}'")
    yield on_accelerator(base)


def _reference(cfg: PipelineConfig, scratch: Path) -> tuple[Any, Any]:
    """train.reference_model: a registered model (``models:/...``) or a model URI, as train loads it."""
    uri = cfg.train.reference_model
    return load_causal_lm(preference.reference_dir(uri, scratch), f"train.reference_model '{uri}'")
