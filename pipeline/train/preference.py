"""train's ``preference`` task family: DPO (TRL's ``DPOTrainer``) on the snapshot's
``prompt``/``chosen``/``rejected`` pairs, under the same DeepSpeed configs, LoRA, checkpoints and
SIGTERM handling as the other families (the recipe in ``pipeline.train`` runs it; this part hands
it the Trainer class, its arguments and the reference model).

The pairs are encoded here, as validate counted them (``pipeline.preference.encode_pair``: the
prompt with the chat template's generation prompt, each answer what the template renders after
it), and the Trainer takes them as they are. The reference model is ``train.reference_model``
(a model URI, or a registered model ``models:/<name>@<alias>``), else the base model: with LoRA,
the base model is the policy with its adapter switched off (nothing loaded twice).

    finetune train --set task=preference --set train.snapshot_uri=file:///.../data.parquet

torch, transformers, trl, peft and mlflow are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path
from typing import Any

from pipeline import chat, preference
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.models import lm_tokenizer
from pipeline.train.parts import Parts, _causal_lm_model, lora_target_modules


def preference_parts(cfg: PipelineConfig, model_dir: str, frame: Any, model_kwargs: dict[str, Any]) -> Parts:
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    own = cfg.train
    if own.extend_vocab:
        raise ConfigError(
            "train.extend_vocab: not for task=preference (tune a model that reads its data); set it false"
        )
    if own.packing:
        raise ConfigError("train.packing: not for task=preference (DPO pairs are never packed); set it false")
    tokenizer = lm_tokenizer(model_dir, f"base_model '{cfg.base_model}'")
    try:
        if own.eos_token:
            chat.use_eos_token(tokenizer, None, own.eos_token)
        template = chat.chat_template(tokenizer, own.chat_template)
    except ValueError as exc:
        raise ConfigError(f"base_model '{cfg.base_model}': {exc}") from exc
    train_examples, counts = encode_pairs(cfg, tokenizer, frame, "train", template)
    eval_examples, eval_counts = encode_pairs(cfg, tokenizer, frame, "eval", template)
    print(f"train: preference pairs {counts}", file=sys.stderr, flush=True)
    tokenizer.chat_template = template  # the published tokenizer renders as training did
    return Parts(
        partial(_causal_lm_model, _without_lora(cfg), model_dir, model_kwargs, tokenizer, {}),
        tokenizer,
        Dataset.from_list(train_examples),
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=own.max_seq_len),
        {
            "pairs": counts,
            "eval_pairs": eval_counts,
            "lora": bool(own.lora_r),
            "examples": counts["kept"],
            "train_tokens": sum(sum(preference.pair_tokens(e)) for e in train_examples),
            "reference_model": own.reference_model or cfg.base_model,
            "dpo_beta": own.dpo_beta,
        },
        eval_dataset=Dataset.from_list(eval_examples) if own.eval_steps and eval_examples else None,
        trainer_class=_dpo_trainer(),
        arguments_class=DPOConfig,
        arguments={
            "beta": own.dpo_beta,
            "max_length": own.max_seq_len,  # validate refuses longer pairs; the collator cuts any left
            "gradient_checkpointing": False,  # TRL's default is on; the other families' is off (train.trainer_args)
            "precompute_ref_log_probs": False,
        },
        trainer_kwargs=partial(_trainer_kwargs, cfg, tokenizer),
    )


def encode_pairs(
    cfg: PipelineConfig, tokenizer: Any, frame: Any, split: str, template: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A split's pairs as DPO's examples (with ``example_id``, for the sharding audit), the longer
    ones than train.max_seq_len dropped (train.overlong=drop) or cut by the collator (truncate)."""
    own = cfg.train
    examples, counts = [], {"examples": 0, "kept": 0, "truncated": 0, "dropped_overlong": 0}
    for index, pair in enumerate(preference.pairs(frame, split)):
        counts["examples"] += 1
        try:
            encoded = preference.encode_pair(tokenizer, pair, template)
        except ValueError as exc:
            raise ConfigError(f"base_model '{cfg.base_model}': {exc}") from exc
        if max(preference.pair_tokens(encoded)) > own.max_seq_len:
            if own.overlong == "drop" or len(encoded["prompt_ids"]) >= own.max_seq_len:
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
        counts["kept"] += 1
        examples.append({**encoded, "example_id": index})
    if split == "train" and not examples:
        raise DataError(
            f"{own.snapshot_uri}: none of the {counts['examples']} train pairs fits train.max_seq_len="
            f"{own.max_seq_len} ({counts})"
        )
    return examples, counts


def _without_lora(cfg: PipelineConfig) -> PipelineConfig:
    """The base model without an adapter: DPOTrainer adds it (its ``peft_config``), so that the
    reference is the policy with the adapter off rather than a copy of the adapter."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora_r=0, eos_token=cfg.train.eos_token))


def _trainer_kwargs(cfg: PipelineConfig, tokenizer: Any, model: Any, scratch: Path) -> dict[str, Any]:
    """DPOTrainer's own arguments, once the policy is loaded (after the TrainingArguments: ZeRO-3
    partitions the reference model as it loads too)."""
    own = cfg.train
    kwargs: dict[str, Any] = {"processing_class": tokenizer}
    if own.lora_r:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            task_type="CAUSAL_LM",
            r=own.lora_r,
            lora_alpha=own.lora_alpha,
            lora_dropout=own.lora_dropout,
            target_modules=lora_target_modules(cfg, model),
        )
    if own.reference_model:
        kwargs["ref_model"] = load_reference(cfg, scratch)
    return kwargs


def load_reference(cfg: PipelineConfig, scratch: Path) -> Any:
    from transformers import AutoModelForCausalLM

    uri = cfg.train.reference_model
    path = preference.reference_dir(uri, scratch)
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"train.reference_model '{uri}': cannot load a causal LM from {path}: {exc}") from exc


def _dpo_trainer() -> Any:
    from trl import DPOTrainer

    class PreferenceTrainer(DPOTrainer):
        """TRL's DPOTrainer on pairs already encoded (as validate counted them)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreferenceTrainer
