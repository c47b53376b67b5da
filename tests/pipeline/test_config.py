import json
import re
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, file_overrides, known_keys, load_config, param_schema, safe_run_id
from pipeline.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "pipeline" / "configs"


def test_defaults_are_valid_and_layered(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n  learning_rate: 2.0e-5\nmodel_name: intents\n")
    cfg = load_config(path, ["train.epochs=7", "collect.sources=[a.jsonl, b.csv]"])
    assert cfg.train.epochs == 7  # --set beats YAML
    assert cfg.train.learning_rate == pytest.approx(2e-5)  # YAML beats defaults
    assert cfg.model_name == "intents"
    assert cfg.collect.sources == ["a.jsonl", "b.csv"]
    assert cfg.train.batch_size == PipelineConfig().train.batch_size


def test_scientific_notation_override_is_a_number():
    assert load_config(None, ["train.learning_rate=5e-05"]).train.learning_rate == pytest.approx(5e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=fast", "train.learning_rate: expected a number, got 'fast'"),
        ("train.epochs=0", "train.epochs: 0 is below the minimum 1"),
        ("train.zero_stage=4", "train.zero_stage: 4 is not one of [0, 1, 2, 3]"),
        ("task=regression", "task: 'regression' is not one of"),
        ("collect.eval_fraction=0", "collect.eval_fraction: 0.0 must be greater than 0.0"),
        ("train.epoch=2", "unknown config key 'train.epoch' in --set train.epoch=2 (did you mean 'train.epochs'?)"),
        ("model_name=has space", "model_name: 'has space' does not match"),
        ("epochs", "--set expects key=value"),
        ("train.offload_params=true", "train.offload_params needs train.zero_stage=3, got 2"),
        ("train.overlong=keep", "train.overlong: 'keep' is not one of ['truncate', 'drop']"),
        ("evaluate.metric_direction=up", "evaluate.metric_direction: 'up' is not one of"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "override, hint",
    [
        # A TrainingArguments field by its own name, or a near one: the trainer_args mapping, with the value
        (
            "train.gradient_checkpointing=true",
            "(did you mean 'train.trainer_args.gradient_checkpointing'? a TrainingArguments field goes in the "
            """mapping train.trainer_args: --set 'train.trainer_args={"gradient_checkpointing": true}', """,
        ),
        ("train.max_grad_nrm=0.5", """'train.trainer_args.max_grad_norm'? a TrainingArguments field goes in"""),
        ("train.trainer_args.max_grad_norm=0.5", """(a TrainingArguments field goes in the mapping"""),
        ("train.output_dir=/tmp/x", "(TrainingArguments' output_dir is set by the pipeline: checkpoints go to"),
        ("train.keep_checkpoint=3", "(did you mean 'train.keep_checkpoints'?)"),
    ],
)
def test_an_unknown_key_is_matched_against_the_trainer_args_fields_too(override, hint):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert hint in str(error.value)


def test_bad_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 2\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'train.epocs' in {path}"):
        load_config(path)


def test_every_shipped_config_loads():
    yamls = sorted(CONFIGS.glob("*.yaml"))
    assert yamls, "no shipped YAML configs"
    for path in yamls:
        assert path.read_text().startswith("#"), f"{path.name} must start with the command that uses it"
        load_config(path)
    for stage in range(4):
        ds = json.loads((CONFIGS / f"zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        cfg = load_config(None, [f"train.zero_stage={stage}"])
        from pipeline.train import deepspeed_config

        assert deepspeed_config(cfg.train) == ds
    assert (
        json.loads((CONFIGS / "zero3.json").read_text())["zero_optimization"][
            "stage3_gather_16bit_weights_on_model_save"
        ]
        is True
    )


def test_param_schema_follows_the_field():
    schema = param_schema("train.learning_rate")
    assert schema["type"] == "number" and schema["exclusiveMinimum"] == 0.0 and schema["maximum"] == 1.0
    assert schema["default"] == PipelineConfig().train.learning_rate and schema["description"]
    assert param_schema("train.zero_stage")["enum"] == [0, 1, 2, 3]
    assert param_schema("collect.sources")["type"] == "array"
    assert "train.epochs" in known_keys() and "run_id" in known_keys()
    assert param_schema("task")["enum"] == ["sequence-classification", "causal-lm", "preference"]


def test_param_pattern_rejects_what_the_config_rejects():
    """Airflow's trigger form validates Params with jsonschema: a bad model name fails there."""
    import jsonschema

    schema = param_schema("model_name")
    jsonschema.validate("support-intents", schema)
    for bad in ("has space", "-leading-dash", "ok/but-a-path"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError):
            load_config(None, [f"model_name={bad}"])


def test_safe_run_id_is_path_safe():
    assert safe_run_id("manual__2026-11-29T03:52:07.162532+00:00") == "manual__2026-11-29T03_52_07.162532_00_00"
    load_config(None, [f"run_id={safe_run_id('scheduled__2026-01-01T00:00:00+00:00')}"])


def test_a_config_file_travels_as_overrides():
    path = CONFIGS / "support_intents.yaml"
    overrides = file_overrides(path)
    assert "train.zero_stage=2" in overrides
    assert load_config(None, overrides) == load_config(path)


def test_gate_metric_must_belong_to_the_task_and_knows_its_direction():
    from pipeline.config import EvaluateConfig

    assert EvaluateConfig().gate("sequence-classification") == ("accuracy", True)
    assert EvaluateConfig().gate("causal-lm") == ("perplexity", False)  # lower perplexity is better
    assert EvaluateConfig(gate_metric="rouge_l").gate("causal-lm") == ("rouge_l", True)
    assert EvaluateConfig(gate_metric="eval_loss", metric_direction="higher").gate("causal-lm") == ("eval_loss", True)
    with pytest.raises(ConfigError, match="evaluate.gate_metric: 'perplexity' is not a sequence-classification metric"):
        EvaluateConfig(gate_metric="perplexity").gate("sequence-classification")


def test_deepspeed_offload_and_precision_settings():
    from pipeline.config import TrainConfig
    from pipeline.train import deepspeed_config, mixed_precision

    zero3 = deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert zero3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_param" not in deepspeed_config(TrainConfig(zero_stage=3))["zero_optimization"]
    import torch

    if not torch.cuda.is_available():
        assert mixed_precision(TrainConfig()) == {"bf16": False, "fp16": False}  # auto: fp32 on CPU
        with pytest.raises(ConfigError, match="train.precision=bf16: bf16 training needs a GPU"):
            mixed_precision(TrainConfig(precision="bf16"))


def test_a_frozen_first_phase_as_long_as_the_run_is_refused_naming_both_keys():
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["train.epochs=3", "train.extend_vocab_epochs=3"])
    assert str(refused.value).startswith(
        "train.extend_vocab_epochs=3 with train.epochs=3: the body trains for at "
        "least one epoch, so at most train.epochs - 1 are frozen"
    )
    with pytest.raises(ConfigError, match="train.extend_vocab_epochs=2 with train.epochs=1"):
        load_config(None, ["train.epochs=1", "train.extend_vocab_epochs=2"])
    assert load_config(None, ["train.epochs=1"]).train.extend_vocab_epochs == 1  # the default: no frozen phase
    load_config(None, ["train.epochs=3", "train.extend_vocab_epochs=3", "train.extend_vocab=false"])


def test_the_approval_gate_is_the_deployments_and_never_a_triggers(tmp_path):
    from pipeline import steps

    defaults = load_config(None).promote
    assert (defaults.require_approval, defaults.approvers, defaults.approval_timeout) == (False, [], 72 * 3600)
    deployment = tmp_path / "deployment.yaml"
    deployment.write_text(
        'trigger_keys: ["promote.*", "*"]\n'
        "promote: {require_approval: true, approvers: [ana, bo], approval_timeout: 60}\n"
    )
    own = file_overrides(str(deployment))
    trusted = steps.trigger_config(own, [])
    assert (trusted.promote.require_approval, trusted.promote.approvers) == (True, ["ana", "bo"])
    assert trusted.promote.approval_timeout == 60
    # Not even a deployment whose trigger_keys allow every key lets a trigger turn it off, pick who
    # answers, wait longer or answer itself.
    for override in (
        "promote.require_approval=false",
        "promote.approvers=[mallory]",
        "promote.approval_timeout=600",
        "promote.approval=approved",
    ):
        key = override.partition("=")[0]
        with pytest.raises(ConfigError, match=rf"'{key}' may not be set by a trigger"):
            steps.trigger_config(own, [override])
    for override, message in (
        ("promote.approval_timeout=0", "promote.approval_timeout: 0 is below the minimum 1"),
        ("promote.approval=maybe", "promote.approval: 'maybe' is not one of"),
        ("promote.require_approval=sometimes", "promote.require_approval: expected true or false"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
