"""pipeline.models never runs code a model ships: a model directory whose config asks for its own
Python (``auto_map``, what ``trust_remote_code`` would import) is refused before transformers reads
it, and every load passes ``trust_remote_code=False``.

    .venv/bin/python -m pytest -q tests/pipeline/test_models.py
"""

import json
import shutil

import pytest

from pipeline import cli, storage
from pipeline.config import load_config
from tests.helpers import train_settings

# What transformers would import for this config with trust_remote_code: it leaves a mark.
EVIL = """
import pathlib, os
pathlib.Path(os.environ["FINETUNE_TEST_MARK"]).write_text("code from the model ran")
from transformers import BertConfig
class EvilConfig(BertConfig):
    model_type = "bert"
"""


@pytest.fixture
def crafted_model(tiny_model_dir, tmp_path, monkeypatch):
    path = tmp_path / "crafted"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evil.py").write_text(EVIL)
    mark = tmp_path / "mark"
    monkeypatch.setenv("FINETUNE_TEST_MARK", str(mark))
    return path, mark


@pytest.mark.parametrize("step", ["validate", "train"])
def test_a_model_that_asks_to_run_its_own_code_is_refused_and_no_code_runs(step, crafted_model, snapshot, capsys):
    path, mark = crafted_model
    settings = [*train_settings(snapshot, path, f"crafted-{step}"), f"validate.snapshot_uri={snapshot.snapshot_uri}"]
    code = cli.main([step, *(arg for s in settings for arg in ("--set", s))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "config.json asks to run the model's own Python code" in err and "modeling_evil.EvilConfig" in err
    assert not mark.exists()
    error = storage.read_json(storage.join(load_config(None, settings).step_uri(step), "error.json"))
    assert error["exit_code"] == 2 and "auto_map" in error["error"]
