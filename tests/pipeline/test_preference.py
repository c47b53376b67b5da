"""task=preference: validate's refusals of broken pairs (each naming the check, the row and the
field), DPO training through the real launcher (TRL's DPOTrainer, 2 CPU processes, DeepSpeed,
LoRA) killed mid-training and resumed from its checkpoint, and evaluate's reward figures.
One DPO training on the tiny Llama (a module fixture) serves the training and evaluate tests."""

import json

import pytest

from pipeline import preference, storage, validate
from pipeline.config import load_config
from pipeline.config.validate import PREFERENCE_CHECKS
from pipeline.errors import ValidationFailed
from tests.helpers import write_snapshot

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
