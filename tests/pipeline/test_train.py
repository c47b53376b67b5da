"""Training through the real local launcher: torch.distributed.run over 2 CPU processes, DeepSpeed
(gloo), the tiny BERT. Checks sharding, step count, determinism, safetensors and ZeRO-3 saving."""

import json
import math

import pytest

from pipeline import collect, steps, storage
from pipeline.config import load_config

pytestmark = pytest.mark.slow
BATCH = 8


@pytest.fixture
def snapshot(small_data):
    return collect.run(load_config(None, [f"collect.sources={json.dumps([str(small_data)])}"]))


def _train(snapshot, model_dir, run_id, *extra):
    return steps.launch_local("train", [
        f"run_id={run_id}", f"base_model={json.dumps(str(model_dir))}", f"train.snapshot_uri={snapshot.snapshot_uri}",
        "train.epochs=2", f"train.batch_size={BATCH}", "train.num_processes=2", "train.logging_steps=2", *extra])


def _weights(model_uri):
    from safetensors.torch import load_file

    return load_file(str(storage.local_path(model_uri) / "model.safetensors"))


def test_two_processes_shard_every_epoch_and_runs_are_deterministic(snapshot, tiny_model_dir):
    result = _train(snapshot, tiny_model_dir, "a")
    per_rank = snapshot.rows_train // (BATCH * 2) * BATCH  # the partial last global batch is dropped
    assert result["world_size"] == 2
    assert result["global_step"] == 2 * (snapshot.rows_train // (BATCH * 2))  # 2 epochs
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


def test_zero3_gathers_full_weights_on_save(snapshot, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    result = _train(snapshot, tiny_model_dir, "z3", "train.zero_stage=3", "train.epochs=1")
    assert storage.read_json(result["summary_uri"])["deepspeed"]["zero_stage"] == 3
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
