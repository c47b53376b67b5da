"""ZeRO-Offload run for real on CPU: DeepSpeed's CPU accelerator, gloo, 2 processes, the tiny
BERT. With the optimizer states (ZeRO-2) or the parameters and optimizer states (ZeRO-3)
offloaded, DeepSpeed's CPU Adam steps them; the run must reach the loss and weights of the same
run without offload. DeepSpeed's cpu_adam op is built by ``make install`` (pipeline/train/ops.py);
the ZeRO-2 offload run loads it from a copy where a killed build left its lock files behind."""

import pytest

from pipeline import local, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.train import deepspeed_config
from tests.helpers import built_ops_copy, train_settings

BATCH = 8


def _train(snapshot, model_dir, run_id, *extra):
    return local.launch_local(
        "train",
        train_settings(
            snapshot,
            model_dir,
            run_id,
            "train.epochs=1",
            f"train.batch_size={BATCH}",
            "train.logging_steps=1",
            "train.learning_rate=1e-3",
            *extra,
        ),
    )


def _max_weight_diff(a_uri, b_uri):
    from safetensors.torch import load_file

    a = load_file(str(storage.local_path(a_uri) / "model.safetensors"))
    b = load_file(str(storage.local_path(b_uri) / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_offload_config_uses_deepspeeds_cpu_adam_and_the_trainers_schedule():
    plain = deepspeed_config(load_config(None, ["train.zero_stage=2"]).train)
    assert "optimizer" not in plain and "offload_optimizer" not in plain["zero_optimization"]
    offloaded = deepspeed_config(
        load_config(None, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]).train
    )
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloaded["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offloaded["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    }
    assert "scheduler" not in offloaded  # the Trainer's schedule (warm-up, decay) drives CPU Adam too


@pytest.mark.parametrize(
    "settings, message",
    [
        (["train.offload_params=true"], "train.offload_params needs train.zero_stage=3, got 2"),
        (
            ["train.zero_stage=0", "train.offload_optimizer=true"],
            "train.offload_optimizer needs train.zero_stage 1, 2 or 3",
        ),
        (
            ["train.offload_optimizer=true", 'train.trainer_args={"optim": "adafactor"}'],
            "train.trainer_args.optim: with train.offload_optimizer the optimizer is DeepSpeed's CPU Adam",
        ),
    ],
)
def test_offload_settings_that_cannot_run_are_refused_at_config_time(settings, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, settings)
    assert message in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, offload",
    [
        (2, ["train.offload_optimizer=true"]),
        (3, ["train.offload_optimizer=true", "train.offload_params=true"]),
    ],
)
def test_offload_reaches_the_loss_of_the_same_run_without_it(
    snapshot, tiny_model_dir, stage, offload, tmp_path, monkeypatch
):
    plain = _train(snapshot, tiny_model_dir, f"plain-{stage}", f"train.zero_stage={stage}")
    if stage == 2:  # and a build lock left by a killed build stops neither op from loading
        extensions = built_ops_copy(tmp_path / "ext", "deepspeed_shm_comm", "cpu_adam")
        stale = [extensions / name / "lock" for name in ("deepspeed_shm_comm", "cpu_adam")]
        for lock in stale:
            lock.touch()
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    offloaded = _train(snapshot, tiny_model_dir, f"offload-{stage}", f"train.zero_stage={stage}", *offload)
    assert offloaded["global_step"] == plain["global_step"] > 0
    ran = storage.read_json(offloaded["summary_uri"])["deepspeed"]
    assert ran["optimizer"] == "DeepSpeedCPUAdam" and ran["offload_optimizer"]
    assert ran["offload_params"] is (stage == 3)
    assert storage.read_json(plain["summary_uri"])["deepspeed"]["optimizer"] == "AdamW"
    assert stage != 2 or not any(lock.exists() for lock in stale)
    diff = _max_weight_diff(plain["model_uri"], offloaded["model_uri"])
    print(
        f"offload figures: ZeRO-{stage} {offload}: train_loss {offloaded['train_loss']:.6f} vs "
        f"{plain['train_loss']:.6f} without offload; max abs weight diff {diff:g}"
    )
    assert offloaded["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert diff <= 1e-4
