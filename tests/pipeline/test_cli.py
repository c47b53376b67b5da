"""`finetune`'s own help and `finetune config`: the settings a person can set, listed from the
config fields themselves, and the effective configuration a run will use."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from pipeline import cli, steps
from pipeline.config import SECTIONS, load_config


def _help(*argv):
    out = subprocess.run([sys.executable, "-m", "pipeline", *argv, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("step", list(steps.STEPS))
def test_step_help_lists_every_key_of_its_section_with_type_default_and_bounds(step):
    text = _help(step)
    if step not in SECTIONS:  # a step of no settings of its own says so
        assert f"{step} has no settings of its own (it reads model_name)" in text
        return
    for f in dataclasses.fields(SECTIONS[step]):
        assert f"  {step}.{f.name} (" in text, f.name
    if step == "train":
        assert "  train.epochs (integer, default 6; [1..100])" in text
        assert "  train.zero_stage (integer, default 2; one of 0, 1, 2, 3)" in text
        assert "Passes over the training split" in text


def test_config_prints_the_effective_configuration_as_yaml_that_loads_back(tmp_path, capsys):
    recipe = "pipeline/configs/support_chat_qwen.yaml"
    assert cli.main(["config", "--config", recipe, "--set", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    effective = yaml.safe_load(printed)
    assert effective["train"]["epochs"] == 1 and effective["task"] == "causal-lm"
    (tmp_path / "effective.yaml").write_text(printed)
    assert load_config(tmp_path / "effective.yaml") == load_config(recipe, ["train.epochs=1"])
    assert (
        "  task (text, default sequence-classification; one of sequence-classification, causal-lm, preference)"
        in _help("config")
    )


def test_config_names_a_bad_key(capsys):
    assert cli.main(["config", "--set", "train.epoch=2"]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err


def test_finetune_run_with_approval_on_says_where_to_answer_instead_of_waiting(tmp_path, capsys):
    from pipeline import dagrun

    deployment = tmp_path / "deployment.yaml"
    deployment.write_text("promote: {require_approval: true}\n")
    assert dagrun.main(["--config", str(deployment)]) == 2  # refused before Airflow starts
    said = capsys.readouterr().err
    assert "error: run: promote.require_approval is on in the deployment's config" in said
    assert "`make up`" in said and "Required actions" in said and "--no-promote" in said
    assert not (tmp_path / "home" / "airflow").exists()  # no Airflow database was made
