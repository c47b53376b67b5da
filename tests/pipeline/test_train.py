"""Training through the real local launcher: torch.distributed.run over 2 CPU processes, DeepSpeed
(gloo), the tiny BERT. Checks sharding, step count, determinism, safetensors and ZeRO-3 saving.
The tests that train are marked slow; those that fail before training are not."""

import json
import math
import re

import pytest

from pipeline import local, steps, storage
from pipeline.config import load_config
from pipeline.snapshot import load_snapshot
from tests.helpers import build_tiny_lm, collect_snapshot, run_step_here, train_settings

BATCH = 8


def _train(snapshot, model_dir, run_id, *extra):
    return local.launch_local(
        "train",
        train_settings(
            snapshot, model_dir, run_id, "train.epochs=2", f"train.batch_size={BATCH}", "train.logging_steps=2", *extra
        ),
    )


def _weights(model_uri):
    from safetensors.torch import load_file

    return load_file(str(storage.local_path(model_uri) / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_shard_every_epoch_and_runs_are_deterministic(snapshot, tiny_model_dir, capfd):
    result = _train(snapshot, tiny_model_dir, "a")
    per_rank = snapshot.rows_train // (BATCH * 2) * BATCH  # the partial last global batch is dropped
    assert result["world_size"] == 2
    assert result["global_step"] == 2 * (snapshot.rows_train // (BATCH * 2))  # 2 epochs
    # train.checkpoint_steps (200) is the cadence, as the Trainer's "steps" strategy has it: one
    # checkpoint at the last step, none at the end of the first epoch.
    saved = re.findall(r"train: checkpoint at step (\d+) saved", capfd.readouterr().out)
    assert saved == [str(result["global_step"])]
    audit = storage.read_json(result["summary_uri"])
    assert audit["trainer_world_size"] == 2 and audit["deepspeed"]["zero_stage"] == 2
    for epoch in audit["sharding"]["epochs"]:
        assert epoch["seen_per_rank"] == [per_rank, per_rank]  # each rank sees half of the epoch
        assert epoch["seen_twice"] == 0 and epoch["distinct"] == 2 * per_rank
    model_dir = storage.local_path(result["model_uri"])
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    config = json.loads((model_dir / "config.json").read_text())
    assert sorted(config["label2id"]) == snapshot.labels
    # Near-random tiny model: the mean loss stays near ln(3). Scaled by the world size it would be ~2.2.
    assert result["train_loss"] < 1.5 * math.log(len(snapshot.labels))

    again = _train(snapshot, tiny_model_dir, "b")
    assert again["train_loss"] == result["train_loss"]
    first, second = _weights(result["model_uri"]), _weights(again["model_uri"])
    assert all((first[k] == second[k]).all() for k in first)


@pytest.mark.slow
def test_zero3_gathers_full_weights_on_save(snapshot, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # At 12 tokens a sequence some of the texts are cut: the summary counts them per split.
    result = _train(snapshot, tiny_model_dir, "z3", "train.zero_stage=3", "train.epochs=1", "train.max_seq_len=12")
    summary = storage.read_json(result["summary_uri"])
    assert summary["deepspeed"]["zero_stage"] == 3
    frame, tokenizer = load_snapshot(snapshot.snapshot_uri), AutoTokenizer.from_pretrained(tiny_model_dir)
    longer = {
        split: sum(len(tokenizer(text)["input_ids"]) > 12 for text in frame.loc[frame["split"] == split, "text"])
        for split in ("train", "eval")
    }
    assert summary["truncated"] == longer and 0 < longer["train"] < snapshot.rows_train
    weights = _weights(result["model_uri"])
    assert weights and all(t.numel() > 0 for t in weights.values())  # ZeRO-3 would leave empty shards
    model = AutoModelForSequenceClassification.from_pretrained(storage.local_path(result["model_uri"]))
    assert model.classifier.weight.shape == (len(snapshot.labels), 32)


def test_missing_base_model_fails_without_retry_and_publishes_nothing(snapshot, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(steps.StepFailed) as failed:
        _train(snapshot, missing, "m")
    assert f"base_model '{missing}': no such directory" in str(failed.value)
    assert failed.value.returncode == 2 and not failed.value.retryable
    assert not storage.exists(load_config(None, ["run_id=m"]).step_uri("train") + "/model")


# --- causal-lm: the tiny Llama on the shipped instruction/chat data ---------------------------

INSTRUCTIONS = "pkg://pipeline/data/support_instructions.jsonl"
LM = ["task=causal-lm", "train.max_seq_len=192", "train.batch_size=8", "train.learning_rate=1e-3"]


@pytest.fixture
def chat_snapshot():
    return collect_snapshot([INSTRUCTIONS], "task=causal-lm")


def _train_lm(snapshot, model_dir, run_id, *extra):
    return local.launch_local("train", train_settings(snapshot, model_dir, run_id, *LM, "train.epochs=1", *extra))


def _evaluate_lm(snapshot, model_uri, run_id, model_dir, *extra):
    return run_step_here(
        "evaluate",
        [
            *LM,
            f"run_id={run_id}",
            f"base_model={json.dumps(str(model_dir))}",
            f"evaluate.snapshot_uri={snapshot.snapshot_uri}",
            f"evaluate.model_uri={model_uri}",
            "evaluate.generate_rows=4",
            *extra,
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize("merge", [True, False])
def test_lora_publishes_adapter_and_registers_a_chat_model_that_loads(chat_snapshot, tiny_lm_dir, merge):
    import mlflow
    from safetensors.torch import load_file

    from pipeline import tracking

    run_id = f"lora-{merge}"
    result = _train_lm(
        chat_snapshot,
        tiny_lm_dir,
        run_id,
        "train.lora_r=8",
        "train.lora_alpha=16",
        f"train.lora_merge={json.dumps(merge)}",
        'train.lora_target_modules=["q_proj", "v_proj"]',
        f"train.packing={json.dumps(merge)}",
    )  # packing rides along with one of the two
    summary = storage.read_json(result["summary_uri"])
    assert summary["lora"] is True
    packed, kept = summary["packed_sequences"], summary["conversations"]["kept"]
    assert (packed < kept) if merge else (packed == kept)
    adapter = storage.local_path(result["model_uri"]).parent / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights)
    assert any("q_proj" in name for name in weights) and not any("k_proj" in name for name in weights)
    published = storage.local_path(result["model_uri"])
    assert (published / "model.safetensors").is_file() is merge
    assert (published / "adapter_config.json").is_file() is not merge

    evaluated = _evaluate_lm(chat_snapshot, result["model_uri"], run_id, tiny_lm_dir)
    # Merged: the base is loaded on its own; adapter: scored with the adapter switched off.
    assert evaluated["metrics"]["perplexity"] < evaluated["base_metrics"]["perplexity"]
    registered = run_step_here(
        "register",
        [
            *LM,
            f"run_id={run_id}",
            f"base_model={json.dumps(str(tiny_lm_dir))}",
            f"model_name=chat-{merge}",
            f"register.train_result_uri={result['result_uri']}",
            f"register.evaluate_result_uri={evaluated['result_uri']}",
        ],
    )
    assert registered["aliases"] == ["challenger", "champion"]
    uri = f"models:/chat-{merge}@champion"
    with tracking.module_api():  # this test's store, for MLflow's module-level calls
        local = mlflow.artifacts.download_artifacts(uri)
        answer = mlflow.pyfunc.load_model(uri).predict(
            {"messages": [{"role": "user", "content": "Where is my order #A1234?"}], "max_tokens": 8}
        )
        components = mlflow.transformers.load_model(uri, return_type="components")
    from pathlib import Path

    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert any(f.endswith("peft/adapter_model.safetensors") for f in files) is not merge
    # An adapter is registered without a copy of the base weights.
    assert any(f.rsplit("/", 1)[-1] == "model.safetensors" for f in files) is merge
    assert answer[0]["choices"][0]["message"]["role"] == "assistant"
    assert components["model"].config.vocab_size == 1000 and components["tokenizer"].chat_template


def test_causal_lm_bad_input_fails_before_training(chat_snapshot, tiny_lm_dir, tmp_path):
    from pipeline import train
    from pipeline.errors import ConfigError, DataError, ModelError

    def run(model_dir, *extra):
        train.run(
            load_config(
                None,
                [
                    *LM,
                    f"base_model={json.dumps(str(model_dir))}",
                    f"train.snapshot_uri={chat_snapshot.snapshot_uri}",
                    *extra,
                ],
            )
        )

    bare = build_tiny_lm(tmp_path / "no-template", chat_template=False)
    with pytest.raises(ConfigError, match="no chat template and train.chat_template is not set"):
        run(bare)
    with pytest.raises(DataError, match=r"none of the \d+ train conversations fits train.max_seq_len=8"):
        run(tiny_lm_dir, "train.max_seq_len=8", "train.overlong=drop")
    mismatched = tmp_path / "mismatched"
    import shutil

    shutil.copytree(tiny_lm_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "vocab_size": 500}))
    with pytest.raises(ModelError, match="the tokenizer has 1000 tokens but the model's embedding matrix has 500 rows"):
        run(mismatched)
    assert not storage.exists(load_config(None, []).step_uri("train") + "/result.json")


def test_lora_target_modules_are_checked_against_the_base_models_modules(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.errors import ConfigError
    from pipeline.train.parts import lora_target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)

    def targets(*names):
        cfg = load_config(None, [*LM, f"train.lora_target_modules={json.dumps(list(names))}"])
        return lora_target_modules(cfg, model)

    assert targets() is None  # PEFT's default for the architecture
    assert targets("q_proj", "self_attn.v_proj", "lm_head") == ["q_proj", "self_attn.v_proj", "lm_head"]
    assert targets("all-linear") == "all-linear"  # the string PEFT resolves itself, not a module name
    with pytest.raises(ConfigError) as refused:
        targets("q_proj", "q_prj")
    message = str(refused.value)
    assert message.startswith("train.lora_target_modules: ") and "has no module 'q_prj'" in message
    assert "did you mean 'q_proj'" in message and "'k_proj', 'o_proj', 'q_proj'" in message
    assert "lm_head" not in message  # the output layer is no candidate: all-linear leaves it out too
    with pytest.raises(ConfigError, match="'all-linear' .* stands alone"):
        load_config(None, ['train.lora_target_modules=["all-linear", "q_proj"]'])


@pytest.mark.parametrize(
    "settings, said",
    [
        (["train.lora_r=8", "train.lora_target_modules=q_prj"], ["train.lora_target_modules: base_model", "'q_prj'"]),
        # DeepSpeed's engine, built when training starts: HF's check of the JSON against the Trainer's values
        (
            ["train.deepspeed_config=ZERO2_MICRO3"],
            ["cannot build the Trainer and its DeepSpeed engine: ValueError", "micro_batch", "train.deepspeed_config="],
        ),
    ],
    ids=["lora-module", "deepspeed-engine"],
)
def test_settings_that_cannot_work_fail_the_step_in_seconds_as_bad_input(
    chat_snapshot, tiny_lm_dir, tmp_path, settings, said
):
    import time

    ds_config = tmp_path / "zero2-micro3.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}))
    settings = [s.replace("ZERO2_MICRO3", str(ds_config)) for s in settings]
    began = time.monotonic()
    with pytest.raises(steps.StepFailed) as failed:
        _train_lm(chat_snapshot, tiny_lm_dir, "cannot-work", "train.num_processes=1", *settings)
    assert failed.value.returncode == 2 and not failed.value.retryable  # the retry table: never retried
    told = f"{failed.value}\n{failed.value.details}"  # the first line of the step's error, then the rest
    assert all(part in told for part in said), told
    assert time.monotonic() - began < 120  # a process start and a model load, not a training
    assert not storage.exists(load_config(None, ["run_id=cannot-work"]).step_uri("train") + "/model")


def test_what_building_from_the_settings_refuses_is_bad_input_and_the_rest_passes():
    from pipeline.errors import ConfigError, TransientError
    from pipeline.train.trainer import settings_refused

    with pytest.raises(ConfigError) as refused:
        with settings_refused("train.trainer_args={}"):
            raise ValueError("no such optimizer")
    assert str(refused.value).splitlines() == [
        "the settings cannot build the Trainer and its DeepSpeed engine: ValueError: no such optimizer",
        "  the settings: train.trainer_args={}",
    ]
    for passing in (RuntimeError("gloo: connection closed by peer"), TransientError("busy")):
        with pytest.raises(type(passing)):  # a lost rank or a transient fault stays retryable
            with settings_refused("train.trainer_args={}"):
                raise passing
