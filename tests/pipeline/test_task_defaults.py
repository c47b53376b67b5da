"""Defaults that follow the task family, the demo causal LM that needs no hub, and the message a
hub name gets offline: what a new user meets first with `task=causal-lm`."""

import pytest

from pipeline import chat, cli, models
from pipeline.config import load_config
from pipeline.errors import ModelError


def test_a_causal_lm_gets_a_causal_lm_its_data_and_its_sequence_length(tmp_path):
    classifier, lm = load_config(), load_config(None, ["task=causal-lm"])
    assert (classifier.train.max_seq_len, classifier.model_name) == (64, "support-intents")
    assert lm.train.max_seq_len == 512 and lm.train.batch_size == 8 and lm.model_name == "support-chat"
    assert lm.collect.sources == ["pkg://pipeline/data/support_instructions.jsonl"] and "Qwen" in lm.base_model
    assert lm.evaluate.gate("causal-lm") == ("perplexity", False)
    config = tmp_path / "lm.yaml"
    config.write_text("task: causal-lm\ntrain:\n  max_seq_len: 256\n")
    assert load_config(config, ["train.batch_size=4"]).train.max_seq_len == 256  # a file and --set still win
    assert load_config(config, ["train.batch_size=4"]).train.batch_size == 4


def test_finetune_config_shows_the_family_defaults(capsys):
    assert cli.main(["config", "--set", "task=causal-lm"]) == 0
    assert "max_seq_len: 512" in capsys.readouterr().out


def test_a_hub_name_offline_says_what_to_do_instead(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as refused:
        models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct", tmp_path)
    assert "HF_HUB_OFFLINE=1" in str(refused.value) and "make demo-llm" in str(refused.value)


def test_the_demo_model_is_a_chat_model_whose_tokenizer_covers_the_shipped_text(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli.main(["demo-model", "--out", str(tmp_path / "lm")]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]  # the last line (DeepSpeed may log to stdout)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (
        model.config.model_type == "llama"
        and model.config.num_hidden_layers == models.DEMO_LM_SHAPE["num_hidden_layers"]
    )
    assert tokenizer.chat_template == chat.CHATML
    text = "我想取消订单 where is my order #A123?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing unknown
    capsys.readouterr()
    assert cli.main(["demo-model", "--out", str(tmp_path / "lm")]) == 0  # built once: found the second time
    second = capsys.readouterr()
    assert "built" not in second.err and second.out.strip().splitlines()[-1] == path
