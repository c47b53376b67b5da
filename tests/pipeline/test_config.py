import json
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


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=fast", "train.learning_rate: expected a number, got 'fast'"),
    ("train.epochs=0", "train.epochs: 0 is below the minimum 1"),
    ("train.zero_stage=4", "train.zero_stage: 4 is not one of [0, 1, 2, 3]"),
    ("task=regression", "task: 'regression' is not one of"),
    ("collect.eval_fraction=0", "collect.eval_fraction: 0.0 must be greater than 0.0"),
    ("train.epoch=2", "unknown config key 'train.epoch' in --set train.epoch=2 (did you mean 'train.epochs'?)"),
    ("model_name=has space", "model_name: 'has space' does not match"),
    ("epochs", "--set expects key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


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
    assert json.loads((CONFIGS / "zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True


def test_param_schema_follows_the_field():
    schema = param_schema("train.learning_rate")
    assert schema["type"] == "number" and schema["exclusiveMinimum"] == 0.0 and schema["maximum"] == 1.0
    assert schema["default"] == PipelineConfig().train.learning_rate and schema["description"]
    assert param_schema("train.zero_stage")["enum"] == [0, 1, 2, 3]
    assert param_schema("collect.sources")["type"] == "array"
    assert "train.epochs" in known_keys() and "run_id" in known_keys()


def test_safe_run_id_is_path_safe():
    assert safe_run_id("manual__2026-11-29T03:52:07.162532+00:00") == "manual__2026-11-29T03_52_07.162532_00_00"
    load_config(None, [f"run_id={safe_run_id('scheduled__2026-01-01T00:00:00+00:00')}"])


def test_a_config_file_travels_as_overrides():
    path = CONFIGS / "support_intents.yaml"
    overrides = file_overrides(path)
    assert "train.zero_stage=2" in overrides
    assert load_config(None, overrides) == load_config(path)
