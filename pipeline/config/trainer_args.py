"""``train.trainer_args`` and ``train.model_kwargs``: which TrainingArguments fields and
from_pretrained keywords the pipeline sets itself, and the fields of the installed
``transformers.TrainingArguments`` with the types they accept, read from its source with ``ast``
so that loading a config imports nothing heavy.

    finetune config --set 'train.trainer_args={lr_scheduler_type: cosine}'

Foundation layer (the ``config`` package): imports nothing of ours but ``errors``.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

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
    "revision": "the model is base_model",
    "code_revision": "the model is base_model",
    "subfolder": "the model is base_model",
    "variant": "the model is base_model",
    "token": "the model is base_model",
    "cache_dir": "the model is base_model",
    "local_files_only": "the model is base_model",
    "force_download": "the model is base_model",
    "proxies": "the model is base_model",
    "config": "the model is base_model",
    "state_dict": "the model is base_model",
    "device_map": "DeepSpeed places the weights",
    "tp_plan": "DeepSpeed places the weights",
    "torch_dtype": "use train.precision",
    "dtype": "use train.precision",
    "quantization_config": "quantized training is not supported",
    "num_labels": "labels come from the snapshot",
    "id2label": "labels come from the snapshot",
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
        return [
            {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list, "Any": object}.get(
                node.id, ("unsettable", node.id)
            )
        ]
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
            values = [
                item.value.value
                for item in node.body
                if isinstance(item, ast.Assign)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, str)
            ]
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
        enums = {
            **_enum_values(ast.parse((package / "trainer_utils.py").read_text(encoding="utf-8"))),
            **_enum_values(source),
        }
    except (OSError, SyntaxError):
        return None
    found = [node for node in source.body if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments"]
    if not found:
        return None
    return {
        node.target.id: _annotation_types(node.annotation, enums)
        for node in found[0].body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


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
        return {
            type(None): "null",
            object: "anything",
            dict: "a mapping",
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            list: "a list",
        }.get(kind, kind.__name__)
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
            raise ConfigError(
                f"train.trainer_args.{name}: set by the pipeline, not here: {PIPELINE_TRAINER_ARGS[name]}"
            )
    fields_ = trainer_argument_types()
    if fields_ is None:
        return
    for name, value in trainer_args.items():
        if name not in fields_:
            hint = difflib.get_close_matches(name, list(fields_), n=1)
            raise ConfigError(
                f"train.trainer_args.{name}: the installed transformers' TrainingArguments has no "
                f"field '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
        kinds = fields_[name]
        # A string field with named values (SchedulerType | str) takes those values only.
        if any(isinstance(k, tuple) and k[0] == "enum" for k in kinds):
            kinds = [k for k in kinds if k is not str]
        if not any(_accepts(kind, value) for kind in kinds):
            raise ConfigError(
                f"train.trainer_args.{name}: {value!r} is not "
                + " or ".join(dict.fromkeys(_describe_kind(k) for k in kinds))
            )
