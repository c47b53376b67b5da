"""train's settings: epochs, optimizer, batch, DeepSpeed ZeRO, LoRA, checkpoints, the
extended vocabulary, and the TrainingArguments fields passed by name.

    finetune train --help

Foundation layer (the ``config`` package): imports nothing of ours but ``fields``, ``errors`` and
``config.trainer_args``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config.trainer_args import PIPELINE_MODEL_KWARGS, check_trainer_args
from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class TrainConfig:
    """train's settings (``train.*``). train runs Hugging Face ``Trainer``; these become its
    ``TrainingArguments`` (transformers 5) as below, and each ``TrainingArguments`` field named here
    is refused in ``train.trainer_args`` (``PIPELINE_TRAINER_ARGS`` names the setting to use).

    Renamed, ``train.*`` -> ``TrainingArguments``:

    - ``epochs`` -> ``num_train_epochs``
    - ``batch_size`` -> ``per_device_train_batch_size``, and ``per_device_eval_batch_size`` for the
      loss of ``eval_steps``
    - ``warmup_ratio`` -> ``warmup_steps`` (transformers 5 reads a float below 1 as a share of the
      optimizer steps; ``warmup_ratio`` is at most 0.5)
    - ``precision`` -> ``bf16`` / ``fp16`` (auto: bf16 on a GPU that supports it, else neither, fp32)
    - ``zero_stage``, ``deepspeed_config``, ``offload_optimizer``, ``offload_params`` -> ``deepspeed``
      (the shipped ``zero<stage>.json`` or ``deepspeed_config``, with the offload entries, as a dict)
    - ``collective_timeout_s`` -> ``ddp_timeout``
    - ``eval_steps`` -> ``eval_strategy="steps"`` and ``eval_steps``; 0: ``eval_strategy="no"``
    - ``checkpoint_steps`` -> ``save_strategy="steps"`` and ``save_steps``; 0: ``save_strategy="epoch"``
    - ``early_stopping_patience`` -> ``load_best_model_at_end``, ``metric_for_best_model="eval_loss"``,
      ``greater_is_better=False``, ``restore_callback_states_from_checkpoint`` and ``save_steps`` =
      ``eval_steps`` (plus an ``EarlyStoppingCallback``)

    Same name: ``learning_rate``, ``gradient_accumulation_steps``, ``weight_decay``,
    ``logging_steps``. Defaults that differ from ``TrainingArguments``' (theirs in brackets):
    ``epochs`` 6 (3), ``learning_rate`` 2e-4 (5e-5), ``batch_size`` 16 (8), ``weight_decay`` 0.01 (0),
    ``warmup_ratio`` 0.1 (``warmup_steps`` 0), ``logging_steps`` 5 (500), ``checkpoint_steps`` 200
    (``save_steps`` 500).

    Set by train itself, with no setting: ``output_dir`` (a node-local folder), ``save_total_limit=1``,
    ``report_to="none"``, ``use_cpu`` (when there is no GPU), ``disable_tqdm=True``,
    ``remove_unused_columns=False``, ``label_names=["labels"]``, ``dataloader_drop_last=True``,
    ``average_tokens_across_devices`` (true for causal-lm only). ``trainer_args`` passes any other
    field by name, as given.

    Not ``TrainingArguments`` fields: ``max_seq_len`` (how examples are tokenized), ``num_processes``
    (torch.distributed.run), ``lora_*`` (PEFT), ``extend_vocab*`` (the new tokens and the frozen first
    phase, whose embeddings and head step at ``extend_vocab_learning_rate``), ``model_kwargs``
    (from_pretrained), ``chat_template``, ``overlong``, ``packing``, ``resume``, ``keep_checkpoints``,
    ``term_grace_s``, ``startup_timeout_s``, ``snapshot_uri``."""

    snapshot_uri: str = option("", "Snapshot to train on (the collect step's snapshot_uri).")
    epochs: int = option(
        6, "Passes over the training split (train.extend_vocab's frozen first phase included).", minimum=1, maximum=100
    )
    learning_rate: float = option(
        2e-4, "Peak learning rate (linear decay after warm-up).", exclusive_minimum=0.0, maximum=1.0
    )
    batch_size: int = option(16, "Examples per process per step (micro-batch).", minimum=1, maximum=1024)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", minimum=1, maximum=1024)
    max_seq_len: int = option(64, "Tokens per example after truncation.", minimum=8, maximum=8192)
    weight_decay: float = option(0.01, "AdamW weight decay.", minimum=0.0, maximum=1.0)
    warmup_ratio: float = option(0.1, "Share of steps spent warming up the learning rate.", minimum=0.0, maximum=0.5)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (shipped configs zero0..zero3.json).", choices=ZERO_STAGES)
    deepspeed_config: str = option("", "A DeepSpeed JSON to use instead of the shipped zero<stage>.json.")
    num_processes: int = option(
        2, "Training processes on this node (GPUs, or CPU processes with gloo).", minimum=1, maximum=64
    )
    logging_steps: int = option(5, "Log loss and learning rate every N optimizer steps.", minimum=1)
    precision: str = option(
        "auto", "Weights and activations: auto = bf16 on GPUs that support it, else fp32.", choices=PRECISIONS
    )
    offload_optimizer: bool = option(False, "ZeRO: keep optimizer states in CPU memory (stage 1-3).")
    offload_params: bool = option(False, "ZeRO-3: keep parameters in CPU memory between uses.")
    # causal-lm only
    chat_template: str = option("", "causal-lm: Jinja chat template, or 'chatml'; empty: the tokenizer's own.")
    overlong: str = option(
        "truncate", "causal-lm: conversations longer than max_seq_len are truncated or dropped.", choices=OVERLONG
    )
    packing: bool = option(False, "causal-lm: pack several conversations into each max_seq_len sequence.")
    eos_token: str = option(
        "",
        "causal-lm: the token that ends an assistant turn, made the tokenizer's EOS and added to the generation "
        "config's eos_token_id (TRL's SFTConfig.eos_token); validate refuses a template whose turns end with "
        "no stop token.",
    )
    train_on_inputs: bool = option(
        False,
        "causal-lm: the loss covers the prompt (system and user turns, template tokens) too, not only the "
        "assistant's turns (Axolotl's train_on_inputs; TRL's assistant_only_loss=False). Training split only: "
        "evaluate scores the assistant's turns either way.",
    )
    dpo_beta: float = option(
        0.1,
        "preference: DPO's beta (TRL's DPOConfig.beta), how far the tuned model may move from the reference "
        "model: higher keeps it closer.",
        exclusive_minimum=0.0,
        maximum=10.0,
    )
    reference_model: str = option(
        "",
        "preference: the reference model of DPO, a model URI as base_model takes, or models:/<name>@<alias> or "
        "models:/<name>/<version> of the registry (e.g. models:/support-chat@champion); empty: base_model.",
    )
    lora_r: int = option(0, "causal-lm: LoRA rank; 0 trains every weight.", minimum=0, maximum=1024)
    lora_alpha: int = option(16, "causal-lm: LoRA scaling numerator (alpha / r).", minimum=1)
    lora_dropout: float = option(0.05, "causal-lm: dropout on the LoRA input.", minimum=0.0, maximum=0.9)
    lora_target_modules: list[str] = option(
        [],
        "causal-lm: module names LoRA adapts, e.g. [q_proj, v_proj], checked against base_model's modules; "
        "all-linear: every linear layer but the output layer; empty: PEFT's default for the architecture.",
    )
    lora_merge: bool = option(
        True,
        "causal-lm: publish the base model with the adapter merged in; false: the "
        "adapter alone, registered with a reference to base_model.",
    )
    collective_timeout_s: int = option(
        1800,
        "Seconds a collective (gloo/NCCL all-reduce, barrier) may wait for "
        "the other ranks before the step fails; bounds a hung or lost rank.",
        minimum=10,
        maximum=86400,
    )
    checkpoint_steps: int = option(
        200,
        "Save a checkpoint to the artifact store every N optimizer steps and at the "
        "last one; 0: at each epoch end instead.",
        minimum=0,
    )
    keep_checkpoints: int = option(
        2, "Complete checkpoints kept per run; older ones are deleted.", minimum=1, maximum=100
    )
    resume: bool = option(
        True,
        "A new attempt of train for the same run resumes from its newest complete "
        "checkpoint; false: start from step 0 and delete the run's checkpoints.",
    )
    term_grace_s: int = option(
        25,
        "On SIGTERM (eviction, preemption) train saves a checkpoint when it fits in "
        "this many seconds, then exits 75 (retried). At most 30: torch.distributed.run "
        "SIGKILLs its workers 30 s after its own SIGTERM.",
        minimum=1,
        maximum=30,
    )
    startup_timeout_s: int = option(
        900,
        "Seconds train may print nothing while starting (model load, DeepSpeed op build, "
        "rendezvous, engine) before it fails, exit 75, naming where it waits; 0: no limit.",
        minimum=0,
        maximum=86400,
    )
    eval_steps: int = option(
        0,
        "Compute the loss on the snapshot's eval split every N optimizer steps while "
        "training (MLflow metric train_eval_loss, a curve); 0: no evaluation during "
        "training.",
        minimum=0,
    )
    early_stopping_patience: int = option(
        0,
        "Stop once the eval loss has not improved for this many evaluations "
        "(needs train.eval_steps) and publish the weights of the best one; "
        "0: train every epoch.",
        minimum=0,
        maximum=1000,
    )
    extend_vocab: bool = option(
        True,
        "Add the characters of the training split that base_model's tokenizer "
        "cannot read (its unknown token; byte-level: a token per byte) as new tokens, "
        "published with the model. Their embeddings start as what the model read "
        "there before and train with the head (LoRA: beside the adapter), the rest "
        "frozen, for the first train.extend_vocab_epochs; then everything trains. "
        "On for sequence-classification, opt-in for causal-lm.",
    )
    extend_vocab_min_count: int = option(2, "Characters the training split holds fewer times stay unknown.", minimum=1)
    extend_vocab_epochs: int = option(
        1,
        "Of train.epochs, the first ones in which only the embeddings and the "
        "head train, when train.extend_vocab added tokens; at most train.epochs - 1 "
        "(the body trains for at least one epoch).",
        minimum=0,
        maximum=100,
    )
    extend_vocab_learning_rate: float = option(
        1e-3,
        "Peak learning rate of the embeddings and the head while "
        "the vocabulary is extended (the rest uses "
        "train.learning_rate).",
        exclusive_minimum=0.0,
        maximum=1.0,
    )
    trainer_args: dict[str, Any] = option(
        {},
        "More Hugging Face TrainingArguments fields by name, e.g. {gradient_checkpointing: true, "
        "lr_scheduler_type: cosine, max_grad_norm: 0.5, optim: adamw_torch}; checked against the installed "
        "transformers. Fields the pipeline sets (output_dir, deepspeed, save_*, seeds, report_to, ...) are "
        "refused, naming the train.* setting to use.",
    )
    model_kwargs: dict[str, Any] = option(
        {},
        "Keyword arguments for the base model's from_pretrained, e.g. {attn_implementation: sdpa} or a config "
        "attribute such as {hidden_dropout_prob: 0.2}; checked against the model's config before it is built.",
    )

    def __post_init__(self) -> None:
        check_fields(self, "train.")
        # The body trains for at least one epoch. A one-epoch run has no frozen phase, and the default
        # extend_vocab_epochs=1 reads there as none (train's _fit); more is a setting that cannot hold.
        if self.extend_vocab and self.extend_vocab_epochs >= max(self.epochs, 2):
            raise ConfigError(
                f"train.extend_vocab_epochs={self.extend_vocab_epochs} with train.epochs={self.epochs}: "
                "the body trains for at least one epoch, so at most train.epochs - 1 are frozen (a "
                "one-epoch run has no frozen phase); lower train.extend_vocab_epochs, raise "
                "train.epochs or set train.extend_vocab=false"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"train.offload_params needs train.zero_stage=3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("train.offload_optimizer needs train.zero_stage 1, 2 or 3, got 0")
        if self.extend_vocab and self.lora_r and not self.lora_merge:
            raise ConfigError(
                "train.extend_vocab with train.lora_merge=false: the adapter alone would be registered "
                "with a reference to base_model, whose embeddings lack the new tokens; set "
                "train.lora_merge=true or train.extend_vocab=false"
            )
        if self.early_stopping_patience and not self.eval_steps:
            raise ConfigError(
                "train.early_stopping_patience needs train.eval_steps (how often the eval loss is "
                "computed), got train.eval_steps=0"
            )
        if "all-linear" in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise ConfigError(
                f"train.lora_target_modules: 'all-linear' (every linear layer but the output layer) stands alone, "
                f"got {self.lora_target_modules}; give it alone or list the module names"
            )
        check_trainer_args(self.trainer_args)
        if self.offload_optimizer and "optim" in self.trainer_args:
            raise ConfigError(
                "train.trainer_args.optim: with train.offload_optimizer the optimizer is DeepSpeed's "
                "CPU Adam (AdamW), which steps where the offloaded states are; drop one of the two"
            )
        for name in self.model_kwargs:
            if name in PIPELINE_MODEL_KWARGS:
                raise ConfigError(f"train.model_kwargs.{name}: not allowed here: {PIPELINE_MODEL_KWARGS[name]}")
            if not name.isidentifier() or name.startswith("_"):
                raise ConfigError(f"train.model_kwargs: {name!r} is not a keyword argument name")
