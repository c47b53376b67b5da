"""train.trainer_args and train.model_kwargs: any TrainingArguments field by name, checked when the
config loads against the installed transformers (read from its source, so that loading a config
imports nothing heavy), the pipeline's own fields refused with the setting to use; and a run
that shows the values reach the Trainer (ZeRO-3, LoRA, gradient checkpointing)."""

import dataclasses
import json
import subprocess
import sys

import pytest

from pipeline import local, steps, storage
from pipeline.config import load_config, param_schema
from pipeline.config.trainer_args import PIPELINE_TRAINER_ARGS, trainer_argument_types
from pipeline.errors import ConfigError
from tests.helpers import collect_snapshot


def _refused(*settings):
    with pytest.raises(ConfigError) as refused:
        load_config(None, list(settings))
    return str(refused.value)


def test_any_training_arguments_field_by_name_is_accepted():
    args = {
        "gradient_checkpointing": True,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 0.5,
        "optim": "adamw_torch",
        "adam_beta2": 0.95,
        "torch_empty_cache_steps": None,
        "label_smoothing_factor": 0,
    }
    cfg = load_config(
        None, [f"train.trainer_args={json.dumps(args)}", 'train.model_kwargs={"attn_implementation": "eager"}']
    )
    assert cfg.train.trainer_args == args and cfg.train.model_kwargs == {"attn_implementation": "eager"}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            {"max_grad_nrm": 1.0},
            "train.trainer_args.max_grad_nrm: the installed transformers' TrainingArguments has no "
            "field 'max_grad_nrm' (did you mean 'max_grad_norm'?)",
        ),
        ({"max_grad_norm": "big"}, "train.trainer_args.max_grad_norm: 'big' is not a number"),
        (
            {"gradient_checkpointing": "yes"},
            "train.trainer_args.gradient_checkpointing: 'yes' is not true or false or null",
        ),
        ({"max_steps": 2.5}, "train.trainer_args.max_steps: 2.5 is not an integer"),
        ({"lr_scheduler_type": "cosin"}, "train.trainer_args.lr_scheduler_type: 'cosin' is not one of linear, cosine"),
        (
            {"optim_target_modules": [1]},
            "train.trainer_args.optim_target_modules: [1] is not null or a string or a list of a string",
        ),
    ],
)
def test_unknown_fields_and_wrong_types_are_refused_naming_them(args, message):
    assert message in _refused(f"train.trainer_args={json.dumps(args)}")


@pytest.mark.parametrize(
    "name, setting",
    [
        ("output_dir", "train.checkpoint_steps"),
        ("deepspeed", "train.zero_stage"),
        ("save_strategy", "train.checkpoint_steps"),
        ("save_steps", "train.checkpoint_steps"),
        ("seed", "use seed"),
        ("data_seed", "use seed"),
        ("report_to", "MLflow"),
        ("per_device_train_batch_size", "train.batch_size"),
        ("num_train_epochs", "train.epochs"),
        ("learning_rate", "train.learning_rate"),
        ("eval_steps", "train.eval_steps"),
        ("load_best_model_at_end", "train.early_stopping_patience"),
        ("bf16", "train.precision"),
    ],
)
def test_fields_the_pipeline_sets_are_refused_with_the_setting_to_use(name, setting):
    message = _refused(f"train.trainer_args={json.dumps({name: 1})}")
    assert f"train.trainer_args.{name}: set by the pipeline, not here" in message and setting in message


def test_every_field_train_sets_itself_is_refused():
    """Every keyword train passes to TrainingArguments, read from its source, is in the refused table."""
    import ast
    import inspect

    from pipeline import train

    tree = ast.parse(inspect.getsource(train._training_arguments) + inspect.getsource(train._schedule))
    passed = {
        k.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "TrainingArguments"
        for k in node.keywords
        if k.arg
    }
    returned = {
        key.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant) and key.value in trainer_argument_types()
    }
    returned |= {"bf16", "fp16"}  # mixed_precision()
    assert passed and returned and (passed | returned) - set(PIPELINE_TRAINER_ARGS) == set()


def test_the_source_read_table_is_the_imported_training_arguments():
    from transformers import TrainingArguments
    from transformers.trainer_utils import IntervalStrategy, SchedulerType
    from transformers.training_args import OptimizerNames

    table = trainer_argument_types()
    assert set(table) == {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    enums = [kind[1] for kinds in table.values() for kind in kinds if isinstance(kind, tuple) and kind[0] == "enum"]
    for enum in (SchedulerType, OptimizerNames, IntervalStrategy):
        assert [e.value for e in enum] in enums, enum
    assert set(PIPELINE_TRAINER_ARGS) <= set(table)  # a renamed field would make the refusal silent


def test_loading_a_config_with_trainer_args_imports_nothing_heavy():
    probe = (
        "import sys; from pipeline.config import load_config; "
        'load_config(None, [\'train.trainer_args={"lr_scheduler_type": "cosine"}\']); '
        "print([m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trust_remote_code": True}, "train.model_kwargs.trust_remote_code: not allowed here: it runs code"),
        ({"torch_dtype": "bfloat16"}, "train.model_kwargs.torch_dtype: not allowed here: use train.precision"),
        ({"revision": "main"}, "train.model_kwargs.revision: not allowed here: the model is base_model"),
        ({"device_map": "auto"}, "DeepSpeed places the weights"),
    ],
)
def test_model_kwargs_that_would_change_the_model_source_or_placement_are_refused(kwargs, message):
    assert message in _refused(f"train.model_kwargs={json.dumps(kwargs)}")


def test_trainer_args_is_an_object_param_and_a_trigger_key():
    schema = param_schema("train.trainer_args")
    assert schema["type"] == "object" and schema["default"] == {} and "TrainingArguments" in schema["description"]
    cfg = load_config(None, [])
    assert "train.trainer_args" in cfg.trigger_keys and "train.model_kwargs" in cfg.trigger_keys


INSTRUCTIONS = "pkg://pipeline/data/support_instructions.jsonl"


def test_a_model_kwarg_the_base_model_does_not_know_fails_before_the_model_is_built(tiny_lm_dir):
    from pipeline import train

    snapshot = collect_snapshot([INSTRUCTIONS], "task=causal-lm")
    with pytest.raises(ConfigError) as refused:
        train.run(
            load_config(
                None,
                [
                    "task=causal-lm",
                    f"base_model={json.dumps(str(tiny_lm_dir))}",
                    "train.max_seq_len=192",
                    f"train.snapshot_uri={snapshot.snapshot_uri}",
                    'train.model_kwargs={"hidden_dropout_prob": 0.2}',
                ],
            )
        )
    assert "train.model_kwargs.hidden_dropout_prob: neither attn_implementation nor an attribute of LlamaConfig" in str(
        refused.value
    )


@pytest.mark.slow
def test_trainer_args_reach_the_trainer_with_zero3_lora_and_gradient_checkpointing(tiny_lm_dir):
    """A constant learning rate (no warm-up, no decay), gradient clipping and gradient checkpointing
    through trainer_args, the attention kernel through model_kwargs, LoRA on every linear layer
    (all-linear): the logged learning rate is flat over max_steps."""
    from pipeline.tracking import client

    snapshot = collect_snapshot([INSTRUCTIONS], "task=causal-lm")
    args = {
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.5,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "max_steps": 4,
    }
    result = local.launch_local(
        "train",
        [
            "task=causal-lm",
            "run_id=targs",
            f"base_model={json.dumps(str(tiny_lm_dir))}",
            "train.max_seq_len=192",
            f"train.snapshot_uri={snapshot.snapshot_uri}",
            "train.batch_size=8",
            "train.learning_rate=1e-3",
            "train.zero_stage=3",
            "train.lora_r=8",
            "train.lora_target_modules=all-linear",  # PEFT's shorthand, as a team writes it
            "train.logging_steps=1",
            "train.warmup_ratio=0.0",
            f"train.trainer_args={json.dumps(args)}",
            'train.model_kwargs={"attn_implementation": "eager"}',
        ],
    )
    assert result["global_step"] == 4  # max_steps, not the epoch
    rates = [m.value for m in client().get_metric_history(result["mlflow_run_id"], "train_learning_rate")]
    assert rates == [1e-3] * 4
    assert storage.read_json(result["summary_uri"])["lora"] is True
    adapter = json.loads(
        (storage.local_path(result["model_uri"]).parent / "adapter" / "adapter_config.json").read_text()
    )
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # PEFT saves what all-linear found
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head


def test_the_trigger_forms_trainer_args_param_travels_to_the_step_and_is_checked():
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamValidationError

    param = Param(**param_schema("train.trainer_args"))
    assert param.resolve({"max_grad_norm": 0.5}) == {"max_grad_norm": 0.5}
    with pytest.raises(ParamValidationError):
        param.resolve("max_grad_norm=0.5")  # the form's JSON editor sends an object

    sent = steps.step_overrides("collect", {"trainer_args": {"max_grad_norm": 0.5}}, {}, "r1")
    assert 'train.trainer_args={"max_grad_norm": 0.5}' in sent
    assert not any("trainer_args" in item for item in steps.step_overrides("collect", {"trainer_args": {}}, {}, "r2"))
    with pytest.raises(ConfigError) as refused:
        steps.step_overrides("collect", {"trainer_args": {"output_dir": "/tmp/elsewhere"}}, {}, "r3")
    assert "train.trainer_args.output_dir: set by the pipeline" in str(refused.value)
