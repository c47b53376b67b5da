"""train's task families: what each hands the shared Trainer set-up (``Parts``: the model to load,
the tokenizer, the tokenized train and eval splits, the collator, the summary entries), built from
the snapshot before any model is. ``sequence-classification`` tokenizes ``text``/``label``;
``causal-lm`` renders ``messages`` with the chat template (loss on assistant tokens only, optional
packing and LoRA). Both may extend the vocabulary (``train.extend_vocab``) and check
``train.model_kwargs`` against the base model's config first.

    python -c "from pipeline.train import parts; print(parts.label_maps(['refund', 'greeting']))"
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pipeline import chat
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.errors import ConfigError, DataError, ModelError
from pipeline.models import extend_embeddings, extend_vocabulary, lm_tokenizer


@dataclass
class Parts:
    """What a task family hands the shared Trainer set-up."""

    load_model: Any  # () -> model; called after TrainingArguments, so that ZeRO-3 partitions it
    tokenizer: Any
    dataset: Any
    collator: Any
    summary: dict[str, Any]
    after_training: Any = None  # (trainer) -> summary entries; runs on every rank
    eval_dataset: Any = None  # the snapshot's eval split, for train.eval_steps
    warm_start: bool = False  # train.extend_vocab added tokens: _fit may train their rows and the head first
    # A family whose Trainer is not transformers' own (preference: TRL's DPOTrainer): the class, its
    # TrainingArguments subclass and that one's fields of the family, and (model, scratch) -> the
    # Trainer's own keyword arguments, built once the model is loaded.
    trainer_class: Any = None
    arguments_class: Any = None
    arguments: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: Any = None


def classification_parts(cfg: PipelineConfig, model_dir: str, frame: Any, model_kwargs: dict[str, Any]) -> Parts:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    rows = frame[frame["split"] == "train"].reset_index(drop=True)
    labels = sorted({str(v) for v in frame["label"].dropna().tolist()})
    if len(labels) < 2:
        raise DataError(f"{cfg.train.snapshot_uri}: needs at least 2 labels to train a classifier, found {labels}")
    id2label, label2id = label_maps(labels)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base_model '{cfg.base_model}': cannot load its tokenizer: {exc}") from exc

    added = _extend_vocab(cfg.train, tokenizer, rows["text"].tolist())

    def load_model() -> Any:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                trust_remote_code=False,
                **model_kwargs,
            )
        except (OSError, ValueError, TypeError) as exc:
            with_kwargs = f" with train.model_kwargs {model_kwargs}" if model_kwargs else ""
            raise ModelError(f"base_model '{cfg.base_model}'{with_kwargs}: cannot load: {exc}") from exc
        if added:
            extend_embeddings(model, list(added.values()))
        return model

    limit = cfg.train.max_seq_len
    dataset, tokens, truncated = _encode_labelled(tokenizer, rows, limit, label2id)
    held_out = frame[(frame["split"] == "eval") & frame["label"].notna()].reset_index(drop=True)
    eval_dataset, _, eval_truncated = (
        _encode_labelled(tokenizer, held_out, limit, label2id) if len(held_out) else (None, 0, 0)
    )
    if truncated or eval_truncated:
        print(
            f"train: texts longer than train.max_seq_len={cfg.train.max_seq_len} tokens, truncated: "
            f"{truncated} of {len(rows)} train, {eval_truncated} of {len(held_out)} eval",
            file=sys.stderr,
            flush=True,
        )
    return Parts(
        load_model,
        tokenizer,
        dataset,
        DataCollatorWithPadding(tokenizer),
        {
            "labels": labels,
            "examples": len(rows),
            "truncated": {"train": truncated, "eval": eval_truncated},
            "train_tokens": tokens,
            "extended_vocab": {"added_tokens": len(added), "tokens": "".join(added)},
        },
        eval_dataset=eval_dataset if cfg.train.eval_steps else None,
        warm_start=bool(added),
    )


def _encode_labelled(tokenizer: Any, split_rows: Any, limit: int, label2id: dict[str, int]) -> tuple[Any, int, int]:
    """A split's labelled texts as the classifier's Dataset, its tokens (counted here: read back from
    the Dataset, the column comes out of Arrow a row at a time, which took longer than the
    tokenizing) and the rows longer than ``limit`` tokens, truncated."""
    # .tolist(): Arrow-backed columns convert at once; iterating them boxes a value at a time.
    texts = split_rows["text"].tolist()
    encoded = tokenizer(texts, truncation=True, max_length=limit)
    # Only a row at the limit can have been cut: those are tokenized again, whole.
    at_limit = [texts[i] for i, ids in enumerate(encoded["input_ids"]) if len(ids) >= limit]
    whole = tokenizer(at_limit)["input_ids"] if at_limit else []
    return (
        _token_dataset(
            {
                **encoded,
                "labels": [label2id[str(v)] for v in split_rows["label"].tolist()],
                "example_id": list(range(len(split_rows))),
            }
        ),
        sum(map(len, encoded["input_ids"])),
        sum(len(ids) > limit for ids in whole),
    )


# The Arrow types Dataset.from_dict infers for a tokenizer's columns, given up front: inferring them
# took longer than anything else train does around the tokenizer (0.3 s of 0.5 s per 100,000 rows).
TOKEN_COLUMN_TYPES: dict[str, Any] = {"input_ids": "int32", "token_type_ids": "int8", "attention_mask": "int8"}


def _token_dataset(columns: dict[str, list[Any]]) -> Any:
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(
        InMemoryTable(
            pa.table(
                {
                    name: pa.array(
                        values,
                        pa.list_(pa.type_for_alias(TOKEN_COLUMN_TYPES[name])) if name in TOKEN_COLUMN_TYPES else None,
                    )
                    for name, values in columns.items()
                }
            )
        )
    )


def causal_lm_parts(cfg: PipelineConfig, model_dir: str, frame: Any, model_kwargs: dict[str, Any]) -> Parts:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    own = cfg.train
    tokenizer = lm_tokenizer(model_dir, f"base_model '{cfg.base_model}'")
    if own.eos_token:  # the saved tokenizer's EOS: generation stops where training ends a turn
        try:
            chat.use_eos_token(tokenizer, None, own.eos_token)
        except ValueError as exc:
            raise ConfigError(f"base_model '{cfg.base_model}': {exc}") from exc
    # Before encoding: the conversations are tokenized with the new tokens.
    added = _extend_vocab(
        own, tokenizer, (m["content"] for messages in chat.conversations(frame, "train") for m in messages)
    )
    examples, counts, template = chat.encode_split(cfg, tokenizer, frame, "train")
    eval_examples, eval_counts, _ = chat.encode_split(cfg, tokenizer, frame, "eval")
    print(f"train: conversations {counts}", file=sys.stderr, flush=True)
    if own.packing:
        examples = chat.pack(examples, own.max_seq_len)
    tokenizer.chat_template = template  # the published tokenizer renders as training did

    dataset = Dataset.from_list(examples)
    collator = (
        chat.PackedCollator(tokenizer.pad_token_id)
        if own.packing
        else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=chat.IGNORE, padding=True)
    )
    return Parts(
        partial(_causal_lm_model, cfg, model_dir, model_kwargs, tokenizer, added),
        tokenizer,
        dataset,
        collator,
        {
            "conversations": counts,
            "eval_conversations": eval_counts,
            "packed_sequences": len(examples),
            "lora": bool(own.lora_r),
            "examples": counts["examples"],
            "train_tokens": sum(len(e["input_ids"]) for e in examples),
            "extended_vocab": {"added_tokens": len(added), "tokens": "".join(added)},
        },
        partial(_in_memory_eval_loss, own, tokenizer, eval_examples),
        # Never packed: the held-out loss is per conversation, as evaluate scores it.
        eval_dataset=Dataset.from_list(eval_examples) if own.eval_steps and eval_examples else None,
        warm_start=bool(added),
    )


def _causal_lm_model(
    cfg: PipelineConfig, model_dir: str, model_kwargs: dict[str, Any], tokenizer: Any, added: dict[str, list[int]]
) -> Any:
    """causal-lm's ``Parts.load_model``: the base model, its rows for ``added``, the LoRA adapter.
    What from_pretrained or PEFT refuse of the settings is bad input, named by its setting."""
    from transformers import AutoModelForCausalLM

    own = cfg.train
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, **model_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        with_kwargs = f" with train.model_kwargs {model_kwargs}" if model_kwargs else ""
        raise ModelError(f"base_model '{cfg.base_model}'{with_kwargs}: cannot load: {exc}") from exc
    if added:
        extend_embeddings(model, list(added.values()))
    if own.eos_token:  # a stop token of the saved generation config
        chat.use_eos_token(tokenizer, model, own.eos_token)
    if not own.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    # The new rows train beside the adapter (PEFT's trainable tokens; tied output embeddings too).
    new_ids = list(range(len(tokenizer) - len(added), len(tokenizer)))
    try:
        return get_peft_model(
            model,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=own.lora_r,
                lora_alpha=own.lora_alpha,
                lora_dropout=own.lora_dropout,
                target_modules=lora_target_modules(cfg, model),
                trainable_token_indices=new_ids or None,
            ),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"train.lora_r={own.lora_r}, train.lora_alpha={own.lora_alpha}, train.lora_dropout={own.lora_dropout}, "
            f"train.lora_target_modules={own.lora_target_modules}: PEFT cannot build the adapter on base_model "
            f"'{cfg.base_model}': {exc}"
        ) from exc


def lora_target_modules(cfg: PipelineConfig, model: Any) -> str | list[str] | None:
    """``train.lora_target_modules`` as PEFT's ``LoraConfig`` takes it, each name checked against the
    modules of ``model``: a name matches a module whose dotted name is it or ends with it, as PEFT
    matches a list. ``all-linear`` (PEFT's shorthand, every linear layer but the output layer) goes
    as the string PEFT expects; empty: None, PEFT's default for the architecture."""
    targets = list(cfg.train.lora_target_modules)
    if not targets:
        return None
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if any(name == target or name.endswith(f".{target}") for name in names):
            continue
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        close = difflib.get_close_matches(target, leaves, n=3, cutoff=0.5)
        raise ConfigError(
            f"train.lora_target_modules: base_model '{cfg.base_model}' has no module '{target}'"
            + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else "")
            + f"; its linear layers are {_linear_layers(model)}, or '{ALL_LINEAR}' adapts all of them but the "
            "output layer"
        )
    return targets


ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND


def _linear_layers(model: Any, shown: int = 8) -> list[str]:
    """The names LoRA can adapt in ``model`` (the last part of each linear layer's name), the output layer's left out."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name
            and module is not output
            and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
        }
    )
    return found[:shown]


def _in_memory_eval_loss(own: TrainConfig, tokenizer: Any, eval_examples: list[Any], trainer: Any) -> dict[str, Any]:
    """causal-lm's ``Parts.after_training``."""
    # The loss of the weights as they are in memory (sharded, under ZeRO-3), on the held-out
    # conversations; the evaluate step recomputes it from the saved files. Equal figures show
    # the save wrote the trained weights, not ZeRO-3's empty placeholders.
    total, tokens = chat.token_loss(trainer.model, eval_examples, tokenizer.pad_token_id, own.batch_size)
    return {"eval_loss_in_memory": total / tokens if tokens else None, "eval_tokens": tokens}


def _extend_vocab(own: TrainConfig, tokenizer: Any, texts: Any) -> dict[str, list[int]]:
    """train.extend_vocab: the characters of the training texts the tokenizer cannot read become
    tokens of their own (models.extend_vocabulary); what each read as before, by character."""
    if not own.extend_vocab:
        return {}
    added = extend_vocabulary(tokenizer, texts, own.extend_vocab_min_count)
    if added:
        print(
            f"train: extend_vocab: {len(added)} characters the tokenizer could not read are new tokens: "
            f"{''.join(list(added)[:40])}{'...' if len(added) > 40 else ''}",
            file=sys.stderr,
            flush=True,
        )
    return added


TASK_PARTS = {"sequence-classification": classification_parts, "causal-lm": causal_lm_parts}  # and train.preference's


def model_kwargs(cfg: PipelineConfig, model_dir: str) -> dict[str, Any]:
    """``train.model_kwargs``, each checked against the base model's config before any model is
    built: ``attn_implementation``, or an attribute of the config that from_pretrained overrides."""
    if not cfg.train.model_kwargs:
        return {}
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base_model '{cfg.base_model}': cannot load its config: {exc}") from exc
    for name in cfg.train.model_kwargs:
        if name != "attn_implementation" and not hasattr(config, name):
            raise ConfigError(
                f"train.model_kwargs.{name}: neither attn_implementation nor an attribute of "
                f"{type(config).__name__}, the config of base_model '{cfg.base_model}'"
            )
    return dict(cfg.train.model_kwargs)


def label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    ordered = sorted(labels)
    return dict(enumerate(ordered)), {label: i for i, label in enumerate(ordered)}
