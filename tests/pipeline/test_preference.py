"""task=preference: validate's refusals of broken pairs (each naming the check, the row and the
field), DPO training through the real launcher (TRL's DPOTrainer, 2 CPU processes, DeepSpeed,
LoRA) killed mid-training and resumed from its checkpoint, and evaluate's reward figures.
One DPO training on the tiny Llama (a module fixture) serves the training and evaluate tests."""

import json

import pytest

from pipeline import preference, storage, tracking, validate
from pipeline.config import load_config
from pipeline.config.validate import PREFERENCE_CHECKS
from pipeline.errors import ValidationFailed
from tests.helpers import collect_snapshot, run_step_here, train_settings, write_snapshot
from tests.pipeline.test_resume import _kill_after_first_checkpoint, _start

PAIRS = "pipeline/data/support_preferences.jsonl"
DPO = [
    "task=preference",
    "train.max_seq_len=256",
    "train.batch_size=4",
    "train.learning_rate=5e-3",
    "train.lora_r=8",
    "train.lora_alpha=16",
]


def _pairs(n):
    return [json.loads(line) for line in open(PAIRS, encoding="utf-8")][:n]


def _snapshot_file(tmp_path, rows, name="pairs"):
    columns = {f: [json.dumps(r[f], ensure_ascii=False) for r in rows] for f in preference.FIELDS}
    return write_snapshot(tmp_path / f"{name}.parquet", {**columns, "split": [r.get("split", "train") for r in rows]})


def _validate_cfg(uri, model_dir, *extra):
    return load_config(
        None,
        [f"validate.snapshot_uri={json.dumps(uri)}", "run_id=v", "task=preference", f"base_model={model_dir}",
         "train.max_seq_len=256", *extra],
    )  # fmt: skip


def test_shipped_pairs_pass_the_preference_suite_and_text_fields_read_as_turns(tmp_path, tiny_lm_dir):
    rows = _pairs(24)
    rows[0] = {"prompt": "where is my order?", "chosen": "It ships tomorrow.", "rejected": "It ships"}
    result = validate.run(_validate_cfg(_snapshot_file(tmp_path, rows), tiny_lm_dir))
    summary = storage.read_json(result.summary_uri)
    assert result.passed and {c["check"] for c in summary["checks"]} == set(PREFERENCE_CHECKS)
    assert 0 < summary["pair_tokens"]["longest"] <= 256 and summary["pair_tokens"]["counted"] == 24
    assert preference.to_pair(rows[0])[0] == [{"role": "user", "content": "where is my order?"}]


# Each broken pair (on a prompt of its own) and what the refusal says of it: the check, the row, the field.
BROKEN = [
    (
        {"chosen": [{"role": "assistant", "content": "Same answer."}],
         "rejected": [{"role": "assistant", "content": "same   ANSWER."}]},
        "answers_differ: expect_column_values_to_be_in_set(column=same_answers): 1 unexpected, example rows [20]",
    ),
    (
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "pairs_valid: expect_column_values_to_be_null(column=pair_error): 2 unexpected, example rows [21, 22], "
        "observed None, values [\"'prompt' must end with a user turn\", \"'rejected' must be assistant turns only\"]",
    ),
    ({"rejected": [{"role": "user", "content": "no"}]}, ""),  # the second value above
    (
        {"chosen": [{"role": "assistant", "content": "word " * 300}]},
        "pair_tokens: expect_column_values_to_be_between(column=pair_tokens): 1 unexpected, example rows [23]",
    ),
    (
        {"split": "eval", "prompt": "__row 0__"},  # the prompt of row 0, a train pair, again in eval
        "split_leakage: expect_column_values_to_be_in_set(column=leaks_across_splits): 2 unexpected, example rows "
        "[0, 24]",
    ),
]  # fmt: skip


def test_broken_pairs_are_refused_naming_the_check_row_and_field(tmp_path, tiny_lm_dir):
    rows = _pairs(26)
    good, spare = rows[:20], rows[20:]
    bad = []
    for (broken, _), base in zip(BROKEN, spare):
        row = {**base, **broken}
        if row["prompt"] == "__row 0__":
            row["prompt"] = good[0]["prompt"]
        bad.append(row)
    with pytest.raises(ValidationFailed) as failed:
        validate.run(_validate_cfg(_snapshot_file(tmp_path, [*good, *bad]), tiny_lm_dir))
    assert failed.value.exit_code == 3
    message = str(failed.value)
    assert "4 check(s) failed: pairs_valid, answers_differ, pair_tokens, split_leakage" in message
    for _, expected in BROKEN:
        assert expected in message


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_lm_dir):
    """One DPO training (ZeRO-2, LoRA, 2 processes, checkpoints every 2 steps), SIGKILLed once it saved
    a checkpoint and run again: the snapshot, the settings, the resumed step's result and output."""
    home = tmp_path_factory.mktemp("dpo-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_HOME", str(home))
        patch.delenv("FINETUNE_ARTIFACT_ROOT", raising=False)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        source = home / "pairs.jsonl"
        source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _pairs(96)), encoding="utf-8")
        snapshot = collect_snapshot([source], "task=preference")
        settings = train_settings(
            snapshot, tiny_lm_dir, "dpo", *DPO, "train.epochs=2", "train.checkpoint_steps=2", "train.logging_steps=2"
        )
        first, killed_at = _kill_after_first_checkpoint(settings, home)
        again = _start(settings, home)
        code = again.popen.wait(300)
        again.reader.join(timeout=30)
        yield {
            "home": home,
            "snapshot": snapshot,
            "first": first,
            "killed_at": killed_at,
            "code": code,
            "output": "".join(again.lines),
            "result": json.loads((home / "result.json").read_text()) if code == 0 else None,
        }


@pytest.mark.slow
def test_dpo_killed_mid_training_resumes_from_its_checkpoint_and_publishes(dpo_run, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(dpo_run["home"]))
    assert dpo_run["code"] == 0, dpo_run["output"][-3000:]
    result = dpo_run["result"]
    assert f"resuming from step {dpo_run['killed_at']} " in dpo_run["output"]
    assert dpo_run["first"] <= dpo_run["killed_at"] < result["global_step"]
    summary = storage.read_json(result["summary_uri"])
    assert summary["pairs"]["kept"] == dpo_run["snapshot"].rows_train and summary["lora"]
    assert summary["sharding"]["world_size"] == 2 and summary["deepspeed"]["zero_stage"] == 2
    assert all(e["seen_twice"] == 0 for e in summary["sharding"]["epochs"])
    # The adapter merged into the published model, with the template the pairs were rendered with.
    model_dir = storage.local_path(result["model_uri"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer_config.json").is_file()
    assert storage.exists(storage.join(result["result_uri"].rsplit("/", 1)[0], "adapter/adapter_config.json"))


def _registered(model_dir, name, alias):
    """``model_dir`` logged as a run's artifacts and registered as ``name`` at ``alias``: its models:/ URI."""
    import mlflow

    with tracking.module_api():
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(model_dir), "model")
    tracker = tracking.client()
    tracker.create_registered_model(name)
    version = tracker.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    tracker.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"


@pytest.mark.slow
def test_evaluate_scores_reward_accuracy_beside_the_base_and_gates_on_it(dpo_run, tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("FINETUNE_HOME", str(dpo_run["home"]))
    assert dpo_run["code"] == 0
    evaluated = run_step_here(
        "evaluate",
        [
            *DPO,
            "run_id=dpo",
            f"base_model={json.dumps(str(tiny_lm_dir))}",
            f"evaluate.snapshot_uri={dpo_run['snapshot'].snapshot_uri}",
            f"evaluate.model_uri={dpo_run['result']['model_uri']}",
        ],
    )
    metrics, base = evaluated["metrics"], evaluated["base_metrics"]
    assert set(metrics) == set(base) == {
        "reward_accuracy", "reward_margin", "dpo_reward_accuracy", "dpo_reward_margin", "chosen_perplexity"
    }  # fmt: skip
    # The base is the reference: its implicit reward is 0 on every pair; the tuned model learnt to prefer.
    assert base["dpo_reward_accuracy"] == 0 and base["dpo_reward_margin"] == 0
    assert metrics["dpo_reward_margin"] > 0 and metrics["dpo_reward_accuracy"] >= 0.5
    assert evaluated["gate_metric"] == "reward_accuracy" and evaluated["greater_is_better"]
    assert evaluated["baseline_name"] == "base model" and "reward_accuracy" in evaluated["reason"]
    samples = storage.read_json(evaluated["report_uri"])
    assert samples and {"prompt", "chosen", "rejected", "chosen_logp", "rejected_logp"} <= set(samples[0])
    assert evaluated["promote"] == (metrics["reward_accuracy"] > base["reward_accuracy"])

    # train.reference_model names the reference as a registered model (models:/<name>@<alias>, read
    # through the registry as train reads it): here the base model's weights, so the same figures.
    reference = _registered(tiny_lm_dir, "support-chat-reference", "champion")
    again = run_step_here(
        "evaluate",
        [
            *DPO,
            "run_id=dpo-reference",
            f"base_model={json.dumps(str(tiny_lm_dir))}",
            f"train.reference_model={reference}",
            f"evaluate.snapshot_uri={dpo_run['snapshot'].snapshot_uri}",
            f"evaluate.model_uri={dpo_run['result']['model_uri']}",
        ],
    )
    assert again["metrics"] == pytest.approx(metrics) and again["base_metrics"] == pytest.approx(base)
