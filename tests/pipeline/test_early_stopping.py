"""Eval during training and early stopping, run for real: the tiny Llama with LoRA under ZeRO-3
over 2 CPU processes, a learning rate high enough to overfit a small chat snapshot, so that the
held-out loss turns up and early stopping fires. The published weights must be the best
evaluation's: equal to those of a run stopped at that step by max_steps."""

import json

import pytest

from pipeline import local, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.helpers import collect_snapshot, train_settings, write_jsonl

INSTRUCTIONS = "pkg://pipeline/data/support_instructions.jsonl"
# A constant learning rate: the run cut by max_steps then follows the same schedule.
LM = [
    "task=causal-lm",
    "train.max_seq_len=192",
    "train.batch_size=8",
    "train.learning_rate=0.1",
    "train.zero_stage=3",
    "train.lora_r=8",
    'train.lora_target_modules=["q_proj", "v_proj", "lm_head"]',
    "train.lora_merge=false",
    "train.lora_dropout=0.0",
    "train.warmup_ratio=0.0",
    "train.epochs=3",
    "train.logging_steps=1",
    "train.checkpoint_steps=0",
]


@pytest.fixture
def small_chat(tmp_path):
    """120 conversations of the shipped chat data: about 96 to train on (6 steps an epoch)."""
    rows = [json.loads(line) for line in (storage.local_path(INSTRUCTIONS)).read_text().splitlines()[:120]]
    return collect_snapshot([write_jsonl(tmp_path / "chat.jsonl", rows)], "task=causal-lm")


def _train(snapshot, model_dir, run_id, *extra):
    return local.launch_local("train", train_settings(snapshot, model_dir, run_id, *LM, *extra))


def _weights(model_uri):
    from safetensors.torch import load_file

    return load_file(str(storage.local_path(model_uri) / "adapter_model.safetensors"))


def test_early_stopping_needs_evaluation():
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["train.early_stopping_patience=2"])
    assert "train.early_stopping_patience needs train.eval_steps" in str(refused.value)


@pytest.mark.slow
def test_early_stopping_publishes_the_best_evaluations_weights(small_chat, tiny_lm_dir):
    from pipeline.tracking import client

    stopped = _train(
        small_chat,
        tiny_lm_dir,
        "early",
        "train.eval_steps=1",
        "train.early_stopping_patience=2",
        'train.trainer_args={"lr_scheduler_type": "constant"}',
    )
    summary = storage.read_json(stopped["summary_uri"])
    curve, best = summary["eval_loss_curve"], summary["best_step"]
    print(f"early-stopping figures: eval loss by step {curve}; best step {best}, stopped at {stopped['global_step']}")
    assert summary["stopped_early"] and stopped["global_step"] == best + 2  # patience: 2 evaluations, one a step
    assert summary["best_eval_loss"] == min(loss for _, loss in curve) == dict(curve)[best]
    # The curve is in MLflow, one point per evaluation.
    history = client().get_metric_history(stopped["mlflow_run_id"], "train_eval_loss")
    assert [(m.step, m.value) for m in history] == [tuple(point) for point in curve]
    # In memory, after the Trainer loaded the best checkpoint: its eval loss, not the last step's.
    assert summary["eval_loss_in_memory"] is not None

    cut = _train(
        small_chat, tiny_lm_dir, "cut", f'train.trainer_args={{"lr_scheduler_type": "constant", "max_steps": {best}}}'
    )
    assert cut["global_step"] == best
    published, reference = _weights(stopped["model_uri"]), _weights(cut["model_uri"])
    diff = max(float((published[k] - reference[k]).abs().max()) for k in reference)
    print(f"early-stopping figures: max abs weight diff to the run cut at step {best}: {diff:g}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_a_run_killed_after_its_best_checkpoint_resumes_and_still_publishes_the_best(
    small_chat, tiny_lm_dir, tmp_path, capfd
):
    """SIGKILL once the checkpoint of step 2 (train.checkpoint_steps) is in the store, past the best
    at step 1: the next attempt resumes from step 2 with the patience count it had, fetches the best
    checkpoint from the store, stops at step 4 (patience 3) and publishes step 1's adapter."""
    import signal
    import threading
    import time

    from pipeline import checkpoints

    early = [
        *LM,
        "train.eval_steps=1",
        "train.early_stopping_patience=3",
        "train.checkpoint_steps=2",
        'train.trainer_args={"lr_scheduler_type": "constant"}',
        "run_id=killed",
        f"base_model={json.dumps(str(tiny_lm_dir))}",
        f"train.snapshot_uri={small_chat.snapshot_uri}",
    ]
    root = storage.join(load_config(None, early).step_uri("train"), "checkpoints")
    process = local.StepProcess(local.local_command("train", early, str(tmp_path / "result.json")), local.local_env())
    threading.Thread(target=lambda: process.popen.stdout.read(), daemon=True).start()  # a full pipe would block it
    deadline = time.monotonic() + 240
    while not any(c.step == 2 for c in checkpoints.complete(root)):
        assert process.popen.poll() is None and time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.01)
    for proc in process.members():
        proc.send_signal(signal.SIGKILL)
    process.wait(30)
    kept = {c.step for c in checkpoints.complete(root)}
    assert {1, 2} <= kept and 3 not in kept, kept  # the best (1) is kept whatever keep_checkpoints says
    capfd.readouterr()

    resumed = local.launch_local("train", early)
    assert "resuming from step 2 " in capfd.readouterr().out
    summary = storage.read_json(resumed["summary_uri"])
    assert summary["best_step"] == 1 and resumed["global_step"] == 4 and summary["stopped_early"], summary
    cut = _train(
        small_chat, tiny_lm_dir, "cut1", 'train.trainer_args={"lr_scheduler_type": "constant", "max_steps": 1}'
    )
    published, reference = _weights(resumed["model_uri"]), _weights(cut["model_uri"])
    assert max(float((published[k] - reference[k]).abs().max()) for k in reference) <= 1e-6


def test_classification_holds_out_the_eval_split_only_when_asked(small_data, tiny_model_dir):
    from pipeline.snapshot import load_snapshot
    from pipeline.train import parts

    snapshot = collect_snapshot([small_data])
    frame = load_snapshot(snapshot.snapshot_uri)
    base = [f"train.snapshot_uri={snapshot.snapshot_uri}", f"base_model={json.dumps(str(tiny_model_dir))}"]
    held_out = parts.classification_parts(
        load_config(None, [*base, "train.eval_steps=5"]), str(tiny_model_dir), frame, {}
    ).eval_dataset
    assert len(held_out) == snapshot.rows_eval and {"labels", "example_id", "input_ids"} <= set(held_out.column_names)
    assert parts.classification_parts(load_config(None, base), str(tiny_model_dir), frame, {}).eval_dataset is None
